"""Saliency (Simonyan et al., 2014, arXiv:1312.6034): ``|d score / d x|``, as Captum's
``Saliency`` with its default ``abs=True``."""

from __future__ import annotations

import contextlib
from typing import Any

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import warn
from .base import Explanation, Method, input_grad, register
from .targets import Forward


def gradient(
    model: nn.Module, x: Tensor, target: Any, mode: type[TorchFunctionMode] | None = None
) -> tuple[Tensor, Forward, Tensor | None]:
    """The gradient of the target's score per row (with every relu under ``mode``'s rule
    when given: guided backprop, deconvnet), the :class:`Forward` used and the model output
    (detached): one forward and one backward for the whole batch."""
    fw = Forward(model, x, target)
    xi = x.clone().requires_grad_(True)
    rule = mode() if mode is not None else None
    with rule if rule is not None else contextlib.nullcontext():
        scored = fw(xi)
    if rule is not None and getattr(rule, "replaced", 1) == 0:
        # a GELU/SiLU network (ViT, Swin, ConvNeXt): nothing for the rule to change, and
        # a map that looks like a method of its own would be the plain gradient
        upto = "" if fw.unit is None else f" up to {fw.unit.layer!r}"  # (a forward that stops)
        warn(
            f"{type(model).__name__} runs no ReLU{upto}, so "
            f"{getattr(rule, 'label', 'the rule')}'s ReLU rule changed nothing: this is the "
            "plain gradient (saliency with abs=False)."
        )
    out = None if scored.output is None else scored.output.detach()
    return input_grad(scored.score, xi), fw, out


@register
class Saliency(Method):
    name = "saliency"
    signed = False
    summary = "absolute gradient of the target score (Simonyan et al., 2014)"

    def compute(self, model: nn.Module, x: Tensor, target: Any, *, abs: bool = True) -> Explanation:
        g, fw, out = gradient(model, x, target)
        # the raw gradient has a sign that matters: the overlay's diverging map shows it
        return self.explanation(g.abs() if abs else g, fw, {"abs": abs}, output=out, signed=not abs)
