"""Feature visualization of a model of 1-D signals ``(C, T)`` (an EEG's Conv1d stack):
a signal per unit, optimized in a 1/f Fourier parametrization along time with random
shifts, stored in the run, served and drawn as lines on the unit page.

Oracles: a unit whose kernel is a sinusoid (its best input along its receptive field is
that sinusoid), the dataset's best sample, and the stored run read back without torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import TensorDataset

import lurker
from explorer_fixtures import get_json, served_run, skip_without_browser, strict_page
from lurker.cli import main
from lurker.errors import LurkerError

RID, C, T, K = "eeg", 3, 64, 3
NAMES = ["Fz", "Cz", "Pz"]
#: unit 0's kernel: one period of a sinusoid over 9 samples, on channel 1 only
WAVE = torch.sin(2 * math.pi * torch.arange(9, dtype=torch.float32) / 9 + 0.3)


class Eeg(TensorDataset):
    channel_names = NAMES


def _model() -> nn.Module:
    """Conv1d (3 -> 4, kernel 9) -> ReLU -> mean over time -> Linear. Unit 0 of the conv
    reads channel 1 through the sinusoid WAVE; the others are random."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(C, 4, 9), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 2)
    ).eval()
    with torch.no_grad():
        model[0].weight[0].zero_()
        model[0].weight[0, 1] = WAVE
        model[0].bias[0] = 0.0
    return model


def _data() -> Eeg:
    g = torch.Generator().manual_seed(3)
    return Eeg(torch.randn(24, C, T, generator=g), torch.arange(24) % 2)


def test_a_sinusoid_kernel_gets_the_sinusoid_where_its_unit_peaks():
    """The ReLU after the conv, unit 0 (mean over time): its best input is WAVE along
    every receptive field, so the optimized signal must correlate with WAVE on channel 1
    at the unit's peak, and excite it far more than its random start."""
    model = _model()
    fv = lurker.featviz(model, "1", units=[0, 1], size=T, steps=128, seed=0)
    assert tuple(fv.images.shape) == (2, C, 1, T)
    sig = fv.signals
    assert sig is not None and tuple(sig.shape) == (2, C, T)
    assert float(sig.abs().max()) <= 3.0 + 1e-6  # within the default amplitude
    assert fv._repr_png_() is None and "signals (2, 3, 64)" in repr(fv)  # a notebook's view
    assert fv.peaks is not None and tuple(fv.peaks.shape) == (2,)
    p = int(fv.peaks[0])
    window = sig[0, 1, p : p + 9].numpy()
    assert np.corrcoef(window, WAVE.numpy())[0, 1] > 0.9
    # the value reached, recomputed on the signal by hand (the model's own forward)
    with torch.no_grad():
        by_hand = torch.relu(model[0](sig))[:, :].mean(-1)
    assert float(fv.activations[0]) == pytest.approx(float(by_hand[0, 0]), rel=1e-4)
    assert (fv.activations > fv.start + 1.0).all()
    # the peak is where the unit's map on the signal is highest
    with torch.no_grad():
        assert p == int(torch.relu(model[0](sig[:1]))[0, 0].argmax())


def test_same_seed_same_signal_and_a_unit_alone_as_in_its_layer():
    model = _model()
    a = lurker.featviz(model, "0", size=T, steps=8, seed=4)
    b = lurker.featviz(model, "0", size=T, steps=8, seed=4)
    c = lurker.featviz(model, "0", size=T, steps=8, seed=5)
    alone = lurker.featviz(model, "0", units=[2], size=T, steps=8, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.activations, b.activations)
    assert not torch.allclose(a.images, c.images)
    assert torch.allclose(alone.images[0], a.images[2], atol=1e-5)


def test_image_only_options_are_refused_naming_the_signals():
    model = _model()
    said = r"signals \(3 channels x 128 samples\), not images"
    with pytest.raises(LurkerError, match=said + r".*mean=/std="):
        lurker.featviz(model, "0", steps=1, mean=[0.0] * C, std=[1.0] * C)
    with pytest.raises(LurkerError, match=said + r".*position= is \(t,\)"):
        lurker.featviz(model, "0", steps=1, objective="neuron", position=(0, 3))
    with pytest.raises(LurkerError, match=said + r".*length in samples"):
        lurker.featviz(model, "0", steps=1, size=(1, 64))
    with pytest.raises(LurkerError, match="amplitude must be a positive number"):
        lurker.featviz(model, "0", steps=1, amplitude=0)
    image_model = nn.Sequential(nn.Conv2d(1, 2, 3)).eval()
    with pytest.raises(LurkerError, match=r"amplitude= bounds a signal"):
        lurker.featviz(image_model, "0", steps=1, size=8, amplitude=2.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    model, data = _model(), _data()
    with served_run(tmp_path_factory.mktemp("fvsig"), RID, model, data, "1", K) as s:
        # each channel within the dataset's range (the run's default)
        fv = lurker.featviz(model, "1", run=s["run"], steps=96, seed=0)
        fv.save(s["run"])
        s["fv"] = fv
        yield s


def test_the_signal_beats_the_dataset_best_and_is_stored_and_served_as_made(served: dict):
    run = lurker.Run.open(served["run"])
    fv = served["fv"]
    assert fv.settings["input"] == "signal" and fv.settings["size"] == [1, T]
    stored = run.featviz("1")
    assert stored.units == [0, 1, 2, 3]
    values = stored.signals()  # (units, copies, C, T), read without torch
    assert values.shape == (4, 1, C, T)
    # each channel within the dataset's range, which the probe recorded
    lo, hi = (np.asarray(b, dtype=np.float32)[:, None] for b in fv.settings["bounds"])
    rec = run.meta["channel_range"]
    assert np.allclose(lo[:, 0], rec["min"]) and np.allclose(hi[:, 0], rec["max"])
    assert (fv.signals.numpy() >= lo - 1e-5).all() and (fv.signals.numpy() <= hi + 1e-5).all()
    # 8-bit precision: steps of (max - min) / 255 per channel
    assert (np.abs(values[:, 0] - fv.signals.numpy()) <= (hi - lo) / 510 + 1e-5).all()
    for u in (0, 1, 2, 3):  # every unit, none left dead at its start
        best = run.unit("1", u).to_dict()["top"]["mean"][0]["value"]
        assert float(fv.activations[u]) > best, (u, float(fv.activations[u]), best)
    url = served["url"]
    doc = get_json(f"{url}/api/runs/{RID}/layers/1/units/0")["featviz"]
    assert doc["signals"][0] == values[0, 0].tolist()  # exactly what is stored
    assert doc["settings"]["peaks"] == [int(fv.peaks[0])]
    p = int(fv.peaks[0])
    assert doc["spans"] == [[p, p + 9]]  # kernel 9, no padding: samples p..p+8
    bare = get_json(f"{served['bare']}/api/runs/{RID}/layers/1/units/0")["featviz"]
    assert bare["signals"] == doc["signals"]  # the run alone serves it (no model there)


def test_a_rerun_from_the_command_line_resumes_the_stored_signals(served: dict, tmp_path: Path):
    """`lurker featviz RUN` on a signal run stores signals; the peaks stored beside the
    settings do not make a rerun redo them."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(served["run"], run)
    torch.save(served["model"].state_dict(), tmp_path / "w.pt")
    (tmp_path / "m.py").write_text(
        "import math, torch\nfrom torch import nn\n"
        "def build():\n"
        f"    return nn.Sequential(nn.Conv1d({C}, 4, 9), nn.ReLU(), nn.AdaptiveAvgPool1d(1),\n"
        "        nn.Flatten(), nn.Linear(4, 2))\n"
    )
    spec = ["-m", f"{tmp_path / 'm.py'}:build", "-w", str(tmp_path / "w.pt")]
    args = ["featviz", str(run), "--layer", "1", "-u", "0,1", "--steps", "4", *spec]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    first = lurker.Run.open(run).featviz("1").png(0)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "already made with these settings" in r.output, r.output
    assert lurker.Run.open(run).featviz("1").png(0) == first
    r = CliRunner().invoke(main, [*args, "--normalize", "none"])
    assert r.exit_code == 2 and "--normalize is for a model spec" in r.output


def test_the_unit_page_draws_the_optimized_signal_as_lines(
    browser: Any, served: dict, tmp_path: Path
):
    skip_without_browser()
    url = served["url"]
    p = int(served["fv"].peaks[0])
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/{RID}/unit/1/0?tab=featviz")
        fig = pg.locator("figure.featviz.signal-entry")
        fig.locator("svg.signal-plot").wait_for()
        svg = fig.locator("svg.signal-plot")
        assert svg.get_attribute("data-channels") == str(C)
        assert svg.get_attribute("data-samples") == str(T)
        assert fig.locator("path.signal-line").count() == C
        assert fig.locator("text.signal-lane-label").all_text_contents() == NAMES
        assert fig.get_attribute("data-span") == f"{p} {p + 9}"
        assert fig.locator("rect.signal-span").count() == 1
        pg.wait_for_selector("figure.best svg.signal-plot")  # the best sample beside it
        assert "signals optimized to excite the unit" in pg.locator(".featviz-caption").inner_text()
        pg.screenshot(path=str(tmp_path / "featviz-signal.png"), full_page=True)


def test_a_channels_last_signal_run_gets_the_signals_of_its_channels_first_twin(tmp_path: Path):
    """A run of ``(T, C)`` samples that the model transposes inside: the signal is fed
    channels last, so it is the one the same stack makes fed ``(C, T)`` directly."""
    from test_signal_layouts import ChannelsLast, Plain

    torch.manual_seed(0)
    model = ChannelsLast().eval()
    data = TensorDataset(torch.randn(12, 64, 3), torch.arange(12) % 2)
    lurker.probe(model, data, out=tmp_path / "run", k=3, progress=False)
    layer = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv1d))
    # (at the twin's bound: without a run it has no dataset ranges)
    fv = lurker.featviz(model, layer, [0, 1], steps=8, run=tmp_path / "run", amplitude=3.0)
    assert fv.settings["channels_last"] is True and tuple(fv.signals.shape) == (2, 3, 64)
    twin = Plain().eval()
    twin.load_state_dict(model.state_dict())
    ref = lurker.featviz(twin, layer, [0, 1], steps=8, size=64)
    assert torch.allclose(fv.images, ref.images, atol=1e-5)
    assert torch.allclose(fv.activations, ref.activations, atol=1e-4)


def test_a_layer_made_in_pieces_reads_each_unit_at_its_own_amplitude(tmp_path: Path):
    """Units written at amplitude 3, then others at 10: Run.featviz().signals() scales each
    by its own (the latest write's amplitude scaled them all, silently)."""
    model, data = _model(), _data()
    lurker.probe(model, data, out=tmp_path / "r", k=K, batch_size=8, progress=False).close()
    low = lurker.featviz(model, "1", units=[0], run=tmp_path / "r", steps=8, amplitude=3.0)
    low.save(tmp_path / "r")
    high = lurker.featviz(model, "1", units=[1], run=tmp_path / "r", steps=8, amplitude=10.0)
    high.save(tmp_path / "r")
    values = lurker.Run.open(tmp_path / "r").featviz("1").signals()
    assert np.abs(values[0, 0] - low.signals[0].numpy()).max() <= 3.0 / 255 + 1e-6
    assert np.abs(values[1, 0] - high.signals[0].numpy()).max() <= 10.0 / 255 + 1e-5


def test_transforms_on_and_off_are_told_apart_on_resume(tmp_path: Path):
    """A signal made without shifts is not "already made" for a run with them: the setting
    said "cropped" for both (a signal's shifts always crop back to T)."""
    model = _model()
    plain = lurker.featviz(model, "1", units=[0], size=T, steps=2, transforms=False)
    shifted = lurker.featviz(model, "1", units=[0], size=T, steps=2, transforms=True)
    assert plain.settings["transforms"] is False and shifted.settings["transforms"] is True


def test_a_conv1d_model_without_a_run_is_a_signal_model_whatever_channels_says():
    """channels= on a Conv1d stack without a run took the image path (a 4-D input, then
    advice to pass channels= and size=); a model it cannot feed says to pass its run."""
    fv = lurker.featviz(_model(), "1", units=[0], channels=C, size=32, steps=2)
    assert fv.signals is not None and tuple(fv.signals.shape) == (1, C, 32)

    class Waveform(nn.Module):  # takes (N, T) and gives it its one channel itself
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 2, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x.unsqueeze(1))

    with pytest.raises(LurkerError, match=r"does not run on a \(1, 32\) signal.*pass run="):
        lurker.featviz(Waveform().eval(), "conv", units=[0], size=32, steps=2)


def _split_min_max(row: np.ndarray, columns: int) -> tuple[list[float], list[float]]:
    parts = np.array_split(row, min(len(row), columns))
    return [float(p.min()) for p in parts], [float(p.max()) for p in parts]


def test_the_layer_document_gives_each_units_stored_signal_as_a_tile(served: dict):
    """The layer grid's featviz view drew each unit's stored PNG, a C x T grey strip: the
    layer document now carries every unit's stored signal as the grid's tiles draw them,
    each column numpy's array_split min..max of the stored values (read without torch)."""
    from lurker.server.routes.layers import TILE_COLUMNS

    stored = lurker.Run.open(served["run"]).featviz("1").signals()  # (units, 1, C, T)
    for base in (served["url"], served["bare"]):  # the run alone serves them too
        tiles = get_json(f"{base}/api/runs/{RID}/layers/1")["featviz_signals"]
        assert sorted(tiles, key=int) == ["0", "1", "2", "3"]
        for u, tile in tiles.items():
            assert tile["length"] == T and tile["channels"] == C
            for ch in range(C):
                lo, hi = _split_min_max(stored[int(u), 0, ch], TILE_COLUMNS)
                assert tile["lo"][ch] == pytest.approx(lo, rel=1e-6, abs=1e-7)
                assert tile["hi"][ch] == pytest.approx(hi, rel=1e-6, abs=1e-7)


def test_the_layer_tiles_follow_a_later_featviz_of_the_layer(tmp_path: Path):
    """The tiles are decoded once per layer (kept by the server), yet a unit made later,
    or made again at another amplitude, shows on the next request."""
    from fastapi.testclient import TestClient

    from lurker.server import create_app

    model, data = _model(), _data()
    lurker.probe(model, data, out=tmp_path / "r", k=K, batch_size=8, progress=False).close()
    lurker.featviz(model, "1", units=[0], run=tmp_path / "r", steps=4).save(tmp_path / "r")
    client = TestClient(create_app(tmp_path / "r"))
    layer = "/api/runs/r/layers/1"
    assert list(client.get(layer).json()["featviz_signals"]) == ["0"]
    assert list(client.get(layer).json()["featviz_signals"]) == ["0"]  # kept: the same
    lurker.featviz(model, "1", units=[1], run=tmp_path / "r", steps=4).save(tmp_path / "r")
    again = lurker.featviz(model, "1", units=[0], run=tmp_path / "r", steps=4, amplitude=9.0)
    again.save(tmp_path / "r")
    tiles = client.get(layer).json()["featviz_signals"]
    assert sorted(tiles) == ["0", "1"]
    stored = lurker.Run.open(tmp_path / "r").featviz("1").signals()
    assert max(max(row) for row in tiles["0"]["hi"]) == pytest.approx(
        float(stored[0, 0].max()), rel=1e-6
    )
    assert float(stored[0, 0].max()) > 3.0  # the new amplitude's, not the first's


def test_the_layer_grid_draws_each_units_signal_as_lines(
    browser: Any, served: dict, tmp_path: Path
):
    skip_without_browser()
    url = served["url"]
    tiles = get_json(f"{url}/api/runs/{RID}/layers/1")["featviz_signals"]
    with strict_page(browser, width=1280) as pg:
        pg.goto(f"{url}/#/r/{RID}/layer/1?sort=index&thumb=featviz")
        plots = pg.locator(".unit-grid .featviz-signal svg.signal-tile-plot")
        plots.first.wait_for()
        assert plots.count() == 4
        assert pg.locator(".unit-grid img").count() == 0  # no grey strip left
        for u in range(4):
            card = pg.locator(f'.unit-card[data-unit="{u}"]')
            svg = card.locator("svg.signal-tile-plot")
            assert svg.get_attribute("data-channels") == str(C)
            assert svg.get_attribute("data-samples") == str(T)
            lines = card.locator("path.signal-line")
            assert lines.count() == C
            assert [lines.nth(i).locator("title").text_content() for i in range(C)] == NAMES
            # one pen stroke per column drawn: every column of the served tile is on it
            d = lines.nth(0).get_attribute("d") or ""
            assert d.count("M") + d.count("L") == 2 * len(tiles[str(u)]["starts"])
        assert "a signal optimized to excite the unit" in pg.locator("#grid-note").inner_text()
        pg.screenshot(path=str(tmp_path / "layer-featviz-signal.png"), full_page=True)


def _linear_stack() -> nn.Module:
    """Conv1d (3 -> 4, kernel 5, padding 2) -> Conv1d (4 -> 4, kernel 3, dilation 2) ->
    ReLU: linear up to layer "1", so the input samples that reach one of its positions are
    exactly those its gradient is non-zero on, whatever the input."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv1d(C, 4, 5, padding=2), nn.Conv1d(4, 4, 3, dilation=2), nn.ReLU()
    ).eval()


def _support(model: nn.Module, unit: int, t: int) -> list[int]:
    """The half-open span of input samples the unit's output at step t depends on, by
    autograd on a random signal (the receptive field's independent oracle)."""
    x = torch.randn(1, C, T, generator=torch.Generator().manual_seed(7), requires_grad=True)
    model[:2](x)[0, unit, t].backward()
    assert x.grad is not None
    hit = torch.nonzero(x.grad[0].abs().sum(0)).flatten()
    return [int(hit.min()), int(hit.max()) + 1]


def test_the_neuron_objective_on_a_signal_excites_its_unit_at_one_step_of_time():
    """objective='neuron' on signals: the unit at the centre of its map along time (or at
    position=(t,)); the value reached is the model's own at that step, beats every dataset
    sample's there, and the span recorded is what autograd says that step sees."""
    model = _linear_stack()
    fv = lurker.featviz(model, "1", units=[0, 1], size=T, steps=64, objective="neuron")
    length = T - 4  # the map along time: 64 - (3 - 1) * 2
    t = length // 2
    assert fv.settings["position"] == [t]
    assert fv.settings["span"] == _support(model, 0, t) == [t - 2, t + 7]
    assert "span_seconds" not in fv.settings  # no run, no sample rate
    sig = fv.signals
    assert sig is not None and tuple(sig.shape) == (2, C, T)
    with torch.no_grad():
        by_hand = model[:2](sig)[:, :, t]  # (units, channels): each signal's own unit
        data = _data().tensors[0].clamp(-3, 3)  # within the default ±3 the signal keeps
        best = model[:2](data)[:, :2, t].max(0).values
    assert fv.activations.tolist() == pytest.approx([float(by_hand[0, 0]), float(by_hand[1, 1])])
    assert (fv.activations > best).all(), (fv.activations, best)
    assert (fv.activations > fv.start).all()
    # another step, given as an image's (y, x) is: (t,) on a map with one axis
    at = lurker.featviz(model, "1", units=[0], size=T, steps=8, objective="neuron", position=(3,))
    assert at.settings["position"] == [3] and at.settings["span"] == _support(model, 0, 3)
    with torch.no_grad():
        assert float(at.activations[0]) == pytest.approx(float(model[:2](at.signals)[0, 0, 3]))
    with pytest.raises(LurkerError, match=r"position \(60,\) lies outside the 60 steps"):
        lurker.featviz(model, "1", units=[0], size=T, steps=1, objective="neuron", position=(60,))
    pooled = nn.Sequential(nn.Conv1d(C, 2, 3), nn.AdaptiveAvgPool1d(1), nn.Flatten()).eval()
    with pytest.raises(LurkerError, match=r"needs a map along time.*objective='channel'"):
        lurker.featviz(pooled, "2", units=[0], size=T, steps=1, objective="neuron")


def test_the_signal_neurons_gradient_is_autograd_of_the_unit_at_its_step():
    """The objective's gradient with respect to the signal fed to the model equals that of
    the hand-written objective (the unit's output at step t), and it is zero outside the
    recorded span: nothing there moves the objective."""
    from lurker.featviz.core import Shifts, _Config, _feed, _Scorer, _Tap

    model = _linear_stack()
    cfg = _Config.make(
        model, "1", [0, 2], "neuron", 1, T, None, 0.05, "fourier", 1, None, (9,), None,
        None, None, None, None, None, None,
    )  # fmt: skip
    x0 = torch.full((1, C, 1, T), 0.5)
    tap = _Tap(model, cfg.target, x0, cfg.layout, cfg.layer, None, _feed(cfg))
    scorer = _Scorer.make(cfg, tap, x0, Shifts.none())
    x = torch.randn(2, C, 1, T, generator=torch.Generator().manual_seed(2), requires_grad=True)
    scorer(tap(x), torch.tensor([0, 2]), None).sum().backward()
    y = x.detach().clone().requires_grad_(True)
    (model[:2](y[:, :, 0])[0, 0, 9] + model[:2](y[:, :, 0])[1, 2, 9]).backward()
    assert x.grad is not None and y.grad is not None
    assert torch.allclose(x.grad, y.grad, atol=1e-6)
    lo, hi = _support(model, 0, 9)
    assert x.grad[..., :lo].abs().max() == 0 and x.grad[..., hi:].abs().max() == 0
    assert x.grad[..., lo:hi].abs().amax((0, 1, 2)).min() > 0  # every sample within moves it


class _EegAt128(Eeg):
    sample_rate = 128.0


def test_a_signal_neurons_result_is_stored_served_and_drawn_with_its_span(
    browser: Any, tmp_path: Path
):
    """Stored beside a run's other featviz, read back by signals(), served in the unit
    document with the span its position sees (not its peak's) in samples and seconds, and
    in the layer's tiles for a unit with no channel signal."""
    from fastapi.testclient import TestClient

    from lurker.server import create_app

    model, data = _model(), _data()
    ds = _EegAt128(*data.tensors)
    lurker.probe(model, ds, out=tmp_path / "r", k=K, batch_size=8, progress=False).close()
    fv = lurker.featviz(model, "1", units=[0, 1], run=tmp_path / "r", steps=32,
                        objective="neuron")  # fmt: skip
    t = (T - 8) // 2  # kernel 9: a map of 56 steps
    assert fv.settings["position"] == [t] and fv.settings["span"] == [t, t + 9]
    assert fv.settings["span_seconds"] == pytest.approx([t / 128, (t + 9) / 128])
    fv.save(tmp_path / "r")
    stored = lurker.Run.open(tmp_path / "r").featviz("1", objective="neuron")
    assert stored.unit_settings(0)["span"] == [t, t + 9]
    values = stored.signals()
    assert values.shape == (2, 1, C, T)
    assert np.abs(values[:, 0] - fv.signals.numpy()).max() < 6.5 / 255  # 8-bit of the range
    client = TestClient(create_app(tmp_path / "r"))
    doc = client.get("/api/runs/r/layers/1/units/0").json()["featviz"]
    assert doc["objective"] == "neuron" and doc["spans"] == [[t, t + 9]]
    assert (
        f"step t = {t}" in doc["views"][0]["meaning"] and doc["signals"][0] == values[0, 0].tolist()
    )
    tiles = client.get("/api/runs/r/layers/1").json()["featviz_signals"]
    assert sorted(tiles) == ["0", "1"]  # neuron signals only: the grid draws them
    skip_without_browser()
    from lurker.server.serve import background

    with background(create_app(tmp_path / "r")) as url, strict_page(browser) as pg:
        pg.goto(f"{url.rstrip('/')}/#/r/r/unit/1/0?tab=featviz&objective=neuron")
        fig = pg.locator("figure.featviz.signal-entry")
        fig.locator("svg.signal-plot").wait_for()
        assert fig.get_attribute("data-span") == f"{t} {t + 9}"
        assert fig.get_attribute("data-objective") == "neuron"
        assert f"step {t} sees samples {t}\u2013{t + 8}" in fig.locator(".span-text").inner_text()
        pg.screenshot(path=str(tmp_path / "featviz-neuron-signal.png"), full_page=True)
