"""A dataset of one's own, with no ``targets``: the probe reads each item once (it used to
read every item a second time, before the sweep, to learn the labels), and the labels it
collects as the sweep reads the items give the same classes, samples' labels, class means
and top lists as a brute force over forward hooks, also when the sweep is interrupted and
resumed and when two processes each meet some of the classes."""

from __future__ import annotations

import collections
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import dist_ranks
import lurker

N = 40


def _labels() -> list[int]:
    """Classes 0..2, and class 5 only at the last samples (odd ids: one rank's shard under
    two processes): met late in the sweep; classes 3 and 4 have no sample."""
    return [5 if i in (35, 37) else i % 3 for i in range(N)]


class Own(Dataset):
    """(image, label) items and no ``targets``; counts its reads per index. ``stop_at``:
    the item whose reading presses Ctrl-C, once."""

    def __init__(self, stop_at: int | None = None, classes: list[str] | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 3, 8, 8, generator=g)
        self.y = _labels()
        self.reads: collections.Counter[int] = collections.Counter()
        self.stop_at = stop_at
        if classes is not None:
            self.classes = classes

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.reads[i] += 1
        if i == self.stop_at:
            self.stop_at = None
            signal.raise_signal(signal.SIGINT)
        return self.x[i], self.y[i]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3)).eval()


KW: dict[str, Any] = {"k": 4, "batch_size": 8, "progress": False}


def _brute(model: nn.Module, ds: Own) -> dict[str, torch.Tensor]:
    """Each probed layer's per-sample spatial means and maxima, by forward hooks."""
    got: dict[str, torch.Tensor] = {}
    names = {model[0]: "0", model[1]: "1", model[2]: "2"}
    hooks = [
        m.register_forward_hook(lambda m, i, o: got.__setitem__(names[m], o.detach()))
        for m in names
    ]
    with torch.no_grad():
        model(ds.x)
    for h in hooks:
        h.remove()
    return got


def _check_against_brute_force(run: lurker.Run, ds: Own, names: list[str]) -> None:
    y = torch.tensor(ds.y)
    assert run.classes == names
    assert [s.label for s in run.samples(range(N))] == ds.y
    acts = _brute(_model(), ds)
    for layer in run.layers:
        out = acts[layer.name]
        means, peaks = out.mean((2, 3)).double(), out.amax((2, 3))
        for u in range(layer.num_units):
            unit = run.unit(layer.name, u)
            class_means = unit.class_mean_array()
            assert len(class_means) == len(names)
            for c in range(len(names)):
                if (y == c).any():
                    want = means[y == c, u].mean().item()
                    assert class_means[c] == pytest.approx(want, rel=1e-5, abs=1e-6)
                else:  # a class without samples (3, 4): no mean
                    assert class_means[c] != class_means[c]
            order = sorted(range(N), key=lambda i: (-peaks[i, u].item(), i))[: KW["k"]]
            top = unit.top("max")
            assert [e.sample_id for e in top] == order
            assert [e.class_name for e in top] == [names[ds.y[i]] for i in order]
            order = sorted(range(N), key=lambda i: (-means[i, u].item(), i))[: KW["k"]]
            assert [e.sample_id for e in unit.top("mean")] == order


def test_each_item_is_read_once_and_the_labels_read_give_the_brute_force_run(
    tmp_path: Path,
) -> None:
    ds = Own()
    run = lurker.probe(_model(), ds, out=tmp_path / "run", **KW)
    # item 0 is also read to trace the model; no item is read again to learn its label
    assert {i: n for i, n in ds.reads.items() if n != 1} == {0: 2}
    assert len(ds.reads) == N
    _check_against_brute_force(run, ds, ["0", "1", "2", "3", "4", "5"])


def test_class_names_that_name_every_label_are_kept(tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(7)]  # more names than labels met: all kept
    run = lurker.probe(_model(), Own(classes=names), out=tmp_path / "run", **KW)
    _check_against_brute_force(run, Own(), names)


@pytest.mark.parametrize(("stop_at", "done"), [(12, 16), (36, 40)])
def test_a_resumed_sweep_keeps_the_labels_read_before_the_interruption(
    tmp_path: Path, stop_at: int, done: int
) -> None:
    """Ctrl-C while an item of the 2nd (5th) batch loads: that batch is finished and
    checkpointed. The rerun reads only the items after the checkpoint, and the labels and
    classes read before it are kept (class 5, at 35 and 37, met before or after)."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        lurker.probe(_model(), Own(stop_at=stop_at), out=out, **KW)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["done"] == done
    again = Own()
    run = lurker.probe(_model(), again, out=out, **KW)
    assert run.meta["sweep"]["resumed_from"] == done
    assert sorted(again.reads) == [0, *range(done, N)]  # (0: the trace)
    _check_against_brute_force(run, again, ["0", "1", "2", "3", "4", "5"])


def _rank_worker(rank: int, out: str, bad: bool = False) -> None:
    lurker.probe(_model(), BadLabel() if bad else Own(), out=out, **KW)


def test_two_processes_merge_the_classes_each_met(tmp_path: Path) -> None:
    """Class 5 is only at odd ids, all in rank 1's shard: rank 0's statistics are widened
    to it before the ranks merge."""
    out = tmp_path / "run"
    dist_ranks.spawn(_rank_worker, str(out))
    run = lurker.Run.open(out)
    _check_against_brute_force(run, Own(), ["0", "1", "2", "3", "4", "5"])


class BadLabel(Own):
    """Item 21 (an odd id: rank 1's shard under two processes) has a regression target,
    after items 0..20 whose labels were read as classes 0..2."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        image, label = super().__getitem__(i)
        return image, (2.5 if i == 21 else label)


def _check_unlabelled(run: lurker.Run, ds: Own) -> None:
    """The run is unlabelled: no classes, no sample's label, no class means; the top lists
    and each unit's mean over every sample are the brute force's."""
    assert run.classes == []
    assert [s.label for s in run.samples(range(N))] == [None] * N
    assert run.meta["labels_ignored"]["item"] == 21
    assert run.meta["labels_ignored"]["reason"].startswith("dataset item 21 has the label 2.5")
    acts = _brute(_model(), ds)
    for layer in run.layers:
        out = acts[layer.name]
        means, peaks = out.mean((2, 3)).double(), out.amax((2, 3))
        for u in range(layer.num_units):
            unit = run.unit(layer.name, u)
            assert unit.class_mean_array().shape == (0,)
            assert unit.mean == pytest.approx(means[:, u].mean().item(), rel=1e-5, abs=1e-6)
            order = sorted(range(N), key=lambda i: (-peaks[i, u].item(), i))[: KW["k"]]
            top = unit.top("max")
            assert [e.sample_id for e in top] == order
            assert all(e.label is None and e.class_name is None for e in top)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_label_that_is_not_a_class_index_makes_the_whole_run_unlabelled(
    tmp_path: Path, workers: int
) -> None:
    """Met in the sweep (no pass over the labels first), in a DataLoader worker too: the
    classes read before item 21 (0..2) are dropped, not mixed with samples without one,
    and one warning, in this process, says why."""
    with pytest.warns(UserWarning, match=r"item 21 has the label 2\.5, not a class") as rec:
        run = lurker.probe(_model(), BadLabel(), out=tmp_path / "run", num_workers=workers, **KW)
    assert sum("not a class index" in str(w.message) for w in rec) == 1
    _check_unlabelled(run, Own())


def test_a_resumed_sweep_stays_unlabelled(tmp_path: Path) -> None:
    """Ctrl-C in the 4th batch, after item 21 made the run unlabelled: the rerun reads only
    items 32.. (classes 0..2 and 5 among them), and the run stays unlabelled, for the same
    reason, its checkpoint having kept the decision."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="item 21"):
        lurker.probe(_model(), BadLabel(stop_at=28), out=out, **KW)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["done"] == 32
    again = BadLabel()
    run = lurker.probe(_model(), again, out=out, **KW)
    assert run.meta["sweep"]["resumed_from"] == 32
    assert sorted(again.reads) == [0, *range(32, N)]  # (0: the trace)
    _check_unlabelled(run, Own())


def test_two_processes_agree_the_run_is_unlabelled(tmp_path: Path) -> None:
    """Item 21 is in rank 1's shard alone: rank 0, whose labels were all class indices,
    drops its classes too before the ranks merge."""
    out = tmp_path / "run"
    dist_ranks.spawn(_rank_worker, str(out), True)
    _check_unlabelled(lurker.Run.open(out), Own())
