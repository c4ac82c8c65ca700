"""The build after a forward pass: the recorder's raw nodes become a :class:`Trace`.

One function, :func:`build`, runs every step in one written order. It lives in capture/
because its first steps read live tensors (output metadata, the model's returned
tensors); the steps that need only graph data are in :mod:`lurker.graph.build`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.nn import Parameter

from ..graph import build as steps
from ..graph import nodes
from ..graph.nodes import Op, OpRef, ParamRef
from ..ops import catalogue
from . import _recorder
from ._tree import paths

if TYPE_CHECKING:
    from ._recorder import Recorder
    from .trace import Trace


def build(
    tr: Trace, rec: Recorder, output: Any, inputs: tuple, rng: Any, wall: float, complete: bool
) -> Trace:
    """Fill the empty trace ``tr`` from what ``rec`` recorded, in this order:

    1. ``complete_calls``: each recorded op's parents and children, parameters, kind,
       output metadata and place (the rolling key that numbers ``conv2d_3``);
    2. ``attach_outputs``: an ``output`` node per tensor the model returned;
    3. ``module_outputs``: which module calls each op's output leaves, named;
    4. ``labels``: names of inputs, outputs, buffers and constants; each module's ops;
       the ops readouts read;
    5. ``passes``: pass counts, and ``linear_1:2`` labels for ops that ran several times;
    6. ``distances``: hops from the nearest input and to the nearest output;
    7. ``public_calls``: each op's ``target`` and ``source`` (``args``/``kwargs`` are made
       from the raw call when first read: see :func:`live_call`); the target says which
       parameters a call binds where they differ from its name's (``catalogue.spec``);
    8. ``read_packed``: ``meta["packed"]``, a quantized layer's weight shape and conv
       geometry, read off its packed weight;
    9. ``count_flops``: ``meta["flops"]``;
    10. ``drop_provisional``: activations kept in case they were a module output ``save=``
        names, and that were not;
    11. ``index``: what ``trace[key]`` looks up.
    """
    tr.model = rec.model
    tr.model_name = type(rec.model).__name__
    tr.complete = complete
    tr.time = wall
    tr._inputs = inputs
    tr._rng = rng
    tr._grads = rec.grads
    tr._transform = rec.transform
    tr._save_to = rec.device  # save_to=: where every run keeps its values too
    tr.param_shapes = dict(rec.param_shapes)  # the recorder shares its index across traces
    tr._param_writes = rec.param_writes
    tr._params_replaced = rec.params_replaced
    tr._state_before = rec.state_before
    tr._state_replaced = rec.state_replaced
    tr._stale_by = rec.stale_by
    tr.modules = rec.module_info
    tr.output = output
    nodes = rec.nodes
    complete_calls(rec)
    attach_outputs(rec, output)
    steps.module_outputs(nodes, rec.module_info)
    steps.labels(nodes, rec.module_info)
    steps.passes(nodes)
    steps.distances(nodes)
    public_calls(rec)
    read_packed(nodes, rec.name_counts)
    steps.count_flops(nodes)
    drop_provisional(rec)
    tr._index = steps.index(nodes)
    tr.ops = nodes
    if rec.failed is not None:
        tr.failed_op = rec.failed.label
    return tr


def complete_calls(rec: Recorder) -> None:
    """What the recorder's hot path left out, for every op not completed already."""
    rec._complete_all(rec.nodes)


def attach_outputs(rec: Recorder, output: Any) -> None:
    """An ``output`` node per tensor in the model's output (``output['logits']``)."""
    if output is None:
        return
    _meta = _recorder._meta
    nodes = rec.nodes
    for name, t in paths(output, "output", []):
        src, k = rec._resolve(t)  # the producing op (or buffer/constant node)
        if src < 0:  # the model returned a parameter itself
            src, k = rec.add_source_node("constant", name, t), 0
        idx = len(nodes)
        node = Op(index=idx, kind="output", name=name, parents=[src])
        node.outputs = [_meta(t)]
        node._inputs = [(src, k)]
        node.args = (OpRef(src, k),)
        parent_act = nodes[src].activation
        if parent_act is not None:
            node.activation = parent_act[k] if isinstance(parent_act, tuple) else parent_act
        if rec.save.wants_op(node) and node.activation is None:
            # the model's output as it returned it (no transform=, which is written for
            # the layers saved), on save_to='s device as every saved value (and as runs)
            a = t.detach()
            node.activation = a if rec.device is None else a.to(rec.device)
        nodes[src].children.append(idx)
        nodes.append(node)


def public_calls(rec: Recorder) -> None:
    """Each recorded op's ``target`` and ``source`` (resolved once per place an op is
    made, then shared by every op made there). ``args``/``kwargs`` of an op whose raw
    call the recorder kept are made from it when first read (:func:`live_call`)."""
    _source = _recorder._source
    targets = _TARGETS
    for node in rec.nodes:
        func = node._func
        if func is None:  # inputs, outputs, buffers, constants
            continue
        try:
            node.target = targets[func]
        except (KeyError, TypeError):
            node.target = target_name(func)
        if node._skel_args is not None:  # else the recorder made the skeleton at once
            node._args = node._kwargs = None
        entry = node._key
        sites = entry[3]
        if type(sites) is list:  # first op from this place: find its source line
            sites = entry[3] = _source(sites)
        node.source = sites


def live_call(op: Op) -> None:
    """``op.args``/``op.kwargs`` from the raw call the recorder kept (on first read)."""
    refs = {p.name: p for p in op.params}
    op._args, op._kwargs = call_skeleton(op._skel_args, op._skel_kwargs, op._inputs, refs)


def packed_weights(v: Any) -> list[tuple[int, ...]] | None:
    """The shapes of the weights (tensors of two or more axes: biases left out) a
    TorchScript object packs, a quantized Linear's or conv's ``_packed_params``, in
    order; None for any other value."""
    import torch

    if not isinstance(v, torch.ScriptObject):
        return None
    return [tuple(t.shape) for t in _recorder.packed_tensors(v) if t.dim() > 1]


def read_packed(nodes: list[Op], names: Collection[str]) -> None:
    """``meta["packed"]`` of every quantized conv and Linear op: its weight's shape and,
    for a conv, the ``stride``, ``padding``, ``dilation``, ``groups`` and
    ``output_padding`` its packed weight holds (a TorchScript object, written into a
    saved graph as its repr only), as a float conv's arguments read: receptive fields and
    unit layouts read them (``catalogue.packed_call``). A quantized conv1d's packed
    weight is a conv2d's of height 1: its axis of 1 is left out. ``names``: those of the
    ops recorded (no pass at all over a model without quantized ops)."""
    import torch

    packed, convs, specs = catalogue.PACKED, catalogue.QUANTIZED_CONV, catalogue.SPECS
    if packed.keys().isdisjoint(names):
        return
    for node in nodes:
        param = packed.get(node.name)
        if param is None:
            continue
        args = node._skel_args if node._skel_args is not None else node.args
        kwargs = node._skel_kwargs if node._skel_args is not None else node.kwargs
        try:
            obj = specs[node.name].arg(args, kwargs or None, param)
        except TypeError:  # a call its signature does not take
            continue
        if not isinstance(obj, torch.ScriptObject):
            continue
        weights = packed_weights(obj) or []
        if len(weights) != 1:
            continue
        nd = convs.get(node.name)
        if nd is None:  # a Linear's (out, in)
            node.meta["packed"] = {"weight": list(weights[0])}
            continue
        w = weights[0]
        try:
            found: dict[str, Any] = {
                k: [int(n) for n in getattr(obj, k)()[-nd:]]
                for k in ("stride", "padding", "dilation", "output_padding")
            }
            found["groups"] = int(obj.groups())
        except (AttributeError, RuntimeError):  # another packing, of other methods
            continue
        found["weight"] = [*w[:2], *w[len(w) - nd :]]
        node.meta["packed"] = found


nodes._live_call = live_call  # graph/ cannot import capture/: capture hands it over
steps.packed_weights = packed_weights
steps.tensor_types = frozenset({Tensor, Parameter})


def drop_provisional(rec: Recorder) -> None:
    """Drop provisionally saved activations that turned out not to be module outputs."""
    saved = rec.saved_modules
    if not saved:
        return
    rec._pending = []
    for node in rec.nodes:
        if node._provisional and not any(m.split(":")[0] in saved for m in node.module_outputs):
            unsave(node, rec.param_refs)


def unsave(node: Op, param_refs: dict[str, ParamRef]) -> None:
    """Forget an op's saved activation, and the raw call arguments kept with it (live
    tensors: inputs of the op that nothing else may hold), keeping the call's skeleton."""
    node.activation = None
    if node._skel_args is not None:
        node._args, node._kwargs = call_skeleton(
            node._skel_args, node._skel_kwargs, node._inputs, param_refs
        )
        node._skel_args = node._skel_kwargs = None


def call_skeleton(
    args: tuple, kwargs: dict, inputs: Any, param_refs: dict[str, ParamRef]
) -> tuple[tuple, dict[str, Any]]:
    """``args``/``kwargs`` with each tensor replaced, in :func:`~._tree.call_tensors`
    order, by where it came from (``inputs``: ``(node, output)`` or ``(-1, param name)``)."""
    it = iter([_new_tuple(OpRef, i) if i[0] >= 0 else param_refs[i[1]] for i in inputs])
    out = []
    for a in args:
        if isinstance(a, Tensor):
            out.append(next(it, None))
        elif isinstance(a, (tuple, list, dict)):
            out.append(_skeleton(a, it))
        else:
            out.append(a)
    return tuple(out), {k: _skeleton(v, it) for k, v in kwargs.items()} if kwargs else {}


def _skeleton(obj: Any, it: Any) -> Any:
    if isinstance(obj, Tensor):
        return next(it, None)
    if isinstance(obj, list):
        return [_skeleton(o, it) for o in obj]
    if isinstance(obj, tuple):  # torch.Size and named tuples too: a plain tuple
        return tuple([_skeleton(o, it) for o in obj])
    if isinstance(obj, dict):
        return {k: _skeleton(v, it) for k, v in obj.items()}
    return obj


_new_tuple = tuple.__new__
_TARGETS: dict[Any, str] = {}  # callable -> its qualified name


def target_name(func: Any) -> str:
    """The qualified name of a torch callable, as ``torch.fx`` would write it:
    ``torch.nn.functional.conv2d``, ``torch.Tensor.add``, ``torch.Tensor.T.__get__``."""
    try:
        hit = _TARGETS.get(func)
    except TypeError:  # unhashable
        return _target_name(func)
    if hit is None:
        hit = _TARGETS[func] = _target_name(func)
    return hit


def _target_name(func: Any) -> str:
    import torch
    import torch.nn.functional as F

    name = getattr(func, "__name__", None) or type(func).__name__
    owner = getattr(func, "__objclass__", None)
    if isinstance(owner, type) and issubclass(owner, torch._C.TensorBase):
        return f"torch.Tensor.{name}"
    if name == "__get__":  # a Tensor property (x.T, x.real): its getter
        attr = getattr(getattr(func, "__self__", None), "__name__", "get")
        return f"torch.Tensor.{attr}.__get__"
    for space, prefix in ((F, "torch.nn.functional"), (torch, "torch")):
        if getattr(space, name, None) is func:
            return f"{prefix}.{name}"
    if isinstance(func, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        return f"torch.ops.{func}"  # torch.ops.quantized.linear_dynamic
    module = getattr(func, "__module__", None) or ""
    qual = getattr(func, "__qualname__", None) or name
    return f"{module}.{qual}" if module else qual
