"""A 1-D model's run in the explorer: signals ``(C, T)`` drawn as lines, not images.

A ``Conv1d`` stack probed from Python on ``(signal, label)`` pairs of 3 channels x 96
samples. Before, such a sample was shown as a 96 x 3 pixel image, a unit's entries had no
receptive-field box (``box`` null: the run's image size has one axis), and nothing said
which samples a peak sees. Now the run summary calls the inputs signals, the API gives
each entry its sample's values (checked against the dataset tensor) and the span of
samples its peak sees (checked against a hand computation of the stack's receptive
field), the peaks are the model's own (brute force by forward hooks), and the pages draw
each signal as lines with that span shaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from explorer_fixtures import (
    assert_signal_max_list,
    get_json,
    served_run,
    skip_without_browser,
    strict_page,
)
from models_zoo import ConvLSTM

RID, C, T, K = "eeg", 3, 96, 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(C, 4, 5, padding=2),  # "0": sees input [x-2, x+3)
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(4, 5, 3, stride=2, padding=1),  # "3": sees [4x-4, 4x+6)
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(5, 2),
    ).eval()


def _span(layer: str, x: int) -> list[int]:
    """By hand: a Conv1d(k=5, p=2); a MaxPool1d(2); a Conv1d(k=3, s=2, p=1) over it: its
    position x reads pool positions 2x-1..2x+1, each two conv positions, each 5 samples."""
    lo, hi = (x - 2, x + 3) if layer == "0" else (4 * x - 4, 4 * x + 6)
    return [max(0, lo), min(T, hi)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(40, C, T, generator=g), torch.arange(40) % 2)
    with served_run(tmp_path_factory.mktemp("sig"), RID, _model(), data, "3", K) as served:
        yield served


def _maps(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each probed conv's output on ``x``, by forward hooks (the oracle)."""
    out: dict[str, torch.Tensor] = {}
    hooks = [
        model[i].register_forward_hook(lambda m, a, o, n=str(i): out.__setitem__(n, o.detach()))
        for i in (0, 3)
    ]
    with torch.no_grad():
        model(x)
    for hk in hooks:
        hk.remove()
    return out


def test_the_run_is_a_signal_not_an_image_or_a_feature_vector(served: dict):
    ds = get_json(f"{served['url']}/api/runs/{RID}")["dataset"]
    assert ds["signal"] == [C, T]
    assert ds["features"] is None and ds["tokens"] is None


@pytest.mark.parametrize("layer", ["0", "3"])
def test_peaks_spans_and_values_match_hooks_hand_rf_and_the_dataset(served: dict, layer: str):
    url, data, model = served["url"], served["data"], served["model"]
    xs = data.tensors[0]
    maps = _maps(model, xs)[layer]
    for unit in range(maps.shape[1]):
        doc = get_json(f"{url}/api/runs/{RID}/layers/{layer}/units/{unit}")
        assert doc["signal_shape"] == [C, T] and doc["signal_error"] is None
        for e in assert_signal_max_list(doc, maps[:, unit], K, lambda _, x: _span(layer, x)):
            sid = e["sample_id"]  # the values: the sample's one signal document
            assert _values(url, sid) == pytest.approx(xs[sid].double(), rel=1e-6, abs=1e-30)
        for e in doc["top"]["mean"]:  # its peak on that sample, and the span it sees
            assert e["span"] == _span(layer, int(maps[e["sample_id"], unit].argmax()))


def _values(url: str, sid: int, rid: str = RID) -> torch.Tensor:
    """Sample ``sid``'s signal document's values, as a float64 tensor (NaN for null)."""
    doc = get_json(f"{url}/api/runs/{rid}/samples/{sid}/signal.json")
    assert doc["id"] == sid and doc["starts"] is None
    return torch.tensor([[float("nan") if v is None else v for v in r] for r in doc["values"]])


def test_the_sample_document_names_no_values_its_signal_document_does(served: dict):
    url, data = served["url"], served["data"]
    doc = get_json(f"{url}/api/runs/{RID}/samples/7")
    assert "signal" not in doc and doc["signal_error"] is None
    sig = get_json(f"{url}/api/runs/{RID}/samples/7/signal.json")
    assert (sig["channels"], sig["length"]) == (C, T)
    assert _values(url, 7) == pytest.approx(data.tensors[0][7].double(), rel=1e-6, abs=1e-30)
    bare = get_json(f"{served['bare']}/api/runs/{RID}/samples/7")  # no dataset: says why
    assert "dataset" in bare["signal_error"]
    import httpx2 as httpx

    r = httpx.get(f"{served['bare']}/api/runs/{RID}/samples/7/signal.json")
    assert r.status_code == 404 and "dataset" in r.json()["detail"]


def test_a_signal_documents_columns_are_numpys_array_split_min_max(served: dict):
    url, xs = served["url"], served["data"].tensors[0]
    for n in (1, 7, 40, 96, 500):  # fewer columns than samples, as many, more
        doc = get_json(f"{url}/api/runs/{RID}/samples/3/signal.json?columns={n}")
        assert doc["values"] is None and (doc["channels"], doc["length"]) == (C, T)
        parts = [np.array_split(row, min(n, T)) for row in xs[3].double().numpy()]
        assert doc["starts"] == [int(i) for i in np.cumsum([0] + [len(p) for p in parts[0]])[:-1]]
        assert doc["lo"] == [pytest.approx([p.min() for p in ps], rel=1e-6) for ps in parts]
        assert doc["hi"] == [pytest.approx([p.max() for p in ps], rel=1e-6) for ps in parts]


def test_a_signal_document_is_kept_for_good_under_the_runs_token(served: dict):
    import httpx2 as httpx

    url = served["url"]
    token = get_json(f"{url}/api/runs/{RID}")["images_version"]
    assert token
    kept = httpx.get(f"{url}/api/runs/{RID}/samples/2/signal.json?columns=9&v={token}")
    assert "immutable" in kept.headers["cache-control"]
    for asked in ("", "?v=an-earlier-run"):  # no token or another run's: asked again
        r = httpx.get(f"{url}/api/runs/{RID}/samples/2/signal.json{asked}")
        assert r.headers["cache-control"] == "no-cache"


def test_a_layer_without_positions_has_no_span(served: dict):
    doc = get_json(f"{served['url']}/api/runs/{RID}/layers/7/units/0")
    assert all(e["span"] is None and "signal" not in e for e in doc["top"]["max"])


def test_pages_draw_the_signals_with_the_peaks_span(browser: Any, served: dict):
    skip_without_browser()
    url = served["url"]
    doc = get_json(f"{url}/api/runs/{RID}/layers/3/units/1")
    with strict_page(browser) as pg:
        asked: list[str] = []
        pg.on("request", lambda r: asked.append(r.url) if "/signal.json" in r.url else None)
        pg.goto(f"{url}/#/r/{RID}/unit/3/1?tab=max")
        pg.wait_for_function(
            f"document.querySelectorAll('.signal-entry svg.signal-plot').length === {K}"
        )
        entries = pg.locator(".signal-entry")
        assert entries.count() == K
        # one request per distinct sample: each entry drawn from its sample's document
        ranked = {e["sample_id"] for e in doc["top"]["max"]}
        sids = lambda: sorted(int(u.split("/samples/")[1].split("/")[0]) for u in asked)  # noqa: E731
        assert sids() == sorted(ranked)
        # the mean list shares samples with the max list: those are not asked for again
        pg.goto(f"{url}/#/r/{RID}/unit/3/1?tab=mean")
        means = {e["sample_id"] for e in doc["top"]["mean"]}
        pg.wait_for_function(
            "n => document.querySelectorAll('.signal-entry svg.signal-plot').length === n",
            arg=len(doc["top"]["mean"]),
        )
        assert means & ranked and sids() == sorted(ranked | means)
        pg.goto(f"{url}/#/r/{RID}/unit/3/1?tab=max")
        pg.wait_for_function(
            f"document.querySelectorAll('.signal-entry svg.signal-plot').length === {K}"
        )
        for i, e in enumerate(doc["top"]["max"]):
            entry = entries.nth(i)
            assert int(entry.get_attribute("data-sample") or -1) == e["sample_id"]
            assert entry.locator("path.signal-line").count() == C
            assert entry.locator("rect.signal-span").get_attribute("data-span") == (
                f"{e['span'][0]} {e['span'][1]}"
            )
        assert pg.locator("img").count() == 0 and pg.locator(".feat-strip").count() == 0
        assert "signals of 3 channels" in pg.inner_text("#signal-inputs")
        pg.goto(f"{url}/#/r/{RID}/sample/7")
        pg.wait_for_selector("#sample-signal svg.signal-plot")
        assert pg.locator("#sample-signal path.signal-line").count() == C
        assert pg.locator("img").count() == 0
        assert pg.inner_text("#explain-this") == "Explain this sample"  # not "this image"


# ----------------------------------------------------------------- Explain on signals
METHODS_ON_SIGNALS = [
    "saliency",
    "input_x_gradient",
    "guided_backprop",
    "deconvnet",
    "integrated_gradients",
    "smoothgrad",
    "gradcam",
    "gradcam_plus_plus",
    "occlusion",
    "lrp",
]


def test_explain_methods_on_a_signal_run_are_all_and_concepts(served: dict):
    info = get_json(f"{served['url']}/api/runs/{RID}/explain/methods")
    assert [m["name"] for m in info["methods"]] == METHODS_ON_SIGNALS
    assert (
        info["concepts"] is True and info["concept_layer"] == "4"
    )  # the last probed map (its ReLU)


def test_concepts_of_a_signal_are_lurker_explain_concepts_along_time(served: dict):
    """The ranking's units, relevances and each unit's conditional heatmap (``(C, T)``
    per channel, ``signal_scores``) are ``lurker.explain.concepts``'s for the same sample;
    the heatmap sums are its sums (before: 409, concept relevance refused on signals)."""
    import lurker

    url, data, model = served["url"], served["data"], served["model"]
    x = data.tensors[0][7][None]
    doc = get_json(f"{url}/api/runs/{RID}/live/sample-7/explain/concepts?layer=3&top=3")
    c = lurker.explain.concepts(model, x, layer="3", top=3)
    assert doc["layer"] == "3" and doc["channels"] == 5
    assert doc["target_class"] == int(model(x).argmax())
    assert [u["unit"] for u in doc["units"]] == c.units[0].tolist()
    for i, u in enumerate(doc["units"]):
        assert u["relevance"] == pytest.approx(float(c.unit_relevance[0, i]), abs=1e-5)
        got = torch.tensor(u["signal_scores"], dtype=torch.float64)
        assert got.shape == (C, T)
        torch.testing.assert_close(got, c.heatmaps[0, i].double(), atol=1e-5, rtol=1e-4)
        assert u["heatmap_sum"] == pytest.approx(float(got.sum()), abs=1e-5)
    assert doc["total"] == pytest.approx(float(c.total[0]), abs=1e-5)


@pytest.mark.parametrize("method", METHODS_ON_SIGNALS)
def test_explain_api_scores_equal_lurker_explain(served: dict, method: str):
    """Each method's JSON holds the attribution along time, the numbers
    ``lurker.explain`` gives in Python for the same sample and its top class."""
    import lurker

    url, data, model = served["url"], served["data"], served["model"]
    x = data.tensors[0][5][None]
    doc = get_json(f"{url}/api/runs/{RID}/live/sample-5/explain/{method}?target=top")
    opts = {k: v for k, v in doc["options"].items() if k in ("seed", "window", "strides")}
    if method == "occlusion":
        opts = {k: tuple(v) for k, v in opts.items()}
    if doc["layer"]:
        opts["layer"] = doc["layer"]
    ex = lurker.explain(model, x, method=method, **opts)
    want = ex.signal(0)
    want = want[None] if want.dim() == 1 else want
    assert doc["target_class"] == int(model(x).argmax())
    assert doc["shape"] == list(want.shape) == ([1, T] if ex.repeated else [C, T])
    got = torch.tensor(doc["signal_scores"], dtype=torch.float64)
    torch.testing.assert_close(got, want.double(), atol=1e-5, rtol=1e-4)
    assert doc["sum"] == pytest.approx(float(want.double().sum()), abs=1e-4)
    assert doc["scores"] is None


def test_explain_and_concept_pngs_of_a_signal_say_why_not(served: dict):
    import httpx2 as httpx

    url = served["url"]
    r = httpx.get(f"{url}/api/runs/{RID}/live/sample-5/explain/saliency.png")
    assert r.status_code == 409 and "signal_scores" in r.json()["detail"]
    r = httpx.get(f"{url}/api/runs/{RID}/live/sample-5/explain/concepts/0.png")
    assert r.status_code == 409 and "signal_scores" in r.json()["detail"]
    r = httpx.get(f"{url}/api/runs/{RID}/live/upload-1/explain/concepts")
    assert r.status_code == 409 and "sample-N" in r.json()["detail"]
    r = httpx.get(f"{url}/api/runs/{RID}/live/upload-1/explain/saliency")
    assert r.status_code == 409 and "sample-N" in r.json()["detail"]


def test_explain_page_draws_each_method_along_time(browser: Any, served: dict, tmp_path: Any):
    """One plot per method, the sample's lines with a colour band under each channel (one
    band under all where the method gives a position one value), no image at all (before:
    ~21 broken heatmap images)."""
    skip_without_browser()
    url = served["url"]
    with strict_page(browser) as pg:
        pg.set_viewport_size({"width": 1280, "height": 800})
        pg.goto(f"{url}/#/r/{RID}/explain?image=sample-5")
        pg.wait_for_selector("#signal-explain-legend")
        cards = pg.locator(".signal-explain-card")
        assert cards.count() == len(METHODS_ON_SIGNALS)
        pg.wait_for_function(
            "n => document.querySelectorAll('.signal-explain-card svg.signal-plot').length === n",
            arg=len(METHODS_ON_SIGNALS),
            timeout=60_000,
        )
        assert pg.locator("img").count() == 0 and pg.locator(".error-text").count() == 0
        for m in METHODS_ON_SIGNALS:
            doc = get_json(f"{url}/api/runs/{RID}/live/sample-5/explain/{m}")
            card = pg.locator(f".signal-explain-card[data-method='{m}']")
            assert card.locator("svg.signal-plot").count() == 1
            assert card.locator("path.signal-line").count() == C
            bands = card.locator("g.signal-band")
            assert bands.count() == len(doc["signal_scores"])  # C, or 1 for Grad-CAM
        assert pg.locator("button.target").count() == 2  # the model's classes as targets
        # concept relevance: a card per top unit, the lines with its bands per channel
        ranking = get_json(f"{url}/api/runs/{RID}/live/sample-5/explain/concepts?top=8")
        pg.wait_for_function(
            "n => document.querySelectorAll('.concept[data-unit] svg.signal-plot').length === n",
            arg=len(ranking["units"]),
            timeout=60_000,
        )
        units = pg.locator(".concept[data-unit]")
        assert [int(u) for u in units.evaluate_all("es => es.map(e => e.dataset.unit)")] == [
            u["unit"] for u in ranking["units"]
        ]
        assert units.first.locator("g.signal-band").count() == C
        assert "with the most relevance" in pg.inner_text(".concept-section")
        assert pg.locator(".error-text").count() == 0
        pg.screenshot(path=str(tmp_path / "explain-1280.png"), full_page=True)
        pg.screenshot(path="/tmp/qf72_/explain-signal-concepts.png", full_page=True)
        pg.set_viewport_size({"width": 800, "height": 600})
        pg.screenshot(path=str(tmp_path / "explain-800.png"))


def _columns(row: torch.Tensor, n: int) -> tuple[list[float | None], list[float | None]]:
    """Numpy's array_split of ``row`` into ``n`` columns, each column's min and max (None
    where one is not finite): the oracle of a tile."""
    import numpy as np

    parts = np.array_split(row.double().numpy(), n)
    lo = [float(c.min()) if np.isfinite(c).all() else None for c in parts]
    hi = [float(c.max()) if np.isfinite(c).all() else None for c in parts]
    return lo, hi


def test_layer_tiles_carry_each_units_top_sample_and_its_peaks_span(served: dict):
    """The layer grid's tiles drew "no image": the layer document now gives each unit's
    top sample (by forward hooks) cut into columns of min..max of the dataset's values, and
    the span its peak sees (by hand)."""
    url, data, model = served["url"], served["data"], served["model"]
    xs = data.tensors[0]
    maps = _maps(model, xs)["3"]
    doc = get_json(f"{url}/api/runs/{RID}/layers/3")
    assert doc["signals_error"] is None
    for u in doc["units"]:
        peak, where = maps[:, u["unit"]].max(1)
        top = int(peak.argmax())
        assert u["top_max"] == top
        assert u["top_max_span"] == _span("3", int(where[top]))
        tile = doc["signals"][str(top)]
        assert tile["length"] == T and tile["channels"] == C and len(tile["starts"]) == 48
        for ch in range(C):
            lo, hi = _columns(xs[top, ch], 48)  # to float32's precision: 7 digits
            assert tile["lo"][ch] == pytest.approx(lo, rel=1e-6)
            assert tile["hi"][ch] == pytest.approx(hi, rel=1e-6)


def test_a_long_signals_tile_is_bounded_and_keeps_its_extremes_and_gaps():
    """A tile of 10 channels x 5,001 samples sends 8 channels x 48 columns, each column its
    exact min and max (no spike averaged away); a column holding a NaN is a gap."""
    from lurker.server.routes.layers import signal_tile

    x = torch.randn(10, 5001, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[2, 4000] = 50.0
    x[1, 17] = float("nan")
    values = [[v if v == v else None for v in row] for row in x.tolist()]
    tile = signal_tile(values)
    assert tile.length == 5001 and tile.channels == 10 and len(tile.lo) == 8
    for ch in range(8):
        lo, hi = _columns(x[ch], 48)  # to 7 digits; a gap (None) where the oracle's is
        np.testing.assert_allclose(np.array(tile.lo[ch], float), np.array(lo, float), 1e-6)
        np.testing.assert_allclose(np.array(tile.hi[ch], float), np.array(hi, float), 1e-6)
    assert max(v for v in tile.hi[2] if v is not None) == 50.0
    assert tile.lo[1][0] is None and tile.hi[1][0] is None


def test_the_samples_page_lists_each_samples_signal(served: dict):
    url, xs = served["url"], served["data"].tensors[0]
    page = get_json(f"{url}/api/runs/{RID}/samples?offset=5&limit=10")
    assert page["signal_error"] is None
    for s in page["samples"]:
        tile = s["signal"]
        assert tile["length"] == T and tile["channels"] == C
        for c in range(C):
            lo, hi = _columns(xs[s["id"], c], 48)
            assert tile["lo"][c] == pytest.approx(lo, rel=1e-6)
            assert tile["hi"][c] == pytest.approx(hi, rel=1e-6)
    bare = get_json(f"{served['bare']}/api/runs/{RID}/samples?limit=3")
    assert all(s["signal"] is None for s in bare["samples"])
    assert "dataset" in bare["signal_error"]


def test_live_lines_are_the_ops_values_over_time(served: dict):
    """The live view drew each unit of a Conv1d as a grayscale PNG one pixel high; the
    lines it draws now come from every channel at once, equal to forward hooks."""
    url, data, model = served["url"], served["data"], served["model"]
    x = data.tensors[0][3:4]
    out: dict[str, torch.Tensor] = {}
    hooks = [
        model[i].register_forward_hook(lambda m, a, o, n=i: out.__setitem__(n, o.detach()))
        for i in (2, 3)
    ]
    with torch.no_grad():
        model(x)
    for hk in hooks:
        hk.remove()
    base = f"{url}/api/runs/{RID}/live/sample-3/ops/conv1d_2"
    got = get_json(f"{base}/output")
    assert got["shape"] == [5, 24]
    assert torch.tensor(got["values"]) == pytest.approx(out[3][0].double(), abs=1e-5)
    inp = get_json(f"{base}/input.json")  # the max-pool's output feeds it
    assert torch.tensor(inp["values"]) == pytest.approx(out[2][0].double(), abs=1e-5)


def test_layer_samples_home_and_live_pages_draw_signals(browser: Any, served: dict):
    skip_without_browser()
    url = served["url"]
    doc = get_json(f"{url}/api/runs/{RID}/layers/3")
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/{RID}/layer/3")
        pg.wait_for_selector(".unit-card .signal-tile svg")
        assert pg.inner_text("#rf-text") == "10 samples, stride 4"
        for u in doc["units"]:
            tile = pg.locator(f'.unit-card[data-unit="{u["unit"]}"] .signal-tile')
            assert int(tile.get_attribute("data-sample") or -1) == u["top_max"]
            assert tile.locator("path.signal-line").count() == C
            assert tile.locator("rect.signal-span").get_attribute("data-span") == (
                f"{u['top_max_span'][0]} {u['top_max_span'][1]}"
            )
        assert pg.locator("img").count() == 0 and pg.locator(".no-img").count() == 0
        pg.goto(f"{url}/#/r/{RID}/samples")
        pg.wait_for_selector(".sample-card .signal-tile svg")
        assert pg.locator(".sample-card .signal-tile path.signal-line").count() == 40 * C
        assert pg.locator("img").count() == 0 and pg.locator(".no-img").count() == 0
        pg.goto(f"{url}/#/r/{RID}")
        pg.wait_for_selector("text=3 channels \u00d7 96 samples")
        assert "image size" not in pg.inner_text("main")
        pg.goto(f"{url}/#/r/{RID}/live?image=sample-3&op=conv1d_2")
        pg.wait_for_selector('.unit-line[data-side="output"] svg')
        assert pg.locator('.unit-line[data-side="output"] path.signal-line').count() == 5
        assert pg.locator('.unit-line[data-side="input"]').count() == 4
        assert pg.locator("#live-signal-input path.signal-line").count() == C
        assert pg.locator(".preds li").count() == 2
        assert pg.locator("img").count() == 0


@pytest.fixture(scope="module")
def served_lstm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(12, C, T, generator=g), torch.arange(12) % 2)
    torch.manual_seed(0)
    model = ConvLSTM(C).eval()
    with served_run(tmp_path_factory.mktemp("lstm"), "rnn", model, data, "conv", 3) as s:
        yield s


@pytest.mark.parametrize("layer", ["lstm", "lstm_1"])
def test_gradcam_at_an_lstm_is_a_400_naming_the_layers_that_qualify(served_lstm: dict, layer: str):
    """Before: 404 "module 'lstm' returns tuple, not a tensor" or a 400 about a hook's
    "3 output tensors"; concept relevance through the LSTM says why, too."""
    import httpx2 as httpx

    base = f"{served_lstm['url']}/api/runs/rnn/live/sample-1/explain"
    for method in ("gradcam", "gradcam_plus_plus"):
        r = httpx.get(f"{base}/{method}?layer={layer}")
        said = r.json()["detail"]
        assert r.status_code == 400 and f"'{layer}'" in said and "LSTM" in said
        assert "3 tensors" in said and "qualify: conv1d_1, relu_1" in said and "hook" not in said
    assert httpx.get(f"{base}/gradcam").status_code == 200  # the default layer: the conv's
    r = httpx.get(f"{base}/concepts?layer=conv")
    assert r.status_code == 400 and "lstm_1" in r.json()["detail"]
    assert "method='integrated_gradients'" in r.json()["detail"]
