"""Heatmaps drawn over their image: a diverging map for signed attributions (blue
negative, white zero, red positive), a sequential one for unsigned ones."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..errors import LurkerError

__all__ = ["colorize", "overlay"]


def colorize(heat: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """``(H, W)`` -> RGB ``(3, H, W)`` in [0, 1] and an opacity ``(H, W)`` in [0, 1].

    One scale, ``max |heat|``, for both signs, so zero is always the neutral colour and
    the strength of the two signs can be compared. Opacity grows with ``|heat|``, so the
    image shows through where the attribution is small.
    """
    h = heat.detach().float().cpu()
    scale = float(h.abs().max()) if h.numel() else 0.0
    v = h / scale if scale > 0 and torch.isfinite(torch.tensor(scale)) else torch.zeros_like(h)
    if signed:
        pos, neg = v.clamp(min=0), (-v).clamp(min=0)
        # white at zero, to red (1, 0, 0) for +1 and blue (0, 0, 1) for -1
        rgb = torch.stack([1 - neg, 1 - pos - neg, 1 - pos]).clamp(0, 1)
        alpha = v.abs()
    else:
        a = v.clamp(min=0)
        # black-red-yellow-white ("hot")
        rgb = torch.stack([(3 * a).clamp(0, 1), (3 * a - 1).clamp(0, 1), (3 * a - 2).clamp(0, 1)])
        alpha = a
    return rgb, alpha


def overlay(
    heat: Tensor, image: Any = None, *, signed: bool, alpha: float = 0.5, channel_dim: int = 0
) -> Image.Image:
    """``heat`` (H, W) over ``image`` (a tensor in [0, 1] with its channels on axis
    ``channel_dim``: 0 for ``(C, H, W)``, -1 for ``(H, W, C)``; a ``(H, W)`` tensor; a PIL
    image; None: grey), resized to the heatmap; ``alpha`` is the opacity of the strongest
    attribution."""
    if not 0 <= alpha <= 1:
        raise LurkerError(f"alpha is an opacity in [0, 1], got {alpha}")
    H, W = heat.shape
    if image is None:
        base = torch.full((3, H, W), 0.5)
    elif isinstance(image, Image.Image):
        img = image.convert("RGB").resize((W, H), Image.Resampling.BILINEAR)
        base = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        base = base.reshape(H, W, 3).permute(2, 0, 1).float() / 255
    elif isinstance(image, Tensor):
        base = image.detach().float().cpu()
        if base.dim() == 4 and base.shape[0] == 1:
            base = base[0]
            channel_dim = channel_dim - 1 if channel_dim > 0 else channel_dim
        if base.dim() == 2:
            base = base[None]
        elif base.dim() == 3 and -3 <= channel_dim < 3:
            base = base.movedim(channel_dim, 0)
        if base.dim() != 3 or base.shape[0] not in (1, 3):
            raise LurkerError(
                f"overlay needs a 1- or 3-channel image, got a tensor of shape "
                f"{tuple(image.shape)} read with its channels on axis {channel_dim}: give "
                "(C, H, W), or channel_dim=-1 for (H, W, C)"
            )
        if tuple(base.shape[1:]) != (H, W):
            base = torch.nn.functional.interpolate(
                base[None], size=(H, W), mode="bilinear", align_corners=False
            )[0]
        base = base.clamp(0, 1).expand(3, -1, -1)
    else:
        raise LurkerError(f"overlay draws on a tensor or PIL image, got {type(image).__name__}")
    rgb, a = colorize(heat, signed)
    a = (a * alpha)[None]
    out = base * (1 - a) + rgb * a
    arr = (out.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.fromarray(arr.numpy(), "RGB")
