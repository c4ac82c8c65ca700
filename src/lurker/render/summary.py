"""A torchinfo-like text table of a :class:`~lurker.Trace`: one row per module call.

Rows follow the calls as they happened (``op.modules``), not the module definitions, so
a module called twice shows twice and an unused one does not show at all; the numbers in
each row are sums over the ops recorded inside that call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..capture.trace import Trace

_COUNTED = ("op", "generated")  # what "ops" counts, as in Trace.num_ops


@dataclass
class _Call:
    path: str
    pass_num: int
    ops: int = 0
    flops: int = 0
    children: list[_Call] = field(default_factory=list)


def summary(trace: Trace, depth: int | None = None) -> str:
    """The table as a string: module tree (down to ``depth``), shapes, params, FLOPs, ops."""
    root = _Call("", 0)
    calls: dict[tuple[tuple[str, int], ...], _Call] = {}
    for op in trace.ops:
        parent = root
        for i in range(len(op.modules)):
            key = op.modules[: i + 1]
            call = calls.get(key)
            if call is None:
                path, pass_num = op.modules[i]
                call = calls[key] = _Call(path, pass_num)
                parent.children.append(call)
            parent = call
            if op.kind in _COUNTED:
                call.ops += 1
            call.flops += op.flops or 0

    rows: list[tuple[str, str, str, str, str]] = [
        (
            trace.model_name or "model",
            _shapes([o.index for o in trace.outputs], trace),
            f"{trace.num_params:,}",
            _flops(trace.flops) + ("+" if trace.flops_unknown else ""),
            f"{trace.num_ops:,}",
        )
    ]
    _rows(trace, root.children, "", depth, rows)

    header = ("Module (type)", "Output shape", "Params", "FLOPs", "Ops")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]

    def line(r: tuple[str, ...]) -> str:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [r[i].rjust(widths[i]) for i in (2, 3, 4)]
        return "  ".join(cells).rstrip()

    rule = "=" * len(line(tuple(h.ljust(w) for h, w in zip(header, widths))))
    out = [rule, line(header), rule, *(line(r) for r in rows), rule]
    facts = [
        ("Ops", f"{trace.num_ops:,}"),
        ("Params", f"{trace.num_params:,}"),
        ("Activations", f"{trace.activation_bytes / 2**20:.2f} MiB ({trace.activation_bytes:,} B)"),
        ("FLOPs", _total_flops(trace.flops, trace.flops_unknown)),
        ("Recurrent", "yes" if trace.is_recurrent else "no"),
        ("Branching", "yes" if trace.has_branching else "no"),
        ("Traced in", f"{trace.time:.3f} s"),
    ]
    if not trace.complete:
        facts.append(("Status", f"partial: failed at {trace.failed_op or 'model code'}"))
    out += [f"{k + ':':<13}{v}" for k, v in facts]
    out.append(rule)
    return "\n".join(out)


def _rows(
    trace: Trace,
    calls: list[_Call],
    prefix: str,
    depth: int | None,
    rows: list[tuple[str, str, str, str, str]],
) -> None:
    shown = [c for c in calls if depth is None or _depth(c.path) <= depth]
    for i, call in enumerate(shown):
        last = i == len(shown) - 1
        info = trace.modules.get(call.path)
        many = info is not None and info.num_passes > 1
        name = f"{call.path}:{call.pass_num}" if many else call.path
        kind = info.type if info is not None else "?"
        n_params = info.num_params if info is not None else 0
        if not n_params:
            params = "--"
        elif call.pass_num > 1:
            params = "(reused)"  # counted once, on the first call
        else:
            params = f"{n_params:,}"
        outs = info.outputs.get(call.pass_num, []) if info is not None else []
        rows.append(
            (
                f"{prefix}{'└─' if last else '├─'}{name} ({kind})",
                _shapes(outs, trace),
                params,
                _flops(call.flops) if call.flops else "--",
                f"{call.ops:,}",
            )
        )
        _rows(trace, call.children, prefix + ("   " if last else "│  "), depth, rows)


def _depth(path: str) -> int:
    return path.count(".") + 1 if path else 0


def _shapes(nodes: list[int], trace: Trace) -> str:
    shapes = [list(trace.ops[i].outputs[0].shape) for i in nodes if trace.ops[i].outputs]
    if not shapes:
        return "--"
    text = ", ".join(str(s) for s in shapes[:2]) + (", ..." if len(shapes) > 2 else "")
    return text if len(text) <= 40 else text[:37] + "..."


def _total_flops(n: int, unknown: int) -> str:
    """The model's FLOPs, and how many ops it leaves out (a lower bound then, never a
    total that passes for whole)."""
    text = f"{n / 1e9:.3f} GFLOPs ({n:,})"
    if not unknown:
        return text
    return f"at least {text}: {unknown} op{'s' if unknown > 1 else ''} of unknown FLOPs"


def _flops(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
