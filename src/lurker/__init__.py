"""lurker: a microscope for PyTorch models.

``lurker.trace(model, x)`` records every tensor operation of a forward pass;
``lurker.probe(model, dataset, out=...)`` finds what every unit of every layer responds
to, into a run that ``lurker.Run.open(path)`` reads back; ``lurker.featviz(model, layer)``
optimizes the images each unit of a layer responds to most.

The package root is lazy: each name below is imported on first use, so that
``import lurker.graph`` (or ``lurker.store``) loads no torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute; None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "Activations": ("lurker.capture", "Activations"),
    "Trace": ("lurker.capture", "Trace"),
    "trace": ("lurker.capture", "trace"),
    "probe": ("lurker.probe", None),
    "explain": ("lurker.explain", None),
    "featviz": ("lurker.featviz", None),
    "Run": ("lurker.store", "Run"),
    "Graph": ("lurker.graph", "Graph"),
    "ModuleInfo": ("lurker.graph", "ModuleInfo"),
    "Op": ("lurker.graph", "Op"),
    "GraphChangedError": ("lurker.errors", "GraphChangedError"),
    "LurkerError": ("lurker.errors", "LurkerError"),
    "MemoryLimitError": ("lurker.errors", "MemoryLimitError"),
    "TraceError": ("lurker.errors", "TraceError"),
    "ValidationError": ("lurker.errors", "ValidationError"),
}

if TYPE_CHECKING:
    from . import explain, featviz, probe
    from .capture import Activations, Trace, trace
    from .errors import (
        GraphChangedError,
        LurkerError,
        MemoryLimitError,
        TraceError,
        ValidationError,
    )
    from .graph import Graph, ModuleInfo, Op
    from .store import Run


def __getattr__(name: str) -> Any:
    spec = _LAZY.get(name)
    if spec is None:
        # a subpackage used as an attribute (``import lurker; lurker.store.Run``), as
        # when the root imported them all
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module 'lurker' has no attribute {name!r}")
    module, attr = spec
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "Activations",
    "Graph",
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
    "explain",
    "featviz",
    "probe",
    "trace",
]
