"""What every attribution method shares: the :class:`Explanation` it returns, the
:class:`Method` base class and its registry, and :func:`untouched`, the guard that leaves
the model as it was found (hooks, ``requires_grad`` flags, train/eval mode, buffers), also
when a method raises."""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import numbers
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, ParamSpec, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from ..capture import training_layers
from ..errors import LurkerError, TraceError, warn

if TYPE_CHECKING:
    from PIL import Image

    from .axes import InputAxes
    from .targets import UnitTarget

__all__ = ["METHODS", "Explanation", "Method", "register", "untouched"]

P = ParamSpec("P")
R = TypeVar("R")


def outside_inference_mode(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run outside ``torch.inference_mode`` when called inside it: there autograd
    records nothing (``torch.enable_grad`` cannot turn it on), so every gradient would
    silently be 0, and a model copied there would hold parameters autograd refuses."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


@dataclass(repr=False)
class Explanation:
    """One attribution: ``attribution`` has the input's shape (a batch: one map per row).

    ``target`` is what was explained, resolved: the class index of each row, or the
    :class:`~lurker.explain.targets.UnitTarget`. ``output`` is the model's output for the
    input where the method computed it; ``delta`` the convergence delta of integrated
    gradients (per row: sum of attributions minus ``f(x) - f(baseline)``). ``signed``:
    whether the values have a sign that matters (the overlay's colour map follows it).
    """

    attribution: Tensor
    method: str
    target: list[int] | UnitTarget
    options: dict[str, Any] = field(default_factory=dict)
    output: Tensor | None = None
    delta: Tensor | None = None
    signed: bool = True
    #: a layer method's map at the layer's own resolution (Grad-CAM: ``(B, 1, h, w)``)
    layer_attribution: Tensor | None = None
    #: every channel of a pixel holds the pixel's whole value, not a share of it (Grad-CAM's
    #: map repeated over the channels; occlusion by windows across all channels)
    repeated: bool = False
    #: where the input holds its channels and its image's rows and columns (found from the
    #: model's graph, or ``channel_dim=``); None: the ``(B, C, H, W)`` convention
    axes: InputAxes | None = None

    def heatmap(self, index: int = 0) -> Tensor:
        """Row ``index``'s attribution as one ``(H, W)`` map: channels summed (a signed
        method keeps its sign; an unsigned one, such as saliency, is already >= 0), or
        where each channel holds the whole value (``repeated``), that value. The channel
        axis is the input's own (``axes``): the last one of a channels-last input. An
        input that is not an image (a ``(B, C, L)`` sequence) is refused."""
        a = self.attribution
        if not 0 <= index < a.shape[0]:
            raise LurkerError(f"index {index} out of range: this explanation has {a.shape[0]} rows")
        ax = self.axes
        if ax is not None:
            if ax.image is None:
                if self._signal_channel() is not None:
                    raise LurkerError(
                        f"a heatmap needs an image input, and this input {tuple(a.shape)} is "
                        "a batch of signals (B, C, T): use .signal(index), the attribution "
                        "along time per channel ((T,) where the method gives one value per "
                        "position, such as Grad-CAM)"
                    )
                raise ax.not_an_image(a.shape, "a heatmap")
            a = a[index].detach().float().cpu()
            if ax.channel is None:
                return a
            c = ax.channel - 1
            return a.select(c, 0).clone() if self.repeated else a.sum(c)
        a = a[index].detach().float().cpu()
        if a.dim() == 3:
            return a[0].clone() if self.repeated else a.sum(0)
        if a.dim() == 2:
            return a
        raise LurkerError(
            f"a heatmap needs an image-shaped attribution (C, H, W), got {tuple(a.shape)}"
        )

    def _signal_channel(self) -> int | None:
        """The channel axis (batch counted) of a batch of signals ``(B, C, T)`` or
        ``(B, T, C)``; None for any other input."""
        ax = self.axes
        if ax is None or ax.image is not None or ax.channel is None:
            return None
        return ax.channel if self.attribution.dim() == 3 else None

    def signal(self, index: int = 0) -> Tensor:
        """Row ``index``'s attribution of a signal input ``(B, C, T)`` (a Conv1d stack's
        EEG or audio; a waveform ``(B, T)`` the model gives its one channel, ``(1, T)``):
        ``(C, T)``, channels first whatever the input's layout, or ``(T,)``
        where every channel holds the position's whole value (``repeated``: Grad-CAM's map
        along time, occlusion's windows across all channels), which summed over the
        channels would count it ``C`` times. Any other input is refused."""
        a = self.attribution
        if not 0 <= index < a.shape[0]:
            raise LurkerError(f"index {index} out of range: this explanation has {a.shape[0]} rows")
        if self.axes is not None and self.axes.waveform and a.dim() == 2:  # (B, T): one channel
            row = a[index].detach().float().cpu()
            return row.clone() if self.repeated else row[None].clone()
        c = self._signal_channel()
        if c is None:
            raise LurkerError(
                f"signal() needs a signal input (B, C, T) whose channel axis the model reads "
                f"(a Conv1d's), and this attribution is {tuple(a.shape)}"
                + ("" if self.axes is None else f" ({self.axes.why})")
                + ": use .heatmap() for an image, or .attribution itself"
            )
        row = a[index].detach().float().cpu()
        if self.repeated:
            return row.select(c - 1, 0).clone()
        return row if c == 1 else row.t().contiguous()

    def overlay(
        self, index: int = 0, image: Tensor | Image.Image | None = None, alpha: float = 0.5
    ) -> Image.Image:
        """The heatmap of row ``index`` over its image, as an RGB PIL image.

        ``image``: the picture to draw on (a tensor in [0, 1] laid out as one row of the
        input, e.g. ``(H, W, C)`` for a channels-last model, or ``(C, H, W)``; or a PIL
        image); None draws on a grey plate. Signed methods use a diverging map (blue
        negative, white zero, red positive, one scale for both signs, so zero stays
        white); unsigned ones a sequential map from transparent to hot.
        """
        from .overlay import overlay

        heat = self.heatmap(index)
        channel = 0
        ax = self.axes
        if ax is not None and ax.channel is not None and isinstance(image, Tensor):
            # a row of the input (or a batch of one of them): its channel axis is the input's
            row = self.attribution.dim() - 1
            if image.dim() in (row, row + 1):
                channel = ax.channel - 1 if image.dim() == row else ax.channel
        return overlay(heat, image, signed=self.signed, alpha=alpha, channel_dim=channel)

    def __repr__(self) -> str:
        """One line (the dataclass's would print every tensor, ending a notebook cell with a
        page of numbers): method, attribution shape, target and, for integrated gradients,
        the largest convergence delta."""
        target = self.target
        if isinstance(target, list) and len(target) > 8:
            shown = f"[{', '.join(map(str, target[:8]))}, ... ({len(target)} rows)]"
        else:
            shown = str(target)
        delta = "" if self.delta is None else f", max |delta| {self.delta.abs().max():.3g}"
        shape = tuple(self.attribution.shape)
        return f"<Explanation {self.method}: attribution {shape}, target {shown}{delta}>"


class Method:
    """An attribution method: subclasses set ``name`` and ``signed`` and implement
    :meth:`compute`; :func:`register` makes them reachable as ``method=name``.

    :meth:`attribute` is the one entry point: it checks the input and the options, and
    runs :meth:`compute` inside :func:`untouched` (the model is left as it was, however
    it exits) with the parameters frozen (only the input's gradient is wanted).
    """

    name: ClassVar[str] = ""
    signed: ClassVar[bool] = True
    #: one line: what it computes and where it comes from (the docs and errors list it)
    summary: ClassVar[str] = ""
    #: whether the method follows the model's gradients (occlusion only runs it)
    gradients: ClassVar[bool] = True

    #: where the input being explained holds its channels and image (set by :meth:`attribute`)
    axes: InputAxes | None = None

    @outside_inference_mode
    def attribute(
        self,
        model: nn.Module,
        x: Tensor,
        target: Any = None,
        *,
        channel_dim: int | None = None,
        **options: Any,
    ) -> Explanation:
        """Explain ``model``'s decision on the batch ``x`` for ``target`` (see
        :mod:`lurker.explain.targets`); ``options`` are the method's own. ``channel_dim``:
        the input's channel axis (batch counted), where lurker should not find it from the
        model's graph (:func:`lurker.explain.axes.input_axes`)."""
        from .axes import input_axes
        from .tokens import is_ids

        # token ids: attributed at the embedding that reads them (a model without one
        # reading integers is refused by check_input, as any non-float input)
        # (an integer image, B x C x H x W, is no sequence of ids even where the model has
        # an embedding, a class-conditional one's: check_input says to pass x.float())
        ids = (
            is_ids(x)
            and x.dim() <= 2
            and isinstance(model, nn.Module)
            and any(isinstance(m, nn.Embedding) for m in model.modules())
        )
        if not ids:
            x = check_input(model, x, f"method {self.name!r}")
        else:
            check_rows(x, f"method {self.name!r}")
        if self.gradients:
            check_differentiable(model, f"method {self.name!r}")
        allowed = [
            p.name
            for p in inspect.signature(self.compute).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        bad = [k for k in options if k not in allowed]
        if bad:
            raise LurkerError(
                f"method {self.name!r} has no option {bad[0]!r}; its options are: "
                + (", ".join(allowed) or "none")
            )
        if ids:
            return self._attribute_ids(model, x, target, options)
        self.axes = input_axes(model, x, channel_dim)
        # integrated gradients, occlusion: the model also runs on their baseline
        given = options.get("baseline")
        baseline = functools.partial(_baseline, given, x) if "baseline" in allowed else None
        with (
            input_errors(
                model, x, baseline, self.name, given is not None, fix=baseline_fix(self.axes, x)
            ),
            untouched(model),
            no_param_grads(model),
            torch.enable_grad(),
        ):
            out = self.compute(model, x, target, **options)
        if out.axes is None and tuple(out.attribution.shape) == tuple(x.shape):
            out.axes = self.axes
        return out

    def _attribute_ids(
        self, model: nn.Module, ids: Tensor, target: Any, options: dict[str, Any]
    ) -> Explanation:
        """Token ids: the method runs on the output of the embedding that looks them up,
        and each token gets one score (:mod:`lurker.explain.tokens`)."""
        from .targets import parse_target
        from .tokens import (
            SUMMED,
            TOKEN_METHODS,
            Embedded,
            fold,
            not_for_tokens,
            reading_embedding,
            token_baseline,
        )

        if self.name not in TOKEN_METHODS:
            raise not_for_tokens(self.name)
        if self.name == "saliency" and options.get("abs", True) is False:
            raise LurkerError(
                "saliency on token ids gives each token the L2 norm of its gradient over the "
                "embedding dimension, which has no sign: abs=False does not apply (for a "
                "signed score per token use input_x_gradient)"
            )
        parse_target(target, ids.shape[0])  # (a bad target is refused before any forward)
        warn_training(model)
        ids = ids.detach()
        with input_errors(model, ids), untouched(model), no_param_grads(model):
            name, emb, e = reading_embedding(model, ids)
            given = dict(options)
            if "baseline" in options:
                options = {**options, "baseline": token_baseline(options["baseline"], emb, ids, e)}
            elif self.name == "integrated_gradients":
                options = {**options, "baseline": token_baseline(None, emb, ids, e)}
            wrapped = Embedded(model, emb, ids)
            try:
                with torch.enable_grad():
                    out = self.compute(wrapped, e, target, **options)
            except Exception as err:
                # the model runs on the ids (reading_embedding ran it): where the method
                # ran it on a baseline too, a failure there is the baseline's, said so
                bad = None
                if "baseline" in options and not isinstance(err, LurkerError):
                    wrapped.rows = None  # (the baseline has the ids' own rows)
                    bad = baseline_error(
                        wrapped,
                        options["baseline"],
                        self.name,
                        "baseline" in given,
                        which=None if "baseline" in given else _TOKEN_ZEROS,
                        fix=TOKEN_BASELINE_FIX,
                        model_name=type(model).__name__,
                    )
                if bad is None:
                    raise
                raise bad from err
        at = out.attribution
        out.layer_attribution = at
        out.attribution = fold(at, self.name)
        out.signed = self.name in SUMMED  # (a gradient's L2 norm has no sign)
        if "baseline" in out.options:
            out.options["baseline"] = given.get("baseline")
        out.options["embedding"] = name
        out.options["per_token"] = "sum" if self.name in SUMMED else "l2"
        out.axes = None
        return out

    def compute(self, model: nn.Module, x: Tensor, target: Any) -> Explanation:
        """The method itself; options are keyword-only parameters after ``target``."""
        raise NotImplementedError

    def explanation(self, attribution: Tensor, fw: Any, options: dict, **extra: Any) -> Explanation:
        """The result, with the resolved target of the :class:`~.targets.Forward` ``fw``."""
        extra.setdefault("signed", self.signed)
        return Explanation(
            attribution=attribution.detach(),
            method=self.name,
            target=fw.target,
            options=options,
            **extra,
        )


#: method name -> class, in the order they were registered
METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add ``cls`` to :data:`METHODS` under ``cls.name``."""
    if not cls.name:
        raise LurkerError(f"{cls.__name__} has no name")
    METHODS[cls.name] = cls
    return cls


def _integer_hint(model: nn.Module, x: Tensor) -> str:
    """What to do with an integer input the methods cannot differentiate."""
    if x.is_complex() or x.dtype == torch.bool:
        return ""
    if any(isinstance(m, nn.Embedding) for m in model.modules()):
        return (
            f" (token ids are explained as a batch (B, L) of sequences, and this input has "
            f"shape {tuple(x.shape)}: for an image or other values, pass x.float())"
        )
    return (
        " (token ids are attributed at the nn.Embedding that looks them up, and "
        f"{type(model).__name__} has none; for an image or other values, pass x.float())"
    )


def check_input(model: Any, x: Any, what: str = "explain") -> Tensor:
    """``x`` as a floating-point batch the model takes, or a clear error."""
    if not isinstance(model, nn.Module):
        raise LurkerError(f"{what} needs an nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise LurkerError(f"{what} needs the input as a tensor (a batch), got {type(x).__name__}")
    if not x.is_floating_point():
        raise LurkerError(
            f"{what} differentiates with respect to the input, so it must be floating point; "
            f"got {x.dtype}" + _integer_hint(model, x)
        )
    if x.dim() < 2:
        raise LurkerError(
            f"{what} needs a batch: x of shape (B, ...), got {tuple(x.shape)}; add a batch "
            "dimension with x[None]"
        )
    check_rows(x, what)
    check_finite(x, what)
    warn_training(model)
    return x.detach()


def quantized_layer(model: nn.Module) -> tuple[str, str] | None:
    """The path and class of the first quantized layer of ``model`` (``quantize_dynamic``,
    ``convert``): ``("fc", "DynamicQuantizedLinear")``; None where it has none. Its weights
    are packed in TorchScript objects and run in kernels with no gradient."""
    for path, m in model.named_modules():
        if any(isinstance(v, torch.ScriptObject) for v in vars(m).values()):
            # the quantized layer, not its weights' holder (fc._packed_params)
            where = ".".join(itertools.takewhile(lambda p: not p.startswith("_"), path.split(".")))
            return where, model.get_submodule(where)._get_name()
    return None


#: what a gradient method or LRP on a quantized model is to do instead
QUANTIZED_FIX = (
    "Explain the float model it was quantized from (before quantize_dynamic or convert), "
    "or use method='occlusion', which only runs the model."
)


def check_differentiable(model: nn.Module, what: str) -> None:
    """Refuse a model with quantized layers (``quantize_dynamic``, ``convert``): their
    weights are packed in TorchScript objects and run in kernels with no gradient, so
    every gradient through them would be 0 and every attribution silently 0 too."""
    found = quantized_layer(model)
    if found is not None:
        where, kind = found
        raise LurkerError(
            f"{what} follows the model's gradients, and its layer {where!r} ({kind}) is "
            "quantized: its packed weights run in kernels that have no gradient, so "
            f"every attribution would be 0. {QUANTIZED_FIX}"
        )


def check_finite(x: Tensor, what: str) -> None:
    """Refuse a batch with NaN or inf values, naming its rows: such a row's output is NaN,
    so its "top class" would be ``argmax`` of NaN (class 0, silently) and its map NaN or
    a gradient of nothing the model decided."""
    bad = ~torch.isfinite(x.detach()).reshape(x.shape[0], -1).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:10])) + (
            f", ... ({len(rows)} rows)" if len(rows) > 10 else ""
        )
        raise LurkerError(
            f"{what}: x holds NaN or inf values in row{'s' if len(rows) > 1 else ''} {shown} "
            f"(of {x.shape[0]}); a model's output there is no decision to explain. Drop those "
            "rows (x[torch.isfinite(x).flatten(1).all(1)]) or replace the values "
            "(torch.nan_to_num(x)) and explain again"
        )


def check_count(what: str, name: str, value: Any, minimum: int = 1) -> int:
    """An option that counts something (samples, steps, rows per forward): an int of at
    least ``minimum``, or an error naming the option (not a TypeError from torch)."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = value.item()  # a 0-d integer tensor (x.shape[0] * 2 of a tensor): its int
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise LurkerError(f"{what}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


#: one past the largest seed torch's generators take (``manual_seed`` reads a uint64)
SEED_LIMIT = 2**64


def check_seed(what: str, value: Any, name: str = "seed", required: bool = False) -> int | None:
    """A random seed: None (fresh draws each call; refused where ``required``) or an int in
    ``[0, 2**64)``. torch refuses a float or a string from deep inside ``manual_seed``, and
    silently takes a negative one modulo ``2**64`` (``-1`` and ``2**64 - 1`` draw the same
    noise)."""
    if value is None and not required:
        return None
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = value.item()
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not 0 <= value < SEED_LIMIT
    ):
        fresh = "" if required else f", or {name}=None for fresh ones"
        raise LurkerError(
            f"{what}: {name} must be an integer from 0 to 2**64 - 1, got {value!r}; pass "
            f"{name}=0 (or any such int) for the same draws on every call{fresh}"
        )
    return int(value)


def check_real(what: str, name: str, value: Any, minimum: float = 0.0) -> float:
    """A numeric option (a noise scale, a stabilizer): a finite number of at least
    ``minimum``; NaN or a negative scale would give a map of NaN or of nothing meant. A 0-d
    tensor is read as its number (``0.15 * (x.max() - x.min())``)."""
    if isinstance(value, Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        value = value.item()
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < minimum:
        raise LurkerError(f"{what}: {name} must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def check_rows(x: Tensor, what: str) -> None:
    """Refuse a batch without rows (a filter such as ``x[labels == 7]`` that kept none)
    before a method runs: each would fail deep inside torch on an empty reduction."""
    if x.shape[0] == 0:
        raise LurkerError(
            f"{what} got an empty batch: x has shape {tuple(x.shape)}, no rows to explain; "
            "pass at least one row (check the selection that made x)"
        )


_said = threading.local()


@contextlib.contextmanager
def training_said() -> Iterator[None]:
    """Inside, :func:`warn_training` says nothing: for a caller that has said it once and
    explains the same model many times (``evaluate``'s randomization, one per layer)."""
    before = getattr(_said, "on", False)
    _said.on = True
    try:
        yield
    finally:
        _said.on = before


def warn_training(model: nn.Module) -> None:
    """Say so where ``model`` is in training mode with layers that then behave otherwise:
    dropout makes every forward random and BatchNorm mixes the rows of a batch (the input's
    rows, and the steps or noisy copies a method runs as one batch), so the attribution
    would be of neither the model's predictions nor each row alone. Lurker does not switch
    the mode itself (the model is left as it was found); the user calls ``model.eval()``."""
    if getattr(_said, "on", False):
        return
    found = training_layers(model)
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        warn(
            f"{type(model).__name__} is in training mode, where {', '.join(found[:3])}{more} "
            "behave otherwise than at inference: dropout is random on every forward and "
            "BatchNorm normalises by the statistics of the batch (mixing its rows, and the "
            "copies a method runs together), so this attribution is not the one of the "
            "model's predictions. Call model.eval() first."
        )


def _baseline(given: Any, x: Tensor) -> Tensor:
    """A method's ``baseline=`` option as the tensor it runs the model on."""
    from .integrated_gradients import as_baseline

    return as_baseline(given, x)


class BaselineError(LurkerError):
    """The model runs on the input but not on the method's baseline (zeros by default): a
    model that divides by its input's norm or asserts a nonzero input. A request the model
    cannot answer as asked, not a failure of the model on the input (the explorer's
    precompute leaves the method out, saying why).

    ``why``: the first sentence, what failed on which baseline; ``fix``: the baselines
    the model may accept, worded for the input's kind (callers that reword the refusal
    read these, not the message)."""

    def __init__(self, message: str, *, why: str = "", fix: str = "") -> None:
        super().__init__(message)
        self.why = why
        self.fix = fix


#: a baseline the model may accept, by the kind of input (an image's mean or blur means
#: nothing to a feature vector, whose values have no neighbours to smooth over)
BASELINE_EXAMPLES = {
    "image": "the dataset's mean image or a blurred copy of the input",
    "signal": "the dataset's mean signal or a smoothed copy of the input",
    "vector": "the dataset's mean feature vector",
    "input": "the dataset's mean input",
}


def _baseline_fix(kind: str) -> str:
    """How a method's ``baseline=`` is changed: a value the model may accept, worded for
    the ``kind`` of input (a key of :data:`BASELINE_EXAMPLES`)."""
    return (
        "baseline= a number or a tensor shaped like one row of x, such as "
        + BASELINE_EXAMPLES[kind]
    )


#: how a method's ``baseline=`` is changed, on an image
BASELINE_FIX = _baseline_fix("image")


def baseline_fix(axes: InputAxes | None, x: Tensor) -> str:
    """:data:`BASELINE_FIX` worded for the input ``x`` (``axes``: where it holds its
    channels and image): an image, a signal ``(B, C, T)`` or waveform ``(B, T)``, a
    feature vector ``(B, F)``, or another input."""
    from .gradcam import is_signal

    if is_signal(axes, x):
        kind = "signal"
    elif x.dim() == 2:
        kind = "vector"
    elif axes is not None and axes.image is not None:
        kind = "image"
    else:
        kind = "input"
    return _baseline_fix(kind)


#: the same on token ids, where the baseline is the embedding's output (tokens.token_baseline)
TOKEN_BASELINE_FIX = (
    "baseline= a token id whose embedding fills every position (a pad id: baseline=0 is "
    "Captum's default on ids), ids shaped (L,) or (B, L), or an embedded baseline (B, L, D)"
)
#: integrated gradients' default baseline on token ids, as an error names it
_TOKEN_ZEROS = "its default baseline on token ids, the zero vector at every position"


@contextlib.contextmanager
def input_errors(
    model: nn.Module,
    x: Tensor,
    baseline: Callable[[], Tensor] | None = None,
    method: str = "",
    given: bool = False,
    *,
    which: str | None = None,
    fix: str = BASELINE_FIX,
) -> Iterator[None]:
    """A failure within becomes :func:`input_error`'s message where the model itself does
    not run on ``x``, or :func:`baseline_error`'s where it runs on ``x`` but not on the
    method's ``baseline`` (made on demand; ``given``: passed by the user, not the default
    zeros; ``which``, ``fix``: as for :func:`baseline_error`); lurker's own errors, and
    failures of a model that runs on both, go through as they are."""
    try:
        yield
    except Exception as e:
        if isinstance(e, LurkerError) and not isinstance(e, TraceError):
            raise  # lurker's own message already names the problem
        failed = forward_error(model, x)
        bad = None if failed is None else input_error(model, x, failed)
        if failed is None and baseline is not None:  # runs on x: does it on the baseline?
            bad = baseline_error(model, baseline(), method, given, which=which, fix=fix)
        if bad is None:
            raise  # the model runs on x: the failure is the method's or the model's own
        raise bad from e


def baseline_error(
    model: nn.Module,
    x0: Tensor,
    method: str,
    given: bool,
    *,
    which: str | None = None,
    fix: str = BASELINE_FIX,
    model_name: str | None = None,
) -> BaselineError | None:
    """Why ``method`` failed where the model runs on the input but not on the baseline
    ``x0`` the method runs it on: its error said with the baseline named and the fix (the
    model's own message names neither). None where the model runs on ``x0``, or runs out
    of memory there (then the baseline is not the problem). ``which`` / ``fix``: the
    baseline and the option that changes it, where it is not a method's ``baseline=``
    (evaluate's deletion and insertion curves); ``model_name``: the model's, where
    ``model`` wraps it (token ids' :class:`~.tokens.Embedded`)."""
    e = forward_error(model, x0)
    if e is not None:
        if (
            isinstance(e, (MemoryError, torch.OutOfMemoryError))
            or "out of memory" in str(e).lower()
        ):
            return None
        said = str(e).strip() or type(e).__name__
        if which is None:
            which = "the given baseline" if given else "its default baseline, zeros"
        why = (
            f"{model_name or type(model).__name__} runs on the input but fails on the baseline "
            f"of {method} ({which}), which it runs the model on: {type(e).__name__}: "
            f"{said.rstrip('.')}"
        )
        return BaselineError(f"{why}. Pass a baseline the model accepts: {fix}.", why=why, fix=fix)
    return None


def forward_error(model: nn.Module, x: Tensor) -> BaseException | None:
    """What one plain forward of ``x`` raises, or None where it runs."""
    try:
        with untouched(model), torch.no_grad():
            model(x)
    except Exception as e:
        return e
    return None


def input_error(
    model: nn.Module, x: Tensor, err: BaseException | None = None
) -> LurkerError | None:
    """Why a method failed when the model itself does not run on ``x`` (a ViT built for
    another image size, the wrong channels, a float64 input to a float32 model, a
    missing batch axis): an error that names the input and the fix, instead of the
    traceback from inside the model. None when one plain forward of ``x`` runs (then the
    failure is not the input's), or where the model raises an exception type of its own
    or runs out of memory. Only called after a failure, so it costs nothing otherwise.
    ``err``: what :func:`forward_error` said of ``x`` where it was asked already."""
    if err is None:
        err = forward_error(model, x)
    if err is None:
        return None
    kind = type(err)
    if not (kind.__module__ == "builtins" or kind.__module__.startswith("torch")) or issubclass(
        kind, (MemoryError, torch.OutOfMemoryError)
    ):
        return None  # the model's own exception type (it says what it means), or memory
    if "out of memory" in str(err).lower():  # CPU and older CUDA OOMs are RuntimeErrors
        return None
    said = str(err).strip() or type(err).__name__
    if not said.endswith((".", "!", "?")):
        said += "."
    param = next(iter(model.parameters()), None)
    head = (
        f"{type(model).__name__} does not run on the input, a {str(x.dtype).removeprefix('torch.')} "
        f"tensor of shape {tuple(x.shape)}: {type(err).__name__}: {said} "
    )
    if param is not None and param.is_floating_point() and param.dtype != x.dtype:
        fix = (
            f"The model's parameters are {str(param.dtype).removeprefix('torch.')}: pass "
            f"x.to({param.dtype}) (or convert the model to {x.dtype})."
        )
    elif param is not None and param.device != x.device:
        fix = f"The model is on {param.device}: pass x.to('{param.device}')."
    else:
        fix = (
            "If the model is built for another input, give x the shape it takes: a batch "
            "(B, ...) of the channels and image size it was built for (x[None] adds a "
            "batch axis to one image); if the model fails on any input, the error is the "
            "model's own."
        )
    return LurkerError(head + fix)


# ----------------------------------------------------------------------- the model guard
_KINDS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_GLOBAL = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


def _hook_ids(modules: list[nn.Module]) -> dict[tuple[int, str], set[int]]:
    """The handle ids of every non-empty hook dict (most modules have none, so this is
    cheap: it runs around every attribution)."""
    out: dict[tuple[int, str], set[int]] = {}
    for attr in _GLOBAL:
        d = getattr(_module, attr, None)
        if d:
            out[(0, attr)] = set(d)
    for mod in modules:
        dd = mod.__dict__
        for attr in _KINDS:
            d = dd.get(attr)
            if d:
                out[(id(mod), attr)] = set(d)
    return out


def _remove_new_hooks(model: nn.Module, before: dict[tuple[int, str], set[int]]) -> list[str]:
    """Remove every hook added since ``before``; describe each one removed."""
    removed: list[str] = []
    empty: set[int] = set()
    for attr in _GLOBAL:
        d = getattr(_module, attr, None) or {}
        for k in [k for k in d if k not in before.get((0, attr), empty)]:
            removed.append(f"global {attr.strip('_')}")
            del d[k]
    for name, mod in model.named_modules():
        dd = mod.__dict__
        for attr in _KINDS:
            d = dd.get(attr)
            if not d:
                continue
            for k in [k for k in d if k not in before.get((id(mod), attr), empty)]:
                removed.append(f"{attr.strip('_')} on {name or 'the model'}")
                del d[k]
    return removed


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run a method so that the model is left as it was, however the block exits.

    Records the model's hooks (forward, pre-forward, backward, on every module, and
    torch's global ones), each parameter's ``requires_grad`` and ``.grad``, each module's
    ``training`` flag and its buffers (a model in train mode updates BatchNorm's running
    statistics on every forward a method runs); on exit restores them, removing any hook
    added inside. A hook left behind by lurker itself would be a bug, so on a clean exit
    it raises.
    """
    modules = list(model.modules())
    hooks = _hook_ids(modules)
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    modes = [(m, m.training) for m in modules]
    buffers = [
        (m, name, b, b._version, b.detach().clone())
        for m in modules
        for name, b in m._buffers.items()
        if b is not None
    ]
    ok = False
    try:
        yield
        ok = True
    finally:
        for p, rg, g in params:
            if p.requires_grad != rg:
                p.requires_grad_(rg)
            if p.grad is not g:
                p.grad = g
        for m, training in modes:
            if m.training != training:
                m.training = training
        for m, name, b, version, value in buffers:
            if m._buffers.get(name) is not b:  # reassigned (self.buf = ...)
                m._buffers[name] = b
            # written in place: batch_norm updates its running statistics inside the
            # kernel without moving their version counter, so the values are compared
            if b._version != version or not torch.equal(b, value):
                with torch.no_grad():
                    b.copy_(value)
        removed = _remove_new_hooks(model, hooks)
        if removed and ok:
            raise LurkerError(
                "an attribution left hooks on the model (removed now): " + ", ".join(removed)
            )


def no_param_grads(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Parameters stop requiring grad for the block: only the input's gradient is
    wanted, and weight gradients would cost a backward through every weight."""
    return _frozen(model)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def input_grad(score: Tensor, x: Tensor) -> Tensor:
    """d score.sum() / d x: the rows of a batch are independent in eval mode, so one
    backward of the sum gives each row its own gradient. Zeros where x does not reach."""
    if not score.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(score.sum(), x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g
