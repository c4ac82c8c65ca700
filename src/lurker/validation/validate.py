"""``Trace.validate``: prove that what a trace saved is what the model computed.

Each op is re-executed from the saved activations of its parents (and the model's
parameters) and its result compared with its own saved activation; then the model is run
once more without tracing (same RNG state) and its output compared with the traced one.
A mismatch raises :class:`~lurker.errors.ValidationError` naming the op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..capture._tree import paths, refill
from ..errors import ValidationError

if TYPE_CHECKING:
    from ..capture.trace import Trace


@dataclass
class ValidationReport:
    """What was checked. ``skipped`` maps op label -> why it could not be re-executed."""

    checked: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    output_checked: bool = False

    def __str__(self) -> str:
        s = f"{self.checked} ops re-executed and matched"
        if self.output_checked:
            s += "; traced output equals an untraced forward"
        if self.skipped:
            s += f"; {len(self.skipped)} skipped ({', '.join(sorted(set(self.skipped.values())))})"
        return s


def _close(a: Any, b: Any, rtol: float, atol: float) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.is_floating_point or a.dtype.is_complex:
            return torch.allclose(a, b.to(a.device), rtol=rtol, atol=atol, equal_nan=True)
        return torch.equal(a, b.to(a.device))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b))
    return a == b


def _first_diff(a: Any, b: Any) -> str:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape:
            return f"shape {tuple(b.shape)} vs saved {tuple(a.shape)}"
        if a.dtype.is_floating_point:
            return (
                f"max abs difference {(a.float() - b.float().to(a.device)).abs().max().item():.3g}"
            )
        return "values differ"
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
    ops = trace.ops
    with torch.no_grad():
        for op in ops:
            if op.kind in ("input", "buffer", "constant", "output", "readout"):
                continue
            if op.stale:
                raise ValidationError(
                    f"{op.label} ({op.name}): its saved activation was modified in place by a "
                    "later op that lurker did not recognise as in-place. Please report this op.",
                    op=op.label,
                )
            if op.activation is None:
                report.skipped[op.label] = "not saved"
                continue
            if op.random:
                report.skipped[op.label] = "random"
                continue
            values: list[Any] = []
            missing = None
            snaps = op._snapshots or {}
            for j, (src, what) in enumerate(op._inputs):
                if j in snaps:
                    values.append(snaps[j].clone() if op.inplace else snaps[j])
                    continue
                if src < 0:
                    values.append(params[what])
                    continue
                a = ops[src].activation
                if a is None:
                    missing = ops[src].label
                    break
                a = a[what] if isinstance(a, tuple) else a
                values.append(a.clone() if op.inplace else a)
            if missing is not None or op._skel_args is None:
                report.skipped[op.label] = "input not saved"
                continue
            it = iter(values)
            try:
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
                result = op._func(*args, **kwargs)
            except Exception as e:
                raise ValidationError(
                    f"Re-executing {op.label} ({op.name}{_where(op)}) from its saved inputs "
                    f"raised {type(e).__name__}: {e}",
                    op=op.label,
                ) from e
            if result is None and op.inplace and values:  # x[i] = v returns None
                result = values[0]
            if isinstance(result, (tuple, list)):
                result = tuple(r for r in result if isinstance(r, Tensor))
                if len(result) == 1:
                    result = result[0]
            if not _close(op.activation, result, rtol, atol):
                raise ValidationError(
                    f"Saved activation of {op.label} ({op.name}{_where(op)}) does not match a "
                    f"re-execution from its saved inputs: {_first_diff(op.activation, result)}.",
                    op=op.label,
                )
            report.checked += 1
    _check_output(trace, rtol, atol)
    report.output_checked = True
    return report


def _where(op: Any) -> str:
    return f" in {op.module}" if op.module else ""


def _check_output(trace: Trace, rtol: float, atol: float) -> None:
    model = trace.model
    args, kwargs = trace._inputs
    cpu_rng, cuda_rng = trace._rng
    now_cpu = torch.get_rng_state()
    now_cuda = torch.cuda.get_rng_state_all() if cuda_rng is not None else None
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        with torch.no_grad():
            plain = model(*args, **kwargs)
    finally:
        with torch.no_grad():  # a training-mode forward updates running stats: undo that
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
        torch.set_rng_state(now_cpu)
        if now_cuda is not None:
            torch.cuda.set_rng_state_all(now_cuda)
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
            raise ValidationError(
                f"The traced output {name} differs from an untraced forward: "
                f"{_first_diff(t.detach(), u)}. Tracing changed what the model computes."
            )
