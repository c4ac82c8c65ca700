"""The graph of a traced forward pass as torch-free data: :class:`Graph` and its nodes.

``lurker.trace`` returns a :class:`~lurker.capture.Trace`, a Graph with the live model
and activations; ``Graph.from_json(doc)`` reads one back from its JSON document. Nothing
here imports torch, so a server can read graphs without it.
"""

from .edges import Edge
from .graph import Graph
from .nodes import ModuleInfo, Op, Opaque, OpRef, ParamRef, TensorMeta

__all__ = ["Edge", "Graph", "ModuleInfo", "OpRef", "Op", "Opaque", "ParamRef", "TensorMeta"]
