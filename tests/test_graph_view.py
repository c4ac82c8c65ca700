"""The explorer's graph view document (lurker.graph.view): its schema, counts, tree, size."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import jsonschema
import pytest
import torch
import torchvision

import lurker
from lurker.examples import deep_mlp
from lurker.graph import Graph
from lurker.graph.view import HIDDEN_KINDS, VIEW_VERSION, graph_view, json_schema
from models_zoo import (
    Branchy,
    Fails,
    Generates,
    LSTMNet,
    Pyramid,
    ReadsEachRow,
    RNNLoop,
    Twice,
)


def _partial() -> lurker.Trace:
    with pytest.raises(lurker.TraceError) as ei:
        lurker.trace(Fails(), torch.randn(2, 4))
    return ei.value.partial


@pytest.fixture(scope="module")
def traces() -> dict[str, Graph]:
    torch.manual_seed(0)
    return {
        "resnet18": lurker.trace(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)),
        "rnn_loop": lurker.trace(RNNLoop(), torch.randn(4, 2, 3)),
        "branch": lurker.trace(Branchy(), torch.ones(2, 4)),
        "branch_else": lurker.trace(Branchy(), -torch.ones(2, 4)),
        "partial": _partial(),
        "generates": lurker.trace(Generates(), torch.randn(2, 4)),
        "lstm": lurker.trace(LSTMNet(), torch.randn(2, 5, 6)),
        "twice": lurker.trace(Twice(), torch.randn(2, 4)),
    }


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


NAMES = ["resnet18", "rnn_loop", "branch", "branch_else", "partial", "generates", "lstm", "twice"]


def _check(doc: dict, validator: jsonschema.Draft202012Validator) -> None:
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message[:200]}" for e in errors[:5]]
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc


@pytest.mark.parametrize("name", NAMES)
def test_validates_and_counts(name: str, traces, validator) -> None:
    g = traces[name]
    doc = graph_view(g)
    _check(doc, validator)
    assert doc["version"] == VIEW_VERSION and doc["model"] == g.model_name
    assert doc["ops"] == g.num_ops and doc["params"] == g.num_params and doc["flops"] == g.flops
    assert doc["complete"] == g.complete and doc["failed"] == g.failed_op
    # one node per rolled op (buffers left out), in order of first pass
    rolled = {k: v for k, v in g.rolled().items() if v[0].kind not in HIDDEN_KINDS}
    nodes = doc["nodes"]
    assert [n["l"] for n in nodes] == list(rolled)
    assert [n["i"] for n in nodes] == [v[0].index for v in rolled.values()]
    for n, passes in zip(nodes, rolled.values(), strict=True):
        op = passes[0]
        assert n.get("p", 1) == len(passes) == op.num_passes
        assert n.get("k", "op") == op.kind and n["t"] == op.name
        assert doc["groups"][n.get("m", 0)]["p"] == (op.module or "")
        assert n.get("s", []) == [list(t.shape) for t in op.outputs]
        assert n.get("d", doc["dtype"]) == (op.dtype or doc["dtype"])
        assert n.get("P", 0) == op.num_params
        flops = [o.flops for o in passes if o.flops is not None]
        assert n.get("f") == (sum(flops) if flops else None)
        if op.source:
            file, line = n["src"]
            assert f"{doc['files'][file]}:{line}" == op.source
    # edges: Graph.edges() between drawn ops, by rolled label, counted (independent merge)
    drawn = {o.index: o.rolled for o in g.ops if o.kind not in HIDDEN_KINDS}
    want = Counter(
        (drawn[e.src], drawn[e.dst], e.label)
        for e in g.edges()
        if e.src in drawn and e.dst in drawn
    )
    got = Counter()
    for e in doc["edges"]:
        s, d = nodes[e[0]]["l"], nodes[e[1]]["l"]
        got[(s, d, e[3] if len(e) > 3 else None)] += e[2] if len(e) > 2 else 1
    assert got == want
    assert len({(e[0], e[1], e[3] if len(e) > 3 else None) for e in doc["edges"]}) == len(
        doc["edges"]
    )  # merged: one row per drawn pair and label


def test_resnet18_unrolled(traces) -> None:
    """A model without loops: every op is a node and every data edge one row."""
    g = traces["resnet18"]
    doc = graph_view(g)
    shown = [o for o in g.ops if o.kind != "buffer"]
    assert len(doc["nodes"]) == len(shown)
    assert all("p" not in n for n in doc["nodes"])
    pairs = {(e.src, e.dst) for e in g.edges() if g.ops[e.src].kind != "buffer"}
    assert len(doc["edges"]) == len(pairs)
    kinds = Counter(n.get("k", "op") for n in doc["nodes"])
    assert kinds["input"] == 1 and kinds["output"] == 1
    convs = [n for n in doc["nodes"] if n["t"] == "conv2d"]
    assert len(convs) == 20 and all(n["P"] > 0 for n in convs)


@pytest.mark.parametrize("name", NAMES)
def test_module_tree(name: str, traces) -> None:
    g = traces[name]
    doc = graph_view(g)
    groups = doc["groups"]
    assert [x["p"] for x in groups] == list(g.modules)
    index = {x["p"]: i for i, x in enumerate(groups)}
    direct = Counter(n.get("m", 0) for n in doc["nodes"])
    for i, (path, info) in enumerate(g.modules.items()):
        grp = groups[i]
        assert grp["c"] == info.type
        assert grp.get("x", 1) == max(info.num_passes, 1)
        assert grp.get("P", 0) == info.num_params
        assert grp.get("u") == (index[info.parent] if info.parent is not None else None)
        assert [groups[c]["p"] for c in grp.get("ch", [])] == [
            c for c in info.children if c in index
        ]
        assert grp.get("n", 0) == direct[i]
        # total: nodes whose module is this one or under it
        under = [
            n
            for n in doc["nodes"]
            if path == "" or any(m == path for m, _ in g.ops[n["i"]].modules)
        ]
        assert grp.get("N", 0) == len(under)
    assert groups[0]["p"] == "" and groups[0].get("N", 0) == len(doc["nodes"])


def test_branch_labels_and_loops(traces) -> None:
    then = graph_view(traces["branch"])
    other = graph_view(traces["branch_else"])
    label = [e[3] for e in then["edges"] if len(e) > 3]
    assert label == ["THEN"] and [e[3] for e in other["edges"] if len(e) > 3] == ["ELSE"]
    readout = next(n for n in then["nodes"] if n.get("k") == "readout")
    assert readout["v"] == "True"
    loop = graph_view(traces["rnn_loop"])
    pos = {n["l"]: i for i, n in enumerate(loop["nodes"])}
    cell = loop["nodes"][pos["rnn_tanh_cell_1"]]
    assert cell["p"] == 4
    back = [e for e in loop["edges"] if e[0] >= e[1]]  # the hidden state fed back: 3 times
    assert back == [[pos["rnn_tanh_cell_1"], pos["rnn_tanh_cell_1"], 3]]
    cellgrp = next(x for x in loop["groups"] if x["p"] == "cell")
    assert cellgrp["x"] == 4 and cellgrp["n"] == 1


def test_rolled_readout_has_one_branch_edge() -> None:
    """A readout rolled over a loop that read another value on every pass (Keypoint R-CNN
    reads each box's size with ``.item()``, 100 boxes) has one branch edge to the op after
    it, labelled with its distinct values as its node lists them: not one edge per value,
    whose labels the page would draw on top of each other."""
    tr = lurker.trace(ReadsEachRow(), torch.arange(24.0).reshape(6, 4))
    doc = graph_view(tr)
    pos = {n["l"]: i for i, n in enumerate(doc["nodes"])}
    item = doc["nodes"][pos["item_1"]]
    assert item["p"] == 6 and item["v"] == "0.0 / 4.0 / 8.0 / ..."
    branch = [e for e in doc["edges"] if len(e) > 3]
    assert branch == [[pos["item_1"], pos["getitem_2"], 6, "= 0.0 / 4.0 / 8.0 / ..."]]


@pytest.mark.parametrize("name", NAMES)
def test_groups_whose_calls_are_drawn_apart(name: str, traces) -> None:
    """``s`` marks exactly the groups holding a node drawn for fewer passes than its module
    ran (ResNet's reused ``relu``); a module whose passes roll into one loop is not one."""
    g = traces[name]
    doc = graph_view(g)
    want = set()
    for n in doc["nodes"]:
        for path, _ in g.ops[n["i"]].modules:
            if n.get("p", 1) < g.modules[path].num_passes:
                want.add(path)
    assert {x["p"] for x in doc["groups"] if x.get("s") == 1} == want
    if name == "resnet18":
        assert "layer1.0.relu" in want and "layer1.0" not in want
        relu = next(x for x in doc["groups"] if x["p"] == "layer1.0.relu")
        assert relu["x"] == 2 and relu["N"] == 2
    if name == "rnn_loop":
        assert "cell" not in want


def test_interleaved_container_is_drawn_apart() -> None:
    """FPN's ``layer_blocks`` (here ``outs``): a ModuleList whose last block runs first and
    whose others each run after an ``add`` outside it. One box for it would come before the
    ``add`` that feeds it, a forward edge drawn as a loop; it is drawn apart (``s``), and
    then no forward edge of the graph goes back to an item that started earlier."""
    doc = graph_view(lurker.trace(Pyramid(), torch.randn(5, 4)))
    groups = doc["groups"]
    assert {g["p"] for g in groups if g.get("s")} == {"outs"}
    # the page's items, as it draws them: groups drawn apart (and those of one node) left
    # out of each node's chain of frames, every other group one item of the frame around it
    thin = [g > 0 and (grp.get("N", 0) <= 1 or grp.get("s") == 1) for g, grp in enumerate(groups)]
    chains = []
    for n in doc["nodes"]:
        c = [n.get("m", 0)]
        while c[-1]:
            c.append(groups[c[-1]].get("u", 0))
        chains.append([g for g in reversed(c) if not thin[g]])
    first: dict[int, int] = {}
    for k in reversed(range(len(doc["nodes"]))):
        for g in chains[k]:
            first[g] = k
    for s, d, *_ in doc["edges"]:
        if s >= d:
            continue
        j = 0
        while j < min(len(chains[s]), len(chains[d])) and chains[s][j] == chains[d][j]:
            j += 1
        a = first[chains[s][j]] if j < len(chains[s]) else s
        b = first[chains[d][j]] if j < len(chains[d]) else d
        assert a < b, (doc["nodes"][s]["l"], doc["nodes"][d]["l"])
    # its blocks stay groups of their own (each a Sequential of two ops)
    kept = {grp["p"] for g, grp in enumerate(groups) if not thin[g]}
    assert {"outs.0", "outs.1", "outs.2"} <= kept


def test_layers_link(traces) -> None:
    g = traces["rnn_loop"]
    doc = graph_view(g, layers={"linear_2": "head", "rnn_tanh_cell_1:3": "cell:3"})
    by = {n["l"]: n for n in doc["nodes"]}
    assert by["linear_2"]["L"] == "head" and by["rnn_tanh_cell_1"]["L"] == "cell:3"
    assert sum("L" in n for n in doc["nodes"]) == 2


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_from_json(name: str, traces) -> None:
    g = traces[name]
    back = Graph.from_json(json.loads(json.dumps(g.to_json())))
    assert graph_view(back) == graph_view(g)


def test_torch_free(tmp_path) -> None:
    path = tmp_path / "g.json"
    lurker.trace(Twice(), torch.randn(2, 4)).to_json(path)
    code = (
        "import sys, json\n"
        "from lurker.graph import Graph\n"
        "from lurker.graph.view import graph_view\n"
        f"doc = graph_view(Graph.from_json({str(path)!r}))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(len(doc['nodes']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5"


def test_size_of_big_graphs(traces, validator) -> None:
    """Small enough to send: measured in bytes of compact JSON (as the server sends it)."""
    sizes = {"resnet18": len(json.dumps(graph_view(traces["resnet18"]), separators=(",", ":")))}
    for ops in (2000, 10000):
        torch.manual_seed(0)
        g = lurker.trace(deep_mlp(ops), torch.randn(1, 8))
        assert abs(g.num_ops - ops) < ops * 0.05
        doc = graph_view(g)
        _check(doc, validator)
        sizes[str(ops)] = len(json.dumps(doc, separators=(",", ":")))
    print("graph view bytes:", sizes)
    assert sizes["resnet18"] < 30_000
    assert sizes["2000"] < 500_000
    assert sizes["10000"] < 2_000_000  # the target is well under ~3 MB


class _CellLoop(torch.nn.Module):
    """``h, c = self.cell(x_t, (h, c))`` over the steps: two tensors fed back per pass."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = torch.nn.LSTMCell(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[1], 5)
        c = torch.zeros(x.shape[1], 5)
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], (h, c))
        return h


@pytest.mark.parametrize("steps", [4, 5])
def test_a_loop_edge_counts_passes_not_tensors(steps: int) -> None:
    """An LSTMCell feeds its next pass two tensors (h and c): its self-loop stands for one
    edge per step after the first, in the view the explorer reads and in the static
    drawing alike (the convention of an RNNCell's single hidden state), not two."""
    import re

    from lurker.render import graphviz as gv

    torch.manual_seed(0)
    tr = lurker.trace(_CellLoop(), torch.randn(steps, 2, 3))
    (cell,) = [ops for ops in tr.rolled().values() if ops[0].name == "lstm_cell"]
    assert len(cell) == steps and len(cell[0].outputs) == 2
    doc = graph_view(tr)
    pos = {n["l"]: i for i, n in enumerate(doc["nodes"])}
    me = pos[cell[0].rolled]
    assert doc["nodes"][me]["p"] == steps
    assert [e for e in doc["edges"] if e[0] >= e[1]] == [[me, me, steps - 1]]
    fed = [e for e in doc["edges"] if e[1] == me and e[0] == pos["getitem_1"]]
    assert fed == [[pos["getitem_1"], me, steps]]  # x[t]: one per pass
    src = gv.to_dot(tr, rolled=True).source
    loop = re.findall(rf"r_{cell[0].rolled} -> r_{cell[0].rolled} \[label=\"(\S+)\"", src)
    assert loop == [f"{gv.TIMES}{steps - 1}"]
    # collapsed into its module's box, rolled: the box feeds itself once per step too
    src = gv.to_dot(tr, depth=0, rolled=True).source
    loop = re.findall(r"(\w+) -> \1 \[label=\"(\S+)\"", src)
    assert [label for _, label in loop] == [f"{gv.TIMES}{steps - 1}"]
