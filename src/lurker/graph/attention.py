"""Attention written out by hand, found in a graph: ``softmax(q @ kᵀ ...) @ v``.

A fused ``scaled_dot_product_attention`` call names itself; an attention written as a
matmul of the query and the transposed key, a scale, a bias or mask, a softmax over the
keys and a matmul with the values (torchvision's Swin, timm's ViTs with ``fused_attn=False``,
minGPT and nanoGPT) leaves only ordinary ops. There the softmax's output is the attention
weights, so the explorer can show them as the model computed them. Torch-free: it reads the
ops' names, arguments and shapes only, so a graph read back from JSON answers the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .nodes import OpRef, refs

if TYPE_CHECKING:
    from .graph import Graph
    from .nodes import Op

#: Ops the scores may pass through between ``q @ kᵀ`` and the softmax, keeping each score
#: in place: a scale, a bias or mask added or filled in, soft-capping, dropout, casts.
_SCORE_STEPS = frozenset({
    "add", "sub", "mul", "div", "true_divide", "radd", "rsub", "rmul", "rdiv", "neg",
    "masked_fill", "where", "nan_to_num", "clamp", "clamp_min", "clamp_max", "maximum",
    "minimum", "tanh", "dropout", "contiguous", "clone", "detach", "to", "type", "type_as",
    "float", "double", "half", "bfloat16",
})  # fmt: skip
#: Ops the weights may pass through between the softmax and the matmul with the values.
_WEIGHT_STEPS = frozenset({
    "dropout", "mul", "div", "true_divide", "masked_fill", "where", "nan_to_num",
    "contiguous", "clone", "detach", "to", "type", "type_as", "float", "double", "half",
    "bfloat16",
})  # fmt: skip
#: Reshapes that keep the last two axes (the queries and keys) as they are.
_RESHAPES = frozenset({"view", "reshape", "unflatten", "flatten", "unsqueeze", "squeeze"})
#: Ops that multiply two tensors along an axis.
_PRODUCTS = frozenset({"matmul", "bmm", "einsum", "baddbmm"})
_INPLACE = {"iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "div"}


@dataclass(frozen=True)
class SoftmaxAttention:
    """A softmax whose output is attention weights, and the ops around it."""

    softmax: int  #: the softmax op's index; its output is ``(..., L queries, S keys)``
    scores: int  #: the op making ``q kᵀ`` (a matmul, bmm, baddbmm or einsum)
    values: int  #: the op taking the weighted sum of the values
    query: OpRef  #: the scores' query operand ...
    query_axis: int  #: ... and its axis of query tokens (counted from 0)
    key: OpRef  #: the scores' key operand (kᵀ) ...
    key_axis: int  #: ... and its axis of key tokens (counted from 0)
    between: tuple[int, ...]  #: the ops from the softmax to ``values`` (a dropout)


def attention_softmaxes(graph: Graph) -> dict[int, SoftmaxAttention]:
    """The softmax ops of ``graph`` whose output is attention weights, by op index.

    Strict, because a classifier's softmax or a mixture-of-experts gate shown as attention
    would be a wrong picture: a softmax is attention only where (1) it runs over the last
    axis of an output ``(..., L, S)``; (2) its input comes, through ops that keep each
    score in place (a scale, a bias or mask added, ``masked_fill``, ``where``, dropout,
    casts, reshapes that keep the last two axes), from a ``matmul``/``bmm``/``baddbmm``/
    ``einsum`` of two tensors that both come from the model's input (q and kᵀ: not a
    parameter, buffer or constant, as a gate's learned matrix is), which makes those
    ``L x S`` scores by contracting the channels; and (3) its output reaches, through
    dropout-like ops, reshapes or a swap of its last two axes, such a product with another
    tensor from the input (the values) that contracts its key axis. A gate's logits come
    from a linear layer or a parameter, a classifier's from a linear layer: neither is a
    product of two tensors from the input."""
    ops = graph.ops
    found: dict[int, SoftmaxAttention] = {}
    for op in ops:
        if op.kind != "op" or op.name != "softmax" or not op.outputs:
            continue
        shape = op.outputs[0].shape
        if len(shape) < 2 or _softmax_dim(op) not in (-1, len(shape) - 1):
            continue
        scores = _scores(ops, op, tuple(shape[-2:]))
        if scores is None:
            continue
        used = _values(ops, op, shape[-1])
        if used is None:
            continue
        s, (q, qa), (k, ka) = scores
        found[op.index] = SoftmaxAttention(op.index, s, used[0], q, qa, k, ka, used[1])
    return found


def _name(op: Op) -> str:
    """The op's name with an in-place variant (``add_``, ``iadd``) as its plain op."""
    n = op.name
    if n.endswith("_") and not n.endswith("__"):
        return n[:-1]
    return _INPLACE.get(n, n)


def _call(op: Op) -> dict[str, Any] | None:
    from ..ops.catalogue import bind

    try:
        return bind(op.name, op.args or (), op.kwargs or {}, op.target)
    except (KeyError, TypeError):
        return None


def _softmax_dim(op: Op) -> int | None:
    call = _call(op)
    dim = None if call is None else call.get("dim")
    return dim if isinstance(dim, int) else None


def _shape(ops: list[Op], ref: Any) -> tuple[int, ...] | None:
    if type(ref) is not OpRef:
        return None
    outs = ops[ref.index].outputs
    return tuple(outs[ref.output].shape) if ref.output < len(outs) else None


def _from_input(ops: list[Op], ref: Any) -> bool:
    """Whether ``ref`` is an op's output made from the model's input (not a parameter,
    buffer or constant alone)."""
    return type(ref) is OpRef and ops[ref.index].dist_from_input is not None


def _einsum(call: dict[str, Any]) -> tuple[list[str], str, list[Any]] | None:
    """An einsum of two operands as (their subscripts, the output's, the operands)."""
    eq, tensors = call.get("equation"), call.get("tensors")
    if isinstance(tensors, tuple) and len(tensors) == 1 and isinstance(tensors[0], list):
        tensors = tensors[0]
    if not isinstance(eq, str) or "->" not in eq or not isinstance(tensors, (tuple, list)):
        return None
    lhs, out = eq.replace(" ", "").split("->")
    subs = lhs.split(",")
    if len(subs) != 2 or len(tensors) != 2:
        return None
    return subs, out, list(tensors)


def _axis(sub: str, letter: str, ndim: int) -> int:
    """The axis of ``letter`` in an operand of ``ndim`` axes written ``sub`` (``...`` allowed)."""
    if "..." in sub:
        before, after = sub.split("...")
        if letter in before:
            return before.index(letter)
        return ndim - len(after) + after.index(letter)
    return sub.index(letter)


def _scores(
    ops: list[Op], softmax: Op, ls: tuple[int, ...]
) -> tuple[int, tuple[OpRef, int], tuple[OpRef, int]] | None:
    """The ``q kᵀ`` product the softmax's input comes from, with its query and key operands
    and their token axes; None where there is none."""
    seen: set[int] = set()
    todo = [r for r in softmax.args[:1] if type(r) is OpRef]
    while todo:
        ref = todo.pop()
        if ref.index in seen or _shape(ops, ref) is None or _shape(ops, ref)[-2:] != ls:  # type: ignore[index]
            continue
        seen.add(ref.index)
        op = ops[ref.index]
        name = _name(op)
        if name in _PRODUCTS:
            hit = _product(ops, op, ls)
            if hit is not None:
                return op.index, *hit
        elif name in _SCORE_STEPS or name in _RESHAPES:
            todo.extend(r for r in refs(op) if type(r) is OpRef)
    return None


def _product(
    ops: list[Op], op: Op, ls: tuple[int, ...]
) -> tuple[tuple[OpRef, int], tuple[OpRef, int]] | None:
    """``op``'s query and key operands with their token axes where it makes ``L x S``
    scores from two tensors of the input, contracting their channels."""
    call = _call(op)
    if call is None:
        return None
    name = _name(op)
    if name == "einsum":
        parsed = _einsum(call)
        if parsed is None or len(parsed[1]) < 2:
            return None
        subs, out, (a, b) = parsed
        ql, kl = out[-2], out[-1]
        if not (_from_input(ops, a) and _from_input(ops, b)):
            return None
        sa, sb = _shape(ops, a), _shape(ops, b)
        if sa is None or sb is None:
            return None
        contracted = (set(subs[0]) & set(subs[1])) - set(out) - {"."}
        if not contracted:
            return None
        if ql in subs[0] and ql not in subs[1] and kl in subs[1] and kl not in subs[0]:
            return (a, _axis(subs[0], ql, len(sa))), (b, _axis(subs[1], kl, len(sb)))
        if ql in subs[1] and ql not in subs[0] and kl in subs[0] and kl not in subs[1]:
            return (b, _axis(subs[1], ql, len(sb))), (a, _axis(subs[0], kl, len(sa)))
        return None
    a, b = _operands(call, name)
    sa, sb = _shape(ops, a), _shape(ops, b)
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return None
    if not (_from_input(ops, a) and _from_input(ops, b)):
        return None
    if (sa[-2], sb[-1]) != ls or sa[-1] != sb[-2]:
        return None
    return (a, len(sa) - 2), (b, len(sb) - 1)  # type: ignore[return-value]


def _values(ops: list[Op], softmax: Op, keys: int) -> tuple[int, tuple[int, ...]] | None:
    """The product that takes the weights' sum of the values, contracting the key axis,
    and the ops on the way to it; None where none does."""
    # (op index, where the key axis is: -1 or -2, the ops passed)
    todo: list[tuple[int, int, tuple[int, ...]]] = [(softmax.index, -1, ())]
    seen: set[int] = set()
    while todo:
        i, at, path = todo.pop(0)
        if (i, at) in seen or len(path) > 8:
            continue
        seen.add((i, at))
        for c in ops[i].children:
            child = ops[c]
            if child.kind != "op" or not child.outputs:
                continue
            ref = next((r for r in refs(child) if type(r) is OpRef and r.index == i), None)
            if ref is None:
                continue
            name = _name(child)
            if name in _PRODUCTS:
                if _contracts(ops, child, i, at, keys):
                    return child.index, path
                continue
            out = tuple(child.outputs[0].shape)
            if len(out) < 2:
                continue
            if name in _WEIGHT_STEPS or name in _RESHAPES:
                if out[at] == keys and (name not in _RESHAPES or at == -1):
                    todo.append((c, at, (*path, c)))
            elif name in ("transpose", "permute", "mT", "t") and _swaps_last_two(child, len(out)):
                todo.append((c, -1 - (at == -1), (*path, c)))
    return None


def _operands(call: dict[str, Any], name: str) -> tuple[Any, Any]:
    """The two matrices a ``matmul``, ``bmm`` or ``baddbmm`` call multiplies, bound by name."""
    if name == "baddbmm":
        return call.get("batch1"), call.get("batch2")
    return call.get("self", call.get("input")), call.get("other", call.get("mat2"))


def _swaps_last_two(op: Op, ndim: int) -> bool:
    """Whether a transpose or permute swaps the last two axes and nothing else."""
    call = _call(op)
    name = op.name
    if name in ("mT", "t"):
        return True
    if call is None:
        return False
    if name == "transpose":
        d = {call.get("dim0"), call.get("dim1")}
        return d in ({-1, -2}, {ndim - 1, ndim - 2}, {-1, ndim - 2}, {-2, ndim - 1})
    dims = call.get("dims")
    if isinstance(dims, (tuple, list)) and len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    if not isinstance(dims, (tuple, list)) or len(dims) != ndim:
        return False
    dims = [d % ndim for d in dims if isinstance(d, int)]
    return dims == [*range(ndim - 2), ndim - 1, ndim - 2]


def _contracts(ops: list[Op], op: Op, weights: int, at: int, keys: int) -> bool:
    """Whether product ``op`` contracts the weights' (output of op ``weights``) key axis
    (``at``: -1 or -2) with a tensor from the input (the values)."""
    call = _call(op)
    if call is None:
        return False
    name = _name(op)
    if name == "einsum":
        parsed = _einsum(call)
        if parsed is None:
            return False
        subs, out, (a, b) = parsed
        mine = [k for k, t in enumerate((a, b)) if type(t) is OpRef and t.index == weights]
        if len(mine) != 1:
            return False
        w, other = (subs[mine[0]], subs[1 - mine[0]])
        v = (a, b)[1 - mine[0]]
        sw = _shape(ops, (a, b)[mine[0]])
        if sw is None or not _from_input(ops, v):
            return False
        letters = w.replace("...", "")
        key = next((c for c in letters if _axis(w, c, len(sw)) == len(sw) + at), None)
        return key is not None and key in other and key not in out
    a, b = _operands(call, name)
    sa, sb = _shape(ops, a), _shape(ops, b)
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return False
    if type(a) is OpRef and a.index == weights and at == -1:
        return _from_input(ops, b) and sb[-2] == keys
    if type(b) is OpRef and b.index == weights and at == -2:
        return _from_input(ops, a) and sa[-1] == keys
    return False
