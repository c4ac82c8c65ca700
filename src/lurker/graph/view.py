"""The explorer's graph view document: a traced graph, compact, for the browser to draw.

The browser lays out one module group at a time, so the document gives it the rolled
nodes (one per op, or per op of a loop with its pass count, as ``trace.render(rolled=True)``
draws them), the merged edges between them, and the module tree with op counts. It is
built for size: short keys, defaults left out, source files and the common dtype stored
once, so a 10,000-op graph stays around a megabyte. The shape is documented in
docs/explorer.md ("Graph view document") and checked by
``lurker/schema/graph_view.schema.json``. Torch-free: the server reads graphs without torch.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

from .attention import attention_softmaxes
from .call_args import call_args, in_training
from .drawn import merge_edges, readout_values
from .edges import edges as graph_edges
from .graph import Graph

VIEW_VERSION = "lurker.graph_view/1"

#: Kinds the view leaves out, as ``trace.render`` does by default (buffers would crowd
#: every normalisation layer with running-mean boxes); their edges go with them.
HIDDEN_KINDS = frozenset({"buffer"})


def graph_view(
    graph: Graph,
    *,
    layers: Mapping[str, str] | None = None,
    nonfinite: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The graph view document of ``graph`` (see docs/explorer.md, "Graph view document").

    ``layers`` maps an op label (any pass) to the name of the probed layer it produced, so
    the page can link the node to that layer's page; ``nonfinite`` maps a probed layer's
    name to how many samples at least made NaN or +inf there (the run's meta
    ``non_finite_samples``), so the page can mark those nodes and the first of them.
    """
    ops = graph.ops
    layers = layers or {}
    nonfinite = nonfinite or {}
    paths = list(graph.modules)
    gidx = {p: i for i, p in enumerate(paths)}
    if "" not in gidx:  # a graph without its module tree: everything sits at the top
        paths.insert(0, "")
        gidx = {p: i for i, p in enumerate(paths)}

    dtypes = Counter(o.outputs[0].dtype for o in ops if o.outputs)
    dtype = dtypes.most_common(1)[0][0] if dtypes else "float32"
    files: dict[str, int] = {}
    draw: list[int | None] = [None] * len(ops)
    nodes: list[dict[str, Any]] = []
    direct = [0] * len(paths)

    # attention ops, whose weights the live view shows (a softmax of attention written out)
    attention = set(attention_softmaxes(graph)) | {
        o.index
        for o in ops
        if o.name in ("scaled_dot_product_attention", "_native_multi_head_attention")
    }
    labels = [""] * (max((o.index for o in ops), default=-1) + 1)
    for o in ops:
        labels[o.index] = o.label
    for rolled, passes in graph.rolled().items():
        op = passes[0]
        if op.kind in HIDDEN_KINDS:
            continue
        n = len(nodes)
        for o in passes:
            draw[o.index] = n
        node: dict[str, Any] = {"i": op.index, "l": rolled, "t": op.name}
        if op.kind != "op":
            node["k"] = op.kind
        m = gidx.get(op.module or "", 0)
        direct[m] += 1
        if m:
            node["m"] = m
        if op.outputs:
            node["s"] = [list(t.shape) for t in op.outputs]
            if op.outputs[0].dtype != dtype:
                node["d"] = op.outputs[0].dtype
        if op.params:
            node["P"] = op.num_params
        if any(o.flops is not None for o in passes):
            node["f"] = sum(o.flops or 0 for o in passes)
        if op.source:
            file, sep, line = op.source.rpartition(":")
            if sep and line.isdigit():
                node["src"] = [files.setdefault(file, len(files)), int(line)]
            else:
                node["src"] = [files.setdefault(op.source, len(files)), 0]
        if len(passes) > 1:
            node["p"] = len(passes)
        if op.kind == "readout":
            node["v"] = readout_values(passes)
        if any(o.index in attention for o in passes):
            node["a"] = 1
        args = call_args(op, labels)
        if args:
            node["A"] = args
        if any(in_training(o) for o in passes):
            node["T"] = 1
        for o in passes:
            layer = layers.get(o.label)
            if layer is not None:
                node["L"] = layer
                if layer in nonfinite:
                    node["nf"] = nonfinite[layer]
                break
        nodes.append(node)

    edge_rows: list[list[Any]] = []
    for (s, d, _kind, label), count in merge_edges(graph_edges(ops), draw).items():
        row: list[Any] = [s, d]
        if count > 1 or label is not None:
            row.append(count)
        if label is not None:
            row.append(label)
        edge_rows.append(row)

    groups = _groups(graph, paths, gidx, direct, _fewer_passes(nodes, graph, gidx))
    for g in _interleaved(groups, nodes, edge_rows):
        groups[g]["s"] = 1
    doc = {
        "version": VIEW_VERSION,
        "model": graph.model_name,
        "complete": graph.complete,
        "failed": graph.failed_op,
        "ops": graph.num_ops,
        "params": graph.num_params,
        "flops": graph.flops,
        "flops_unknown": graph.flops_unknown,
        "dtype": dtype,
        "files": list(files),
        "groups": groups,
        "nodes": nodes,
        "edges": edge_rows,
    }
    # nodes are in execution order of their first pass, so the first marked one ran first
    first = next((k for k, n in enumerate(nodes) if "nf" in n), None)
    if first is not None:
        doc["first_nonfinite"] = first
    return doc


def _fewer_passes(nodes: list[dict[str, Any]], graph: Graph, gidx: dict[str, int]) -> set[int]:
    """Groups holding a node drawn for fewer passes than the module ran: its calls are drawn
    apart (a module reused without a loop, as ResNet's ``relu``), so one box for the group
    would join distinct calls into a false cycle."""
    out: set[int] = set()
    for n in nodes:
        for path, _ in graph.ops[n["i"]].modules:
            info = graph.modules.get(path)
            if info is not None and n.get("p", 1) < info.num_passes and path in gidx:
                out.add(gidx[path])
    return out


def _interleaved(
    groups: list[dict[str, Any]], nodes: list[dict[str, Any]], edges: list[list[Any]]
) -> set[int]:
    """Groups that one box (or frame) would draw into a false cycle: a container whose
    members run between ops outside it, as FPN's ``layer_blocks`` (a ModuleList whose last
    block runs first, the others each after an ``add`` outside it that feeds it). Drawn as
    one item, it comes before that ``add`` and is fed by it: a forward edge of the graph
    drawn as a loop. Such a group is drawn apart (``s``), its subgroups each on their own.

    A page draws a group's items (nodes, and subgroups not drawn apart) in the order of
    their first node; a forward edge (to a later node) whose target's item, in the deepest
    group holding both ends, starts before its source's item, is drawn backwards: the
    target's item is a group that started before the source and is marked, until no such
    edge is left (marking one can expose its subgroups)."""
    chain: list[list[int]] = []
    for g in range(len(groups)):
        c = [g]
        while c[-1] != 0 and len(c) <= len(groups):
            c.append(groups[c[-1]].get("u", 0))
        chain.append(c[::-1])
    apart = {g for g, grp in enumerate(groups) if g and (grp.get("N", 0) <= 1 or grp.get("s"))}
    out: set[int] = set()
    while True:
        drawn = [[g for g in chain[n.get("m", 0)] if g not in apart] for n in nodes]
        first: dict[int, int] = {}
        for k in range(len(nodes) - 1, -1, -1):
            for g in drawn[k]:
                first[g] = k
        found = set()
        for e in edges:
            s, d = e[0], e[1]
            if s >= d:  # a back edge of the graph (a loop): drawn backwards anyway
                continue
            cs, cd = drawn[s], drawn[d]
            j = 0
            while j < min(len(cs), len(cd)) and cs[j] == cd[j]:
                j += 1
            if j == len(cd):  # the target is a node of the deepest common group
                continue
            b = cd[j]
            if (first[cs[j]] if j < len(cs) else s) >= first[b]:
                found.add(b)
        if not found:
            return out
        out |= found
        apart |= found


def _groups(
    graph: Graph, paths: list[str], gidx: dict[str, int], direct: list[int], split: set[int]
) -> list[dict[str, Any]]:
    """The module tree, one group per module path (all passes of a module together, as the
    nodes are rolled); ``N`` counts the subtree's nodes so a collapsed box can say so;
    ``s`` marks a group whose calls are drawn apart, never drawn as one box."""
    total = list(direct)
    parent: list[int | None] = [None] * len(paths)
    for i, path in enumerate(paths):
        info = graph.modules.get(path)
        if path and info is not None and info.parent is not None:
            parent[i] = gidx.get(info.parent, 0)
        elif path:
            parent[i] = 0
    # deepest first, so every subtree is summed before it is added into its parent
    for i in sorted(range(len(paths)), key=lambda i: -paths[i].count(".") - bool(paths[i])):
        p = parent[i]
        if p is not None:
            total[p] += total[i]
    children: list[list[int]] = [[] for _ in paths]
    for i, p in enumerate(parent):
        if p is not None:
            children[p].append(i)
    out: list[dict[str, Any]] = []
    for i, path in enumerate(paths):
        info = graph.modules.get(path)
        g: dict[str, Any] = {"p": path, "c": info.type if info is not None else graph.model_name}
        if parent[i] is not None:
            g["u"] = parent[i]
        if children[i]:
            g["ch"] = children[i]
        if direct[i]:
            g["n"] = direct[i]
        if total[i]:
            g["N"] = total[i]
        if info is not None and info.num_passes > 1:
            g["x"] = info.num_passes
        if i in split:
            g["s"] = 1
        if info is not None and info.num_params:
            g["P"] = info.num_params
        out.append(g)
    return out


@cache
def json_schema() -> dict[str, Any]:
    """The JSON Schema of :func:`graph_view` documents (``graph_view.schema.json``)."""
    text = resources.files("lurker").joinpath("schema/graph_view.schema.json").read_text("utf-8")
    return json.loads(text)
