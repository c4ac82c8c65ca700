"""Input x gradient (Shrikumar et al., 2016, arXiv:1605.01713): ``x * d score / d x``, as
Captum's ``InputXGradient``; a first-order share of the score per input value."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import Explanation, Method, register
from .saliency import gradient


@register
class InputXGradient(Method):
    name = "input_x_gradient"
    signed = True
    summary = "input times its gradient (Shrikumar et al., 2016)"

    def compute(self, model: nn.Module, x: Tensor, target: Any) -> Explanation:
        g, fw, out = gradient(model, x, target)
        return self.explanation(x * g, fw, {}, output=out)
