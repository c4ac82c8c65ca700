"""What a first-time user of the demo sees, in a real browser (Debian's chromium via
Playwright) over the shared digits run with its model attached:

- the live page counts the model's ops as the Home and Graph pages do (the input and
  output apart), where it said "17 ops" beside their "15 ops";
- a receptive-field crop is framed (an outline, a hatched letterbox): a crop of a white
  stroke, or one cut short by the image's edge, read as an empty tile on the white card.

Oracles: a plain trace of the model (its op count) and the run's receptive fields (a first
convolution's 3x3 crop at the image's edge is narrower than the tile).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from explorer_fixtures import (  # noqa: F401
    explorer_run,
    served_explorer_run,
    skip_without_browser,
    strict_page,
)

skip_without_browser()


def test_live_counts_ops_as_the_graph_and_home_pages_do(
    browser: Any, served: dict[str, Any]
) -> None:
    import lurker

    trace = lurker.trace(served["run"].model, torch.zeros(1, 1, 16, 16))
    ops = sum(op.kind == "op" for op in trace)  # what repr(trace) counts: 15 for DigitsNet
    assert f": {ops} ops," in repr(trace)
    with strict_page(browser, width=800, height=600) as pg:
        pg.goto(served["url"] + "/graph")
        pg.wait_for_selector("text=FLOPs")
        assert f"{ops} ops" in pg.locator("main").inner_text()
        pg.goto(served["url"] + "/live")
        heading = pg.locator("h3:has-text('choose one of')").inner_text()
        placeholder = pg.locator("#op-search").get_attribute("placeholder")
    for text in (heading, placeholder):
        assert f"{ops} ops and the input and output" in text, text


@pytest.mark.parametrize("page", ["layer/features.0?thumb=crop", "unit/features.0/0?crop=1"])
def test_receptive_field_crops_are_framed(browser: Any, served: dict[str, Any], page: str) -> None:
    with strict_page(browser, width=1280, height=800) as pg:
        pg.goto(served["url"] + "/" + page)
        sel = ".unit-card .crop" if page.startswith("layer") else ".frame.crop"
        pg.wait_for_selector(sel)
        styles = pg.eval_on_selector_all(
            sel,
            """els => els.map(e => { const s = getComputedStyle(e);
                 return [s.backgroundImage, s.outlineStyle, s.outlineWidth]; })""",
        )
    assert styles
    for background, outline, width in styles:
        # white pixels against a hatched letterbox and an outlined edge, never the card's white
        assert "repeating-linear-gradient" in background
        assert outline == "solid" and width != "0px"
