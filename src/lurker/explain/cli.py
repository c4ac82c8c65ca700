"""What ``lurker explain`` needs besides the methods: reading an image the way the
probe's image-folder loader does, and parsing ``--target`` and ``--option``."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..errors import LurkerError
from .targets import UnitTarget


def load_image(
    path: str | Path, image_size: int, channels: int, normalize: str | None = None
) -> tuple[Tensor, Tensor]:
    """``(x, shown)``: the model's input ``(1, C, S, S)`` (resized, centre-cropped,
    normalised) and the same picture in [0, 1] to draw the heatmap on.

    Read as the probe's image folders read a file (:func:`lurker.probe.data.convert_image`:
    16-bit images scaled, transparency dropped; shorter side resized to ``image_size``,
    centre crop) and normalised by the same rule (``normalize``, see
    :func:`lurker.probe.data.normalize_stats`; None: ImageNet's mean and std for 3 channels,
    none for 1; ``raw``: the 0..255 values, as float), so an image is the same input here
    as in a probe of a folder holding it."""
    from torchvision import transforms

    from ..probe import data as pdata

    if channels not in (1, 3):
        raise LurkerError(
            f"lurker explain reads 1- or 3-channel images; this model takes {channels}"
        )
    mean, std = pdata.normalize_stats(normalize, channels)  # a bad spec before the file
    try:
        with Image.open(path) as im:
            im.load()
            img = pdata.convert_image(im, "RGB" if channels == 3 else "L")
    except (OSError, ValueError) as e:
        raise LurkerError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    shown = transforms.Compose(
        [transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()]
    )(img)
    if normalize is not None and pdata.parse_normalize(normalize) == "raw":
        # the folder's uint8 0..255 values, as float: the model's own x.float() / 255 then
        # sees the probe's input, and gradients are taken w.r.t. the image it casts
        x = transforms.PILToTensor()(
            transforms.CenterCrop(image_size)(transforms.Resize(image_size)(img))
        ).float()
        return x[None], x / 255.0
    x = transforms.Normalize(list(mean), list(std))(shown)  # the folder's very transform
    return x[None], shown


def parse_target(text: str) -> int | str | UnitTarget:
    """``--target``: an int class, ``top``, ``LAYER:CHANNEL`` or ``LAYER:CHANNEL:Y:X``
    (a layer name may itself hold ':', as ``cell:2`` does: the trailing ints are read
    from the right)."""
    text = text.strip()
    if text == "top":
        return text
    try:
        return int(text)
    except ValueError:
        pass
    parts = text.split(":")
    ints: list[int] = []
    for p in reversed(parts[1:]):
        try:
            ints.insert(0, int(p))
        except ValueError:
            break
    if len(ints) >= 3 and len(parts) - 3 >= 1:
        c, y, x = ints[-3:]
        return UnitTarget(":".join(parts[:-3]), c, y, x)
    if ints:
        return UnitTarget(":".join(parts[:-1]), ints[-1])
    raise LurkerError(
        f"--target {text!r}: give a class index (3), 'top', or a unit LAYER:CHANNEL "
        "(features.8:5) or LAYER:CHANNEL:Y:X"
    )


def parse_options(items: Sequence[str], method: str | None = None) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs; values are Python literals (``8``, ``0.1``,
    ``(1, 5, 5)``, ``true``/``false`` in any case) or plain strings.

    With ``method``, a value is checked against the type the method's option takes, so
    that ``n_steps=abc`` is refused here rather than failing inside the method, and an
    option that takes a string (``layer=3``, a module path) keeps the text as typed."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise LurkerError(f"--option {item!r}: write KEY=VALUE, e.g. n_steps=32")
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
        else:
            try:
                out[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key] = value
        if method is not None:
            out[key] = _typed_option(method, key, value, out[key])
    return out


#: the option types ``--option`` checks (others, such as tensors or tuples, go as parsed)
_TYPES: dict[str, tuple[type, ...]] = {
    "bool": (bool,),
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "None": (type(None),),
}


def _typed_option(method: str, key: str, text: str, value: Any) -> Any:
    """``value`` (``text`` parsed) as method ``method``'s option ``key`` takes it, or a
    clear error. An option the method does not have is left to the method to refuse."""
    from . import METHODS

    cls = METHODS.get(method)
    param = inspect.signature(cls.compute).parameters.get(key) if cls is not None else None
    if param is None or param.kind is not inspect.Parameter.KEYWORD_ONLY:
        return value
    names = [part.strip() for part in str(param.annotation).split("|")]
    if not all(name in _TYPES for name in names):
        return value
    if "str" in names and text.lower() not in ("none", "true", "false"):
        # a module path such as 3 is a name, not a number; a quoted string is its text
        return value if isinstance(value, str) else text
    if "bool" in names and value in (0, 1) and not isinstance(value, float):
        return bool(value)
    ok = isinstance(value, tuple(t for name in names for t in _TYPES[name]))
    if ok and not (isinstance(value, bool) and "bool" not in names):
        return value
    wanted = " or ".join(
        {"bool": "true or false", "None": "None"}.get(name, f"a{'n' * (name == 'int')} {name}")
        for name in names
    )
    raise LurkerError(
        f"--option {key}={text}: {method}'s {key} is {wanted} (default {param.default!r})"
    )


def image_channels_at(
    model: torch.nn.Module, image_size: int, channel_dim: int, device: Any = "cpu"
) -> int:
    """How many channels ``model`` takes with its channels on axis ``channel_dim`` (a
    channels-last model): 3 if it runs on a blank 3-channel image so laid out, else 1 if it
    runs on a 1-channel one, else 3 (then :func:`check_runs` says what fails)."""
    for channels in (3, 1):
        blank = torch.zeros(1, channels, image_size, image_size, device=device)
        try:
            with torch.no_grad():
                model(blank.movedim(1, channel_dim))
        except Exception:  # not this many channels (or not at all: check_runs says why)
            continue
        return channels
    return 3


def check_runs(model: torch.nn.Module, x: Tensor, image_size: int) -> None:
    """Run ``model`` once on the loaded image, so that a model that rejects it (a ViT
    built for another image size) is reported as such, not as a traceback from the
    middle of an explanation."""
    try:
        with torch.no_grad():
            model(x)
    except Exception as e:
        said = str(e).strip()
        if not said.endswith((".", "!", "?")):
            said += "."
        fix = (
            "If the model takes another image size, pass it with --image-size; if it takes "
            "channels-last images (B, H, W, C), pass --channel-dim -1. "
        )
        if reads_token_ids(model, x):
            fix = ""  # a text model: no image size makes it read a picture
        raise LurkerError(
            f"{type(model).__name__} fails on the image as loaded, a tensor of shape "
            f"{tuple(x.shape)} (--image-size {image_size}): {type(e).__name__}: {said} {fix}"
            f"{_NOT_AN_IMAGE}"
        ) from e


#: the calls that hand a model's input on unchanged but for its type, layout or device,
#: as a text model's ``ids.long()`` or ``ids.view(...)`` does before its embedding lookup
_PASS_ON = frozenset(
    getattr(Tensor, name)
    for name in (
        "to", "long", "int", "type", "contiguous", "view", "reshape", "flatten", "squeeze",
        "unsqueeze", "detach", "clone",
    )
)  # fmt: skip


def reads_token_ids(model: torch.nn.Module, x: Tensor) -> bool:
    """Whether ``model`` reads ``x`` as token ids: ``x`` is integer, or an embedding lookup
    takes ``x`` itself (or ``x`` cast or reshaped) as its indices. An image model that holds
    an embedding (a ViT's positions, a codebook indexed by computed codes) looks up other
    indices, so it is told about ``--image-size``. Runs ``model`` once more (it may fail
    again: the lookup is seen before the failure)."""
    from torch.overrides import TorchFunctionMode

    if not (x.is_floating_point() or x.is_complex()):
        return True
    lookups = {torch.nn.functional.embedding: (0, "input"), torch.embedding: (1, "indices")}
    ids: list[Tensor] = [x]
    seen = False

    def own(value: Any) -> bool:
        return isinstance(value, Tensor) and any(value is t for t in ids)

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            nonlocal seen
            kwargs = kwargs or {}
            if func in lookups:
                at, name = lookups[func]
                seen = seen or own(args[at] if len(args) > at else kwargs.get(name))
            out = func(*args, **kwargs)
            if func in _PASS_ON and args and own(args[0]) and isinstance(out, Tensor):
                ids.append(out)
            return out

    try:
        with torch.no_grad(), Watch():
            model(x)
    except Exception:  # the failure check_runs reports; the lookup, if any, came first
        pass
    return seen


#: where a model whose input is no image is explained (``lurker explain`` reads images)
_NOT_AN_IMAGE = (
    "lurker explain reads an image; a model of token ids or feature vectors is explained "
    "in Python, lurker.explain(model, x) (one score per token or feature), or, probed with "
    "`lurker probe`, by `lurker images RUN --explanations N` for the explorer's Explain page."
)
