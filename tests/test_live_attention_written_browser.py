"""The live view's attention card on attention written out by hand, in a real browser
(Debian's chromium via Playwright) over the real server: a small torchvision Swin, whose
softmax op's output is the weights, four windows folded into its batch axis; the card
names the op, offers the windows and draws the chosen one's weights, the API's. The
weights themselves are checked in test_live_attention_written.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from explorer_fixtures import get_json, skip_without_browser, strict_page
from test_live_attention_written import SAMPLE, small_swin

skip_without_browser()

OP = "softmax_2"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from lurker.probe import probe
    from lurker.probe.data import load_dataset
    from lurker.server import create_app
    from lurker.server.serve import background

    torch.manual_seed(0)
    data = load_dataset("digits:test", 32, channels=3)
    root: Path = tmp_path_factory.mktemp("written-attention-browser")
    model = small_swin()
    run = probe(model, data, out=root / "swin", k=3, batch_size=64, progress=False)
    assert run is not None
    run.close()
    with background(create_app(root / "swin", model_obj=model, dataset=data)) as url:
        yield url.rstrip("/")


@pytest.mark.parametrize("width", [1280, 800])
def test_swin_softmax_card(browser: Any, served: str, width: int):
    api = f"{served}/api/runs/swin/live/sample-{SAMPLE}/ops/{OP}/attention"
    with strict_page(browser, width=width) as pg:
        pg.goto(f"{served}/#/r/swin/live?image=sample-{SAMPLE}&op={OP}")
        pg.locator("#attention[data-query]").wait_for()
        card = pg.locator("#attention")
        # the card names the op it is on, and says the weights are its output as computed
        assert f"Attention weights: output of {OP}" in card.locator("h3").inner_text()
        text = card.inner_text()
        assert f"read from {OP}'s output, not recomputed" in text and "4 windows" in text
        assert f"These weights are the output of {OP}" in text
        assert "windows of the image folded into the batch axis" in text
        assert "softmax(q" not in text  # no formula or scale claimed: the model applied its own
        # the windows: window 0 first, another chosen in the selector, kept in the URL
        assert pg.locator("#attn-window option").count() == 4
        assert pg.locator("#attn-window").input_value() == "0"
        pg.select_option("#attn-window", "2")
        pg.locator("#attention[data-window='2']").wait_for()
        assert "window=2" in pg.url
        doc = get_json(f"{api}?window=2&query=0")
        assert doc["window"] == 2
        assert "window 2 (of 0..3)" in pg.locator(".attn-col h4").first.inner_text()
        text = pg.locator("#attn-matrix-range").inner_text()
        shown = repr(float(f"{doc['matrix_max']:.4g}"))  # as web/src/dom.ts fmt(v, 4) writes it
        assert f"max {shown}" in text
        # its tokens are not placed on the image (a window folded into the batch axis)
        assert pg.locator("#attn-overlay").count() == 0 and pg.locator(".attn-strip").count()
        assert pg.evaluate("document.documentElement.scrollWidth") <= width
        shots = os.environ.get("LURKER_SHOTS")
        if shots:
            pg.locator("#attention").screenshot(path=f"{shots}/swin-attention-{width}.png")
