"""Why did the model decide this: attributions of a decision to the input.

``lurker.explain(model, x, target=None, method="saliency", **options)`` returns an
:class:`Explanation` whose ``.attribution`` has the shape of ``x``. ``METHODS`` lists the
methods by name; each lives in its own module with one ``attribute`` signature. The
module is callable, so ``lurker.explain(...)`` works while ``lurker.explain.METHODS`` (and
``lurker.explain.evaluate``, the faithfulness figures) stay reachable as attributes.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from torch import Tensor, nn

from ..errors import LurkerError
from .base import METHODS, Explanation, Method, register, untouched
from .targets import UnitTarget

__all__ = [
    "METHODS",
    "Concepts",
    "Evaluation",
    "Explanation",
    "Method",
    "UnitTarget",
    "concepts",
    "evaluate",
    "explain",
    "register",
    "untouched",
]

# one module per method; importing it registers it
_MODULES = (
    "saliency",
    "input_x_gradient",
    "guided_backprop",
    "deconvnet",
    "integrated_gradients",
    "smoothgrad",
    "gradcam",
    "occlusion",
    "lrp",
)
for _name in _MODULES:
    importlib.import_module(f"{__name__}.{_name}")


# after the methods, so that METHODS lists them in the order above (relevance imports lrp);
# the function `evaluate` stands in for its module of the same name as a package attribute
from .evaluate import Evaluation, evaluate  # noqa: E402
from .relevance import Concepts, concepts  # noqa: E402


def explain(
    model: nn.Module,
    x: Tensor,
    target: Any = None,
    method: str = "saliency",
    *,
    channel_dim: int | None = None,
    **options: Any,
) -> Explanation:
    """Attribute ``model``'s decision on the batch ``x`` to its input.

    ``target``: a class index, one per row, None / ``"top"`` (top predicted class), or a
    unit ``(layer, channel[, y, x])`` (module path or trace label). ``method``: one of
    :data:`METHODS`; ``options`` are the method's own (an unknown one is an error naming
    the valid ones). The model is left exactly as it was: no hooks, same
    ``requires_grad`` flags, also when a method raises. ``channel_dim``: the input's
    channel axis (counting the batch axis; -1 for channels-last), for a model whose graph
    does not show it: by default lurker follows the input through the model to the first
    op that reads an axis as channels (a ``permute`` before a convolution is followed).
    """
    cls = METHODS.get(method) if isinstance(method, str) else None
    if cls is None:
        raise LurkerError(f"unknown explanation method {method!r}; supported: {', '.join(METHODS)}")
    return cls().attribute(model, x, target, channel_dim=channel_dim, **options)


class _CallableModule(types.ModuleType):
    """``lurker.explain`` is this package and also :func:`explain`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Explanation:
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
