"""The live view's attention card in a real browser (Debian's chromium via Playwright) over
the real server: a small torchvision ViT's attention drawn on the digit's patch grid, its
numbers the API's, the head and query chosen by clicks (and kept in the URL); an attention
whose weights cannot be shown says why. The weights themselves are checked against
``nn.MultiheadAttention`` in test_live_attention.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from explorer_fixtures import get_json, skip_without_browser, strict_page, watch
from test_live_attention import SAMPLE, CausalText, MaskedAttention

skip_without_browser()

OP = "scaled_dot_product_attention_2"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    from lurker.probe import probe
    from lurker.probe.data import load_dataset
    from lurker.server import create_app
    from lurker.server.serve import background
    from models_zoo import DigitsViT

    torch.manual_seed(0)
    data = load_dataset("digits:test", 16, channels=1)
    root: Path = tmp_path_factory.mktemp("attention-browser")
    models = {"vit": DigitsViT().eval(), "masked": MaskedAttention().eval()}
    for rid, model in models.items():
        run = probe(model, data, out=root / rid, k=3, batch_size=128, progress=False)
        assert run is not None
        run.close()
    with (
        background(create_app(root / "vit", model_obj=models["vit"], dataset=data)) as vit,
        background(create_app(root / "masked", model_obj=models["masked"], dataset=data)) as m,
    ):
        yield {"vit": vit.rstrip("/"), "masked": m.rstrip("/")}


def _shown(v: float) -> str:
    """A weight as the card writes it (web/src/dom.ts ``fmt(v, 4)``)."""
    return repr(float(f"{v:.4g}"))


def _redness(pg: Any, selector: str, row: int, col: int) -> int:
    """Red minus green at the middle of patch (row, col) of a 4x4 grid on a drawn overlay."""
    pg.wait_for_selector(f"{selector}[data-ready]")
    return int(
        pg.eval_on_selector(
            selector,
            """(c, [r, k]) => {
                const d = c.getContext('2d').getImageData(
                    Math.floor(c.width * (k + 0.5) / 4), Math.floor(c.height * (r + 0.5) / 4), 1, 1).data;
                return d[0] - d[1];
            }""",
            [row, col],
        )
    )


@pytest.mark.parametrize("width", [1280, 800])
def test_attention_card(browser: Any, served: dict[str, str], width: int):
    url = served["vit"]
    api = f"{url}/api/runs/vit/live/sample-{SAMPLE}/ops/{OP}/attention"
    with strict_page(browser, width=width) as pg:
        pg.goto(f"{url}/#/r/vit/live?image=sample-{SAMPLE}&op={OP}")
        card = pg.locator("#attention[data-query]")
        card.wait_for()
        # the class token's row and the mean over heads first, said so and put in the URL
        assert pg.locator("#attn-query").input_value() == "0"
        assert pg.locator("#attn-query option:checked").inner_text() == "token 0 (class token)"
        assert pg.locator("#attn-head").input_value() == "mean"
        assert "query=0" in pg.url
        doc = get_json(api)
        lo, hi = min(doc["mean"]), max(doc["mean"])
        assert pg.locator("#attn-range").inner_text() == f"min {_shown(lo)} · max {_shown(hi)}"
        assert (
            f"token 0 (class token) {_shown(doc['mean'][0])}"
            in pg.locator("#attn-apart").inner_text()
        )
        # the matrix's legend: the API's range for the mean
        text = pg.locator("#attn-matrix-range").inner_text()
        assert (
            f"min {_shown(doc['matrix_min'])}" in text
            and f"max {_shown(doc['matrix_max'])}" in text
        )
        # a head is chosen by its picture: the URL and the matrix follow
        pg.click(".attn-head[data-head='1']")
        pg.locator("#attention[data-head='1']").wait_for()
        assert "head=1" in pg.url and pg.locator("#attn-head").input_value() == "1"
        # a patch is chosen as the query by a click on it: patch (2, 3) is token 2 * 4 + 3 + 1
        pg.locator("#attn-overlay").scroll_into_view_if_needed()
        box = pg.locator("#attn-overlay").bounding_box()
        assert box is not None
        pg.mouse.click(box["x"] + box["width"] * 3.5 / 4, box["y"] + box["height"] * 2.5 / 4)
        pg.locator("#attention[data-query='12']").wait_for()
        assert "query=12" in pg.url
        assert (
            pg.locator("#attn-query option:checked").inner_text() == "token 12 (patch row 2, col 3)"
        )
        doc = get_json(f"{api}?query=12&head=1")
        row = np.array(doc["rows"][1])
        # the strongest key listed first is the API's, and the overlay is reddest there
        top = int(np.argmax(row))
        assert pg.locator(".attn-top li").first.get_attribute("data-key") == str(top)
        strong = 1 + int(np.argmax(row[1:]))  # the strongest and weakest patch (token 0: none)
        weak = 1 + int(np.argmin(row[1:]))
        red = _redness(pg, "#attn-overlay", *divmod(strong - 1, 4))
        assert red > 100 > 10 > _redness(pg, "#attn-overlay", *divmod(weak - 1, 4))
        # nothing wider than the window
        assert pg.evaluate("document.documentElement.scrollWidth") <= width


def test_attention_that_cannot_be_shown_says_why(browser: Any, served: dict[str, str]):
    """Windows folded into the batch axis: the card says why, in place of the weights."""
    url = served["masked"]
    ctx, pg, errors = watch(browser)
    pg.goto(f"{url}/#/r/masked/live?image=sample-{SAMPLE}&op=scaled_dot_product_attention_3")
    pg.locator("#attention[data-reason]").wait_for()
    assert "holds 4 sequences on its batch axis" in pg.locator("#attention").inner_text()
    ctx.close()
    # the one error answer is the expected 409 (the browser logs it to the console too)
    assert all("409" in e for e in errors), errors


@pytest.mark.parametrize("width", [1280, 800])
def test_text_runs_card_shows_positions_and_causality(
    browser: Any, tmp_path_factory: pytest.TempPathFactory, width: int
):
    """A run of token ids: Live (a typed sequence, here a sample's) gets the attention
    card too (before, none: its endpoint refused token runs), as a strip and a matrix with
    no image; the default query is the last, and the keys after each query, which
    is_causal leaves out, are grey (masked), not white as the smallest weight."""
    from torch.utils.data import TensorDataset

    from lurker.probe import probe
    from lurker.server import create_app
    from lurker.server.serve import background

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 20, (24, 10), generator=g), torch.zeros(24).long())
    model, root = CausalText().eval(), tmp_path_factory.mktemp("attention-text")
    probe(model, data, out=root / "text", k=3, batch_size=16, progress=False).close()
    with (
        background(create_app(root / "text", model_obj=model, dataset=data)) as url,
        strict_page(browser, width=width) as pg,
    ):
        pg.goto(f"{url.rstrip('/')}/#/r/text/live?sample={SAMPLE}")
        pg.locator("#live-attention #attention[data-query='9']").wait_for()
        assert pg.locator("#attn-op").input_value() == "scaled_dot_product_attention_1"
        assert pg.locator("#attn-overlay").count() == 0 and pg.locator(".attn-strip").count()
        assert "token ids" in pg.locator("#attention").inner_text()

        def pixel(row: int, col: int) -> list[int]:
            return pg.eval_on_selector(
                "#attn-matrix",
                "(c, [r, k]) => Array.from(c.getContext('2d').getImageData(k, r, 1, 1).data)",
                [row, col],
            )[:3]

        assert pixel(0, 5) == pixel(3, 9) == [190, 190, 190]  # after the query: grey
        assert pixel(9, 0) != [190, 190, 190] and pixel(0, 0) == [200, 16, 60]  # weight 1
        # the card within the window (the layer cards' "mean" notes beside it are not its own)
        right = pg.eval_on_selector(
            "#live-attention", "e => e.scrollWidth + e.getBoundingClientRect().left"
        )
        assert right <= width
