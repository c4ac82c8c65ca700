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
    from .receptive import axis_permutation

    call = {} if op.name in ("mT", "t") else _call(op)
    return None if call is None else axis_permutation(op.name, call, ndim)


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


# Where each query and key token of a softmax's output lies on the image, per leading
# index: the patch boxes of the patch embedding carried element by element along the ops
# that made q and k (reshapes, permutes, a cyclic roll, padding, strided slices and the
# concatenation of patch merging, norms and linear layers), so a window folded into the
# batch axis is placed whatever the model's reshapes. A box is ``(y0, y1, x0, x1)`` in the
# input, half-open; ``-1`` in all four: no patch (padding, a class token).
_Boxes = Any  # np.ndarray of shape (*tensor shape, 4)
#: Ops that keep every element's position: its box is its argument's (broadcast to the
#: output's shape).
_KEEP_POSITION = _SCORE_STEPS | _WEIGHT_STEPS | frozenset({
    "gelu", "relu", "silu", "sigmoid", "softplus", "elu", "leaky_relu", "hardswish",
    "exp", "abs", "sqrt", "rsqrt", "pow", "batch_norm", "identity",
})  # fmt: skip
_NORMS = frozenset({"layer_norm", "rms_norm"})


@dataclass(frozen=True)
class TokenBoxes:
    """Each token's patch of the image for every leading index of a softmax's output."""

    #: ``(*leading, L, 4)``: query token l's box at each leading index of the softmax's
    #: output (its shape in the trace, batch included)
    queries: Any
    #: ``(*leading, S, 4)``: key token s's box likewise
    keys: Any
    #: the op whose output grid the boxes start from (the patch embedding)
    start: int
    #: the cyclic shifts (``roll`` ops) on the way from it to the query
    rolls: tuple[int, ...] = ()


def token_boxes(graph: Graph, found: SoftmaxAttention, rfs: dict[int, Any]) -> TokenBoxes | str:
    """Where each query and key token of attention ``found`` lies on the image, for every
    leading index (window, head) of its softmax's output, or why lurker cannot say.

    The boxes start at the patch embedding: the op nearest the query, on the ops that
    made it from the model's input, that is a convolution or pool whose receptive field
    (``rfs``, :func:`lurker.graph.receptive.receptive_fields`) keeps both image axes;
    each position of its output is its patch. From there each element's box is carried
    op by op, as the op moves elements: reshapes and permutes, ``roll`` (Swin's cyclic
    shift), padding (no patch), slicing and ``cat`` (patch merging: a merged token's box
    is the union of its parts'), norms and linear layers over the channels (the union over
    them), ops that keep each element in place; and from q and kᵀ through the scores'
    product and the ops between it and the softmax. An op that moves elements in any
    other way stops it, and is named."""
    import numpy as np

    ops = graph.ops
    chain = _chain(ops, found.query)
    start = next(
        (
            r.index
            for r in chain
            if _name(ops[r.index]) in _CONVS | _POOLS
            and r.output == 0
            and (rf := rfs.get(r.index)) is not None
            and rf.y.dim is not None
            and rf.x.dim is not None
            and rf.y.dim != rf.x.dim
        ),
        None,
    )
    if start is None:
        return (
            "lurker found no patch embedding (a convolution that keeps the image's two axes) "
            "on the ops that made its query from the input"
        )
    rf = rfs[start]
    shape = tuple(ops[start].outputs[0].shape)
    ya, xa = rf.y.dim, rf.x.dim
    # int32 pixel coordinates: a box array per op carried, (*shape, 4), is held until the
    # softmax, so half of int64's memory on a large model's early stages counts
    lo_y, hi_y = (np.asarray(v, dtype=np.int32) for v in (rf.y.lo, rf.y.hi))
    lo_x, hi_x = (np.asarray(v, dtype=np.int32) for v in (rf.x.lo, rf.x.hi))
    if len(lo_y) != shape[ya] or len(lo_x) != shape[xa]:
        return f"the receptive field of {ops[start].label} does not match its grid"

    def along(v: Any, axis: int) -> Any:
        sh = [1] * len(shape)
        sh[axis] = len(v)
        return np.broadcast_to(v.reshape(sh), shape)

    base = np.stack([along(lo_y, ya), along(hi_y, ya), along(lo_x, xa), along(hi_x, xa)], -1)
    memo: dict[tuple[int, int], _Boxes | str] = {(start, 0): base}
    rolls: list[int] = []
    q = _carry(ops, found.query, memo, rolls)
    k = _carry(ops, found.key, memo, rolls)
    for got in (q, k):
        if isinstance(got, str):
            return got
    at = _at_scores(ops, found, q, k)
    if isinstance(at, str):
        return at
    qb, kb = at
    for ref, pred in _score_path(ops, found):
        qb, kb = _move(ops, ref, pred, qb), _move(ops, ref, pred, kb)
        if isinstance(qb, str) or isinstance(kb, str):
            return qb if isinstance(qb, str) else kb  # type: ignore[return-value]
    sm = tuple(ops[found.softmax].outputs[0].shape)
    if qb.shape[:-1] != sm or kb.shape[:-1] != sm:
        return "lurker could not carry the tokens' boxes to the softmax's output"
    # a query's box is one across its keys, a key's across its queries
    if not ((qb == qb[..., :1, :]).all() and (kb == kb[..., :1, :, :]).all()):
        return "the boxes lurker carried differ along the other token axis"
    return TokenBoxes(qb[..., 0, :], kb[..., 0, :, :], start, tuple(sorted(set(rolls))))


_POOLS = frozenset({"max_pool2d", "avg_pool2d", "max_pool3d", "avg_pool3d"})


def _chain(ops: list[Op], ref: OpRef) -> list[OpRef]:
    """The outputs from ``ref`` back to the model's input along :func:`_pred`, nearest first."""
    out: list[OpRef] = []
    cur: OpRef | None = ref
    while cur is not None and len(out) < 1_000_000:
        out.append(cur)
        op = ops[cur.index]
        cur = _pred(ops, op) if op.kind == "op" else None
    return out


def _needs(ops: list[Op], ref: OpRef) -> list[OpRef] | str:
    """The outputs whose boxes make ``ref``'s: the parts of a cat or stack that come from
    the input, else the one argument its elements come from (:func:`_pred`)."""
    op = ops[ref.index]
    if op.kind != "op":
        return f"the tokens come from {op.label}, not from the patch embedding"
    if _name(op) in ("cat", "concat", "concatenate", "stack"):
        call = _call(op) or {}
        parts = call.get("tensors")
        if isinstance(parts, (list, tuple)):
            return [r for r in parts if _from_input(ops, r)]
    pred = _pred(ops, op)
    if pred is None:
        return f"{op.label} ({op.name}) is made from no tensor of the input"
    return [pred]


def _carry(
    ops: list[Op], target: OpRef, memo: dict[tuple[int, int], _Boxes | str], rolls: list[int]
) -> _Boxes | str:
    """The boxes of ``target``'s elements, from those in ``memo`` (the patch embedding's)."""
    todo = [target]
    while todo:
        ref = todo[-1]
        key = (ref.index, ref.output)
        if key in memo:
            todo.pop()
            continue
        needs = _needs(ops, ref)
        if isinstance(needs, str):
            memo[key] = needs
            todo.pop()
            continue
        missing = [r for r in needs if (r.index, r.output) not in memo]
        if missing:
            todo.extend(missing)
            continue
        todo.pop()
        got = [memo[(r.index, r.output)] for r in needs]
        bad = next((g for g in got if isinstance(g, str)), None)
        if bad is not None:
            memo[key] = bad
        elif len(needs) == 1 and _name(ops[ref.index]) not in (
            "cat",
            "concat",
            "concatenate",
            "stack",
        ):
            memo[key] = _move(ops, ref, needs[0], got[0])
            if _name(ops[ref.index]) == "roll":
                rolls.append(ref.index)
        else:
            memo[key] = _joined(ops, ref, got)
    return memo[(target.index, target.output)]


def _union(b: _Boxes, axes: tuple[int, ...]) -> _Boxes:
    """The smallest box holding the boxes of ``b`` over tensor ``axes`` (kept, size 1);
    elements with no patch are left out (none left: no patch)."""
    import numpy as np

    valid = b[..., 0] >= 0
    big = np.iinfo(np.int32).max
    lo = np.where(valid[..., None], b, big)[..., [0, 2]].min(axes, keepdims=True)
    hi = np.where(valid[..., None], b, -1)[..., [1, 3]].max(axes, keepdims=True)
    out = np.stack([lo[..., 0], hi[..., 0], lo[..., 1], hi[..., 1]], -1)
    return np.where(valid.any(axes, keepdims=True)[..., None], out, -1)


def _move(ops: list[Op], ref: OpRef, pred: OpRef, b: _Boxes) -> _Boxes | str:
    """The boxes of op output ``ref``'s elements from those of its argument ``pred``."""
    import numpy as np

    op = ops[ref.index]
    out, inp = _shape(ops, ref), _shape(ops, pred)
    if out is None or inp is None or b.shape[:-1] != inp:
        return f"lurker cannot follow the tokens through {op.label} ({op.name})"
    name = _name(op)
    why = f"lurker cannot follow the tokens through {op.label} ({op.name})"
    call = _call(op) or {}
    n = len(inp)
    try:
        if name in _RESHAPES or name in ("view_as", "reshape_as"):
            return b.reshape(*out, 4)
        if name in _PERMUTES:
            perm = _perm(op, n)
            return why if perm is None else b.transpose(*perm, n)
        if name in _KEEP_POSITION and out == inp:
            return b
        if name in _KEEP_POSITION:  # a binary op broadcasting its argument
            return np.broadcast_to(b, (*out, 4))
        if name in _NORMS:
            ns = call.get("normalized_shape")
            k = len(ns) if isinstance(ns, (tuple, list)) else 1
            return np.broadcast_to(_union(b, tuple(range(n - k, n))), b.shape)
        if name in _CHANNEL_MAKERS and name != "embedding":
            return np.broadcast_to(_union(b, (n - 1,)), (*out, 4))
        if name == "roll":
            shifts, dims = call.get("shifts"), call.get("dims")
            if dims is None or dims == ():
                flat = np.roll(b.reshape(-1, 4), shifts, axis=0)
                return flat.reshape(b.shape)
            return np.roll(
                b,
                shifts,
                axis=tuple(d % n for d in dims) if isinstance(dims, (tuple, list)) else dims % n,
            )
        if name in ("pad", "constant_pad_nd"):
            pad = call.get("pad")
            mode = call.get("mode", "constant")
            if mode != "constant" or not isinstance(pad, (tuple, list)):
                return why + f": padding of mode {mode!r}"
            width = [(0, 0)] * (n + 1)
            for i in range(len(pad) // 2):
                width[n - 1 - i] = (pad[2 * i], pad[2 * i + 1])
            crop = tuple(
                slice(max(-a, 0), b.shape[d] - max(-z, 0)) for d, (a, z) in enumerate(width)
            )
            width = [(max(a, 0), max(z, 0)) for a, z in width]
            return np.pad(b[crop], width, constant_values=-1)
        if name == "getitem":
            idx = call.get("index")
            idx = idx if isinstance(idx, tuple) else (idx,)
            if not all(i is None or i is Ellipsis or type(i) in (int, slice) for i in idx):
                return why + ": an index that is a tensor or a list"
            if any(
                type(i) is slice
                and not all(type(v) in (int, type(None)) for v in (i.start, i.stop, i.step))
                for i in idx
            ):
                return why
            return b[(*idx, slice(None)) if Ellipsis in idx else (*idx, Ellipsis, slice(None))]
        if name == "select":
            dim, index = call.get("dim"), call.get("index")
            if isinstance(dim, int) and isinstance(index, int):
                return np.take(b, index, axis=dim % n)
        if name == "unbind":
            dim = call.get("dim", 0)
            if isinstance(dim, int):
                return np.take(b, ref.output, axis=dim % n)
        if name in _SPLITS:
            dim = call.get("dim", 0)
            if isinstance(dim, int):
                dim %= n
                sizes = [o.shape[dim] for o in op.outputs]
                at = sum(sizes[: ref.output])
                return np.take(b, range(at, at + sizes[ref.output]), axis=dim)
    except (ValueError, IndexError, TypeError):
        return why
    return why


def _joined(ops: list[Op], ref: OpRef, parts: list[_Boxes]) -> _Boxes | str:
    """The boxes of a ``cat`` or ``stack`` (parts not from the input: no patch)."""
    import numpy as np

    op = ops[ref.index]
    call = _call(op) or {}
    tensors = call.get("tensors")
    dim = call.get("dim", 0)
    out = _shape(ops, ref)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or out is None:
        return f"lurker cannot follow the tokens through {op.label} ({op.name})"
    it = iter(parts)
    full = []
    for r in tensors:
        sh = _shape(ops, r)
        if sh is None:
            return f"lurker cannot follow the tokens through {op.label} ({op.name})"
        full.append(next(it) if _from_input(ops, r) else np.full((*sh, 4), -1, np.int32))
    try:
        if _name(op) == "stack":
            got = np.stack(full, axis=dim % (len(out)))
        else:
            got = np.concatenate(full, axis=dim % len(out))
    except ValueError:
        return f"lurker cannot follow the tokens through {op.label} ({op.name})"
    return got if got.shape[:-1] == out else f"lurker cannot follow the tokens through {op.label}"


def _at_scores(
    ops: list[Op], found: SoftmaxAttention, q: _Boxes, k: _Boxes
) -> tuple[_Boxes, _Boxes] | str:
    """The query's and the key's boxes at every element of the scores' product's output:
    each operand's boxes joined over the axes the product contracts, placed on the axis
    its tokens take in the output and broadcast along the others."""
    import numpy as np

    op = ops[found.scores]
    out = tuple(op.outputs[0].shape)
    call = _call(op) or {}
    name = _name(op)
    placed = []
    if name == "einsum":
        parsed = _einsum(call)
        if parsed is None or any("..." in s for s in (*parsed[0], parsed[1])):
            return f"lurker cannot place the tokens through {op.label} (einsum)"
        subs, letters, operands = parsed
        for b, ref in ((q, found.query), (k, found.key)):
            sub = subs[0] if operands[0] == ref else subs[1]
            gone = tuple(i for i, c in enumerate(sub) if c not in letters)
            b = _union(b, gone) if gone else b
            keep = [c for c in sub if c in letters]
            b = b.reshape(*(b.shape[i] for i, c in enumerate(sub) if c in letters), 4)
            order = [keep.index(c) if c in keep else None for c in letters]
            axes = [i for i in order if i is not None]
            b = b.transpose(*axes, len(axes))
            sh = [b.shape[axes.index(i)] if i is not None else 1 for i in order]
            placed.append(np.broadcast_to(b.reshape(*sh, 4), (*out, 4)))
    else:
        a, _ = _operands(call, name)
        for b, ref in ((q, found.query), (k, found.key)):
            first = ref == a
            ax = b.ndim - 2  # the tensor's last axis
            # contract E: operand a's tokens are then the output's axis -2, b's its axis -1
            b = _union(b, (ax,) if first else (ax - 1,))
            try:
                placed.append(np.broadcast_to(b, (*out, 4)))
            except ValueError:
                return f"lurker cannot place the tokens through {op.label} ({op.name})"
    return placed[0], placed[1]


def _score_path(ops: list[Op], found: SoftmaxAttention) -> list[tuple[OpRef, OpRef]]:
    """The ops from the scores' product to the softmax, as (output, its argument) pairs."""
    sm = ops[found.softmax]
    got = _scores(ops, sm, tuple(sm.outputs[0].shape[-2:]))
    return [] if got is None else list(got[3])
