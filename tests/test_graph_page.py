"""The graph page in a real browser (Debian's chromium via Playwright) over the real server.

Runs: the digits CNN (the explorer's shared test run), resnet18 (random init, probed on
CPU on four random images), a flat Sequential too big for dagre and a small loop. What the
page draws is checked against the graph view document, read independently here: which
nodes and collapsed groups a first view shows, what expanding a group adds, that every
drawn edge starts and ends on a drawn item and no forward edge passes under a node (skip
connections into a block), search, the hover tooltip's shape and when it hides, the
legend, the colour code, ``?focus=`` and layer links.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import torch
import torch.nn.functional as F

from explorer_fixtures import ExplorerRun, explorer_run  # noqa: F401
from models_zoo import Pyramid

CHROMIUM = Path("/usr/bin/chromium")
STATIC = Path(__file__).resolve().parents[1] / "src" / "lurker" / "server" / "static"

if not CHROMIUM.exists():
    pytest.skip(
        "the browser tests need Debian's chromium at /usr/bin/chromium", allow_module_level=True
    )
if not (STATIC / "index.html").exists():
    pytest.skip(f"the front end is not built ({STATIC}): run `make web`", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")
pytest.importorskip("uvicorn")


# ---------------------------------------------------------------------- oracle


class Expect:
    """What the page should draw for a graph view document and a set of open groups,
    derived here from the document alone (the module tree and each node's group)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        groups = doc["groups"]
        self.chain: list[list[int]] = []
        for g in range(len(groups)):
            c = [g]
            while c[-1] != 0:
                c.append(groups[c[-1]].get("u", 0))
            self.chain.append(c[::-1])
        # a group of at most one node, or whose calls are drawn apart, is drawn as its nodes
        self.thin = [
            g != 0 and (groups[g].get("N", 0) <= 1 or groups[g].get("s") == 1)
            for g in range(len(groups))
        ]

    def default_open(self) -> set[int]:
        groups = self.doc["groups"]
        return {0} | {
            g
            for g in range(1, len(groups))
            if len(self.chain[g]) - 1 <= 1 and not self.thin[g] and groups[g].get("N", 0) > 0
        }

    def drawn_as(self, k: int, open_: set[int]) -> str:
        for g in self.chain[self.doc["nodes"][k].get("m", 0)][1:]:
            if self.thin[g]:  # drawn as its nodes; its subgroups are drawn on their own
                continue
            if g not in open_:
                return f"g{g}"
        return f"n{k}"

    def items(self, open_: set[int]) -> set[str]:
        return {self.drawn_as(k, open_) for k in range(len(self.doc["nodes"]))}

    def edges(self, open_: set[int]) -> set[tuple[str, str]]:
        out = set()
        for e in self.doc["edges"]:
            a, b = self.drawn_as(e[0], open_), self.drawn_as(e[1], open_)
            if a != b or (e[0] == e[1] and a[0] == "n"):
                out.add((a, b))
        return out


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torchvision
    from torch.utils.data import TensorDataset

    from lurker.probe import probe

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("graph-page") / "resnet18"
    data = TensorDataset(torch.randn(4, 3, 64, 64), torch.zeros(4, dtype=torch.long))
    model = torchvision.models.resnet18().eval()
    run = probe(model, data, out=out, layers=["layer3.0.conv1"], k=2, batch_size=4, progress=False)
    assert run is not None
    run.close()
    return out


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Sequential of 600 leaf layers: a group too big for dagre (the page lays it out
    with its linear-time fallback)."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from lurker.probe import probe

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("graph-page") / "flat"
    model = nn.Sequential(*[nn.Linear(4, 4) if i % 2 == 0 else nn.ReLU() for i in range(600)])
    data = TensorDataset(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))
    run = probe(model, data, out=out, layers=["0"], k=2, batch_size=4, progress=False)
    assert run is not None
    run.close()
    return out


class Loop(torch.nn.Module):
    """A cell applied three times: its ops roll into one node each, with a back edge from
    its last op to its first past a wide branch (``layer_norm``) and a node beside it
    (``tanh``), and an op that feeds its own next pass (``mul``: a self-loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = torch.nn.Linear(4, 4)
        self.gate = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x
        for _ in range(3):
            h = self.cell(x)
            x = torch.tanh(h) + F.layer_norm(torch.sigmoid(self.gate(h)), (4,))
            s = s * 0.5
        return self.head(x + s)


def _probed(factory: pytest.TempPathFactory, name: str, make: Any, layer: str) -> Path:
    """A run of ``make()`` (seeded) over four random 4-vectors, probing ``layer``."""
    from torch.utils.data import TensorDataset

    from lurker.probe import probe

    torch.manual_seed(0)
    out = factory.mktemp("graph-page") / name
    data = TensorDataset(torch.randn(4, 4), torch.zeros(4, dtype=torch.long))
    run = probe(make().eval(), data, out=out, layers=[layer], k=2, batch_size=4, progress=False)
    assert run is not None
    run.close()
    return out


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _probed(tmp_path_factory, "loop", Loop, "head")


@pytest.fixture(scope="module")
def pyramid_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A feature pyramid's ModuleList whose blocks run between ops outside it, then Faster
    R-CNN's box decoding: many small ops side by side, where dagre's routes cut corners."""
    return _probed(tmp_path_factory, "pyramid", lambda: Pyramid(decode=True), "outs.0.0")


class _DenseLayer(torch.nn.Module):
    """Reads the concatenation of every feature before it, as torchvision's DenseNet layer."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(cin, 2)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.relu(self.fc(torch.cat(feats, 1)))


class _DenseBlock(torch.nn.ModuleDict):
    def __init__(self, layers: int) -> None:
        super().__init__({f"layer{i + 1}": _DenseLayer(2 * (i + 1)) for i in range(layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.values():
            feats.append(layer(feats))
        return torch.cat(feats, 1)


class Dense(torch.nn.Module):
    """A dense block of ten layers: each reads every earlier layer's output and the block's
    input, 66 edges between 11 items (DenseNet's ``denseblock3`` has 300)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Linear(4, 2)
        self.block = _DenseBlock(10)
        self.head = torch.nn.Linear(22, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _probed(tmp_path_factory, "dense", Dense, "head")


class Residuals(torch.nn.Module):
    """A loop over a ModuleList of 60 blocks, ``x = x + block(x)``: the ``add`` rolls into
    one node of 60 passes, fed back by 59 blocks drawn apart (a back edge from each)."""

    def __init__(self, n: int = 60) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()) for _ in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


@pytest.fixture(scope="module")
def residuals_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _probed(tmp_path_factory, "residuals", Residuals, "blocks.0.0")


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,600 residual blocks (4,800 ops): a first view of 1,603 items, one row of boxes
    hundreds of thousands of pixels wide."""
    return _probed(tmp_path_factory, "long", lambda: Residuals(1600), "blocks.0.0")


@pytest.fixture(scope="module")
def servers(
    explorer_run: ExplorerRun,  # noqa: F811
    resnet_run: Path,
    flat_run: Path,
    loop_run: Path,
    pyramid_run: Path,
    dense_run: Path,
    residuals_run: Path,
    long_run: Path,
) -> Iterator[dict[str, str]]:
    """One explorer server per run (uvicorn threads on free ports): run id -> base URL."""
    from lurker.server import create_app
    from lurker.server.serve import background

    with contextlib.ExitStack() as stack:
        yield {
            path.name: stack.enter_context(background(create_app(path)))
            for path in (
                explorer_run.path,
                resnet_run,
                flat_run,
                loop_run,
                pyramid_run,
                dense_run,
                residuals_run,
                long_run,
            )
        }


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    pg.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    yield pg
    ctx.close()
    assert not errors, f"console errors: {errors}"


RUNS = ["digits", "resnet18", "flat", "loop", "pyramid", "dense", "residuals"]


def open_graph(page: Any, servers: dict[str, str], run: str, query: str = "") -> dict[str, Any]:
    url = servers[run]
    doc = page.request.get(f"{url}api/runs/{run}/graph").json()
    page.goto(f"{url}#/r/{run}/graph{query}")
    page.wait_for_selector(".graph-page[data-ready]", state="attached", timeout=30_000)
    return doc


def drawn(page: Any) -> set[str]:
    return set(
        page.eval_on_selector_all("svg.graph .nd, svg.graph .box", "es => es.map(e => e.dataset.k)")
    )


def wait_draw(page: Any, before: int) -> None:
    page.wait_for_function(
        "n => +document.querySelector('.graph-page').dataset.draws > n", arg=before, timeout=15_000
    )


def draws(page: Any) -> int:
    return int(page.get_attribute(".graph-page", "data-draws"))


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("run", RUNS)
def test_first_view_matches_the_document(page: Any, servers: dict[str, str], run: str) -> None:
    doc = open_graph(page, servers, run)
    ex = Expect(doc)
    open_ = ex.default_open()
    assert drawn(page) == ex.items(open_)
    assert int(page.get_attribute(".graph-page", "data-drawn")) == len(ex.items(open_))
    frames = set(page.eval_on_selector_all("svg.graph .frame", "es => es.map(e => e.dataset.k)"))
    assert frames == {f"g{g}" for g in open_ if g}
    pairs = page.eval_on_selector_all(
        "svg.graph path.e", "es => es.map(e => [e.dataset.a, e.dataset.b])"
    )
    assert {tuple(p) for p in pairs} == ex.edges(open_)
    assert _edge_ends_on_items(page) == []
    assert _edges_under_nodes(page) == []


def _edge_ends_on_items(page: Any) -> list[str]:
    """Edges whose first point is not on their source's box or whose last is not on their
    target's (tolerance 4 px), in the SVG's user space."""
    return page.evaluate(
        """() => {
        const bad = [];
        const box = k => document.querySelector(`svg.graph [data-k="${k}"]`).getBBox();
        const near = (p, b) => p.x >= b.x - 4 && p.x <= b.x + b.width + 4
                             && p.y >= b.y - 4 && p.y <= b.y + b.height + 4;
        for (const e of document.querySelectorAll('svg.graph path.e')) {
          const len = e.getTotalLength();
          const s = e.getPointAtLength(0), t = e.getPointAtLength(len);
          if (!near(s, box(e.dataset.a)) || !near(t, box(e.dataset.b)))
            bad.push(`${e.dataset.a}->${e.dataset.b}`);
        }
        return bad;
      }"""
    )


@pytest.mark.parametrize("run", ["digits", "resnet18"])
def test_expand_a_group(page: Any, servers: dict[str, str], run: str) -> None:
    doc = open_graph(page, servers, run)
    ex = Expect(doc)
    open_ = ex.default_open()
    assert _edge_ends_on_items(page) == []
    boxes = sorted(k for k in drawn(page) if k[0] == "g")
    if not boxes:  # the digits CNN: every group is open at depth 1; close one first
        g = min(g for g in open_ if g)
        before = draws(page)
        page.click(f'svg.graph .frame[data-k="g{g}"] > .title')
        wait_draw(page, before)
        open_.discard(g)
        assert drawn(page) == ex.items(open_)
        boxes = [f"g{g}"]
    g = int(boxes[0][1:])
    before = draws(page)
    page.click(f'svg.graph .box[data-k="g{g}"]')
    wait_draw(page, before)
    open_.add(g)
    now = drawn(page)
    assert now == ex.items(open_)
    inside = {
        ex.drawn_as(k, open_) for k, n in enumerate(doc["nodes"]) if g in ex.chain[n.get("m", 0)]
    }
    assert inside and inside <= now and f"g{g}" not in now
    pairs = page.eval_on_selector_all(
        "svg.graph path.e", "es => es.map(e => [e.dataset.a, e.dataset.b])"
    )
    assert {tuple(p) for p in pairs} == ex.edges(open_)
    assert _edge_ends_on_items(page) == []
    assert _edges_under_nodes(page) == []
    # every item inside the opened group is connected: an edge arrives or leaves
    ends = {a for a, _ in pairs} | {b for _, b in pairs}
    assert inside <= ends
    if run == "resnet18":  # no loops: a back edge would be a reused module drawn as one box
        assert page.locator("svg.graph path.e.back").count() == 0
    assert float(page.get_attribute(".graph-page", "data-expand-ms")) < 2000


def _edges_under_nodes(page: Any, only_into: str | None = None, back: bool = False) -> list[str]:
    """Forward edges (or with ``back``, back edges and self-loops; all, or those into item
    ``only_into``) that pass under a drawn node or closed box other than their own ends:
    their paths sampled every 3 px in the SVG's user space against each item's box shrunk
    by 2 px (`a -> b under item`)."""
    return page.evaluate(
        """([into, back]) => {
        const items = [...document.querySelectorAll('svg.graph .nd, svg.graph .box')]
          .map(e => [e.dataset.k, e.getBBox()]);
        const bad = [];
        const sel = 'svg.graph path.e' + (back ? '.back' : ':not(.back)')
          + (into ? `[data-b="${into}"]` : '');
        for (const e of document.querySelectorAll(sel)) {
          const len = e.getTotalLength();
          for (let t = 0; t <= len; t += 3) {
            const p = e.getPointAtLength(t);
            const hit = items.find(([k, b]) => k !== e.dataset.a && k !== e.dataset.b
              && p.x > b.x + 2 && p.x < b.x + b.width - 2 && p.y > b.y + 2 && p.y < b.y + b.height - 2);
            if (hit) { bad.push(`${e.dataset.a} -> ${e.dataset.b} under ${hit[0]}`); break; }
          }
        }
        return bad;
      }""",
        [only_into, back],
    )


def test_skip_edges_go_around_the_block(page: Any, servers: dict[str, str]) -> None:
    """ResNet's skip connection into a block's ``add`` comes from outside the block (the
    block's input): it is drawn beside the block's chain, not under its nodes, so every
    ``add`` visibly has its two inputs."""
    doc = open_graph(page, servers, "resnet18", "?focus=add__1")
    labels = [n["l"] for n in doc["nodes"]]
    k = labels.index("add__1")
    ex = Expect(doc)
    open_ = {0} | {g for g in ex.chain[doc["nodes"][k].get("m", 0)] if not ex.thin[g]}
    into = page.eval_on_selector_all(
        f'svg.graph path.e[data-b="n{k}"]', "es => es.map(e => e.dataset.a)"
    )
    sources = {ex.drawn_as(s, ex.default_open() | open_) for s, d, *_ in doc["edges"] if d == k}
    assert len(into) == 2 and set(into) == sources
    # one input comes from outside the block: the skip edge crosses the block's frame
    block = doc["nodes"][k].get("m", 0)
    assert any(block not in ex.chain[doc["nodes"][int(a[1:])].get("m", 0)] for a in into)
    assert _edges_under_nodes(page, f"n{k}") == []
    assert _edge_ends_on_items(page) == []
    # every block open: no forward edge passes under a node anywhere
    before = draws(page)
    while page.locator("svg.graph .box").count():  # (boxes may lie outside the canvas)
        page.locator("svg.graph .box").first.dispatch_event("click")
        wait_draw(page, before)
        before = draws(page)
    adds = [i for i, n in enumerate(doc["nodes"]) if n["t"] in ("add", "add_")]
    assert len(adds) == 8  # one per BasicBlock
    for a in adds:
        assert page.locator(f'svg.graph path.e[data-b="n{a}"]').count() == 2, labels[a]
    assert _edges_under_nodes(page) == []
    assert _edge_ends_on_items(page) == []


def test_a_container_run_between_ops_draws_no_loop(page: Any, servers: dict[str, str]) -> None:
    """A ModuleList whose blocks each run after an op outside it that feeds them (FPN's
    ``layer_blocks``) is not drawn as one box that the op feeds from below, a loop the
    model does not have: its blocks are items beside that op, opened and closed on their
    own. With every box open, no edge is drawn backwards, none passes under a node (the
    box decoding's side-by-side ops), and each starts and ends on its items."""
    doc = open_graph(page, servers, "pyramid")
    ex = Expect(doc)
    outs = next(g for g, grp in enumerate(doc["groups"]) if grp["p"] == "outs")
    assert ex.thin[outs]
    blocks = {f"g{g}" for g, grp in enumerate(doc["groups"]) if grp["p"] in ("outs.0", "outs.1")}
    assert blocks <= drawn(page) and f"g{outs}" not in drawn(page)
    assert page.locator("svg.graph path.e.back").count() == 0
    assert "loop" not in page.inner_text(".graph-legend")
    open_ = ex.default_open()
    before = draws(page)
    while page.locator("svg.graph .box").count():
        k = page.locator("svg.graph .box").first.get_attribute("data-k")
        page.locator("svg.graph .box").first.dispatch_event("click")
        wait_draw(page, before)
        before = draws(page)
        open_.add(int(k[1:]))
    assert drawn(page) == ex.items(open_)
    assert page.locator("svg.graph path.e.back").count() == 0
    assert _edges_under_nodes(page) == []
    assert _edge_ends_on_items(page) == []


def test_dense_block_edges_share_trunks(page: Any, servers: dict[str, str]) -> None:
    """A dense block (every layer reads every earlier output: DenseNet) is drawn as a bus,
    not a tangle: the items stand in one column in execution order, and the edges out of
    each source that another path already implies leave it on one vertical trunk beside
    every item, with a tap into each target. Every edge of the document is still drawn
    once, from its source to its target, under no node."""
    doc = open_graph(page, servers, "dense")
    ex = Expect(doc)
    block = next(g for g, grp in enumerate(doc["groups"]) if grp["p"] == "block")
    layers = [
        f"g{g}" for g, grp in enumerate(doc["groups"]) if grp.get("u") == block
    ]  # in execution order
    assert len(layers) == 10 and set(layers) <= drawn(page)
    pairs = page.eval_on_selector_all(
        "svg.graph path.e", "es => es.map(e => [e.dataset.a, e.dataset.b])"
    )
    assert sorted(map(tuple, pairs)) == sorted(ex.edges(ex.default_open()))
    assert _edge_ends_on_items(page) == []
    assert _edges_under_nodes(page) == []
    boxes = page.evaluate(
        """ks => ks.map(k => { const b = document.querySelector(`[data-k="${k}"]`).getBBox();
          return [b.x, b.y, b.width, b.height]; })""",
        layers,
    )
    assert [b[1] for b in boxes] == sorted(b[1] for b in boxes)  # one column, in order
    right = max(b[0] + b[2] for b in boxes)
    # the vertical segments of each edge's path: [source, target, [[x, y0, y1], ...]]
    paths = page.evaluate(
        """() => [...document.querySelectorAll('svg.graph path.e')].map(e => {
          const v = e.getAttribute('d').match(/-?[0-9.]+/g).map(Number);
          const out = [];
          for (let i = 2; i + 1 < v.length; i += 2)
            if (Math.abs(v[i] - v[i - 2]) < 0.5 && Math.abs(v[i + 1] - v[i - 1]) > 20)
              out.push([v[i], Math.min(v[i + 1], v[i - 1]), Math.max(v[i + 1], v[i - 1])]);
          return [e.dataset.a, e.dataset.b, out];
        })"""
    )
    inside = set(layers) | {
        ex.drawn_as(k, ex.default_open())
        for k, n in enumerate(doc["nodes"])
        if block in ex.chain[n.get("m", 0)]
    }
    trunks: dict[str, set[float]] = {}
    for a in layers[:-2]:  # each layer feeds every later one and the block's cat
        mine = [segs for s, b, segs in paths if s == a and b in inside]
        assert len(mine) >= 3, a
        # all but the edge to the next item (laid out by dagre) run down one trunk
        lanes = [{round(x, 1) for x, _, _ in segs if x > right} for segs in mine]
        with_lane = [ln for ln in lanes if ln]
        assert len(with_lane) >= len(mine) - 1, (a, lanes)
        common = set.intersection(*with_lane)
        assert len(common) == 1, (a, lanes)
        trunks[a] = common
    # one trunk per source: no two sources share a lane
    assert len(set().union(*trunks.values())) == len(trunks)
    assert page.locator("svg.graph circle.joint").count() > 0
    # a layer opened in the middle: its taps come in from above its frame, its trunk leaves
    # from below it, every step of a trunk's path square (no diagonal to or from the lane)
    before = draws(page)
    page.locator(f'svg.graph .box[data-k="{layers[4]}"]').dispatch_event("click")
    wait_draw(page, before)
    open_ = ex.default_open() | {int(layers[4][1:])}
    pairs = page.eval_on_selector_all(
        "svg.graph path.e", "es => es.map(e => [e.dataset.a, e.dataset.b])"
    )
    assert sorted(map(tuple, pairs)) == sorted(ex.edges(open_))
    assert _edge_ends_on_items(page) == []
    assert _edges_under_nodes(page) == []
    right = max(
        b[0] + b[2]
        for b in page.evaluate(
            """ks => ks.map(k => { const b = document.querySelector(`[data-k="${k}"]`).getBBox();
              return [b.x, b.y, b.width, b.height]; })""",
            layers,
        )
    )
    # steps to, along or from a lane (right of every layer) that are neither level nor upright
    slanted = page.evaluate(
        """right => [...document.querySelectorAll('svg.graph path.e')].filter(e => {
          const v = e.getAttribute('d').match(/-?[0-9.]+/g).map(Number);
          for (let i = 2; i + 1 < v.length; i += 2)
            if (Math.max(v[i], v[i - 2]) > right && Math.abs(v[i] - v[i - 2]) > 0.5
                && Math.abs(v[i + 1] - v[i - 1]) > 0.5) return true;
          return false;
        }).map(e => `${e.dataset.a}->${e.dataset.b}`)""",
        right,
    )
    assert slanted == []


def _titles_outside_frames(page: Any) -> list[str]:
    """Open groups whose title text runs past their frame's right side (1 px tolerance)."""
    return page.evaluate(
        """() => [...document.querySelectorAll('svg.graph .frame')].filter(f => {
          const r = f.querySelector(':scope > rect.sh').getBBox();
          const t = f.querySelector(':scope > .title text').getBBox();
          return t.x + t.width > r.x + r.width + 1;
        }).map(f => f.dataset.k)"""
    )


def test_frame_titles_fit_their_frames(page: Any, servers: dict[str, str]) -> None:
    """An open group's title is its name below the group drawn around it (the frame it is
    sized for), not its full path running past a narrow frame (ResNet's downsample: two
    ops); its full path is in the tooltip. A block of a container drawn apart is named
    with the container (``outs.0``), on its box and its frame."""
    doc = open_graph(page, servers, "resnet18")
    k = next(
        k
        for k, n in enumerate(doc["nodes"])
        if doc["groups"][n.get("m", 0)]["p"] == "layer2.0.downsample.0"
    )
    open_graph(page, servers, "resnet18", f"?focus={doc['nodes'][k]['l']}")
    down = next(g for g, grp in enumerate(doc["groups"]) if grp["p"] == "layer2.0.downsample")
    title = page.locator(f'svg.graph .frame[data-k="g{down}"] > .title')
    assert title.text_content() == "\u2212 downsample (Sequential)"
    assert _titles_outside_frames(page) == []
    title.hover()
    assert "layer2.0.downsample" in page.inner_text(".graph-tip")
    doc = open_graph(page, servers, "pyramid")
    block = next(g for g, grp in enumerate(doc["groups"]) if grp["p"] == "outs.1")
    assert page.text_content(f'svg.graph .box[data-k="g{block}"] text.l1') == "outs.1 (Sequential)"
    before = draws(page)
    page.locator(f'svg.graph .box[data-k="g{block}"]').dispatch_event("click")
    wait_draw(page, before)
    title = page.text_content(f'svg.graph .frame[data-k="g{block}"] > .title')
    assert title == "\u2212 outs.1 (Sequential)"
    assert _titles_outside_frames(page) == []


def test_search_finds_modules_drawn_as_their_ops(page: Any, servers: dict[str, str]) -> None:
    """A module path finds the modules the page draws as their ops (a layer of one op, a
    container drawn apart), through those ops, as it finds the modules drawn as boxes."""
    doc = open_graph(page, servers, "resnet18")
    bns = [k for k, n in enumerate(doc["nodes"]) if n["t"] == "batch_norm"]
    bns = [k for k in bns if doc["groups"][doc["nodes"][k]["m"]]["p"].startswith("layer4.1.bn")]
    assert len(bns) == 2
    page.fill(".graph-bar input[type=search]", "layer4.1.bn")
    page.wait_for_function("() => document.querySelector('.graph-bar .hits').textContent")
    assert page.inner_text(".graph-bar .hits") == "2 found"
    before = draws(page)
    page.press(".graph-bar input[type=search]", "Enter")
    wait_draw(page, before)
    assert "current" in page.get_attribute(f'svg.graph .nd[data-k="n{bns[0]}"]', "class")
    open_graph(page, servers, "pyramid")
    page.fill(".graph-bar input[type=search]", "outs")
    page.wait_for_function("() => document.querySelector('.graph-bar .hits').textContent")
    assert page.inner_text(".graph-bar .hits") == "3 found"  # its three blocks


def test_back_edges_pass_beside_nodes(page: Any, servers: dict[str, str]) -> None:
    """A loop's back edge goes up a lane beside the nodes between its ends (not through
    the branch that sticks out further right), and a self-loop stays out of its
    neighbour: no back edge or self-loop passes under a node."""
    doc = open_graph(page, servers, "loop")
    labels = [n["l"] for n in doc["nodes"]]
    pairs = page.eval_on_selector_all(
        "svg.graph path.e.back", "es => es.map(e => [e.dataset.a, e.dataset.b])"
    )
    drawn_pairs = {(labels[int(a[1:])], labels[int(b[1:])]) for a, b in pairs}
    assert ("mul_1", "mul_1") in drawn_pairs and ("add_1", "linear_1") in drawn_pairs
    assert _edges_under_nodes(page, back=True) == []
    assert _edge_ends_on_items(page) == []


def test_back_edges_into_one_op_share_a_lane(page: Any, servers: dict[str, str]) -> None:
    """The 59 back edges into a rolled ``add`` (one from each block of a ModuleList drawn
    apart) go up one lane into it, beside every node, not 59 lanes side by side: each
    lane was placed against every other, cubic in their number (a tab frozen for 46 s
    at 4,000 blocks), and 4,000 lanes 10 px apart are 40,000 px of parallel lines."""
    doc = open_graph(page, servers, "residuals")
    add = next(k for k, n in enumerate(doc["nodes"]) if n["l"] == "add_1")
    into_add = {e[0] for e in doc["edges"] if e[1] == add and e[0] > add}
    assert len(into_add) == 59  # the oracle: every block after the first feeds add_1 back
    paths = page.eval_on_selector_all(
        f'svg.graph path.e.back[data-b="n{add}"]:not([data-a="n{add}"])',  # not its self-loop
        "es => es.map(e => [e.dataset.a, e.getAttribute('d')])",
    )
    sources = {a for a, _ in paths}
    # each block but the first is drawn as a box (its relu inside), each with its back edge
    groups = {f"g{doc['groups'][doc['nodes'][k]['m']]['u']}" for k in into_add}
    assert sources == groups and len(sources) == 59
    # the lane: the rightmost x of each path (where it runs up to the add)
    lanes = {max(float(x) for x in re.findall(r"[ML ]([-\d.]+),", d)) for _, d in paths}
    assert len(lanes) == 1, f"{len(lanes)} lanes for the back edges into add_1"
    assert _edges_under_nodes(page, back=True) == []
    assert _edge_ends_on_items(page) == []


def test_a_view_of_thousands_of_items_puts_only_those_near_the_screen_in_the_dom(
    page: Any, servers: dict[str, str]
) -> None:
    """1,603 items drawn (1,599 boxes side by side): the DOM holds the few near the view,
    not 11,000 SVG elements restyled on every draw; panning there (a search's Enter,
    Fit) brings the items it shows, and each is still where the layout put it."""
    doc = open_graph(page, servers, "long")
    ex = Expect(doc)
    items = ex.items(ex.default_open())
    assert len(items) == 1603
    near = drawn(page)
    assert near and near < items and len(near) <= 100
    assert int(page.get_attribute(".graph-page", "data-items")) == len(items)
    # the last block, far off to the right: found, centred, and in the DOM
    last = next(g for g, gr in enumerate(doc["groups"]) if gr["p"] == "blocks.1599")
    before = draws(page)
    page.fill(".graph-bar input[type=search]", "blocks.1599")
    page.press(".graph-bar input[type=search]", "Enter")
    wait_draw(page, before)
    page.wait_for_selector(f'svg.graph .box.current[data-k="g{last}"]')
    there = drawn(page)
    assert f"g{last}" in there and len(there) <= 100 and not there & near - {"n0", "n3"}
    # with its edges: from the add before it, and back into the add
    ends = page.eval_on_selector_all(
        f'svg.graph path.e[data-a="g{last}"], svg.graph path.e[data-b="g{last}"]',
        "es => es.map(e => [e.dataset.a, e.dataset.b])",
    )
    assert sorted(map(tuple, ends)) == [(f"g{last}", "n3"), ("n3", f"g{last}")]
    box = page.eval_on_selector(
        f'svg.graph .box[data-k="g{last}"]', "e => e.getBoundingClientRect().toJSON()"
    )
    canvas = page.eval_on_selector("svg.graph", "e => e.getBoundingClientRect().toJSON()")
    centre = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    assert abs(centre[0] - (canvas["x"] + canvas["width"] / 2)) < 2
    assert abs(centre[1] - (canvas["y"] + canvas["height"] / 2)) < 2
    # zoomed out to everything: everything is on screen, so everything is in the DOM
    page.click(".graph-bar button:has-text('Fit')")
    page.wait_for_function(
        "n => +document.querySelector('.graph-page').dataset.drawn > n", arg=len(there)
    )
    assert drawn(page) == items


def _on_screen(page: Any, sel: str) -> dict[str, Any]:
    """The client boxes of the elements matching ``sel`` (by ``data-k``) and the canvas's."""
    return page.evaluate(
        """sel => ({
          canvas: document.querySelector('svg.graph').getBoundingClientRect().toJSON(),
          items: Object.fromEntries([...document.querySelectorAll(sel)]
            .map(e => [e.dataset.k, e.getBoundingClientRect().toJSON()])),
        })""",
        sel,
    )


def _inside(r: dict[str, float], c: dict[str, float], tol: float = 1) -> bool:
    return (
        r["left"] >= c["left"] - tol
        and r["top"] >= c["top"] - tol
        and r["right"] <= c["right"] + tol
        and r["bottom"] <= c["bottom"] + tol
    )


def test_a_long_chain_of_modules_opens_readable_at_its_start(
    page: Any, servers: dict[str, str]
) -> None:
    """1,600 residual blocks all read the loop's rolled ``add``: one rank, which was one
    row 300,000 px wide, opened at its middle (blocks 800 on) or, fitted, a strip too thin
    to read. The rank wraps into rows a screen wide, read as text: the view opens on the
    chain's start (input, blocks.0, the add, blocks.1, blocks.2, ...) with labels at a
    readable size, the blocks in execution order left to right, row under row, each row's
    edges from the add coming down beside the rows above, not under them."""
    doc = open_graph(page, servers, "long")
    group = {gr["p"]: g for g, gr in enumerate(doc["groups"])}
    seen = _on_screen(page, "svg.graph .box, svg.graph .nd")
    canvas = seen["canvas"]
    visible = {k for k, r in seen["items"].items() if _inside(r, canvas)}
    first = [f"g{group[f'blocks.{i}']}" for i in range(13)]
    assert set(first) <= visible, f"the chain's first blocks are not all on screen: {visible}"
    add = next(k for k, n in enumerate(doc["nodes"]) if n["l"] == "add_1")
    assert {"n0", f"n{add}"} <= visible  # the input and the loop's add above them
    # the labels' size on screen: their font size times the drawing's scale
    px = page.eval_on_selector(
        f'svg.graph .box[data-k="{first[1]}"] text.l1',
        "e => parseFloat(getComputedStyle(e).fontSize) * e.getScreenCTM().a",
    )
    assert px >= 9, f"labels drawn {px:.1f} px high"
    # execution order, as text: left to right, then the next row down; several rows seen
    boxes = [seen["items"][k] for k in first[1:]]
    for p, q in itertools.pairwise(boxes):
        assert q["left"] > p["left"] or q["top"] >= p["bottom"], "blocks out of reading order"
    assert len({round(b["top"]) for b in boxes}) >= 2
    # the add's edges into a block rows down pass beside the rows above it, not under them
    into = page.eval_on_selector_all(
        f'svg.graph path.e:not(.back)[data-a="n{add}"][data-b="{first[12]}"]', "es => es.length"
    )
    assert into == 1
    assert _edges_under_nodes(page, only_into=first[12]) == []


class SkipOverLoop(torch.nn.Module):
    """A skip connection around a loop of 500 residual blocks: the input is added again
    after the loop (and a ReLU), so its edge passes over the blocks' wrapped rank."""

    def __init__(self, n: int = 500) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()) for _ in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for block in self.blocks:
            x = x + block(x)
        return torch.relu(x) + y


def test_a_skip_edge_over_a_wrapped_rank_goes_around_its_rows(
    page: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The input's edge into the ``add`` after a loop of 500 blocks (the blocks one rank,
    wrapped into rows) starts and ends in rows that are not wrapped: it was drawn as a
    curve straight down through the wrapped rows' boxes. It is routed beside them."""
    from lurker.server import create_app
    from lurker.server.serve import background

    path = _probed(tmp_path_factory, "skipover", SkipOverLoop, "blocks.0.0")
    with background(create_app(path)) as url:
        doc = open_graph(page, {"skipover": url}, "skipover")
        labels = [n["l"] for n in doc["nodes"]]
        last = max(i for i, n in enumerate(doc["nodes"]) if n["t"] in ("add", "add_"))
        assert (0, last) in {(e[0], e[1]) for e in doc["edges"]}, labels  # input -> add
        ex = Expect(doc)
        items = ex.items(ex.default_open())
        page.click(".graph-bar button:has-text('Fit')")
        page.wait_for_function(
            "n => +document.querySelector('.graph-page').dataset.drawn === n", arg=len(items)
        )
        assert page.locator(f'svg.graph path.e[data-a="n0"][data-b="n{last}"]').count() == 1
        assert _edges_under_nodes(page, only_into=f"n{last}") == []


@pytest.mark.parametrize("run", ["flat", "long", "resnet18"])
def test_fit_shows_the_whole_graph(page: Any, servers: dict[str, str], run: str) -> None:
    """Fit puts every drawn item on screen, however small: the flat Sequential's column of
    600 layers is 35,000 px tall, more than the zoom's old floor (0.02) fits in a screen,
    and its last layers and output stayed below it. Zooming out with the wheel stops where
    the whole graph shows, not further."""
    doc = open_graph(page, servers, run)
    ex = Expect(doc)
    items = ex.items(ex.default_open())
    page.click(".graph-bar button:has-text('Fit')")
    page.wait_for_function(
        "n => +document.querySelector('.graph-page').dataset.drawn === n", arg=len(items)
    )
    seen = _on_screen(page, "svg.graph .box, svg.graph .nd, svg.graph .frame")
    assert set(seen["items"]) >= items
    outside = [k for k, r in seen["items"].items() if not _inside(r, seen["canvas"])]
    assert outside == [], f"{len(outside)} items off screen after Fit, as {outside[:5]}"
    k = page.evaluate("document.querySelector('svg.graph g.viewport').getCTM().a")
    page.mouse.move(640, 500)
    page.mouse.wheel(0, 2000)
    page.wait_for_timeout(300)  # let d3-zoom apply the wheel (it clamps at the floor)
    assert page.evaluate("document.querySelector('svg.graph g.viewport').getCTM().a") >= min(
        k, 0.02
    ) * (1 - 1e-6)


@pytest.mark.parametrize("run", ["digits", "resnet18", "loop"])
def test_legend_lists_only_what_the_graph_has(page: Any, servers: dict[str, str], run: str) -> None:
    doc = open_graph(page, servers, run)
    legend = page.inner_text(".graph-legend")
    loops = any(e[0] >= e[1] for e in doc["edges"])
    branches = any(len(e) > 3 for e in doc["edges"])
    assert loops == (run == "loop")
    assert ("loop (back edge)" in legend) == loops
    assert ("branch taken" in legend) == branches
    kinds = {n.get("k", "op") for n in doc["nodes"]}
    assert ("generated tensor" in legend) == ("generated" in kinds)
    assert "input" in legend and "output" in legend
    # the blue underlined labels (ops a probed layer reads) are explained where it has any
    assert ("probed layer" in legend) == any("L" in n for n in doc["nodes"])
    if run == "loop":  # a back edge is drawn, in the legend's colour
        assert page.locator("svg.graph path.e.back").count() > 0


def test_tooltip_hides_when_the_view_moves(page: Any, servers: dict[str, str]) -> None:
    doc = open_graph(page, servers, "resnet18")
    labels = [n["l"] for n in doc["nodes"]]
    # hover by an event, the pointer staying off the canvas: chromium then sends no
    # mouseover of its own when the drawing changes under a still pointer
    box = page.locator('svg.graph .nd[data-k="n0"]').bounding_box()
    at = {"clientX": box["x"] + 5, "clientY": box["y"] + 5}
    page.dispatch_event('svg.graph .nd[data-k="n0"] > .sh', "mouseover", at)
    tip = page.locator(".graph-tip")
    tip.wait_for(state="visible")
    assert labels[0] in tip.inner_text()
    # a search jump recentres the view on the match: the old tooltip must not cover it
    before = draws(page)
    page.fill(".graph-bar input[type=search]", "conv2d_12")
    page.press(".graph-bar input[type=search]", "Enter")
    wait_draw(page, before)
    k = labels.index("conv2d_12")
    assert "current" in page.get_attribute(f'svg.graph .nd[data-k="n{k}"]', "class")
    assert tip.is_hidden()
    # so does zooming with the wheel
    node = page.locator(f'svg.graph .nd[data-k="n{k}"]')
    node.hover()
    tip.wait_for(state="visible")
    page.mouse.wheel(0, -200)
    tip.wait_for(state="hidden")


def test_search_hover_colours_and_links(
    page: Any, servers: dict[str, str], resnet_run: Path
) -> None:
    from lurker.store import Run

    run = Run.open(resnet_run)
    graph = run.graph
    layer = run.layers[0]
    doc = open_graph(page, servers, "resnet18")
    labels = [n["l"] for n in doc["nodes"]]
    # search: an op deep in a closed group is found, its groups opened, it is centred
    target = "conv2d_12"
    k = labels.index(target)
    before = draws(page)
    page.fill(".graph-bar input[type=search]", target)
    page.press(".graph-bar input[type=search]", "Enter")
    wait_draw(page, before)
    node = page.locator(f'svg.graph .nd[data-k="n{k}"]')
    assert "current" in node.get_attribute("class")
    box = node.bounding_box()
    canvas = page.locator(".graph-canvas").bounding_box()
    assert abs(box["x"] + box["width"] / 2 - (canvas["x"] + canvas["width"] / 2)) < 40
    assert abs(box["y"] + box["height"] / 2 - (canvas["y"] + canvas["height"] / 2)) < 40
    # a found op can be opened in the live view (its feature maps on an image)
    link = page.locator(".graph-bar .live-link")
    assert link.is_visible() and link.get_attribute("href").endswith(f"/live?op={target}")
    assert page.inner_text(".graph-bar .hits") == "1 of 1"
    # hover: the tooltip shows the op's shape as the graph records it
    node.hover()
    tip = page.locator(".graph-tip")
    tip.wait_for(state="visible")
    shape = "\u00d7".join(map(str, graph[target].shape))
    text = tip.inner_text()
    assert target in text and shape in text and "params:" in text and "FLOPs:" in text
    assert f"{graph[target].num_params:,}" in text and "source:" in text
    # colours: trace.render's code, as the browser computes it
    fills = page.evaluate(
        """() => Object.fromEntries(['n-input', 'n-output', 'n-param', 'n-op'].map(c => {
            const sh = document.querySelector(`svg.graph .${c} > .sh`);
            const s = getComputedStyle(sh);
            return [c, [s.fill, s.stroke]];
        }))"""
    )
    assert fills["n-input"] == ["rgb(152, 251, 152)", "rgb(0, 100, 0)"]  # palegreen, darkgreen
    assert fills["n-output"] == ["rgb(240, 128, 128)", "rgb(205, 0, 0)"]  # lightcoral, red3
    assert fills["n-param"][0] == "rgb(217, 217, 217)"  # gray85
    assert fills["n-op"][0] == "rgb(255, 255, 255)"
    inputs = page.eval_on_selector_all("svg.graph .n-input", "es => es.map(e => e.dataset.k)")
    assert inputs == [f"n{i}" for i, n in enumerate(doc["nodes"]) if n.get("k") == "input"]
    params = set(page.eval_on_selector_all("svg.graph .n-param", "es => es.map(e => e.dataset.k)"))
    assert params and all(doc["nodes"][int(p[1:])].get("P", 0) > 0 for p in params)
    # a probed op links to its layer page
    k = labels.index(layer.op)
    before = draws(page)
    page.fill(".graph-bar input[type=search]", layer.op)
    page.press(".graph-bar input[type=search]", "Enter")
    wait_draw(page, before)
    page.click(f'svg.graph .nd[data-k="n{k}"]')
    page.wait_for_function("h => location.hash === h", arg=f"#/r/resnet18/layer/{layer.name}")
    page.wait_for_selector(".unit-grid .unit-card")
    page.wait_for_load_state("networkidle")
    run.close()


def test_a_run_without_images_says_why(
    page: Any, servers: dict[str, str], resnet_run: Path
) -> None:
    """The resnet18 run was probed from Python on a TensorDataset: it records no dataset
    and nothing is cached, so no page requests an image (each would 404); each says why."""
    from lurker.store import Run

    with Run.open(resnet_run) as run:
        layer = run.layers[0].name
        sample = run.unit(layer, 0).top("max")[0].sample_id
    url = servers["resnet18"]
    summary = page.request.get(f"{url}api/runs/resnet18").json()
    assert summary["holds"]["dataset"] is False and summary["holds"]["cached_images"] == 0
    assert "does not record its dataset" in summary["holds"]["dataset_reason"]
    for view in (f"layer/{layer}", f"unit/{layer}/0", "samples", f"sample/{sample}"):
        page.goto(f"{url}#/r/resnet18/{view}")
        page.wait_for_selector("main .notice")
        page.wait_for_load_state("networkidle")
        assert "does not record its dataset" in page.inner_text("main"), view
        assert page.locator("main img").count() == 0, view
    # the API's 404 says how to cache the images of a run made in Python
    res = page.request.get(f"{url}api/runs/resnet18/samples/{sample}/image.png")
    assert res.status == 404 and "UnitImages(run, model=model, dataset=dataset)" in res.text()


@pytest.mark.parametrize("run", RUNS)
def test_focus_opens_and_centres(page: Any, servers: dict[str, str], run: str) -> None:
    doc = open_graph(page, servers, run)
    ex = Expect(doc)
    # the deepest op: the one inside the most groups
    k = max(range(len(doc["nodes"])), key=lambda i: len(ex.chain[doc["nodes"][i].get("m", 0)]))
    label = doc["nodes"][k]["l"]
    open_graph(page, servers, run, f"?focus={label}")
    node = page.locator(f'svg.graph .nd[data-k="n{k}"]')
    assert "current" in node.get_attribute("class")
    box = node.bounding_box()
    canvas = page.locator(".graph-canvas").bounding_box()
    assert abs(box["x"] + box["width"] / 2 - (canvas["x"] + canvas["width"] / 2)) < 40
    assert abs(box["y"] + box["height"] / 2 - (canvas["y"] + canvas["height"] / 2)) < 40
    # the focused op can be opened in the live view (its feature maps on an image)
    link = page.locator(".graph-bar .live-link")
    assert link.is_visible() and link.get_attribute("href").endswith(f"/live?op={quote(label)}")


def test_focus_on_an_unknown_op_says_so(page: Any, servers: dict[str, str]) -> None:
    open_graph(page, servers, "digits", "?focus=no_such_op")
    assert "No op 'no_such_op'" in page.inner_text(".graph-status")
    assert page.locator("svg.graph .nd").count() > 0


def test_focus_by_a_probed_layer_name_opens_its_op(page: Any, servers: dict[str, str]) -> None:
    """``?focus=`` with a run layer's name (as an Explain result names a probed layer it
    was made at, e.g. ``features.8``) opens that layer's op, as its op label does."""
    doc = open_graph(page, servers, "digits")
    k, node = next((k, n) for k, n in enumerate(doc["nodes"]) if n.get("L"))
    assert node["L"] != node["l"]
    open_graph(page, servers, "digits", f"?focus={quote(node['L'])}")
    assert "No op" not in page.inner_text(".graph-status")
    assert "current" in page.locator(f'svg.graph .nd[data-k="n{k}"]').get_attribute("class")
