"""The explorer's activation histograms in a browser: each x axis spans the bins that hold
the chart's data (and the marked mean), not the layer's shared edges; and a layer with no
position axes (a Linear's ``(N, units)``) is labelled by what its values are: a sample's
activation, with no receptive-field crop (it would be the whole image).

Checked on the server tests' digits run: axes are read back from the drawn SVG (tick
values against their positions), data from the run itself (lurker.store.Run).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from explorer_fixtures import ExplorerRun, explorer_run, strict_page  # noqa: F401

STATIC = Path(__file__).resolve().parents[1] / "src" / "lurker" / "server" / "static"
MARGIN = 0.1  # of the data's span: the axis may run past the data by at most this


@pytest.fixture(scope="module")
def served(explorer_run: ExplorerRun) -> Iterator[dict[str, Any]]:  # noqa: F811
    if not (STATIC / "index.html").exists():
        pytest.skip(f"the explorer's front end is not built ({STATIC}/index.html): run `make web`")
    from lurker.server import create_app
    from lurker.server.serve import background
    from lurker.store import Run

    with (
        background(create_app(explorer_run.path, model_obj=explorer_run.model)) as url,
        Run.open(explorer_run.path) as run,
    ):
        yield {"url": f"{url}#/r/{explorer_run.path.name}", "run": run}


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    with strict_page(browser) as pg:
        yield pg


def go(page: Any, url: str, selector: str) -> None:
    page.goto(url)
    page.wait_for_selector(selector, timeout=30000)
    page.wait_for_load_state("networkidle")


def axis_domain(page: Any, chart: str) -> tuple[float, float]:
    """The values at the two ends of a drawn histogram's x axis, from its ticks."""
    got = page.locator(chart).evaluate(
        """svg => {
          const axis = svg.querySelector('g[transform^="translate(0,"]');
          const ticks = [...axis.querySelectorAll('g.tick')].map(t => [
            Number(t.getAttribute('transform').match(/translate\\(([-\\d.e]+)/)[1]),
            Number(t.querySelector('text').textContent)]);
          const d = axis.querySelector('path.domain').getAttribute('d');
          const xs = [...d.matchAll(/[MH]([-\\d.e]+)/g)].map(m => Number(m[1]));
          return {ticks, range: [Math.min(...xs), Math.max(...xs)]};
        }"""
    )
    (x0, v0), (x1, v1) = got["ticks"][0], got["ticks"][-1]
    assert x1 > x0, got
    per = (v1 - v0) / (x1 - x0)
    lo, hi = got["range"]
    return v0 + (lo - x0) * per, v0 + (hi - x0) * per


def data_span(counts: np.ndarray, edges: np.ndarray, mark: float | None) -> tuple[float, float]:
    held = np.flatnonzero(counts > 0)
    lo, hi = float(edges[held[0]]), float(edges[held[-1] + 1])
    if mark is not None:
        lo, hi = min(lo, mark), max(hi, mark)
    return lo, hi


def assert_spans(domain: tuple[float, float], data: tuple[float, float]) -> None:
    lo, hi = data
    pad = MARGIN * ((hi - lo) or abs(lo) or 1.0)
    # ticks are rounded to 3 digits: allow that much
    slack = 2e-3 * max(abs(lo), abs(hi), hi - lo)
    assert lo - pad - slack <= domain[0] <= lo + slack, (domain, data)
    assert hi - slack <= domain[1] <= hi + pad + slack, (domain, data)


def fill(counts: np.ndarray, edges: np.ndarray) -> float:
    """The part of the edges' range that the bins holding data span."""
    lo, hi = data_span(counts, edges, None)
    return (hi - lo) / float(edges[-1] - edges[0])


def test_unit_histogram_spans_its_data(page: Any, served: dict[str, Any]) -> None:
    run = served["run"]
    # the unit whose data fills the least of its layer's shared edges
    best = None
    for info in run.layers:
        if info.name.startswith("classifier"):
            continue  # the Linear layers: below
        for unit in run.units(info.name):
            counts, edges = run.unit(info.name, unit.index).histogram()
            if counts.sum() and unit.mean < unit.max:
                part = fill(counts, edges)
                if best is None or part < best[0]:
                    best = (part, info.name, unit.index)
    assert best is not None and best[0] < 0.5, best  # the layer's range is far wider
    _, layer, u = best
    go(page, f"{served['url']}/unit/{layer}/{u}", "svg.histogram")
    unit = run.unit(layer, u)
    counts, edges = unit.histogram()
    domain = axis_domain(page, "svg.histogram")
    assert_spans(domain, data_span(counts, edges, unit.mean))
    # the bars are the stored counts, every bin that holds data drawn inside the axis
    bars = page.locator("svg.histogram g.bars rect").evaluate_all(
        "rs => rs.map(r => [Number(r.getAttribute('data-count')), Number(r.getAttribute('x')),"
        " Number(r.getAttribute('width'))])"
    )
    held = counts[np.flatnonzero(counts > 0)[0] : np.flatnonzero(counts > 0)[-1] + 1]
    assert [b[0] for b in bars] == held.tolist()
    # ...and they fill most of the plot: the data is no sliver
    width = bars[-1][1] + bars[-1][2] - bars[0][1]
    plot = page.locator("svg.histogram path.domain").first.evaluate("p => p.getBBox().width")
    assert width > 0.8 * plot, (width, plot)


def test_layer_histogram_spans_its_data(page: Any, served: dict[str, Any]) -> None:
    run = served["run"]
    sums = {}
    for info in run.layers:
        total = sum(run.unit(info.name, u).histogram()[0] for u in range(info.num_units))
        sums[info.name] = (total, run.unit(info.name, 0).histogram()[1])
    name = min(sums, key=lambda n: fill(*sums[n]))
    assert fill(*sums[name]) < 0.8, {n: fill(*v) for n, v in sums.items()}
    go(page, f"{served['url']}/layer/{name}", "svg.histogram")
    assert_spans(axis_domain(page, "svg.histogram"), data_span(*sums[name], None))


def test_single_bin_of_a_dead_unit(page: Any, served: dict[str, Any]) -> None:
    run = served["run"]
    dead = next(
        (info.name, u.index)
        for info in run.layers
        for u in run.units(info.name)
        if u.mean == 0.0 and u.max == 0.0
    )
    go(page, f"{served['url']}/unit/{dead[0]}/{dead[1]}", "svg.histogram")
    counts, edges = run.unit(*dead).histogram()
    (i,) = np.flatnonzero(counts)
    assert edges[i] == 0.0  # every mean is 0: one bin [0, w)
    lo, hi = axis_domain(page, "svg.histogram")
    assert_spans((lo, hi), (0.0, float(edges[i + 1])))


def test_labels_of_a_layer_without_positions(page: Any, served: dict[str, Any]) -> None:
    run = served["run"]
    linear = next(i for i in run.layers if i.kind == "Linear")
    conv = next(i for i in run.layers if i.kind == "Conv2d")
    assert linear.layout["positions"] == [] and conv.layout["positions"]
    unit = next(u.index for u in run.units(linear.name) if u.mean < u.max)

    go(page, f"{served['url']}/unit/{linear.name}/{unit}?tab=max", ".top-entry img")
    assert page.text_content("svg.histogram .axis-label").startswith("activation of a sample")
    toolbar = page.inner_text(".toolbar")
    assert "value: the unit's activation" in toolbar
    assert "peak" not in toolbar and "receptive field" not in toolbar
    assert page.locator('button[data-value="1"]').count() == 0  # no crop toggle
    assert page.locator(".peak:not([hidden])").count() == 0  # no box: it is the whole image
    assert "averaged over its positions" not in page.inner_text("main")
    page.click('button[data-tab="mean"]')
    page.wait_for_function(
        "() => document.querySelector('.toolbar').innerText.includes('same ranking')"
    )
    # a URL asking for the crop gets the full image
    go(page, f"{served['url']}/unit/{linear.name}/{unit}?tab=max&crop=1", ".top-entry img")
    assert page.locator('.top-entry [data-kind="input"]').count() > 0
    assert page.locator('.top-entry [data-kind="crop"]').count() == 0

    go(page, f"{served['url']}/layer/{linear.name}", ".unit-card img")
    assert page.text_content("svg.histogram .axis-label").startswith("activation of a sample")
    thumbs = page.locator('.seg[aria-label="thumbnail"] button').all_inner_texts()
    assert "crop" not in thumbs and "input" in thumbs

    # a conv layer keeps its words and its crop
    go(page, f"{served['url']}/unit/{conv.name}/0?tab=max", ".top-entry img")
    assert page.text_content("svg.histogram .axis-label").startswith(
        "spatial mean activation of a sample"
    )
    assert page.locator('button[data-value="1"]').inner_text() == "receptive-field crop"
    assert "value: the peak of the unit's map" in page.inner_text(".toolbar")
    go(page, f"{served['url']}/layer/{conv.name}", ".unit-card img")
    assert "crop" in page.locator('.seg[aria-label="thumbnail"] button').all_inner_texts()


def test_layer_facts_of_a_reused_module_and_a_field_over_the_whole_image(
    page: Any, served: dict[str, Any]
) -> None:
    """The layer document rewritten in flight (the page's reading is tested): a module's
    second call is said in words, not as ``path:2``; a field that covers every pixel from
    every position says so beside its size."""

    def rewrite(route: Any) -> None:
        doc = route.fetch().json()
        doc["layer"]["module"] = "features.8:2"
        doc["rf"]["full"] = True
        route.fulfill(json=doc)

    page.route("**/api/runs/*/layers/features.8", rewrite)
    go(page, f"{served['url']}/layer/features.8", ".facts")
    facts = page.inner_text(".layer-head .facts")
    assert "features.8 (its 2nd call)" in facts and "features.8:2" not in facts
    assert "the whole input (" in facts and " px, stride " in facts


class _Bright(torch.nn.Module):
    """Six units, each 1 on the brightest tenth of the samples and 0 on the rest: most of
    the layer's samples x units in one bin (1,800 to 2,000 of 2,160), so its y axis ends at
    2k, close above 1k on a symlog scale."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t
        self.out = torch.nn.Linear(1, 6)
        torch.nn.init.ones_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x.flatten(1).mean(1, keepdim=True) > self.t).float()
        return self.out(bright)


def test_count_labels_never_crowd_at_a_projectors_width(tmp_path: Path, browser: Any) -> None:
    """On a layer of large counts the y axis keeps only the ticks there is room for (the
    800 px window's "2k" sat on "1k"); the top tick still names the axis's end."""
    if not (STATIC / "index.html").exists():
        pytest.skip(f"the explorer's front end is not built ({STATIC}/index.html): run `make web`")
    from lurker.probe import probe
    from lurker.probe.data import load_dataset
    from lurker.server import create_app
    from lurker.server.serve import background

    data = load_dataset("digits:test", 16, channels=1)
    means = torch.stack([data[i][0].mean() for i in range(len(data))])
    model = _Bright(float(means.quantile(0.9))).eval()
    out = tmp_path / "runs" / "b"
    probe(model, data, out=out, layers=["out"], k=2, progress=False)
    # the oracle: the tallest bin holds the dark samples of all six units
    dark = int((means <= model.t).sum()) * 6
    assert 1000 < dark <= 2000
    with background(create_app(out)) as url, strict_page(browser, 800, 600) as pg:
        go(pg, f"{url}#/r/b/layer/out", "svg.histogram")
        boxes = pg.locator("svg.histogram .y-axis").evaluate(
            """g => [...g.querySelectorAll('.tick text')].map(t => {
                 const r = t.getBoundingClientRect(); return [t.textContent, r.top, r.bottom]; })"""
        )
        assert (
            max(
                int(b.get_attribute("data-count"))
                for b in pg.locator("svg.histogram .bars rect").all()
            )
            == dark
        )
    labels = [b[0] for b in sorted(boxes, key=lambda b: b[1])]
    assert labels[0] == "2k" and labels[-1] == "0"
    tops = sorted(boxes, key=lambda b: b[1])
    for upper, lower in pairwise(tops):
        assert lower[1] - upper[2] >= 3, f"{upper[0]!r} and {lower[0]!r} crowd: {boxes}"
