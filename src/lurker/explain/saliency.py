"""Saliency (Simonyan et al., 2014, arXiv:1312.6034): ``|d score / d x|``, as Captum's
``Saliency`` with its default ``abs=True``."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import Explanation, Method, input_grad, register
from .targets import Forward


def gradient(model: nn.Module, x: Tensor, target: Any) -> tuple[Tensor, Forward, Tensor | None]:
    """The plain gradient of the target's score per row, the :class:`Forward` used and the
    model output: one forward and one backward for the whole batch."""
    fw = Forward(model, x, target)
    xi = x.clone().requires_grad_(True)
    scored = fw(xi)
    return input_grad(scored.score, xi), fw, scored.output


@register
class Saliency(Method):
    name = "saliency"
    signed = False
    summary = "absolute gradient of the target score (Simonyan et al., 2014)"

    def compute(self, model: nn.Module, x: Tensor, target: Any, *, abs: bool = True) -> Explanation:
        g, fw, out = gradient(model, x, target)
        return self.explanation(
            g.abs() if abs else g, fw, {"abs": abs}, output=None if out is None else out.detach()
        )
