"""Which runs of two-axis samples are signals, and in which order of axes.

The explorer called every run whose samples have two axes (and are not token ids) a
signal ``(C, T)``. A ``(12, 12)`` one-channel image a model unsqueezes into a ``Conv2d``
was drawn as 12 lines and Explain answered it 409; a channels-last ``(T, C)`` signal a
model transposes into a ``Conv1d`` was drawn as T channels of C samples; an
``nn.LSTM(batch_first=True)``'s ``(L, F)`` as L lines of F points. The run's graph tells
them apart (the first op that reads an input axis as channels): each run here is
classified by it, its values served channels first are the dataset's (transposed where
stored channels last), its peaks are forward hooks', and its spans a hand-computed
receptive field's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn
from torch.utils.data import TensorDataset

from explorer_fixtures import assert_signal_max_list
from lurker.explain.axes import graph_input_axes, input_axes
from lurker.probe import probe
from lurker.server import create_app
from lurker.server.session import LIVE_IMAGES
from lurker.store import Run

N, K = 24, 3


class Plain(nn.Module):
    """A Conv1d stack on ``(C, T) = (3, 64)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 5, padding=2)  # sees input [x-2, x+3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(2))


class ChannelsLast(Plain):
    """The same stack fed ``(T, C) = (64, 3)``, transposed inside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2))


class Recurrent(nn.Module):
    """An LSTM over ``(L, F) = (20, 8)``, batch first: 8 channels over 20 steps."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o, _ = self.lstm(x)
        return self.fc(o[:, -1])


class Image(nn.Module):
    """A one-channel ``(12, 12)`` image, unsqueezed into a Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x.unsqueeze(1))).mean((2, 3)))


# run id -> (model class, a sample's shape, the served signal [C, T] or None)
CASES = {
    "plain": (Plain, (3, 64), [3, 64]),
    "last": (ChannelsLast, (64, 3), [3, 64]),
    "lstm": (Recurrent, (20, 8), [8, 20]),
    "img": (Image, (12, 12), None),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root: Path = tmp_path_factory.mktemp("layouts")
    out = {}
    for rid, (cls, shape, _) in CASES.items():
        torch.manual_seed(0)
        model = cls().eval()
        n = LIVE_IMAGES + 8 if rid == "plain" else N  # more samples than Live keeps
        xs = torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))
        data = TensorDataset(xs, torch.arange(n) % 2)
        probe(model, data, out=root / rid, k=K, batch_size=8, progress=False).close()
        app = create_app(root / rid, model_obj=model, dataset=data)
        out[rid] = {"client": TestClient(app), "model": model, "xs": xs, "app": app}
        out[rid]["path"] = root / rid
    yield out


def _get(run: dict[str, Any], url: str) -> Any:
    r = run["client"].get(url)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("rid", list(CASES))
def test_each_run_is_classified_by_how_its_graph_reads_the_axes(runs: dict, rid: str):
    assert _get(runs[rid], f"/api/runs/{rid}")["dataset"]["signal"] == CASES[rid][2]


@pytest.mark.parametrize("rid", list(CASES))
def test_a_runs_stored_graph_reads_the_axes_as_a_live_trace_does(runs: dict, rid: str):
    """The explorer reads a run's stored graph, Explain a fresh trace: the same answer."""
    run = runs[rid]
    stored = Run.open(run["path"])
    try:
        found = graph_input_axes(stored.graph, 3)
    finally:
        stored.close()
    live = input_axes(run["model"], run["xs"][:2])
    assert found is not None and (found.channel, found.image) == (live.channel, live.image)
    assert (found.channel, found.image) == {
        "plain": (1, None),
        "last": (2, None),
        "lstm": (2, None),
        "img": (None, (1, 2)),
    }[rid]


@pytest.mark.parametrize("rid", ["plain", "last", "lstm"])
def test_samples_are_served_channels_first_as_the_model_reads_them(runs: dict, rid: str):
    run = runs[rid]
    xs = run["xs"] if rid == "plain" else run["xs"].transpose(1, 2)  # (N, C, T)
    doc = _get(run, f"/api/runs/{rid}/samples/5/signal.json")
    np.testing.assert_allclose(doc["values"], xs[5].double(), rtol=1e-6)
    tiles = _get(run, f"/api/runs/{rid}/samples?limit=2")["samples"]
    assert tiles[0]["signal"]["channels"] == CASES[rid][2][0]
    assert tiles[0]["signal"]["length"] == CASES[rid][2][1]


@pytest.mark.parametrize("rid", ["plain", "last"])
def test_conv_peaks_spans_and_values_match_hooks_and_a_hand_field(runs: dict, rid: str):
    """The channels-last run's spans: the probe's fields run over the input's last axis
    (channels here), so the server's are along time; by hand [x-2, x+3), clipped."""
    run = runs[rid]
    model, xs = run["model"], run["xs"]
    out: dict[str, torch.Tensor] = {}
    hook = model.conv.register_forward_hook(lambda m, a, o: out.__setitem__("c", o.detach()))
    with torch.no_grad():
        model(xs)
    hook.remove()
    seen = xs if rid == "plain" else xs.transpose(1, 2)
    layer = _get(run, f"/api/runs/{rid}/layers/conv")
    assert layer["rf"]["x"]["size"] == 5 and layer["rf"]["x"]["stride"] == 1
    for unit in range(4):
        doc = _get(run, f"/api/runs/{rid}/layers/conv/units/{unit}")
        assert doc["signal_shape"] == [3, 64]
        top = assert_signal_max_list(
            doc, out["c"][:, unit], K, lambda _, x: [max(0, x - 2), min(64, x + 3)]
        )
        for e in top:
            sid = e["sample_id"]
            sig = _get(run, f"/api/runs/{rid}/samples/{sid}/signal.json")["values"]
            np.testing.assert_allclose(sig, seen[sid].double(), rtol=1e-6)
        unit_row = layer["units"][unit]
        assert unit_row["top_max_span"] == top[0]["span"]


def test_an_lstm_run_draws_features_over_steps_and_its_live_lines_are_the_lstms(runs: dict):
    run = runs["lstm"]
    model, xs = run["model"], run["xs"]
    with torch.no_grad():
        o, _ = model.lstm(xs[3:4])
        logits = model(xs)
    doc = _get(run, "/api/runs/lstm/layers/fc/units/1")
    assert [e["sample_id"] for e in doc["top"]["max"]] == torch.argsort(-logits[:, 1])[:K].tolist()
    sid = doc["top"]["max"][0]["sample_id"]
    sig = _get(run, f"/api/runs/lstm/samples/{sid}/signal.json")["values"]
    np.testing.assert_allclose(sig, xs[sid].t().double(), rtol=1e-6)
    lines = _get(run, "/api/runs/lstm/live/sample-3/ops/lstm_1/output")
    assert lines["shape"] == [16, 20]  # one line per unit over the 20 steps
    assert torch.tensor(lines["values"]) == pytest.approx(o[0].t().double(), abs=1e-5)


def test_explain_bands_of_a_channels_last_run_are_channels_first(runs: dict):
    """Saliency's bands against autograd; occlusion's windows sized by time, not by the
    3 channels of the stored last axis."""
    run = runs["last"]
    model, xs = run["model"], run["xs"]
    x = xs[2:3].clone().requires_grad_(True)
    logits = model(x)
    logits[0, int(logits.argmax())].backward()
    got = _get(run, "/api/runs/last/live/sample-2/explain/saliency.json")
    assert torch.tensor(got["signal_scores"]) == pytest.approx(
        x.grad[0].abs().t().double(), abs=1e-6
    )
    occ = _get(run, "/api/runs/last/live/sample-2/explain/occlusion.json")
    # (T, C) as the input stores them: 4 samples (64 / 16) across all 3 channels
    assert len(occ["signal_scores"][0]) == 64 and occ["options"]["window"] == [4, 3]


def test_explain_and_live_on_an_unsqueezed_image_answer_again(runs: dict):
    run = runs["img"]
    for method in ("saliency", "gradcam", "occlusion"):
        got = _get(run, f"/api/runs/img/live/sample-0/explain/{method}.json")
        assert got["signal_scores"] is None and got["shape"] == [12, 12]
    model, xs = run["model"], run["xs"]
    with torch.no_grad():
        probs = model(xs[:1]).softmax(1)[0]
    live = _get(run, "/api/runs/img/live/sample-0")
    assert live["predictions"][0]["prob"] == pytest.approx(float(probs.max()), rel=1e-5)
    r = run["client"].get("/api/runs/img/live/sample-0/ops/conv/output/0.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_gradcam_on_an_lstm_skips_its_tuple_output_and_says_why(runs: dict):
    """The LSTM's op has three outputs: a hook sees one, so Grad-CAM's default layer is
    not it (it was, and answered 'a hook on lstm_1 returned Tensor'); with no other map
    along time the answer says so and how to pick a layer."""
    r = runs["lstm"]["client"].get("/api/runs/lstm/live/sample-0/explain/gradcam.json")
    assert r.status_code == 400
    assert "hook" not in r.json()["detail"] and "layer=" in r.json()["detail"]


def test_live_signal_samples_are_kept_no_more_than_uploads(runs: dict):
    """Each sample-N opened in Live on a signal run was kept for good (150 browsed, 150
    inputs held); now the oldest go past LIVE_IMAGES, as uploads and typed inputs do."""
    run = runs["plain"]
    for sid in range(LIVE_IMAGES + 8):
        _get(run, f"/api/runs/plain/live/sample-{sid}/ops/conv/output")
    kept = run["app"].state.registry.get("plain").session._images
    assert len(kept) == LIVE_IMAGES
    assert "sample-0" not in kept and f"sample-{LIVE_IMAGES + 7}" in kept


def test_typed_input_on_a_signal_run_says_live_takes_a_dataset_sample(runs: dict):
    r = runs["plain"]["client"].post("/api/runs/plain/live/inputs", json={"features": [1]})
    assert r.status_code == 409
    assert "sample-N" in r.json()["detail"] and "images" not in r.json()["detail"]


def test_precomputing_an_lstm_runs_explanations_leaves_out_grad_cam_saying_why(
    tmp_path: Path,
) -> None:
    """``lurker images RUN --explanations N`` with no ``--methods`` asks every method the
    Explain page shows; Grad-CAM has no map along time in a batch-first LSTM (and LRP no
    rule for it), so they are left out and said, not the whole precompute stopped at sample 0 (it was)."""
    from lurker.errors import LurkerError
    from lurker.server.explained import precompute

    torch.manual_seed(0)
    model = Recurrent().eval()
    data = TensorDataset(torch.randn(N, 20, 8), torch.arange(N) % 2)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    meta = {"model_spec": f"{__name__}:Recurrent", "weights": str(tmp_path / "w.pt")}
    probe(model, data, out=tmp_path / "lstm", k=K, batch_size=8, progress=False, meta=meta).close()
    done = precompute(tmp_path / "lstm", 2, dataset=data, progress=False)
    assert {"gradcam", "gradcam_plus_plus", "lrp"} == set(done.skipped)  # no rule for LSTMs
    assert "map along time" in done.skipped["gradcam"]
    assert done.made == 2 * 7  # the other seven methods, on both samples
    with pytest.raises(LurkerError, match=r"'gradcam'.*leave it out of --methods"):  # named
        precompute(tmp_path / "lstm", 1, ["gradcam"], dataset=data, progress=False)


@pytest.mark.parametrize("rid", ["plain", "last"])
def test_unit_images_say_signals_have_none(runs: dict, rid: str):
    """``lurker images`` / ``UnitImages`` on a run of signals: the reason and where the
    lines are drawn (was: "gradient_pixels needs (N, 1|3, H, W) gradients, got (32, 3,
    64)" after making a sample picture of each top sample)."""
    from click.testing import CliRunner

    from lurker.cli import main
    from lurker.errors import LurkerError
    from lurker.probe import UnitImages

    r = runs[rid]
    said = r"signals of 3 channels x 64 samples.*no images to make"
    with pytest.raises(LurkerError, match=said):
        UnitImages(r["path"], model=r["model"], dataset=TensorDataset(r["xs"])).write_all(
            progress=False
        )
    out = CliRunner().invoke(main, ["images", str(r["path"])])
    assert out.exit_code != 0 and "signals of 3 channels x 64 samples" in out.output
    assert "lurker serve" in out.output and "gradient_pixels" not in out.output


def test_unit_images_of_an_unsqueezed_image_are_not_refused_as_signals(runs: dict):
    """A one-channel image the model unsqueezes has two axes too, but pictures."""
    from lurker.probe import UnitImages

    r = runs["img"]
    UnitImages(r["path"], model=r["model"], dataset=TensorDataset(r["xs"]))  # no refusal


class Boom(nn.Module):
    """Probes (no gradient) but fails on every explanation: the model's own error."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 5)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.fc(torch.relu(self.conv(x)).amax(-1))


def test_precomputing_stops_on_the_models_own_error_not_leaving_methods_out(tmp_path: Path):
    """A method left out is one the model cannot give (no rule, no map along time); the
    model failing (out of memory, a bug) stops the precompute naming it, as before: it
    was taken for 'cannot give' and every method left out, or a traceback."""
    from lurker.errors import LurkerError
    from lurker.server.explained import precompute

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(N, 3, 64), torch.arange(N) % 2)
    model = Boom().eval()  # the weights saved are the probed model's
    torch.save(model.state_dict(), tmp_path / "w.pt")
    meta = {"model_spec": f"{__name__}:Boom", "weights": str(tmp_path / "w.pt")}
    probe(model, data, out=tmp_path / "r", k=K, batch_size=8, progress=False, meta=meta).close()
    with pytest.raises(LurkerError, match=r"sample 0: \w+ failed on this input.*out of memory"):
        precompute(tmp_path / "r", 2, dataset=data, progress=False)
