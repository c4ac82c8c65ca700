"""The edges of a traced graph, derived once for every consumer (renderer, JSON export).

Data edges follow the tensors (each op's recorded inputs); branch edges link a readout
(``bool(x)``, ``x.item()``) to the op that ran next, because that is the only trace a
data-dependent ``if`` leaves: which code ran after the value was read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .nodes import Op

if TYPE_CHECKING:
    from .graph import Graph

#: Node kinds that are recorded calls, i.e. what "the next op after a readout" may be.
#: Outputs count too, so ``if x.sum() > 0: return x`` still points somewhere.
_NEXT_KINDS = frozenset({"op", "generated", "readout", "failed", "output"})


@dataclass(frozen=True, slots=True)
class Edge:
    """One edge: ``src`` -> ``dst`` (node indices).

    ``src_output`` is which output of ``src`` flows (``None`` for branch edges, whose source,
    a readout, has no tensor output); ``label`` is ``None`` for data edges and ``THEN`` /
    ``ELSE`` / ``= value`` for branch edges.
    """

    src: int
    dst: int
    src_output: int | None
    kind: str  # 'data' | 'branch'
    label: str | None = None


def branch_label(value: Any) -> str:
    """``THEN``/``ELSE`` for a bool readout, ``= value`` for any other (item, len, ...)."""
    if isinstance(value, bool):
        return "THEN" if value else "ELSE"
    text = repr(value)
    if len(text) > 24:
        text = text[:21] + "..."
    return f"= {text}"


def edges(graph: Graph | Sequence[Op]) -> list[Edge]:
    """Data edges (deduplicated on src, dst, src_output) then branch edges, in node order.

    ``graph`` is a trace (complete or partial) or its op list; node ``i`` must be ``ops[i]``.
    """
    ops: Sequence[Op] = graph if isinstance(graph, Sequence) else graph.ops
    out: list[Edge] = []
    for op in ops:
        seen: set[tuple[int, int]] = set()
        for src, k in op._inputs:
            if src < 0:  # a parameter, not a node
                continue
            key = (src, int(k))
            if key in seen:
                continue
            seen.add(key)
            out.append(Edge(src, op.index, int(k), "data"))
    branches: list[Edge] = []
    nxt: int | None = None  # the next recorded call after the current position
    for op in reversed(ops):
        if op.kind == "readout" and nxt is not None:
            branches.append(Edge(op.index, nxt, None, "branch", branch_label(op.value)))
        if op.kind in _NEXT_KINDS:
            nxt = op.index
    out.extend(reversed(branches))
    return out
