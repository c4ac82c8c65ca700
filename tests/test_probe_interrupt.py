"""Ctrl-C during a probe keeps every batch it swept: the next run resumes from there."""

from __future__ import annotations

import functools
import os
import shlex
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import dist_ranks
import lurker


class Images(Dataset):
    """12 fixed random images in 3 classes; ``ctrl_c_at``: the item whose loading presses
    Ctrl-C (a SIGINT to this process), once, or sends ``sig`` ``times`` times (twice: a
    terminal's Ctrl-C that torchrun's launcher passes on to its workers again; SIGTERM: a
    preempted node)."""

    def __init__(
        self, ctrl_c_at: int | None = None, sig: int = signal.SIGINT, times: int = 1
    ) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(12, 3, 8, 8, generator=g)
        self.y = torch.arange(12) % 3
        self.targets = self.y.tolist()  # labels without loading images: only the sweep loads
        self.ctrl_c_at, self.sig, self.times = ctrl_c_at, sig, times

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == self.ctrl_c_at:
            self.ctrl_c_at = None
            for _ in range(self.times):
                signal.raise_signal(self.sig)
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


SIGNAL_IN_TRACE_MODEL = """
import os, signal, torch
from torch import nn


class Net(nn.Module):
    '''The digits' convnet; while the probe traces it (a function mode is on: not while
    `lurker probe` counts its channels, nor in the sweep), it sends itself the signal
    named by $STOP_WITH, as a batch system or a Ctrl-C would during a slow first forward.'''

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())

    def forward(self, x):
        sig = os.environ.get("STOP_WITH")
        if sig and torch.overrides._get_current_function_mode_stack():
            os.kill(os.getpid(), getattr(signal, sig))
        return self.features(x)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_the_probes_first_trace_says_nothing_was_swept(
    tmp_path: Path, sig: str
) -> None:
    """SIGTERM while `lurker probe` traces the model, before its first batch, killed it
    silently (status -15), leaving the run directory it had made (holding only its lock).
    Now it stops as Ctrl-C does: one line saying nothing was swept and nothing is lost,
    exit status 128 + the signal, no directory left behind, and the same command runs."""
    (tmp_path / "net.py").write_text(SIGNAL_IN_TRACE_MODEL)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-c", "from lurker.cli import main; main()", "probe",
           str(tmp_path / "net.py") + ":Net", "--data", "digits", "--image-size", "8",
           "--batch-size", "256", "--device", "cpu", "--out", str(out)]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**env, "STOP_WITH": sig}, timeout=600
    )
    signum = int(getattr(signal, sig))
    assert done.returncode == 128 + signum, (done.returncode, done.stderr)
    said = [line for line in done.stderr.splitlines() if "sweep" in line]
    how = "stopped by SIGTERM" if sig == "SIGTERM" else "interrupted"
    assert len(said) == 1 and said[0].startswith(f"lurker: {how} before the sweep's first"), said
    assert "nothing was swept in this call and nothing is lost" in said[0]
    assert "run the same command again" in said[0]
    assert "Traceback" not in done.stderr and "Aborted" not in done.stderr
    assert not out.exists()  # the directory made for the run, lock and all, is gone
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert lurker.Run.open(out).meta["sweep"]["images"] == 1797


SIGNAL_IN_LOAD_MODEL = """
import os, signal
from torch import nn


class Net(nn.Module):
    '''Sends itself $STOP_WITH while `lurker probe` loads it (before probe() is called,
    before --out exists), as a batch system would during a slow model load.'''

    def __init__(self):
        super().__init__()
        if os.environ.get("STOP_WITH"):
            os.kill(os.getpid(), getattr(signal, os.environ["STOP_WITH"]))
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())

    def forward(self, x):
        return self.features(x)
"""


def test_sigterm_while_lurker_probe_loads_the_model_says_what_the_docs_show(
    tmp_path: Path,
) -> None:
    """SIGTERM while `lurker probe` was still loading the model said "the run keeps what
    its last checkpoint saved (nothing if ...)", not the line docs/probe.md shows for a
    signal before the sweep's first batch: "stopped by SIGTERM before the sweep's first
    batch: nothing was swept in this call and nothing is lost ..." with the command."""
    (tmp_path / "net.py").write_text(SIGNAL_IN_LOAD_MODEL)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-c", "from lurker.cli import main; main()", "probe",
           str(tmp_path / "net.py") + ":Net", "--data", "digits", "--image-size", "8",
           "--device", "cpu", "--out", str(out)]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**env, "STOP_WITH": "SIGTERM"}, timeout=600
    )
    assert done.returncode == 128 + int(signal.SIGTERM), (done.returncode, done.stderr)
    said = [line for line in done.stderr.splitlines() if line.startswith("lurker:")]
    assert len(said) == 1, done.stderr
    assert said[0].startswith(
        "lurker: stopped by SIGTERM before the sweep's first batch: nothing was swept in "
        "this call and nothing is lost"
    ), said
    assert "run the same command again to resume: lurker probe" in said[0]
    assert "last checkpoint" not in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


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


def test_torchruns_second_ctrl_c_still_keeps_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun a Ctrl-C may reach a worker twice (with older torch, from the terminal
    and then from the launcher): the second one stopped the sweep mid-batch, saving nothing, so all work since
    the last timed checkpoint (30 s) was lost. Now the batch is kept and the rerun
    resumes to the uninterrupted result."""
    model = _model()
    want = lurker.probe(model, Images(), out=tmp_path / "whole", k=3, batch_size=4, progress=False)
    out = tmp_path / "cut"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # what torchrun sets in its workers
    with pytest.raises(KeyboardInterrupt):
        lurker.probe(model, Images(6, times=2), out=out, k=3, batch_size=4, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    assert torch.load(out / "checkpoint.pt", weights_only=True)["done"] == 8
    got = lurker.probe(model, Images(), out=out, k=3, batch_size=4, progress=False)
    assert got.meta["sweep"]["resumed_from"] == 8
    assert _tops(got) == _tops(want)


def _outcome(call: Any) -> str:
    """How a probe call ended, in a line the test compares."""
    try:
        call()
        return "done"
    except KeyboardInterrupt as e:
        return f"{type(e).__name__} {getattr(e, 'signum', None)}"
    except lurker.LurkerError as e:
        return f"{type(e).__name__} every_rank={e.every_rank} {e}"


def _rank_worker(rank: int, tmp: str, out: str, sigterm_at: int | None) -> None:
    """One gloo rank probing ``out`` (SIGTERM to rank 1 as it loads item ``sigterm_at``).
    How the call ended goes to ``outcome-rankN.txt`` in ``tmp``; the process then exits
    with status 0 (spawn stops no other rank: see :func:`dist_ranks.spawn`), closing its
    connections as a stopped rank's do."""
    data = Images(sigterm_at if rank == 1 else None, signal.SIGTERM)
    said = _outcome(functools.partial(lurker.probe, _model(), data, out=out, **KW))
    Path(tmp, f"outcome-rank{rank}.txt").write_text(said)


KW: dict[str, Any] = {"k": 3, "batch_size": 2, "progress": False}


def _spawn(tmp_path: Path, out: Path, sigterm_at: int | None = None) -> list[str]:
    for old in tmp_path.glob("outcome-*"):
        old.unlink()
    dist_ranks.spawn(_rank_worker, str(tmp_path), str(out), sigterm_at)
    return [(tmp_path / f"outcome-rank{r}.txt").read_text() for r in range(2)]


def test_sigterm_to_one_rank_keeps_every_ranks_work_and_resumes_only_with_as_many(
    tmp_path: Path,
) -> None:
    """A preempted node: SIGTERM to rank 1 alone. It used to kill rank 1 at once, keeping
    nothing (no checkpoint before 30 s), and rank 0, waiting to merge, failed with gloo's
    "Connection closed by peer" traceback. Now rank 1 finishes its batch, checkpoints it and
    stops; rank 0 keeps its whole shard and says why it stopped. Resuming with 1 process
    (which used to sweep everything again from the start, silently) is refused naming
    the fix, and resuming with 2 gives the uninterrupted result."""
    want = lurker.probe(_model(), Images(), out=tmp_path / "whole", **KW)
    out = tmp_path / "cut"
    # rank 1's shard is items 1, 3, 5, ...: the signal comes as item 5 loads, in its 2nd batch
    cut0, cut1 = _spawn(tmp_path, out, sigterm_at=5)
    assert cut1 == f"ProbeInterrupted {int(signal.SIGTERM)}"
    assert "another process of this torchrun job stopped" in cut0 and "every_rank=False" in cut0
    with pytest.raises(lurker.LurkerError, match=r"ran as 2 processes.*with 2 processes"):
        lurker.probe(_model(), Images(), out=out, **KW)
    assert _spawn(tmp_path, out) == ["done", "done"]
    got = lurker.Run.open(out)
    # rank 0 had swept its whole shard (6), rank 1 two batches (4): kept, not swept again
    assert got.meta["sweep"]["resumed_from"] == 10
    assert _tops(got) == _tops(want)
    assert not list(out.glob("checkpoint*"))


def test_one_process_checkpoint_is_not_resumed_by_two(tmp_path: Path) -> None:
    """An interrupted single-process run resumed under torchrun with 2 processes used to be
    swept again from the start, silently; now every rank refuses it with the fix (rank 0
    says it: the CLI prints an error marked every_rank once)."""
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        lurker.probe(_model(), Images(6), out=out, k=3, batch_size=4, progress=False)
    said = _spawn(tmp_path, out)
    for text in said:
        assert text.startswith("LurkerError every_rank=True"), said
        assert "ran as 1 process (checkpoint.pt)" in text and "without torchrun" in text
    assert torch.load(out / "checkpoint.pt", weights_only=True)["done"] == 8


def test_a_run_in_use_stops_every_rank_with_the_lock_message(tmp_path: Path) -> None:
    """A second torchrun job into a run another job is writing: rank 0 said the run is in
    use, but rank 1 went on to its first collective and failed there with gloo's
    "Connection closed by peer" traceback. Now every rank stops with the lock's message."""
    out = tmp_path / "held"
    with lurker.store.run_lock(out):
        said = _spawn(tmp_path, out)
    for text in said:
        assert text.startswith("RunInUseError every_rank=True"), said
        assert f"run {out} is in use by another process (pid {os.getpid()})" in text


def test_torchrun_job_into_a_run_in_use_says_so_once(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m lurker.cli probe` into a run another job holds:
    rank 0's "in use" message, once, and no traceback from rank 1 (which used to fail in
    its first collective with gloo's "Connection closed by peer")."""
    out = tmp_path / "held"
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        *("-m", "lurker.cli", "probe", "lurker.examples:DigitsNet", "--data", "digits:test"),
        *("--image-size", "16", "--layers", "features.4", "--out", str(out)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with lurker.store.run_lock(out):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert done.returncode != 0
    said = done.stdout + done.stderr
    assert said.count(f"error: run {out} is in use by another process") == 1, said
    assert "[rank1]" not in said and "Connection closed" not in said, said


SIGTERM_GROUP = """
import os, signal, subprocess, sys, time, torch, lurker
from torch import nn
torch.set_num_threads(1)


class Net(nn.Module):
    '''Sends SIGTERM to its whole process group (its DataLoader workers too, as a batch
    system or torchrun does) as the sweep's second batch of 8 runs.'''

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.batches = 0

    def forward(self, x):
        if x.shape[0] == 8:
            self.batches += 1
            if self.batches == 2:
                # from another process, as a batch system's: a worker told by its parent
                # leaves quietly (torch's own SIGTERM handler), by another it is killed
                subprocess.run(["kill", "-TERM", "--", f"-{os.getpgid(0)}"], check=False)
                time.sleep(1)  # the rest of the batch: the workers are gone meanwhile
        return self.conv(x)


class Slow(torch.utils.data.Dataset):
    '''Loading takes a while: the workers are busy when the signal comes.'''

    def __len__(self):
        return 200

    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.full((3, 8, 8), float(i)), i % 3


data = Slow()
try:
    lurker.probe(Net(), data, out=sys.argv[1], batch_size=8, num_workers=2, progress=False)
except lurker.probe.ProbeInterrupted as stop:
    print("stopped by", stop.signum)
"""


def test_sigterm_to_the_process_group_with_dataloader_workers_keeps_the_batch(
    tmp_path: Path,
) -> None:
    """SIGTERM to the whole process group from another process (a batch system's,
    torchrun's) reached the DataLoader workers too: they died of it, and torch raised in
    the middle of the batch, a traceback and no checkpoint. Now a worker stops as on Ctrl-C, and the sweep keeps
    its batch and stops as for a SIGTERM to it alone."""
    script = tmp_path / "group.py"
    script.write_text(SIGTERM_GROUP)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(script), str(out)],
        capture_output=True, text=True, env=env, check=False, timeout=300,
        start_new_session=True,  # its own group: the signal reaches it and its workers only
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"stopped by {int(signal.SIGTERM)}", done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["done"] == 16
    assert "interrupted after 16 of 200 images" in done.stderr


def test_a_run_of_another_model_stops_every_rank_with_one_message(tmp_path: Path) -> None:
    """``out`` holds a run of another model: rank 0 refused to write there, and rank 1,
    waiting for it at a barrier, failed with gloo's "Connection closed by peer" traceback.
    Now every rank stops with rank 0's error, which the CLI prints once."""
    out = tmp_path / "taken"
    torch.manual_seed(1)
    other = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU())
    lurker.probe(other, Images(), out=out, **KW)
    said = _spawn(tmp_path, out)
    for text in said:
        assert text.startswith("RunExistsError every_rank=True"), said
        assert "already holds a run of" in text


def _failing_writer_worker(rank: int, tmp: str, out: str) -> None:
    """One gloo rank probing ``out``; rank 0 fails as it writes the run (a full disk)."""
    if rank == 0:

        def full(*args: Any, **kwargs: Any) -> None:
            raise OSError(28, "No space left on device")

        lurker.store.RunWriter.set_graph = full  # type: ignore[method-assign]
    try:
        said = _outcome(functools.partial(lurker.probe, _model(), Images(), out=out, **KW))
    except OSError as e:
        said = f"OSError {e}"
    Path(tmp, f"outcome-rank{rank}.txt").write_text(said)
    os._exit(0)  # (rank 0 leaves without the barrier: its connections close)


def test_a_rank_keeps_its_shard_until_rank_0_has_written_the_run(tmp_path: Path) -> None:
    """Rank 1 deleted its checkpoint as soon as the ranks had merged, before rank 0 wrote
    the run: rank 0 failing to write (a full disk, a kill) lost rank 1's whole shard, swept
    again by the next job. Now rank 1 keeps it until rank 0 has written the run, says so,
    and the rerun resumes both shards to the uninterrupted result."""
    want = lurker.probe(_model(), Images(), out=tmp_path / "whole", **KW)
    out = tmp_path / "cut"
    dist_ranks.spawn(_failing_writer_worker, str(tmp_path), str(out))
    said = [(tmp_path / f"outcome-rank{r}.txt").read_text() for r in range(2)]
    assert said[0].startswith("OSError"), said
    assert "process 0 of this torchrun job stopped before it wrote the run" in said[1], said
    assert torch.load(out / "checkpoint-rank1.pt", weights_only=True)["done"] == 6
    assert torch.load(out / "checkpoint-rank0.pt", weights_only=True)["done"] == 6
    assert _spawn(tmp_path, out) == ["done", "done"]
    got = lurker.Run.open(out)
    assert got.meta["sweep"]["resumed_from"] == 12 and got.meta["sweep"]["images"] == 0
    assert _tops(got) == _tops(want)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["run.db"]


SLOW_NET = """
import os, sys, time
from torch import nn


class Net(nn.Module):
    '''A small convnet whose forward takes a while; rank 0 says when the sweep's third batch
    runs.'''

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        self.batches = 0

    def forward(self, x):
        self.batches += x.shape[0] == 4  # the sweep's batches, not the trace's
        if self.batches == 3 and os.environ.get("RANK") == "0":
            print("SWEEPING", file=sys.stderr, flush=True)
        time.sleep(0.05)
        return self.features(x)
"""


def test_sigterm_to_torchrun_says_one_line_with_the_command_and_it_resumes(
    tmp_path: Path,
) -> None:
    """SIGTERM to the torchrun launcher (a batch system stopping the job; Ctrl-C alike):
    every rank printed its own "stopped by SIGTERM" line, with only "the same command" to
    rerun. Now one line from lurker says where the checkpoints are and the exact command,
    which resumes the run and leaves no checkpoint behind. (The launcher's own
    SignalException traceback is torchrun's, which lurker cannot change.)"""
    (tmp_path / "slow_net.py").write_text(SLOW_NET)
    out = tmp_path / "run"
    args = [
        *("probe", str(tmp_path / "slow_net.py") + ":Net", "--data", "digits:test"),
        *("--image-size", "8", "--batch-size", "4", "--k", "3", "--out", str(out)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    job = subprocess.Popen(
        [*launch, "--nproc_per_node=2", "-m", "lurker.cli", *args],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    assert job.stderr is not None
    said = []
    for line in job.stderr:
        said.append(line)
        if "SWEEPING" in line:
            job.send_signal(signal.SIGTERM)
            break
    said += job.stderr.readlines()
    job.wait(timeout=120)
    ours = [line for line in said if line.startswith("lurker")]
    assert len(ours) == 1, "".join(said)
    assert "process 0 of 2 stopped by SIGTERM" in ours[0], ours
    assert str(out / "checkpoint-rank*.pt") in ours[0]
    assert not [line for line in said if line.startswith("[rank")], said
    assert "to resume: " in ours[0], ours
    command = ours[0].split("to resume: ", 1)[1].strip()
    want = ["torchrun", "--nproc_per_node=2", "--standalone", "-m", "lurker.cli", *args]
    assert shlex.split(command) == want
    done = subprocess.run(
        [*launch, *want[1:]], capture_output=True, text=True, env=env, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr
    run = lurker.Run.open(out)
    assert 0 < run.meta["sweep"]["resumed_from"] < 360  # digits:test, 360 images
    assert run.meta["sweep"]["resumed_from"] + run.meta["sweep"]["images"] == 360
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["run.db"]


def test_a_torchrun_worker_keeps_the_default_sigterm_before_the_sweep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before the sweep a worker waits in C++ (the rendezvous, a barrier while rank 0
    traces), where a Python handler would run only once the wait ends: under torchrun the
    launcher's SIGTERM keeps its default action (the process stops at once); elsewhere it
    stops the probe as Ctrl-C does."""
    import signal

    from lurker.probe.sweep import stops_on_sigterm

    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with stops_on_sigterm():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # what torchrun sets in its workers
    with stops_on_sigterm():
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


BLOCKING = '''
import os, time
from lurker.examples import DigitsNet


class Blocking(DigitsNet):
    """The digits' convnet, whose second batch of 20 (the sweep's; the trace feeds one
    image) waits until the test has signalled the launcher, so the signal always comes
    mid-sweep."""

    batches = 0

    def forward(self, x):
        Blocking.batches += x.shape[0] == 20
        flag = os.environ["LURKER_TEST_FLAG"]
        if Blocking.batches == 2 and not os.path.exists(flag):
            open(f"{flag}.ready{os.environ['RANK']}", "w").close()
            while not os.path.exists(flag):
                time.sleep(0.05)
        return super().forward(x)
'''


def _doc_block(marker: str) -> str:
    """The fenced block of docs/probe.md that holds ``marker``."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "probe.md").read_text()
    blocks = text.split("```")[1::2]
    (block,) = [b for b in blocks if marker in b]
    return block


def _wait_for(cond: Any, proc: subprocess.Popen, what: str) -> None:
    """Poll until ``cond()`` (a guard against hanging, not a timed assertion)."""
    import time

    for _ in range(2400):
        if cond():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"never saw {what}")


def test_sigterm_to_torchrun_prints_what_the_docs_show_and_the_run_resumes(
    tmp_path: Path,
) -> None:
    """SIGTERM to `torchrun --nproc_per_node 2 -m lurker.cli probe`: torchrun's launcher
    prints its own warnings and a SignalException traceback, which lurker cannot change;
    docs/probe.md shows exactly those lines and says the run is safe: the checkpoints are
    kept and the command lurker prints resumes them to a complete run."""
    (tmp_path / "blockmod.py").write_text(BLOCKING)
    flag, out, said = tmp_path / "go", tmp_path / "run", tmp_path / "said.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LURKER_TEST_FLAG": str(flag),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}  # fmt: skip
    probe_args = [
        *("probe", "blockmod:Blocking", "--data", "digits:test", "--image-size", "16"),
        *("--layers", "features.4", "--batch-size", "20", "--out", str(out)),
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    with said.open("w") as log:
        proc = subprocess.Popen(
            [*launcher, "--standalone", "--nproc_per_node=2", "-m", "lurker.cli", *probe_args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            start_new_session=True,
        )  # fmt: skip
        ready = [Path(f"{flag}.ready{r}") for r in (0, 1)]
        _wait_for(lambda: all(p.exists() for p in ready), proc, "both ranks sweeping")
        proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: said.read_text().count("closing signal SIGTERM") == 2, proc,
                  "torchrun passing the signal on")  # fmt: skip
        flag.touch()
        assert proc.wait(timeout=300) == 1
    text = said.read_text()
    shown = _doc_block("SignalException")
    for line in (
        "Received 15 death signal, shutting down workers",
        "closing signal SIGTERM",
        "lurker: process 0 of 2 stopped by SIGTERM after",
        "each process keeps",
        "Traceback (most recent call last):",
        "torch.distributed.elastic.multiprocessing.api.SignalException: Process",
        "got signal: 15",
    ):
        assert line in shown, line
        assert line in text, (line, text)
    assert text.index("lurker: process 0") < text.index("Traceback"), text
    assert text.count("lurker: process") == 1, text
    assert (out / "checkpoint-rank0.pt").exists() and (out / "checkpoint-rank1.pt").exists()
    # the command lurker printed resumes the run to its end
    command = shlex.split(text.split("to resume: ", 1)[1].splitlines()[0])
    assert command[:3] == ["torchrun", "--nproc_per_node=2", "--standalone"], command
    done = subprocess.run([*launcher, *command[1:]], capture_output=True, text=True, env=env,
                          cwd=tmp_path, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    with lurker.store.Run.open(out) as run:
        assert run.num_samples == 360 and run.meta["sweep"]["resumed_from"] > 0
    assert not list(out.glob("checkpoint*")), list(out.iterdir())  # merged and cleaned up


def test_a_dataset_made_again_differently_does_not_continue_the_statistics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dataset made by code (`--data file.py:fn`) is fingerprinted in the run's config:
    an interrupted probe resumed on a dataset whose fingerprint differs (an unseeded random
    one, same labels) starts from the first sample instead of mixing two datasets."""
    model = _model()
    for resumed, fingerprint in ((8, "A"), (0, "B")):
        out = tmp_path / f"cut{fingerprint}"
        meta = {"data_fingerprint": [{"item": 0, "sha256": "A"}]}
        with pytest.raises(KeyboardInterrupt):
            lurker.probe(
                model, Images(ctrl_c_at=6), out=out, k=3, batch_size=4, progress=False, meta=meta
            )
        meta = {"data_fingerprint": [{"item": 0, "sha256": fingerprint}]}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = lurker.probe(
                model, Images(), out=out, k=3, batch_size=4, progress=False, meta=meta
            )
        assert got.meta["sweep"]["resumed_from"] == resumed
        said = [str(w.message) for w in caught if "not resuming from" in str(w.message)]
        assert bool(said) == (resumed == 0)  # a restart says why
        assert all("the dataset differs" in m for m in said)


RESCALED_DATA = """
import signal
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

HERE = Path(__file__).parent


class Data(Dataset):
    '''12 fixed images, normalised by the scale in scale.txt (the user's own file: they
    change it between two runs); loading item 7 presses Ctrl-C once while `stop` exists.'''

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(12, 3, 8, 8, generator=g)
        self.y = torch.arange(12) % 3
        self.targets = self.y.tolist()
        self.scale = float((HERE / "scale.txt").read_text())

    def __len__(self):
        return 12

    def __getitem__(self, i):
        stop = HERE / "stop"
        if i == 7 and stop.exists():
            stop.unlink()
            signal.raise_signal(signal.SIGINT)
        return (self.x[i] - 0.5) / self.scale, int(self.y[i])


def make():
    return Data()


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3))
"""


@pytest.mark.parametrize("scale", ["0.25", "0.5"])
def test_a_resumed_code_dataset_whose_values_changed_starts_over(
    tmp_path: Path, scale: str
) -> None:
    """`lurker probe --data file.py:fn` interrupted, the file's normalisation changed
    (same shapes and labels, other float values), and the same command run again: the
    checkpoint was resumed, as the data key holds only a float item's exact parts, and the
    run silently mixed statistics of two datasets (caught only by `lurker serve`). Now the
    rerun says what changed and sweeps from the first sample, equal to an uninterrupted
    probe of the new data; the same data read again still resumes."""
    from click.testing import CliRunner

    from lurker.cli import main

    (tmp_path / "data.py").write_text(RESCALED_DATA)
    spec, data = f"{tmp_path / 'data.py'}:net", f"{tmp_path / 'data.py'}:make"

    def probe(out: Path) -> Any:
        args = ["probe", spec, "--data", data, "--out", str(out), "--k", "3"]
        return CliRunner().invoke(main, [*args, "--batch-size", "4", "--device", "cpu"])

    (tmp_path / "scale.txt").write_text(scale)
    whole = probe(tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    out = tmp_path / "cut"
    (tmp_path / "scale.txt").write_text("0.25")
    (tmp_path / "stop").touch()
    cut = probe(out)
    assert cut.exit_code == 130, cut.output
    assert torch.load(out / "checkpoint.pt", weights_only=True)["done"] == 8
    (tmp_path / "scale.txt").write_text(scale)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = probe(out)
    assert again.exit_code == 0, again.output
    told = " ".join(str(w.message) for w in caught)
    with lurker.Run.open(out) as got, lurker.Run.open(tmp_path / "whole") as want:
        changed = scale != "0.25"
        assert got.meta["sweep"]["resumed_from"] == (0 if changed else 8)
        assert _tops(got) == _tops(want)
    said = "item 0's input holds other values than when it was probed"
    assert (said in told) == changed, told
    if changed:
        assert "not resuming from" in told and "restore the dataset" in told


def test_the_fingerprints_of_one_dataset_read_twice_match_to_roundoff() -> None:
    """The resume's comparison of two fingerprints allows float roundoff (the same data
    computed again in another order) and nothing larger."""
    from torch.utils.data import TensorDataset

    from lurker.probe.data import fingerprint, fingerprints_differ

    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(5, dtype=torch.long)
    was = fingerprint(TensorDataset(x, y))
    assert fingerprints_differ(was, fingerprint(TensorDataset(x.clone(), y))) is None
    roundoff = x * (1 + 1e-7 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))
    assert fingerprints_differ(was, fingerprint(TensorDataset(roundoff, y))) is None
    why = fingerprints_differ(was, fingerprint(TensorDataset(x * 1.001, y)))
    assert why is not None and "input holds other values" in why
