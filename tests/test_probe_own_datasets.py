"""Probing with one's own data pipeline: labels that are not class indices, loaders and
iterable datasets, and an item that raises are said in one paragraph, never as a silently
wrong class or a traceback from deep inside a DataLoader, and the work before is kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import lurker
from lurker.errors import LurkerError

torch.manual_seed(0)
X = torch.rand(48, 1, 8, 8)
Y = torch.arange(48) % 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()


class _Items(Dataset):
    """(input, label) pairs with labels as given; ``bad`` raises on reading that index."""

    def __init__(self, labels: list[Any], bad: int | None = None, targets: bool = False):
        self.labels, self.bad = labels, bad
        if targets:
            self.targets = [int(v) for v in Y]

    def __len__(self) -> int:
        return len(X)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        if i == self.bad:
            raise ValueError(f"corrupt record {i}")
        return X[i], self.labels[i]


def _probe(ds: Any, out: Path, **kw: Any) -> lurker.Run:
    return lurker.probe(_model(), ds, out=out, k=3, batch_size=8, progress=False, **kw)


@pytest.mark.parametrize("label", [2.5, torch.tensor(0.7)])
def test_a_fractional_label_is_refused_not_truncated_to_a_class(tmp_path: Path, label: Any):
    labels: list[Any] = [label] * len(X)
    with pytest.raises(LurkerError, match=r"item 0 has the label .*not a class index"):
        _probe(_Items(labels), tmp_path / "run")
    run = _probe(_Items([float(v) for v in Y]), tmp_path / "whole")  # 1.0: class 1
    oracle = torch.relu(_model()[0](X)).mean((2, 3))[:, 0]
    means = run.unit("1", 0).class_means()
    for c in range(3):
        assert means[str(c)] == pytest.approx(oracle[Y.eq(c)].mean().item(), rel=1e-5)


class _Stream(IterableDataset):
    def __iter__(self):
        yield from zip(X, Y.tolist())


def test_a_dataloader_or_an_iterable_dataset_is_refused_naming_the_fix(tmp_path: Path):
    with pytest.raises(LurkerError, match=r"DataLoader.*loader\.dataset"):
        _probe(DataLoader(TensorDataset(X, Y), batch_size=8), tmp_path / "a")
    with pytest.raises(LurkerError, match=r"_Stream\) is not a map-style dataset"):
        _probe(_Stream(), tmp_path / "b")


@pytest.mark.parametrize("workers", [0, 1])
def test_an_item_that_raises_is_named_and_the_batches_before_it_kept(tmp_path: Path, workers: int):
    out = tmp_path / "run"
    bad = _Items(Y.tolist(), bad=21, targets=True)  # targets: no pass over the labels first
    with pytest.raises(LurkerError, match=r"item 21 raised ValueError: corrupt record 21") as e:
        _probe(bad, out, num_workers=workers)
    assert "The 16 samples swept before it are saved" in str(e.value)
    assert isinstance(e.value.__cause__, ValueError)  # the dataset's own traceback
    run = _probe(_Items(Y.tolist(), targets=True), out, num_workers=workers)  # fixed: resumes
    assert run.meta["sweep"]["resumed_from"] == 16
    oracle = _model()[:2](X).amax((2, 3))[:, 1]
    top = [e.sample_id for e in run.unit("1", 1).top("max")]
    assert top == sorted(range(len(X)), key=lambda i: (-oracle[i].item(), i))[:3]


def test_an_item_that_raises_while_labels_are_read_is_named(tmp_path: Path):
    with pytest.raises(LurkerError, match=r"item 5 raised ValueError.*nothing was swept"):
        _probe(_Items(Y.tolist(), bad=5), tmp_path / "run")
