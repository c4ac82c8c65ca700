"""The explorer at the scale of real layers, in a real browser: a layer of 2,048 units
(resnet50's layer4, a ViT MLP are that wide) is built in slices, every card in the end,
in the order the run's own store sorts them; back returns to a card far down the grid;
the live view marks constant maps with their value and says when an upload's
transparency was dropped.

Oracles: the run read back with lurker.store.Run (its SQL sort), forward hooks on the
model, numpy over the served PNGs.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from explorer_fixtures import skip_without_browser, strict_page

skip_without_browser()

WIDE = "hidden.1"  # the ReLU after a Linear of 2,048 units
UNITS = 2048


class _Wide(torch.nn.Module):
    """8x8 digits -> 2,048 hidden units (a ReLU, some of which never fire) -> 10 classes;
    ``conv`` has a channel that never fires after its ReLU (bias -50, no weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.act = torch.nn.ReLU()
        self.hidden = torch.nn.Sequential(torch.nn.Linear(4 * 64, UNITS), torch.nn.ReLU())
        self.head = torch.nn.Linear(UNITS, 10)
        with torch.no_grad():
            self.conv.weight[1] = 0.0
            self.conv.bias[1] = -50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.act(self.conv(x)).flatten(1)))


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from lurker.probe import probe
    from lurker.probe.data import load_dataset
    from lurker.server import create_app
    from lurker.server.serve import background
    from lurker.store import Run

    torch.manual_seed(0)
    model = _Wide().eval()
    data = load_dataset("digits:test", 8, channels=1)
    out = tmp_path_factory.mktemp("wide") / "runs" / "w"
    probe(model, data, out=out, k=2, progress=False, meta={"data": "digits:test"}).close()
    with background(create_app(out, model_obj=model)) as url, Run.open(out) as run:
        yield {"url": url, "run": run, "model": model, "data": data, "out": out}


def _first_batch(pg: Any) -> None:
    """Record in the page how many cards the grid held when it first got any."""
    pg.add_init_script(
        """new MutationObserver((_, obs) => {
             const n = document.querySelectorAll('.unit-card').length;
             if (n && window.__firstCards === undefined) { window.__firstCards = n; obs.disconnect(); }
           }).observe(document, { childList: true, subtree: true });"""
    )


def _order(pg: Any) -> list[int]:
    pg.wait_for_selector(".unit-grid[data-complete]", state="attached")
    return pg.eval_on_selector_all(".unit-card", "cs => cs.map((c) => +c.dataset.unit)")


def test_a_wide_layer_is_built_in_slices_and_shows_every_unit_in_order(wide: dict[str, Any]):
    run = wide["run"]
    assert run.layer(WIDE).num_units == UNITS
    with strict_page(wide["browser"], 1280, 800) as pg:
        _first_batch(pg)
        pg.goto(f"{wide['url']}#/r/w/layer/{WIDE}?sort=max")
        pg.wait_for_selector(".unit-card")
        # the first screenful at once, not all 2,048 (those came in one go before)
        first = pg.evaluate("window.__firstCards")
        assert 0 < first < UNITS
        # then every unit, in the store's order (max, ties by unit)
        assert _order(pg) == [u.index for u in run.units(WIDE, order_by="max")]
        pg.screenshot(path=str(wide["shots"] / "wide-layer.png"))
        for key in ("mean", "index"):
            pg.get_by_role("button", name=key).click()
            assert _order(pg) == [u.index for u in run.units(WIDE, order_by=key)]
            assert f"sort={key}" in pg.url
        # the last card is a link to its unit, reached with the keyboard
        last = pg.locator(".unit-card").last
        assert last.get_attribute("data-unit") == str(UNITS - 1)
        last.focus()
        pg.keyboard.press("Enter")
        pg.wait_for_url(f"**/unit/{WIDE}/{UNITS - 1}**")
        pg.wait_for_selector(".unit-head")


def test_back_returns_to_a_card_far_down_a_wide_grid(wide: dict[str, Any]):
    with strict_page(wide["browser"], 1280, 600) as pg:
        pg.goto(f"{wide['url']}#/r/w/layer/{WIDE}?sort=index")
        pg.wait_for_selector(".unit-grid[data-complete]", state="attached")
        card = pg.locator('.unit-card[data-unit="1900"]')  # far past the first slice
        card.scroll_into_view_if_needed()
        y = pg.evaluate("scrollY")
        assert y > 10_000
        card.click()
        pg.wait_for_selector(".unit-head")
        pg.go_back()
        pg.wait_for_selector('.unit-card[data-unit="1900"]')
        pg.wait_for_function(f"Math.abs(scrollY - {y}) < 2", timeout=5000)
        box = pg.locator('.unit-card[data-unit="1900"]').bounding_box()
        assert box is not None and 0 <= box["y"] < 600


def _hooked_conv(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    seen: list[torch.Tensor] = []
    h = model.act.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen[0][0].numpy()


def test_live_marks_constant_maps_with_their_value(wide: dict[str, Any]):
    from PIL import Image

    x = wide["data"][3][0][None]
    want = _hooked_conv(wide["model"], x)  # (4, 8, 8) after the ReLU
    flat = {c for c in range(4) if want[c].min() == want[c].max()}
    assert 1 in flat  # channel 1 never fires: 0 everywhere
    with strict_page(wide["browser"], 1280, 900) as pg:
        pg.goto(f"{wide['url']}#/r/w/live?image=sample-3&op=act")
        pg.wait_for_selector(".fmaps[data-side=output] .fmap img")
        shown = pg.eval_on_selector_all(
            ".fmaps[data-side=output] .fmap.constant", "cs => cs.map((c) => +c.dataset.channel)"
        )
        assert set(shown) == flat
        label = pg.locator('.fmaps[data-side=output] .fmap[data-channel="1"] .flat-value')
        assert label.inner_text() == "= 0"
        assert "flat grey" in pg.locator("[data-side=output] .map-legend").inner_text()
        # its PNG: flat mid-grey, not black (which reads as "its lowest", or "missing")
        src = pg.get_attribute('.fmaps[data-side=output] .fmap[data-channel="1"] img', "src")
        res = pg.request.get(pg.url.split("#")[0] + src)
        pix = np.asarray(Image.open(io.BytesIO(res.body())))
        assert (pix == 128).all()
        pg.locator(".live-maps").screenshot(path=str(wide["shots"] / "live-constant.png"))
        # the conv's output 1 (bias -50, no weight) beside its kernel: marked there too
        pg.goto(f"{wide['url']}#/r/w/live?image=sample-3&op=conv")
        pg.locator('.fmaps[data-side=output] .fmap[data-channel="1"]').click()
        big = pg.locator(".big-map.constant[data-side=output]")
        big.wait_for()
        assert big.locator(".flat-value").inner_text() == "= -50"
        assert "constant = -50" in big.locator("figcaption").inner_text()
        pg.locator(".maps-row").screenshot(path=str(wide["shots"] / "live-constant-kernel.png"))


def test_live_says_when_an_uploads_transparency_was_dropped(wide: dict[str, Any]):
    from PIL import Image

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[8:24, 8:24, 3] = 255  # an opaque white square on a transparent (black) field
    path = wide["out"].parent / "clear.png"
    Image.fromarray(rgba, "RGBA").save(path)
    with strict_page(wide["browser"], 1280, 900) as pg:
        pg.goto(f"{wide['url']}#/r/w/live")
        pg.set_input_files("#live-file", str(path))
        note = pg.locator("#input-note")
        note.wait_for()
        assert "transparency" in note.inner_text() and "75% of its pixels" in note.inner_text()
        pg.wait_for_function(
            "(() => { const i = document.querySelector('.live-img');"
            " return i && i.complete && i.naturalWidth > 0; })()"
        )
        pg.locator(".live-top").screenshot(path=str(wide["shots"] / "live-transparent.png"))


@pytest.fixture(autouse=True)
def _browser(wide: dict[str, Any], browser: Any) -> None:
    """The session's browser, and where screenshots go (``LURKER_SHOTS``, else the run's
    temporary folder) to look at by eye."""
    wide["browser"] = browser
    wide["shots"] = Path(os.environ.get("LURKER_SHOTS") or wide["out"].parent)
