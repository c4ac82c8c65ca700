"""Deconvnet (Zeiler and Fergus, 2014, arXiv:1311.2901): the input "gradient" where each
ReLU passes back the ReLU of the gradient, whatever its forward input was. As Captum's
``Deconvolution``, but for every relu (functional ones too), through a torch-function
mode rather than module hooks."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import Explanation, Method, register
from .guided_backprop import DeconvReLUMode
from .saliency import gradient


@register
class Deconvnet(Method):
    name = "deconvnet"
    signed = True
    summary = "backward pass where ReLUs pass only positive gradients, ignoring the forward input (Zeiler and Fergus, 2014)"

    def compute(self, model: nn.Module, x: Tensor, target: Any) -> Explanation:
        g, fw, out = gradient(model, x, target, DeconvReLUMode)
        return self.explanation(g, fw, {}, output=out)
