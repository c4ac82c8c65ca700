"""Drawing traces with graphviz (lurker.render.graphviz) and the text summary."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import lurker
from lurker.errors import LurkerError
from lurker.graph import edges as edges_mod
from lurker.render import graphviz as gv
from models_zoo import Branchy, Fails, Generates, ReadsEachRow, RNNLoop, Small, Twice

X = gv.TIMES  # the multiplication sign in shapes and counts
MAGIC = {".svg": b"<svg", ".png": b"\x89PNG", ".pdf": b"%PDF", ".dot": b"digraph"}


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, lurker.Trace]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()  # random init, train mode: has buffer ops too
    return model, lurker.trace(model, torch.randn(1, 3, 64, 64))


def _nodes(src: str) -> dict[str, str]:
    """Node id -> its attribute text, from a .dot source (edges and clusters excluded)."""
    out: dict[str, str] = {}
    for m in re.finditer(r"^\t+(\w+) \[(.*?)\]$", src, re.M | re.S):
        if m.group(1) not in ("graph", "node", "edge"):
            out[m.group(1)] = m.group(2)
    return out


def _edges(src: str) -> list[str]:
    return re.findall(r"^\t+\w+ -> \w+.*$", src, re.M)


def _bold(op_label: str) -> str:
    return f"<b>{op_label}</b>"


# ---------------------------------------------------------------------- formats, depth


@pytest.mark.parametrize("suffix", [".svg", ".png", ".pdf", ".dot"])
@pytest.mark.parametrize("depth", [None, 1])
def test_resnet_formats(resnet, tmp_path: Path, suffix: str, depth: int | None) -> None:
    _, tr = resnet
    out = tr.render(tmp_path / f"g{suffix}", depth=depth)
    assert out == tmp_path / f"g{suffix}"
    data = out.read_bytes()
    assert MAGIC[suffix] in data[:512]
    assert len(data) > 2000
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp file left behind
    assert out.stat().st_mode & 0o044 == 0o044  # readable by others (a web server), not 0600


def test_depth_collapses_modules(resnet, tmp_path: Path) -> None:
    _, tr = resnet
    src = tr.render(tmp_path / "d1.dot", depth=1).read_text()
    nodes = _nodes(src)
    boxes = {k: v for k, v in nodes.items() if "shape=box3d" in v}
    # layer1..layer4 each hold two BasicBlocks (depth 2): eight collapsed boxes
    assert len(boxes) == 8
    n_ops = sum(tr.ops[i].kind in ("op", "generated") for i in tr.modules["layer2.0"].ops)
    assert any("<b>layer2.0</b>" in v and f"{n_ops} ops" in v for v in boxes.values())
    params = tr.modules["layer2.0"].num_params
    assert any(f"{params:,} params" in v for v in boxes.values())

    svg = tr.render(tmp_path / "d1.svg", depth=1).read_text()
    for path, info in tr.modules.items():
        if info.depth == 1:
            assert f"{path} ({info.type})" in svg  # cluster title
    for op in tr.ops:
        depths = [p.count(".") + 1 for p, _ in op.modules]
        text = f">{op.label}<"
        if depths and max(depths) >= 2:
            assert text not in svg, op.label
        elif op.kind in ("op", "input", "output"):
            assert text in svg, op.label
    # edges into/out of a box are merged: at most one edge per drawn pair
    pairs = [re.match(r"\t+(\w+ -> \w+)", e).group(1) for e in _edges(src)]  # type: ignore[union-attr]
    assert len(pairs) == len(set(pairs))


def test_depth_zero_and_full(resnet) -> None:
    _, tr = resnet
    top = _nodes(gv.to_dot(tr, depth=0).source)
    assert "subgraph" not in gv.to_dot(tr, depth=0).source
    assert sum("box3d" in v for v in top.values()) == 10  # every child of ResNet
    full = gv.to_dot(tr).source
    assert "box3d" not in full
    assert "subgraph cluster_" in full
    assert "layer1.0.relu:2 (ReLU)" in full  # a module called twice: one cluster per pass


# ---------------------------------------------------------------------- styles


def test_inputs_green_outputs_red_params_grey() -> None:
    tr = lurker.trace(Small(), torch.randn(2, 4))
    nodes = _nodes(gv.to_dot(tr).source)
    assert "fillcolor=palegreen" in nodes["n0"] and "shape=ellipse" in nodes["n0"]
    out = tr.outputs[0].index
    assert "fillcolor=lightcoral" in nodes[f"n{out}"] and "shape=ellipse" in nodes[f"n{out}"]
    assert "fillcolor=gray85" in nodes["n1"]  # linear: has parameters
    assert f"weight 3{X}4" in nodes["n1"] and "15 params" in nodes["n1"]
    assert "fillcolor=white" in nodes["n2"]  # relu: none
    assert f"2{X}3" in nodes["n2"]
    assert "source: " in nodes["n1"] and "module: fc" in nodes["n1"]  # tooltip
    assert "FLOPs: 48" in nodes["n1"]


def test_generated_dashed() -> None:
    tr = lurker.trace(Generates(), torch.randn(2, 4))
    nodes = _nodes(gv.to_dot(tr).source)
    generated = [op for op in tr.ops if op.kind == "generated"]
    assert len(generated) >= 3
    for op in generated:
        assert 'style="dashed,filled"' in nodes[f"n{op.index}"], op.label
    for op in tr.ops:
        if op.kind == "op":
            assert "dashed" not in nodes[f"n{op.index}"]


def test_buffers_only_on_request(resnet) -> None:
    _, tr = resnet
    buffers = [op for op in tr.ops if op.kind == "buffer"]
    assert buffers
    hidden = gv.to_dot(tr).source
    shown = gv.to_dot(tr, buffers=True).source
    b = f"n{buffers[0].index}"
    assert f"\t{b} [" not in hidden and f"{b} ->" not in hidden
    assert "shape=note" in _nodes(shown)[b]
    assert f"{b} ->" in shown


def test_failed_op_red(tmp_path: Path) -> None:
    with pytest.raises(lurker.TraceError) as ei:
        lurker.trace(Fails(), torch.randn(2, 4))
    partial = ei.value.partial
    failed = partial[partial.failed_op]
    attrs = _nodes(gv.to_dot(partial).source)[f"n{failed.index}"]
    assert "color=red" in attrs and "penwidth" in attrs
    assert partial.render(tmp_path / "partial.svg").stat().st_size > 500


# ---------------------------------------------------------------------- loops, branches


def test_rolled_vs_unrolled(tmp_path: Path) -> None:
    tr = lurker.trace(RNNLoop(), torch.randn(4, 2, 3))
    unrolled = gv.to_dot(tr).source
    rolled = gv.to_dot(tr, rolled=True).source
    n_un, n_ro = _nodes(unrolled), _nodes(rolled)
    assert len(n_ro) < len(n_un)
    cells = tr.passes("rnn_tanh_cell_1")
    assert len(cells) == 4
    for op in cells:  # one node per pass when unrolled
        assert _bold(op.label) in n_un[f"n{op.index}"]
    assert sum(_bold("rnn_tanh_cell_1") in v for v in n_ro.values()) == 1
    assert f"{X}4 passes" in rolled
    assert f'label="{X}4"' in rolled  # repeated edges merged
    # the recurrence h -> cell is a back edge (self-loop) that does not bend the ranking
    loop = [e for e in _edges(rolled) if "r_rnn_tanh_cell_1 -> r_rnn_tanh_cell_1" in e]
    assert len(loop) == 1 and "constraint=false" in loop[0] and f"{X}3" in loop[0]
    assert f"cell (RNNCell) {X}4" in rolled
    assert "cell:3 (RNNCell)" in unrolled
    assert tr.render(tmp_path / "rolled.svg", rolled=True).stat().st_size > 500


def test_rolled_collapsed_module() -> None:
    tr = lurker.trace(Twice(), torch.randn(2, 4))
    src = gv.to_dot(tr, depth=0).source
    boxes = [v for v in _nodes(src).values() if "box3d" in v]
    assert sum("<b>block:1</b>" in v or "<b>block:2</b>" in v for v in boxes) == 2
    rolled = gv.to_dot(tr, depth=0, rolled=True).source
    boxes = [v for v in _nodes(rolled).values() if "box3d" in v]
    assert sum("<b>block</b>" in v and f"{X}2 passes" in v for v in boxes) == 1
    assert re.search(r"(\w+) -> \1 .*constraint=false", rolled)  # block feeds itself


@pytest.mark.parametrize(("sign", "label"), [(1.0, "THEN"), (-1.0, "ELSE")])
def test_branch_edge(sign: float, label: str) -> None:
    tr = lurker.trace(Branchy(), sign * torch.ones(2, 4))
    src = gv.to_dot(tr).source
    readout = tr.branches[0]
    assert "shape=diamond" in _nodes(src)[f"n{readout.index}"]
    assert f"bool → {sign > 0}" in src
    branch = [e for e in _edges(src) if e.strip().startswith(f"n{readout.index} ->")]
    assert len(branch) == 1
    assert f"label={label}" in branch[0] and "dashed" in branch[0]
    nxt = next(op for op in tr.ops[readout.index + 1 :] if op.kind == "op")
    assert f"-> n{nxt.index}" in branch[0]


def test_branch_labels_for_values() -> None:
    assert edges_mod.branch_label(True) == "THEN"
    assert edges_mod.branch_label(False) == "ELSE"
    assert edges_mod.branch_label(3) == "= 3"
    assert edges_mod.branch_label(0.5) == "= 0.5"


def test_rolled_readout_draws_one_branch_edge() -> None:
    """A rolled readout that read another value on every pass draws one dashed edge to the
    op after it, labelled with the distinct values and the pass count: one edge per value
    (Keypoint R-CNN's 100 box sizes) made dot lay out a hundred parallel labelled edges."""
    tr = lurker.trace(ReadsEachRow(), torch.arange(24.0).reshape(6, 4))
    src = gv.to_dot(tr, rolled=True).source
    branch = [e for e in _edges(src) if e.strip().startswith("r_item_1 ->")]
    assert len(branch) == 1 and "-> r_getitem_2" in branch[0] and "dashed" in branch[0]
    assert f'label="= 0.0 / 4.0 / 8.0 / ... {X}6"' in branch[0]
    # unrolled, each pass keeps its own edge and value
    unrolled = [e for e in _edges(gv.to_dot(tr).source) if 'label="= ' in e]
    assert len(unrolled) == 6


def test_branch_labels_of_a_rolled_readout() -> None:
    from lurker.graph.drawn import branch_labels

    assert branch_labels(["THEN", "ELSE"]) == "THEN / ELSE"
    assert branch_labels(["= 1", "= 2", "= 3", "= 4"]) == "= 1 / 2 / 3 / ..."


@pytest.mark.parametrize(
    ("model", "x"),
    [
        (Branchy(), torch.ones(2, 4)),
        (Branchy(), -torch.ones(2, 4)),
        (Twice(), torch.randn(2, 4)),
        (RNNLoop(), torch.randn(4, 2, 3)),
        (Generates(), torch.randn(2, 4)),
    ],
    ids=["then", "else", "twice", "rnn", "generates"],
)
def test_drawn_edges_are_the_graphs_edges(model: nn.Module, x: torch.Tensor) -> None:
    """At full depth, unrolled (every op its own node ``n<index>``), the drawing has exactly
    the edges of ``lurker.graph.edges``, data and branch alike, each once with its label:
    the drawing and the graph's users see one edge list."""
    tr = lurker.trace(model, x)
    drawn = []
    for line in _edges(gv.to_dot(tr, auto_roll=False).source):
        if "invis" in line:  # layout anchors, not edges of the graph
            continue
        src, dst = re.match(r"\t+(\w+) -> (\w+)", line).groups()  # type: ignore[union-attr]
        label = re.search(r"label=([^\s\]]+)", line)
        drawn.append((src, dst, label.group(1).strip('"') if label else None))
    want = {(f"n{e.src}", f"n{e.dst}", e.label) for e in edges_mod.edges(tr)}
    assert len(drawn) == len(set(drawn))
    assert set(drawn) == want


class Constants(nn.Module):
    """Eight tensors made from nothing the graph records (``torch.full``), one after the
    other, then summed with the input: a run of nodes nothing flows into, as Keypoint
    R-CNN's anchor generator and image-size constants make."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x)
        consts = [torch.full((4,), float(i)) for i in range(8)]
        return y + torch.stack(consts).sum(0)


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs graphviz's dot")
def test_unfed_nodes_sit_where_they_ran_without_adding_ranks() -> None:
    """A node nothing flows into is tied (invisibly) to the node drawn before it: in dot's
    own layout (``-Tplain``) it is never above that node, and a run of them shares ranks
    instead of stacking one rank each (which made Keypoint R-CNN's drawing hundreds of
    ranks taller and its long edges slow for dot to route)."""
    tr = lurker.trace(Constants(), torch.randn(2, 4))
    src = gv.to_dot(tr, auto_roll=False).source
    ties = [
        re.match(r"\t+(\w+) -> (\w+)", line).groups() for line in _edges(src) if "invis" in line
    ]  # type: ignore[union-attr]
    fulls = {f"n{op.index}" for op in tr.ops if op.name == "full"}
    assert len(fulls) == 8 and {b for _, b in ties} >= fulls
    plain = subprocess.run(
        ["dot", "-Tplain"], input=src, capture_output=True, text=True, check=True
    ).stdout
    y = {p[1]: float(p[3]) for p in (ln.split() for ln in plain.splitlines()) if p[0] == "node"}
    for a, b in ties:  # plain's y grows upwards: a tied node is at or below its anchor
        assert y[b] <= y[a] + 1e-6, (a, b)
    # before: each tie forced a rank, eight constants took eight ranks
    assert len({y[n] for n in fulls}) <= 2


# ---------------------------------------------------------------------- errors


def test_bad_suffix(tmp_path: Path) -> None:
    tr = lurker.trace(Small(), torch.randn(2, 4))
    with pytest.raises(LurkerError, match=r"\.svg.*\.pdf.*\.png.*\.dot"):
        tr.render(tmp_path / "g.jpeg")
    with pytest.raises(LurkerError, match="direction"):
        tr.render(tmp_path / "g.svg", direction="UP")
    assert not list(tmp_path.iterdir())


def test_missing_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tr = lurker.trace(Small(), torch.randn(2, 4))
    monkeypatch.setattr(gv.shutil, "which", lambda name: None)
    with pytest.raises(LurkerError, match="apt-get install graphviz") as ei:
        tr.render(tmp_path / "g.svg")
    assert "brew install graphviz" in str(ei.value) and ".dot" in str(ei.value)
    assert tr.render(tmp_path / "g.dot").read_text().startswith("digraph")


# ---------------------------------------------------------------------- a big model


class _Block(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(8, 8), nn.ReLU())


def big_model(groups: int = 10, stages: int = 5, blocks: int = 20) -> nn.Module:
    """groups x stages x blocks x (Linear, ReLU): 2,000 ops in four levels of nesting."""
    return nn.Sequential(
        *[
            nn.Sequential(
                *[nn.Sequential(*[_Block() for _ in range(blocks)]) for _ in range(stages)]
            )
            for _ in range(groups)
        ]
    )


def test_big_model_renders(tmp_path: Path) -> None:
    tr = lurker.trace(big_model(), torch.randn(2, 8), save="none")
    assert tr.num_ops == 2000
    t0 = time.perf_counter()
    out = tr.render(tmp_path / "big.svg")
    dt = time.perf_counter() - t0
    print(f"\n2,000-op model rendered to SVG in {dt:.2f} s")
    assert out.stat().st_size > 100_000
    assert out.read_text().rstrip().endswith("</svg>")


# ---------------------------------------------------------------------- long loops


class PerRoi(nn.Module):
    """A loop over rows that reads shared tensors each pass and writes into one result, as
    detection models post-process each box: cheap to run, slow for dot to lay out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, s = x.sum(1), x.mean(1)
        out = torch.zeros_like(x)
        for i in range(x.shape[0]):
            out[i] = torch.relu(x[i] * w[i] + s[i])
        return out


def _drawn(src: str, tr: lurker.Trace) -> dict[int, str]:
    """Op index -> the id of the node that draws it (its own, or its rolled op's)."""
    nodes = _nodes(src)
    out: dict[int, str] = {}
    for op in tr.ops:
        for nid in (f"n{op.index}", f"r_{op.rolled}"):
            if nid in nodes:
                out[op.index] = nid
    return out


def test_long_loop_rolled_automatically(tmp_path: Path) -> None:
    tr = lurker.trace(PerRoi(), torch.randn(150, 4))
    with pytest.warns(UserWarning, match="loops drawn rolled") as rec:
        src = gv.to_dot(tr).source
    assert "auto_roll=False" in str(rec[0].message)
    with pytest.warns(UserWarning, match="loops drawn rolled") as rec:
        tr.render(tmp_path / "rolled.dot")  # through the public method too
    assert rec[0].filename == __file__  # the user's line, not lurker's
    long = {op.rolled for op in tr.ops if op.num_passes == 150}
    assert len(long) >= 5  # getitem x3, mul, add, relu, setitem
    assert f"{len(long)} ops that ran 150 times are drawn once each" in src  # the title
    drawn = _drawn(src, tr)
    nodes = _nodes(src)
    for op in tr.ops:  # every op is drawn: its own node, or its rolled op's with the pass count
        nid = drawn[op.index]
        if op.rolled in long:
            assert nid == f"r_{op.rolled}" and f"{X}150 passes" in nodes[nid], op.label
        else:
            assert nid == f"n{op.index}", op.label
    # the shared tensors feed the rolled op 150 times: one edge, counted
    w = next(op for op in tr.ops if op.label == "sum_1")
    edge = [e for e in _edges(src) if e.strip().startswith(f"n{w.index} -> r_")]
    assert len(edge) == 1 and f"{X}150" in edge[0]
    with pytest.warns(UserWarning):
        svg = tr.render(tmp_path / "loop.svg").read_text()
    assert "loops drawn rolled" in svg and "</svg>" in svg


def test_auto_roll_off_and_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    tr = lurker.trace(RNNLoop(), torch.randn(12, 2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # small: drawn unrolled, no warning
        plain = gv.to_dot(tr).source
    assert "loops drawn rolled" not in plain
    assert all(nid.startswith("n") for nid in _drawn(plain, tr).values())

    monkeypatch.setattr(gv, "ROLL_COST", 1)  # pretend it is too big for dot
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gv.to_dot(tr, auto_roll=False).source == plain
        assert "loops drawn rolled" not in gv.to_dot(tr, rolled=True).source
    with pytest.warns(UserWarning, match="ran 12 times"):
        src = gv.to_dot(tr).source
    # the cell and input modules ran 12 times: one cluster each, rolled; head ran once
    assert f"cell (RNNCell) {X}12" in src and "cell:3" not in src
    assert "head (Linear)" in src
    drawn = _drawn(src, tr)
    assert len(drawn) == len(tr.ops)
    for op in tr.ops:
        assert drawn[op.index] == (f"r_{op.rolled}" if op.num_passes == 12 else f"n{op.index}")

    with pytest.warns(UserWarning, match="ops and modules that ran 12 times"):
        top = gv.to_dot(tr, depth=0).source  # the cell's calls collapse into one box
    boxes = [v for v in _nodes(top).values() if "box3d" in v]
    assert sum("<b>cell</b>" in v and f"{X}12 passes" in v for v in boxes) == 1

    monkeypatch.setattr(gv, "ROLL_MIN_PASSES", 13)  # no loop long enough to roll
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gv.to_dot(tr).source == plain


def test_auto_roll_labels_only_the_drawing_it_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizing a candidate drawing (every pass, then rolled) makes no labels or dot source:
    only the drawing returned is made, each drawn op labelled once (building the rejected
    unrolled drawing too was half of our own time on Keypoint R-CNN)."""
    tr = lurker.trace(RNNLoop(), torch.randn(12, 2, 3))
    monkeypatch.setattr(gv, "ROLL_COST", 1)  # pretend it is too big for dot
    labelled: list[str] = []
    real = gv._op_attrs

    def counting(trace: lurker.Trace, group: list, rolled: bool) -> dict[str, str]:
        labelled.append(group[0].label)
        return real(trace, group, rolled)

    monkeypatch.setattr(gv, "_op_attrs", counting)
    with pytest.warns(UserWarning, match="ran 12 times"):
        src = gv.to_dot(tr).source
    assert sorted(labelled) == sorted(set(labelled))  # each drawn node labelled once
    assert len(labelled) == len(_nodes(src))  # and only the nodes of this drawing


def _strip_edge_labels(src: str) -> str:
    """``src`` with the labels of its edges taken out (node and cluster labels kept)."""
    label = re.compile(r'\bx?label=(?:"[^"]*"|[^\s\]]+) ?')
    return "\n".join(label.sub("", ln) if " -> " in ln else ln for ln in src.split("\n"))


def _plain_height(src: str) -> float:
    out = subprocess.run(["dot", "-Tplain"], input=src.encode(), capture_output=True, check=True)
    return float(out.stdout.split(b"\n", 1)[0].split()[3])  # "graph SCALE WIDTH HEIGHT"


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs graphviz's dot")
@pytest.mark.parametrize(
    ("model", "x"), [(RNNLoop(), torch.randn(4, 2, 3)), (Branchy(), torch.ones(2, 4))]
)
def test_edge_labels_add_no_ranks(
    model: nn.Module, x: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a big graph, pass counts and branch values on edges are drawn beside them: the
    layout is exactly as tall as with no edge labels at all (dot's ordinary edge labels
    doubled every rank, which made spline routing most of dot's time on Keypoint R-CNN), and
    the labels are drawn. A small graph keeps ordinary labels (placed clear of clusters)."""
    tr = lurker.trace(model, x)
    small = gv.to_dot(tr, rolled=True).source
    assert [e for e in _edges(small) if " label=" in e or "[label=" in e]
    assert not [e for e in _edges(small) if "xlabel=" in e]
    monkeypatch.setattr(gv, "BIG_GRAPH", 0)  # these small graphs drawn as big ones are
    src = gv.to_dot(tr, rolled=True).source
    assert [e for e in _edges(src) if "xlabel=" in e]
    labels = [e for e in _edges(src) if "label=" in e]
    assert labels  # the test means something: this drawing has edge labels
    bare = _strip_edge_labels(src)
    assert not [e for e in _edges(bare) if "label=" in e]
    assert _plain_height(src) == _plain_height(bare)
    svg = tr.render(tmp_path / "g.svg", rolled=True).read_text()
    want = f"{X}4" if isinstance(model, RNNLoop) else "THEN"
    assert f">{want}</text>" in svg


# ---------------------------------------------------------------------- dot failures


def _fake_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Put a `dot` that runs ``script`` (sh) first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "dot"
    exe.write_text("#!/bin/sh\n" + script + "\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_dot_crash_says_signal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tr = lurker.trace(Small(), torch.randn(2, 4))
    _fake_dot(tmp_path, monkeypatch, "cat > /dev/null; kill -SEGV $$")
    with pytest.raises(LurkerError) as ei:
        tr.render(tmp_path / "g.svg")
    msg = str(ei.value)
    assert "g.svg" in msg and "SIGSEGV" in msg and "crashed" in msg and "printed nothing" in msg
    assert not (tmp_path / "g.svg").exists()


def test_dot_error_shows_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tr = lurker.trace(Small(), torch.randn(2, 4))
    _fake_dot(
        tmp_path, monkeypatch, "cat > /dev/null; echo 'Error: syntax error in line 3' >&2; exit 3"
    )
    with pytest.raises(LurkerError, match=r"status 3.*syntax error in line 3"):
        tr.render(tmp_path / "g.png")


def test_dot_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tr = lurker.trace(Small(), torch.randn(2, 4))
    _fake_dot(tmp_path, monkeypatch, "exec sleep 30")
    t0 = time.perf_counter()
    with pytest.raises(LurkerError, match=r"within 0.5 s.*depth=2.*timeout=None"):
        tr.render(tmp_path / "g.svg", timeout=0.5)
    assert time.perf_counter() - t0 < 20  # dot was stopped, not waited for
    with pytest.raises(LurkerError, match="timeout must be"):
        tr.render(tmp_path / "g.svg", timeout=0)


def test_dot_crash_retried_with_less_truncation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """graphviz 2.43 segfaults on some graphs when nslimit cuts its network simplex short
    (train-mode fasterrcnn_mobilenet_v3_large_fpn, fcos): the drawing is retried with a
    larger limit. The fake dot crashes unless the retry's limit is in its input."""
    real = shutil.which("dot")
    assert real is not None
    monkeypatch.setattr(gv, "BIG_GRAPH", 0)  # every graph gets the layout limits
    tr = lurker.trace(Small(), torch.randn(2, 4))
    src = tmp_path / "in.dot"
    _fake_dot(
        tmp_path,
        monkeypatch,
        f'cat > {src}; grep -q "nslimit=5" {src} || kill -SEGV $$; exec {real} "$@" {src}',
    )
    out = tr.render(tmp_path / "g.svg")
    assert out.read_text().rstrip().endswith("</svg>")

    _fake_dot(
        tmp_path, monkeypatch, "cat > /dev/null; echo 'trouble in init_rank' >&2; kill -ABRT $$"
    )
    with pytest.raises(LurkerError) as ei:
        tr.render(tmp_path / "h.svg")
    msg = str(ei.value)
    assert msg.count("SIGABRT") == 1 + len(gv.CRASH_RETRIES)  # every attempt, each reason
    assert "trouble in init_rank" in msg


@pytest.mark.skipif(not os.environ.get("LURKER_SLOW"), reason="slow (minutes): LURKER_SLOW=1")
@pytest.mark.parametrize(
    "name",
    ["fasterrcnn_mobilenet_v3_large_fpn", "fcos_resnet50_fpn", "retinanet_resnet50_fpn"],
)
def test_train_mode_detection_draws(tmp_path: Path, name: str) -> None:
    """These crashed graphviz 2.43 (SIGSEGV) and were reported with an empty reason."""
    torch.manual_seed(0)
    model = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None)
    target = {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])}
    tr = lurker.trace(model.train(), [torch.rand(3, 128, 128)], [target], save="none")
    svg = tr.render(tmp_path / "g.svg").read_text()
    assert svg.rstrip().endswith("</svg>")
    for op in tr.ops:
        if op.kind == "op":
            assert f">{op.label}<" in svg, op.label


@pytest.mark.skipif(not os.environ.get("LURKER_SLOW"), reason="slow (minutes): LURKER_SLOW=1")
def test_keypointrcnn_full_depth_draws(tmp_path: Path) -> None:
    """3,900 ops, 100 passes of the keypoint loop: dot ran for minutes before the loop was
    rolled automatically."""
    torch.manual_seed(1)  # this seed keeps 100 detections
    model = torchvision.models.detection.keypointrcnn_resnet50_fpn(
        weights=None, weights_backbone=None
    )
    with torch.no_grad():
        tr = lurker.trace(model.eval(), [torch.rand(3, 128, 128)], save="none")
    assert tr.num_ops > 3000
    with pytest.warns(UserWarning, match="ran 100 times"):
        svg = tr.render(tmp_path / "g.svg", timeout=300).read_text()
    assert svg.rstrip().endswith("</svg>")
    for op in tr.ops:
        if op.kind == "op":
            shown = op.rolled if op.num_passes >= 100 else op.label
            assert f">{shown}<" in svg, op.label


# ---------------------------------------------------------------------- summary


def test_summary_resnet(resnet) -> None:
    model, tr = resnet
    text = tr.summary()
    n_params = sum(p.numel() for p in model.parameters())
    assert f"Params:      {n_params:,}" in text
    assert f"Ops:         {tr.num_ops}" in text
    assert "Recurrent:   no" in text and "Branching:   no" in text
    assert "├─conv1 (Conv2d)" in text and "[1, 64, 32, 32]" in text
    assert "layer1.0.relu:2 (ReLU)" in text  # a module called twice: a row per pass
    assert "└─fc (Linear)" in text
    rows = [ln for ln in text.splitlines() if "─" in ln]
    assert len(rows) == sum(max(info.num_passes, 0) for p, info in tr.modules.items() if p)
    # the conv1 row: its params and FLOPs
    conv1 = next(ln for ln in rows if "conv1 (Conv2d)" in ln)
    assert "9,408" in conv1 and "19.27M" in conv1
    assert text == tr.summary()  # deterministic

    top = tr.summary(depth=1)
    assert "layer1 (Sequential)" in top and "layer1.0" not in top
    assert f"{n_params:,}" in top


def test_summary_loop_and_partial() -> None:
    tr = lurker.trace(RNNLoop(), torch.randn(4, 2, 3))
    text = tr.summary()
    assert "cell:4 (RNNCell)" in text and "(reused)" in text
    assert "Recurrent:   yes" in text
    with pytest.raises(lurker.TraceError) as ei:
        lurker.trace(Fails(), torch.randn(2, 4))
    assert "partial: failed at" in ei.value.partial.summary()
