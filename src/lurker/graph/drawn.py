"""What every drawing of a graph shares (graphviz render, the explorer's graph view).

A drawing maps each op to one drawn node (its own, its rolled op's, or a collapsed
module's box); :func:`merge_edges` then maps the shared edge list through that map and
merges the edges that land on the same pair, so rolling and collapsing need no edge
logic of their own. Torch-free, like the rest of :mod:`lurker.graph`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, TypeVar

from .edges import Edge
from .nodes import Op

N = TypeVar("N", bound=Hashable)


def merge_edges(
    edges: Sequence[Edge],
    draw: Sequence[N | None],
    call: Sequence[Any] | None = None,
) -> dict[tuple[N, N, str, str | None], int]:
    """Edges between drawn nodes: ``(src, dst, kind, label) -> how many graph edges``.

    ``draw[i]`` is the drawn node of op ``i`` (None: not drawn, its edges dropped);
    ``call[i]``, when given, identifies the unrolled drawn node of op ``i``, and edges
    between two ops of one call (inside one collapsed module box) are dropped. Insertion
    order follows ``edges`` (data edges, then branch edges, in node order).
    """
    merged: dict[tuple[N, N, str, str | None], int] = {}
    for e in edges:
        s, d = draw[e.src], draw[e.dst]
        if s is None or d is None or (call is not None and call[e.src] == call[e.dst]):
            continue
        key = (s, d, e.kind, e.label)
        merged[key] = merged.get(key, 0) + 1
    return merged


def value_text(value: Any) -> str:
    """A readout's value, short (``repr`` cut to 20 characters)."""
    text = repr(value)
    return text if len(text) <= 20 else text[:17] + "..."


def readout_values(passes: Sequence[Op]) -> str:
    """The distinct values a readout returned over its passes: ``True / False``, at most
    three then ``...``."""
    values: list[str] = []
    for o in passes:
        v = value_text(o.value)
        if v not in values:
            values.append(v)
    return " / ".join(values[:3]) + (" / ..." if len(values) > 3 else "")
