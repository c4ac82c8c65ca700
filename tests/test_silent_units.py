"""Units that are constant on the dataset (a ReLU that never fires): their top lists are
ties ranked by sample id alone, so the explorer says so instead of showing them.

Two runs of models whose weights are set by hand, so which units are constant is known
without the criterion under test:

* a synthetic one (in-memory tensors): constant units of 0 and of other values, at
  positions and without, beside near-constant ones that must not be caught (a single
  value lower, or higher, at one position of one sample);
* one over the digits (the server can show their images): the unit page, the layer grid
  and the sample page in a browser, served and as a static export.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from explorer_fixtures import static_server, watch

K = 5
STATIC = Path(__file__).resolve().parents[1] / "src" / "lurker" / "server" / "static"


# -- the criterion ----------------------------------------------------------------------


def test_criterion_on_stored_statistics() -> None:
    from lurker.server.state import constant_tolerance, is_constant

    assert is_constant(0.0, 0.0, [0.0] * K, 64)  # a ReLU that never fires: exact
    assert not is_constant(1e-12, 1e-6, [1e-6] + [0.0] * (K - 1), 64)  # fires once, weakly
    assert not is_constant(5e-45, 0.0, [0.0] * K, 1)  # mean above the max: not all zeros
    # a constant c: the peaks are c exactly, the mean rounded (float32 sums of the map)
    c = 0.1
    assert is_constant(c * (1 + 100 * 2.0**-24), c, [c] * K, 12544)
    assert not is_constant(c * (1 - 1e-3), c, [c] * K, 12544)  # lower somewhere
    assert not is_constant(c, c, [c] * (K - 1) + [c * 0.99], 64)  # peaks differ
    assert not is_constant(math.nan, c, [c] * K, 64)
    assert not is_constant(c, math.inf, [math.inf] * K, 64)
    assert not is_constant(c, c, [c, None], 64)  # a NaN peak (null in JSON)
    assert constant_tolerance(1) < 1e-5 and constant_tolerance(12544) < 3e-4


@pytest.mark.parametrize("value", [0.1, -0.37, 1234.567, 3.3e-5, 2.0 / 3])
@pytest.mark.parametrize("side", [1, 8, 112])
def test_the_probes_own_rounding_is_within_the_tolerance(value: float, side: int) -> None:
    """A constant unit probed as the probe does it (its statistics, CPU kernels): the mean
    it stores differs from the max in the last bits, more on larger maps (up to 140 units
    of roundoff at 112x112), and the criterion takes it; exact equality would not."""
    from lurker.probe.stats import UnitStats
    from lurker.server.state import is_constant

    st = UnitStats(1, k=K, num_classes=3, device="cpu")
    n = 0
    for b in (64, 64, 37):
        shape = (b, 1) if side == 1 else (b, 1, side, side)
        st.update(torch.full(shape, value), torch.arange(n, n + b), torch.arange(n, n + b) % 3)
        n += b
    r = st.result()
    mean, mx = float(r["unit_mean"][0]), float(r["unit_max"][0])
    assert mx == np.float32(value)
    assert is_constant(mean, mx, r["max_values"][0].tolist(), side * side)
    means = r["mean_values"][0].tolist()
    assert is_constant(mean, mx, r["max_values"][0].tolist(), side * side, means)


@pytest.mark.parametrize("dips", ["every sample, one position", "half the samples, two"])
def test_a_unit_at_its_ceiling_but_for_a_few_positions_is_not_constant(dips: str) -> None:
    """A ReLU6 at 6 on 112x112 maps but for a few positions: every peak is 6 and the
    dataset mean is within the mean's rounding tolerance of it, yet its mean list ranks the
    samples by their dips; the mean list tells it from a constant unit."""
    from lurker.probe.stats import UnitStats
    from lurker.server.state import is_constant

    g = torch.Generator().manual_seed(0)
    st = UnitStats(1, k=K, num_classes=3, device="cpu")
    n = 0
    for b in (64, 64, 37):
        x = torch.full((b, 1, 112, 112), 6.0)
        for i in range(b):
            if dips.startswith("every"):
                x[i, 0, 50, 60] = torch.rand((), generator=g) * 6
            elif (n + i) % 2:
                x[i, 0, :2, 0] = 0.0
        st.update(x, torch.arange(n, n + b), torch.arange(n, n + b) % 3)
        n += b
    r = st.result()
    mean, mx = float(r["unit_mean"][0]), float(r["unit_max"][0])
    peaks, means = r["max_values"][0].tolist(), r["mean_values"][0].tolist()
    assert mx == 6.0 and set(peaks) == {6.0}
    assert is_constant(mean, mx, peaks, 112 * 112)  # the peaks and the mean alone: fooled
    assert not is_constant(mean, mx, peaks, 112 * 112, means)


# -- a synthetic run: exactly known constant and near-constant units --------------------


def synthetic_model() -> nn.Module:
    """A 1x1 conv over two input channels (0: noise, 1: zero but for one pixel of one
    sample), a ReLU, a global pool and a Linear + ReLU, each unit set by hand."""
    model = nn.Sequential(
        nn.Conv2d(2, 6, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
        nn.ReLU(),
    )  # fmt: skip
    conv, lin = model[0], model[4]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([-1.0, 0.1, 0.5, 0.5, 0.0, -0.37]))
        conv.weight[2, 1] = 1.0  # 0.5, but -0.5 at the one pixel: lower once
        conv.weight[3, 1] = -1.0  # 0.5, but 1.5 at the one pixel: higher once
        conv.weight[4, 0] = 1.0  # the noise: alive
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor([-1.0, 0.0, 2.0]))
        lin.weight[1, 4] = 1.0  # alive
    return model.eval()


#: per layer (conv, its ReLU, the Linear, its ReLU): the constant units and their value
SYNTHETIC = {
    "0": {0: -1.0, 1: 0.1, 5: -0.37},
    "1": {0: 0.0, 1: 0.1, 5: 0.0},
    "4": {0: -1.0, 2: 2.0},
    "5": {0: 0.0, 2: 2.0},
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lurker.probe import probe

    g = torch.Generator().manual_seed(0)
    x = torch.zeros(40, 2, 16, 16)
    x[:, 0] = torch.randn(40, 16, 16, generator=g)
    x[7, 1, 3, 4] = -1.0
    data = torch.utils.data.TensorDataset(x, torch.arange(40) % 4)
    out = tmp_path_factory.mktemp("synthetic") / "syn"
    probe(synthetic_model(), data, out=out, k=K, progress=False).close()
    return out


def test_constant_units_of_the_api(synthetic: Path) -> None:
    from fastapi.testclient import TestClient

    from lurker.server import create_app
    from lurker.store import Run

    c = TestClient(create_app(synthetic))
    with Run.open(synthetic) as run:
        assert [i.name for i in run.layers] == list(SYNTHETIC)
        for info in run.layers:
            want = SYNTHETIC[info.name]
            doc = c.get(f"/api/runs/syn/layers/{info.name}").json()
            got = {u["unit"] for u in doc["units"] if u["constant"]}
            assert got == set(want), info.name
            assert doc["constant_units"] == len(want)
            for u in range(info.num_units):
                unit = run.unit(info.name, u)
                if u in want:  # the value it holds, as float32
                    assert unit.max == float(np.float32(want[u]))
                else:  # alive or near-constant: the mean is below the max
                    assert unit.mean < unit.max
                detail = c.get(f"/api/runs/syn/layers/{info.name}/units/{u}").json()
                assert detail["constant"] is (u in want), (info.name, u)
        # the near-constant units are caught by neither test: one value lower in one
        # sample leaves the peaks tied (the mean says it), one higher breaks the ties
        lower, higher = run.unit("1", 2), run.unit("1", 3)
        assert {e.value for e in lower.top("max")} == {0.5} and lower.mean < 0.5
        assert [e.sample_id for e in higher.top("max")][:1] == [7]

        # the sample documents leave constant units' lists out (ties: the first K sample
        # ids) and count them per layer, and so the zeros ending a live unit's full list
        # (which more samples may share), and a full list all of one value (the
        # near-constant unit's peaks of 0.5: more samples may reach it, the list holds the
        # first by id, as the unit page says); the rest are there
        def ranked(entries: list[Any]) -> list[int]:
            values = [e.value for e in entries]
            tail = next((i for i in range(len(values)) if values[i] == values[-1]), 0)
            full = len(values) == run.meta["k"] < run.num_samples
            cut = len(values) - tail >= 2 and full and (values[-1] == 0 or tail == 0)
            return [e.sample_id for e in entries[: tail if cut else None]]

        for sid in range(K + 1):
            doc = c.get(f"/api/runs/syn/samples/{sid}").json()
            held = {(a["layer"], a["unit"], a["list"]) for a in doc["appearances"]}
            left: dict[str, int] = {}
            want = set()
            for info in run.layers:
                for u in run.units(info.name):
                    for which in run.top_lists:
                        ids = [e.sample_id for e in u.top(which)]
                        if u.index not in SYNTHETIC[info.name] and sid in ranked(u.top(which)):
                            want.add((info.name, u.index, which))
                        elif sid in ids:
                            left[info.name] = left.get(info.name, 0) + 1
            assert held == want and doc["total"] == len(want), sid
            assert doc["left_out"] == sum(left.values())
            assert doc["left_out_layers"] == [{"layer": n, "count": m} for n, m in left.items()]
            if sid < K:  # in every constant unit's max and mean lists
                assert all(left[name] >= 2 * len(units) for name, units in SYNTHETIC.items())
            else:
                assert doc["left_out"] == 0 and doc["left_out_layers"] == []


# -- a digits run in the browser ----------------------------------------------------------


class Digits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, 4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits_model() -> nn.Module:
    torch.manual_seed(3)
    model = Digits()
    conv, lin = model.features[0], model.head[1]
    with torch.no_grad():
        conv.weight[:2] = 0.0
        conv.bias[:2] = torch.tensor([-1.0, 0.25])  # unit 0: ReLU never fires; 1: 0.25
        lin.weight[0] = 0.0
        lin.weight[3] = 0.0
        lin.bias.copy_(torch.tensor([-0.5, 1.0, 1.0, 0.75]))  # 0: never fires; 3: 0.75
    return model.eval()


DIGITS = {
    "features.0": {0: -1.0, 1: 0.25},
    "features.1": {0: 0.0, 1: 0.25},
    "head.1": {0: -0.5, 3: 0.75},
    "head.2": {0: 0.0, 3: 0.75},
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from lurker.probe import probe
    from lurker.probe.data import load_dataset
    from lurker.server import create_app
    from lurker.server.serve import background
    from lurker.store import Run

    model = digits_model()
    out = tmp_path_factory.mktemp("digits") / "dig"
    data = load_dataset("digits:test", 16, channels=1)
    probe(model, data, out=out, k=K, progress=False, meta={"data": "digits:test"}).close()
    with Run.open(out) as run:
        assert [i.name for i in run.layers] == list(DIGITS)
        for info in run.layers:  # the seed leaves no other unit constant
            for unit in run.units(info.name):
                assert (unit.index in DIGITS[info.name]) is (unit.mean == unit.max), unit
        with background(create_app(out, model_obj=model)) as url:
            yield {"url": url, "run": run, "path": out}


def _page(browser: Any) -> tuple[Any, Any, list[str]]:
    if not (STATIC / "index.html").exists():
        pytest.skip(f"the explorer's front end is not built ({STATIC}/index.html): run `make web`")
    return watch(browser)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A page that fails the test on any console error or failed request."""
    ctx, pg, errors = _page(browser)
    yield pg
    ctx.close()
    assert not errors, f"console errors: {errors}"


def go(page: Any, url: str, selector: str) -> None:
    page.goto(url)
    page.wait_for_selector(selector, timeout=30000)
    page.wait_for_load_state("networkidle")


def test_unit_page_says_a_unit_never_fires(page: Any, digits: dict[str, Any]) -> None:
    base = digits["url"] + "#/r/dig"
    go(page, f"{base}/unit/features.1/0?tab=max", "#constant-unit")
    said = page.inner_text("#constant-unit")
    assert "constant on the dataset: 0 on every sample at every position" in said
    assert "(a ReLU that never fires)" in said and "Its top lists are ties" in said
    # no top images, for either list, and no class chart
    assert page.locator(".top-entry").count() == 0
    assert f"{K} tied samples, ranked by sample id alone" in page.inner_text(".topk")
    page.click('button[data-tab="mean"]')
    page.wait_for_function("() => document.querySelector('.topk').innerText.includes('mean is 0')")
    assert page.locator(".top-entry").count() == 0
    assert page.locator("svg.bars-h").count() == 0
    assert "Every class's mean is 0" in page.inner_text("main")

    # a Linear's dead unit: one value per sample, no positions
    go(page, f"{base}/unit/head.2/0", "#constant-unit")
    said = page.inner_text("#constant-unit")
    assert "0 on every sample (a ReLU that never fires)" in said and "position" not in said

    # a constant other than 0: said with its value, not as a ReLU that never fires
    go(page, f"{base}/unit/features.0/1", "#constant-unit")
    said = page.inner_text("#constant-unit")
    assert "0.25 on every sample at every position" in said and "ReLU" not in said
    assert page.locator(".top-entry").count() == 0

    # a live unit keeps its images and chart, and says nothing of the kind
    go(page, f"{base}/unit/features.1/2?tab=max", ".top-entry img")
    assert page.locator("#constant-unit").count() == 0
    assert page.locator(".top-entry").count() == K
    assert page.locator("svg.bars-h").count() == 1
    assert page.locator("#tied-list").count() == 0


def test_a_list_of_ties_of_a_live_unit_is_said_to_be_one(page: Any, digits: dict[str, Any]):
    """A unit that is not constant but whose list is all one value (a relevance of 0 for
    a unit feeding a dead one; a peak every sample reaches): its images stay, with a note
    that they are ties in sample-id order. (The unit's document is rewritten to such a
    list in flight: the page's reading of it is what is tested.)"""

    def tie(route: Any) -> None:
        doc = route.fetch().json()
        for e in doc["top"]["max"]:
            e["value"] = 0.5
        doc["tied_tail"]["max"] = K  # as the server counts a full list of one value
        route.fulfill(json=doc)

    page.route("**/api/runs/dig/layers/features.1/units/2", tie)
    go(page, f"{digits['url']}#/r/dig/unit/features.1/2?tab=max", "#tied-list")
    said = page.inner_text("#tied-list")
    assert f"All {K} samples of this list have the value 0.5: they are ties" in said
    assert page.locator(".top-entry").count() == K  # the images stay
    page.click('button[data-tab="mean"]')  # the mean list is not tied
    page.wait_for_function("() => !document.querySelector('#tied-list')")


def test_layer_grid_shows_silent_units(page: Any, digits: dict[str, Any]) -> None:
    run = digits["run"]
    base = digits["url"] + "#/r/dig"
    for name, want in DIGITS.items():
        go(page, f"{base}/layer/{name}", ".unit-card")
        cards = page.locator(".unit-card")
        assert cards.count() == run.layer(name).num_units
        marked = {
            int(c.get_attribute("data-unit"))
            for c in page.locator(".unit-card[data-constant]").all()
        }
        assert marked == set(want), name
        for u, value in want.items():
            card = page.locator(f'.unit-card[data-unit="{u}"]')
            assert card.locator("img, canvas").count() == 0  # no top image
            tile = card.locator(".no-img.silent").inner_text()
            assert ("silent" if value == 0 else "constant") in tile
        live = page.locator(".unit-card:not([data-constant]) img")
        assert live.count() == run.layer(name).num_units - len(want)
        assert page.inner_text("#constant-count").startswith(f"{len(want)} of ")
        assert f"{len(want)} of the {run.layer(name).num_units} units" in page.inner_text("main")
        # sorting still works, constant units included
        for key in ("mean", "max", "index"):
            page.click(f'.seg[aria-label="sort units"] button:text-is("{key}")')
            order = [int(c.get_attribute("data-unit")) for c in cards.all()]
            units = run.units(name)
            if key == "index":
                assert order == sorted(order)
            else:
                values = [getattr(next(x for x in units if x.index == u), key) for u in order]
                assert values == sorted(values, reverse=True), key


def _check_sample_page(page: Any, run: Any, sid: int) -> None:
    left = {name: 2 * len(units) for name, units in DIGITS.items()}
    want = [
        (info.name, u.index, which)
        for info in run.layers
        for u in run.units(info.name)
        for which in run.top_lists
        if u.index not in DIGITS[info.name] and any(e.sample_id == sid for e in u.top(which))
    ]
    chips = page.locator(".chip")
    page.wait_for_function(f"() => document.querySelectorAll('.chip').length === {len(want)}")
    got = []
    for chip in chips.all():
        layer = chip.locator("xpath=ancestor::section[1]").get_attribute("data-layer")
        got.append((layer, int(chip.get_attribute("data-unit")), chip.get_attribute("data-list")))
    assert sorted(got) == sorted(want)
    said = page.inner_text("#left-out")
    assert said.startswith(
        f"Left out: {sum(left.values())} entries that are ties, ranked by sample id alone"
    )
    counts = {
        a.get_attribute("data-layer"): int(a.get_attribute("data-count"))
        for a in page.locator("#left-out a").all()
    }
    assert counts == left
    assert all(f"layer {name} ({n})" in said for name, n in left.items())  # not "L n"
    layers = {w[0] for w in want}
    assert page.inner_text("#top-k-of") == (
        f"{len(want)} unit list{'s' if len(want) != 1 else ''} in {len(layers)} layer"
        f"{'s' if len(layers) != 1 else ''} (and {sum(left.values())} tied, left out)"
    )
    heads = {
        s.get_attribute("data-layer"): s.locator("h3").inner_text()
        for s in page.locator("section.appear").all()
    }
    assert {name: int(text.split(" ")[3]) for name, text in heads.items()} == {
        name: sum(1 for w in want if w[0] == name) for name in layers
    }


def test_sample_page_leaves_constant_units_out(page: Any, digits: dict[str, Any]) -> None:
    go(page, f"{digits['url']}#/r/dig/sample/0", "#left-out")
    _check_sample_page(page, digits["run"], 0)
    # a sample no constant unit lists: nothing left out
    go(page, f"{digits['url']}#/r/dig/sample/{K}", "h2")
    assert page.locator("#left-out").count() == 0
    assert "(and" not in page.inner_text("#top-k-of")


def test_sample_page_leaves_constant_units_out_when_paged(
    page: Any, digits: dict[str, Any]
) -> None:
    """Pages of 3 entries (the request rewritten): "show more" skips the left-out
    entries and stops once every other entry is shown."""
    sid = 0
    page.route(
        f"**/api/runs/dig/samples/{sid}",
        lambda route: route.continue_(url=route.request.url + "?offset=0&limit=3"),
    )
    page.route(
        f"**/api/runs/dig/samples/{sid}?offset=*",
        lambda route: route.continue_(url=route.request.url.replace("limit=200", "limit=3")),
    )
    go(page, f"{digits['url']}#/r/dig/sample/{sid}", "#left-out")
    more = page.locator("#more-appearances")
    while more.is_visible():
        more.click()
        page.wait_for_function("() => !document.querySelector('#more-appearances').disabled")
    _check_sample_page(page, digits["run"], sid)


def test_static_export_leaves_them_out_too(
    browser: Any, digits: dict[str, Any], tmp_path: Path
) -> None:
    import json

    from lurker.server.export import export_site

    site = export_site(digits["path"], tmp_path / "site", progress=False)
    run = digits["run"]
    listed = json.loads((site / "data/runs/dig/exported-samples.json").read_text())["samples"]
    exported = {x["id"] for x in listed}
    kept = {  # the samples some list other than a constant unit's holds
        e.sample_id
        for info in run.layers
        for u in run.units(info.name)
        if u.index not in DIGITS[info.name]
        for which in run.top_lists
        for e in u.top(which)
    }
    # a sample only constant units list (ties) has nothing to show: not exported
    assert exported == kept and not set(range(K)) <= kept
    sid = min(set(range(K)) & kept)  # one with both: its page leaves the ties out
    ctx, page, errors = _page(browser)
    # the page closes before the server stops: a request it still had in flight (a lazy
    # image) met a closed server and logged ERR_CONNECTION_RESET on a loaded machine
    with static_server(site) as url:
        try:
            go(page, f"{url}#/r/dig/sample/{sid}", "#left-out")
            _check_sample_page(page, run, sid)
            go(page, f"{url}#/r/dig/unit/features.1/0", "#constant-unit")
            assert page.locator(".top-entry").count() == 0
            go(page, f"{url}#/r/dig/layer/head.2", ".unit-card")
            assert page.locator(".unit-card[data-constant]").count() == 2
        finally:
            ctx.close()
    assert not errors, errors
