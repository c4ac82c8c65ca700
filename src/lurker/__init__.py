"""lurker: a microscope for PyTorch models.

``lurker.trace(model, x)`` records every tensor operation of a forward pass;
``lurker.probe(model, dataset, out=...)`` finds what every unit of every layer responds
to, into a run that ``lurker.Run.open(path)`` reads back.
"""

from . import _compiled

_compiled.install()  # before the modules it covers are first imported

from . import probe  # noqa: E402
from .capture import Activations, Trace, trace  # noqa: E402
from .errors import GraphChangedError, LurkerError, TraceError, ValidationError  # noqa: E402
from .graph.nodes import ModuleInfo, Op  # noqa: E402
from .store import Run  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Activations",
    "GraphChangedError",
    "LurkerError",
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
