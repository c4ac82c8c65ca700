"""Guided backpropagation (Springenberg et al., 2015, arXiv:1412.6806): the input
gradient where every ReLU passes back only positive gradients, and only where its input
was positive. Much sharper than the plain gradient; the same rule makes the probe's unit
gradient images (:mod:`lurker.probe.images` imports it from here).

The ReLU rule is swapped in by a torch-function mode during the forward pass, so it
reaches ``nn.ReLU`` modules and functional relus alike and the model itself is never
modified (no hooks). Forward values are unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .base import Explanation, Method, register
from .saliency import gradient

__all__ = ["DeconvReLU", "GuidedBackprop", "GuidedReLU", "GuidedReLUMode", "ReLURuleMode"]


class GuidedReLU(torch.autograd.Function):
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


class DeconvReLU(torch.autograd.Function):
    """ReLU whose backward is the ReLU of the gradient, ignoring the forward input
    (Zeiler and Fergus's deconvnet rule)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, inplace: bool) -> Tensor:
        if inplace:
            ctx.mark_dirty(x)
            return x.clamp_(min=0)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad.clamp(min=0), None


# relu callables as a torch-function mode sees them -> whether they work in place.
# (F.relu_ is torch.relu_; F.relu's own ``inplace`` argument is read per call.)
_RELUS: dict[Any, bool] = {
    torch.relu: False,
    torch.relu_: True,
    F.relu: False,
    torch.Tensor.relu: False,
    torch.Tensor.relu_: True,
}


class ReLURuleMode(TorchFunctionMode):
    """Within this mode every relu call uses ``rule``'s backward (an autograd Function
    taking ``(x, inplace)``).

    Enter it *outside* any other mode that must see the model's own calls (such as the
    trace's replay mode): the innermost mode sees a call first, and this one replaces
    ``relu`` by a custom autograd function whose forward is made of other ops.
    """

    rule: ClassVar[type[torch.autograd.Function]]
    #: the method's name in messages
    label: ClassVar[str] = "this ReLU rule"
    #: relu calls this mode replaced (0 after a forward: the rule changed nothing)
    replaced: int = 0

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
        self.replaced += 1
        return self.rule.apply(x, inplace)


class GuidedReLUMode(ReLURuleMode):
    """Every relu call within uses the guided-backprop backward rule."""

    rule = GuidedReLU
    label = "guided backprop"


class DeconvReLUMode(ReLURuleMode):
    """Every relu call within uses the deconvnet backward rule."""

    rule = DeconvReLU
    label = "deconvnet"


@register
class GuidedBackprop(Method):
    name = "guided_backprop"
    signed = True
    summary = "gradient through ReLUs passing only positive gradients where the input was positive (Springenberg et al., 2015)"

    def compute(self, model: nn.Module, x: Tensor, target: Any) -> Explanation:
        g, fw, out = gradient(model, x, target, GuidedReLUMode)
        return self.explanation(g, fw, {}, output=out)
