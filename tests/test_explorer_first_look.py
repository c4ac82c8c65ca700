"""What a first-time reader of the explorer sees, at 800 and 1280 px, in a real browser
(Debian's chromium via Playwright) over the shared digits run:

- the graph page's search box, Fit and Collapse stay on one line together, and a first
  view that cannot show the whole graph at a readable size says what part it shows;
- a unit's histogram's count axis reaches above its tallest bar, under a named tick, and
  says what it counts;
- a misclassified sample's page says so in words (a bold true class lower in the top-5
  did not); a correct one says that instead; the Samples list marks the same samples
  (``label → predicted``, as the Map's selection does).

Oracles: the run's store (``lurker.store.Run``) for the counts, the model run in the test
on the dataset for the predictions, the drawn boxes for the layout.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from explorer_fixtures import ExplorerRun, explorer_run, skip_without_browser, strict_page  # noqa: F401

skip_without_browser()

WIDTHS = [800, 1280]


@pytest.fixture(scope="module")
def served(
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    """A copy of the shared run with a (PCA) map, which records every sample's top
    class, served with its model attached."""
    from lurker.map import make_map
    from lurker.probe.data import load_dataset
    from lurker.server import create_app
    from lurker.server.serve import background

    run = tmp_path_factory.mktemp("first-look") / explorer_run.path.name
    shutil.copytree(explorer_run.path, run)
    data = load_dataset("digits:test", 16, channels=1)
    make_map(run, method="pca", model=explorer_run.model, dataset=data).close()
    with background(create_app(run, model_obj=explorer_run.model)) as url:
        yield {"url": f"{url}#/r/{run.name}", "run": explorer_run, "path": run}


@pytest.mark.parametrize("width", WIDTHS)
def test_graph_toolbar_is_one_group_and_the_first_view_says_what_it_shows(
    browser: Any, served: dict[str, Any], width: int
) -> None:
    with strict_page(browser, width=width, height=800) as pg:
        pg.goto(served["url"] + "/graph")
        pg.wait_for_selector(".graph-page[data-ready]")
        boxes = {
            name: pg.locator(sel).bounding_box()
            for name, sel in [
                ("search", ".graph-bar input[type=search]"),
                ("fit", ".graph-bar button:text-is('Fit')"),
                ("collapse", ".graph-bar button:text-is('Collapse')"),
                ("title", ".graph-bar h1"),
            ]
        }
        mid = {k: b["y"] + b["height"] / 2 for k, b in boxes.items()}
        # the buttons sit on the search box's line, right of it (not wrapped alone)
        assert abs(mid["fit"] - mid["search"]) < 4 and abs(mid["collapse"] - mid["search"]) < 4
        assert boxes["search"]["x"] < boxes["fit"]["x"] < boxes["collapse"]["x"]
        # and a group that wraps starts at the page's left edge, under the title
        if mid["search"] - mid["title"] > 10:
            assert abs(boxes["search"]["x"] - boxes["title"]["x"]) < 2, boxes

        canvas = pg.locator(".graph-canvas").bounding_box()
        drawn = pg.locator(".graph-canvas g.viewport").bounding_box()
        status = pg.inner_text(".graph-status")
        whole = (
            drawn["y"] >= canvas["y"] - 1
            and drawn["y"] + drawn["height"] <= canvas["y"] + canvas["height"] + 1
        )
        if whole:
            assert "this is its top" not in status and pg.locator(".graph-more").is_hidden()
        else:  # part of the graph is off screen: the page says how much, and how to see it
            said = re.search(r"this is its top: (\d+) of its (\d+) boxes are below", status)
            assert said and 0 < int(said[1]) < int(said[2]), status
            assert "Fit" in status
            # the cue on the drawing's bottom edge says as much, and shows the whole graph
            cue = pg.locator(".graph-more")
            assert cue.inner_text() == f"Fit: show all {said[2]} boxes ({said[1]} below)"
            assert cue.is_visible()
            cue.click()
            pg.wait_for_timeout(300)
            drawn = pg.locator(".graph-canvas g.viewport").bounding_box()
            assert drawn["y"] + drawn["height"] <= canvas["y"] + canvas["height"] + 1
            # the count is of boxes, not the open modules' frames (review: the features and
            # classifier frames were counted): DigitsNet's 15 ops, its input and output
            assert int(said[2]) == 17
            assert "this is its top" not in pg.inner_text(".graph-status")
            assert cue.is_hidden()


@pytest.mark.parametrize("width", WIDTHS)
def test_unit_histogram_count_axis_covers_its_bars(
    browser: Any, served: dict[str, Any], width: int
) -> None:
    from lurker.store import Run

    layer, unit = "features.4", 0
    with Run.open(served["path"]) as run:
        counts, _ = run.unit(layer, unit).histogram()
    tallest = int(counts.max())
    assert tallest > 10  # the case of the report: bars of tens, ticks that stopped at 10
    with strict_page(browser, width=width, height=800) as pg:
        pg.goto(served["url"] + f"/unit/{layer}/{unit}")
        chart = pg.locator(".card svg.histogram")
        chart.wait_for()
        got = chart.evaluate(
            """svg => {
              const axis = svg.querySelector('g.y-axis');
              const ticks = [...axis.querySelectorAll('g.tick')].map(t => [
                Number(t.getAttribute('transform').match(/,([-\\d.e]+)\\)/)[1]),
                t.querySelector('text').textContent]);
              const d = axis.querySelector('path.domain').getAttribute('d');
              // axisLeft's domain: M-6,BOTTOM H0.5 V TOP H-6
              const ys = [d.match(/^M[-\\d.e]+,([-\\d.e]+)/)[1], d.match(/V([-\\d.e]+)/)[1]].map(Number);
              const bars = [...svg.querySelectorAll('.bars rect')].map(r => [Number(r.dataset.count), Number(r.getAttribute('y'))]);
              return {ticks, top: Math.min(...ys), bars, label: svg.querySelector('.axis-label').textContent};
            }"""
        )
    value = {"k": 1e3, "M": 1e6}
    ticks = [
        (y, float(t[:-1]) * value[t[-1]] if t[-1] in value else float(t)) for y, t in got["ticks"]
    ]
    top_y, top_value = min(ticks)
    assert top_value >= tallest, (ticks, tallest)  # the highest tick names a count above every bar
    assert abs(top_y - got["top"]) < 1  # ...at the axis's end
    assert all(y >= top_y - 0.5 for _, y in got["bars"])  # no bar reaches past it
    assert max(c for c, _ in got["bars"]) == tallest
    assert len(ticks) >= 4
    assert "samples" in got["label"], got["label"]  # what a count is


def _predictions(explorer_run: ExplorerRun) -> list[tuple[int, int, int]]:  # noqa: F811
    """(sample id, label, top class) of every test digit, by the model run here."""
    from lurker.probe.data import load_dataset

    data = load_dataset("digits:test", 16, channels=1)
    xs, labels, ids = zip(*(data[i] for i in range(len(data))), strict=True)
    with torch.no_grad():
        top = explorer_run.model(torch.stack(list(xs))).argmax(1).tolist()
    return list(zip(ids, labels, top, strict=True))


@pytest.mark.parametrize("width", WIDTHS)
def test_sample_page_says_misclassified(browser: Any, served: dict[str, Any], width: int) -> None:
    rows = _predictions(served["run"])
    wrong = next(r for r in rows if r[1] != r[2])
    right = next(r for r in rows if r[1] == r[2])
    with strict_page(browser, width=width, height=800) as pg:
        pg.goto(served["url"] + f"/sample/{wrong[0]}")
        pg.wait_for_selector("#verdict")
        verdict = pg.locator("#verdict")
        assert verdict.get_attribute("data-verdict") == "misclassified"
        assert verdict.inner_text() == f"predicted {wrong[2]}, true {wrong[1]}: misclassified"
        assert "misclassified" in pg.inner_text("h1")
        pg.goto(served["url"] + f"/sample/{right[0]}")
        pg.wait_for_selector(f"h1:has-text('Sample {right[0]}')")
        pg.wait_for_selector("#verdict")
        assert pg.inner_text("#verdict") == f"predicted {right[2]}: correct"
        assert "misclassified" not in pg.inner_text("h1")


def test_samples_list_marks_the_misclassified(browser: Any, served: dict[str, Any]) -> None:
    rows = {i: (label, top) for i, label, top in _predictions(served["run"])}
    with strict_page(browser, width=800, height=800) as pg:
        pg.goto(served["url"] + "/samples")
        pg.wait_for_selector(".sample-card")
        cards = pg.eval_on_selector_all(
            ".sample-card",
            "els => els.map(e => [Number(e.dataset.sample), e.querySelector('small').textContent,"
            " e.querySelector('small').classList.contains('misclassified')])",
        )
    assert len(cards) == 100
    marked = {i for i, _, wrong in cards if wrong}
    expected = {i for i, _, _ in cards if rows[i][0] != rows[i][1]}
    assert expected and marked == expected
    for i, text, wrong in cards:
        label, top = rows[i]
        assert text == (f"{label} → {top}" if wrong else str(label)), (i, text)
