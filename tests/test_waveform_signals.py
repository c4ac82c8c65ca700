"""Raw waveforms: one-axis samples a model unsqueezes into a Conv1d are 1-channel signals.

An M5-style audio model takes ``(N, T)`` waveforms and gives them their one channel itself
(``x.unsqueeze(1)``, ``x.view(N, 1, T)``, ``x[:, None]``) before a ``Conv1d``. Its run was
served as T "features": bar charts of 4000 numbers, a form of 4000 fields on Live, no
receptive fields. The graph says it is a signal ``(1, T)``: each page and document that
signals get now works for it, while a tabular MLP stays feature vectors.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn
from torch.utils.data import TensorDataset

import lurker
from explorer_fixtures import (
    assert_signal_max_list,
    served_run,
    skip_without_browser,
    strict_page,
)
from lurker.capture import settled_trace
from lurker.explain.axes import graph_signal_layout, input_axes
from lurker.probe import probe
from lurker.server import create_app

T, N, K = 240, 24, 3


class M5(nn.Module):
    """A small M5: ``(N, T)`` waveforms given their one channel inside ``forward``."""

    def __init__(self, how: str = "unsqueeze") -> None:
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv1d(1, 4, 8, stride=4)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(4, 5, 3)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "unsqueeze":
            x = x.unsqueeze(1)
        elif self.how == "view":
            x = x.view(x.shape[0], 1, x.shape[1])
        else:
            x = x[:, None]
        x = self.pool(self.act(self.conv1(x)))
        return self.fc(self.act(self.conv2(x)).mean(2))


class PerValue(nn.Module):
    """Tabular tokens: each feature a token of one value (``x.unsqueeze(-1)``) a Linear reads."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Linear(1, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.tok(x.unsqueeze(-1)).mean(1))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(T, 8), nn.ReLU(), nn.Linear(8, 3))


def _layout(model: nn.Module, x: torch.Tensor) -> tuple[int, int, bool] | None:
    with torch.no_grad():
        tr = settled_trace(model.eval(), x, save="none")
    return graph_signal_layout(tr, tuple(x.shape[1:]))


@pytest.mark.parametrize("how", ["unsqueeze", "view", "none"])
def test_a_waveform_unsqueezed_into_a_conv1d_is_a_one_channel_signal(how: str):
    x = torch.randn(2, T)
    assert _layout(M5(how), x) == (1, T, False)
    axes = input_axes(M5(how).eval(), x)
    assert axes.waveform and axes.channel is None and axes.image is None


@pytest.mark.parametrize(
    "model, x",
    [
        (_mlp(), torch.randn(2, T)),  # a Linear reads the values as features
        (PerValue(), torch.randn(2, T)),  # a Linear per value: tabular tokens
        (nn.Sequential(nn.Embedding(50, 4)), torch.randint(0, 50, (2, 20))),  # ids
    ],
)
def test_features_tokens_and_ids_are_not_signals(model: nn.Module, x: torch.Tensor):
    assert _layout(model, x) is None
    assert not input_axes(model.eval(), x).waveform


class Wave(TensorDataset):
    """Waveforms with their microphone named and their sampling rate."""

    channel_names = ["mic"]
    sample_rate = 8000


def _data() -> Wave:
    g = torch.Generator().manual_seed(1)
    return Wave(torch.randn(N, T, generator=g), torch.arange(N) % 3)


@pytest.fixture(scope="module")
def wav(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root: Path = tmp_path_factory.mktemp("wave")
    torch.manual_seed(0)
    model = M5().eval()
    data = _data()
    probe(model, data, out=root / "wav", k=K, batch_size=8, progress=False).close()
    client = TestClient(create_app(root / "wav", model_obj=model, dataset=data))
    yield {"client": client, "model": model, "xs": data.tensors[0], "path": root / "wav"}


def _get(run: dict[str, Any], url: str) -> Any:
    r = run["client"].get(url)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_run_is_served_as_a_one_channel_signal(wav: dict):
    ds = _get(wav, "/api/runs/wav")["dataset"]
    assert ds["signal"] == [1, T] and ds["features"] is None
    assert ds["channel_names"] == ["mic"] and ds["sample_rate"] == 8000
    for sid in (0, 5):
        doc = _get(wav, f"/api/runs/wav/samples/{sid}/signal.json")
        assert doc["channels"] == 1 and doc["length"] == T
        np.testing.assert_allclose(doc["values"], wav["xs"][sid][None].double(), rtol=1e-6)
    sample = _get(wav, "/api/runs/wav/samples/5")
    assert sample["signal_error"] is None and sample["features"] is None
    tile = _get(wav, "/api/runs/wav/samples?limit=1")["samples"][0]
    assert tile["features"] is None and tile["signal"]["channels"] == 1
    assert tile["signal"]["length"] == T


def test_a_wrong_count_of_channel_names_on_a_waveform_is_refused(tmp_path: Path):
    from lurker.errors import LurkerError

    data = _data()
    data.channel_names = ["left", "right"]  # type: ignore[misc]
    with pytest.raises(LurkerError, match=rf"2 names.*1 channels x {T} samples"):
        probe(M5().eval(), data, out=tmp_path / "bad", k=K, batch_size=8, progress=False)


def _support(model: nn.Module, x: torch.Tensor, layer: str, unit: int, pos: int) -> list[int]:
    """``[t0, t1)`` of the input samples with a nonzero gradient of the unit at ``pos``."""
    x = x[None].clone().requires_grad_(True)
    out: dict[str, torch.Tensor] = {}
    hook = getattr(model, layer).register_forward_hook(lambda m, a, o: out.__setitem__("o", o))
    model(x)
    hook.remove()
    out["o"][0, unit, pos].backward()
    nz = torch.nonzero(x.grad[0]).flatten()
    return [int(nz.min()), int(nz.max()) + 1]


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_peaks_are_the_hooks_and_spans_the_autograd_support(wav: dict, layer: str):
    """Top-k and peaks against forward hooks; each span against the support of the
    gradient of the unit at its peak, taken on a copy whose ReLUs are identities and
    whose max pool averages (same geometry, no gradient a ReLU or a max drops)."""
    model, xs = wav["model"], wav["xs"]
    linear = copy.deepcopy(model)
    linear.act, linear.pool = nn.Identity(), nn.AvgPool1d(2)
    out: dict[str, torch.Tensor] = {}
    hook = getattr(model, layer).register_forward_hook(lambda m, a, o: out.__setitem__("o", o))
    with torch.no_grad():
        model(xs)
    hook.remove()
    units = out["o"].shape[1]
    for unit in range(units):
        doc = _get(wav, f"/api/runs/wav/layers/{layer}/units/{unit}")
        assert doc["signal_shape"] == [1, T] and doc["signal_error"] is None
        assert_signal_max_list(
            doc,
            out["o"][:, unit],
            K,
            lambda sid, x, u=unit: _support(linear, xs[sid], layer, u, x),
        )
    rf = _get(wav, f"/api/runs/wav/layers/{layer}")["rf"]["x"]
    assert (rf["size"], rf["stride"]) == {"conv1": (8, 4), "conv2": (28, 8)}[layer]


def test_live_and_explain_answer_as_for_a_one_channel_run(wav: dict):
    model, xs = wav["model"], wav["xs"]
    with torch.no_grad():
        probs = model(xs[3:4]).softmax(1)[0]
        c1 = model.conv1(xs[3:4].unsqueeze(1))[0]
    live = _get(wav, "/api/runs/wav/live/sample-3")
    assert live["predictions"][0]["prob"] == pytest.approx(float(probs.max()), rel=1e-5)
    lines = _get(wav, "/api/runs/wav/live/sample-3/ops/conv1d_1/output.json")
    assert lines["shape"] == list(c1.shape)  # one line per unit over time
    assert torch.tensor(lines["values"]) == pytest.approx(c1.double(), abs=1e-5)
    typed = wav["client"].post("/api/runs/wav/live/inputs", json={"features": [0.0] * T})
    assert typed.status_code == 409 and "dataset sample" in typed.json()["detail"]
    x = xs[3:4].clone().requires_grad_(True)
    logits = model(x)
    logits[0, int(logits.argmax())].backward()
    got = _get(wav, "/api/runs/wav/live/sample-3/explain/saliency.json")
    assert got["shape"] == [1, T]
    assert torch.tensor(got["signal_scores"]) == pytest.approx(x.grad.abs().double(), abs=1e-6)
    for method in ("gradcam", "occlusion", "integrated_gradients"):
        got = _get(wav, f"/api/runs/wav/live/sample-3/explain/{method}.json")
        assert len(got["signal_scores"]) == 1 and len(got["signal_scores"][0]) == T, method


def test_concept_relevance_on_a_waveform_is_its_one_channel(wav: dict):
    """Each unit's conditional heatmap on a waveform is one channel along time, equal to
    lurker.explain.concepts on the (N, T) sample (it was a 500: a (T,) map read as rows)."""
    x = wav["xs"][3:4]
    ref = lurker.explain.concepts(wav["model"], x, layer="conv1", top=3)
    got = _get(wav, "/api/runs/wav/live/sample-3/explain/concepts.json?layer=conv1&top=3")
    assert [u["unit"] for u in got["units"]] == ref.units[0].tolist()
    for i, u in enumerate(got["units"]):
        heat = torch.tensor(u["signal_scores"], dtype=torch.float64)
        assert heat.shape == (1, T)
        want = ref.heatmaps[0, i].double().reshape(1, T)
        assert heat == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_a_tabular_mlp_stays_feature_vectors(tmp_path: Path):
    data = TensorDataset(torch.randn(N, T), torch.arange(N) % 3)
    probe(_mlp().eval(), data, out=tmp_path / "mlp", k=K, batch_size=8, progress=False).close()
    client = TestClient(create_app(tmp_path / "mlp", dataset=data))
    ds = client.get("/api/runs/mlp").json()["dataset"]
    assert ds["signal"] is None and ds["features"] == T


def test_the_unit_page_draws_a_waveform_as_lines(browser: Any, tmp_path: Path):
    skip_without_browser()
    torch.manual_seed(0)
    with (
        served_run(tmp_path, "wav", M5().eval(), _data(), "conv1", K) as s,
        strict_page(browser) as pg,
    ):
        pg.goto(f"{s['url']}/#/r/wav/unit/conv1/1?tab=max")
        pg.wait_for_function(
            f"document.querySelectorAll('.signal-entry svg.signal-plot').length === {K}"
        )
        entry = pg.locator(".signal-entry").first
        assert entry.locator("path.signal-line").count() == 1  # its one channel
        assert entry.locator("path.signal-line title").all_text_contents() == ["mic"]
        assert pg.locator(".entry-features").count() == 0  # not feature strips
        pg.screenshot(path=str(tmp_path / "waveform-unit.png"), full_page=True)


def test_featviz_optimizes_a_waveform_as_the_model_takes_it(wav: dict):
    """featviz on a waveform run feeds the model (N, T), as the probe did, and gives each
    unit a (1, T) signal: the value it reports is the model's own forward on that signal."""
    from lurker.errors import LurkerError
    from lurker.featviz import featviz

    model = wav["model"]
    fv = featviz(model, "conv1", [0, 1], run=wav["path"], steps=40, seed=0)
    assert fv.settings.get("waveform") is True
    sig = fv.signals
    assert sig is not None and tuple(sig.shape) == (2, 1, T)
    seen: dict[str, torch.Tensor] = {}
    hook = model.conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    try:
        with torch.no_grad():
            model(sig[:, 0])  # (N, T): the model makes the channel itself
    finally:
        hook.remove()
    by_hand = seen["out"][[0, 1], [0, 1]].mean(-1)
    torch.testing.assert_close(fv.activations.float(), by_hand.float(), rtol=1e-4, atol=1e-5)
    assert (fv.activations > fv.start).all()
    with pytest.raises(LurkerError, match="channels= must be 1"):
        featviz(model, "conv1", 0, run=wav["path"], steps=1, channels=3)


class _SideAndSignal(nn.Module):
    """Side features (N, 4) first, then a channels-last signal (N, T, 3) into a Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 2, 5, stride=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, meta: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        return self.conv(sig.transpose(1, 2)).mean(2) + self.fc(meta)


def test_fields_along_time_take_the_signal_over_side_features():
    """With time on axis 1, a (N, T, C) input comes before a 2-D one: side features read
    as a waveform gave the conv no field at all, silently."""
    from lurker.graph.receptive import receptive_fields

    tr = lurker.trace(_SideAndSignal().eval(), torch.randn(1, 4), torch.randn(1, 50, 3))
    conv = next(op for op in tr.ops if op.name == "conv1d")
    rf = receptive_fields(tr, time_axis=1)[conv.index]
    assert (rf.x.size, rf.x.stride) == (5, 2)
