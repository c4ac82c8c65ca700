"""Images the explorer shows for a (unit, sample), made lazily and cached in the run.

* guided backprop (Springenberg et al., 2015): the gradient of one unit's activation
  with respect to the input, where every ReLU passes back only positive gradients and
  only where its input was positive. It shows *what in the input* drives the unit, much
  sharper than the plain gradient. The ReLU rule (:class:`GuidedReLUMode`) lives in
  :mod:`lurker.explain.guided_backprop`, shared with ``lurker.explain``.
* the receptive-field crop around a unit's peak, upscaled so tiny crops stay visible;
* :class:`ImageCache`: every image is made on first request and written as a PNG
  into the run's ``cache/`` atomically, so a web server never serves half a file.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image
from torch import Tensor

from ..errors import LurkerError
from ..explain.guided_backprop import GuidedReLUMode
from ..store import atomic_write_bytes
from ..store.files import cache_file, sample_file
from .data import to_pil
from .layout import as_units

if TYPE_CHECKING:
    from ..capture.trace import Trace

__all__ = [
    "CACHE_KINDS",
    "GuidedReLUMode",
    "ImageCache",
    "crop",
    "gradient_image",
    "gradient_pixels",
    "guided_backprop",
    "png_bytes",
    "unit_gradient",
    "unit_gradients",
]

#: What :class:`ImageCache` stores per (layer, unit, list, rank): the receptive-field crop
#: of the input, the unit's guided-backprop image, and that image's crop. The input image
#: itself is stored once per sample (:meth:`ImageCache.sample_path`).
CACHE_KINDS = ("crop", "grad", "grad_crop")


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
    x = x.float() if x.dtype == torch.uint8 else x  # raw pixels: their 0..255 values
    x_in = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        with GuidedReLUMode():
            target = select(model(x_in))
        return _input_grad(target, x_in)


class _Reached(Exception):
    """Ends a replay once the wanted op has run: nothing after it reaches the gradient."""


def _unit_map(t: Tensor, units: Tensor, layout: Any = None) -> Tensor:
    """Row ``i``'s map of unit ``units[i]`` out of an op output: ``(B, *positions)``.

    ``layout`` (a layer's stored layout, :mod:`lurker.probe.layout`) says where the batch,
    unit and position axes are; None (runs made before layouts) means ``(B, C, ...)``.
    """
    t = as_units(layout, t)
    wrong = units[(units < 0) | (units >= t.shape[1])]
    if len(wrong):
        raise LurkerError(f"this layer has {t.shape[1]} units; unit {int(wrong[0])} does not exist")
    return t[torch.arange(t.shape[0], device=t.device), units.to(t.device)]


def _output_tensor(act: Any, label: str) -> Tensor:
    if isinstance(act, (tuple, list)):
        act = next((t for t in act if isinstance(t, Tensor)), None)
    if not isinstance(act, Tensor) or act.dim() < 2:
        shape = tuple(act.shape) if isinstance(act, Tensor) else type(act).__name__
        raise LurkerError(
            f"{label}: units need a (B, C), (B, C, L) or (B, C, H, W) output, got {shape}"
        )
    return act


def _flat_peaks(
    peaks: Sequence[tuple[int, int] | None], pos: tuple[int, ...], label: str
) -> list[int | None]:
    """Stored ``(y, x)`` peaks as flat indices into a map of shape ``pos`` (row-major).

    The probe stores ``flat // W, flat % W`` with ``W`` the map's last size, so
    ``y * W + x`` inverts it; 1-D maps use x only, maps without positions have one value.
    """
    size = math.prod(pos)
    width = pos[-1] if pos else 1
    out: list[int | None] = []
    for peak in peaks:
        if peak is None:
            out.append(None)
            continue
        y, x = int(peak[0]), int(peak[1])
        flat = 0 if not pos else x if len(pos) == 1 else y * width + x
        if not (0 <= x < width and 0 <= flat < size and y >= 0):
            raise LurkerError(f"{label}: peak {tuple(peak)} lies outside its {pos} map")
        out.append(flat)
    return out


def _gradients(
    trace: Trace,
    op_index: int,
    x: Tensor,
    units: Sequence[int],
    modes: Sequence[str],
    peaks: Sequence[tuple[int, int] | None],
    layout: Any = None,
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Guided-backprop images of one job per row of the batch ``x`` (see unit_gradients).

    Returns the gradients ``x.shape`` (detached, on the trace's device), each row's flat
    position of its unit's first maximum (for crops of "mean" entries) and the map shape.
    """
    if not 0 <= op_index < len(trace.ops):
        raise LurkerError(f"op index {op_index} out of range: this trace has {len(trace.ops)} ops")
    op = trace.ops[op_index]
    n = x.shape[0]
    if not len(units) == len(modes) == len(peaks) == n:
        raise LurkerError(
            f"unit_gradients needs one unit, mode and peak per row of x ({n} rows); got "
            f"{len(units)}, {len(modes)} and {len(peaks)}"
        )
    bad = sorted({m for m in modes if m not in ("max", "mean")})
    if bad:
        raise LurkerError(f"mode must be 'max' or 'mean', got {bad[0]!r}")
    device = trace.inputs[0].device or x.device
    # raw uint8 pixels (a model that scales them itself) have no gradient: take it on their
    # float values, which the model's own cast gives it anyway (w.r.t. the 0..255 values)
    x = x.float() if x.dtype == torch.uint8 else x
    x_in = x.detach().to(device).clone().requires_grad_(True)
    found: dict[str, Any] = {}

    def keep(_: Any, value: Any) -> None:
        act = _output_tensor(value, op.label)
        maps = _unit_map(act, torch.tensor(list(units), dtype=torch.long), layout)
        pos = tuple(maps.shape[1:])
        flat = maps.reshape(n, -1)
        if flat.shape[1] == 0:
            raise LurkerError(f"{op.label}: its maps {pos} have no positions")
        argmax = flat.detach().argmax(1)  # first maximum, row-major
        want = _flat_peaks(peaks, pos, op.label)
        index = torch.tensor(
            [a if w is None else w for w, a in zip(want, argmax.tolist())], device=flat.device
        )
        at_peak = flat.gather(1, index[:, None])[:, 0]
        is_mean = torch.tensor([m == "mean" for m in modes], device=flat.device)
        objective = torch.where(is_mean, flat.mean(1), at_peak)
        found.update(objective=objective, argmax=argmax, pos=pos)
        raise _Reached

    if op.seq < 0:
        raise LurkerError(
            f"{op.label} is a model {op.kind}, not an op that runs; pick the op that computes it"
        )
    with torch.enable_grad():
        with GuidedReLUMode(), contextlib.suppress(_Reached):
            trace.run(x_in, save="none", hooks={op_index: keep})
        if not found:
            raise LurkerError(
                f"{op.label} is a model {op.kind}, not an op that runs; pick the op "
                "that computes it"
            )
        # Rows of a batch are independent in eval mode, so the gradient of the sum is
        # every row's own gradient, all in one backward.
        grad = _input_grad(found["objective"].sum(), x_in)
    return grad, found["argmax"], found["pos"]


def unit_gradients(
    trace: Trace,
    op_index: int,
    x: Tensor,
    units: Sequence[int],
    modes: Sequence[Literal["max", "mean"]] | Literal["max", "mean"] = "max",
    peaks: Sequence[tuple[int, int] | None] | None = None,
    layout: Any = None,
) -> Tensor:
    """Guided-backprop images of many (sample, unit) jobs of one op, in one backward.

    Row ``i`` of ``x`` (a batch shaped like the model's input) is differentiated for unit
    ``units[i]``: its value at ``peaks[i]`` (None: the first maximum) in mode "max", its
    spatial mean in mode "mean". In eval mode the rows of a batch do not interact, so one
    backward of the sum of the rows' objectives gives each row its own gradient; a model
    whose rows do interact (a batch statistic) gets wrong images this way, which
    :class:`~lurker.probe.UnitImages` checks for. The forward stops at the op. Returns
    ``x``'s shape, on ``x``'s device.
    """
    n = x.shape[0]
    mode_list = [modes] * n if isinstance(modes, str) else list(modes)
    grad, _, _ = _gradients(
        trace, op_index, x, list(units), mode_list, list(peaks or [None] * n), layout
    )
    return grad.to(x.device)


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
    Many jobs at once: :func:`unit_gradients`.

    The model re-runs under two torch-function modes: the guided-ReLU mode outside and
    the trace's replay mode inside, so that the replay sees (and checks) the model's own
    calls while every relu is still swapped for its guided version.
    """
    xb, _ = _one_sample(trace, x)
    grad, _, _ = _gradients(trace, op_index, xb, [unit], [mode], [peak], layout)
    return grad[0].to(x.device)


def gradient_pixels(grad: Tensor) -> Tensor:
    """Batched :func:`gradient_image`: ``(N, C, H, W)`` gradients as ``(N, H, W, 3)`` uint8.

    Computed where ``grad`` lives (the GPU while making images), so only bytes reach the host.
    """
    g = grad.detach().float()
    if g.dim() != 4 or g.shape[1] not in (1, 3):
        raise LurkerError(f"gradient_pixels needs (N, 1|3, H, W) gradients, got {tuple(g.shape)}")
    scale = g.abs().amax(dim=(1, 2, 3), keepdim=True)
    ok = torch.isfinite(scale) & (scale > 0)
    g = torch.where(ok, g / torch.where(ok, scale, 1.0) * 0.5 + 0.5, torch.full_like(g, 0.5))
    g = g.expand(-1, 3, -1, -1)
    return (g.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1)


def gradient_image(grad: Tensor) -> Image.Image:
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
        raise LurkerError(f"gradient_image needs a (1|3, H, W) gradient, got {tuple(grad.shape)}")
    scale = float(g.abs().max())
    g = g / scale * 0.5 + 0.5 if scale > 0 and math.isfinite(scale) else torch.full_like(g, 0.5)
    return to_pil(g.expand(3, -1, -1))


def render_gradient(grad: Tensor) -> Image.Image:
    """Deprecated name of :func:`gradient_image` ("render" now means drawing the graph)."""
    warnings.warn(
        "lurker.probe.images.render_gradient is deprecated: use gradient_image",
        DeprecationWarning,
        stacklevel=2,
    )
    return gradient_image(grad)


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


def png_bytes(image: Image.Image) -> bytes:
    """``image`` as PNG bytes, fast to encode (the unit images, feature maps and heatmaps
    the explorer serves)."""
    buf = io.BytesIO()
    # level 1: much faster to encode than the default (6), for slightly larger files
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def cached(path: Path) -> bool:
    """Whether ``path`` holds a cached image: an empty file (left by a power cut during a
    write_all, which does not fsync each image) counts as missing."""
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _root(run: Any) -> Path:
    """The run directory of a ``Run``, a ``RunWriter``, a run directory or its run.db."""
    if hasattr(run, "path") and not isinstance(run, (str, os.PathLike)):
        return Path(run.path)
    root = Path(os.fspath(run))
    return root.parent if root.is_file() else root


class ImageCache:
    """Renders each explorer image once and serves it from the run's ``cache/`` after.

    Thread-safe: concurrent requests for the same image make it once (one lock per
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
        return cache_file(_root(run), kind, layer, unit, rank, list, "png")

    @staticmethod
    def sample_path(run: Any, sample_id: int) -> Path:
        """Where sample ``sample_id``'s image (as the model saw it) lives: one per sample."""
        return sample_file(_root(run), sample_id, "png")

    @staticmethod
    def frame_path(run: Any, sample_id: int, frame: int) -> Path:
        """Where frame ``frame`` of a video clip sample lives (a clip unit's entries are
        shown on the frame of their peak): ``cache/frames/<id:08d>-<frame:04d>.png``."""
        return _root(run) / "cache" / "frames" / f"{int(sample_id):08d}-{int(frame):04d}.png"

    @contextlib.contextmanager
    def lock(self, target: Path) -> Iterator[None]:
        """Hold the lock of ``target`` (one per file, so one thread makes it)."""
        with self._guard:
            lock = self._locks.setdefault(target, threading.Lock())
        try:
            with lock:
                yield
        finally:
            with self._guard:
                self._locks.pop(target, None)

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
        return self.get_file(
            self.path(run, kind, layer, unit, rank, list), producer, f"{kind} {layer}/{unit}"
        )

    def get_file(
        self, target: Path, producer: Callable[[], Image.Image], what: str = "image"
    ) -> Path:
        """``target``, calling ``producer()`` and writing its PNG there if it is missing."""
        if self.has(target):
            return target
        with self.lock(target):
            if not self.has(target):
                image = producer()
                if not isinstance(image, Image.Image):
                    raise LurkerError(
                        f"the producer of {what} returned {type(image).__name__}, not a PIL image"
                    )
                self.put(target, png_bytes(image))
        return target

    # -- storage: the run's files here; MemoryImageCache keeps them in memory instead --

    def has(self, target: Path) -> bool:
        """Whether the image of ``target`` is cached."""
        return cached(target)

    def put(self, target: Path, data: bytes) -> None:
        """Cache the PNG ``data`` as ``target``."""
        atomic_write_bytes(target, data)

    def open(self, target: Path) -> Path | io.BytesIO:
        """Something ``Image.open`` reads the cached image of ``target`` from."""
        return target

    def read(self, target: Path) -> bytes:
        """The cached PNG of ``target``."""
        return target.read_bytes()


class MemoryImageCache(ImageCache):
    """An :class:`ImageCache` that never writes the run's ``cache/``: PNGs are kept in a
    bounded in-memory LRU keyed by the paths they would have had. For images made by a
    model that is not the run's recorded one (they must not pass for the run's own)."""

    def __init__(self, budget: int = 64 << 20) -> None:
        super().__init__()
        self.budget = budget
        self._data: OrderedDict[Path, bytes] = OrderedDict()
        self._bytes = 0

    def has(self, target: Path) -> bool:
        with self._guard:
            return target in self._data

    def put(self, target: Path, data: bytes) -> None:
        with self._guard:
            old = self._data.pop(target, None)
            if old is not None:
                self._bytes -= len(old)
            self._data[target] = data
            self._bytes += len(data)
            while self._bytes > self.budget and len(self._data) > 1:
                _, dropped = self._data.popitem(last=False)
                self._bytes -= len(dropped)

    def open(self, target: Path) -> Path | io.BytesIO:
        return io.BytesIO(self.read(target))

    def read(self, target: Path) -> bytes:
        with self._guard:
            data = self._data.get(target)
            if data is None:
                raise LurkerError(f"image {target.name} is no longer in memory; ask again")
            self._data.move_to_end(target)
            return data
