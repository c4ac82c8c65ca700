"""Turn what a user types (a model spec, a weights path, an input shape) into torch objects.

Everything a user can get wrong here raises a :mod:`lurker.errors` exception whose message
names the cause and the fix, so the CLI can print it instead of a traceback from torch.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import itertools
import os
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from lurker.errors import InputSpecError, LurkerError, ModelSpecError, WeightsError

__all__ = [
    "IMAGE_CHANNEL_DIMS",
    "InputSpec",
    "canonical_channel_dim",
    "channels_first_view",
    "default_device",
    "is_probabilities",
    "probabilities",
    "example_inputs",
    "load_model",
    "load_spec_object",
    "parse_input_shape",
    "parse_inputs",
    "torchvision_specs",
]

_SPEC_FORMS = (
    "Accepted forms: 'torchvision:NAME' (a torchvision architecture, random init, e.g. "
    "'torchvision:resnet18'), 'timm:NAME' (e.g. 'timm:vit_tiny_patch16_224'), "
    "'package.module:callable' (an importable zero-argument factory or nn.Module instance, "
    "e.g. 'mypkg.models:build_model') and 'path/to/file.py:callable' (e.g. "
    "'./net.py:Net' or './net.py:Net.small')."
)
_LIST_TORCHVISION = 'python -c "import torchvision; print(torchvision.models.list_models())"'
_SAVE_STATE_DICT = "torch.save(model.state_dict(), path)"
# Keys under which training scripts commonly nest the state dict in a checkpoint dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
# Prefixes added by nn.DataParallel / DistributedDataParallel and by torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 5
_file_module_ids = itertools.count()


def load_model(
    spec: str,
    weights: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build the model named by ``spec``, optionally load a state dict, and return it in eval mode.

    Pretrained weights are never fetched (lurker runs offline and must be reproducible);
    pass ``weights`` to load a local state dict instead. Raises :class:`ModelSpecError` or
    :class:`WeightsError` with an actionable message for anything a user can get wrong.
    """
    spec = spec.strip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random-init models are the same in every process and run
        model = _build(spec)
    if weights is not None:
        _load_weights(model, Path(os.fspath(weights)).expanduser(), spec)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise LurkerError(
            f"Could not move the model from spec '{spec}' to device '{device}': "
            f"{type(e).__name__}: {_first_line(e)}. Pick a device that exists on this machine "
            f"(e.g. 'cpu', or 'cuda' when torch.cuda.is_available() is True)."
        ) from e
    return model.eval()


def default_device() -> str:
    """Where lurker runs a model nobody placed: the GPU when there is one, else the CPU.
    One rule for every command's ``--device`` and every Python ``device=None``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_probabilities(scores: torch.Tensor, dim: int = -1) -> bool:
    """Whether every slice of a model's output along ``dim`` is a probability distribution
    (non-negative, summing to 1 within the rounding of the output's own dtype: a bfloat16
    softmax sums to 1 only within a few 1e-3): the output of a final softmax, not logits.
    Give it the output as the model returned it, not cast up."""
    tol = max(1e-3, float(torch.finfo(scores.dtype).eps)) if scores.is_floating_point() else 0.0
    if not tol:
        return False
    s = scores.detach().float()
    return bool((s >= 0).all()) and bool(((s.sum(dim) - 1).abs() <= tol).all())


def probabilities(scores: torch.Tensor, dim: int = -1, own: bool | None = None) -> torch.Tensor:
    """A classifier's output as class probabilities along ``dim``, at float32 at least: as
    it is where the model ends in a softmax, else the softmax of its logits (a second
    softmax over probabilities would flatten them: 0.9 said as 0.69). ``own``: whether the
    output is probabilities, decided once by the caller for a whole pass (so that one
    batch's rows all agree with another's); None: :func:`is_probabilities` of ``scores``.
    One rule for the map's confidence, the live view's top-5 and evaluate's curves."""
    if own is None:
        own = is_probabilities(scores, dim)
    s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    return s if own else torch.softmax(s, dim)


def parse_input_shape(text: str) -> list[tuple[int, ...]]:
    """Parse a CLI shape string such as ``"1,3,224,224"`` or ``"1x10;1x5"`` into tuples.

    One shape per model input, separated by ``;`` or whitespace; dims separated by ``,`` or
    ``x``. Raises :class:`InputSpecError` naming the offending token, so a typo in a long
    command line is easy to spot.
    """
    example = "e.g. '1,3,224,224' for one input or '1,10;1,5' for two"
    # Tolerate spaces around dim separators ("1, 3, 224") before splitting on whitespace.
    normalized = re.sub(r"\s*([,xX])\s*", r"\1", text.strip())
    tokens = [t for t in re.split(r"[;\s]+", normalized) if t]
    if not tokens:
        raise InputSpecError(
            f"Empty input shape {text!r}: give comma-separated positive dimensions, {example}."
        )
    return [_parse_dims(token.strip("[]"), text, example) for token in tokens]


_DTYPES: dict[str, torch.dtype] = {
    "float": torch.float32,
    "float32": torch.float32,
    "double": torch.float64,
    "float64": torch.float64,
    "half": torch.float16,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "long": torch.int64,
    "int64": torch.int64,
    "int": torch.int32,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
}
_DTYPE_EXAMPLE = (
    "e.g. 'long:0-50257' (token ids 0 <= v < 50257), 'long:10' (0 <= v < 10), 'float', "
    "'half', or one per input separated by ';' such as 'long:0-1000;bool'"
)
_NUMBER = r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?"


@dataclass(frozen=True)
class InputSpec:
    """One model input as the command line describes it.

    ``shapes`` holds one shape for a tensor input, or one per tensor for a list input
    (``-i "[3,128,128; 3,96,96]"``, what torchvision detection models take). Values are
    drawn from ``low <= v < high`` when a range is given.
    """

    shapes: tuple[tuple[int, ...], ...]
    is_list: bool = False
    dtype: torch.dtype = torch.float32
    low: float | None = None
    high: float | None = None


def parse_inputs(shapes: str, dtypes: str | None = None) -> list[InputSpec]:
    """Parse ``--input-shape`` (and ``--input-dtype``) into one :class:`InputSpec` per input.

    Shapes are as in :func:`parse_input_shape`; a token in brackets is a list of tensors
    (``[3,128,128]`` is a list holding one image; ``[3,128,128; 3,96,96]`` two). ``dtypes``
    is ``NAME[:LOW-HIGH]`` (or ``NAME:HIGH``, meaning ``0-HIGH``; ``HIGH`` is excluded),
    one for all inputs or one per input separated by ``;``.
    """
    example = "e.g. '1,3,224,224' for one input, '1,10;1,5' for two, '[3,128,128]' for a list"
    text = shapes.strip()
    if text.count("[") != text.count("]") or re.search(r"\[[^\]]*\[", text):
        raise InputSpecError(
            f"Unbalanced or nested brackets in input shape {shapes!r}: a list input is one "
            f"pair of brackets around its tensors' shapes, {example}."
        )
    normalized = re.sub(r"\s*([,xX])\s*", r"\1", text)
    tokens = re.findall(r"\[[^\]]*\]|[^;\s\[\]]+", normalized)
    if not tokens:
        raise InputSpecError(
            f"Empty input shape {shapes!r}: give comma-separated positive dimensions, {example}."
        )
    parsed: list[tuple[tuple[tuple[int, ...], ...], bool]] = []
    for token in tokens:
        if token.startswith("["):
            inner = [t for t in re.split(r"[;\s]+", token[1:-1]) if t]
            if not inner:
                raise InputSpecError(
                    f"Empty list {token!r} in input shape {shapes!r}: put at least one tensor "
                    f"shape inside the brackets, {example}."
                )
            parsed.append((tuple(_parse_dims(t, shapes, example) for t in inner), True))
        else:
            parsed.append(((_parse_dims(token, shapes, example),), False))
    kinds = _parse_dtypes(dtypes, len(parsed))
    return [
        InputSpec(shapes=dims, is_list=is_list, dtype=dtype, low=low, high=high)
        for (dims, is_list), (dtype, low, high) in zip(parsed, kinds)
    ]


def _parse_dims(token: str, text: str, example: str) -> tuple[int, ...]:
    dims: list[int] = []
    for part in re.split(r"[,xX]", token.strip("()")):
        if not re.fullmatch(r"\d+", part):
            what = "an empty dimension" if not part else f"{part!r} is not an integer"
            raise InputSpecError(
                f"Invalid input shape token {token!r} in {text!r}: {what}. Dimensions must "
                f"be positive integers separated by ',' or 'x', {example}."
            )
        if int(part) <= 0:
            raise InputSpecError(
                f"Invalid input shape token {token!r} in {text!r}: dimension {part} must be "
                f"positive, {example}."
            )
        dims.append(int(part))
    return tuple(dims)


def _parse_dtypes(text: str | None, n: int) -> list[tuple[torch.dtype, float | None, float | None]]:
    if text is None or not text.strip():
        return [(torch.float32, None, None)] * n
    items = [t.strip() for t in text.split(";") if t.strip()]
    if len(items) not in (1, n):
        raise InputSpecError(
            f"--input-dtype {text!r} gives {len(items)} dtypes for {n} inputs: give one for "
            f"all inputs or one per input, in the order of --input-shape ({_DTYPE_EXAMPLE})."
        )
    parsed = [_parse_dtype(item, text) for item in items]
    return parsed * n if len(parsed) == 1 else parsed


def _parse_dtype(item: str, text: str) -> tuple[torch.dtype, float | None, float | None]:
    name, _, rng = item.partition(":")
    dtype = _DTYPES.get(name.strip().lower())
    if dtype is None:
        raise InputSpecError(
            f"Unknown input dtype {name.strip()!r} in --input-dtype {text!r}. Known: "
            f"{', '.join(_DTYPES)} ({_DTYPE_EXAMPLE})."
        )
    rng = rng.strip()
    if not rng:
        return dtype, None, None
    found = re.fullmatch(rf"(?:({_NUMBER})-)?({_NUMBER})", rng)
    if found is None:
        raise InputSpecError(
            f"Invalid value range {rng!r} in --input-dtype {text!r}: write LOW-HIGH or HIGH "
            f"(values are drawn from LOW <= v < HIGH; LOW defaults to 0), {_DTYPE_EXAMPLE}."
        )
    low, high = float(found.group(1) or 0), float(found.group(2))
    if dtype == torch.bool or dtype.is_complex:
        raise InputSpecError(
            f"--input-dtype {text!r}: a value range is for integer and float inputs, not "
            f"{name.strip()}."
        )
    if not dtype.is_floating_point:
        if low != int(low) or high != int(high):
            raise InputSpecError(
                f"--input-dtype {text!r}: the range of an integer input needs integer bounds, "
                f"got {rng!r}."
            )
        info = torch.iinfo(dtype)
        if low < info.min or high - 1 > info.max:
            raise InputSpecError(
                f"--input-dtype {text!r}: {dtype} holds {info.min}..{info.max}; the range "
                f"{rng!r} does not fit. Pick a wider dtype (e.g. long)."
            )
    if high <= low:
        raise InputSpecError(
            f"--input-dtype {text!r}: empty value range {rng!r}; HIGH must be greater than "
            f"LOW (values are drawn from LOW <= v < HIGH)."
        )
    return dtype, low, high


def example_inputs(
    shapes: Sequence[tuple[int, ...] | InputSpec],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> list[Any]:
    """Return one random input per shape or :class:`InputSpec`, the same for the same ``seed``.

    Values are drawn on the CPU from a private generator (the global RNG is untouched) and
    then moved, so traces are reproducible across runs and machines. Without a range,
    floating and complex dtypes get standard-normal values; integer and bool dtypes get 0s
    and 1s, which are valid indices for any embedding or class table. A list spec gives a
    list of tensors. ``dtype`` applies to plain shapes; a spec carries its own.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out: list[Any] = []
    for item in shapes:
        spec = item if isinstance(item, InputSpec) else InputSpec((tuple(item),), dtype=dtype)
        tensors = [_random(shape, spec, generator).to(device) for shape in spec.shapes]
        out.append(tensors if spec.is_list else tensors[0])
    return out


def _random(shape: tuple[int, ...], spec: InputSpec, generator: torch.Generator) -> torch.Tensor:
    dtype = spec.dtype
    if spec.high is not None:
        low = spec.low or 0.0
        if dtype.is_floating_point:
            t = torch.rand(shape, generator=generator, dtype=torch.float32)
            return (t * (spec.high - low) + low).to(dtype)
        return torch.randint(int(low), int(spec.high), shape, generator=generator).to(dtype)
    if dtype.is_complex:
        t = torch.randn(shape, generator=generator, dtype=torch.complex64)
    elif dtype.is_floating_point:
        t = torch.randn(shape, generator=generator, dtype=torch.float32)
    else:
        t = torch.randint(0, 2, shape, generator=generator)
    return t.to(dtype=dtype)


# --------------------------------------------------------------------------- model specs


def _build(spec: str) -> nn.Module:
    if ":" not in spec:
        raise ModelSpecError(_no_colon_message(spec))
    if spec.startswith("torchvision:"):
        return _build_torchvision(spec.partition(":")[2].strip())
    if spec.startswith("timm:"):
        return _build_timm(spec.partition(":")[2].strip())
    target, _, attr_path = spec.rpartition(":")
    target, attr_path = target.strip(), attr_path.strip()
    if not target or not attr_path:
        raise ModelSpecError(
            f"Model spec '{spec}' needs a module or file before ':' and a callable after it. "
            f"{_SPEC_FORMS}"
        )
    if target.endswith(".py"):
        module = _import_file(Path(target).expanduser(), spec)
    elif "/" in target or "\\" in target:
        raise ModelSpecError(
            f"Model spec '{spec}' looks like a file path, but '{target}' does not end in '.py'. "
            f"Point at the Python file that defines the model, e.g. 'path/to/net.py:Net'."
        )
    else:
        module = _import_module(target, spec)
    return _call_factory(module, attr_path, spec)


def _no_colon_message(spec: str) -> str:
    hint = ""
    if spec.endswith(".py"):
        hint = f" Name the callable after a colon, e.g. '{spec}:build_model'."
    elif spec:
        import torchvision

        if spec in torchvision.models.list_models():
            hint = f" Did you mean 'torchvision:{spec}'?"
    return f"Model spec '{spec}' has no ':' separating source and name.{hint} {_SPEC_FORMS}"


def _build_torchvision(name: str) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        close = difflib.get_close_matches(name.lower(), available, n=5, cutoff=0.6)
        suggestion = f"Close matches: {', '.join(close)}. " if close else ""
        raise ModelSpecError(
            f"torchvision has no model named '{name}'. {suggestion}List all names with "
            f"`{_LIST_TORCHVISION}` and use one as 'torchvision:NAME'."
        )
    try:
        return torchvision.models.get_model(name, **_no_download_kwargs(name))
    except Exception as e:
        raise ModelSpecError(
            f"Building torchvision model '{name}' raised {type(e).__name__}: {_first_line(e)}. "
            f"This torchvision version may not support it without arguments; wrap it in a "
            f"zero-argument factory and use the 'package.module:callable' or 'file.py:callable' "
            f"form."
        ) from e


def _no_download_kwargs(name: str) -> dict[str, Any]:
    """Builder arguments that keep a torchvision model random-init and offline.

    ``weights=None`` alone still lets detection and segmentation builders fetch (or quietly
    reuse from ``TORCH_HOME``) an ImageNet backbone through ``weights_backbone``; every
    argument that names weights or asks for a pretrained part is turned off.
    """
    import torchvision

    params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
    kwargs: dict[str, Any] = {"weights": None}
    for p in params:
        if p.startswith("weights"):
            kwargs[p] = None
        elif p.startswith("pretrained"):  # older torchvision builders
            kwargs[p] = False
    return kwargs


def torchvision_specs() -> dict[str, list[str]]:
    """The ``torchvision:NAME`` specs lurker builds, by task (what ``lurker trace -h`` names).

    Every one is random-init and built without touching the network or a weights cache.
    """
    import torchvision
    from torchvision import models

    tasks = {
        "classification": models,
        "detection": models.detection,
        "segmentation": models.segmentation,
        "video": models.video,
        "optical flow": models.optical_flow,
        "quantizable classification": models.quantization,
    }
    return {task: torchvision.models.list_models(module=mod) for task, mod in tasks.items()}


def _build_timm(name: str) -> nn.Module:
    try:
        timm = importlib.import_module("timm")
    except ImportError as e:
        raise ModelSpecError(
            f"Model spec 'timm:{name}' needs the timm package, which is not installed. Install "
            f"it with `pip install timm`, or use a 'torchvision:NAME' or 'file.py:callable' spec."
        ) from e
    try:
        model = timm.create_model(name, pretrained=False)
    except Exception as e:
        close: list[str] = []
        list_models = getattr(timm, "list_models", None)
        if callable(list_models):
            try:
                close = difflib.get_close_matches(name, list(list_models()), n=5)
            except Exception:
                close = []
        suggestion = f" Close matches: {', '.join(close)}." if close else ""
        raise ModelSpecError(
            f"timm.create_model('{name}') raised {type(e).__name__}: {_first_line(e)}."
            f'{suggestion} List names with `python -c "import timm; print(timm.list_models())"`.'
        ) from e
    return _require_module(model, f"timm.create_model('{name}')", f"timm:{name}")


def _import_module(
    name: str, spec: str, kind: str = "Model spec", error: type[LurkerError] = ModelSpecError
) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = e.name or name
        if name == missing or name.startswith(missing + "."):
            raise error(
                f"{kind} '{spec}': module '{name}' could not be found (no module named "
                f"'{missing}'). Install the package that provides it, add its parent directory "
                f"to PYTHONPATH (or run from that directory), or use the 'path/to/file.py:"
                f"callable' form to load a file directly."
            ) from e
        raise error(
            f"{kind} '{spec}': importing module '{name}' failed because it imports "
            f"'{missing}', which is not installed. Install it (e.g. `pip install {missing}`) "
            f"or make it importable, then retry."
        ) from e
    except Exception as e:
        raise error(
            f"{kind} '{spec}': importing module '{name}' raised {type(e).__name__}: "
            f'{_first_line(e)}. Fix the error in that module (try `python -c "import {name}"` '
            f"to see the full traceback)."
        ) from e


def _import_file(
    path: Path, spec: str, kind: str = "Model spec", error: type[LurkerError] = ModelSpecError
) -> ModuleType:
    if not path.is_file():
        where = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise error(
            f"{kind} '{spec}': file '{path}'{_resolved(path)} {where}. Check the path; "
            f"relative paths are relative to the current directory '{Path.cwd()}'."
        )
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"_lurker_user_{stem}_{next(_file_module_ids)}"
    file_spec = importlib.util.spec_from_file_location(module_name, path)
    if file_spec is None or file_spec.loader is None:
        raise error(
            f"{kind} '{spec}': Python cannot load '{path}' as a module. Make sure it is a "
            f"plain '.py' source file."
        )
    module = importlib.util.module_from_spec(file_spec)
    # Registered so that classes defined in the file can be found by pickle/dataclasses.
    sys.modules[module_name] = module
    directory = str(path.resolve().parent)
    sys.path.insert(0, directory)  # let the file import its sibling modules
    try:
        file_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(module_name, None)
        fix = (
            f"Make sure '{e.name}' is installed or lives next to the file."
            if isinstance(e, ModuleNotFoundError)
            else f"Fix the error in the file (run `python {path}` to see the full traceback)."
        )
        raise error(
            f"{kind} '{spec}': executing '{path}' raised {type(e).__name__}: "
            f"{_first_line(e)}. {fix}"
        ) from e
    finally:
        if directory in sys.path:
            sys.path.remove(directory)
    return module


def load_spec_object(spec: str, kind: str, error: type[LurkerError] = LurkerError) -> Any:
    """What a ``package.module:callable`` or ``path/to/file.py:callable`` spec names, called
    with no arguments when it is callable (else the object itself): how MODEL and, for
    instance, ``lurker probe --data`` take code, with the same errors. ``kind`` starts each
    message ("Dataset spec"); the caller checks what it got."""
    spec = spec.strip()
    target, _, attr_path = spec.rpartition(":")
    target, attr_path = target.strip(), attr_path.strip()
    if not target or not attr_path:
        raise error(
            f"{kind} '{spec}' needs a module or file before ':' and a callable after it, as "
            "'package.module:callable' or 'path/to/file.py:callable'."
        )
    if target.endswith(".py"):
        module = _import_file(Path(target).expanduser(), spec, kind, error)
    elif "/" in target or "\\" in target:
        raise error(
            f"{kind} '{spec}' looks like a file path, but '{target}' does not end in '.py'. "
            f"Point at the Python file that defines it, e.g. 'path/to/data.py:make_dataset'."
        )
    else:
        module = _import_module(target, spec, kind, error)
    obj = _resolve_attr(module, attr_path, spec, kind, error)
    if not callable(obj):
        return obj
    try:
        return obj()
    except Exception as e:
        raise error(
            f"{kind} '{spec}': calling '{attr_path}()' raised {type(e).__name__}: "
            f"{_first_line(e)}. The callable is called with no arguments; if it needs some, "
            f"wrap it in a factory such as `def make(): return {attr_path}(...)` and point "
            f"the spec at that."
        ) from e


def _resolve_attr(
    module: ModuleType, attr_path: str, spec: str, kind: str, error: type[LurkerError]
) -> Any:
    obj: Any = module
    walked: list[str] = []
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            owner = ".".join(walked) or f"module '{_display_name(module, spec)}'"
            available = _public_callables(obj, module)
            close = difflib.get_close_matches(part, available, n=3)
            suggestion = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            listing = ", ".join(available[:20])
            if len(available) > 20:
                listing += f" and {len(available) - 20} more"
            raise error(
                f"{kind} '{spec}': {owner} has no attribute '{part}'.{suggestion} "
                f"Public callables there: {listing or '(none)'}. Put one of them after the ':'."
            ) from e
        walked.append(part)
    return obj


def _call_factory(module: ModuleType, attr_path: str, spec: str) -> nn.Module:
    obj = _resolve_attr(module, attr_path, spec, "Model spec", ModelSpecError)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelSpecError(
            f"Model spec '{spec}': '{attr_path}' is a {type(obj).__name__}, neither a callable "
            f"nor an nn.Module. Point the spec at a zero-argument factory, a model class, or a "
            f"module-level nn.Module instance."
        )
    try:
        result = obj()
    except Exception as e:
        raise ModelSpecError(
            f"Model spec '{spec}': calling '{attr_path}()' raised {type(e).__name__}: "
            f"{_first_line(e)}. The callable is called with no arguments; if it needs some, "
            f"wrap it in a factory such as `def build(): return {attr_path}(...)` and point "
            f"the spec at that."
        ) from e
    return _require_module(result, f"'{attr_path}()'", spec)


def _require_module(result: object, what: str, spec: str) -> nn.Module:
    if isinstance(result, nn.Module):
        return result
    raise ModelSpecError(
        f"Model spec '{spec}': {what} returned a {type(result).__name__}, not a "
        f"torch.nn.Module. Make the callable return the model instance itself (e.g. "
        f"`return Net()`, not a tuple, class, or state dict)."
    )


def _public_callables(obj: object, module: ModuleType) -> list[str]:
    """Names worth suggesting: public callables, those defined in ``module`` first."""
    names = [n for n in dir(obj) if not n.startswith("_")]
    found = []
    for n in names:
        value = getattr(obj, n, None)
        if isinstance(value, ModuleType) or not (callable(value) or isinstance(value, nn.Module)):
            continue
        local = getattr(value, "__module__", None) == module.__name__
        found.append((not local, n))
    return [n for _, n in sorted(found)]


def _display_name(module: ModuleType, spec: str) -> str:
    if module.__name__.startswith("_lurker_user_"):
        return spec.rpartition(":")[0]
    return module.__name__


# --------------------------------------------------------------------------- weights


def _load_weights(model: nn.Module, path: Path, spec: str) -> None:
    if not path.is_file():
        where = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise WeightsError(
            f"Weights file '{path}'{_resolved(path)} {where}. Check the path passed as "
            f"weights; relative paths are relative to the current directory '{Path.cwd()}'."
        )
    how = (
        f"lurker only loads state dicts, with torch.load(weights_only=True) so that a "
        f"checkpoint cannot run arbitrary code. Save one with `{_SAVE_STATE_DICT}`."
    )
    what = _not_a_checkpoint(path)
    if what is not None:
        raise WeightsError(
            f"Weights file '{path}' is not a PyTorch checkpoint: it is {what}. Point the "
            f"weights at a state dict file; {how}"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise WeightsError(
                f"Weights file '{path}' could not be read as a PyTorch checkpoint "
                f"({type(e).__name__}: {_first_line(e)}). {how}"
            ) from e
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        culprit = f" (it contains {found.group(1)})" if found else ""
        raise WeightsError(
            f"Weights file '{path}' contains pickled Python objects that weights_only=True "
            f"refuses to load{culprit}; it is probably a whole model saved with "
            f"torch.save(model). {how}"
        ) from e
    except Exception as e:
        raise WeightsError(
            f"Weights file '{path}' could not be read as a PyTorch checkpoint "
            f"({type(e).__name__}: {_first_line(e)}). {how}"
        ) from e
    state = _extract_state_dict(checkpoint, path, how)
    model_state = model.state_dict()
    state = _strip_wrapper_prefixes(state, model_state)
    problem = _describe_mismatch(state, model_state)
    if problem:
        raise WeightsError(
            f"Weights file '{path}' does not fit the model from spec '{spec}': {problem}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise WeightsError(
            f"Loading weights file '{path}' into the model from spec '{spec}' failed "
            f"({type(e).__name__}: {_first_line(e)}). Check that the checkpoint was saved from "
            f"the same architecture, with `{_SAVE_STATE_DICT}`."
        ) from e


def _not_a_checkpoint(path: Path) -> str | None:
    """What the file is when its first bytes show it is not something torch.save wrote.

    torch.save writes a zip archive (or, with the legacy format, a pickle, which starts with
    the protocol byte 0x80); anything else would be reported by torch.load as a pickle it
    refuses, which sends users looking for a pickled model that is not there.
    """
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if not head:
        return "an empty file (0 bytes)"
    size = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    if head[8:9] == b"{" and 0 < size < path.stat().st_size:
        return (
            "a safetensors file; convert it with `torch.save(safetensors.torch.load_file("
            "path), 'weights.pt')`"
        )
    known = {
        b"\x89HDF": "an HDF5 file (e.g. Keras .h5 weights), not a PyTorch one",
        b"\x93NUMPY": "a NumPy .npy array",
        b"\x1f\x8b": "a gzip-compressed file; decompress it first",
        b"\x89PNG": "a PNG image",
        b"\xff\xd8\xff": "a JPEG image",
        b"<": "an HTML or XML document (a failed download saves an error page like this)",
    }
    for magic, name in known.items():
        if head.lstrip().startswith(magic):
            return name
    try:  # (a multi-byte character may be cut at the end of the 64 bytes read)
        text = head[:-3].decode("utf-8") + head[-3:].decode("utf-8", errors="ignore")
    except UnicodeDecodeError:
        shown = head[:8].hex(" ")
        return f"binary data of an unknown format (it starts with the bytes {shown})"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file (it starts with {first!r})"


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(k, str) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))
        for k, v in obj.items()
    )


def _extract_state_dict(checkpoint: object, path: Path, how: str) -> Mapping[str, Any]:
    if _is_state_dict(checkpoint):
        return checkpoint  # type: ignore[return-value]
    if isinstance(checkpoint, Mapping):
        for key in _WRAPPER_KEYS:
            if key in checkpoint and _is_state_dict(checkpoint[key]):
                return checkpoint[key]
        keys = ", ".join(repr(k) for k in list(checkpoint)[:10])
        raise WeightsError(
            f"Weights file '{path}' holds a dict that is not a state dict and has none under "
            f"the keys {', '.join(repr(k) for k in _WRAPPER_KEYS)} (its keys: {keys}). {how}"
        )
    raise WeightsError(
        f"Weights file '{path}' holds a {type(checkpoint).__name__}, not a state dict. {how}"
    )


def _strip_wrapper_prefixes(
    state: Mapping[str, Any], model_state: Mapping[str, Any]
) -> Mapping[str, Any]:
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not all(
                k.startswith(prefix) for k in model_state
            ):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _describe_mismatch(state: Mapping[str, Any], model_state: Mapping[str, Any]) -> str:
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in model_state
        if k in state
        and isinstance(state[k], torch.Tensor)
        and isinstance(model_state[k], torch.Tensor)
        and state[k].shape != model_state[k].shape
    ]
    parts = [
        _listing(f"{len(missing)} missing key(s) the model needs", missing),
        _listing(f"{len(unexpected)} unexpected key(s) the model does not have", unexpected),
        _listing(f"{len(shapes)} shape mismatch(es)", shapes),
    ]
    parts = [p for p in parts if p]
    if not parts:
        return ""
    if shapes and not missing and not unexpected:
        cause = (
            "The parameter names match but sizes differ, so the checkpoint is from the same "
            "architecture with a different configuration (e.g. num_classes or width): build "
            "the model with that configuration."
        )
    else:
        cause = (
            "The checkpoint was most likely saved from a different architecture: check that "
            "the spec names the model that produced it (e.g. resnet50 vs resnet18)."
        )
    return "; ".join(parts) + ". " + cause


def _listing(title: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{title}: {shown}{more}"


def _resolved(path: Path) -> str:
    resolved = path.resolve()
    return "" if str(resolved) == str(path) else f" (resolved to '{resolved}')"


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return text.splitlines()[0] if text else "(no message)"


class _FirstConv(Exception):
    """Raised by :func:`image_channels`' hook: the first convolution was met."""

    def __init__(self, channels: int | None):
        super().__init__()
        self.channels = channels


def image_channels(model: nn.Module, size: int, device: Any = "cpu") -> int | None:
    """How many channels ``model`` takes in an image: the ``in_channels`` of the first
    convolution that reads the image itself, found by starting one forward on a blank
    image and stopping it there (before any batch norm can update its statistics). None
    when no convolution reads the image (a model that transforms it first, an MLP): the
    caller keeps its default.

    Not the first registered parameter's shape: a head may be registered before the stem,
    and a grouped convolution's weight holds a group's channels, not the input's.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        return None
    for channels in dict.fromkeys((3, 1, *(c.in_channels for c in convs[:1]))):
        x = torch.zeros(1, channels, size, size, device=device)

        def stop(mod: nn.Module, args: tuple, x: torch.Tensor = x) -> None:
            # the image itself, or a copy of its batch and channels (normalised or resized
            # inside the model); anything else (a view that folds channels into the
            # batch, a 1-d conv over rows) tells nothing about this many channels
            t = args[0] if args else None
            reads_image = (
                isinstance(t, torch.Tensor)
                and t.dim() == 4
                and t.shape[:2] == x.shape[:2]
                and len(getattr(mod, "kernel_size", ())) == 2
            )
            raise _FirstConv(mod.in_channels if reads_image else None)

        handles = [c.register_forward_pre_hook(stop) for c in convs]
        try:
            with torch.no_grad():
                model(x)
        except _FirstConv as hit:
            if hit.channels is not None:
                return hit.channels
            continue  # try the next number of channels
        except Exception:  # this many channels did not even reach a convolution
            continue
        finally:
            for h in handles:
                h.remove()
        return None  # a whole forward without any convolution
    return None


#: where a model's image input may keep its channels: an image batch has axes 0 to 3
IMAGE_CHANNEL_DIMS = (1, 2, 3, -1, -2, -3)


class _ChannelsAt(nn.Module):
    """Mixed into a view's class (see :func:`channels_first_view`): moves the channels of
    an ``(N, C, H, W)`` batch to the model's own axis before its ``forward``."""

    _lurker_channel_dim: int

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise LurkerError(
                f"channel_dim={self._lurker_channel_dim} moves the channels of an image batch "
                f"(N, C, H, W), and this input is {shape}: give 4-D image batches, or leave "
                "channel_dim unset (on the command line, leave out --channel-dim) for a model "
                "that takes other inputs"
            )
        return super().forward(x.movedim(1, self._lurker_channel_dim), *args, **kwargs)


_VIEW_CLASSES: dict[type, type] = {}


def canonical_channel_dim(channel_dim: int | None) -> int | None:
    """``channel_dim`` checked and written one way: None for channels-first (None or 1),
    else its negative axis (3 and -1 are one layout), so that a run records one value per
    layout."""
    if channel_dim is None:
        return None
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise LurkerError(
            f"channel_dim must be an int (the axis of the model's image input that holds the "
            f"channels, counting the batch axis: 1 or -1), got {channel_dim!r}"
        )
    if channel_dim not in IMAGE_CHANNEL_DIMS:
        raise LurkerError(
            f"channel_dim={channel_dim}: an image batch has axes 0 (the batch) to 3; give 1 "
            "for (N, C, H, W) or -1 (3) for (N, H, W, C) (CLI: --channel-dim)"
        )
    return None if channel_dim == 1 else channel_dim % 4 - 4


def channels_first_view(model: nn.Module, channel_dim: int | None) -> nn.Module:
    """``model`` as one that takes ``(N, C, H, W)`` image batches, for a model whose input
    keeps its channels on axis ``channel_dim`` (``-1``: ``(N, H, W, C)``, a Keras port or a
    model that permutes inside ``forward``); ``model`` itself for ``None`` or 1.

    Everything that feeds a model images (the probe, its unit images, the explorer's live
    view) works on ``(N, C, H, W)``; the view moves the channels in its ``forward``. It is
    a shallow copy of ``model`` that shares its modules, parameters and buffers (so layer
    names, weights and the fingerprint are the model's own) with a subclass of its class
    that moves the axis, so a deep copy of the view (LRP's canonization) stays one. The
    copy is made without the class's own copy or pickle hooks, which could change the
    shared modules. A view is returned as it is."""
    if isinstance(model, _ChannelsAt):
        return model
    channel_dim = canonical_channel_dim(channel_dim)
    if channel_dim is None:
        return model
    if "forward" in vars(model) or isinstance(model, torch.jit.ScriptModule):
        raise LurkerError(
            f"channel_dim={channel_dim} needs the model's own nn.Module, whose class defines "
            f"its forward; this {type(model).__name__} sets forward on the instance (a "
            "torch.compile'd model: pass model._orig_mod) or is scripted (pass the eager "
            "module)"
        )
    if model._forward_pre_hooks or model._forward_pre_hooks_with_kwargs:
        raise LurkerError(
            f"channel_dim={channel_dim}: the model has forward pre-hooks on itself, which would "
            "see the (N, C, H, W) batch before its channels are moved; move the hooks to a "
            "submodule, or wrap the model in a module whose forward moves the channels "
            "(x.movedim(1, -1)) and probe that without channel_dim"
        )
    cls = type(model)
    view_cls = _VIEW_CLASSES.get(cls)
    if view_cls is None:
        attrs = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        view_cls = _VIEW_CLASSES[cls] = type(cls.__name__, (_ChannelsAt, cls), attrs)
    view = object.__new__(view_cls)
    view.__dict__.update(model.__dict__)
    object.__setattr__(view, "_lurker_channel_dim", channel_dim)
    return view
