"""Where a forward first made NaN or inf: counted from the saved activations on request.

Nothing here runs while recording: the counts are reductions over tensors the trace
already holds, paid only by the caller who asks (``Trace.nonfinite``,
``Trace.first_nonfinite``), so the trace's hot path is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import LurkerError

if TYPE_CHECKING:
    from ..graph import Op
    from .trace import Trace


@dataclass(frozen=True)
class NonFiniteCount:
    """How many elements of an op's saved outputs are NaN, +inf and -inf, of ``numel``."""

    nan: int
    posinf: int
    neginf: int
    numel: int

    @property
    def total(self) -> int:
        return self.nan + self.posinf + self.neginf

    def __str__(self) -> str:
        parts = [
            f"{n:,} {what}"
            for n, what in ((self.nan, "NaN"), (self.posinf, "+inf"), (self.neginf, "-inf"))
            if n
        ]
        return f"{', '.join(parts) or 'no non-finite value'} of {self.numel:,}"


@dataclass(frozen=True)
class FirstNonFinite:
    """The first op, in execution order, whose saved output holds NaN or ±inf.

    ``inputs`` are its parent ops (finite where saved: they ran before it), each with the
    range of its saved value, which is usually what explains the op (a 0 divisor, a
    negative under a square root); ``params`` the parameters it used that are themselves
    not finite; ``unchecked`` the ops before it whose activation was not saved, any of
    which may have made the value first (trace with ``save="all"`` to check them).
    """

    op: Op
    count: NonFiniteCount
    inputs: tuple[tuple[str, float | None, float | None], ...]  # label, min, max
    params: tuple[str, ...]
    unchecked: tuple[str, ...]

    def __str__(self) -> str:
        op = self.op
        where = f" in module '{op.module}'" if op.module else ""
        src = f" at {op.source}" if op.source else ""
        head = f"{op.label} ({op.target or op.kind}){where}{src} made {self.count}"
        if op.kind == "input":
            return f"{head}: the model's input is not finite."
        ins = ", ".join(
            f"{label} (min {lo:.4g}, max {hi:.4g})" if lo is not None and hi is not None else label
            for label, lo, hi in self.inputs
        )
        checked = not any(label in self.unchecked for label, _, _ in self.inputs)
        finite = "finite " if checked else ""
        text = f"{head}, from {finite}inputs {ins}" if ins else head
        if self.params:
            text += f"; its parameters {', '.join(self.params)} are not finite"
        text += _overflow_note(op.dtype, self.count, checked and bool(ins))
        if self.unchecked:
            shown = ", ".join(self.unchecked[:5]) + (", ..." if len(self.unchecked) > 5 else "")
            text += (
                f". {len(self.unchecked)} earlier ops were not saved ({shown}) and may have "
                "made it first: trace with save='all' to check them"
            )
        return text + "."


#: half-precision dtypes, by the name ``Op.dtype`` gives, and their largest finite value
_HALF_MAX = {"float16": "65504", "bfloat16": "3.39e38"}


def _overflow_note(dtype: str | None, count: NonFiniteCount, finite_inputs: bool) -> str:
    """Where a half-precision op made ±inf from finite inputs, the dtype's largest value:
    the usual cause (a square or an exp past float16's 65504, in ``E[x²] - E[x]²`` say),
    which the inputs' ranges alone do not say to a reader who does not know it. Stated
    as a fact, not as the cause: ``log(0)`` is -inf in any dtype."""
    top = _HALF_MAX.get(dtype or "")
    if top is None or not finite_inputs or not (count.posinf or count.neginf):
        return ""
    return (
        f" ({dtype}'s largest finite value is {top}: a larger result overflows to inf, "
        "where float32 would hold it)"
    )


#: ops that write an attention mask's -inf (``att.masked_fill(mask, -inf)``, ``torch.where``,
#: a mask made by ``torch.full(..., -inf).triu(1)`` and added to the scores)
_MASKING = frozenset(
    {"masked_fill", "masked_fill_", "where", "full", "full_like", "new_full", "fill_",
     "triu", "tril", "triu_", "tril_", "add", "add_", "sub", "sub_", "setitem",
     "index_put", "index_put_", "masked_scatter"}
)  # fmt: skip
#: of those, the ones that write no -inf of their own: from finite inputs, their -inf is an
#: overflow (a float16 ``scores - 70000``), not a mask; a mask's reaches them from a parent
_PASSING = frozenset(
    {"triu", "tril", "triu_", "tril_", "add", "add_", "sub", "sub_"}
)  # fmt: skip
#: ops that carry a mask's -inf to the softmax unchanged in kind (shape and type changes)
_CARRY = frozenset(
    {"view", "reshape", "transpose", "permute", "contiguous", "expand", "expand_as",
     "unsqueeze", "squeeze", "getitem", "to", "float", "half", "bfloat16", "type",
     "type_as", "clone", "dropout", "narrow", "repeat", "flatten", "unflatten", "__getitem__"}
)  # fmt: skip
#: recorded calls (``generated``: a tensor made from no tensor, ``torch.full``)
_MADE = frozenset({"op", "generated"})
#: a softmax turns -inf into 0 (a row of only -inf into NaN, which it then holds)
_SOFTMAX = frozenset({"softmax", "_softmax"})


@dataclass(frozen=True)
class MaskedInf:
    """-inf written by design, an attention mask's: ``op`` made it (a ``masked_fill``, a
    ``where``, a mask added to the scores) and it reached only ``softmaxes``, whose outputs
    are finite (``exp(-inf)`` is 0: the masked keys get no weight). ``through`` are the ops
    that carried it there; none of them is a non-finite problem."""

    op: Op
    count: NonFiniteCount
    softmaxes: tuple[str, ...]
    through: tuple[str, ...]

    def __str__(self) -> str:
        return f"-inf from {self.op.label}, an attention mask, made finite by {', '.join(self.softmaxes)}"


def _only_neginf(value: Any) -> bool:
    c = count(value)
    return c.total > 0 and c.nan == 0 and c.posinf == 0


def _to_softmax(tr: Trace, op: Op) -> tuple[list[int], list[int]] | None:
    """The softmaxes ``op``'s -inf reaches and the ops that carry it there, or None where
    it reaches anything else (a value the model keeps, an op not saved, a softmax that is
    not finite): then it is not a mask's by design."""
    softmaxes: list[int] = []
    through: list[int] = []
    todo, seen = [op.index], {op.index}
    while todo:
        node = tr.ops[todo.pop()]
        if not node.children:
            return None
        for c in node.children:
            child = tr.ops[c]
            if c in seen:
                continue
            seen.add(c)
            if child.kind not in _MADE or child.activation is None:
                return None
            if child.name in _SOFTMAX:
                if not _finite(child.activation):
                    return None
                softmaxes.append(c)
            elif child.name in _MASKING | _CARRY and _only_neginf(child.activation):
                through.append(c)
                todo.append(c)
            else:
                return None
    return (softmaxes, through) if softmaxes else None


def masked_infs(tr: Trace) -> list[MaskedInf]:
    """Every attention mask's -inf that only a softmax read, in execution order."""
    _require_saved(tr)
    return _masks(tr)[0]


def _neginf_in(tr: Trace, op: Op) -> bool:
    """Whether a parent of ``op`` (a saved value: a buffer, a constant, an op) holds -inf,
    which ``op`` then passes on; an unsaved parent cannot say, so it does not count."""
    for p in op.parents:
        value = tr.ops[p].activation
        if value is not None and count(value).neginf:
            return True
    return False


def _masks(tr: Trace) -> tuple[list[MaskedInf], set[int]]:
    found: list[MaskedInf] = []
    absorbed: set[int] = set()
    for op in tr.ops:
        if (
            op.index in absorbed
            or op.kind not in _MADE
            or op.name not in _MASKING
            or op.activation is None
            or not _only_neginf(op.activation)
            or (op.name in _PASSING and not _neginf_in(tr, op))
        ):
            continue
        reach = _to_softmax(tr, op)
        if reach is None:
            continue
        softmaxes, through = reach
        absorbed |= {op.index, *through}
        found.append(
            MaskedInf(
                op,
                count(op.activation),
                tuple(tr.ops[i].label for i in sorted(softmaxes)),
                tuple(tr.ops[i].label for i in sorted(through)),
            )
        )
    return found, absorbed


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _floating(t: Tensor) -> Tensor | None:
    """The tensor as real floats, or None where it cannot hold a non-finite value."""
    if t.is_complex():
        return torch.view_as_real(t.detach())
    return t.detach() if t.is_floating_point() else None


def count(value: Any) -> NonFiniteCount:
    """NaN, +inf and -inf counts over every floating tensor of a saved value."""
    nan = posinf = neginf = numel = 0
    for t in _tensors(value):
        numel += t.numel()
        f = _floating(t)
        if f is None or f.numel() == 0 or bool(f.isfinite().all()):
            continue
        nan += int(f.isnan().sum())
        posinf += int(f.isposinf().sum())
        neginf += int(f.isneginf().sum())
    return NonFiniteCount(nan, posinf, neginf, numel)


def _finite(value: Any) -> bool:
    for t in _tensors(value):
        f = _floating(t)
        if f is not None and f.numel() and not bool(f.isfinite().all()):
            return False
    return True


def _range(value: Any) -> tuple[float | None, float | None]:
    fs = [f for t in _tensors(value) if (f := _floating(t)) is not None and f.numel()]
    if not fs:
        return None, None
    return min(float(f.min()) for f in fs), max(float(f.max()) for f in fs)


def nonfinite(tr: Trace) -> dict[str, NonFiniteCount]:
    _require_saved(tr)
    out: dict[str, NonFiniteCount] = {}
    for op in tr.ops:
        if op.activation is not None and not _finite(op.activation):
            out[op.label] = count(op.activation)
    return out


def first_nonfinite(tr: Trace) -> FirstNonFinite | None:
    _require_saved(tr)
    unchecked: list[str] = []
    masked = _masks(tr)[1]  # an attention mask's -inf, which a softmax makes 0: by design
    for op in tr.ops:
        if op.index in masked:
            continue
        if op.activation is None:
            if op.kind not in ("output", "constant", "readout"):
                unchecked.append(op.label)
            continue
        if _finite(op.activation):
            continue
        inputs = tuple((tr.ops[i].label, *_range(tr.ops[i].activation)) for i in op.parents)
        params = tuple(
            p.name for p in op.params if tr.model is not None and not _finite(_param(tr, p.name))
        )
        return FirstNonFinite(op, count(op.activation), inputs, params, tuple(unchecked))
    if not _finite(tr.output):
        raise LurkerError(
            "The model's output is not finite, but no saved activation is: the op that made "
            f"the first NaN or inf was not saved ({len(unchecked)} ops were not). Trace with "
            "save='all' (the default) to find it."
        )
    return None


def _param(tr: Trace, name: str) -> Any:
    assert tr.model is not None
    try:
        return tr.model.get_parameter(name)
    except AttributeError:
        return None


def _require_saved(tr: Trace) -> None:
    if not any(op.activation is not None for op in tr.ops):
        raise LurkerError(
            "This trace saved no activations (save='none', or save= names that matched no op), so it cannot tell where a NaN "
            "or inf was made. Trace with save='all' (the default), or save= the ops to check."
        )
