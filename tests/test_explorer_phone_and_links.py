"""The explorer on a phone and along the path a user follows, in a real browser (Debian's
chromium via Playwright) over the shared digits run with its model attached:

- at 390x844 (a phone) no page is wider than the screen: the top bar's links are all on
  screen (they ran 220 px past its edge, Live and Explain out of reach) and Home's cards
  are one a row (two a row squeezed their facts to a few letters a line);
- a unit's top samples open the live view on that sample at the unit's op with the unit's
  map marked, and a probed op's live maps link to their layer and unit pages (the unit
  page led to a sample, whose "Open in live view" opened on the first probed op, with
  nothing saying which map was the unit).

Oracles: a trace of the model (which op the layer is), forward hooks on the model (the
unit's activation on the sample) against numpy over the served map PNG.
"""

from __future__ import annotations

import io
import urllib.parse
import urllib.request
from typing import Any

import numpy as np
import pytest
import torch

from explorer_fixtures import (  # noqa: F401
    FEATVIZ_LAYER,
    explorer_run,
    served_explorer_run,
    skip_without_browser,
    strict_page,
)

skip_without_browser()

PHONE = (390, 844)

PAGES = [
    ("", ".facts"),
    ("/graph", ".graph-bar"),
    (f"/layer/{FEATVIZ_LAYER}", ".unit-grid .unit-card"),
    (f"/unit/{FEATVIZ_LAYER}/1?tab=featviz", ".tabs"),
    ("/samples", ".sample-grid"),
    ("/sample/3", "#open-live"),
    ("/live?image=sample-3&op=conv2d_2", ".fmaps[data-side=output] .fmap"),
    ("/explain?image=sample-3", ".heatmap, .explain-top"),
]


@pytest.mark.parametrize(("path", "ready"), PAGES, ids=[p or "home" for p, _ in PAGES])
def test_no_page_is_wider_than_a_phone(
    browser: Any, served: dict[str, Any], path: str, ready: str
) -> None:
    with strict_page(browser, *PHONE) as pg:
        pg.goto(served["url"] + path)
        pg.wait_for_selector(ready)
        pg.wait_for_load_state("networkidle")
        width = pg.evaluate("document.documentElement.scrollWidth")
        links = pg.eval_on_selector_all(
            ".main-nav a", "els => els.map(e => [e.textContent, e.getBoundingClientRect().right])"
        )
        facts = pg.eval_on_selector_all(".facts dd", "els => els.map(e => e.clientWidth)")
    assert width <= PHONE[0], f"the page is {width} px wide on a {PHONE[0]} px screen"
    assert [t for t, _ in links] == ["Home", "Graph", "Layers", "Samples", "Map", "Live", "Explain"]
    off = [t for t, right in links if right > PHONE[0]]
    assert not off, f"top bar links past the screen's edge: {off}"
    if path == "":
        # one card a row: a fact's value has room for a few words, not a few letters
        assert facts and min(facts) >= 150, facts


def _layer_op(model: torch.nn.Module, layer: str) -> str:
    import lurker

    trace = lurker.trace(model, torch.zeros(1, 1, 16, 16))
    (op,) = [o.label for o in trace if o.kind == "op" and o.module == layer]
    return op


def test_a_unit_s_top_sample_opens_live_with_the_unit_marked(
    browser: Any, served: dict[str, Any]
) -> None:
    from lurker.probe.data import load_dataset

    model = served["run"].model
    unit = 2
    op = _layer_op(model, FEATVIZ_LAYER)
    with strict_page(browser, 1280, 900) as pg:
        pg.goto(served["url"] + f"/unit/{FEATVIZ_LAYER}/{unit}?tab=max")
        pg.wait_for_selector(".top-entry .live-link")
        entries = pg.eval_on_selector_all(
            ".top-entry",
            "els => els.map(e => [e.dataset.sample, e.querySelector('.live-link')?.getAttribute('href')])",
        )
        assert entries
        for sample, href in entries:
            q = urllib.parse.parse_qs(href.split("?", 1)[1])
            assert href.split("?")[0].endswith("/live")
            assert q == {"image": [f"sample-{sample}"], "op": [op], "unit": [str(unit)]}, href
        sample = int(entries[0][0])
        pg.locator(".top-entry .live-link").first.click()
        pg.wait_for_selector("#marked-unit img")
        marked = pg.locator("#marked-unit")
        assert marked.get_attribute("data-channel") == str(unit)
        src = pg.locator("#marked-unit img").get_attribute("src")
        assert src.endswith(f"/ops/{op}/output/{unit}.png"), src
        # the one marked map, chosen for the kernel view, and linked to the unit's page
        assert pg.locator(".fmaps[data-side=output] .unit-mark").count() == 1
        assert "sel" in (marked.get_attribute("class") or "")
        unit_link = pg.locator("#marked-unit-link").get_attribute("href")
        assert unit_link.endswith(f"/unit/{FEATVIZ_LAYER}/{unit}")
        layer_link = pg.locator("h2 a.probed-layer").get_attribute("href")
        assert layer_link.endswith(f"/layer/{FEATVIZ_LAYER}")
        png = urllib.request.urlopen(urllib.parse.urljoin(pg.url, src)).read()

    # the marked map is the unit's activation on that sample (hooks on the model)
    from PIL import Image

    x = load_dataset("digits:test", 16, channels=1)[sample][0]
    seen: dict[str, torch.Tensor] = {}
    module = dict(model.named_modules())[FEATVIZ_LAYER]
    # (a copy: the in-place ReLU after the conv overwrites its output)
    handle = module.register_forward_hook(lambda m, i, o: seen.update(out=o.detach().clone()))
    try:
        with torch.no_grad():
            model(x.unsqueeze(0))
    finally:
        handle.remove()
    a = seen["out"][0, unit].numpy().astype(np.float64)
    want = (a - a.min()) / (a.max() - a.min())
    got = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64) / 255
    h, w = want.shape
    # (the PNG may be the map enlarged by a whole factor, pixel for pixel)
    got = got[:: got.shape[0] // h, :: got.shape[1] // w][:h, :w]
    assert np.abs(got - want).max() <= 1.5 / 255


def test_live_names_a_probed_op_s_layer_and_no_other(browser: Any, served: dict[str, Any]) -> None:
    with strict_page(browser, 1280, 900) as pg:
        pg.goto(served["url"] + "/live?image=sample-3&op=relu_1")
        pg.wait_for_selector(".units-line")
        assert pg.locator("h2 a.probed-layer").inner_text() == "features.2"
        assert pg.locator(".units-line a").first.inner_text() == "features.2"
        assert pg.locator(".unit-mark").count() == 0  # no unit asked for, none marked
        pg.goto(served["url"] + "/live?image=sample-3&op=batch_norm_1")
        pg.wait_for_selector(".fmaps[data-side=output] .fmap")
        assert pg.locator(".units-line").count() == 0
        assert pg.locator("h2 a.probed-layer").count() == 0
