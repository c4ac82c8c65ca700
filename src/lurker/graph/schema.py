"""A trace as a versioned JSON document (``lurker.trace`` version :data:`SCHEMA_VERSION`).

This is the contract with anything outside Python (the web explorer, other tools), so it
is spelled out field by field in ``lurker/schema/trace.schema.json`` and documented in
docs/trace-schema.md; keep all three in step. Additive fields keep the version; renaming,
retyping or removing a field bumps it.
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from .edges import edges
from .nodes import Op, TensorMeta

if TYPE_CHECKING:
    from ..capture.trace import Trace

SCHEMA_ID = "lurker.trace"
SCHEMA_VERSION = 1


def to_json(trace: Trace) -> dict[str, Any]:
    """The trace's graph as plain JSON types (no tensors, no activations)."""
    from .. import __version__

    doc: dict[str, Any] = {
        "schema": SCHEMA_ID,
        "version": SCHEMA_VERSION,
        "lurker_version": __version__,
        "model": {
            "name": trace.model_name,
            "num_ops": trace.num_ops,
            "num_params": trace.num_params,
            "activation_bytes": trace.activation_bytes,
            "flops": trace.flops,
            "is_recurrent": trace.is_recurrent,
            "has_branching": trace.has_branching,
            "time_s": float(trace.time),
            "complete": bool(trace.complete),
            "failed_op": trace.failed_op,
        },
        "ops": [_op(op) for op in trace.ops],
        "edges": [
            {
                "src": e.src,
                "dst": e.dst,
                "src_output": e.src_output,
                "kind": e.kind,
                "label": e.label,
            }
            for e in edges(trace.ops)
        ],
        "modules": [
            {
                "path": m.path,
                "type": m.type,
                "parent": m.parent,
                "children": list(m.children),
                "depth": m.depth,
                "num_passes": m.num_passes,
                "num_params": m.num_params,
                "ops": list(m.ops),
                "outputs": {str(p): list(nodes) for p, nodes in sorted(m.outputs.items())},
            }
            for m in trace.modules.values()
        ],
        "rolled": _rolled(trace.ops),
    }
    return doc


def _op(op: Op) -> dict[str, Any]:
    return {
        "index": op.index,
        "label": op.label,
        "rolled": op.rolled,
        "kind": op.kind,
        "name": op.name,
        "module": op.module,
        "modules": [[path, pass_num] for path, pass_num in op.modules],
        "module_outputs": [str(m) for m in op.module_outputs],
        "parents": list(op.parents),
        "children": list(op.children),
        "outputs": [_tensor(m) for m in op.outputs],
        "params": [{"name": p.name, "shape": list(p.shape), "numel": p.numel} for p in op.params],
        "time_s": float(op.time),
        "flops": op.flops,
        "source": op.source,
        "pass": op.pass_num,
        "num_passes": op.num_passes,
        "dist_from_input": op.dist_from_input,
        "dist_from_output": op.dist_from_output,
        "decides_branch": bool(op.decides_branch),
        "value": json_value(op.value) if op.kind == "readout" else None,
        "inplace": bool(op.inplace),
        "random": bool(op.random),
        "saved": op.activation is not None,
        "has_grad": op.grad is not None,
    }


def _tensor(m: TensorMeta) -> dict[str, Any]:
    return {
        "shape": [int(s) for s in m.shape],
        "dtype": str(m.dtype).removeprefix("torch."),
        "device": str(m.device),
        "bytes": m.nbytes,
    }


def _rolled(ops: list[Op]) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for op in ops:
        g = groups.get(op.rolled)
        if g is None:
            g = groups[op.rolled] = {"label": op.rolled, "name": op.name, "passes": []}
        g["passes"].append(op.index)
    return list(groups.values())


def json_value(value: Any) -> Any:
    """A readout's Python value as JSON: non-finite floats and exotic types become strings."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return repr(value)  # complex, numpy scalars, anything else


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of :func:`to_json` documents, shipped with lurker."""
    return json.loads(_schema_text())


@cache
def _schema_text() -> str:
    return resources.files("lurker").joinpath("schema/trace.schema.json").read_text("utf-8")
