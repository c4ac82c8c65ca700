"""``Trace.validate``: prove that what a trace saved is what the model computed.

Each op is re-executed from the saved activations of its parents (and the model's
parameters), under the autocast, grad mode and RNG state it ran in, and its result
compared with its own saved activation; then the model is run once more without tracing,
from the state the traced forward started in (RNG, autocast, grad mode, buffers and
attributes the forward reassigned), and its output compared with the traced one.
A mismatch raises :class:`~lurker.errors.ValidationError` naming the op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import ValidationError, first_three
from ..ops import torch_funcs as _funcs
from . import _context
from ._tree import paths, refill

if TYPE_CHECKING:
    from .trace import Trace


@dataclass
class ValidationReport:
    """What was checked. ``skipped`` maps op label -> why it could not be re-executed."""

    checked: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    output_checked: bool = False
    # why the output was not compared with an untraced forward (None: it was, or the
    # ops check failed first)
    output_skipped: str | None = None
    # what the model changed in itself during the traced forward (reassigned buffers or
    # attributes, caches filled, buffers updated in place); the untraced forward the
    # output is compared with starts from the state before those changes
    state_changes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        s = f"{self.checked} ops re-executed and matched"
        if self.output_checked:
            s += "; traced output equals an untraced forward"
            if self.state_changes:
                s += " from the same starting state"
        elif self.output_skipped:
            s += f"; output not compared with an untraced forward ({self.output_skipped})"
        if self.skipped:
            s += f"; {len(self.skipped)} skipped ({', '.join(sorted(set(self.skipped.values())))})"
        if self.state_changes:
            more = len(self.state_changes) - 3
            s += "; the model changed its own state in forward: " + ", ".join(
                self.state_changes[:3]
            )
            s += f" and {more} more" if more > 0 else ""
        return s


def _close(a: Any, b: Any, rtol: float, atol: float) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.device == b.device and torch.equal(a, b):
            # the common case (a deterministic op re-run on the same inputs), in one pass:
            # allclose makes about ten, which cost more than re-running the op
            return True
        if a.dtype.is_floating_point or a.dtype.is_complex:
            return torch.allclose(a, b.to(a.device), rtol=rtol, atol=atol, equal_nan=True)
        return torch.equal(a, b.to(a.device))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b))
    return a == b


def _first_diff(a: Any, b: Any, rtol: float = 0.0, atol: float = 0.0) -> str:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape:
            return f"shape {tuple(b.shape)} vs saved {tuple(a.shape)}"
        if a.dtype.is_floating_point:
            return (
                f"max abs difference {(a.float() - b.float().to(a.device)).abs().max().item():.3g}"
            )
        return "values differ"
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        # an op of several outputs (lstm, max(x, dim)): the first that differs, described
        # as one tensor is, not the reprs of them all
        if len(a) != len(b):
            return f"{len(b)} outputs vs saved {len(a)}"
        for k, (x, y) in enumerate(zip(a, b)):
            if not _close(x, y, rtol, atol):
                return f"output {k}: {_first_diff(x, y)}"
    return f"{b!r} vs saved {a!r}"


def validate(trace: Trace, *, rtol: float, atol: float) -> ValidationReport:
    if not trace.complete:
        raise ValidationError(
            "This trace is partial (the forward pass failed); nothing to validate."
        )
    if getattr(trace, "_transform", None) is not None:
        raise ValidationError(
            "This trace saved transformed activations (transform=...), which cannot be "
            "compared with re-executed ops. Trace without transform to validate."
        )
    report = ValidationReport()
    params = dict(trace.model.named_parameters()) if trace.model is not None else {}
    written = getattr(trace, "_param_writes", None) or {}
    # parameters whose storage the forward replaced (p.data = ...): name -> [the value
    # going in, the value now, whether an op has read the new one yet]
    # (only those the recorder did not see replaced: it kept when, in `written`)
    seen = getattr(trace, "_params_replaced", None) or {}
    swapped = {
        n: [old, params[n], False]
        for n, old in (getattr(trace, "_param_replaced", None) or {}).items()
        if n in params and n not in seen
    }
    ops = trace.ops
    stale_by = getattr(trace, "_stale_by", None) or {}
    with _context.applied(None):  # ops that ran in the default state: no autocast, no grad
        for op in ops:
            if op.stale:  # an input or buffer too: the ops that read it would be blamed
                _refuse_stale(op, ops, stale_by.get(op.index))
            if op.kind in ("input", "buffer", "constant", "output", "readout"):
                continue
            if op.activation is None:
                report.skipped[op.label] = "not saved"
                continue
            skip = _skip_reason(op)
            if skip is not None:
                report.skipped[op.label] = skip
                continue
            values: list[Any] = []
            missing = None
            snaps = op._snapshots or {}
            for j, (src, what) in enumerate(op._inputs):
                if j in snaps:
                    values.append(snaps[j])
                    continue
                if src < 0:
                    values.append(_param_read(params, written, what, op.index))
                    continue
                a = ops[src].activation
                if a is None:
                    missing = ops[src].label
                    break
                values.append(a[what] if isinstance(a, tuple) else a)
            if missing is not None or op._skel_args is None:
                report.skipped[op.label] = "input not saved"
                continue
            result = _execute(op, values)
            if swapped and not _close(op.activation, result, rtol, atol):
                result = _swapped_read(op, values, swapped, params, written, rtol, atol)
            if not _close(op.activation, result, rtol, atol):
                ctx = op._ctx
                if (
                    ctx is not None
                    and ctx.rng is not None
                    and not _close(result, _execute(op, values), rtol, atol)
                ):
                    # another result from the same values and RNG state: a kernel that
                    # does not draw its random numbers reproducibly cannot be checked
                    report.skipped[op.label] = "random (not reproducible from its RNG state)"
                    continue
                how = f" {_context.describe(ctx)}" if ctx is not None else ""
                raise ValidationError(
                    f"Saved activation of {op.label} ({op.name}{_where(op)}) does not match a "
                    f"re-execution from its saved inputs{how}: "
                    f"{_first_diff(op.activation, result, rtol, atol)}."
                    f"{_params_now(op, swapped, written)}",
                    op=op.label,
                )
            report.checked += 1
    no_check = getattr(trace, "_no_output_check", None)
    if no_check:
        report.state_changes = trace.state_changes
        report.output_skipped = no_check
        return report
    report.state_changes = _check_output(trace, rtol, atol)
    report.output_checked = True
    return report


def _refuse_stale(op: Any, ops: list[Any], writer: int | None) -> None:
    """``op``'s saved value was written in place by an op not known to write it: it holds
    the value after that write, not the one the ops before it read. Names the writer."""
    if writer is None or writer >= len(ops):
        raise ValidationError(
            f"{op.label} ({op.name}): its saved value was modified in place by a later op "
            "that lurker did not recognise as in-place. Please report this op.",
            op=op.label,
        )
    w = ops[writer]
    raise ValidationError(
        f"{w.label} ({w.name}{_where(w)}) wrote in place into the saved value of {op.label} "
        f"({op.name}), which lurker did not know it writes, so the trace holds the value "
        f"after the write, not the one ops before it read. If {w.name} is your operator, "
        "declare what it writes in its schema (torch.library.custom_op(..., "
        "mutates_args=(...)), or Tensor(a!) in a torch.library definition) and trace again; "
        "else please report this op.",
        op=w.label,
    )


def _swapped_read(
    op: Any,
    values: list[Any],
    swapped: dict[str, list[Any]],
    params: dict[str, Tensor],
    written: dict[str, list[tuple[int, Tensor]]],
    rtol: float,
    atol: float,
) -> Any:
    """Re-execute ``op``, which did not match on the values its parameters hold now, on
    the values they held before the forward replaced their storage (``p.data = ...``,
    which no op records, so when is not known): the ops before the replacement read the
    old value, those after it the new one. So each replaced parameter is read as it was
    going in until an op matches only on its new value, and as it is now from then on."""
    names = [what for src, what in op._inputs if src < 0]
    mine = [n for n in dict.fromkeys(names) if n in swapped and not swapped[n][2]]
    if not mine:
        return _execute(op, values)
    old = [
        swapped[what][0] if src < 0 and what in mine else v
        for (src, what), v in zip(op._inputs, values)
    ]
    result = _execute(op, old)
    if _close(op.activation, result, rtol, atol):
        return result
    result = _execute(op, values)
    if _close(op.activation, result, rtol, atol):
        for n in mine:  # past the replacement: later ops read the new value
            swapped[n][2] = True
    return result


def _param_read(
    params: dict[str, Tensor], written: dict[str, list[tuple[int, Tensor]]], name: str, at: int
) -> Tensor:
    """The value parameter ``name`` held when op ``at`` read it: the forward may have
    written into it in place since (an EMA codebook update under ``no_grad``), and then
    the value before the next write at or after that op; else the parameter as it is."""
    for index, before in written.get(name, ()):
        if index >= at:
            return before
    return params[name]


def _params_now(
    op: Any, swapped: dict[str, list[Any]] | None = None, written: dict[str, Any] | None = None
) -> str:
    """A note for a mismatch of an op that reads parameters: the re-execution reads them
    as they are now, and weights changed since the trace (training) are the usual cause;
    or, for those the forward itself changed, as they were when the op ran."""
    read = list(dict.fromkeys(what for src, what in op._inputs if src < 0))
    if not read:
        return ""
    mine = [n for n in read if swapped and n in swapped]
    kept = [n for n in read if written and n in written]
    if kept and not mine:
        return (
            f" It reads {first_three(kept)}, which the traced forward updated in place or "
            "replaced (p.data = ...): it was re-executed on the value they held when it ran, "
            "kept by the trace."
        )
    if mine:
        return (
            f" It reads {first_three(mine)}, whose storage the traced forward replaced "
            "(p.data = ...): it was re-executed on the value going in and on the value "
            "after, and matched neither (a parameter replaced more than once in one "
            "forward leaves values between that the trace does not keep)."
        )
    return (
        f" It reads the model's parameters as they are now ({first_three(read)}): "
        "if they changed since the trace (an optimizer step, load_state_dict), trace the "
        "model again."
    )


def _not_reexecutable(op: Any) -> str | None:
    try:
        return _funcs.NOT_REEXECUTABLE.get(op._func)
    except TypeError:  # an unhashable callable
        return None


def _skip_reason(op: Any) -> str | None:
    """Why an op cannot be re-executed and compared, or None if it can."""
    reason = _not_reexecutable(op)
    if reason is not None:
        return reason
    if op.random:
        if op.name in _funcs.UNINITIALISED:
            return "uninitialised memory"
        if op._ctx is None or op._ctx.rng is None:
            return "random (RNG state not recorded)"
        if isinstance(op._skel_kwargs, dict) and op._skel_kwargs.get("generator") is not None:
            return "random (draws from its own generator)"
    return None


def _execute(op: Any, values: list[Any]) -> Any:
    """Run ``op`` on ``values`` (its tensor arguments in order) under the state it ran in."""
    if op.inplace:  # it writes into its first argument: never into a saved activation
        values = [v.clone() for v in values]
    it = iter(values)
    written = None  # the copy of the first argument the op writes besides its first
    try:
        args = refill(op._skel_args, it)
        kwargs = refill(op._skel_kwargs, it)
        info = _funcs.func_info(op._func)
        if info.mutates_buffers:
            # batch norm in training mode updates its running statistics in place (a custom
            # op the arguments its schema marks written): those are the buffer nodes' saved
            # activations (what the op read), so it updates copies
            stats = _funcs.mutated_buffers(info, args, kwargs)
            if stats:
                copies = {id(t): t.clone() for t in stats}
                written = copies[id(stats[0])]  # a None result: what the trace saved
                values = [copies.get(id(v), v) for v in values]
                it = iter(values)
                args = refill(op._skel_args, it)
                kwargs = refill(op._skel_kwargs, it)
    except StopIteration:
        raise ValidationError(
            f"{op.label} ({op.name}{_where(op)}): its recorded arguments no longer hold "
            f"the {len(values)} tensors it was called with (a container changed after "
            "the call). Please report this model.",
            op=op.label,
        ) from None
    try:
        if op._ctx is None:
            result = op._func(*args, **kwargs)
        else:
            with _context.applied(op._ctx):
                result = op._func(*args, **kwargs)
    except Exception as e:
        how = f" {_context.describe(op._ctx)}" if op._ctx is not None else ""
        raise ValidationError(
            f"Re-executing {op.label} ({op.name}{_where(op)}) from its saved inputs{how} "
            f"raised {type(e).__name__}: {e}",
            op=op.label,
        ) from e
    if result is None and op.inplace and values:  # x[i] = v, a custom op, return None
        result = written if written is not None else values[0]
    if isinstance(result, (tuple, list)):
        result = tuple(r for r in result if isinstance(r, Tensor))
        if len(result) == 1:
            result = result[0]
    return result


def _where(op: Any) -> str:
    return f" in {op.module}" if op.module else ""


def _check_output(trace: Trace, rtol: float, atol: float) -> list[str]:
    """Compare the traced output with an untraced forward from the state the traced one
    started in; return what the model changed in its own state during the traced one."""
    model = trace.model
    args, kwargs = trace._inputs
    # what the trace listed (tr.state_changes), and below what else this finds changed
    changes = trace.state_changes
    after = {n: b.detach().clone() for n, b in model.named_buffers()}
    written = getattr(trace, "_param_writes", None) or {}
    replaced = getattr(trace, "_param_replaced", None) or {}
    params = dict(model.named_parameters()) if written or replaced else {}
    # parameters the forward wrote into in place: their value after it, and going in
    params_after = {n: params[n].detach().clone() for n in written if n in params}
    # parameters whose storage it replaced: the tensor they hold now (put back after)
    swapped_after = {n: params[n].data for n in replaced if n in params}
    # buffers and tensor attributes the forward wrote into or replaced: (it, the value
    # going in); the tensor a replaced one holds now, and what one written in place holds
    state_before = getattr(trace, "_state_before", None) or {}
    state_replaced = getattr(trace, "_state_replaced", None) or {}
    data_after: dict[str, tuple[Tensor, Tensor]] = {}
    values_after: dict[str, tuple[Tensor, Tensor]] = {}
    undo = trace._state.restored()  # attributes and buffers the forward reassigned
    try:
        named = dict(model.named_buffers())
        with torch.no_grad():
            for key, (t, before) in state_before.items():
                if _held(model, key) is not t:
                    continue  # reassigned since the trace: not the model's state now
                if key in state_replaced or t.shape != before.shape:
                    data_after[key] = (t, t.data)
                    t.data = before.clone()
                elif not torch.equal(before.to(t.device), t):
                    values_after[key] = (t, t.detach().clone())
                    t.copy_(before)
            for n in swapped_after:
                params[n].data = replaced[n].clone()  # the value it had going in
            for n in params_after:
                p, before = params[n], written[n][0][1]
                if p.shape == before.shape and not torch.equal(before.to(p.device), p):
                    p.copy_(before)
                    _note(changes, f"parameter {n} updated in place")
            # buffers the forward updated in place: back to the value they had going in
            # (the buffer's node saved it; in-place ops clone saved values first)
            for op in trace.ops:
                b = named.get(op.name) if op.kind == "buffer" else None
                if "buffer " + op.name in state_before:
                    continue  # put back above, from the value kept before its first write
                a = op.activation
                if b is None or a is None or a is b or a.shape != b.shape:
                    continue
                if not torch.equal(a.to(b.device), b):
                    b.copy_(a)
                    _note(changes, f"buffer {op.name} updated in place")
        start = trace._rng  # its RNG state, autocast and grad mode
        if start.grad and not any(_not_reexecutable(op) for op in trace.compute_ops):
            # no autograd inside forward: no graph needed, which would hold memory
            start = start._replace(grad=False)
        with _context.applied(start):
            plain = model(*args, **kwargs)
    finally:
        trace._state.undo(undo)
        with torch.no_grad():  # the state the traced forward left, as the user has it
            for t, data in data_after.values():
                t.data = data
            for t, value in values_after.values():
                t.copy_(value)
            for n, b in model.named_buffers():
                if n in after and b.shape == after[n].shape:
                    b.copy_(after[n])
            for n, v in params_after.items():
                if params[n].shape == v.shape:
                    params[n].copy_(v)
            for n, data in swapped_after.items():  # the storage the traced forward left
                params[n].data = data
    traced = dict(paths(trace.output, "output", []))
    untraced = dict(paths(plain, "output", []))
    if traced.keys() != untraced.keys():
        raise ValidationError(
            f"The traced output has tensors {sorted(traced)} but an untraced forward returned "
            f"{sorted(untraced)}."
        )
    for name, t in traced.items():
        u = untraced[name]
        # untraced forwards may take fused fast paths (e.g. TransformerEncoder): allow
        # float rounding, relative to the output's scale
        scale = float(t.detach().abs().max()) if t.numel() and t.is_floating_point() else 1.0
        if not _close(t.detach(), u, rtol * 10, max(atol, 1e-5 * scale) * 10):
            state = (
                f" (compared from the state the traced forward started in; the model changed "
                f"in forward: {', '.join(changes[:3])})"
                if changes
                else ""
            )
            raise ValidationError(
                f"The traced output {name} differs from an untraced forward{state}: "
                f"{_first_diff(t.detach(), u)}. Tracing changed what the model computes."
            )
    return changes


def _held(model: Any, key: str) -> Tensor | None:
    """The tensor the model holds as ``key`` ("buffer a.b" or "attribute a.b") now."""
    kind, name = key.split(" ", 1)
    path, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return None
    return mod._buffers.get(attr) if kind == "buffer" else mod.__dict__.get(attr)


def _note(changes: list[str], line: str) -> None:
    """Add a change validation found to those the trace listed, once."""
    if line not in changes:
        changes.append(line)
