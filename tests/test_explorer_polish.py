"""Small things the explorer's pages must get right, in a real browser (Debian's chromium
via Playwright) over the real server and a static export of the shared digits run:

- the Map's legend counts what is drawn (*misclassified only*), dimming classes with none;
- the Map's toolbar keeps each label on the line of its buttons at 800 px;
- the Explain page says it is loading while the model answers, names a bad unit target
  once, and names the class of its concept relevance as its heading does;
- commands are shown as code, never as Markdown backticks;
- the feature visualization's "best sample" caption is not cut off;
- a static export opened as a file says to serve it over HTTP (not a blank page);
- back and forward return to where a page was scrolled (a layer's grid of units);
- at 800 px the home page's facts keep their words whole and the unit's charts stay legible;
- the Live page's op list works from the keyboard; its vector charts put each index's
  tick under its bar and name the first index of a tied minimum;
- the Samples page past its last sample says so and links back.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from explorer_fixtures import (  # noqa: F401
    FEATVIZ_LAYER,
    FEATVIZ_UNITS,
    ExplorerRun,
    explorer_run,
    skip_without_browser,
    static_server,
    strict_page,
    watch,
)

skip_without_browser()

RID = "digits"


@pytest.fixture(scope="module")
def mapped(
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    """A copy of the shared run with a (PCA) map, served with its model attached."""
    from lurker.map import make_map
    from lurker.probe.data import load_dataset
    from lurker.server import create_app
    from lurker.server.serve import background
    from lurker.store import Run

    run = tmp_path_factory.mktemp("polish") / RID
    shutil.copytree(explorer_run.path, run)
    data = load_dataset("digits:test", 16, channels=1)
    make_map(run, method="pca", model=explorer_run.model, dataset=data).close()
    with Run.open(run) as r:
        m = r.map()
    with background(create_app(run, model_obj=explorer_run.model)) as url:
        yield {"url": url, "run": run, "map": m, "model": explorer_run.model, "data": data}


@pytest.fixture(scope="module")
def site(mapped: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """`lurker export` of that run, served by a plain static file server."""
    from lurker.server.export import export_site

    out = export_site(mapped["run"], mapped["run"].parent / "site", progress=False)
    with static_server(out) as url:
        yield {"url": url, "path": out}


def _open_map(pg: Any, url: str, query: str = "") -> None:
    pg.goto(f"{url}#/r/{RID}/map{query}")
    pg.wait_for_selector("canvas.map-canvas[data-shown]")


def _legend(pg: Any) -> list[dict[str, Any]]:
    return pg.locator(".map-legend > span").evaluate_all(
        "es => es.map(e => ({text: e.textContent.trim(), dim: e.classList.contains('none'),"
        " opacity: +getComputedStyle(e).opacity}))"
    )


# ---------------------------------------------------------------------- 1. map legend


def test_map_legend_counts_what_misclassified_only_draws(browser: Any, mapped: dict[str, Any]):
    import numpy as np

    m = mapped["map"]
    classes = [str(c) for c in range(10)]
    wrong = (m.label != m.pred) & (m.pred >= 0)
    total = [int((m.label == c).sum()) for c in range(10)]
    shown = [int(((m.label == c) & wrong).sum()) for c in range(10)]
    assert 0 < sum(shown) < len(m)
    with strict_page(browser) as pg:
        _open_map(pg, mapped["url"])  # every dot drawn: plain counts
        assert [e["text"] for e in _legend(pg)] == [
            f"{n} ({t})" for n, t in zip(classes, total, strict=True)
        ]
        assert not any(e["dim"] for e in _legend(pg))

        pg.get_by_label("misclassified only").check()
        assert pg.locator("canvas.map-canvas").get_attribute("data-shown") == str(sum(shown))
        legend = _legend(pg)
        assert [e["text"] for e in legend] == [
            f"{n} ({s} of {t})" for n, s, t in zip(classes, shown, total, strict=True)
        ]
        # a class none of whose dots is drawn is dimmed, the others not
        assert [e["dim"] for e in legend] == [s == 0 for s in shown]
        assert all((e["opacity"] < 1) == (s == 0) for e, s in zip(legend, shown, strict=True))

        # coloured by correct / wrong: no correct dot is drawn
        pg.get_by_role("button", name="correct / wrong").click()
        right, nw = int((~wrong).sum()), int(wrong.sum())
        legend = _legend(pg)
        assert [e["text"] for e in legend] == [
            f"correct (0 of {right})",
            f"misclassified ({nw} of {nw})",
        ]
        assert [e["dim"] for e in legend] == [True, False]
        assert np.isclose(legend[0]["opacity"], 0.4)


# ---------------------------------------------------------------------- 7. map toolbar


def test_map_toolbar_keeps_each_label_with_its_buttons_at_800px(
    browser: Any, mapped: dict[str, Any]
):
    with strict_page(browser, 800, 800) as pg:
        _open_map(pg, mapped["url"])
        boxes = pg.evaluate(
            """() => {
            const box = e => { const r = e.getBoundingClientRect(); return [r.top, r.bottom]; };
            const label = t => [...document.querySelectorAll('.toolbar span.muted')]
                .find(e => e.textContent === t);
            return {
              drag: box(label('drag to')),
              pan: box(document.querySelector('.toolbar [data-tool="pan"]')),
              lasso: box(document.querySelector('.toolbar [data-tool="lasso"]')),
              colour: box(label('colour by')),
              cls: box(document.querySelector('.toolbar [data-color="class"]')),
            };
          }"""
        )

    def same_line(a: list[float], b: list[float]) -> bool:
        mid = (a[0] + a[1]) / 2
        return b[0] <= mid <= b[1]

    assert same_line(boxes["drag"], boxes["pan"]), boxes
    assert same_line(boxes["drag"], boxes["lasso"]), boxes
    assert same_line(boxes["colour"], boxes["cls"]), boxes


# ---------------------------------------------------------------------- 2. explain loading


def test_explain_says_it_is_loading_until_the_model_answers(browser: Any, mapped: dict[str, Any]):
    """The image's predictions (the first request that needs the model: seconds on a
    freshly started server) are held back here: meanwhile the page says what it waits for."""
    held: list[Any] = []
    with strict_page(browser) as pg:
        pg.route(lambda u: u.endswith(f"/api/runs/{RID}/live/sample-5"), lambda r: held.append(r))
        pg.goto(f"{mapped['url']}#/r/{RID}/explain?image=sample-5")
        status = pg.locator("main .loading[role=status]")
        status.wait_for()
        for _ in range(100):  # the route handler runs while Playwright waits
            if held:
                break
            pg.wait_for_timeout(50)
        assert held, "the live request was not made"
        pg.wait_for_timeout(500)  # still waiting for it: still saying so
        assert status.inner_text() == "Loading the model and the image…"
        assert status.is_visible()
        held[0].continue_()
        pg.wait_for_selector(".methods .explain-card")
        assert pg.locator("main .loading").count() == 0


# ---------------------------------------------------------------------- 3. explain target


def test_a_bad_unit_target_is_named_once(browser: Any, mapped: dict[str, Any]):
    target = f"{FEATVIZ_LAYER}:99"  # the layer has 32 channels
    ctx, pg, errors = watch(browser)
    try:
        pg.goto(f"{mapped['url']}#/r/{RID}/explain?image=sample-5")
        pg.wait_for_selector(".methods .explain-card")
        pg.locator("#explain-unit").fill(target)
        pg.locator("#explain-unit").press("Enter")
        note = pg.locator(".notice.error")
        note.wait_for()
        text = note.inner_text()
        assert text.count(target) == 1, text
        assert "out of range" in text
    finally:
        ctx.close()
    # the one failed request is that target's (a 4xx answer, said on the page)
    assert errors and all("target=" in e or "status of 4" in e for e in errors), errors


# ---------------------------------------------------------------------- 4. concept class name


def test_concept_relevance_names_the_class_as_the_heading_does(
    browser: Any, mapped: dict[str, Any]
):
    """A run whose classes have names (the digits' are their indices: the predictions'
    names are replaced here): the heading and the concept relevance both name the class."""
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    top: list[int] = []

    def named(route: Any) -> None:
        res = route.fetch()
        doc = res.json()
        for q in doc["predictions"]:
            q["name"] = names[q["class"]]
        top.append(doc["predictions"][0]["class"])
        route.fulfill(response=res, body=json.dumps(doc))

    with strict_page(browser) as pg:
        pg.route(lambda u: u.endswith(f"/api/runs/{RID}/live/sample-5"), named)
        pg.goto(f"{mapped['url']}#/r/{RID}/explain?image=sample-5")
        pg.wait_for_selector(".methods .explain-card")
        name = names[top[0]]
        assert f"for class {name} (the top prediction)" in pg.locator("main h2").first.inner_text()
        pg.wait_for_selector(".concept")
        text = pg.locator(".concept-section > p").first.inner_text()
        # a name that is no number needs no index (classes.ts: one rule on every page)
        assert f"for class {name};" in text, text


# ---------------------------------------------------------------------- 5. commands as code


def test_commands_are_code_not_backticks(browser: Any, site: dict[str, Any]):
    exported = json.loads(
        (site["path"] / "data" / "runs" / RID / "exported-samples.json").read_text()
    )
    held = {s["id"] for s in exported["samples"]}
    missing = min(set(range(exported["total"])) - held)
    ctx, pg, errors = watch(browser)
    try:
        pg.goto(f"{site['url']}#/r/{RID}/sample/{missing}")
        note = pg.locator(".notice.error")
        note.wait_for()
        assert "not in this static export" in note.inner_text()
        assert "`" not in note.inner_text()
        assert note.locator("code").all_inner_texts() == ["lurker serve RUN"]

        pg.goto(f"{site['url']}#/r/{RID}/samples")
        note = pg.locator("main .notice").first
        note.wait_for()
        assert "`" not in note.inner_text()
        assert note.locator("code").all_inner_texts() == ["lurker serve RUN"]
    finally:
        ctx.close()
    assert not errors, errors  # the static client asks for no file the site lacks


# ---------------------------------------------------------------------- 6. featviz caption


@pytest.mark.parametrize("width", [1280, 800])
def test_best_sample_caption_is_not_cut_off(browser: Any, mapped: dict[str, Any], width: int):
    unit = FEATVIZ_UNITS[0]
    with strict_page(browser, width, 800) as pg:
        pg.goto(f"{mapped['url']}#/r/{RID}/unit/{FEATVIZ_LAYER}/{unit}?tab=featviz")
        best = pg.locator(".top-entry.best")
        best.wait_for()
        label = best.locator(".cls")
        assert label.inner_text() == "best sample"
        fit = label.evaluate(
            "e => { const f = e.closest('figure').getBoundingClientRect(), r = "
            "e.getBoundingClientRect(); return {scroll: e.scrollWidth, client: e.clientWidth, "
            "right: r.right, fright: f.right}; }"
        )
        assert fit["scroll"] <= fit["client"] and fit["right"] <= fit["fright"] + 0.5, fit


# ---------------------------------------------------------------------- 8. file://


def test_static_export_opened_as_a_file_says_to_serve_it(browser: Any, site: dict[str, Any]):
    index = site["path"] / "index.html"
    ctx, pg, _ = watch(browser)  # the blocked module script is a console error, expected
    try:
        pg.goto(index.as_uri())
        box = pg.locator("#file-protocol")
        box.wait_for()
        text = box.inner_text()
        assert "served over HTTP" in text
        assert f"python -m http.server -d '{site['path']}' 8000" in text
        assert "http://127.0.0.1:8000/" in text
    finally:
        ctx.close()
    # served over HTTP, the site shows its pages and no such message
    with strict_page(browser) as pg:
        pg.goto(site["url"])
        pg.wait_for_selector("table.layers")
        assert pg.locator("#file-protocol").count() == 0


# ---------------------------------------------------------------------- 9. back to a scroll


def test_back_returns_to_where_the_layer_grid_was_scrolled(browser: Any, mapped: dict[str, Any]):
    with strict_page(browser, 1280, 400) as pg:
        pg.goto(f"{mapped['url']}#/r/{RID}/layer/classifier.1?sort=index")
        card = pg.locator('.unit-card[data-unit="50"]')
        card.scroll_into_view_if_needed()
        y = pg.evaluate("scrollY")
        assert y > 300
        card.click()
        pg.wait_for_selector(".unit-head")
        assert pg.evaluate("scrollY") == 0  # a new page starts at its top
        pg.go_back()
        pg.wait_for_selector('.unit-card[data-unit="50"]')
        pg.wait_for_function(f"Math.abs(scrollY - {y}) < 2", timeout=5000)
        pg.go_forward()
        pg.wait_for_selector(".unit-head")
        assert pg.evaluate("scrollY") == 0


# ---------------------------------------------------------------------- 10. 800 px


def test_home_facts_and_unit_charts_at_800px(browser: Any, mapped: dict[str, Any]):
    with strict_page(browser, 800, 800) as pg:
        pg.goto(f"{mapped['url']}#/r/{RID}")
        link = pg.locator(".facts a", has_text="traced graph")
        link.wait_for()
        # an inline link broken over lines has one box per line ("trace / d / graph")
        assert link.evaluate("e => e.getClientRects().length") == 1
        pg.goto(f"{mapped['url']}#/r/{RID}/unit/features.4/3")
        pg.wait_for_selector(".cards.two svg.chart")
        widths = pg.locator(".cards.two svg.chart").evaluate_all(
            "es => es.map(e => e.getBoundingClientRect().width)"
        )
        # drawn 520 px wide: squeezed two a row into 800 px, their 11 px text shrank to 7
        assert len(widths) == 2 and min(widths) >= 480, widths


# ---------------------------------------------------------------------- 11. live page


def test_live_op_list_works_from_the_keyboard(browser: Any, mapped: dict[str, Any]):
    with strict_page(browser) as pg:
        pg.goto(f"{mapped['url']}#/r/{RID}/live?image=sample-1")
        search = pg.locator("#op-search")
        search.wait_for()
        search.fill("relu")
        search.press("Enter")  # the first op it lists
        pg.wait_for_function("location.hash.includes('op=relu_1')")
        pg.wait_for_selector('.op-list li.on[data-op="relu_1"]')
        item = pg.locator('.op-list li[data-op="conv2d_2"]')
        item.focus()
        assert item.evaluate("e => e === document.activeElement")  # Tab reaches it
        item.press("Enter")
        pg.wait_for_function("location.hash.includes('op=conv2d_2')")
        pg.wait_for_selector('.op-list li.on[data-op="conv2d_2"]')
        pg.locator('.op-list li[data-op="relu_2"]').press(" ")
        pg.wait_for_function("location.hash.includes('op=relu_2')")


def test_live_vector_ticks_and_tied_minimum(browser: Any, mapped: dict[str, Any]):
    import httpx2 as httpx

    url = f"{mapped['url']}api/runs/{RID}/live/sample-1/ops/relu_4/output/0.json"
    vals = httpx.get(url, timeout=60).json()["values"][0]
    low = min(vals)
    assert vals.count(low) > 1  # a ReLU's zeros
    with strict_page(browser) as pg:
        pg.goto(f"{mapped['url']}#/r/{RID}/live?image=sample-1&op=output_1")
        strip = pg.locator('svg.vector-strip[data-side="output"]')
        strip.wait_for()
        bars = strip.locator("g.bars rect").evaluate_all(
            "es => es.map(e => [+e.getAttribute('x'), +e.getAttribute('width')])"
        )
        ticks = strip.locator('g[transform^="translate(0,"] g.tick').evaluate_all(  # x axis
            "es => es.filter(e => e.textContent !== '').map(e => [+e.textContent,"
            " e.transform.baseVal.consolidate().matrix.e])"
        )
        step = bars[1][0] - bars[0][0]
        assert ticks and len(bars) == 10
        for i, x in ticks:  # under the middle of its bar, not at its left edge
            assert abs(x - (bars[i][0] + step / 2)) < 1, (i, x, bars[i])
        pg.goto(f"{mapped['url']}#/r/{RID}/live?image=sample-1&op=relu_4")
        text = pg.locator('.vector-view[data-side="output"] .vec-range').inner_text()
        assert f"min 0 at index {vals.index(low)} " in text, text


# ---------------------------------------------------------------------- 12. samples


def test_samples_past_the_end_say_so(browser: Any, mapped: dict[str, Any]):
    with strict_page(browser) as pg:
        pg.goto(f"{mapped['url']}#/r/{RID}/samples?offset=1000")
        note = pg.locator("#past-the-end")
        note.wait_for()
        assert "There are 360 samples: none from 1001 on." in note.inner_text()
        assert note.locator("a").get_attribute("href").endswith("/samples?offset=300")
        assert pg.locator(".pager span").first.inner_text() == "none of 360"
        prev = pg.locator(".pager a", has_text="previous").first
        assert prev.get_attribute("href").endswith("/samples?offset=300")
        prev.click()
        pg.wait_for_selector('.sample-card[data-sample="359"]')
        assert pg.locator(".pager span").first.inner_text() == "301\u2013360 of 360"


def test_home_says_which_images_had_their_transparency_dropped(tmp_path: Any, browser: Any):
    """The probe keeps how many images it fed without their alpha (``transparent_images``):
    the run summary gives it and the Home page's Dataset card says it, with two of the
    files, where a user reads what the data set was; a dataset lurker does not decode
    itself has no such row (nothing was checked), not "none". Oracle: numpy over the files' decoded alpha."""
    import warnings

    import torch
    from torch.utils.data import TensorDataset

    from lurker.probe import probe
    from lurker.probe.data import image_folder, wrap
    from lurker.server import create_app
    from lurker.server.serve import background
    from test_probe_data import _clear_tree

    clear = _clear_tree(tmp_path / "imgs")
    want = sorted(p for p, c in clear.items() if c)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(784, 2)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = image_folder(tmp_path / "imgs", 16)
        probe(model, ds, out=tmp_path / "runs" / "clear", k=2, batch_size=4, progress=False)
        opaque = wrap(TensorDataset(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 0, 1])))
        probe(model, opaque, out=tmp_path / "runs" / "wrapped", k=2, progress=False)
    with background(create_app(tmp_path / "runs")) as url, strict_page(browser, 1280, 900) as pg:
        summary = pg.request.get(f"{url.rstrip('/')}/api/runs/clear").json()
        assert summary["dataset"]["transparent_images"] == {"count": 3, "examples": want[:2]}
        pg.goto(f"{url}#/r/clear")
        row = pg.locator(".transparent-images")
        row.wait_for()
        text = row.inner_text()
        assert text.startswith("3 images: fed with their alpha dropped")
        # each example named relative to the dataset's folder, its whole path on hover
        titles = row.locator("code").evaluate_all("els => els.map(e => e.title)")
        assert titles == want[:2] and text.endswith(", …")
        assert all(f"{Path(p).parent.name}/{Path(p).name}" in text for p in want[:2])
        assert not any(p in text for p in want[:2])
        pg.locator('.card:has(h2:text-is("Dataset"))').screenshot(path=str(tmp_path / "home.png"))
        assert (
            pg.request.get(f"{url.rstrip('/')}/api/runs/wrapped").json()["dataset"][
                "transparent_images"
            ]
            is None
        )
        pg.goto(f"{url}#/r/wrapped")
        card = pg.locator('.card:has(h2:text-is("Dataset"))')
        card.wait_for()
        # lurker did not read its files, so it has nothing to say: no row at all (it read
        # "transparency dropped: not checked", which told a reader nothing)
        assert "samples" in card.inner_text() and "transparen" not in card.inner_text()


def test_layer_page_shows_direction_feature_visualizations(
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path: Any,
    browser: Any,
) -> None:
    """Images of ``featviz(..., objective="direction")`` stored in a run were shown
    nowhere (a direction is not a unit, so the unit pages leave them out). The layer page
    shows each direction by its index, with its images, what they reached and the units it
    weighs most; an index past the unit count works (it is not a unit), and a static export
    holds the same images. Oracles: the stored PNG bytes and activations
    (``Run.featviz``), numpy's argsort of |direction| for the strongest units."""
    import numpy as np

    import lurker
    from lurker.server import create_app
    from lurker.server.export import export_site
    from lurker.server.serve import background
    from lurker.store import Run

    run = tmp_path / RID
    shutil.copytree(explorer_run.path, run)
    dirs = np.random.default_rng(0).normal(size=(40, 32))  # 40 directions in 32 units
    lurker.featviz(
        explorer_run.model, FEATVIZ_LAYER, units=[2, 39], objective="direction",
        directions=dirs, steps=4, images_per_unit=2, run=run,
    ).save(run)  # fmt: skip
    with Run.open(run) as r:
        stored = r.featviz(FEATVIZ_LAYER, objective="direction")
        pngs = {d: stored.png(d) for d in (2, 39)}
        acts = stored.activations
    with background(create_app(run)) as url, strict_page(browser, 1280, 900) as pg:
        base = f"{url.rstrip('/')}/api/runs/{RID}/layers/{FEATVIZ_LAYER}"
        doc = pg.request.get(base).json()["featviz_directions"]
        assert [d["index"] for d in doc] == [2, 39]
        for d, row in zip(doc, acts):
            assert d["activations"] == pytest.approx(row.tolist())
            top = np.argsort(-np.abs(dirs[d["index"]]), kind="stable")[:5]
            assert [u["unit"] for u in d["top_units"]] == top.tolist()
            assert [u["weight"] for u in d["top_units"]] == pytest.approx(dirs[d["index"]][top])
        got = pg.request.get(f"{base}/featviz/direction/39/0.png")
        assert got.status == 200 and got.body() == pngs[39]
        assert pg.request.get(f"{base}/featviz/direction/5/0.png").status == 404
        pg.goto(f"{url}#/r/{RID}/layer/{FEATVIZ_LAYER}")
        section = pg.locator("#directions")
        section.wait_for()
        figs = section.locator("figure.direction")
        assert figs.count() == 2
        last = figs.nth(1)
        assert last.get_attribute("data-direction") == "39"
        assert last.locator("img").count() == 2
        text = last.locator("figcaption").inner_text()
        assert text.startswith("direction 39 · reached ")
        assert f"strongest of 32 units: {np.argsort(-np.abs(dirs[39]))[0]} (" in text
        last.locator("a.direction-unit").first.click()
        pg.wait_for_url(f"**/unit/{FEATVIZ_LAYER}/{np.argsort(-np.abs(dirs[39]))[0]}")
        pg.goto(f"{url}#/r/{RID}/layer/{FEATVIZ_LAYER}")
        pg.wait_for_function(
            "[...document.querySelectorAll('#directions img')]"
            ".every((i) => i.complete && i.naturalWidth > 0)"
        )
        section.screenshot(path=str(tmp_path / "directions.png"))
    site = export_site(run, tmp_path / "site", progress=False)
    exported = site / "data" / "runs" / RID / "layers" / FEATVIZ_LAYER / "featviz" / "direction"
    assert (exported / "39" / "0.png").read_bytes() == pngs[39]
    assert (exported / "2" / "1.png").is_file()
