"""lurker: a microscope for PyTorch models.

``lurker.trace(model, x)`` records every tensor operation of a forward pass;
``lurker.probe(model, dataset, out=...)`` finds what every unit of every layer responds
to, into a run that ``lurker.Run.open(path)`` reads back.
"""

from . import probe
from .capture import Activations, Trace, trace
from .errors import (
    GraphChangedError,
    LurkerError,
    MemoryLimitError,
    TraceError,
    ValidationError,
)
from .graph.nodes import ModuleInfo, Op
from .store import Run

__version__ = "0.1.0"

__all__ = [
    "Activations",
    "GraphChangedError",
    "LurkerError",
    "MemoryLimitError",
    "ModuleInfo",
    "Op",
    "Run",
    "Trace",
    "TraceError",
    "ValidationError",
    "__version__",
    "probe",
    "trace",
]
