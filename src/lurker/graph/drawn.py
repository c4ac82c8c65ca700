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
    """Edges between drawn nodes: ``(src, dst, kind, label) -> how many unrolled edges``.

    ``draw[i]`` is the drawn node of op ``i`` (None: not drawn, its edges dropped);
    ``call[i]``, when given, identifies the unrolled drawn node of op ``i`` (else op ``i``
    is its own), and edges between two ops of one call (inside one collapsed module box)
    are dropped. Insertion order follows ``edges`` (data edges, then branch edges, in
    node order).

    The count is of distinct pairs of unrolled nodes, as an unrolled drawing would draw
    them: the passes a rolled edge stands for. Several tensors from one op to another (an
    ``LSTMCell``'s ``h`` and ``c`` into its next pass) are one edge there, so a 4-step loop
    labels its back edge ``x3``, whatever the number of tensors it carries.

    Branch edges that land on the same pair with different labels (a rolled readout that
    read another value on each pass: ``= 428.0``, ``= 600.0``, ...) are one edge, labelled
    with the distinct values as the node lists them (:func:`branch_labels`), not one edge
    and one label per value, drawn on top of each other.
    """
    counts: dict[tuple[N, N, str], dict[str | None, int]] = {}
    seen: set[tuple[Any, Any, str]] = set()  # unrolled pairs counted already
    for e in edges:
        s, d = draw[e.src], draw[e.dst]
        if s is None or d is None:
            continue
        pair = (e.src, e.dst, e.kind) if call is None else (call[e.src], call[e.dst], e.kind)
        if pair[0] == pair[1] or pair in seen:
            continue
        seen.add(pair)
        labels = counts.setdefault((s, d, e.kind), {})
        labels[e.label] = labels.get(e.label, 0) + 1
    merged: dict[tuple[N, N, str, str | None], int] = {}
    for (s, d, kind), labels in counts.items():
        if len(labels) == 1:
            label, n = next(iter(labels.items()))
            merged[(s, d, kind, label)] = n
        else:
            merged[(s, d, kind, branch_labels(list(labels)))] = sum(labels.values())
    return merged


def branch_labels(labels: Sequence[str | None]) -> str:
    """One label for the branch edges of a rolled readout: its distinct labels, at most
    three then ``...`` (``= 428.0 / 600.0 / 535.0 / ...``, ``THEN / ELSE``)."""
    texts = [label or "" for label in labels]
    more = " / ..." if len(texts) > 3 else ""
    if all(t.startswith("= ") for t in texts):
        return "= " + " / ".join(t[2:] for t in texts[:3]) + more
    return " / ".join(texts[:3]) + more


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
