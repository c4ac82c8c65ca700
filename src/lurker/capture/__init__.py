"""Recording a forward pass: :func:`trace` and the :class:`Trace` it returns."""

from ._context import evaluating, training_layers
from .trace import Activations, Trace, settled_trace, trace

__all__ = ["Activations", "Trace", "evaluating", "settled_trace", "trace", "training_layers"]
