"""Images the explorer shows for a (unit, sample), made lazily and cached in the run.

* guided backprop (Springenberg et al., 2015): the gradient of one unit's activation
  with respect to the input, where every ReLU passes back only positive gradients and
  only where its input was positive. It shows *what in the input* drives the unit, much
  sharper than the plain gradient. The ReLU rule is swapped in by a torch-function mode
  during the forward pass, so it reaches ``nn.ReLU`` modules and functional relus alike
  and the model itself is never modified.
* the receptive-field crop around a unit's peak, upscaled so tiny crops stay visible;
* :class:`ImageCache`: every image is rendered on first request and written as a PNG
  into the run's ``cache/`` atomically, so a web server never serves half a file.
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..capture._replay import run_with
from ..errors import LurkerError
from ..store import atomic_write_bytes
from ..store.files import cache_file
from .data import to_pil
from .layout import as_units

if TYPE_CHECKING:
    from ..capture.trace import Trace

__all__ = [
    "CACHE_KINDS",
    "GuidedReLUMode",
    "ImageCache",
    "crop",
    "guided_backprop",
    "render_gradient",
    "unit_gradient",
]

#: What :class:`ImageCache` stores: the input as the model saw it, its receptive-field
#: crop, the unit's guided-backprop image, and that image's crop.
CACHE_KINDS = ("input", "crop", "grad", "grad_crop")


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward keeps a gradient only if it is positive and the input was too."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, inplace: bool) -> Tensor:
        if inplace:
            ctx.mark_dirty(x)
            out = x.clamp_(min=0)
        else:
            out = x.clamp(min=0)
        # A fresh mask, not ``out``: a later in-place op on the output must not corrupt it.
        ctx.save_for_backward(out > 0)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad.clamp(min=0) * mask, None


# relu callables as a torch-function mode sees them -> whether they work in place.
# (F.relu_ is torch.relu_; F.relu's own ``inplace`` argument is read per call.)
_RELUS: dict[Any, bool] = {
    torch.relu: False,
    torch.relu_: True,
    F.relu: False,
    torch.Tensor.relu: False,
    torch.Tensor.relu_: True,
}


class GuidedReLUMode(TorchFunctionMode):
    """Within this mode every relu call uses the guided-backprop backward rule.

    Forward values are unchanged. Enter it *outside* any other mode that must see the
    model's own calls (such as the replay mode): the innermost mode sees a call first,
    and this one replaces ``relu`` by a custom autograd function whose forward is made
    of other ops.
    """

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        try:
            inplace = _RELUS.get(func)
        except TypeError:  # an unhashable callable is no relu
            inplace = None
        if inplace is None:
            return func(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        if func is F.relu:
            inplace = bool(args[1] if len(args) > 1 else kwargs.get("inplace", False))
        return _GuidedReLU.apply(x, inplace)


def _input_grad(target: Any, x: Tensor) -> Tensor:
    """d target / d x, zeros where the target does not depend on x."""
    if not isinstance(target, Tensor) or target.numel() != 1:
        what = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise LurkerError(f"guided backprop needs one scalar to differentiate, got {what}")
    if not target.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(target.reshape(()), x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad.detach()


def guided_backprop(
    model: Callable[[Tensor], Any], x: Tensor, select: Callable[[Any], Tensor]
) -> Tensor:
    """Guided-backprop gradient of ``select(model(x))`` (one scalar) with respect to ``x``.

    ``x`` is passed as is (include the batch dimension the model expects); the result has
    its shape. Parameters' ``.grad`` are not touched.
    """
    x_in = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        with GuidedReLUMode():
            target = select(model(x_in))
        return _input_grad(target, x_in)


def _unit_scalar(
    act: Any, unit: int, mode: str, peak: tuple[int, int] | None, label: str
) -> Tensor:
    """The scalar of ``unit`` in the batch-of-one activation ``act`` (see unit_gradient)."""
    if isinstance(act, (tuple, list)):
        act = next((t for t in act if isinstance(t, Tensor)), None)
    if not isinstance(act, Tensor) or act.dim() not in (2, 3, 4):
        shape = tuple(act.shape) if isinstance(act, Tensor) else type(act).__name__
        raise LurkerError(
            f"{label}: units need a (1, C), (1, C, L) or (1, C, H, W) output, got {shape}"
        )
    if not 0 <= unit < act.shape[1]:
        raise LurkerError(f"{label} has {act.shape[1]} units; unit {unit} does not exist")
    fmap = act[0, unit]
    if act.dim() == 2:
        return fmap.clone()  # one position: max == mean
    if mode == "mean":
        return fmap.mean()
    if peak is None:
        flat = int(torch.argmax(fmap.detach().reshape(-1)))  # first maximum, row-major
        index = divmod(flat, fmap.shape[-1]) if act.dim() == 4 else (flat,)
    else:
        index = (int(peak[0]), int(peak[1])) if act.dim() == 4 else (int(peak[1]),)
    if any(not 0 <= i < n for i, n in zip(index, fmap.shape)):
        raise LurkerError(f"{label}: peak {peak} lies outside its {tuple(fmap.shape)} map")
    # clone: the value as it is now, even if a later in-place op changes the output
    return fmap[index].clone()


def _one_sample(trace: Trace, x: Tensor) -> tuple[Tensor, bool]:
    """``x`` with a batch dimension of 1, and whether the caller gave it one."""
    inputs = trace.inputs
    if len(inputs) != 1 or inputs[0].shape is None:
        raise LurkerError(
            f"unit_gradient needs a model with one tensor input; this trace has {len(inputs)}"
        )
    rank = len(inputs[0].shape)
    if x.dim() == rank - 1:
        return x.unsqueeze(0), False
    if x.dim() == rank and x.shape[0] == 1:
        return x, True
    raise LurkerError(
        f"unit_gradient needs one sample shaped like {tuple(inputs[0].shape[1:])} (or with a "
        f"batch dimension of 1); got {tuple(x.shape)}"
    )


def unit_gradient(
    trace: Trace,
    op_index: int,
    x: Tensor,
    unit: int,
    mode: Literal["max", "mean"] = "max",
    peak: tuple[int, int] | None = None,
    layout: Any = None,
) -> Tensor:
    """Guided-backprop image of one unit of op ``op_index`` for the single sample ``x``.

    ``x`` is one input without batch dimension (``(C, H, W)``; a leading batch of 1 is
    accepted); the result has that shape, on ``x``'s device. ``mode="max"`` differentiates
    the activation at ``peak`` = (y, x) (None: the map's first maximum; 1-D maps use x
    only), ``"mean"`` the unit's spatial mean; a ``(B, C)`` output has one value per unit.
    ``layout`` (a layer's stored layout) says where units and positions are in the op's
    output (None: ``(B, C, ...)``).

    The model re-runs under two torch-function modes: the guided-ReLU mode outside and
    the trace's replay mode inside, so that the replay sees (and checks) the model's own
    calls while every relu is still swapped for its guided version.
    """
    if mode not in ("max", "mean"):
        raise LurkerError(f"mode must be 'max' or 'mean', got {mode!r}")
    if not 0 <= op_index < len(trace.ops):
        raise LurkerError(f"op index {op_index} out of range: this trace has {len(trace.ops)} ops")
    op = trace.ops[op_index]
    xb, _ = _one_sample(trace, x)
    device = trace.inputs[0].device or xb.device
    x_in = xb.detach().to(device).clone().requires_grad_(True)
    found: list[Tensor] = []

    def keep(_: int, value: Any) -> None:
        found.append(_unit_scalar(as_units(layout, value), unit, mode, peak, op.label))

    with torch.enable_grad():
        with GuidedReLUMode():
            run_with(trace, (x_in,), {}, [op_index], keep)
        if not found:
            raise LurkerError(
                f"{op.label} is a model {op.kind}, not an op that runs; pick the op "
                "that computes it"
            )
        grad = _input_grad(found[0], x_in)
    return grad[0].to(x.device)


def render_gradient(grad: Tensor) -> Image.Image:
    """A gradient image (C, H, W) as RGB uint8: ``grad / max|grad| * 0.5 + 0.5``.

    One scale for the whole image (not per channel) keeps signs and the relative
    strength of colour channels: grey is zero, bright is positive, dark is negative.
    A one-channel gradient is shown in grey; an all-zero gradient is uniform grey.
    """
    g = grad.detach().float().cpu()
    if g.dim() == 4 and g.shape[0] == 1:
        g = g[0]
    if g.dim() == 2:
        g = g.unsqueeze(0)
    if g.dim() != 3 or g.shape[0] not in (1, 3):
        raise LurkerError(f"render_gradient needs a (1|3, H, W) gradient, got {tuple(grad.shape)}")
    scale = float(g.abs().max())
    g = g / scale * 0.5 + 0.5 if scale > 0 and math.isfinite(scale) else torch.full_like(g, 0.5)
    return to_pil(g.expand(3, -1, -1))


def crop(img: Image.Image, box: tuple[int, int, int, int], min_size: int = 64) -> Image.Image:
    """The half-open ``(y0, y1, x0, x1)`` region of ``img``, clipped to the image.

    Receptive fields often reach past the border, hence the clipping. If the longer side
    of the crop is under ``min_size`` it is enlarged by an integer factor with nearest
    neighbour, so a 3x3 receptive field is still visible and its pixels stay crisp.
    """
    y0, y1, x0, x1 = (int(v) for v in box)
    w, h = img.size
    y0, y1, x0, x1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if y1 <= y0 or x1 <= x0:
        raise LurkerError(f"crop box {tuple(box)} does not overlap the {h}x{w} image")
    out = img.crop((x0, y0, x1, y1))
    longest = max(y1 - y0, x1 - x0)
    if longest < min_size:
        k = math.ceil(min_size / longest)
        out = out.resize((out.width * k, out.height * k), Image.Resampling.NEAREST)
    return out


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class ImageCache:
    """Renders each explorer image once and serves it from the run's ``cache/`` after.

    Thread-safe: concurrent requests for the same image render it once (one lock per
    file); files are written atomically, so other processes never read a partial PNG.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Path, threading.Lock] = {}

    @staticmethod
    def path(run: Any, kind: str, layer: str, unit: int, rank: int, list: str) -> Path:
        """Where the image lives; ``run`` is a ``Run``, a ``RunWriter`` or a run directory."""
        if kind not in CACHE_KINDS:
            raise LurkerError(f"unknown image kind {kind!r}; expected one of {CACHE_KINDS}")
        if hasattr(run, "cache_path"):
            return run.cache_path(kind, layer, unit, rank, list, "png")
        root = Path(os.fspath(run))
        if root.is_file():  # the run's run.db
            root = root.parent
        return cache_file(root, kind, layer, unit, rank, list, "png")

    def get(
        self,
        run: Any,
        kind: str,
        layer: str,
        unit: int,
        rank: int,
        list: str,
        producer: Callable[[], Image.Image],
    ) -> Path:
        """The cached PNG's path, calling ``producer()`` and writing it on first request."""
        target = self.path(run, kind, layer, unit, rank, list)
        if target.is_file():
            return target
        with self._guard:
            lock = self._locks.setdefault(target, threading.Lock())
        try:
            with lock:
                if not target.is_file():
                    image = producer()
                    if not isinstance(image, Image.Image):
                        raise LurkerError(
                            f"the producer of {kind} {layer}/{unit} returned "
                            f"{type(image).__name__}, not a PIL image"
                        )
                    atomic_write_bytes(target, _png(image))
        finally:
            with self._guard:
                self._locks.pop(target, None)
        return target
