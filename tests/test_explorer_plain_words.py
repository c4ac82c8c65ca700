"""What a teacher reads on the explorer, in a real browser (Debian's chromium via
Playwright), at 1280 and 800 px:

- the live view says what its maps are in plain words (a channel map per unit, on which
  axis of the shape), not "units on axis N";
- a unit whose feature visualization reaches far more than any dataset sample says why
  that is expected (the optimizer leaves the data), and one that does not stays quiet;
- on a layer with no receptive field the crop button is disabled, its tooltip the
  reason, where a layer with one keeps it.

Oracles: the model's own modules (a convolution's channels, its output shape by a
forward hook), the run's store (each unit's best mean, the stored feature visualization
values) and the run's layer facts (which layers have a field).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from explorer_fixtures import (  # noqa: F401
    FEATVIZ_LAYER,
    FEATVIZ_UNITS,
    explorer_run,
    served_explorer_run,
    served_run,
    skip_without_browser,
    strict_page,
)

skip_without_browser()

WIDTHS = [800, 1280]


@pytest.mark.parametrize("width", WIDTHS)
def test_live_maps_are_described_in_plain_words(
    browser: Any, served: dict[str, Any], width: int
) -> None:
    model = served["run"].model
    conv = model.features[0]  # the first convolution: conv2d_1
    seen: list[torch.Size] = []
    hook = conv.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.zeros(1, 1, 16, 16))
    hook.remove()
    _, channels, hh, ww = seen[0]
    assert channels == conv.out_channels
    with strict_page(browser, width=width, height=800) as pg:
        pg.goto(served["url"] + "/live?image=sample-0&op=conv2d_1")
        pg.wait_for_selector(".fmaps[data-side=output] .fmap img")
        heading = pg.locator("section.card[data-side=output] h3").inner_text()
        given = pg.locator("section.card[data-side=input] h3").inner_text()
    assert (
        f"{channels} channel maps, one per unit (axis 1 of the shape), each {hh}\u00d7{ww}"
        in heading
    )
    assert "units on axis" not in heading
    # the model's own input has channels, not units (its one grey channel here)
    assert "1 channel map, one per channel of the model's input (axis 1 of the shape)" in given


@pytest.fixture(scope="module")
def far_featviz(explorer_run: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:  # noqa: F811
    """A copy of the shared run whose units of FEATVIZ_LAYER (its 16-step images stay near
    the data) also get 128-step ones for FAR_UNITS, as `make demo` makes: served."""
    import shutil

    import lurker
    from lurker.server import create_app
    from lurker.server.serve import background

    copy = tmp_path_factory.mktemp("far-featviz") / explorer_run.path.name
    shutil.copytree(explorer_run.path, copy)
    lurker.featviz(explorer_run.model, FEATVIZ_LAYER, units=FAR_UNITS, steps=128, run=copy).save(
        copy
    )
    with background(create_app(copy, model_obj=explorer_run.model)) as url:
        yield {"url": f"{url}#/r/{copy.name}", "path": copy}


FAR_UNITS = [3, 12]


@pytest.mark.parametrize("width", WIDTHS)
def test_featviz_far_above_the_data_says_why(
    browser: Any, far_featviz: dict[str, Any], width: int
) -> None:
    import contextlib
    import sqlite3

    from lurker.store import Run

    run_dir = far_featviz["path"]
    # the store's rows: what each unit's channel-objective images reached at most
    with contextlib.closing(sqlite3.connect(run_dir / "run.db")) as db:
        reached_by = dict(
            db.execute(
                "SELECT f.unit, max(f.activation) FROM featviz f JOIN layers l"
                " ON l.id = f.layer_id WHERE l.name = ? AND f.objective = 'channel'"
                " GROUP BY f.unit",
                (FEATVIZ_LAYER,),
            ).fetchall()
        )
    units = sorted(reached_by)
    assert set(FAR_UNITS) | set(FEATVIZ_UNITS) <= set(units)
    # the best dataset sample by the channel objective (the map's mean): the mean list's first
    with Run.open(run_dir) as run:
        best = {u: run.unit(FEATVIZ_LAYER, u).to_dict()["top"]["mean"][0]["value"] for u in units}
    said, quiet = [], []
    with strict_page(browser, width=width, height=800) as pg:
        for u in units:
            reached = float(reached_by[u])
            far = best[u] > 0 and reached >= 2 * best[u]
            pg.goto(far_featviz["url"] + f"/unit/{FEATVIZ_LAYER}/{u}?tab=featviz")
            pg.wait_for_selector(".topk .featviz img")
            note = pg.locator("#featviz-beyond")
            assert note.count() == int(far), (u, reached, best[u])
            (said if far else quiet).append(u)
            if far:
                text = note.inner_text()
                assert "expected" in text and "no dataset image" in text
                assert f"{reached:.3g}" in text and f"{best[u]:.3g}" in text
                # across the gallery, above the images, not squeezed into a tile
                box, grid = note.bounding_box(), pg.locator(".topk").bounding_box()
                assert box["width"] > 0.9 * grid["width"]
                assert box["y"] < pg.locator(".topk .featviz").first.bounding_box()["y"]
                assert pg.evaluate("document.documentElement.scrollWidth <= innerWidth")
    assert said and quiet, f"units far above the data: {said}; near it: {quiet}"


@pytest.mark.parametrize("width", WIDTHS)
def test_crop_button_is_disabled_where_the_layer_has_no_receptive_field(
    browser: Any, tmp_path: Path, width: int
) -> None:
    from lurker.store import Run

    model = NoField().eval()
    data = torch.utils.data.TensorDataset(torch.rand(8, 3, 8, 10), torch.zeros(8, dtype=torch.long))
    with served_run(tmp_path, "nofield", model, data, "c1", 3) as s:
        with Run.open(s["run"]) as run:
            by = {info.name: info for info in run.layers}
        assert by["c1"].rf is not None and by["c2"].rf is None and by["c2"].rf_reason
        with strict_page(browser, width=width, height=800) as pg:
            # asked for crops by the URL: a layer with no field shows the full images
            pg.goto(s["url"] + "/#/r/nofield/unit/c2/0?tab=max&crop=1")
            pg.wait_for_selector(".topk .top-entry")
            button = pg.locator(".toolbar .seg button[data-value='1']")
            assert button.is_disabled()
            assert button.get_attribute("title") == (
                f"no crop: this layer has no receptive field ({by['c2'].rf_reason})"
            )
            assert (
                pg.locator(".toolbar .seg button[data-value='0']").get_attribute("aria-pressed")
                == "true"
            )
            assert pg.locator(".topk .frame.crop").count() == 0
            assert pg.evaluate("document.documentElement.scrollWidth <= innerWidth")
            # a layer with a field keeps its crops
            pg.goto(s["url"] + "/#/r/nofield/unit/c1/0?tab=max&crop=0")
            pg.wait_for_selector(".topk .top-entry")
            button = pg.locator(".toolbar .seg button[data-value='1']")
            assert button.is_enabled() and button.get_attribute("title") is None
            button.click()
            pg.wait_for_selector(".topk .frame.crop")


class NoField(torch.nn.Module):
    """A conv (its field exact), then one after swapping H and W: no receptive field."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c1(x))
        return self.c2(a.transpose(2, 3)).mean((2, 3))
