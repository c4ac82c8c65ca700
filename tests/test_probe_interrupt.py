"""Ctrl-C during a probe keeps every batch it swept: the next run resumes from there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import lurker


class Images(Dataset):
    """12 fixed random images in 3 classes; ``ctrl_c_at``: the item whose loading presses
    Ctrl-C (a SIGINT to this process), once."""

    def __init__(self, ctrl_c_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(12, 3, 8, 8, generator=g)
        self.y = torch.arange(12) % 3
        self.targets = self.y.tolist()  # labels without loading images: only the sweep loads
        self.ctrl_c_at = ctrl_c_at

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == self.ctrl_c_at:
            self.ctrl_c_at = None
            signal.raise_signal(signal.SIGINT)
        return self.x[i], int(self.y[i])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3))


def _tops(run: lurker.Run) -> list:
    return [
        [(e.sample_id, e.value, e.y, e.x) for e in run.unit(layer.name, u).top(which)]
        for layer in run.layers
        for u in range(layer.num_units)
        for which in ("max", "mean")
    ]


def test_ctrl_c_keeps_the_batches_swept_and_the_rerun_resumes_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while batch 2 (items 4-7) loads: the batch is finished and checkpointed
    before the probe stops (it used to stop mid-batch, keeping nothing before the first
    timed checkpoint). The same call again sweeps only items 8-11, and the run equals an
    uninterrupted one."""
    model = _model()
    want = lurker.probe(model, Images(), out=tmp_path / "whole", k=3, batch_size=4, progress=False)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        lurker.probe(model, Images(ctrl_c_at=6), out=out, k=3, batch_size=4, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    assert "interrupted after 8 of 12 images" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["done"] == 8
    got = lurker.probe(model, Images(), out=out, k=3, batch_size=4, progress=False)
    assert got.meta["sweep"]["resumed_from"] == 8 and got.meta["sweep"]["images"] == 4
    assert _tops(got) == _tops(want)


PROBE_AND_COUNT = """
import torch, lurker
from torch import nn
torch.set_num_threads(1)
data = torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8), torch.zeros(8).long())
lurker.probe(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), data, out=OUT, progress=False)
print(torch.get_num_threads())
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a machine with 2 cores or more")
def test_the_probe_leaves_torchs_thread_count_as_set(tmp_path: Path) -> None:
    """Starting numba's OpenMP thread pool set torch's count to every core: a user's
    torch.set_num_threads(1) (or OMP_NUM_THREADS=1) was lost, and the sweep's first batch
    ran on 1 thread and the rest on all, which round convolutions differently, so a
    resumed run differed from an uninterrupted one. In a fresh process (numba's pool is
    started once per process)."""
    code = PROBE_AND_COUNT.replace("OUT", repr(str(tmp_path / "run")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1"


CTRL_C_MODEL = """
import os, signal
from torch import nn


class Net(nn.Module):
    '''The digits' convnet; its forward presses Ctrl-C (a SIGINT to its process) on the
    sweep's second batch of 64, once.'''

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        self.batches = 0

    def forward(self, x):
        if x.shape[0] == 64:
            self.batches += 1
            if self.batches == 2:
                os.kill(os.getpid(), signal.SIGINT)
        return self.features(x)
"""


def test_ctrl_c_of_lurker_probe_says_lurkers_message_only_and_exits_130(tmp_path: Path) -> None:
    """`lurker probe` stopped by Ctrl-C after its first batch: it printed its own
    "interrupted after N of M images ... run the same command again", then click's
    "Aborted!" (exit status 1), which read as if nothing was kept. Now the message alone,
    exit status 130 (SIGINT's), and the checkpoint holds the batches it names."""
    (tmp_path / "ctrlc_net.py").write_text(CTRL_C_MODEL)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", "from lurker.cli import main; main()", "probe",
         str(tmp_path / "ctrlc_net.py") + ":Net", "--data", "digits", "--image-size", "8",
         "--batch-size", "64", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, env=env, check=False, timeout=600,
    )  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert "interrupted after 128 of 1797 images" in done.stderr, done.stderr
    assert "run the same command again to resume" in done.stderr
    assert "Aborted" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["done"] == 128


class Normalised(Images):
    """:class:`Images` normalised by the dataset itself, with its ``mean``/``std`` (which
    the probe records) saying how."""

    def __init__(self, mean: float, ctrl_c_at: int | None = None) -> None:
        super().__init__(ctrl_c_at)
        self.mean, self.std = (mean,) * 3, (0.5,) * 3

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = super().__getitem__(i)
        return (x - self.mean[0]) / self.std[0], y


def test_an_interrupted_probe_is_not_resumed_under_another_normalisation(tmp_path: Path) -> None:
    """Interrupted with one normalisation and rerun with another (`--normalize` changed,
    or the default for 1-channel models): the checkpoint was resumed, so the run mixed
    statistics of images normalised two ways and recorded only the second. Now the rerun
    starts over, and equals an uninterrupted probe with the second."""
    model = _model()
    want = lurker.probe(model, Normalised(1.0), out=tmp_path / "whole", k=3, progress=False)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        lurker.probe(
            model, Normalised(0.0, ctrl_c_at=6), out=out, k=3, batch_size=4, progress=False
        )
    assert torch.load(out / "checkpoint.pt", weights_only=True)["done"] == 8
    got = lurker.probe(model, Normalised(1.0), out=out, k=3, batch_size=4, progress=False)
    assert got.meta["sweep"]["resumed_from"] == 0 and got.meta["sweep"]["images"] == 12
    assert got.meta["config"]["mean"] == [1.0, 1.0, 1.0]
    assert _tops(got) == _tops(want)
