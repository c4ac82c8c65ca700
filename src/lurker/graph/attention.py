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
    #: the output's leading axes (all but the last two), flattened in order, as
    #: ``(what, size)`` factors: ``"batch"`` (the input's batch axis), ``"heads"`` (a
    #: factor of the channels, split off q and k) or ``"windows"`` (a factor of the token
    #: axes: windows folded into the batch); factors of size 1 left out; None where the
    #: trace does not say (a reshape lurker cannot follow back to the input)
    folds: tuple[tuple[str, int], ...] | None = None
    #: the model inputs (op indices) the query is made from, and those the key is made from
    query_inputs: tuple[int, ...] = ()
    key_inputs: tuple[int, ...] = ()

    @property
    def cross(self) -> bool:
        """Cross-attention: the keys come from other model inputs than the queries."""
        return bool(self.key_inputs) and self.key_inputs != self.query_inputs


def attention_softmaxes(graph: Graph) -> dict[int, SoftmaxAttention]:
    """The softmax ops of ``graph`` whose output is attention weights, by op index.

    Strict, because a classifier's softmax or a mixture-of-experts gate shown as attention
    would be a wrong picture: a softmax is attention only where (1) it runs over the last
    axis of an output ``(..., L, S)``; (2) its input comes, through ops that keep each
    score in place (a scale, a bias or mask added, ``masked_fill``, ``where``, dropout,
    casts, reshapes that keep the query and key axes, transposes and permutes, which are
    followed), from a ``matmul``/``bmm``/``baddbmm``/``einsum`` of two tensors that both
    come from the model's input (q and kᵀ, in either order: ``(k @ qᵀ)ᵀ`` too; not a
    parameter, buffer or constant, as a gate's learned matrix is), which makes those
    ``L x S`` scores by contracting the channels; and (3) its output reaches, through
    dropout-like ops, reshapes, transposes and permutes, such a product with another
    tensor from the input (the values) that contracts its key axis (``w @ v``, ``vᵀ @ wᵀ``,
    an einsum). A gate's logits come from a linear layer or a parameter, a classifier's
    from a linear layer: neither is a product of two tensors from the input.

    What the output's leading axes hold (``folds``) is read from the trace: the reshapes,
    transposes and splits that made q from the input are followed back to it, so a factor
    of the channels moved before the tokens is heads, one of the token axes is windows and
    the input's batch axis is the batch, whatever the axes' sizes."""
    ops = graph.ops
    found: dict[int, SoftmaxAttention] = {}
    memo: dict[tuple[int, int], _Axes | None] = {}
    inputs: list[frozenset[int]] | None = None
    for op in ops:
        if op.kind != "op" or op.name != "softmax" or not op.outputs:
            continue
        shape = op.outputs[0].shape
        if len(shape) < 2 or _softmax_dim(op) not in (-1, len(shape) - 1):
            continue
        scores = _scores(ops, op, tuple(shape[-2:]))
        if scores is None:
            continue
        used = _values(ops, op, shape[-2], shape[-1])
        if used is None:
            continue
        s, (q, qa), (k, ka), path = scores
        if inputs is None:
            inputs = _inputs(ops)
        found[op.index] = SoftmaxAttention(
            op.index, s, used[0], q, qa, k, ka, used[1],
            folds=_folds(ops, s, path, memo),
            query_inputs=tuple(sorted(inputs[q.index])),
            key_inputs=tuple(sorted(inputs[k.index])),
        )  # fmt: skip
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


#: Ops that reorder axes: the scores and weights are followed through them by axis.
_PERMUTES = frozenset({"transpose", "swapaxes", "swapdims", "permute", "mT", "t", "movedim"})


def _perm(op: Op, ndim: int) -> list[int] | None:
    """The axes of a transpose or permute's input that its output's axes are, in order
    (output axis i is input axis ``perm[i]``); None where the call cannot be read."""
    name = op.name
    if name == "mT" or (name == "t" and ndim == 2):
        return [*range(ndim - 2), ndim - 1, ndim - 2]
    call = _call(op)
    if call is None or ndim < 1:
        return None
    out = list(range(ndim))
    if name in ("transpose", "swapaxes", "swapdims"):
        a, b = (
            call.get(n) for n in (("dim0", "dim1") if name == "transpose" else ("axis0", "axis1"))
        )
        if name == "swapdims":
            a, b = call.get("dim0", a), call.get("dim1", b)
        if not (isinstance(a, int) and isinstance(b, int)):
            return None
        a, b = a % ndim, b % ndim
        out[a], out[b] = out[b], out[a]
        return out
    if name == "movedim":
        src, dst = call.get("source"), call.get("destination")
        if not (isinstance(src, int) and isinstance(dst, int)):
            return None
        out.remove(src % ndim)
        out.insert(dst % ndim, src % ndim)
        return out
    dims = call.get("dims")
    if isinstance(dims, (tuple, list)) and len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    if not isinstance(dims, (tuple, list)) or len(dims) != ndim:
        return None
    if not all(isinstance(d, int) for d in dims):
        return None
    dims = [d % ndim for d in dims]
    return dims if sorted(dims) == out else None


def _keeps(shape_in: tuple[int, ...], shape_out: tuple[int, ...], *pos: int) -> bool:
    """Whether a reshape from ``shape_in`` to ``shape_out`` keeps the axes at negative
    positions ``pos`` as they are: the shapes agree from the first of them on."""
    m = min(pos)
    return len(shape_in) >= -m and len(shape_out) >= -m and shape_in[m:] == shape_out[m:]


#: A path of ops from the scores' product to the softmax: (an op's output, the input of
#: that op the scores came through), in the order they run (the product's nearest first).
_Path = tuple[tuple[OpRef, OpRef], ...]


def _scores(
    ops: list[Op], softmax: Op, ls: tuple[int, ...]
) -> tuple[int, tuple[OpRef, int], tuple[OpRef, int], _Path] | None:
    """The ``q kᵀ`` product the softmax's input comes from, with its query and key operands
    and their token axes, and the ops between; None where there is none. The query and
    key axes are followed by position through transposes and permutes."""
    L, S = ls
    first = next((r for r in softmax.args[:1] if type(r) is OpRef), None)
    if first is None:
        return None
    # (a tensor, where its query and key axes are (negative), the path to the softmax)
    todo: list[tuple[OpRef, int, int, _Path]] = [(first, -2, -1, ())]
    seen: set[tuple[int, int, int, int]] = set()
    while todo:
        ref, qp, kp, path = todo.pop()
        sh = _shape(ops, ref)
        key = (ref.index, ref.output, qp, kp)
        if key in seen or sh is None or len(sh) < max(-qp, -kp):
            continue
        if (sh[qp], sh[kp]) != (L, S) or len(path) > 32:
            continue
        seen.add(key)
        op = ops[ref.index]
        name = _name(op)
        if name in _PRODUCTS:
            hit = _product(ops, op, qp, kp, L, S)
            if hit is not None:
                return op.index, *hit, path
        elif name in _SCORE_STEPS:
            todo.extend((r, qp, kp, ((ref, r), *path)) for r in refs(op) if type(r) is OpRef)
        elif name in _RESHAPES:
            for r in refs(op):
                rs = _shape(ops, r)
                if type(r) is OpRef and rs is not None and _keeps(rs, sh, qp, kp):
                    todo.append((r, qp, kp, ((ref, r), *path)))
        elif name in _PERMUTES:
            src = next((r for r in refs(op) if type(r) is OpRef), None)
            perm = _perm(op, len(sh))
            if src is not None and perm is not None:
                n = len(sh)
                todo.append((src, perm[n + qp] - n, perm[n + kp] - n, ((ref, src), *path)))
    return None


def _product(
    ops: list[Op], op: Op, qp: int, kp: int, L: int, S: int
) -> tuple[tuple[OpRef, int], tuple[OpRef, int]] | None:
    """``op``'s query and key operands with their token axes where it makes the scores
    (query axis at ``qp``, key axis at ``kp`` of its output) from two tensors of the input,
    contracting their channels: ``q @ kᵀ``, or ``k @ qᵀ`` whose output is transposed after."""
    call = _call(op)
    if call is None:
        return None
    name = _name(op)
    if name == "einsum":
        parsed = _einsum(call)
        if parsed is None or len(parsed[1]) < max(-qp, -kp):
            return None
        subs, out, (a, b) = parsed
        ql, kl = out[qp], out[kp]
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
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2 or sa[-1] != sb[-2]:
        return None
    if not (_from_input(ops, a) and _from_input(ops, b)):
        return None
    if (qp, kp) == (-2, -1) and (sa[-2], sb[-1]) == (L, S):
        return (a, len(sa) - 2), (b, len(sb) - 1)  # type: ignore[return-value]
    if (qp, kp) == (-1, -2) and (sa[-2], sb[-1]) == (S, L):
        return (b, len(sb) - 1), (a, len(sa) - 2)  # type: ignore[return-value]
    return None


def _values(
    ops: list[Op], softmax: Op, queries: int, keys: int
) -> tuple[int, tuple[int, ...]] | None:
    """The product that takes the weights' sum of the values, contracting the key axis,
    and the ops on the way to it; None where none does. The query and key axes are
    followed by position through transposes and permutes."""
    # (op index, where its query and key axes are (negative), the ops passed)
    todo: list[tuple[int, int, int, tuple[int, ...]]] = [(softmax.index, -2, -1, ())]
    seen: set[tuple[int, int, int]] = set()
    while todo:
        i, qp, kp, path = todo.pop(0)
        if (i, qp, kp) in seen or len(path) > 8:
            continue
        seen.add((i, qp, kp))
        here = tuple(ops[i].outputs[0].shape)
        for c in ops[i].children:
            child = ops[c]
            if child.kind != "op" or not child.outputs:
                continue
            if not any(type(r) is OpRef and r.index == i for r in refs(child)):
                continue
            name = _name(child)
            if name in _PRODUCTS:
                if _contracts(ops, child, i, qp, kp, keys):
                    return child.index, path
                continue
            out = tuple(child.outputs[0].shape)
            if len(out) < max(-qp, -kp):
                continue
            if name in _WEIGHT_STEPS:
                if (out[qp], out[kp]) == (queries, keys):
                    todo.append((c, qp, kp, (*path, c)))
            elif name in _RESHAPES:
                if _keeps(here, out, qp, kp):
                    todo.append((c, qp, kp, (*path, c)))
            elif name in _PERMUTES:
                perm = _perm(child, len(here))
                if perm is not None and len(out) == len(here):
                    n = len(here)
                    todo.append((c, perm.index(n + qp) - n, perm.index(n + kp) - n, (*path, c)))
    return None


def _operands(call: dict[str, Any], name: str) -> tuple[Any, Any]:
    """The two matrices a ``matmul``, ``bmm`` or ``baddbmm`` call multiplies, bound by name."""
    if name == "baddbmm":
        return call.get("batch1"), call.get("batch2")
    return call.get("self", call.get("input")), call.get("other", call.get("mat2"))


def _contracts(ops: list[Op], op: Op, weights: int, qp: int, kp: int, keys: int) -> bool:
    """Whether product ``op`` contracts the weights' (output of op ``weights``) key axis
    (at ``kp``, the query axis at ``qp``) with a tensor from the input (the values):
    ``w @ v``, ``vᵀ @ wᵀ``, or an einsum summing over the key axis."""
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
        key = next((c for c in letters if _axis(w, c, len(sw)) == len(sw) + kp), None)
        return key is not None and key in other and key not in out
    a, b = _operands(call, name)
    sa, sb = _shape(ops, a), _shape(ops, b)
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return False
    if type(a) is OpRef and a.index == weights and (qp, kp) == (-2, -1):
        return _from_input(ops, b) and sb[-2] == keys
    if type(b) is OpRef and b.index == weights and (qp, kp) == (-1, -2):
        return _from_input(ops, a) and sa[-1] == keys
    return False


def _inputs(ops: list[Op]) -> list[frozenset[int]]:
    """Per op, the model inputs (op indices) its output is made from (ops are in the
    order they ran, so each op's arguments come before it)."""
    out: list[frozenset[int]] = []
    for op in ops:
        if op.kind == "input":
            out.append(frozenset({op.index}))
            continue
        got: set[int] = set()
        for r in refs(op):
            if type(r) is OpRef and r.index < len(out):
                got |= out[r.index]
        out.append(frozenset(got))
    return out


# What each axis of a tensor is made of, read back to the model's input: per axis, its
# factors in order (outer first), each (what, size, origin, stride): what = "batch",
# "tokens", "channels" or "?" (lurker cannot tell); origin = (op index, axis) where the
# factor's axis was made; stride = the product of the factors after it on that axis.
# Factors of size 1 are left out.
_Atom = tuple[str, int, tuple[int, int], int]
_Axes = list[list[_Atom]]
#: Ops that make channels on their last axis from their input's.
_CHANNEL_MAKERS = frozenset({"linear", "embedding", "bilinear"})
_CONVS = frozenset({"conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d",
                    "conv_transpose2d", "conv_transpose3d"})  # fmt: skip
_SPLITS = frozenset({"chunk", "split", "split_with_sizes", "tensor_split"})


def _new(kind: str, size: int, origin: tuple[int, int]) -> list[_Atom]:
    return [(kind, size, origin, 1)] if size != 1 else []


def _input_axes(op: Op) -> _Axes:
    """A model input's axes: batch first; token ids are tokens; a 4-D or 5-D float input
    channels then positions (an image, a clip); a 3-D one tokens then channels."""
    shape = tuple(op.outputs[0].shape) if op.outputs else ()
    n = len(shape)
    if n == 0:
        return []
    ints = (op.outputs[0].dtype or "").startswith(("int", "uint", "bool"))
    if ints:
        kinds = ["tokens"] * (n - 1)
    elif n >= 4:
        kinds = ["channels"] + ["tokens"] * (n - 2)
    elif n == 3:
        kinds = ["tokens", "channels"]
    else:
        kinds = ["channels"] * (n - 1)
    kinds = ["batch", *kinds]
    return [_new(k, shape[i], (op.index, i)) for i, k in enumerate(kinds)]


def _regroup(axes: _Axes, shape: tuple[int, ...]) -> _Axes | None:
    """The factors of ``axes`` regrouped as a row-major reshape to ``shape`` makes them:
    an axis split shares out its factors, outer first; None where the reshape mixes
    factors it cannot keep apart."""
    flat = [a for ax in axes for a in ax]
    out: _Axes = []
    i = 0
    for n in shape:
        group: list[_Atom] = []
        need = n
        while need > 1:
            if i >= len(flat):
                return None
            kind, size, origin, stride = flat[i]
            if size <= need:
                if need % size:
                    return None
                group.append(flat[i])
                need //= size
                i += 1
            else:
                if size % need:
                    return None
                group.append((kind, need, origin, stride * (size // need)))
                flat[i] = (kind, size // need, origin, stride)
                need = 1
        out.append(group)
    return out if i == len(flat) else None


def _pred(ops: list[Op], op: Op) -> OpRef | None:
    """The argument of ``op`` its output's axes are read from: its tensor argument from the
    input of the output's own shape, else its first from the input."""
    args = [r for r in refs(op) if type(r) is OpRef and _from_input(ops, r)]
    if not args:
        return None
    want = tuple(op.outputs[0].shape) if op.outputs else None
    return next((r for r in args if _shape(ops, r) == want), args[0])


def _step(ops: list[Op], ref: OpRef, pred: OpRef, axes: _Axes) -> _Axes | None:
    """The axes of ``ref`` (an op's output) from those of its argument ``pred``."""
    op = ops[ref.index]
    out = _shape(ops, ref)
    inp = _shape(ops, pred)
    if out is None or inp is None or len(axes) != len(inp):
        return None
    name = _name(op)
    origin = (op.index, 0)
    if name in _RESHAPES or name in ("view_as", "reshape_as"):
        return _regroup(axes, out)
    if name in _PERMUTES:
        perm = _perm(op, len(inp))
        return None if perm is None else [axes[p] for p in perm]
    call = _call(op) or {}
    if name in ("getitem", "select", "unbind"):
        dim = 0 if name == "getitem" else call.get("dim", 0)
        if name == "getitem" and type(call.get("index")) is not int:
            dim = None
        if isinstance(dim, int) and len(inp) == len(out) + 1:
            dim %= len(inp)
            if inp[:dim] + inp[dim + 1 :] == out:
                return axes[:dim] + axes[dim + 1 :]
        return _same_rank(axes, inp, out, op.index)
    if name in _SPLITS:
        dim = call.get("dim", 0)
        if isinstance(dim, int) and len(inp) == len(out):
            dim %= len(inp)
            kinds = {a[0] for a in axes[dim]}
            kind = kinds.pop() if len(kinds) == 1 else "?"
            return [
                a if d != dim else _new(kind, out[d], (op.index, d)) for d, a in enumerate(axes)
            ]
        return None
    if name in _CONVS and len(out) == len(inp) >= 3:
        return [
            axes[0] if out[0] == inp[0] else _new("?", out[0], origin),
            _new("channels", out[1], (op.index, 1)),
            *(_new("tokens", out[d], (op.index, d)) for d in range(2, len(out))),
        ]
    if name in _CHANNEL_MAKERS and out[:-1] == inp[: len(out) - 1]:
        return [*axes[: len(out) - 1], _new("channels", out[-1], (op.index, len(out) - 1))]
    return _same_rank(axes, inp, out, op.index)


def _same_rank(axes: _Axes, inp: tuple[int, ...], out: tuple[int, ...], index: int) -> _Axes | None:
    """An op keeping its input's axes (elementwise, a norm, a pad, a roll, a cat): an axis
    of the same size keeps its factors, one resized keeps its kind where it has one."""
    if len(inp) != len(out):
        return None
    res: _Axes = []
    for d, (a, n) in enumerate(zip(axes, out, strict=True)):
        if inp[d] == n:
            res.append(a)
        else:
            kinds = {x[0] for x in a}
            res.append(_new(kinds.pop() if len(kinds) == 1 else "?", n, (index, d)))
    return res


def _axes_of(ops: list[Op], ref: OpRef, memo: dict[tuple[int, int], _Axes | None]) -> _Axes | None:
    """What each axis of ``ref`` is made of, followed back along the ops to the input."""
    chain: list[tuple[OpRef, OpRef]] = []
    cur = ref
    while True:
        key = (cur.index, cur.output)
        if key in memo:
            axes = memo[key]
            break
        op = ops[cur.index]
        if op.kind == "input":
            axes = memo[key] = _input_axes(op)
            break
        pred = _pred(ops, op) if op.kind == "op" else None
        if pred is None or len(chain) > 100_000:
            axes = memo[key] = None
            break
        chain.append((cur, pred))
        cur = pred
    for r, pred in reversed(chain):
        axes = None if axes is None else _step(ops, r, pred, axes)
        memo[(r.index, r.output)] = axes
    return axes


def _folds(
    ops: list[Op], scores: int, path: _Path, memo: dict[tuple[int, int], _Axes | None]
) -> tuple[tuple[str, int], ...] | None:
    """What the softmax output's leading axes hold (see :class:`SoftmaxAttention`), from
    the axes of the scores' operands carried along ``path`` to the softmax."""
    op = ops[scores]
    call = _call(op)
    if call is None or not op.outputs:
        return None
    name = _name(op)
    out = tuple(op.outputs[0].shape)
    if name == "einsum":
        parsed = _einsum(call)
        if parsed is None or any("..." in s for s in (*parsed[0], parsed[1])):
            return None
        (sa, sb), letters, (a, b) = parsed
        xa, xb = _axes_of(ops, a, memo), _axes_of(ops, b, memo)
        if xa is None or xb is None:
            return None
        axes: _Axes | None = [xa[sa.index(c)] if c in sa else xb[sb.index(c)] for c in letters]
    else:
        a, b = _operands(call, name)
        if type(a) is not OpRef or type(b) is not OpRef:
            return None
        xa, xb = _axes_of(ops, a, memo), _axes_of(ops, b, memo)
        if xa is None or xb is None or len(xa) < 2 or len(xb) < 2:
            return None
        lead: _Axes = []
        for d in range(len(out) - 2, 0, -1):  # broadcast the leading axes, from the right
            fa = xa[-2 - d] if d <= len(xa) - 2 else []
            fb = xb[-2 - d] if d <= len(xb) - 2 else []
            na = 1 if not fa else _size(fa)
            lead.append(fa if na == out[-2 - d] else fb)
        axes = [*lead, xa[-2], xb[-1]]
    for ref, pred in path:
        if axes is None:
            return None
        axes = _step(ops, ref, pred, axes)
    if axes is None:
        return None
    kinds = {"batch": "batch", "channels": "heads", "tokens": "windows"}
    folds = [(kinds.get(a[0], "?"), a[1]) for ax in axes[:-2] for a in ax]
    return None if any(k == "?" for k, _ in folds) else tuple(folds)


def _size(atoms: list[_Atom]) -> int:
    n = 1
    for a in atoms:
        n *= a[1]
    return n
