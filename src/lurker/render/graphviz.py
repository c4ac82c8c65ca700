"""Draw a :class:`~lurker.Trace` with graphviz: modules as nested clusters, deep ones collapsed.

The layout work is done by ``dot``; this module only decides what is drawn. Every op is
mapped to one drawn node (its own, its rolled op's, or the box of a collapsed module),
then the shared edge list (:mod:`lurker.graph.edges`) is mapped through that and merged,
so collapsing and rolling never need special edge logic.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import graphviz

from ..errors import LurkerError, warn
from ..graph.drawn import merge_edges, readout_values
from ..graph.edges import edges as graph_edges
from ..graph.nodes import Op, TensorMeta
from ..store.files import atomic_write_bytes

if TYPE_CHECKING:
    from ..capture.trace import Trace

TIMES = "\N{MULTIPLICATION SIGN}"  # in shapes (1x64x32x32) and repeat counts (x4)
FORMATS = {".svg": "svg", ".pdf": "pdf", ".png": "png", ".dot": "dot"}
DIRECTIONS = ("TB", "LR", "BT", "RL")

# Styles, named so that tests and users can rely on them.
INPUT_STYLE = {
    "shape": "ellipse",
    "style": "filled",
    "fillcolor": "palegreen",
    "color": "darkgreen",
}
OUTPUT_STYLE = {"shape": "ellipse", "style": "filled", "fillcolor": "lightcoral", "color": "red3"}
PARAM_OP_STYLE = {"shape": "box", "style": "filled", "fillcolor": "gray85", "color": "gray30"}
PLAIN_OP_STYLE = {"shape": "box", "style": "filled", "fillcolor": "white", "color": "gray30"}
GENERATED_STYLE = {
    "shape": "box",
    "style": "dashed,filled",
    "fillcolor": "white",
    "color": "gray30",
}
SOURCE_STYLE = {  # buffers and constants
    "shape": "note",
    "style": "filled",
    "fillcolor": "lightyellow",
    "color": "gray60",
    "fontsize": "8",
}
READOUT_STYLE = {"shape": "diamond", "style": "filled", "fillcolor": "lavender", "color": "purple4"}
FAILED_STYLE = {
    "shape": "box",
    "style": "filled",
    "fillcolor": "mistyrose",
    "color": "red",
    "penwidth": "2.5",
}
MODULE_STYLE = {
    "shape": "box3d",
    "style": "filled",
    "fillcolor": "aliceblue",
    "color": "steelblue4",
}
BRANCH_EDGE = {"style": "dashed", "color": "purple3", "fontcolor": "purple3"}
BACK_EDGE = {"color": "royalblue3", "fontcolor": "royalblue3", "constraint": "false"}
#: The invisible tie that keeps a node nothing flows into where it ran (not above it), on
#: the rank of the node drawn before it or below, never forcing a rank of its own.
ANCHOR_EDGE = {"style": "invis", "minlen": "0"}

#: Edge labels (pass counts, branch values) on a big graph (``BIG_GRAPH``) are dot's
#: external labels, placed beside the edge once it is routed. An ordinary ``label`` makes dot
#: give every edge of the graph two ranks (one for the label's own virtual node), which
#: doubles the drawing's height and made spline routing most of dot's time on detection
#: models. A small graph keeps ordinary labels: dot is quick there, and it places them clear
#: of cluster titles, which external labels may overlap.
EDGE_LABEL = "xlabel"

# Layout tuning: clusters are what makes dot slow on big models. newrank lets it rank
# clusters globally; the limits bound network-simplex and crossing-minimisation passes,
# which otherwise grow super-linearly with thousands of nodes.
GRAPH_ATTRS = {
    "newrank": "true",
    "fontname": "Helvetica",
    "fontsize": "11",
    "nodesep": "0.25",
    "ranksep": "0.3",
    "labelloc": "t",
    "remincross": "false",
}
BIG_GRAPH_ATTRS = {"nslimit": "1", "nslimit1": "1", "mclimit": "0.3"}
BIG_GRAPH = 3000  # estimated layout size (see _layout_cost) from which the limits apply
# graphviz 2.43 (Debian, Ubuntu 22.04) can crash (SIGSEGV) when nslimit stops its network
# simplex this early under newrank; a crash is retried with these, each less truncated.
CRASH_RETRIES = ({"nslimit": "5"}, {"nslimit": "1000000"})
# Past this estimated layout size, dot can run for many minutes (a loop of 100 passes
# reading shared tensors routes about a million edge segments), so by default the ops
# of long loops are drawn rolled, with a note in the drawing, until the estimate fits.
ROLL_COST = 100_000
ROLL_MIN_PASSES = 4  # ops run fewer times are never rolled automatically
DOT_TIMEOUT = 600.0  # seconds


def render(
    trace: Trace,
    path: str | Path,
    *,
    depth: int | None = None,
    rolled: bool = False,
    direction: str = "TB",
    buffers: bool = False,
    auto_roll: bool = True,
    timeout: float | None = DOT_TIMEOUT,
) -> Path:
    """Draw ``trace`` to ``path`` (``.svg``, ``.pdf``, ``.png`` or ``.dot``); return that path.

    See :meth:`lurker.Trace.render` for the options. The file appears atomically: it is
    written under a temporary name in the same folder and then renamed.
    """
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise LurkerError(
            f"Cannot render to '{path.name}': unknown format '{path.suffix or '(none)'}'. "
            f"Use one of {', '.join(FORMATS)}."
        )
    if direction not in DIRECTIONS:
        raise LurkerError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}.")
    if depth is not None and depth < 0:
        raise LurkerError(f"depth must be None or >= 0, got {depth}.")
    if timeout is not None and not timeout > 0:
        raise LurkerError(f"timeout must be None or > 0 seconds, got {timeout}.")
    dot = to_dot(
        trace, depth=depth, rolled=rolled, direction=direction, buffers=buffers, auto_roll=auto_roll
    )
    if fmt == "dot":
        data = dot.source.encode()
    else:
        data = _run_dot(dot, fmt, path.name, timeout)
    atomic_write_bytes(path, data)
    return path


def _run_dot(g: graphviz.Digraph, fmt: str, name: str, timeout: float | None) -> bytes:
    """Lay ``g`` out with ``dot``; a crash is retried with less truncated layout limits.

    Every failure says why: dot's own message, its exit status or the signal that killed
    it, or the timeout, so that a failure is never an empty reason.
    """
    exe = shutil.which("dot")
    if exe is None:
        raise _no_dot()
    deadline = None if timeout is None else time.monotonic() + timeout
    limited = any(line.lstrip().startswith("graph [") and "nslimit" in line for line in g.body)
    attempts = [g]
    for attrs in CRASH_RETRIES if limited else ():
        retry = g.copy()
        retry.attr("graph", **attrs)  # a later graph attribute overrides the earlier one
        attempts.append(retry)
    crashes: list[str] = []
    for attempt in attempts:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        try:
            proc = subprocess.run(
                [exe, f"-T{fmt}"], input=attempt.source.encode(), capture_output=True, timeout=left
            )
        except FileNotFoundError as e:
            raise _no_dot() from e
        except subprocess.TimeoutExpired as e:
            n = sum(1 for line in g.body if " [" in line and "->" not in line)
            tried = f" (after {'; '.join(crashes)})" if crashes else ""
            raise LurkerError(
                f"graphviz 'dot' did not finish drawing {name} within {timeout:g} s{tried}: "
                f"the graph has about {n:,} nodes. Draw less (depth=2 collapses deeper "
                f"modules, rolled=True draws loops once), allow more time (timeout=None "
                f"waits), or render to a .dot file and run dot on it yourself."
            ) from e
        if proc.returncode == 0:
            return proc.stdout
        why = _dot_failure(proc.returncode, proc.stderr)
        if proc.returncode > 0 or attempt is attempts[-1]:
            tried = f" (it crashed first: {'; '.join(crashes)})" if crashes else ""
            raise LurkerError(
                f"graphviz 'dot' failed to draw {name}: {why}{tried}. Drawing less (depth=, "
                f"rolled=True) may avoid it; a .dot file is written without dot."
            )
        crashes.append(why)
    raise AssertionError("unreachable")  # pragma: no cover


def _dot_failure(returncode: int, stderr: bytes) -> str:
    """Why dot failed, in words: its signal or exit status, then the end of its stderr."""
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode).name
        except ValueError:
            sig = f"signal {-returncode}"
        what = f"dot was killed by {sig}" + (" (it crashed)" if sig in _CRASHES else "")
        if sig == "SIGKILL":
            what += " (often the system running out of memory)"
    else:
        what = f"dot exited with status {returncode}"
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    if lines:
        shown = lines[-5:]
        more = f"[{len(lines) - 5} earlier lines] " if len(lines) > 5 else ""
        return f"{what}; it said: {more}{' / '.join(shown)}"
    return f"{what} and printed nothing"


_CRASHES = ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGFPE", "SIGILL")


def _no_dot() -> LurkerError:
    return LurkerError(
        "Rendering needs the graphviz 'dot' program, which is not installed. Install it "
        "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz), or render "
        "to a .dot file, which works without it."
    )


# ---------------------------------------------------------------------- what to draw


@dataclass
class _Cluster:
    """A module call drawn as a cluster: its own nodes and nested clusters, in order."""

    name: str
    label: str
    nodes: list[str] = field(default_factory=list)
    children: dict[tuple, _Cluster] = field(default_factory=dict)


@dataclass
class _Box:
    """A collapsed module (one call, or all calls when rolled): what its label counts."""

    path: str
    pass_num: int | None  # None: all passes (rolled) or the module ran once
    ops: set[str] = field(default_factory=set)  # op labels (rolled labels when rolled)
    rolled: bool = False  # stands for all calls of the module


def to_dot(
    trace: Trace,
    *,
    depth: int | None = None,
    rolled: bool = False,
    direction: str = "TB",
    buffers: bool = False,
    auto_roll: bool = True,
) -> graphviz.Digraph:
    """The graphviz graph :func:`render` lays out (useful to inspect or tweak the source).

    With ``auto_roll`` (and ``rolled=False``), a drawing too big for dot to lay out in
    reasonable time has the ops of its longest loops rolled (drawn once, with pass
    counts), and says so in its title and in a warning; ``auto_roll=False`` draws every pass.
    """
    draw, cost, rolled_ops = _build(trace, depth, 1 if rolled else None, direction, buffers)
    if rolled or not auto_roll or cost < ROLL_COST:
        return draw()
    # Roll the ops that ran most often first, and stop as soon as the drawing fits. Only
    # the drawing chosen is made: labels and dot source are most of our time.
    counts = {op.num_passes for op in trace.ops if op.num_passes >= ROLL_MIN_PASSES}
    best = None
    for least in sorted(counts, reverse=True):
        cand = _build(trace, depth, least, direction, buffers)
        if best is None or cand[1] < best[1]:
            best = cand
        if cand[1] < ROLL_COST:
            break
    if best is None or best[1] >= cost or not best[2]:
        return draw()
    draw, _, rolled_ops = best
    g = draw()
    lo, hi = min(rolled_ops.values()), max(rolled_ops.values())
    times = f"{hi:,}" if lo == hi else f"{lo:,} to {hi:,}"
    what = "ops and modules" if any(k.startswith("module ") for k in rolled_ops) else "ops"
    note = (
        f"loops drawn rolled: {len(rolled_ops):,} {what} that ran {times} times are drawn once "
        f"each, {TIMES}N on their edges (auto_roll=False draws every pass)"
    )
    g.attr("graph", label=f"{_title(trace)}\\n{note}")  # the later label wins
    warn(
        f"Drawing every pass of {trace.model_name} (about {cost:,} layout nodes) could keep "
        f"graphviz busy for many minutes; {note}."
    )
    return g


def _build(
    trace: Trace,
    depth: int | None,
    roll: int | None,
    direction: str,
    buffers: bool,
) -> tuple[Callable[[], graphviz.Digraph], int, dict[str, int]]:
    """What makes the graph, its estimated layout size, and the ops (rolled labels) and
    collapsed modules (``module PATH``) drawn rolled, with their pass counts.

    The graph is made on demand: :func:`to_dot` sizes several candidates and draws one.

    ``roll``: ops (and module calls) that ran at least this many times are drawn once;
    1 rolls everything (``rolled=True``), None nothing.
    """
    ops = trace.ops
    root = _Cluster("", "")
    draw: list[str | None] = [None] * len(ops)  # node index -> drawn node id
    call: list[Any] = [None] * len(ops)  # node index -> identity of its unrolled drawn node
    reps: dict[str, list[Op]] = {}  # drawn op node id -> the ops it stands for
    boxes: dict[str, _Box] = {}
    box_ids: dict[tuple[str, Any], str] = {}  # (cluster, module key) -> box id
    order: dict[str, int] = {}  # drawn node id -> first node index (for back edges)
    anchor: dict[str, str] = {}  # drawn node id -> the node drawn just before it
    rolled_ids: set[str] = set()  # drawn nodes that stand for several passes
    last: str | None = None

    def rolls(num_passes: int) -> bool:
        return roll is not None and num_passes >= roll

    for op in ops:
        if op.kind == "buffer" and not buffers:
            continue
        cluster = root
        ukey: tuple = ()  # unrolled identity of the enclosing calls
        bid: str | None = None  # the collapsed module box this op falls into
        for path, pass_num in op.modules:
            info = trace.modules.get(path)
            ukey += ((path, pass_num),)
            mod_rolled = rolls(info.num_passes if info is not None else 1)
            key = path if mod_rolled else (path, pass_num)
            if depth is not None and _depth(path) > depth:
                bid = box_ids.get((cluster.name, key))
                if bid is None:
                    bid = box_ids[(cluster.name, key)] = f"m{len(boxes)}"
                    many = info is not None and info.num_passes > 1
                    boxes[bid] = _Box(
                        path, pass_num if many and not mod_rolled else None, rolled=mod_rolled
                    )
                    if mod_rolled:
                        rolled_ids.add(bid)
                    cluster.nodes.append(bid)
                    order[bid] = op.index
                    if last is not None:
                        anchor[bid] = last
                break
            child = cluster.children.get(key)
            if child is None:
                child = cluster.children[key] = _Cluster(
                    f"cluster_{_uid(cluster.name, len(cluster.children))}",
                    _cluster_label(trace, path, pass_num, mod_rolled),
                )
            cluster = child
        if bid is not None:
            if op.kind in ("op", "generated"):
                boxes[bid].ops.add(op.rolled if boxes[bid].rolled else op.label)
            draw[op.index] = last = bid
            call[op.index] = ukey
            continue
        op_rolled = rolls(op.num_passes)
        nid = f"r_{op.rolled}" if op_rolled else f"n{op.index}"
        group = reps.get(nid)
        if group is None:
            reps[nid] = [op]
            cluster.nodes.append(nid)
            order[nid] = op.index
            if last is not None:
                anchor[nid] = last
            if op_rolled:
                rolled_ids.add(nid)
        else:
            group.append(op)
        draw[op.index] = last = nid
        call[op.index] = op.index

    # Edges: map through the drawn nodes, drop those inside one collapsed call, merge.
    merged = merge_edges(graph_edges(ops), draw, call)
    cost = _layout_cost(order, merged)
    rolled_ops = {group[0].rolled: group[0].num_passes for group in reps.values() if len(group) > 1}
    for box in boxes.values():  # a collapsed module that stands for all its calls
        info = trace.modules.get(box.path)
        if box.rolled and info is not None and info.num_passes > 1:
            rolled_ops[f"module {box.path}"] = info.num_passes

    def make() -> graphviz.Digraph:
        g = graphviz.Digraph(name=trace.model_name or "model")
        g.attr("graph", rankdir=direction, label=_title(trace), **GRAPH_ATTRS)
        g.attr("node", fontname="Helvetica", fontsize="10", margin="0.08,0.04", height="0.3")
        g.attr("edge", color="gray35", arrowsize="0.6", fontname="Helvetica", fontsize="9")

        node_attrs: dict[str, dict[str, str]] = {}
        for nid, group in reps.items():
            node_attrs[nid] = _op_attrs(trace, group, nid in rolled_ids)
        for bid, box in boxes.items():
            node_attrs[bid] = _box_attrs(trace, box, box.rolled)
        _emit(g, root, node_attrs)
        if cost >= BIG_GRAPH:
            g.attr("graph", **BIG_GRAPH_ATTRS)
        fed: set[str] = set()
        for (s, d, kind, label), n in merged.items():
            attrs: dict[str, str] = {}
            text = label or ""
            if n > 1 and (s in rolled_ids or d in rolled_ids):
                text = f"{text} {TIMES}{n}".strip()
            if kind == "branch":
                attrs.update(BRANCH_EDGE)
            if order[s] >= order[d]:  # a loop: drawn, but not allowed to bend the ranking
                attrs.update(BRANCH_EDGE if kind == "branch" else BACK_EDGE)
                attrs["constraint"] = "false"
            else:
                fed.add(d)
            if text:  # on a big graph beside the edge: see EDGE_LABEL
                attrs[EDGE_LABEL if cost >= BIG_GRAPH else "label"] = text
            g.edge(s, d, **attrs)
        # A node nothing flows into (zeros(), a counter on a hidden buffer) would be ranked at
        # the very top, stretching its cluster across the whole graph: tie it invisibly to the
        # node drawn just before it, so it sits where it ran. minlen=0 lets it sit beside that
        # node: with the default 1, each such tie added a rank, runs of them (Keypoint R-CNN's
        # anchors and size constants) stretched the drawing by many ranks, and dot's spline
        # router pays quadratically in the ranks a long edge crosses (FPN levels read by the
        # RoI pools), which was most of its time.
        for nid, prev in anchor.items():
            if nid not in fed and ops[order[nid]].kind != "input":
                g.edge(prev, nid, **ANCHOR_EDGE)
        return g

    return make, cost, rolled_ops


def _layout_cost(order: dict[str, int], merged: dict[tuple[str, str, str, str | None], int]) -> int:
    """Roughly how many nodes dot will lay out: drawn nodes plus the virtual nodes it adds
    along edges that skip ranks (dense skip connections multiply those)."""
    pos = {nid: i for i, nid in enumerate(sorted(order, key=order.__getitem__))}
    span = sum(max(0, pos[d] - pos[s] - 1) for s, d, _, _ in merged)
    return len(order) + span


def _uid(parent: str, n: int) -> str:
    return f"{parent.removeprefix('cluster_')}_{n}" if parent else str(n)


def _depth(path: str) -> int:
    return path.count(".") + 1 if path else 0


def _has_nodes(cluster: _Cluster) -> bool:
    return bool(cluster.nodes) or any(_has_nodes(c) for c in cluster.children.values())


def _emit(g: graphviz.Digraph, cluster: _Cluster, attrs: dict[str, dict[str, str]]) -> None:
    for nid in cluster.nodes:
        g.node(nid, **attrs[nid])
    for child in cluster.children.values():
        if not _has_nodes(child):  # all its ops drawn rolled in an earlier pass's cluster
            continue
        sub = graphviz.Digraph(name=child.name)
        sub.attr(
            "graph",
            label=child.label,
            style="rounded",
            color="gray55",
            fontcolor="gray20",
            fontsize="10",
            labeljust="l",
        )
        _emit(sub, child, attrs)
        g.subgraph(sub)


# ---------------------------------------------------------------------- labels


def _title(trace: Trace) -> str:
    state = "" if trace.complete else f" (partial: failed at {trace.failed_op})"
    return f"{trace.model_name}: {trace.num_ops:,} ops, {trace.num_params:,} params{state}"


def _cluster_label(trace: Trace, path: str, pass_num: int, rolled: bool) -> str:
    info = trace.modules.get(path)
    kind = f" ({info.type})" if info is not None else ""
    many = info is not None and info.num_passes > 1
    if rolled:
        return f"{path}{kind}" + (f" {TIMES}{info.num_passes}" if many and info else "")
    return f"{path}:{pass_num}{kind}" if many else f"{path}{kind}"


def shape_text(meta: TensorMeta) -> str:
    """``1x64x32x32``, with a multiplication sign (``scalar`` for a 0-d tensor)."""
    return TIMES.join(map(str, meta.shape)) if meta.shape else "scalar"


def _html(lines: list[str], small: list[str] = ()) -> str:  # type: ignore[assignment]
    head, *rest = lines
    body = "".join(f"<br/>{escape(s, quote=False)}" for s in rest)
    tail = "".join(f'<br/><font point-size="8">{escape(s, quote=False)}</font>' for s in small)
    return f"<<b>{escape(head, quote=False)}</b>{body}{tail}>"


def _params_text(op: Op) -> str:
    n = f"{op.num_params:,} params"
    if len(op.params) > 3:
        return n
    shapes = ", ".join(
        f"{p.name.rsplit('.', 1)[-1]} {TIMES.join(map(str, p.shape)) or 'scalar'}"
        for p in op.params
    )
    return f"{shapes} ({n})"


def _op_attrs(trace: Trace, group: list[Op], rolled: bool) -> dict[str, str]:
    op = group[0]
    kind = op.kind
    head = op.rolled if rolled else op.label
    lines = [head]
    small: list[str] = []
    if kind in ("input", "output", "buffer", "constant") and op.name != op.label:
        lines.append(op.name)
    if kind == "readout":
        lines.append(f"{op.name} → {readout_values(group)}")
    elif op.outputs:
        lines.append(", ".join(shape_text(m) for m in op.outputs[:3]))
    if kind == "failed":
        lines.append("raised an error")
    if op.params:
        small.append(_params_text(op))
    if rolled and len(group) > 1:
        small.append(f"{TIMES}{len(group)} passes")
    style = {
        "input": INPUT_STYLE,
        "output": OUTPUT_STYLE,
        "generated": GENERATED_STYLE,
        "buffer": SOURCE_STYLE,
        "constant": SOURCE_STYLE,
        "readout": READOUT_STYLE,
        "failed": FAILED_STYLE,
    }.get(kind, PARAM_OP_STYLE if op.params else PLAIN_OP_STYLE)
    attrs = dict(style)
    attrs["label"] = _html(lines, small)
    attrs["tooltip"] = _tooltip(op, group)
    return attrs


def _tooltip(op: Op, group: list[Op]) -> str:
    parts = [f"{op.rolled if len(group) > 1 else op.label} ({op.name}, {op.kind})"]
    parts.append(f"module: {op.module or '(model)'}")
    if op.source:
        parts.append(f"source: {op.source}")
    flops = sum(o.flops or 0 for o in group)
    if any(o.flops is not None for o in group):
        parts.append(f"FLOPs: {flops:,}")
    if len(group) > 1:
        parts.append(f"passes: {len(group)}")
    return "\n".join(parts)


def _box_attrs(trace: Trace, box: _Box, rolled: bool) -> dict[str, str]:
    info = trace.modules.get(box.path)
    kind = info.type if info is not None else "?"
    name = box.path if box.pass_num is None else f"{box.path}:{box.pass_num}"
    n_ops = len(box.ops)
    lines = [name, f"({kind})", f"{n_ops} op{'s' if n_ops != 1 else ''}"]
    if info is not None and info.num_params:
        lines[-1] += f" · {info.num_params:,} params"
    small: list[str] = []
    if info is not None:
        outs = info.outputs.get(box.pass_num or 1, [])
        shapes = [shape_text(trace.ops[i].outputs[0]) for i in outs if trace.ops[i].outputs]
        if shapes:
            small.append(", ".join(shapes[:3]))
        if rolled and info.num_passes > 1:
            small.append(f"{TIMES}{info.num_passes} passes")
    attrs = dict(MODULE_STYLE)
    attrs["label"] = _html(lines, small)
    attrs["tooltip"] = f"module {name} ({kind}), collapsed: {n_ops} ops"
    return attrs
