"""The first layer's filters in a real browser: the layer page's grid links each kernel to
its unit, the unit page shows its kernel; a layer that does not read the input shows
nothing, and no page asks for what does not exist (no 404 in the console)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from explorer_fixtures import assert_no_filters, skip_without_browser
from lurker.examples import DigitsNet
from lurker.probe import probe
from lurker.probe.data import load_dataset

skip_without_browser()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from lurker.server import create_app
    from lurker.server.serve import background

    torch.manual_seed(0)
    model = DigitsNet().eval()
    out: Path = tmp_path_factory.mktemp("fb") / "d"
    data = load_dataset("digits:test", 16, channels=1)
    probe(model, data, out=out, layers=["features.0", "features.4"], k=3, progress=False)
    with background(create_app(out, model_obj=model)) as url:
        yield url


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    yield pg
    ctx.close()
    assert not errors, f"console errors: {errors}"


def test_layer_page_shows_the_filters_grid_and_a_cell_opens_its_unit(page: Any, served: str):
    page.goto(f"{served}#/r/d/layer/features.0")
    page.wait_for_selector("#filters .filter-grid img")
    page.wait_for_function(
        "() => { const i = document.querySelector('#filters img'); return i.complete && i.naturalWidth > 0; }"
    )
    cells = page.locator("#filters a.filter-cell")
    assert cells.count() == 16
    # each cell shows its kernel (its cell of the grid picture, cropped) over its number
    cell = page.locator('#filters a.filter-cell[data-unit="5"]')
    pic = cell.locator(".filter-pic").bounding_box()
    assert pic["width"] > 4 and pic["height"] > 4
    assert cell.locator(".filter-num").inner_text() == "5"
    assert "grey" in page.locator("#filters").inner_text()
    cell.click()
    page.wait_for_url("**#/r/d/unit/features.0/5")
    page.wait_for_selector("#unit-filter img")
    page.wait_for_function("() => document.querySelector('#unit-filter img').naturalWidth > 0")
    text = page.locator("#unit-filter").inner_text()
    assert "weights" in text and "mid-grey is 0" in text
    # enlarged beside the top samples: left of the gallery, in one row
    fig = page.locator("#unit-filter").bounding_box()
    top = page.locator(".topk").bounding_box()
    assert fig["x"] + fig["width"] <= top["x"] and abs(fig["y"] - top["y"]) < 40


def test_a_layer_that_does_not_read_the_input_shows_no_filters(page: Any, served: str):
    assert_no_filters(page, f"{served}#/r/d", "features.4", 0)
