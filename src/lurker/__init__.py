"""lurker: a microscope for PyTorch models.

``lurker.trace(model, x)`` records every tensor operation of a forward pass.
"""

from .capture import Activations, Trace, trace
from .errors import GraphChangedError, LurkerError, TraceError, ValidationError
from .graph.nodes import ModuleInfo, Op

__version__ = "0.1.0"

__all__ = [
    "Activations",
    "GraphChangedError",
    "LurkerError",
    "ModuleInfo",
    "Op",
    "Trace",
    "TraceError",
    "ValidationError",
    "__version__",
    "trace",
]
