"""The torch-free steps of building a graph after a forward pass.

:func:`lurker.capture._build.build` runs them, in the order its docstring lists, on the
nodes the recorder completed; :meth:`lurker.graph.Graph.from_json` reruns :func:`index`.
Each is one pass over the nodes: Python run between torch kernels costs 2-3x what it does
in a batch afterwards, so the recorder leaves all of this until the forward is done.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..ops import catalogue
from .nodes import ModuleInfo, Op, OpRef, ParamRef

#: kinds of the nodes the recorder records (a call of the model's); the others (inputs,
#: outputs, buffers, constants) are sources and sinks it adds around them
RECORDED = frozenset({"op", "generated", "readout", "failed"})


def labels(nodes: list[Op], modules: dict[str, ModuleInfo]) -> None:
    """Name what the recorder left unnamed: ``input_1``, ``output_2``, ``buffer_1``...;
    and record each module's ops and the ops a readout read."""
    counters: dict[str, int] = {}
    calls: tuple[tuple[str, int], ...] = ()
    ops: list[list[int]] = []  # the ops lists of the modules of `calls`
    for node in nodes:
        kind = node.kind
        if not node.label and kind not in RECORDED:
            counters[kind] = n = counters.get(kind, 0) + 1
            node.label = node.rolled = f"{kind}_{n}"
        ms = node.modules
        if ms is not calls:  # (ops of one call share its stack: looked up once a call)
            calls = ms
            ops = [modules[path].ops for path, _ in ms]
        i = node.index
        for held in ops:
            held.append(i)
        if kind == "readout":
            for p in node.parents:
                nodes[p].decides_branch = True
            node.decides_branch = True


def passes(nodes: list[Op]) -> None:
    """Each recorded op's pass count, and its label: ``linear_1:2`` for pass 2 of an op
    that ran several times (the recorder numbered the passes; the count is final now)."""
    for node in nodes:
        key = node._key
        if key is not None and node.kind in RECORDED:
            # the recorder's [number, passes, label, source] entry of the op's place
            n = node.num_passes = key[1]
            node.label = node.rolled if n == 1 else f"{node.rolled}:{node.pass_num}"


def index(nodes: list[Op]) -> dict[str, int]:
    """What ``graph[key]`` looks up: op labels, input/output/buffer names, and module
    outputs (``'features.3'``, ``'cell:2'``; the last op producing one wins)."""
    found: dict[str, int] = {}
    for node in nodes:
        found.setdefault(node.label, node.index)
        if node.kind in ("input", "output", "buffer"):
            found.setdefault(node.name, node.index)
        for m in node.module_outputs:
            found[m] = node.index
    return found


def flops_unknown(node: Op, nodes: list[Op] | None = None) -> bool:
    """Whether ``node`` is an op of a kind whose FLOPs are counted (a conv, linear,
    matmul-like, attention or recurrent op) that has no count, its arguments being ones
    the rule cannot read: a total over the graph leaves it out, so it is a lower bound.
    An ``einsum`` that contracts nothing (a sum, a transpose, an outer product) has no
    count by rule; one that does but has none (three operands or more) is unknown.
    ``nodes``: the graph's, whose output shapes tell what an einsum's ellipsis covers."""
    if node.kind != "op" or node.name not in _FLOP_OPS or node.flops is not None:
        return False
    if node.name != "einsum":
        return True
    args, kwargs = node.args, node.kwargs
    equation = kwargs.get("equation", args[0] if args else None)
    if not isinstance(equation, str):
        return True  # a call the rule could not read
    rest = args[1:] if "equation" not in kwargs else args
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):  # einsum(eq, [a, b])
        rest = rest[0]
    shapes = [_shape_tree(r, nodes) for r in rest] if nodes is not None else []
    if shapes and all(type(s) is tuple and all(type(n) is int for n in s) for s in shapes):
        return catalogue.einsum_contracts(equation, shapes)
    return catalogue.einsum_contracts(equation, len(rest))


def count_flops(nodes: list[Op]) -> None:
    """``meta["flops"]`` of every conv, linear, matmul-like, attention and recurrent op
    whose count is known."""
    for node in nodes:
        if node.name in _FLOP_OPS:
            n = flops(node, nodes)
            if n is not None:
                node.meta["flops"] = n


def module_outputs(nodes: list[Op], modules: dict[str, ModuleInfo]) -> None:
    """Which module calls each op's output leaves: those are the calls' outputs, named
    ``features.3``, or ``cell:2`` for a module called several times.

    An output is what a call hands back to code outside it: an op is an output of each
    enclosing call that one of its consumers (or the model's output) lies outside,
    innermost first. An op nobody consumes (a value kept on the side, attention weights
    the caller drops) is an output of no call, so ``trace["block"]`` stays the tensor the
    rest of the model used.
    """
    for node in nodes:
        ms = node.modules
        if not ms or not node.children or node.kind == "failed":
            continue
        depth = len(ms)
        exit_at = depth
        for c in node.children:
            cm = nodes[c].modules
            if cm is ms:  # the same call: the recorder shares one stack within a call
                continue
            j = 0
            n = min(depth, len(cm))
            while j < n and cm[j] == ms[j]:
                j += 1
            if j < exit_at:
                exit_at = j
                if not j:
                    break
        if exit_at == depth:
            continue
        outs = node.module_outputs
        for j in range(depth - 1, exit_at - 1, -1):
            path, pass_num = ms[j]
            info = modules[path]
            outs.append(path if info.num_passes <= 1 else f"{path}:{pass_num}")
            info.outputs.setdefault(pass_num, []).append(node.index)


def distances(nodes: list[Op]) -> None:
    """Hops from the nearest input (following children) and to the nearest output.

    The nodes are in execution order, so every node's parents come before it: one pass
    forward and one back, each node's distance from its neighbours' (final by then), give
    what a breadth-first search from the inputs and one from the outputs would."""
    for node in nodes:
        if node.kind == "input":
            node.dist_from_input = 0
            continue
        d = None
        i = node.index
        for p in node.parents:
            if p >= i:  # not in execution order (never made by a trace): search instead
                _searched_distances(nodes)
                return
            dp = nodes[p].dist_from_input
            if dp is not None and (d is None or dp < d):
                d = dp
        node.dist_from_input = None if d is None else d + 1
    for node in reversed(nodes):
        if node.kind == "output":
            node.dist_from_output = 0
            continue
        d = None
        for c in node.children:
            dc = nodes[c].dist_from_output
            if dc is not None and (d is None or dc < d):
                d = dc
        node.dist_from_output = None if d is None else d + 1


def _searched_distances(nodes: list[Op]) -> None:
    """:func:`distances` of nodes in any order: a breadth-first search each way."""
    down = _levels(nodes, "input", True)
    up = _levels(nodes, "output", False)
    for node, d_in, d_out in zip(nodes, down, up):
        node.dist_from_input = d_in
        node.dist_from_output = d_out


def _levels(nodes: list[Op], start: str, down: bool) -> list[int | None]:
    """Hops from the nearest node of kind ``start`` (breadth first), following children
    (``down``) or parents; None where none is reachable."""
    dist: list[int | None] = [None] * len(nodes)
    q: deque[int] = deque()
    for node in nodes:
        if node.kind == start:
            dist[node.index] = 0
            q.append(node.index)
    while q:
        i = q.popleft()
        node = nodes[i]
        d = dist[i] + 1  # type: ignore[operator]
        for j in node.children if down else node.parents:
            if dist[j] is None:
                dist[j] = d
                q.append(j)
    return dist


def input_metas(node: Op, nodes: list[Op]) -> list[tuple[int, ...]]:
    """Shapes of an op's tensor arguments, in argument order."""
    metas: list[tuple[int, ...]] = []
    for src, what in node._inputs:
        if src >= 0:
            metas.append(nodes[src].outputs[what].shape)
        else:
            metas.append(next((p.shape for p in node.params if p.name == what), ()))
    return metas


#: recurrent ops: their weight matrices applied at every step (``quantized_lstm``: a
#: dynamically quantized LSTM's, its weights packed)
_RNN_OPS = frozenset({"lstm", "gru", "rnn_tanh", "rnn_relu", "quantized_lstm", "quantized_gru"})
_FLOP_OPS = frozenset(n for n, s in catalogue.SPECS.items() if s.flops is not None) | _RNN_OPS


def flops(node: Op, nodes: list[Op]) -> int | None:
    """Floating-point operations (2 per multiply-add) of conv, linear and matmul-like ops,
    by the catalogue's rule for the op, from its arguments bound by name. Recurrent ops
    are counted from their weights: their calls have two layouts that bind differently
    (a sequence, or packed data with its batch sizes)."""
    name = node.name
    if name not in _FLOP_OPS or not node.outputs or not node._inputs:
        return None
    if name in _RNN_OPS:
        return _rnn_flops(node, nodes)
    try:
        shapes = _bound_shapes(node, nodes)
    except (TypeError, IndexError):  # a call the op's signature does not take
        return None
    return catalogue.flops(name, shapes, node.outputs[0].shape)


def _shape_tree(v: Any, nodes: list[Op]) -> Any:
    """A call's arguments with each tensor (live, or an ``OpRef``/``ParamRef``) replaced by
    its shape, in nested lists and tuples too.

    The common types first, by exact type: ``isinstance`` against a tensor goes down
    torch's slow path, and a conv's stride, padding and dilation are tuples of ints
    (this ran at ~6 µs per conv, most of the build's FLOPs step)."""
    t = type(v)
    if t in _AS_IS:
        return v
    if t is OpRef:
        return tuple(nodes[v.index].outputs[v.output].shape)
    if t in tensor_types or t in _SHAPED:  # a tensor
        shape = getattr(v, "shape", None)
        return tuple(shape) if shape is not None else v
    if t is tuple or t is list:
        items = [x if type(x) in _AS_IS else _shape_tree(x, nodes) for x in v]
        return items if t is list else tuple(items)
    if t is ParamRef:
        return tuple(v.shape)
    return _any_shape_tree(v, nodes)


def _any_shape_tree(v: Any, nodes: list[Op]) -> Any:
    """:func:`_shape_tree` for any other value: subclasses, named tuples, dicts."""
    if isinstance(v, OpRef):
        return tuple(nodes[v.index].outputs[v.output].shape)
    if isinstance(v, ParamRef):
        return tuple(v.shape)
    if isinstance(v, dict):
        return {k: _shape_tree(x, nodes) for k, x in v.items()}
    if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
        items = [_shape_tree(x, nodes) for x in v]
        return items if isinstance(v, list) else tuple(items)
    weights = packed_weights(v)
    if weights is not None:  # a quantized Linear's or conv's packed weight: its shape
        return weights[0] if len(weights) == 1 else None
    _SHAPED.add(type(v))  # none of the above, by its type: straight here next time
    shape = getattr(v, "shape", None)  # a tensor
    return tuple(shape) if shape is not None else v


def _no_packed_weights(v: Any) -> list[tuple[int, ...]] | None:
    return None


#: the shapes of the weight matrices (or kernels) a value packs, None for a value that is
#: no packed object: a quantized Linear's or conv's ``_packed_params`` holds its weight in
#: a TorchScript object, not a tensor. capture/ hands it over (graph/ imports no torch)
packed_weights: Callable[[Any], list[tuple[int, ...]] | None] = _no_packed_weights

#: torch's own tensor types (``Tensor``, ``Parameter``): capture/ hands them over, so that
#: _shape_tree finds them in a plain set, not by _SHAPED's weak (slower) lookup
tensor_types: frozenset[type] = frozenset()

# values _shape_tree returns as they are (no ``shape``, not a container)
_AS_IS = frozenset({int, float, bool, str, type(None)})
# types _any_shape_tree found to be none of the types it tests (tensors): it reads their
# shape at once (graph/ imports no torch to name them); weakly, so that a class made per
# model is not kept alive by having been seen
_SHAPED: weakref.WeakSet[type] = weakref.WeakSet()


def _rnn_flops(node: Op, nodes: list[Op]) -> int | None:
    """An RNN, LSTM or GRU call: every weight matrix (input, hidden and projection, of
    every layer and direction) is applied once per step of every sequence, 2 FLOPs per
    multiply-add (the gates' elementwise work is not counted, as for other ops). A
    dynamically quantized one's weights are packed in its call's parameter list."""
    shapes = [
        tuple(nodes[s].outputs[k].shape) for s, k in node._inputs if s >= 0 and nodes[s].outputs
    ]
    weights = [p.shape for p in node.params if len(p.shape) == 2]
    if not weights and node.name.startswith("quantized_"):
        args = node._skel_args if node._skel_args is not None else node.args
        cells = args[2] if len(args) > 2 and isinstance(args[2], (list, tuple)) else ()
        weights = [w for c in cells for w in packed_weights(c) or () if len(w) == 2]
    if not shapes or not weights:
        return None
    first = shapes[0]
    packed = len(first) == 2 and len(shapes) > 1 and len(shapes[1]) == 1  # (data, batch_sizes)
    steps = first[0] if packed or len(first) == 2 else first[0] * first[1]
    return sum(2 * steps * w[0] * w[1] for w in weights)


def _bound_shapes(node: Op, nodes: list[Op]) -> Mapping[str, Any]:
    """The op's arguments by parameter name, tensors replaced by their shapes: from its
    raw arguments while the trace holds them, else from its call's skeleton."""
    if node._skel_args is not None:
        args, kwargs = node._skel_args, node._skel_kwargs
    else:
        args, kwargs = node.args, node.kwargs
    spec = catalogue.spec(node.name, node.target)
    if spec is None:
        raise KeyError(node.name)
    return _Shapes(spec, args, kwargs, nodes)


class _Shapes(Mapping[str, Any]):
    """``{name: shape tree}`` of a call's bound arguments, each made when read: a FLOPs
    rule reads one or two of a conv's seven (binding and shaping them all was most of the
    build's FLOPs step). Reads as ``catalogue.bind`` binds (``OpSpec.arg``)."""

    __slots__ = ("_args", "_kwargs", "_nodes", "_spec")

    def __init__(self, spec: catalogue.OpSpec, args: Any, kwargs: Any, nodes: list[Op]):
        self._spec, self._args, self._kwargs, self._nodes = spec, args, kwargs, nodes

    def __getitem__(self, name: str) -> Any:
        v = self._spec.arg(self._args, self._kwargs, name, _ABSENT)
        if v is _ABSENT:
            raise KeyError(name)
        return _shape_tree(v, self._nodes)

    def __contains__(self, name: object) -> bool:
        return (
            isinstance(name, str)
            and self._spec.arg(self._args, self._kwargs, name, _ABSENT) is not _ABSENT
        )

    def _bound(self) -> dict[str, Any]:
        return self._spec.bind(self._args, self._kwargs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._bound())

    def __len__(self) -> int:
        return len(self._bound())


_ABSENT = object()  # an argument the call did not give and that has no default
