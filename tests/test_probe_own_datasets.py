"""Probing with one's own data pipeline: labels that are not class indices, loaders and
iterable datasets, and an item that raises are said in one paragraph, never as a silently
wrong class or a traceback from deep inside a DataLoader, and the work before is kept."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
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


def _hooked_top(layer: int, unit: int, k: int = 3) -> list[int]:
    """The oracle: the k samples whose unit's spatial max is greatest, read by a forward
    hook on the model's layer over each sample alone (ties by sample id)."""
    model, got = _model(), []
    model[layer].register_forward_hook(lambda m, i, o: got.append(o[0, unit].amax().item()))
    with torch.no_grad():
        for x in X:
            model(x[None])
    return sorted(range(len(X)), key=lambda i: (-got[i], i))[:k]


# a 0-d numpy array is what y[i].numpy() gives; int() truncated it, and a Fraction
@pytest.mark.parametrize(
    ("label", "said"),
    [
        (2.5, r"the label 2\.5"),  # a regression target
        (torch.tensor(0.5), r"the label 0\.5"),
        (np.array(2.5), r"the label 2\.5"),
        (np.array([0.7]), r"the label 0\.7"),
        (Fraction(5, 2), r"the label Fraction\(5, 2\)"),
        (torch.tensor([0.0, 1.0, 1.0]), r"a label of shape \(3,\)"),  # multi-label, one-hot
        (torch.zeros(8, 8, dtype=torch.long), r"a label of shape \(8, 8\)"),  # a mask
        ("cat", r"the label 'cat'"),  # a name
    ],
)
@pytest.mark.parametrize("workers", [0, 1])
def test_labels_that_are_not_class_indices_are_probed_unlabelled(
    tmp_path: Path, label: Any, said: str, workers: int
):
    """A regression, multi-label or segmentation model's data is probed: top samples as a
    forward hook finds them, no classes, one warning (in this process, also where the items
    are read in DataLoader workers) naming the first item and what the probe does, and the
    reason kept in the run's meta (what the explorer shows)."""
    with pytest.warns(UserWarning, match=rf"item 0 has {said}, not a class index") as rec:
        run = _probe(_Items([label] * len(X)), tmp_path / "run", num_workers=workers)
    said_once = [w for w in rec if "not a class index" in str(w.message)]
    assert len(said_once) == 1
    assert "no per-class statistics" in str(said_once[0].message)
    assert "(input, class index)" in str(said_once[0].message)
    assert run.classes == [] and run.unit("1", 1).class_means() == {}
    assert run.meta["labels_ignored"]["item"] == 0
    assert "not a class index" in run.meta["labels_ignored"]["reason"]
    assert [e.sample_id for e in run.unit("1", 1).top("max")] == _hooked_top(1, 1)
    assert all(e.label is None for e in run.unit("1", 1).top("max"))


def test_whole_float_labels_are_classes_and_the_run_says_none_ignored(tmp_path: Path):
    run = _probe(_Items([float(v) for v in Y]), tmp_path / "whole")  # 1.0: class 1
    oracle = torch.relu(_model()[0](X)).mean((2, 3))[:, 0]
    means = run.unit("1", 0).class_means()
    for c in range(3):
        assert means[str(c)] == pytest.approx(oracle[Y.eq(c)].mean().item(), rel=1e-5)
    assert run.meta["labels_ignored"] is None


@pytest.mark.parametrize(("targets", "workers"), [(False, 0), (False, 1), (True, 0)])
def test_a_label_below_minus_one_is_said_and_kept_out_of_class_statistics(
    tmp_path: Path, targets: bool, workers: int
):
    """-2 is no class: its sample is unlabelled (as -1 is), but said in a warning rather
    than silently; the class means are numpy's over the other samples of each class."""
    labels = Y.tolist()
    labels[5] = -2
    ds = _Items(labels)
    if targets:
        ds.targets = labels
    with pytest.warns(UserWarning, match=r"item 5 has the label -2: a negative label is no class"):
        run = _probe(ds, tmp_path / "run", num_workers=workers)
    oracle = torch.relu(_model()[0](X)).mean((2, 3))[:, 0].detach().numpy()
    y = np.array(labels)
    means = run.unit("1", 0).class_means()
    assert run.classes == ["0", "1", "2"]
    for c in range(3):
        assert means[str(c)] == pytest.approx(oracle[y == c].mean(), rel=1e-5)
    assert run.sample(5).label is None and run.sample(6).label == int(Y[6])


@pytest.mark.parametrize("targets", [False, True])
def test_whole_number_targets_that_look_like_regression_are_said(tmp_path: Path, targets: bool):
    """Whole-number regression targets (151.0, 75.0) cannot be told from class ids, but 48
    samples each with its own label are no classifier's data: the probe warns, once."""
    y = torch.arange(len(X), dtype=torch.float32) + 100
    ds = TensorDataset(X, y) if targets else _Items(y.tolist())
    with pytest.warns(UserWarning, match=r"48 of the dataset's 48 samples .*regression") as rec:
        _probe(ds, tmp_path / "run")
    assert sum("look like regression" in str(w.message) for w in rec) == 1


class _Dicts(Dataset):
    def __len__(self) -> int:
        return len(X)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": X[i], "label": int(Y[i])}


class _Arrays(_Dicts):
    def __getitem__(self, i: int) -> tuple[Any, int]:  # type: ignore[override]
        return X[i].numpy(), int(Y[i])


def test_dict_items_are_refused_naming_their_keys_and_numpy_items_probed(tmp_path: Path):
    """A dict item is refused naming its keys and how to return (input, label), not told
    to add ToTensor (which does not help a dict); numpy arrays are taken as tensors."""
    with pytest.raises(LurkerError, match=r"item 0 is a dict \(keys 'image', 'label'\).*return"):
        _probe(_Dicts(), tmp_path / "dicts")
    run = _probe(_Arrays(), tmp_path / "arrays")
    assert [e.sample_id for e in run.unit("1", 1).top("max")] == _hooked_top(1, 1)
    assert run.classes == ["0", "1", "2"]


class _Stream(IterableDataset):
    def __iter__(self):
        yield from zip(X, Y.tolist())


def test_a_dataloader_or_an_iterable_dataset_is_refused_naming_the_fix(tmp_path: Path):
    with pytest.raises(LurkerError, match=r"DataLoader.*loader\.dataset"):
        _probe(DataLoader(TensorDataset(X, Y), batch_size=8), tmp_path / "a")
    with pytest.raises(LurkerError, match=r"_Stream\) is not a map-style dataset"):
        _probe(_Stream(), tmp_path / "b")


def test_a_bare_tensor_or_array_is_refused_naming_tensor_dataset(tmp_path: Path):
    """A tensor (or numpy array) of inputs has __len__ and __getitem__, but its rows are no
    (input, label) items: it raised a TypeError from deep in the wrapper (its mean() method
    read as normalisation statistics). Now refused naming TensorDataset, before anything
    is written; the TensorDataset it names is probed. It read "got a ndarray" and said a
    row "is neither" input nor label, though an input alone is an item: now it names the
    array in English and says why it is not read as one."""
    for given, what in ((X, "tensor"), (X.numpy(), "numpy array")):
        out = tmp_path / type(given).__name__
        with pytest.raises(
            LurkerError, match=r"of shape \(48, 1, 8, 8\).*TensorDataset\(inputs"
        ) as e:
            _probe(given, out)
        said = str(e.value)
        assert said.startswith(f"got a {what} of shape (48, 1, 8, 8) where a dataset is expected")
        assert f"a bare {what} holds no labels" in said and "neither" not in said
        assert "`TensorDataset(inputs)` for unlabelled inputs" in said
        assert not out.exists()
    run = _probe(TensorDataset(X), tmp_path / "wrapped")
    assert [e.sample_id for e in run.unit("1", 1).top("max")] == _hooked_top(1, 1)


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


def test_an_item_without_targets_that_raises_is_named_and_the_batches_before_it_kept(
    tmp_path: Path,
):
    """No targets: the labels are read with the items by the sweep (no pass of its own
    before it), so the item is named there and the rerun resumes with the labels read."""
    out = tmp_path / "run"
    with pytest.raises(LurkerError, match=r"item 21 raised ValueError.*16 samples swept before"):
        _probe(_Items(Y.tolist(), bad=21), out)
    run = _probe(_Items(Y.tolist()), out)
    assert run.meta["sweep"]["resumed_from"] == 16
    assert [s.label for s in run.samples(range(len(X)))] == Y.tolist()


class _FailsInWorkers(_Items):
    """An item that raises only in a DataLoader worker (a file handle opened before the
    fork, say): read again in the main process, it loads."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        if i == 21 and torch.utils.data.get_worker_info() is not None:
            raise ValueError("stale handle for record 21")
        return super().__getitem__(i)


def test_an_item_that_raises_only_in_a_worker_is_said_with_its_own_error(tmp_path: Path):
    """torch re-raises a worker's error as "Caught ValueError in DataLoader worker process
    0." with the traceback as text: the message says the dataset's own error and line."""
    with pytest.raises(LurkerError) as e:
        _probe(_FailsInWorkers(Y.tolist(), targets=True), tmp_path / "run", num_workers=1)
    said = str(e.value)
    assert "items 16..23 in a DataLoader worker" in said
    line = _FailsInWorkers.__getitem__.__code__.co_firstlineno + 2
    assert (
        f"raised ValueError: stale handle for record 21 (at {Path(__file__).name}:{line})" in said
    )
    assert "Caught" not in said and "Traceback" not in said
    assert "The 16 samples swept before it are saved" in said


class _MixedShapes(_Items):
    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        x, y = super().__getitem__(i)
        return (x[:, :6] if i == 19 else x), y


def test_lurkers_own_error_from_a_worker_is_its_paragraph_not_the_workers_traceback(
    tmp_path: Path,
):
    """Images of two shapes in one batch are refused while the worker collates it: the
    message is the same paragraph as without workers."""
    ds = _MixedShapes(Y.tolist(), targets=True)
    with pytest.raises(LurkerError) as plain:
        _probe(ds, tmp_path / "a")
    with pytest.raises(LurkerError) as worker:
        _probe(ds, tmp_path / "b", num_workers=1)
    assert str(plain.value).startswith("dataset items 16 and 19 have images of shapes")
    assert str(worker.value) == str(plain.value)
