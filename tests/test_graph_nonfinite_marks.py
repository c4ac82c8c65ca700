"""The graph page's NaN marks stay visible where the page hides or overlays them: a closed
module box that holds marked layers is marked with how many, the legend explains the red
outline (only when something is marked), and the first marked node, once focused, shows
both its red outline and the orange "current" highlight.

Oracle: the model run with plain torch forward hooks on the probed modules (which hold a
NaN or inf), and the graph document's own module tree (which nodes a box holds).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from lurker.probe import probe
from lurker.probe.data import load_dataset
from lurker.server import create_app
from test_graph_nonfinite import _Dark

LAYERS = ["blk.inner.dark", "blk.inner.relu", "head"]


class _Inner(torch.nn.Module):
    def __init__(self, t: float) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 16 * 16, 4)
        self.dark = _Dark(t)
        self.relu = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.dark(self.fc(x.flatten(1)), x))


class _Block(torch.nn.Module):
    def __init__(self, t: float) -> None:
        super().__init__()
        self.inner = _Inner(t)
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.nan_to_num(self.inner(x), 0.0, 0.0, 0.0))


class _Nested(torch.nn.Module):
    """NaN on the dark samples in blk.inner (dark, relu), a module two levels down, so
    closed on the page's first view; a clean head."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.blk = _Block(t)
        self.head = torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blk(x))


def _nonfinite_layers(model: torch.nn.Module, data: Any) -> list[str]:
    bad: list[str] = []

    def hook(name: str):
        def f(_m: Any, _i: Any, out: torch.Tensor) -> None:
            if not bool(out.isfinite().all()) and name not in bad:
                bad.append(name)

        return f

    hs = [model.get_submodule(n).register_forward_hook(hook(n)) for n in LAYERS]
    with torch.no_grad():
        model(torch.stack([data[i][0] for i in range(len(data))]))
    for h in hs:
        h.remove()
    return bad


def _probed(tmp: Path, t: float | None) -> tuple[torch.nn.Module, Any, Path]:
    torch.manual_seed(0)
    data = load_dataset("digits:test", 16, channels=3)
    means = torch.stack([data[i][0].mean() for i in range(len(data))])
    model = _Nested(float(means.median()) if t is None else t).eval()
    out = tmp / "runs" / ("g" if t is None else "c")
    if t is None:
        with pytest.warns(UserWarning, match="NaN or infinite"):
            probe(model, data, out=out, layers=LAYERS, k=2, progress=False)
    else:
        probe(model, data, out=out, layers=LAYERS, k=2, progress=False)
    return model, data, out


def test_closed_box_legend_and_focused_first_show_the_nan_marks(
    tmp_path: Path, browser: Any
) -> None:
    from explorer_fixtures import STATIC, strict_page
    from lurker.server.serve import background

    if not (STATIC / "index.html").exists():
        pytest.skip(f"the front end is not built ({STATIC}): run `make web`")
    model, data, out = _probed(tmp_path, None)
    bad = _nonfinite_layers(model, data)
    assert bad == ["blk.inner.dark", "blk.inner.relu"]  # the oracle: head is clean
    with TestClient(create_app(out)) as client:
        doc = client.get("/api/runs/g/graph").json()
    inner = next(g for g, gr in enumerate(doc["groups"]) if gr["p"] == "blk.inner")
    first = next(k for k, n in enumerate(doc["nodes"]) if n.get("L") == "blk.inner.dark")
    shots = Path(os.environ.get("LURKER_SHOTS") or tmp_path)
    with background(create_app(out)) as url, strict_page(browser, 1280, 800) as pg:
        pg.goto(f"{url}#/r/g/graph")
        pg.wait_for_selector(".graph-page[data-ready='1']")
        pg.locator("svg.graph").screenshot(path=str(shots / "graph-nan-closed.png"))
        # (a) blk.inner is a closed box on the first view: its marked nodes are not drawn,
        # so the box itself is marked, with how many probed layers inside made NaN or +inf
        assert pg.locator("svg.graph g.nd.nonfinite").count() == 0
        box = pg.locator(f"svg.graph g.box[data-k='g{inner}']")
        assert "nonfinite" in box.get_attribute("class").split()
        assert "nf-first" in box.get_attribute("class").split()
        assert box.locator(".nf-badge text").text_content() == f"{len(bad)} NaN"
        box.hover()
        tip = pg.locator(".graph-tip")
        assert f"{len(bad)} probed layers inside made NaN or +inf" in tip.inner_text()
        # (b) the legend says what the red outline means
        pg.locator(".graph-legend").screenshot(path=str(shots / "graph-nan-legend.png"))
        nan_entry = pg.locator(".graph-legend [data-kind='l-nan']")
        assert nan_entry.inner_text() == "made NaN or +inf (probed layer)"
        # (c) the link opens the box and focuses the first: it is both current and marked,
        # and both highlights are drawn (the orange shape outline, a red ring around it)
        pg.locator(".graph-nonfinite a").click()
        node = pg.locator(f"svg.graph g.nd.current.nf-first[data-k='n{first}']")
        node.wait_for()
        assert pg.locator(f"svg.graph g.box[data-k='g{inner}']").count() == 0  # opened
        sh = node.locator(":scope > .sh").evaluate("e => getComputedStyle(e).stroke")
        ring = node.locator(":scope > .nf-ring")
        assert sh == "rgb(232, 89, 12)"  # the orange of .current
        assert ring.evaluate("e => getComputedStyle(e).display") != "none"
        assert ring.evaluate("e => getComputedStyle(e).stroke") == "rgb(221, 0, 0)"
        # the ring lies outside the shape, so neither hides the other
        rs, rr = node.locator(":scope > .sh").bounding_box(), ring.bounding_box()
        assert rr["width"] > rs["width"] + 4 and rr["height"] > rs["height"] + 4
        pg.locator("svg.graph").screenshot(path=str(shots / "graph-nan-current.png"))
    # a clean run: no NaN legend entry, no marked box
    _m, _d, clean = _probed(tmp_path, -1.0)
    with background(create_app(clean)) as url, strict_page(browser, 1280, 800) as pg:
        pg.goto(f"{url}#/r/c/graph")
        pg.wait_for_selector(".graph-page[data-ready='1']")
        assert pg.locator(".graph-legend [data-kind='l-nan']").count() == 0
        assert pg.locator("svg.graph .nonfinite, svg.graph .nf-badge").count() == 0
