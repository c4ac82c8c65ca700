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

import numpy as np
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
        # the window is drawn on the image: window 2 of this shifted block is patch rows 6,
        # 7, 0, 1 (the cyclic shift wraps it around) and columns 2..5 of the 8 x 8 grid
        pg.locator("#attn-overlay[data-ready='1']").wait_for()
        assert pg.locator(".attn-strip").count() == 0
        assert doc["patches"]["window"] is True
        assert {c[0] for c in doc["patches"]["keys"]} == {6, 7, 0, 1}
        assert {c[1] for c in doc["patches"]["keys"]} == {2, 3, 4, 5}
        assert "Window 2's patches outlined yellow" in card.inner_text()
        assert "wraps around to its other side" in card.inner_text()
        assert "token 0 (patch row 6, col 2)" in pg.locator("#attn-query option").first.inner_text()
        # on the canvas against the input image drawn alone: the query's strongest key
        # tinted red; the image outside the window dimmed, inside it not
        got, img = (
            np.array(a, float).reshape(256, 256, 4)[..., :3]
            for a in pg.evaluate(
                """async (url) => {
                  const c = document.querySelector('#attn-overlay');
                  const im = new Image(); im.src = url; await im.decode();
                  const o = document.createElement('canvas'); o.width = c.width; o.height = c.height;
                  const g = o.getContext('2d'); g.imageSmoothingEnabled = false;
                  g.drawImage(im, 0, 0, c.width, c.height);
                  const all = (x) => Array.from(x.getImageData(0, 0, c.width, c.height).data);
                  return [all(c.getContext('2d')), all(g)];
                }""",
                f"{served}/api/runs/swin/live/sample-{SAMPLE}/input.png",
            )
        )
        scale = 256 / 32
        window = np.zeros((256, 256), bool)
        for y0, y1, x0, x1 in doc["patches"]["boxes"]:
            window[int(y0 * scale) : int(y1 * scale), int(x0 * scale) : int(x1 * scale)] = True
        top = max(range(doc["keys"]), key=lambda t: doc["mean"][t])
        y0, y1, x0, x1 = (int(v * scale) for v in doc["patches"]["boxes"][top])
        r, g, b = got[(y0 + y1) // 2, (x0 + x1) // 2]
        assert r > g + 60 and r > b + 60, (r, g, b)
        lit = img.sum(-1) > 150  # where the digit is: a dimming shows
        near = window.copy()  # the window and its outline (2 px either side of its edge)
        for d in (-2, -1, 1, 2):
            near |= np.roll(window, d, 0) | np.roll(window, d, 1)
        out = ~near & lit
        out[:, :3] = out[:, -3:] = out[:3] = out[-3:] = False  # the outline on the border
        assert out.sum() > 100 and (got[out].sum(-1) < 0.5 * img[out].sum(-1)).all()
        low = min(range(doc["keys"]), key=lambda t: doc["mean"][t])
        y0, y1, x0, x1 = (int(v * scale) for v in doc["patches"]["boxes"][low])
        part = np.zeros_like(window)
        part[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3] = True  # inside the outline
        assert (got[part & lit][:, 1] > 0.7 * img[part & lit][:, 1]).all()  # not dimmed
        # a click on another patch of the window makes it the query
        box = pg.locator("#attn-overlay").bounding_box()
        assert box is not None
        k = doc["patches"]["keys"].index([7, 4])
        by0, by1, bx0, bx1 = doc["patches"]["boxes"][k]
        pg.mouse.click(
            box["x"] + (bx0 + bx1) / 2 * box["width"] / 32,
            box["y"] + (by0 + by1) / 2 * box["height"] / 32,
        )
        pg.locator(f"#attention[data-query='{k}']").wait_for()
        assert f"query={k}" in pg.url
        assert pg.evaluate("document.documentElement.scrollWidth") <= width
        shots = os.environ.get("LURKER_SHOTS")
        if shots:
            pg.locator("#attention").screenshot(path=f"{shots}/swin-attention-{width}.png")
