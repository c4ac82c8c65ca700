"""Grad-CAM (Selvaraju et al., 2017, arXiv:1610.02391) and Grad-CAM++ (Chattopadhyay et
al., 2018, arXiv:1710.11063) at any layer.

The layer is a module path or a trace label, so a functional op with no module (the
``add`` of a residual block, a ``relu`` called as ``F.relu``) works too: its output and
the gradient of the target with respect to it come from the trace's hook API. The map,
``relu(sum_k w_k A_k)`` at the layer's resolution, is kept as ``layer_attribution`` and
upsampled to the input as ``attribution`` (repeated over the input's channels, so it has
the input's shape).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LurkerError
from .base import Explanation, Method, register
from .targets import Forward


def default_layer(model: nn.Module, x: Tensor) -> str:
    """The last op with a spatial ``(B, C, H, W)`` output larger than 1x1: where the
    Grad-CAM paper looks (the last convolutional feature map)."""
    from ..capture import trace

    with torch.no_grad():
        tr = trace(model, x[:1], save="none")
    best = None
    for op in tr.compute_ops:
        shape = op.shape
        if shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1:
            best = op
    if best is None:
        raise LurkerError(
            "Grad-CAM needs a layer with a (B, C, H, W) output and this model has none; "
            "pass layer= (a module path or trace label)"
        )
    return best.label


def layer_and_grad(
    model: nn.Module, x: Tensor, target: Any, layer: str
) -> tuple[Tensor, Tensor, Forward, Tensor | None]:
    """The layer's output ``A`` and ``d score / d A`` (one backward for the batch)."""
    fw = Forward(model, x, target, layers=[layer])
    xi = x.clone().requires_grad_(True)  # the graph reaches A even with frozen weights
    scored = fw(xi)
    A = scored.layers[layer]
    if A.dim() != 4:
        raise LurkerError(
            f"Grad-CAM needs a (B, C, H, W) layer output; {layer!r} gives {tuple(A.shape)}"
        )
    (g,) = torch.autograd.grad(scored.score.sum(), A, allow_unused=True)
    if g is None:
        raise LurkerError(f"the target does not depend on layer {layer!r} (it runs after it?)")
    return A.detach(), g, fw, scored.output


def upsample(cam: Tensor, x: Tensor, mode: str) -> Tensor:
    """``(B, 1, h, w)`` -> ``x``'s shape: resized to ``x``'s spatial size, repeated over
    its channels."""
    if mode not in ("bilinear", "nearest", "bicubic"):
        raise LurkerError(f"interpolate must be 'bilinear', 'nearest' or 'bicubic', got {mode!r}")
    if x.dim() != 4:
        raise LurkerError(f"Grad-CAM explains (B, C, H, W) images, got {tuple(x.shape)}")
    kw = {} if mode == "nearest" else {"align_corners": False}
    up = F.interpolate(cam, size=x.shape[2:], mode=mode, **kw)
    return up.expand(-1, x.shape[1], -1, -1)


def gradcam_weights(A: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM: each channel weighted by its spatially averaged gradient."""
    return g.mean((2, 3), keepdim=True)


def gradcam_pp_weights(A: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM++ with the exponential closed form (the paper's eq. 19, as
    pytorch-grad-cam): ``alpha = g^2 / (2 g^2 + sum_ij A * g^3)``, ``w = sum_ij alpha
    relu(g)``; alpha is 0 where its denominator is (no epsilon that would bias small
    gradients)."""
    g2 = g * g
    g3 = g2 * g
    denom = 2 * g2 + A.sum((2, 3), keepdim=True) * g3
    ok = denom != 0
    alpha = torch.where(ok, g2 / torch.where(ok, denom, torch.ones_like(denom)), 0.0)
    return (alpha * g.clamp(min=0)).sum((2, 3), keepdim=True)


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
        if layer is None:
            layer = default_layer(model, x)
        A, g, fw, out = layer_and_grad(model, x, target, layer)
        cam = (type(self).weigh(A, g) * A).sum(1, keepdim=True)
        if relu:
            cam = cam.clamp(min=0)
        options = {"layer": layer, "relu": relu, "interpolate": interpolate}
        return self.explanation(
            upsample(cam, x, interpolate),
            fw,
            options,
            output=None if out is None else out.detach(),
            layer_attribution=cam.detach(),
            signed=not relu,
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
