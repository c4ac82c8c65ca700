"""What a teacher projecting the explorer sees, in a real browser (Debian's chromium via
Playwright) over the shared digits run with its model attached, at 800 and 1280 px:

- the live view of a convolution at 800 px keeps its input and output grids readable
  (several maps a row, the chosen pair and kernel above them), where a fixed middle
  column left each grid one map wide;
- the graph's legend names the blue underlined labels: the probed layers, links to
  their units;
- the layer grid says what a tile shows and what its ``max`` and ``mean`` are;
- an output unit's class line goes under its heading and prev/next buttons, which stay on
  the heading's row;
- at 800 px the layer page's facts sit above its chart, their words whole.

Oracles: the model's own modules (channels of a convolution), the graph document and the
run's store (which ops are probed, each unit's max and mean).
"""

from __future__ import annotations

from typing import Any

import pytest

from explorer_fixtures import (  # noqa: F401
    explorer_run,
    served_explorer_run,
    shown_percent,
    skip_without_browser,
    strict_page,
)

skip_without_browser()

WIDTHS = [800, 1280]


@pytest.mark.parametrize("width", WIDTHS)
def test_live_convolution_grids_stay_readable_on_a_narrow_window(
    browser: Any, served: dict[str, Any], width: int
) -> None:
    model = served["run"].model
    conv = model.features[4]  # the second convolution: 16 maps in, 32 out
    with strict_page(browser, width=width, height=800) as pg:
        pg.goto(served["url"] + "/live?image=sample-0&op=conv2d_2")
        pg.wait_for_selector(".fmaps[data-side=output] .fmap img")
        boxes = {
            side: pg.eval_on_selector_all(
                f".fmaps[data-side={side}] .fmap",
                "els => els.map(e => { const b = e.getBoundingClientRect(); return [b.x, b.y]; })",
            )
            for side in ("input", "output")
        }
        assert len(boxes["input"]) == conv.in_channels
        assert len(boxes["output"]) == conv.out_channels
        for side, pts in boxes.items():
            first_row = [x for x, y in pts if abs(y - pts[0][1]) < 2]
            # 16 and 32 maps of 64 px: at least four a row, not one under another
            assert len(first_row) >= 4, f"{side}: {len(first_row)} map(s) a row at {width} px"
        grids = {
            side: pg.locator(f".maps-row > section:has(.fmaps[data-side={side}])").bounding_box()
            for side in ("input", "output")
        }
        pair = pg.locator(".maps-row > .pair").bounding_box()
        if width < 1000:  # the chosen pair and kernel above both grids, across the row
            assert pair["y"] + pair["height"] <= min(g["y"] for g in grids.values()) + 1
        else:  # between them, as before
            assert grids["input"]["x"] + grids["input"]["width"] <= pair["x"]
            assert pair["x"] + pair["width"] <= grids["output"]["x"]
        assert pg.evaluate("document.documentElement.scrollWidth <= innerWidth")


def test_graph_legend_explains_the_probed_layer_links(browser: Any, served: dict[str, Any]) -> None:
    from lurker.store import Run

    with Run.open(served["run"].path) as run:
        probed = {layer.op for layer in run.layers}
    with strict_page(browser, width=800, height=800) as pg:
        pg.goto(served["url"] + "/graph")
        pg.wait_for_selector(".graph-page[data-ready]")
        legend = pg.locator(".graph-legend [data-kind=l-probed]")
        assert legend.count() == 1
        assert "probed layer" in legend.inner_text()
        # the entry is drawn as the links it explains are: blue and underlined
        style = legend.locator("i").evaluate(
            "i => [getComputedStyle(i).textDecorationLine, getComputedStyle(i).color]"
        )
        drawn = pg.locator("svg.graph .probed text.l1").first.evaluate(
            "t => [getComputedStyle(t).textDecorationLine, getComputedStyle(t).fill]"
        )
        assert style == drawn
        # and the links are the ops the run probed
        labels = set(
            pg.eval_on_selector_all("svg.graph .probed text.l1", "ts => ts.map(t => t.textContent)")
        )
        assert labels and labels <= probed


def test_layer_grid_says_what_a_tile_and_its_numbers_are(
    browser: Any, served: dict[str, Any]
) -> None:
    from lurker.store import Run

    layer = "features.8"
    with Run.open(served["run"].path) as run:
        top = max(run.units(layer, order_by="index"), key=lambda u: u.max)
    with strict_page(browser, width=800, height=800) as pg:
        pg.goto(served["url"] + f"/layer/{layer}")
        pg.wait_for_selector(".unit-grid .unit-card")
        note = pg.inner_text("#grid-note")
        assert "the sample that excites the unit most" in note
        assert "max: the unit's highest activation on any sample at any position" in note.lower()
        assert "mean: its average over the dataset" in note
        # what the note says is what the first tile (sorted by max) shows
        card = pg.locator(".unit-grid .unit-card").first
        assert card.get_attribute("data-unit") == str(top.index)
        # its image: the unit's rank-1 sample by max
        assert f"/units/{top.index}/max/0/input.png" in card.locator("img").get_attribute("src")
        assert card.locator(".unit-stats").get_attribute("title").startswith("max: ")
        # the note follows the thumbnail kind
        pg.click(".seg[aria-label=thumbnail] button:text-is('crop')")
        assert "receptive field" in pg.inner_text("#grid-note")


TEXT_WIDTH = """(el, text) => {
    const s = document.createElement('span'), cs = getComputedStyle(el);
    s.style.font = cs.font; s.style.whiteSpace = 'pre'; s.style.position = 'absolute';
    s.textContent = text; document.body.append(s);
    const w = s.getBoundingClientRect().width; s.remove(); return [w, el.clientWidth];
}"""


@pytest.mark.parametrize("width", WIDTHS)
def test_explain_controls_show_their_text_whole(
    browser: Any, served: dict[str, Any], width: int
) -> None:
    """The Grad-CAM layer's chosen option and the unit field's example are read whole."""
    with strict_page(browser, width=width, height=800) as pg:
        pg.goto(served["url"] + "/explain?image=sample-0")
        pg.wait_for_selector(".explain-controls select")
        select = pg.locator(".explain-controls select").first
        chosen = select.evaluate("s => s.options[s.selectedIndex].text")
        assert chosen.startswith("default (")  # names the layer Grad-CAM picks
        text, box = select.evaluate(TEXT_WIDTH, chosen)
        assert text + 24 <= box, f"{chosen!r} ({text:.0f} px) cut in a {box} px select"
        unit = pg.locator(".explain-image input[type=text]")
        hint = unit.get_attribute("placeholder")
        assert "e.g." in hint
        text, box = unit.evaluate(TEXT_WIDTH, hint)
        assert text + 16 <= box, f"{hint!r} ({text:.0f} px) cut in a {box} px field"
        assert pg.evaluate("document.documentElement.scrollWidth <= innerWidth")


def test_top_image_captions_say_class_where_a_class_is_a_number(
    browser: Any, served: dict[str, Any]
) -> None:
    """The digits' classes are numbers: "14.5 #366 4" read as three numbers."""
    from lurker.store import Run

    layer = "features.8"
    with Run.open(served["run"].path) as run:
        top = run.unit(layer, 0).top("max")
    with strict_page(browser, width=800, height=800) as pg:
        pg.goto(served["url"] + f"/unit/{layer}/0?tab=max")
        pg.wait_for_selector(".top-entry figcaption")
        captions = pg.eval_on_selector_all(
            ".top-entry figcaption",
            # (the live link, where a model is attached, is not part of the caption's facts)
            "fs => fs.map(f => [...f.children].filter(c => !c.classList.contains('live-link'))"
            ".map(c => c.textContent))",
        )
        want = [[f"{e.value:.3g}", f"#{e.sample_id}", f"class {e.class_name}"] for e in top]
        assert [[float(v), s, c] for v, s, c in captions] == [
            [pytest.approx(float(v), rel=1e-2), s, c] for v, s, c in want
        ]
        fits = pg.eval_on_selector_all(
            ".top-entry .cls", "cs => cs.every(c => c.scrollWidth <= c.clientWidth)"
        )
        assert fits  # "class 4" whole beside the value and the sample


def test_samples_page_says_what_the_lines_under_each_image_are(
    browser: Any, served: dict[str, Any]
) -> None:
    """A run whose map records predictions: the key names the red "true → predicted"
    and counts them; the count is the model's own mistakes on the page's samples."""
    import shutil

    import torch

    from lurker.map import make_map
    from lurker.probe.data import load_dataset
    from lurker.server import create_app
    from lurker.server.serve import background

    er = served["run"]
    with strict_page(browser, width=800, height=800) as pg:  # no predictions recorded
        pg.goto(served["url"] + "/samples")
        pg.wait_for_selector(".sample-card")
        key = pg.inner_text("#samples-key")
        assert "index in the dataset (#) and its class" in key and "red" not in key
        assert "Click an image for the sample's page" in key  # not "a image"

    run = er.path.parent / "teacher-mapped" / er.path.name
    shutil.copytree(er.path, run)
    try:
        data = load_dataset("digits:test", 16, channels=1)
        make_map(run, method="pca", model=er.model, dataset=data).close()
        with torch.no_grad():
            x = torch.stack([data[i][0] for i in range(100)])
            wrong = sum(
                int(p) != int(data[i][1]) for i, p in enumerate(er.model(x).argmax(1).tolist())
            )
        with background(create_app(run)) as url, strict_page(browser, 800, 800) as pg:
            pg.goto(f"{url}#/r/{run.name}/samples")
            pg.wait_for_selector(".sample-card")
            key = pg.locator("#samples-key")
            assert "true class → the model's prediction" in key.inner_text()
            assert key.locator("strong").inner_text() == str(wrong)
            assert pg.locator(".sample-card .misclassified").count() == wrong
    finally:
        shutil.rmtree(run.parent)


def test_home_offers_the_explain_page_where_it_can_explain(
    browser: Any, served: dict[str, Any]
) -> None:
    """With the model attached the Explain page explains any image: the home links it
    (the button row and the "computed on request" fact), and the link works; without a
    model or precomputed explanations, neither is offered."""
    from lurker.server import create_app
    from lurker.server.serve import background

    with strict_page(browser, width=800, height=800) as pg:
        pg.goto(served["url"])
        pg.wait_for_selector(".entry-links")
        button = pg.locator(".entry-links a", has_text="Explain an image")
        assert button.count() == 1
        fact = pg.locator(".facts a", has_text="computed on request")
        assert fact.get_attribute("href") == button.get_attribute("href")
        button.click()
        pg.wait_for_selector("#explain-sample")
        pg.fill("#explain-sample", "5")
        pg.click("#explain-use-sample")
        pg.wait_for_selector(".explain-card[data-method=saliency] img")
    app = create_app(served["run"].path, live=False)
    with background(app) as url, strict_page(browser, width=800, height=800) as pg:
        pg.goto(f"{url}#/r/{served['run'].path.name}")
        pg.wait_for_selector(".entry-links")
        assert pg.locator(".entry-links a", has_text="Explain").count() == 0
        assert "none precomputed" in pg.inner_text(".card:has-text('This run holds')")


def test_live_predictions_say_what_they_are(browser: Any, served: dict[str, Any]) -> None:
    """The five rows beside the image are named: the model's top classes and their
    probabilities (the model's softmax on the sample, computed here)."""
    import torch

    from lurker.probe.data import load_dataset

    er = served["run"]
    data = load_dataset("digits:test", 16, channels=1)
    with torch.no_grad():
        probs = torch.softmax(er.model(data[3][0][None]), 1)[0]
    top = probs.topk(5)
    with strict_page(browser, width=800, height=800) as pg:
        pg.goto(served["url"] + "/live?image=sample-3&op=conv2d_1")
        pg.wait_for_selector(".preds li")
        assert pg.inner_text("#preds-head") == "The model's top 5: class and probability"
        rows = pg.eval_on_selector_all(
            ".preds li",
            "ls => ls.map(l => [...l.querySelectorAll('span')].map(s => s.textContent))",
        )
        assert [r[0] for r in rows] == [str(i) for i in top.indices.tolist()]
        assert [r[2] for r in rows] == [shown_percent(float(p)) for p in top.values]


@pytest.mark.parametrize("width", WIDTHS)
def test_output_unit_class_line_sits_under_the_heading_and_its_buttons(
    browser: Any, served: dict[str, Any], width: int
) -> None:
    """An output unit's class line went between the heading and its prev/next buttons,
    which then wrapped onto a row of their own under it. The buttons stay on the heading's
    row; the line comes under both, overlapping neither, its text not cut."""
    with strict_page(browser, width=width, height=800) as pg:
        pg.goto(served["url"] + "/unit/classifier.3/3")
        pg.wait_for_selector("#output-class")
        title = pg.locator(".unit-head h1").bounding_box()
        nav = pg.locator(".unit-head .unit-nav").bounding_box()
        line = pg.locator("#output-class").bounding_box()
        # the buttons on the heading's row, right of it
        assert nav["y"] < title["y"] + title["height"] and title["y"] < nav["y"] + nav["height"]
        assert title["x"] + title["width"] <= nav["x"]
        # the class line under both
        assert line["y"] >= max(title["y"] + title["height"], nav["y"] + nav["height"]) - 0.5
        assert pg.eval_on_selector("#output-class", "e => e.scrollWidth <= e.clientWidth")
        assert pg.evaluate("document.documentElement.scrollWidth <= innerWidth")


@pytest.mark.parametrize("width", WIDTHS)
def test_layer_facts_keep_their_words_whole(
    browser: Any, served: dict[str, Any], width: int
) -> None:
    """The layer page's facts sat in the 236 px left beside the chart at 800 px: the
    module's name broke mid-word ("classifier." over "3") and "units are" ran to seven
    lines. Each name stays on one line, no fact wider than the card, the chart not cut."""
    with strict_page(browser, width=width, height=800) as pg:
        pg.goto(served["url"] + "/layer/classifier.3")
        pg.wait_for_selector("#class-units")
        # an inline element broken over lines has a box per line
        assert pg.eval_on_selector(".facts dd code", "e => e.getClientRects().length") == 1
        assert pg.eval_on_selector(".facts dd a", "e => e.getClientRects().length") == 1
        lines = pg.eval_on_selector(
            "#class-units",
            "e => Math.round(e.getBoundingClientRect().height"
            " / parseFloat(getComputedStyle(e.parentElement).lineHeight))",
        )
        assert lines <= 2, f"'units are' on {lines} lines at {width} px"
        assert pg.eval_on_selector_all(
            ".layer-head .card", "cs => cs.every(c => c.scrollWidth <= c.clientWidth)"
        )
        facts = pg.locator(".layer-head .card").first.bounding_box()
        chart = pg.locator(".layer-head .chart-card").bounding_box()
        apart = (
            facts["x"] + facts["width"] <= chart["x"] or facts["y"] + facts["height"] <= chart["y"]
        )
        assert apart, (facts, chart)
