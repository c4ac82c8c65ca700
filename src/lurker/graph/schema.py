"""A graph as a versioned JSON document (``lurker.trace`` version :data:`SCHEMA_VERSION`),
and back: ``from_json(to_json(g)) == g``.

This is the contract with anything outside Python (the web explorer, other tools), so it
is spelled out field by field in ``lurker/schema/trace.schema.json`` and documented in
docs/trace-schema.md; keep all three in step. Additive fields keep the version; renaming,
retyping or removing a field bumps it. Torch-free: a server reads graphs without torch.
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..ops.catalogue import current_label
from .edges import edges
from .nodes import ITEMSIZE, ModuleInfo, Op, Opaque, OpRef, ParamRef, TensorMeta, refs

if TYPE_CHECKING:
    from .graph import Graph

SCHEMA_ID = "lurker.trace"
SCHEMA_VERSION = 2


def to_json(trace: Graph) -> dict[str, Any]:
    """The graph as plain JSON types (no tensors, no activations)."""
    from .. import __version__  # the package root is lazy: no torch

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
            "flops_unknown": trace.flops_unknown,
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


def from_json(doc: dict[str, Any]) -> Graph:
    """The graph a :func:`to_json` document describes (of this schema version only)."""
    from ..errors import GraphDocumentError

    if not isinstance(doc, dict):  # (a file holding a list, say)
        raise GraphDocumentError(
            f"not a lurker graph document: a JSON {type(doc).__name__}, where to_json writes "
            "an object"
        )
    if doc.get("schema") != SCHEMA_ID:
        raise GraphDocumentError(
            f"not a lurker graph document: schema is {doc.get('schema')!r}, not {SCHEMA_ID!r}"
        )
    version = doc.get("version")
    if version != SCHEMA_VERSION:
        wrote = doc.get("lurker_version")
        by = f" (written by lurker {wrote})" if isinstance(wrote, str) else ""
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        fix = (
            "upgrade lurker to read it"
            if newer
            else "trace the model again (or read it with the lurker that wrote it)"
        )
        raise GraphDocumentError(
            f"lurker.trace document version {version!r}{by}: this lurker reads version "
            f"{SCHEMA_VERSION} only; {fix}"
        )
    try:
        return _graph_from(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"field {e.args[0]!r} is missing" if isinstance(e, KeyError) else str(e)
        raise GraphDocumentError(
            f"this lurker.trace version {SCHEMA_VERSION} document is not one to_json wrote: "
            f"{what}. Check it against lurker.graph.schema.json_schema(), or write it again "
            "with tr.to_json()."
        ) from e


def _graph_from(doc: dict[str, Any]) -> Graph:
    from .graph import Graph

    g = Graph()
    model = doc["model"]
    g.model_name = model["name"]
    g.complete = model["complete"]
    g.failed_op = model["failed_op"]
    g.time = model["time_s"]
    params: dict[str, ParamRef] = {}  # shared, as the recorder shares them
    g.ops = [_op_from(d, params) for d in doc["ops"]]
    for m in doc["modules"]:
        g.modules[m["path"]] = ModuleInfo(
            m["path"],
            m["type"],
            m["parent"],
            list(m["children"]),
            m["num_passes"],
            m["num_params"],
            list(m["ops"]),
            {int(p): list(nodes) for p, nodes in m["outputs"].items()},
        )
    from .build import index

    g._index = index(g.ops)
    return g


def _op_from(d: dict[str, Any], params: dict[str, ParamRef]) -> Op:
    # an op an older lurker named otherwise (linear_dynamic) is read by its current name
    name, label, rolled = (current_label(d[k]) for k in ("name", "label", "rolled"))
    op = Op(d["index"], d["kind"], name, label, rolled, d["pass"], d["num_passes"])
    op.modules = tuple((path, n) for path, n in d["modules"])
    op.module_outputs = list(d["module_outputs"])
    op.parents = list(d["parents"])
    op.children = list(d["children"])
    op.outputs = [_tensor_from(m) for m in d["outputs"]]
    op.params = [_param(params, p["name"], p["shape"]) for p in d["params"]]
    op.time = d["time_s"]
    op.inplace = d["inplace"]
    op.random = d["random"]
    op.dist_from_input = d["dist_from_input"]
    op.dist_from_output = d["dist_from_output"]
    op.decides_branch = d["decides_branch"]
    op.value = decode(d["value"], params)
    op.seq = d["seq"]
    op.target = d["target"]
    op.args = decode(d["args"], params)
    op.kwargs = {k: decode(v, params) for k, v in d["kwargs"].items()}
    op.meta = dict(d["meta"])
    op.source = d["source"]
    op._saved = d["saved"]  # no tensors here to tell by: keep what the trace had, so a
    op._has_grad = d["has_grad"]  # graph read back writes the same document again
    # what edges() and FLOPs read, as on a traced graph
    op._inputs = [(r.index, r.output) if type(r) is OpRef else (-1, r.name) for r in refs(op)]
    return op


def _param(params: dict[str, ParamRef], name: str, shape: list[int]) -> ParamRef:
    p = params.get(name)
    if p is None:
        p = params[name] = ParamRef(name, tuple(shape))
    return p


def _tensor_from(m: dict[str, Any]) -> TensorMeta:
    shape = tuple(m["shape"])
    meta = TensorMeta(shape, m["dtype"], m["device"], m["requires_grad"])
    if meta.dtype not in ITEMSIZE and meta.numel:  # a dtype this lurker does not know
        ITEMSIZE[meta.dtype] = m["bytes"] // meta.numel
    return meta


def encode(value: Any) -> Any:
    """An argument (or readout value) as JSON, exactly: :func:`decode` gives it back.

    JSON types stand for themselves, tuples are arrays; what JSON lacks is an object with
    one key: ``{"op": i, "output": k}`` (an :class:`OpRef`), ``{"param": name}``,
    ``{"list": [...]}``, ``{"dict": [[key, value], ...]}``, ``{"float": "nan"}`` (also
    ``"inf"``, ``"-inf"``), ``{"slice": [start, stop, step]}``, ``{"ellipsis": null}``,
    and ``{"repr": text}`` for anything else (a ``torch.dtype``: read back as
    :class:`Opaque`).
    """
    t = type(value)
    if value is None or t is bool or t is int or t is str:
        return value
    if t is float:
        return value if math.isfinite(value) else {"float": str(value)}
    if t is OpRef:
        return {"op": value.index, "output": value.output}
    if t is ParamRef:
        return {"param": value.name}
    if isinstance(value, tuple):
        return [encode(v) for v in value]
    if isinstance(value, list):
        return {"list": [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    if t is slice:
        return {"slice": [encode(value.start), encode(value.stop), encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": None}
    if t is Opaque:
        return {"repr": value.repr}
    if isinstance(value, bool):  # numpy-free subclasses of the JSON types
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return encode(float(value))
    if isinstance(value, str):
        return str(value)
    return {"repr": repr(value)}


def decode(value: Any, params: dict[str, ParamRef] | None = None) -> Any:
    """The Python value :func:`encode` wrote (``params`` shares one ParamRef per name)."""
    if isinstance(value, list):
        return tuple(decode(v, params) for v in value)
    if not isinstance(value, dict):
        return value
    if "op" in value:
        return OpRef(value["op"], value["output"])
    if "param" in value:
        name = value["param"]
        if params is not None and name in params:
            return params[name]
        return ParamRef(name, ())
    if "list" in value:
        return [decode(v, params) for v in value["list"]]
    if "dict" in value:
        return {decode(k, params): decode(v, params) for k, v in value["dict"]}
    if "float" in value:
        return float(value["float"])
    if "slice" in value:
        return slice(*(decode(v, params) for v in value["slice"]))
    if "ellipsis" in value:
        return Ellipsis
    if "repr" in value:
        return Opaque(value["repr"])
    raise ValueError(f"not an encoded argument: {value!r}")


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
        "target": op.target,
        "args": encode(op.args),
        "kwargs": {k: encode(v) for k, v in op.kwargs.items()},
        "meta": {k: json_value(v) for k, v in op.meta.items()},
        "seq": op.seq,
        "pass": op.pass_num,
        "num_passes": op.num_passes,
        "dist_from_input": op.dist_from_input,
        "dist_from_output": op.dist_from_output,
        "decides_branch": bool(op.decides_branch),
        "value": encode(op.value),
        "inplace": bool(op.inplace),
        "random": bool(op.random),
        "saved": op.saved,
        "has_grad": op.has_grad,
    }


def _tensor(m: TensorMeta) -> dict[str, Any]:
    return {
        "shape": [int(s) for s in m.shape],
        "dtype": m.dtype,
        "device": m.device,
        "requires_grad": bool(m.requires_grad),
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
    """A readout's Python value (or an op's ``meta`` entry) as JSON: non-finite floats and
    exotic types become strings."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):  # meta["packed"]
        return {str(k): json_value(v) for k, v in value.items()}
    return repr(value)  # complex, numpy scalars, anything else


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of :func:`to_json` documents, shipped with lurker."""
    return json.loads(_schema_text())


@cache
def _schema_text() -> str:
    return resources.files("lurker").joinpath("schema/trace.schema.json").read_text("utf-8")
