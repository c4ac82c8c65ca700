"""A run of signals records each input channel's range over the dataset, and featviz bounds
each channel's optimized signal to it: a raw waveform within ±0.6 used to get ±3 pulses
(five times louder than any sample), and EEG channels of different scales all one bound.

Oracles: numpy's min and max over the dataset; the stored run read back without torch.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import dist_ranks
import lurker
from lurker.store.featviz import featviz_signal

C, T, N = 3, 32, 20
#: channels of very different scales and offsets (microvolts, a raw waveform's ±0.6, ...)
SCALE = torch.tensor([0.2, 40.0, 1.5])[:, None]
OFFSET = torch.tensor([0.0, -100.0, 3.0])[:, None]


class Eeg(Dataset):
    """N signals ``(C, T)`` (``(T, C)`` with ``last``), a NaN in sample 5 channel 2 and
    an inf in sample 9 channel 0;
    ``ctrl_c_at``: the item whose loading presses Ctrl-C, once."""

    channel_names = ["Fz", "Cz", "Pz"]

    def __init__(self, last: bool = False, ctrl_c_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(N, C, T, generator=g) * SCALE + OFFSET
        x[5, 2, 7] = float("nan")
        x[9, 0, 3] = float("inf")
        self.x = x.transpose(1, 2).contiguous() if last else x
        self.targets = [i % 2 for i in range(N)]
        self.ctrl_c_at = ctrl_c_at

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == self.ctrl_c_at:
            self.ctrl_c_at = None
            signal.raise_signal(signal.SIGINT)
        return self.x[i], self.targets[i]


class Stack(nn.Module):
    """Conv1d (C -> 4) -> ReLU -> mean over time -> Linear; ``last``: fed ``(T, C)``."""

    def __init__(self, last: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.last = last
        self.conv = nn.Conv1d(C, 4, 5)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.last:
            x = x.transpose(1, 2)
        return self.head(self.act(self.conv(x)).mean(-1))


def _numpy_range(last: bool = False) -> dict[str, list[Any]]:
    x = Eeg(last).x.numpy()
    per = x.transpose(2, 0, 1) if last else x.transpose(1, 0, 2)  # (C, N, T)
    per = per.reshape(C, -1).astype(np.float64)
    per = np.where(np.isfinite(per), per, np.nan)  # (numpy's nanmin would keep the inf)
    return {
        "min": np.nanmin(per, 1).tolist(),
        "max": np.nanmax(per, 1).tolist(),
        "finite": np.isfinite(per).sum(1).tolist(),
    }


def _probe(out: Path, batch_size: int, last: bool = False, **kw: Any) -> lurker.Run:
    with pytest.warns(UserWarning, match="NaN or infinite"):
        return lurker.probe(
            Stack(last), Eeg(last, **kw), out=out, k=3, batch_size=batch_size, progress=False
        )


@pytest.mark.parametrize("last", [False, True], ids=["channels-first", "channels-last"])
def test_the_probe_records_each_channels_range_as_numpy_does(tmp_path: Path, last: bool) -> None:
    """Each channel's min, max (NaN left out) and count of finite values equal numpy's
    over the whole dataset, whatever the batch size; the summary serves them."""
    want = _numpy_range(last)
    assert want["finite"] == [N * T - 1, N * T, N * T - 1]
    runs = [_probe(tmp_path / f"b{b}", b, last) for b in (3, 8)]
    for run in runs:
        assert run.meta["channel_range"] == want
    from fastapi.testclient import TestClient

    from lurker.server.app import create_app  # (the summary as the explorer serves it)

    client = TestClient(create_app(str(tmp_path / "b3")))
    rid = client.get("/api/runs").json()["runs"][0]["id"]
    got = client.get(f"/api/runs/{rid}").json()["dataset"]["channel_range"]
    assert got == want


def test_an_interrupted_probe_resumes_to_the_same_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C as item 10 loads: the checkpoint keeps the range of the batches swept and
    the rerun folds in only the rest, to numpy's range over all of them."""
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        lurker.probe(Stack(), Eeg(ctrl_c_at=10), out=out, k=3, batch_size=4, progress=False)
    assert "interrupted after 12 of 20" in capsys.readouterr().err
    got = _probe(out, 4)
    assert got.meta["sweep"]["resumed_from"] == 12
    assert got.meta["channel_range"] == _numpy_range()


def _rank(rank: int, out: str) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lurker.probe(Stack(), Eeg(), out=out, k=3, batch_size=3, progress=False)


def test_two_ranks_merge_to_the_same_range(tmp_path: Path) -> None:
    """Under torchrun each rank sweeps its shard: the all-reduce gives numpy's range."""
    out = tmp_path / "ranks"
    dist_ranks.spawn(_rank, str(out))
    run = lurker.Run.open(out)
    assert run.meta["sweep"]["world"] == 2
    assert run.meta["channel_range"] == _numpy_range()


def test_an_image_run_records_no_range(tmp_path: Path) -> None:
    data = torch.utils.data.TensorDataset(torch.rand(6, 3, 8, 8), torch.zeros(6).long())
    run = lurker.probe(nn.Conv2d(3, 2, 3), data, out=tmp_path / "img", progress=False)
    assert run.meta.get("channel_range") is None


@pytest.fixture(scope="module")
def eeg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fv") / "eeg"
    _probe(out, 8)
    return out


def test_featviz_bounds_each_channel_to_its_dataset_range(eeg_run: Path) -> None:
    """Without amplitude= each channel's signal lies within the dataset's [min, max] for
    it and uses it (the ±3 default left channel 0, within ±0.6, five times too loud, and
    channel 1, near -100, out of reach); stored and served, it decodes to the same within
    8-bit precision."""
    want = _numpy_range()
    fv = lurker.featviz(Stack(), "act", run=eeg_run, steps=24, seed=0)
    sig = fv.signals
    assert sig is not None and tuple(sig.shape) == (4, C, T)
    assert fv.settings["bounds"] == [want["min"], want["max"]]
    assert "amplitude" not in fv.settings
    lo = torch.tensor(want["min"])[None, :, None]
    hi = torch.tensor(want["max"])[None, :, None]
    tol = 1e-5 * (hi - lo)
    assert ((sig >= lo - tol) & (sig <= hi + tol)).all()
    # at each channel's own scale: channel 1 (about -100 ± 120) goes far beyond ±3,
    # which channel 0 (within ±0.6) never nears
    assert float(sig[:, 1].abs().max()) > 30 and float(sig[:, 0].abs().max()) < 1.0
    # the model was fed exactly these values: the activation recomputed by hand
    model = Stack()
    with torch.no_grad():
        by_hand = model.act(model.conv(sig)).mean(-1)
    assert fv.activations.tolist() == pytest.approx(
        by_hand[torch.arange(4), torch.arange(4)].tolist(), rel=1e-4, abs=1e-5
    )
    fv.save(eeg_run)
    run = lurker.Run.open(eeg_run)
    step = ((hi - lo) / 255).numpy()
    stored = run.featviz("act").signals()[:, 0]
    assert np.all(np.abs(stored - sig.numpy()) <= step / 2 + 1e-5 * (hi - lo).numpy())
    served = np.asarray(featviz_signal(run, "act", 2), dtype=np.float32)
    assert np.array_equal(served, stored[2])
    # a rerun with the same bounds resumes; amplitude= is another setting
    again = lurker.featviz(Stack(), "act", run=eeg_run, steps=24, seed=0, resume=True)
    assert again.skipped == [0, 1, 2, 3]


def test_amplitude_still_bounds_every_channel_to_plus_minus_it(eeg_run: Path) -> None:
    fv = lurker.featviz(Stack(), "act", units=[0, 1], run=eeg_run, steps=24, amplitude=2.0)
    assert fv.settings["amplitude"] == 2.0 and "bounds" not in fv.settings
    sig = fv.signals
    assert sig is not None and float(sig.abs().max()) <= 2.0 + 1e-6
    assert float(sig.abs().max()) > 1.0


def test_a_run_without_ranges_keeps_plus_minus_3_and_says_so(eeg_run: Path, tmp_path: Path) -> None:
    """An older run (no channel_range): the signals are those of amplitude=3, exactly,
    and the settings say why the bound is ±3."""
    import shutil
    import sqlite3

    old = tmp_path / "old"
    shutil.copytree(eeg_run, old)
    db = sqlite3.connect(old / "run.db")
    db.execute("DELETE FROM meta WHERE key = 'channel_range'")
    db.execute("DROP TABLE IF EXISTS featviz")
    db.commit()
    db.close()
    fv = lurker.featviz(Stack(), "act", units=[0, 1], run=old, steps=24, seed=0)
    ref = lurker.featviz(Stack(), "act", units=[0, 1], run=old, steps=24, seed=0, amplitude=3.0)
    assert torch.equal(fv.images, ref.images)
    assert fv.settings["amplitude"] == 3.0 and "bounds" not in fv.settings
    assert "records no range" in fv.settings["amplitude_note"]
    sig = fv.signals
    assert sig is not None and math.isclose(float(sig.abs().max()), 3.0, rel_tol=0.2)


def test_shifts_bring_in_the_value_that_feeds_the_model_its_zero() -> None:
    """A signal bounded to its channels' ranges is shifted with each channel's start
    value coming in from outside (the model's 0), not 0.5 (the range's middle: a shifted
    signal, what the start offset is there to avoid); without bounds, 0.5 as before."""
    from lurker.featviz.transforms import Shifts

    fill = torch.tensor([0.25, 0.8])  # where each channel's range holds the model's 0
    start = fill[None, :, None, None].expand(1, 2, 1, 16).clone()  # a signal at 0
    shifted = Shifts(jitter=3, jitter2=0, fill=fill).apply(start, [(3.0,)])
    assert torch.equal(shifted, start)  # still 0 everywhere, the edge included
    plain = Shifts(jitter=3, jitter2=0).apply(torch.full((1, 2, 1, 16), 0.5), [(-3.0,)])
    assert torch.equal(plain, torch.full((1, 2, 1, 16), 0.5))
