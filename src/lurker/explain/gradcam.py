"""Grad-CAM (Selvaraju et al., 2017, arXiv:1610.02391) and Grad-CAM++ (Chattopadhyay et
al., 2018, arXiv:1710.11063) at any layer.

The layer is a module path or a trace label, so a functional op with no module (the
``add`` of a residual block, a ``relu`` called as ``F.relu``) works too: its output and
the gradient of the target with respect to it come from the trace's hook API. The layer
is read as a map of units by the probe's layout of it (:func:`lurker.probe.layout.
layer_layout`): ``(B, C, H, W)`` convolutions as they are, channels-last ``(B, H, W, C)``
maps (Swin, ConvNeXt blocks) with the channels as units, and a ViT's tokens placed on
their grid of image patches (the class token left out), as pytorch-grad-cam's reshape
transforms do by hand. The map, ``relu(sum_k w_k A_k)`` at the layer's resolution, is
kept as ``layer_attribution`` and upsampled to the input as ``attribution`` (repeated over
the input's channels, so it has the input's shape).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LurkerError, warn
from .axes import InputAxes
from .base import Explanation, Method, register
from .targets import Forward, UnitTarget, by_unit, parse_target

#: how many of the last map layers the default layer is chosen among
_CANDIDATES = 24


def default_layer(model: nn.Module, x: Tensor, target: Any = None) -> str:
    """The last op whose units make a map larger than 1x1 (two position axes, or tokens on
    a patch grid) and whose map the target depends on: where the Grad-CAM paper looks (the
    last convolutional feature map). In a ViT whose head reads only the class token, the
    patch tokens after the last attention do not reach the target (their gradient is 0),
    so the map is taken before it: at the map the last attention's query-key-value
    projection reads (the last block's first norm, pytorch-grad-cam's ViT recipe), not at
    the projection itself (see :func:`_read_through`)."""
    from .axes import input_axes

    line = is_signal(input_axes(model, x), x)
    tr, maps = _map_layers(model, x, line)
    if not maps:
        if line:
            raise LurkerError(
                "Grad-CAM on a signal (B, C, T) needs a layer whose units make a map along "
                "time (a Conv1d's (B, C, L) output) and lurker found none in this model; "
                "pass layer= (a module path or trace label)"
            )
        raise LurkerError(
            "Grad-CAM needs a layer whose units make a map (a (B, C, H, W) output, a "
            "channels-last one, or tokens of image patches) and lurker found none in this "
            "model; pass layer= (a module path or trace label)"
        )
    last = maps[-_CANDIDATES:]

    def reaches(name: str) -> bool:  # one forward and backward
        try:
            _, g, _, _ = layer_and_grad(model, x, target, name, line)
        except LurkerError:
            return False
        return bool(g.abs().amax() > 0)

    if reaches(last[-1]):  # a CNN: its last map
        return last[-1]
    # the maps the target reaches come first, those it does not after (after a ViT's last
    # attention): the last it reaches, by bisection
    lo, hi = 0, len(last) - 1
    if not reaches(last[lo]):
        return maps[-1]  # it reaches none of them: the last map shows that (zeros)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if reaches(last[mid]) else (lo, mid)
    if isinstance(parse_target(target, x.shape[0]), UnitTarget):
        return last[lo]  # a unit's own layer: the map it is, not one it reads
    return _read_through(tr, last[lo], set(maps))


def _map_layers(model: nn.Module, x: Tensor, line: bool) -> tuple[Any, list[str]]:
    """The model's trace and the labels of its ops whose units make a map larger than 1x1
    (along time on a signal, ``line``): the layers Grad-CAM can be taken at."""
    from ..capture import settled_trace
    from ..probe.layout import Layout, cached_layouts

    with torch.no_grad():
        tr = settled_trace(model, x[:1], save="none")
    layouts = cached_layouts(tr)
    maps = []
    for op in tr.compute_ops:
        lay = layouts.get(op.index)
        if not isinstance(lay, Layout) or not op.shape or op.seq < 0:
            continue
        if len(op.outputs) > 1:  # an LSTM's (output, (h, c)): a hook sees one tensor of
            continue  # them, so the map is taken at the op that reads its output instead
        if lay.makes_map(op.shape, line):  # a signal's map: one position axis, time
            maps.append(op.label)
    return tr, maps


def no_map(model: nn.Module, x: Tensor) -> str | None:
    """What Grad-CAM finds no layer of ``model`` making (``"a map"``, or ``"a map along
    time"`` on a signal) where none does (an MLP, an LSTM over time), else None: from the
    trace alone (no gradient), so a caller can say it before anyone asks. The model's own
    failure on ``x`` is None."""
    from .axes import input_axes

    try:
        line = is_signal(input_axes(model, x), x)
        _, maps = _map_layers(model, x, line)
    except Exception:
        return None
    if maps:
        return None
    return "a map along time (a Conv1d's (B, C, L) output)" if line else "a map"


def several_outputs(model: nn.Module, x: Tensor, layer: str, line: bool) -> LurkerError | None:
    """The error for a ``layer`` whose op returns several tensors (an LSTM's output and its
    ``(h, c)`` state, named by trace label or module path), which Grad-CAM cannot read as
    one map: what it outputs, and the layers of this model that qualify; else None."""
    try:
        tr, maps = _map_layers(model, x, line)
    except Exception:  # the model cannot be traced: the original error stands
        return None
    ops = [op for op in tr.compute_ops if op.label == layer] or [
        op for op in tr.compute_ops if op.module == layer
    ]
    op = ops[-1] if ops else None  # a module's last op: what it returns
    if op is None or len(op.outputs) <= 1:
        return None
    kind = type(model.get_submodule(op.module)).__name__ if op.module else op.name
    shapes = ", ".join(str(tuple(t.shape)) for t in op.outputs if hasattr(t, "shape"))
    need = (
        "a layer whose units are channels along time (a Conv1d's (B, C, L) output)"
        if line
        else "a layer whose units make a map (a (B, C, H, W) output, a channels-last one, "
        "or tokens of image patches)"
    )
    more = f", ... {len(maps) - 20} more" if len(maps) > 20 else ""
    qualify = (
        f"layers of this model that qualify: {', '.join(maps[-20:])}{more}"
        if maps
        else "no layer of this model qualifies: use a gradient method (method='integrated_gradients')"
    )
    return LurkerError(
        f"Grad-CAM cannot read layer {layer!r} ({op.label}, {kind}): it outputs "
        f"{len(op.outputs)} tensors ({shapes} for one row: an output and a recurrent state), not "
        f"one map of channels. Grad-CAM needs {need}; {qualify} (a trace label, or its module path)."
    )


#: ops that give a map the same positions as their input, each unit a fixed affine mix
#: of the input's units at the same position (or a rearrangement of its axes)
_AFFINE = {"linear", "transpose", "permute", "reshape", "view", "contiguous", "flatten"}


def _read_through(tr: Any, label: str, maps: set[str]) -> str:
    """The map that ``label`` reads through linear layers and rearrangements only.

    The last map a ViT's class-token head reaches is the last attention's query-key-value
    projection ``A' = W A + b`` of the block's first norm ``A``. Grad-CAM there is
    Grad-CAM at ``A`` plus ``sum_k mean(g'_k) b_k``, one constant per image: the bias of
    the projection shifts the whole map, and the ReLU then keeps or clips it by that shift
    (a third of its channels, the queries of the patch tokens, even have no gradient). So
    the default is ``A``, as pytorch-grad-cam's recipe (``blocks[-1].norm1``)."""
    from ..graph.nodes import OpRef, refs

    by_label = {op.label: op for op in tr.ops}
    op = by_label[label]
    while op.name.rstrip("_") in _AFFINE:
        read = [r for r in refs(op) if type(r) is OpRef]
        if len(read) != 1 or tr.ops[read[0].index].label not in maps:
            break
        op = tr.ops[read[0].index]
    return op.label


def is_signal(axes: InputAxes | None, x: Tensor) -> bool:
    """Whether ``x`` is a batch of signals ``(B, C, T)``: a channel axis the model reads
    (a Conv1d's) and one axis of time, no image; or of waveforms ``(B, T)`` the model gives
    their one channel itself (``axes.waveform``)."""
    if axes is not None and axes.waveform:
        return x.dim() == 2
    return axes is not None and axes.image is None and axes.channel is not None and x.dim() == 3


def layer_and_grad(
    model: nn.Module, x: Tensor, target: Any, layer: str, line: bool = False
) -> tuple[Tensor, Tensor, Forward, Tensor | None]:
    """The layer's output ``A`` and ``d score / d A`` (one backward for the batch), both
    as ``(B, C, h, w)`` maps of units (see :func:`as_map`); ``line``: a signal's layer,
    ``(B, C, L)`` read as a map one row high, ``(B, C, 1, L)``."""
    fw = Forward(model, x, target, layers=[layer])
    xi = x.clone().requires_grad_(True)  # the graph reaches A even with frozen weights
    scored = fw(xi)
    A = scored.layers[layer]
    layout = _layout(fw, layer)
    (g,) = torch.autograd.grad(scored.score.sum(), A, allow_unused=True)
    if g is None:
        raise LurkerError(f"the target does not depend on layer {layer!r} (it runs after it?)")
    return (
        as_map(A.detach(), layout, layer, line),
        as_map(g, layout, layer, line),
        fw,
        scored.output,
    )


def _layout(fw: Forward, layer: str) -> Any:
    """The layer's layout, found on the trace the forward already made (or makes now)."""
    from ..probe.layout import layer_layout  # (probe imports explain's guided ReLU)

    return layer_layout(
        fw._traced(), layer, hint="pass another layer= (one whose units make a map)"
    )


def as_map(t: Tensor, layout: Any, layer: str, line: bool = False) -> Tensor:
    """A layer's output (or its gradient) as ``(B, C, h, w)``: units first, positions as
    the map; tokens of image patches on their patch grid, the tokens with no patch left
    out. ``line`` (a signal's layer): ``(B, C, L)`` as ``(B, C, 1, L)``, a map along time."""
    u = by_unit(t, layout)
    if line:
        if u.dim() != 3:
            raise LurkerError(
                f"Grad-CAM on a signal needs a layer whose units make a map along time (a "
                f"Conv1d's (B, C, L) output): {layer!r} gives {tuple(t.shape)}, with units "
                f"on axis {layout.unit} and {len(layout.positions)} position axes; pass "
                "another layer="
            )
        return u[:, :, None, :]
    if u.dim() == 4:
        return u
    grid = layout.patch_grid() if u.dim() == 3 else None
    if grid is None:
        raise LurkerError(
            f"Grad-CAM needs a layer whose units make a map: {layer!r} gives "
            f"{tuple(t.shape)}, with units on axis {layout.unit} and "
            f"{len(layout.positions)} position axes that are not an image's rows and columns"
            " (nor tokens of image patches)"
        )
    order, rows, cols, _ = grid
    return u[:, :, order].reshape(u.shape[0], u.shape[1], rows, cols)


def upsample(cam: Tensor, x: Tensor, mode: str, axes: InputAxes | None = None) -> Tensor:
    """``(B, 1, h, w)`` -> ``x``'s shape: resized to the rows and columns of ``x``'s image
    and repeated over its channels, on the axes where ``x`` holds them (``axes``; None:
    ``(B, C, H, W)``), so that a channels-last input gets its map on its own axes."""
    if mode not in ("bilinear", "nearest", "bicubic"):
        raise LurkerError(f"interpolate must be 'bilinear', 'nearest' or 'bicubic', got {mode!r}")
    if axes is None:
        if x.dim() != 4:
            raise LurkerError(f"Grad-CAM explains (B, C, H, W) images, got {tuple(x.shape)}")
        axes = InputAxes(1, (2, 3), "assumed", "(B, C, H, W)")
    kw = {} if mode == "nearest" else {"align_corners": False}
    if is_signal(axes, x) and axes.waveform:  # (B, 1, 1, L) -> (B, T), its one channel
        return F.interpolate(cam, size=(1, x.shape[1]), mode=mode, **kw)[:, 0, 0]
    if is_signal(axes, x):  # (B, 1, 1, L) -> along time (bilinear on one row: linear)
        c = int(axes.channel)  # type: ignore[arg-type]
        t = 3 - c  # the other axis of (B, C, T) or (B, T, C)
        up = F.interpolate(cam, size=(1, x.shape[t]), mode=mode, **kw)[:, 0, 0]
        return up.unsqueeze(c).expand(x.shape)
    if axes.image is None:
        raise axes.not_an_image(x.shape, "Grad-CAM")
    rows, cols = axes.image
    up = F.interpolate(cam, size=(x.shape[rows], x.shape[cols]), mode=mode, **kw)[:, 0]
    if axes.channel is None:
        return up  # (B, H, W): a one-channel image with no channel axis
    return up.unsqueeze(axes.channel).expand(x.shape)


def gradcam_weights(A: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM: each channel weighted by its spatially averaged gradient."""
    return g.mean((2, 3), keepdim=True)


def gradcam_pp_weights(A: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM++ with the exponential closed form (the paper's eq. 19, as
    pytorch-grad-cam): ``alpha = g^2 / (2 g^2 + sum_ij A * g^3)``, ``w = sum_ij alpha
    relu(g)``; alpha is 0 where its denominator is (no epsilon that would bias small
    gradients). Computed as ``1 / (2 + sum_ij A * g)`` where ``g != 0``, the same number
    with no power of ``g`` to underflow (a float16 gradient under 2.4e-4 has ``g^2 = 0``:
    alpha, and the map, were 0), at float32 at least."""
    wide = torch.promote_types(g.dtype, torch.float32)
    gw = g.to(wide)
    denom = 2 + A.to(wide).sum((2, 3), keepdim=True) * gw
    ok = (gw != 0) & (denom != 0)
    alpha = torch.where(ok, 1 / torch.where(ok, denom, torch.ones_like(denom)), 0.0)
    return (alpha * gw.clamp(min=0)).sum((2, 3), keepdim=True).to(g.dtype)


class _CAM(Method):
    signed = False
    weigh: Any = None

    def compute(
        self,
        model: nn.Module,
        x: Tensor,
        target: Any,
        *,
        layer: str | None = None,
        relu: bool = True,
        interpolate: str = "bilinear",
    ) -> Explanation:
        line = is_signal(self.axes, x)
        if self.axes is not None and self.axes.image is None and not line:
            raise self.axes.not_an_image(x.shape, "Grad-CAM")  # before any layer is looked at
        if layer is None:
            layer = default_layer(model, x, target)
        try:
            A, g, fw, out = layer_and_grad(model, x, target, layer, line)
        except LurkerError as e:  # an LSTM named by hand: what it is, and what qualifies
            raise several_outputs(model, x, layer, line) or e from None
        flat = g.reshape(g.shape[0], -1).abs().amax(1) == 0
        what = f"{'Grad-CAM++' if self.name == 'gradcam_plus_plus' else 'Grad-CAM'} at {layer!r}"
        if bool(flat.any()):
            warn(
                f"{what} is 0 everywhere{_rows(flat)}: the target does not depend "
                "on this layer's map (a ViT's class-token head no longer reads the patch "
                "tokens after the last attention). Choose an earlier layer, or the default."
            )
        cam = (type(self).weigh(A, g) * A).sum(1, keepdim=True)
        if relu:
            # rows whose weighted map is negative everywhere: rectified, nothing is left
            # to show (often on a ViT's tokens, whose LayerNorm outputs have both signs)
            top = cam.reshape(cam.shape[0], -1).amax(1)
            zero = ~flat & (top == 0) & (cam.reshape(cam.shape[0], -1).amin(1) == 0)
            if bool(zero.any()):
                warn(
                    f"{what} is 0 everywhere{_rows(zero)}: the layer's map weighted by its "
                    "gradient is 0 at every position on this input (its units do not fire "
                    "on it), so there is nothing to show; choose another layer."
                )
            clipped = ~flat & (top < 0)
            if bool(clipped.any()):
                warn(
                    f"{what} is 0 everywhere after its ReLU{_rows(clipped)}: the weighted sum of "
                    "the layer's channels is negative at every position, so the map shows "
                    "nothing. relu=False gives the signed map; on a ViT, Grad-CAM is weak "
                    "(docs/explain.md): integrated gradients or LRP follow the tokens better."
                )
            cam = cam.clamp(min=0)
        options = {"layer": layer, "relu": relu, "interpolate": interpolate}
        return self.explanation(
            upsample(cam, x, interpolate, self.axes),
            fw,
            options,
            output=None if out is None else out.detach(),
            # a signal's: (B, 1, L), the layer's own positions along time
            layer_attribution=(cam[:, :, 0] if line else cam).detach(),
            signed=not relu,
            repeated=True,
        )


@register
class GradCAM(_CAM):
    name = "gradcam"
    summary = (
        "layer activations weighted by their mean gradient, rectified (Selvaraju et al., 2017)"
    )
    weigh = staticmethod(gradcam_weights)


@register
class GradCAMPlusPlus(_CAM):
    name = "gradcam_plus_plus"
    summary = "Grad-CAM with higher-order pixel weights (Chattopadhyay et al., 2018)"
    weigh = staticmethod(gradcam_pp_weights)


def _rows(mask: Tensor) -> str:
    """Which rows of a batch a warning is about: none named when it is all of them."""
    rows = mask.nonzero()[:, 0].tolist()
    return "" if len(rows) == len(mask) else f" (rows {rows})"
