"""Datasets for the probe: every item is ``(image, label, sample_id)``.

The probe keeps top-k lists of *sample ids*, and the explorer later shows those samples
again, so the contract is simple and stable: ``sample_id`` is the item's index in the
dataset object, i.e. ``dataset[sample_id]`` gives the same sample back. Each dataset also
carries what the explorer needs to show "the input as the model saw it": ``class_names``,
``paths`` (image files, or None for in-memory data), and the ``mean``/``std`` it was
normalised with.

Image folders are read defensively: a corrupt or truncated file must not abort an hours-long
sweep. Bad files are dropped up front (a cheap parallel header check) and, if one still fails
to decode later, ``__getitem__`` returns a :class:`Skipped` marker that :func:`collate`
drops. Failures are logged to a small file shared with DataLoader workers, so
``dataset.skipped`` in the main process lists them whatever ``num_workers`` was.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
import os
import re
import tempfile
import warnings
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from ..errors import DataSpecError, LurkerError, warn
from ..specs import absolute_spec

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NOT_A_CLASS",
    "DigitsDataset",
    "ImageFolderDataset",
    "ProbeDataset",
    "Skipped",
    "WrappedDataset",
    "collate",
    "convert_image",
    "default_normalize",
    "denormalize",
    "digits",
    "image_folder",
    "code_dataset",
    "code_spec_file",
    "fingerprint",
    "fingerprint_differs",
    "fingerprints_differ",
    "input_image",
    "is_code_spec",
    "load_dataset",
    "load_run_dataset",
    "normalize_stats",
    "parse_normalize",
    "pil_to_tensor",
    "recorded_normalize",
    "to_pil",
    "transparency_note",
    "wrap",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: The label an item carries where its own label is not a class index (a regression target
#: with a fraction, a one-hot or multi-label vector, a mask, a name). Items may be read in
#: DataLoader workers, whose state never reaches the run: the label travels in the batch,
#: and the sweep (in the main process) decides there that the run is unlabelled. Negative,
#: so that whatever reads it as a label takes it as "no class".
NOT_A_CLASS: int = torch.iinfo(torch.int64).min

_LAYOUT = "root/<class_name>/<image>.jpg (one sub-folder per class, images inside)"


@runtime_checkable
class ProbeDataset(Protocol):
    """What the probe and the explorer need from a dataset.

    ``__getitem__(i)`` returns ``(image CxHxW float, label int, sample_id int)`` with
    ``sample_id == i`` (label -1 if unlabelled, :data:`NOT_A_CLASS` where the item's label
    is no class index), or a :class:`Skipped` marker for an unreadable item, which
    :func:`collate` drops.
    """

    class_names: list[str]
    paths: list[str] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, int, int] | Skipped: ...

    @property
    def skipped(self) -> list[tuple[str, str]]: ...

    def first_image(self) -> Tensor: ...

    def sample_rows(self) -> list[tuple[int, str | None, int | None, int]]: ...


@dataclass(frozen=True, slots=True)
class Skipped:
    """Marker for an item that could not be read; :func:`collate` drops it.

    ``shape`` is the image shape a good item would have had, so that a batch made only of
    skipped items still collates to a correctly shaped empty tensor.
    """

    sample_id: int
    path: str
    reason: str
    shape: tuple[int, ...] | None = None


def collate(batch: Sequence[tuple[Tensor, int, int] | Skipped]) -> tuple[Tensor, Tensor, Tensor]:
    """Stack a list of items into ``(images, labels, ids)``, dropping :class:`Skipped` ones.

    Use as ``DataLoader(..., collate_fn=collate)``. If every item was skipped the result
    has batch size 0 (``images`` shaped ``(0, C, H, W)`` when the shape is known).
    """
    good = [b for b in batch if not isinstance(b, Skipped)]
    if not good:
        shape = next((b.shape for b in batch if isinstance(b, Skipped) and b.shape), ())
        none = torch.empty(0, dtype=torch.long)
        return torch.empty((0, *shape)), none, none.clone()
    try:
        images = torch.stack([b[0] for b in good])
    except RuntimeError:
        _refuse_mixed_shapes(good)
        raise
    labels = torch.tensor([int(b[1]) for b in good], dtype=torch.long)
    ids = torch.tensor([int(b[2]) for b in good], dtype=torch.long)
    return images, labels, ids


def _refuse_mixed_shapes(items: Sequence[tuple[Tensor, int, int]]) -> None:
    """Name two items of a batch whose images differ in shape, and the fix (torch.stack's
    own error names neither the samples nor what to do)."""
    first: dict[tuple[int, ...], int] = {}
    for image, _, sample_id in items:
        first.setdefault(tuple(image.shape), int(sample_id))
    if len(first) > 1:
        (a, i), (b, j) = list(first.items())[:2]
        raise LurkerError(
            f"dataset items {i} and {j} have images of shapes {a} and {b}: the probe stacks "
            "each batch into one tensor, so every image must have the same shape. Give the "
            "dataset a transform that makes one size (e.g. Resize(s) then CenterCrop(s), or "
            "Resize((h, w)))."
        ) from None


class _Base(Dataset):
    """What every dataset of this module shares (see :class:`ProbeDataset`)."""

    class_names: list[str]
    paths: list[str] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, int, int] | Skipped:
        raise NotImplementedError

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Unreadable items as ``(path, reason)``; none for in-memory data."""
        return []

    @property
    def transparent(self) -> list[str] | None:
        """Files loaded so far whose transparency :func:`convert_image` dropped (see
        :func:`has_transparency`); None where nothing checks (in-memory data, a wrapped
        dataset, which decodes its files itself)."""
        return None

    def labels_list(self) -> list[int] | None:
        """Every item's label without loading images, or None if that is not cheap."""
        return None

    def source_indices(self) -> list[int]:
        """Each item's index in the underlying data (default: the sample id)."""
        return list(range(len(self)))

    def first_image(self) -> Tensor:
        """The first readable image: the example input the model is traced with."""
        for i in range(len(self)):
            item = self[i]
            if not isinstance(item, Skipped):
                return item[0]
        why = "; ".join(f"{p}: {r}" for p, r in self.skipped[:3])
        raise LurkerError(f"no readable image in {self.description}" + (f" ({why})" if why else ""))

    def sample_rows(self) -> list[tuple[int, str | None, int | None, int]]:
        """``(id, path, label, source_index)`` per item, for ``RunWriter.add_samples``.

        Labels are None where the dataset cannot tell them without loading every image.
        """
        labels = self.labels_list()
        paths, source = self.paths, self.source_indices()
        return [
            (
                i,
                None if paths is None else paths[i],
                None if labels is None or labels[i] < 0 else labels[i],
                source[i],
            )
            for i in range(len(self))
        ]


#: The reason the log gives a file whose transparency was dropped (not an unreadable file).
_TRANSPARENT = "<transparency dropped>"


class _SkipLog:
    """A small file shared with DataLoader workers where unreadable files are listed (and,
    for image folders, files whose transparency was dropped), so that ``dataset.skipped``
    (``dataset.transparent``) in the main process sees them whatever ``num_workers`` was."""

    _log: str

    def _open_log(self) -> None:
        fd, self._log = tempfile.mkstemp(prefix="lurker-skipped-", suffix=".tsv")
        os.close(fd)
        self._finalizer = weakref.finalize(self, _remove_log, self._log, os.getpid())

    def _record(self, path: str, reason: str) -> None:
        line = f"{path}\t{reason}".replace("\n", " ") + "\n"
        with contextlib.suppress(OSError), open(self._log, "a", encoding="utf-8") as f:
            f.write(line)  # one short append: atomic enough between processes

    def _logged(
        self, found: Sequence[tuple[str, str]] = (), *, transparent: bool = False
    ) -> list[tuple[str, str]]:
        """The logged rows, once per path: unreadable files, or with ``transparent`` the
        files whose transparency was dropped (logged with the reason ``_TRANSPARENT``)."""
        rows = list(found)
        with contextlib.suppress(OSError), open(self._log, encoding="utf-8") as f:
            for line in f:
                path, _, reason = line.rstrip("\n").partition("\t")
                if (reason == _TRANSPARENT) == transparent:
                    rows.append((path, reason))
        seen: set[str] = set()
        unique = []
        for path, reason in rows:
            if path not in seen:
                seen.add(path)
                unique.append((path, reason))
        return unique

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_finalizer", None)  # workers must never delete the shared log
        return state


# --------------------------------------------------------------------------- wrap


class WrappedDataset(_SkipLog, _Base):
    """Any ``(image, label)`` (or image-only) dataset, also returning the index as sample id.

    A file-backed dataset (one with ``samples``, like torchvision's ``ImageFolder``) whose
    file cannot be read gives a :class:`Skipped` item, listed in ``skipped``, instead of
    aborting the sweep; an error its transform raises on a readable file still raises.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.dataset = dataset
        classes = getattr(dataset, "classes", None)
        self.class_names: list[str] = [str(c) for c in classes] if classes is not None else []
        # a tabular dataset's column names (sklearn's ``feature_names``): the explorer
        # names each value of a feature vector by them
        self.feature_names: list[str] | None = _names_list(getattr(dataset, "feature_names", None))
        # a signal dataset's channel names (EEG electrodes): the explorer labels lanes so
        self.channel_names: list[str] | None = _names_list(getattr(dataset, "channel_names", None))
        # a signal dataset's sampling rate in Hz, as given: the probe checks it (signals only)
        self.sample_rate: object = getattr(dataset, "sample_rate", None)
        samples = getattr(dataset, "samples", None) or getattr(dataset, "imgs", None)
        self.paths: list[str] | None = (
            [str(s[0]) for s in samples] if isinstance(samples, list) else None
        )
        found_mean, found_std = _find_normalize(dataset)
        self.mean: tuple[float, ...] = tuple(mean if mean is not None else found_mean)
        self.std: tuple[float, ...] = tuple(std if std is not None else found_std)
        root = getattr(dataset, "root", None)
        self.description = type(dataset).__name__ + (f"({root})" if root is not None else "")
        self._shape: tuple[int, ...] | None = None
        #: why the labels of ``targets`` are not used as classes (None: they are class
        #: indices, or there are none): ``{"item", "reason"}``, which the run records. Labels
        #: read from the items are decided by the sweep instead (see :data:`NOT_A_CLASS`).
        self.labels_ignored: dict[str, Any] | None = None
        self._negative_said = self._regression_said = False
        if self.paths is not None:
            self._open_log()

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Files that could not be read, as ``(path, reason)``."""
        return self._logged() if self.paths is not None else []

    def __getitem__(self, index: int) -> tuple[Tensor, int, int] | Skipped:
        try:
            item = self.dataset[index]
        except Exception as e:
            skipped = self._unreadable(index, e)
            if skipped is None:
                raise
            return skipped
        if isinstance(item, Mapping):
            keys = ", ".join(repr(k) for k in list(item)[:6])
            raise LurkerError(
                f"dataset item {index} is a dict (keys {keys}), not an (input, label) pair: the "
                "probe reads items as (input tensor, class index), or (input,) unlabelled. Make "
                "__getitem__ return a tuple of them, e.g. `return d['image'], d['label']`."
            )
        if isinstance(item, (tuple, list)):
            image, label = item[0], (_class_or_not(item[1]) if len(item) > 1 else -1)
        else:
            image, label = item, -1
        if isinstance(image, Image.Image):
            image = pil_to_tensor(image)
        elif isinstance(image, np.ndarray) and image.dtype.kind in "biuf":
            image = torch.as_tensor(image)  # (as a DataLoader's collate takes it)
        if not isinstance(image, Tensor):
            raise LurkerError(
                f"dataset item {index} is a {type(image).__name__}, not an input tensor; "
                "give the dataset a transform that ends with ToTensor() (images), or return "
                "torch.as_tensor(x) from __getitem__."
            )
        self._shape = tuple(image.shape)
        return image, label, index

    def label_shown(self, index: int) -> str:
        """Item ``index``'s label as a message names it ("the label 2.5", "a label of shape
        (3,)"), read again here: the sweep met it as :data:`NOT_A_CLASS` in a batch, perhaps
        read in a DataLoader worker, and says it once, in this process."""
        try:
            item = self.dataset[index]
            return _shown(item[1])
        except Exception:  # (read once already: a flaky read is no reason to fail the run)
            return "a label"

    def _ignore(self, index: int, shown: str) -> None:
        """Probe unlabelled: the label of ``targets[index]`` is not a class index."""
        self.labels_ignored = labels_ignored(index, shown)

    def _negative(self, index: int, label: int) -> None:
        """Warn (once) that a label below -1 is stored as no label (see :func:`say_negative`)."""
        if not self._negative_said:
            self._negative_said = True
            say_negative(index, label)

    def _unreadable(self, index: int, error: Exception) -> Skipped | None:
        """A :class:`Skipped` item when the item's file itself cannot be read (the
        dataset's own loader fails on it too), else None: the error is not the file's."""
        if self.paths is None or not -len(self.paths) <= index < len(self.paths):
            return None
        path = self.paths[index]
        loader = getattr(self.dataset, "loader", None)
        try:
            if callable(loader):
                loader(path)
            else:
                _load_image(path, "RGB")
        except Exception:
            reason = _reason(error)
            self._record(path, reason)
            return Skipped(index % len(self), path, reason, self._shape)
        return None

    def labels_list(self) -> list[int] | None:
        """The labels the items carry, from ``targets`` without loading images: through the
        dataset's ``target_transform`` where it has one (torchvision applies it to
        ``targets`` in ``__getitem__``), so the run's samples and classes name the labels
        its class statistics are kept by."""
        targets = getattr(self.dataset, "targets", None)
        if targets is None and isinstance(self.dataset, TensorDataset):
            tensors = self.dataset.tensors
            targets = tensors[1] if len(tensors) > 1 else None
        if targets is None or len(targets) != len(self):
            return None
        if self.labels_ignored is not None:
            return [-1] * len(self)
        transform = getattr(self.dataset, "target_transform", None)
        labels = []
        for i, target in enumerate(targets):
            label = transform(target) if callable(transform) else target
            cls = _as_class(label)
            if cls is None:  # every label is read here: no sample was given a class yet
                self._ignore(i, _shown(label))
                return [-1] * len(self)
            if cls < -1:
                self._negative(i, cls)
            labels.append(max(cls, -1))
        if not self._regression_said:
            self._regression_said = warn_if_regression(labels, self.class_names)
        return labels


def _names_list(names: Any) -> list[str] | None:
    """A dataset's ``feature_names`` as a list of strings where it is a list, tuple or
    array of names (sklearn's kind); anything else (a method, a string, a number) is not
    such a list and is ignored rather than failing the wrap of an unrelated dataset."""
    if hasattr(names, "tolist") and not isinstance(names, (str, bytes)):
        names = names.tolist()
    if not isinstance(names, (list, tuple)):
        return None
    return [str(n) for n in names]


def _integral(label: Any) -> int:
    """``label`` as an int, or ValueError where it is a number with a fraction: ``int()``
    alone truncates a regression target (2.7 -> class 2), so class statistics would be
    kept, silently, by classes the data does not have. Whole floats (1.0) are class ids.

    Every number kind is checked, not only ``float``: a one-value tensor or numpy array
    (``y[i].numpy()`` is a 0-d array) by the number it holds, and a ``Decimal`` or
    ``Fraction`` by its value; a complex number is no class index."""
    if isinstance(label, (Tensor, np.ndarray)) and _size(label) == 1:
        label = label.item()
    if isinstance(label, (str, bytes, Tensor, np.ndarray)):  # int() says what it takes
        return int(label)
    try:
        return operator.index(label)  # int, bool, numpy integers
    except TypeError:
        pass
    value = float(label)  # TypeError for what is not a real number
    if not value.is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    return int(value)


def _size(array: Tensor | np.ndarray) -> int:
    return array.numel() if isinstance(array, Tensor) else array.size


def _as_class(label: Any) -> int | None:
    """``label`` as a class index, or None where it is none: a number with a fraction
    (``int`` would turn a regression target such as ``2.5`` into class 2), a vector
    (one-hot, multi-label), a mask, a name (``"cat"``; ``"3"`` is class 3, as a CSV gives
    ids). Whole floats (``3.0``) are class indices."""
    try:
        return _integral(label)
    except (TypeError, ValueError, RuntimeError):
        return None


def _class_or_not(label: Any) -> int:
    """An item's label as the batch carries it: its class index, or :data:`NOT_A_CLASS`."""
    cls = _as_class(label)
    return NOT_A_CLASS if cls is None else cls


def _shown(label: Any) -> str:
    """A label as a message names it ("the label 2.5"); an array of more than one value
    (one-hot, a mask) by its shape."""
    if isinstance(label, (Tensor, np.ndarray)) and _size(label) != 1:
        return f"a label of shape {tuple(label.shape)}"
    return f"the label {_plain(label)!r}"


def labels_ignored(index: int, shown: str) -> dict[str, Any]:
    """Say (one warning) that the dataset is probed unlabelled because item ``index``'s
    label (``shown``) is not a class index, and return the run's ``labels_ignored`` meta.
    Not refused: a regression, multi-label or segmentation model's top samples, histograms
    and gradients need no labels."""
    reason = (
        f"dataset item {index} has {shown}, not a class index (regression targets with "
        "fractions, one-hot and multi-label vectors, masks and names are not)"
    )
    warn(
        f"probe: {reason}: the dataset is probed unlabelled, so the run has top samples, "
        "histograms and gradients but no per-class statistics. For those, give items "
        "as (input, class index)."
    )
    return {"item": index, "reason": reason}


def say_negative(index: int, label: int) -> None:
    """Warn that a label below -1 is stored as no label. Not refused: negative labels mark
    unlabelled samples by convention (-1, and -100, CrossEntropyLoss's ignore_index), so a
    dataset that uses one is probed; but no class can have it, so the sample is kept out of
    the class statistics, said rather than silently."""
    warn(
        f"probe: dataset item {index} has the label {label}: a negative label is no "
        "class (class indices are 0, 1, ...), so its samples are probed unlabelled, "
        "outside the per-class statistics. If it is a class, shift the labels to "
        "start at 0."
    )


#: Fewer samples than this are not checked for labels that look like regression targets:
#: a small dataset may well hold one sample per class.
_REGRESSION_CHECK_MIN = 20


def warn_if_regression(labels: Sequence[int], class_names: Sequence[str]) -> bool:
    """Warn where whole-number labels look like regression targets (151.0, 75.0: they
    cannot be told from class ids): more than half the samples each with a label no other
    has, which a classifier's data (many samples per class) does not have. A dataset that
    names classes for every label is a classifier's, and is not warned about; unlabelled
    samples (-1) are not counted. True: warned."""
    labelled = [v for v in labels if v >= 0]
    n = len(labelled)
    if n < _REGRESSION_CHECK_MIN or (class_names and max(labelled) < len(class_names)):
        return False
    once = sum(1 for c in Counter(labelled).values() if c == 1)
    if once > n / 2:
        warn(
            f"probe: {once} of the dataset's {n} samples each have a label no other sample "
            f"has (labels {min(labelled)} to {max(labelled)}): these look like regression "
            "targets, not class indices, and the run keeps per-class statistics by them. To "
            "probe a regression model unlabelled, give items as (input,)."
        )
        return True
    return False


def _plain(label: Any) -> Any:
    """A one-value tensor or numpy scalar as the Python number it holds, for messages."""
    if (isinstance(label, (Tensor, np.ndarray)) and _size(label) == 1) or isinstance(
        label, np.generic
    ):
        return label.item()
    return label


def _find_normalize(dataset: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean/std of the dataset: its own attributes, a Normalize in its transform, or 0/1.
    Attributes that are no numbers (a DataFrame subclass's ``mean()``/``std()`` methods)
    are not normalisation numbers: they are passed over, not called or crashed on."""
    mean = _numbers(getattr(dataset, "mean", None))
    std = _numbers(getattr(dataset, "std", None))
    if mean is not None and std is not None:
        return mean, std
    from torchvision import transforms

    transform = getattr(dataset, "transform", None)
    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, transforms.Normalize):
            return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    return (0.0,), (1.0,)


def _numbers(value: Any) -> tuple[float, ...] | None:
    """``value`` as per-channel numbers where it is a number or a sequence of them (a list,
    a tuple, an array or tensor of one axis that is not 1, such as ``(3, 1, 1)``), else None
    (a method, a string, a table)."""
    if isinstance(value, (Tensor, np.ndarray)):
        if value.dtype == torch.bool or value.dtype == np.bool_ or value.size == 0:
            return None
        if sum(int(n) > 1 for n in value.shape) > 1:  # a table, not one value per channel
            return None
        value = value.reshape(-1).tolist()
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return (float(value),)
    if not isinstance(value, (list, tuple)) or not value:
        return None
    if not all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in value):
        return None
    return tuple(float(v) for v in value)


def wrap(
    dataset: Any, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> ProbeDataset:
    """Make ``dataset`` a :class:`ProbeDataset` (datasets of this module pass through).

    ``mean``/``std`` (how its images were normalised) default to the dataset's own
    ``mean``/``std`` attributes, else a ``Normalize`` in its ``transform``, else 0 and 1.
    """
    if isinstance(dataset, _Base):
        return dataset
    _refuse_unindexed(dataset)
    return WrappedDataset(dataset, mean=mean, std=std)


#: how to fix what a ``--data file.py:fn`` spec gave (:func:`code_dataset`)
_CODE_FIX = (
    "Make the callable return a map-style dataset of (input tensor, class index) pairs, "
    "or (input tensor,) unlabelled, e.g. `return torch.utils.data.TensorDataset(inputs, "
    "labels)`."
)


def _refuse_unindexed(dataset: Any, spec: str | None = None) -> None:
    """Refuse what cannot be read by index (a DataLoader, an ``IterableDataset``, a
    generator) or is no dataset (a bare tensor or array: no labels, and attributes such as
    ``mean`` that the probe would read as the dataset's) in
    one paragraph naming the fix, rather than a ``TypeError`` from deep in the sweep: every
    result names its samples by index, and resuming and sharding read items by index.
    ``spec``: the ``--data`` spec that gave it (:func:`code_dataset`), which the message
    names instead."""
    array = isinstance(dataset, (Tensor, np.ndarray))
    loader = isinstance(dataset, torch.utils.data.DataLoader)
    if not (
        array
        or loader
        or isinstance(dataset, torch.utils.data.IterableDataset)
        or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"))
    ):
        return
    kind = type(dataset).__name__
    if spec is not None:
        raise DataSpecError(
            f"Dataset spec '{spec}' gave an object of type {kind}, not a dataset with "
            f"__len__ and __getitem__. {_CODE_FIX}"
        )
    if loader:
        raise LurkerError(
            "got a DataLoader where a dataset is expected: the probe batches the dataset "
            "itself and names each sample by its index in it. Pass the loader's dataset "
            "(`loader.dataset`), with batch_size= and num_workers= for the probe's own loader."
        )
    if array:
        what = "numpy array" if isinstance(dataset, np.ndarray) else "tensor"
        raise LurkerError(
            f"got a {what} of shape {tuple(dataset.shape)} where a dataset is expected: "
            f"a bare {what} holds no labels, and the probe would read its own "
            "attributes (its mean and std methods) as the dataset's. Wrap it: "
            "`torch.utils.data.TensorDataset(inputs, labels)`, or `TensorDataset(inputs)` "
            "for unlabelled inputs (torch.as_tensor(array) for a numpy array)."
        )
    raise LurkerError(
        f"the dataset ({kind}) is not a map-style dataset with __len__ and __getitem__: the "
        "probe reads items by index, so that each sample keeps its id in the results and an "
        "interrupted probe resumes where it stopped. Give it a map-style dataset, e.g. "
        "`torch.utils.data.TensorDataset(inputs, labels)` of the stacked items, or a Dataset "
        "class whose __getitem__(i) returns the i-th (input, label) pair."
    )


# --------------------------------------------------------------------------- digits


class DigitsDataset(_Base):
    """scikit-learn's bundled 8x8 digits, upsampled on the fly (no download, tiny memory)."""

    def __init__(
        self, images: Tensor, labels: list[int], origin: list[int], image_size: int, channels: int
    ) -> None:
        self._images = images  # (N, 1, 8, 8) in [0, 1]
        self.labels = labels
        #: Index of each item in scikit-learn's ``load_digits()`` (the ids are split-local).
        self.origin = origin
        self.image_size = image_size
        self.channels = channels
        self.class_names: list[str] = [str(d) for d in range(10)]
        self.paths: list[str] | None = None
        self.mean: tuple[float, ...] = (0.0,) * channels
        self.std: tuple[float, ...] = (1.0,) * channels
        self.description = f"digits (scikit-learn, {len(labels)} images, {image_size}px)"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} digits")
        index %= len(self)
        img = self._images[index : index + 1]
        if self.image_size != img.shape[-1]:
            size = (self.image_size, self.image_size)
            img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        img = img[0].clamp(0.0, 1.0).expand(self.channels, -1, -1).contiguous()
        return img, self.labels[index], index

    def labels_list(self) -> list[int] | None:
        return list(self.labels)

    def source_indices(self) -> list[int]:
        return list(self.origin)


def digits(
    image_size: int = 32, *, channels: int = 1, split: str = "all", seed: int = 0
) -> DigitsDataset:
    """The scikit-learn digits (1797 images, bundled, no download) scaled to [0, 1].

    Images are upsampled bilinearly to ``image_size`` and repeated to ``channels`` (1 or
    3). ``split`` is ``"all"`` (original order), or ``"train"``/``"test"``: a fixed 80/20
    split by a permutation seeded with ``seed``, so both halves are reproducible.
    """
    from sklearn.datasets import load_digits

    if channels not in (1, 3):
        raise LurkerError(f"digits: channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise LurkerError(f"digits: image_size must be positive, got {image_size}")
    bunch = load_digits()
    images = torch.as_tensor(np.asarray(bunch.images), dtype=torch.float32) / 16.0
    labels = torch.as_tensor(np.asarray(bunch.target), dtype=torch.long)
    origin = torch.arange(len(labels))
    if split != "all":
        if split not in ("train", "test"):
            raise LurkerError(f"digits: split must be 'all', 'train' or 'test', got {split!r}")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        cut = (4 * len(labels)) // 5
        keep = order[:cut] if split == "train" else order[cut:]
        images, labels, origin = images[keep], labels[keep], origin[keep]
    ds = DigitsDataset(images.unsqueeze(1), labels.tolist(), origin.tolist(), image_size, channels)
    if split != "all":
        ds.description = f"digits:{split} (scikit-learn, {len(ds)} images, {image_size}px)"
    return ds


# --------------------------------------------------------------------------- image folder


def _check_image(path: str) -> str | None:
    """Why ``path`` is not a readable image (header and structure check), or None."""
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:
        return _reason(e)
    return None


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def _remove_log(path: str, pid: int) -> None:
    if os.getpid() == pid:  # never from a DataLoader worker holding a copy of the dataset
        with contextlib.suppress(OSError):
            os.unlink(path)


def convert_image(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in ``mode`` ("RGB" or "L") as image folders load it, transparency dropped:
    Pillow's ``convert`` keeps each pixel's stored colour and discards its alpha, so a
    transparent pixel becomes whatever colour it holds (often black), not a background.
    The explorer's uploads go through this same function, so the model sees an uploaded
    file exactly as a probe of a folder holding it would (:func:`transparency_note` says
    when that changed what a viewer of the file sees). A 16-bit or float grayscale image
    is scaled to 8 bits first (:func:`_to_8bit`), never clipped."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    return image.convert(mode)


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float one-channel image as 8-bit "L": Pillow's own
    ``convert("RGB")`` clips those values at 255, so a 16-bit PNG would be fed all white.
    Integer images are read as 16-bit (0-65535, scaled by 1/257: 65535 -> 255, as a 16-bit
    PNG means them); float images in [0, 1] are scaled by 255, in [0, 255] kept (decided per
    file by its own maximum: a file does not say which range it was written in). Anything
    else has no one reading: an error, which an image folder reports as the file's reason
    for being skipped."""
    arr = np.asarray(image, dtype=np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if image.mode == "F" and -1e-6 <= lo < 0:  # float rounding below 0 (-1e-7): clipped
        arr, lo = np.clip(arr, 0.0, None), 0.0
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0:
        raise ValueError(
            f"a {image.mode!r} image with values from {lo} to {hi}: only non-negative "
            "values (8-bit, 16-bit, or float in [0, 1] or [0, 255]) can be read as an image"
        )
    if image.mode == "F":
        if hi > 255:
            raise ValueError(
                f"a float image with values up to {hi}: only [0, 1] or [0, 255] can be read "
                "as an image; rescale it to 8 or 16 bits first"
            )
        scale = 255.0 if hi <= 1.0 else 1.0
    else:
        if hi > 65535:
            raise ValueError(
                f"a 32-bit image with values up to {hi:.0f}: only 8- or 16-bit values can "
                "be read as an image; rescale it first"
            )
        scale = 1.0 / 257.0
    return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")


def _alpha(image: Image.Image) -> Image.Image | None:
    """``image``'s alpha as an "L" image: its own channel, or for a palette or colour key
    marked transparent the alpha Pillow's RGBA conversion gives; None without either."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return image.getchannel("A")
    if "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return None


def has_transparency(image: Image.Image) -> bool:
    """Whether :func:`convert_image` changes how ``image`` looks: it has a pixel that is
    not fully opaque. Cheap on an image already decoded (one pass over its alpha, none
    without one), so the image-folder loader checks every file as it loads it."""
    alpha = _alpha(image)
    return alpha is not None and alpha.getextrema()[0] < 255


def transparency_note(image: Image.Image) -> str | None:
    """Why :func:`convert_image` changes how ``image`` looks: a sentence when it has
    pixels that are not fully opaque (an alpha channel, or a palette or colour key marked
    transparent), else None (no alpha, or an alpha channel that is opaque everywhere)."""
    alpha = _alpha(image)
    if alpha is None or alpha.getextrema()[0] >= 255:
        return None
    see = np.asarray(alpha)
    share = float((see < 255).mean())
    return (
        f"the image has transparency ({100 * share:.3g}% of its pixels are not fully "
        "opaque); it was dropped as the dataset loader drops it: each pixel keeps its "
        "stored colour, so transparent areas show what they hold (often black), not a "
        "background"
    )


def _load_image(path: str, mode: str) -> tuple[Image.Image, bool]:
    """The file in ``mode``, and whether its transparency was dropped (checked on the
    decoded image: no second read)."""
    with Image.open(path) as im:
        im.load()
        return convert_image(im, mode), has_transparency(im)


def transparency_summary(paths: Sequence[str]) -> str:
    """One sentence on the files whose transparency the loader dropped: their count and
    two of their names (what the probe prints and :func:`transparency_meta` keeps)."""
    n = len(paths)
    names = ", ".join(Path(p).name for p in paths[:2]) + (", ..." if n > 2 else "")
    return (
        f"{n} image{'s' if n != 1 else ''} of the folder {'have' if n != 1 else 'has'} "
        f"transparency ({names}): it was dropped as the loader reads images, each pixel "
        "keeping its stored colour, so the model saw what transparent areas hold (often "
        "black), not a background; composite them over a background first if that matters"
    )


def transparency_meta(paths: Sequence[str]) -> dict[str, Any]:
    """What a run's meta keeps of them (``transparent_images``): the count and two
    example paths."""
    return {"count": len(paths), "examples": [str(p) for p in paths[:2]]}


class ImageFolderDataset(_SkipLog, _Base):
    """An ImageFolder tree that skips unreadable images instead of crashing.

    Built by :func:`image_folder`; items are ``(image, label, sample_id)`` or
    :class:`Skipped`. ``samples`` holds the readable ``(path, class_id)`` pairs only.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int = 224,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels: int = 3,
        verify: bool = True,
        workers: int | None = None,
        warn_empty: bool = True,
        raw: bool = False,
    ) -> None:
        from torchvision import datasets, transforms

        self.root = Path(root).expanduser().absolute()  # a run records where, from any cwd
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            raise LurkerError(
                f"image folder {self.root} {what}. Expected the layout {_LAYOUT}, "
                "or the spec 'digits'."
            )
        if channels not in (1, 3):
            raise LurkerError(f"image folder: channels must be 1 or 3, got {channels}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise LurkerError(
                f"image folder: image_size must be a positive integer, got {image_size!r}"
            )
        # raw: its own 0 and 1 (not ImageNet's, which it would refuse), checked before the
        # folder is scanned, so a bad call says so at once
        default_mean, default_std = normalize_stats("raw" if raw else None, channels)
        mean = default_mean if mean is None else mean
        std = default_std if std is None else std
        if len(mean) != channels or len(std) != channels:
            raise LurkerError(
                f"image folder: mean and std need {channels} values each, got {len(mean)} and "
                f"{len(std)}"
            )
        if raw and (any(float(v) != 0.0 for v in mean) or any(float(v) != 1.0 for v in std)):
            raise LurkerError(
                "image folder: raw images are fed as they are (uint8, 0..255): give no mean "
                "and std with raw=True"
            )
        accepted = ", ".join(datasets.folder.IMG_EXTENSIONS)
        try:
            # an empty class folder is kept as a class (torchvision refuses the whole tree),
            # so the other classes keep the indices a model trained on the tree gives them
            folder = datasets.ImageFolder(str(self.root), allow_empty=True)
        except FileNotFoundError as e:
            raise LurkerError(
                f"no images found in {self.root} ({e}). Expected the layout {_LAYOUT}; "
                f"accepted extensions: {accepted}."
            ) from None
        used = {c for _, c in folder.samples}
        empty = [name for name, c in folder.class_to_idx.items() if c not in used]
        if not folder.samples:
            raise LurkerError(
                f"no images found in {self.root}: its class folders ({_some(empty)}) hold no "
                f"files with an image extension ({accepted}). Expected the layout {_LAYOUT}."
            )
        if empty and warn_empty:
            warnings.warn(
                f"image folder {self.root}: {len(empty)} class folder"
                f"{'s' if len(empty) != 1 else ''} ({_some(empty)}) "
                f"{'hold' if len(empty) != 1 else 'holds'} no images; kept as "
                f"{'classes' if len(empty) != 1 else 'a class'} without samples, so every "
                "class keeps the index of its folder's place in sorted order (as a model "
                "trained on this layout numbers them)",
                stacklevel=3,
            )
        self.mode = "RGB" if channels == 3 else "L"
        self.channels = channels
        self.image_size = image_size
        #: Whether images are fed as uint8 0..255 (a model that scales them itself).
        self.raw = raw
        tail = (
            [transforms.PILToTensor()]
            if raw
            else [transforms.ToTensor(), transforms.Normalize(list(mean), list(std))]
        )
        self.transform = transforms.Compose(
            [transforms.Resize(image_size), transforms.CenterCrop(image_size), *tail]
        )
        self.class_names: list[str] = list(folder.classes)
        self.class_to_idx: dict[str, int] = dict(folder.class_to_idx)
        self.mean: tuple[float, ...] = tuple(float(v) for v in mean)
        self.std: tuple[float, ...] = tuple(float(v) for v in std)
        self._skipped: list[tuple[str, str]] = []
        samples = [(str(p), int(c)) for p, c in folder.samples]
        if verify and samples:
            n = workers or min(32, 4 * (os.cpu_count() or 1))
            with ThreadPoolExecutor(max_workers=max(1, n)) as pool:
                reasons = list(pool.map(_check_image, [p for p, _ in samples]))
            self._skipped = [(p, r) for (p, _), r in zip(samples, reasons) if r is not None]
            samples = [s for s, r in zip(samples, reasons) if r is None]
        if not samples:
            shown = "; ".join(f"{p}: {r}" for p, r in self._skipped[:3])
            raise LurkerError(
                f"none of the {len(self._skipped)} images in {self.root} could be read ({shown})."
            )
        self.samples: list[tuple[str, int]] = samples
        self.targets: list[int] = [c for _, c in samples]
        self.paths: list[str] | None = [p for p, _ in samples]
        self.description = str(self.root)
        self._open_log()  # decode failures, from whichever process hits them (workers too)

    def __len__(self) -> int:
        return len(self.samples)

    def labels_list(self) -> list[int] | None:
        return list(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int] | Skipped:
        path, label = self.samples[index]
        try:
            loaded, clear = _load_image(path, self.mode)
            image = self.transform(loaded)
        except Exception as e:
            reason = _reason(e)
            self._record(path, reason)
            shape = (self.channels, self.image_size, self.image_size)
            return Skipped(index % len(self), path, reason, shape)
        if clear:
            self._record(path, _TRANSPARENT)
        return image, label, index % len(self)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Unreadable images as ``(path, reason)``: found up front, then during loading."""
        return self._logged(self._skipped)

    @property
    def transparent(self) -> list[str]:
        """The files loaded so far (in this process or a DataLoader worker) that have
        transparency, which their conversion dropped, in dataset order."""
        seen = {p for p, _ in self._logged(transparent=True)}
        return [p for p in self.paths or [] if p in seen]


def _some(names: Sequence[str], n: int = 5) -> str:
    """Up to ``n`` names, comma-separated, with how many more."""
    more = f", and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def image_folder(
    root: str | os.PathLike[str],
    image_size: int = 224,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    channels: int = 3,
    verify: bool = True,
    warn_empty: bool = True,
    raw: bool = False,
) -> ImageFolderDataset:
    """Images under ``root/<class_name>/``, resized, center-cropped and normalised.

    Unreadable files are skipped and listed in ``dataset.skipped`` (path, reason) rather
    than raising. ``verify`` checks every file's header in parallel up front (a truncated
    JPEG may pass that and is then skipped when it fails to decode). ``channels`` 1 reads
    images as grayscale; mean/std must then have one value each (default: as
    :func:`default_normalize` says). A class folder without
    images is kept as a class, with a warning; ``warn_empty=False`` where a run's folder is
    read again (its probe warned once, when it read the folder for the sweep). ``raw``
    feeds each image as the uint8 tensor of its 0..255 values (resized and cropped, not
    scaled nor normalised): for a model whose forward scales its input itself
    (``x.float() / 255``), which a [0, 1] or normalised image would silently mislead.
    """
    return ImageFolderDataset(
        root,
        image_size,
        mean=mean,
        std=std,
        channels=channels,
        verify=verify,
        warn_empty=warn_empty,
        raw=raw,
    )


def parse_normalize(value: str) -> str:
    """A ``normalize`` spec checked and written canonically, so a run records it as given:
    ``imagenet``, ``none`` (images in [0, 1]), ``raw`` (uint8 images, 0..255, for a model
    that scales them itself) or ``MEAN/STD`` (comma-separated, one value per
    channel, every std positive). Checked before anything is loaded: a typo is said at once."""
    text = str(value).strip()
    if text.lower() in ("imagenet", "none", "raw"):
        return text.lower()
    example = "e.g. 0.5,0.5,0.5/0.25,0.25,0.25, or 0.5/0.25 for 1-channel images"
    head, slash, tail = text.partition("/")
    if not slash or "/" in tail:
        raise LurkerError(
            f"normalize={value!r}: give 'imagenet' (ImageNet's mean and std, the default for "
            f"3 channels), 'none' (images in [0, 1]), 'raw' (uint8 images, 0..255, for a "
            f"model that scales them itself) or MEAN/STD with one value per channel ({example})",
            cli=f"--normalize {value!r}: give imagenet (ImageNet's mean and std, the default for "
            f"3 channels), none (images in [0, 1]), raw (uint8 images, 0..255, for a model "
            f"that scales them itself) or MEAN/STD with one value per channel ({example})",
        )
    stats: list[list[float]] = []
    for what, part in (("mean", head), ("std", tail)):
        try:
            nums = [float(v) for v in part.split(",")]
        except ValueError:
            nums = []
        if not nums or not all(math.isfinite(v) for v in nums):
            raise LurkerError(
                f"normalize={value!r}: its {what} {part!r} is not a list of numbers ({example})",
                cli=f"--normalize {value!r}: its {what} {part!r} is not a list of numbers "
                f"({example})",
            )
        stats.append(nums)
    mean, std = stats
    if len(mean) != len(std):
        raise LurkerError(
            f"normalize={value!r}: {len(mean)} mean values but {len(std)} std values; give one "
            f"of each per channel ({example})",
            cli=f"--normalize {value!r}: {len(mean)} mean values but {len(std)} std values; "
            f"give one of each per channel ({example})",
        )
    if any(v <= 0 for v in std):
        raise LurkerError(
            f"normalize={value!r}: every std must be positive (images are divided by it)",
            cli=f"--normalize {value!r}: every std must be positive (images are divided by it)",
        )
    return ",".join(repr(v) for v in mean) + "/" + ",".join(repr(v) for v in std)


def recorded_normalize(config: Mapping[str, Any]) -> str | None:
    """How a run's images were normalised, as a ``normalize`` spec for reloading its
    dataset: the ``normalize`` the CLI recorded, else the ``mean``/``std`` every probe
    records (a run probed from Python with a dataset's own statistics), else None
    (:func:`default_normalize`'s rule; every probe has recorded its mean and std)."""
    given = config.get("normalize")
    if given is not None:
        return str(given)
    mean, std = config.get("mean"), config.get("std")
    if not mean or not std or len(mean) != len(std):
        return None
    if all(float(m) == 0.0 for m in mean) and all(float(v) == 1.0 for v in std):
        return "none"
    return parse_normalize(
        ",".join(repr(float(m)) for m in mean) + "/" + ",".join(repr(float(v)) for v in std)
    )


def default_normalize(channels: int) -> str:
    """The ``normalize`` spec of an image fed to a model of ``channels`` input channels when
    none is given: ``imagenet`` for 3 channels (how torchvision's and timm's models are
    trained), ``none`` (images in [0, 1]) for any other count. ImageNet's statistics are
    those of colour photographs; a 1-channel model (digits, MNIST-like, scans) is rarely
    trained on them. The one rule of every entry point (the probe, ``lurker explain``,
    ``lurker featviz`` and :func:`lurker.featviz`), so one image of one model is the same
    input tensor in each."""
    return "imagenet" if channels == 3 else "none"


def normalize_stats(
    normalize: str | None, channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` a ``normalize`` spec (see :func:`parse_normalize`) names for
    images of ``channels`` channels; None: :func:`default_normalize`'s. ``imagenet`` for 1
    channel is the mean of ImageNet's three values (a model trained on grayscale ImageNet;
    what 1-channel runs probed before the default was ``none`` record), and is refused for
    other counts than 1 and 3, which it has no values for. ``raw`` is 0 and 1: its uint8
    images are not normalised (their picture is their values / 255)."""
    spec = parse_normalize(default_normalize(channels) if normalize is None else normalize)
    if spec in ("none", "raw"):  # raw: uint8 0..255, whose picture is x / 255 as is
        return (0.0,) * channels, (1.0,) * channels
    if spec == "imagenet":
        if channels == 1:
            return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
        if channels == 3:
            return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
        raise LurkerError(
            f"normalize='imagenet': ImageNet's mean and std are for 3-channel (or 1-channel "
            f"grayscale) images, and the images have {channels} channels: give 'none' "
            f"(images in [0, 1]) or MEAN/STD with {channels} values each",
            cli=f"--normalize imagenet: ImageNet's mean and std are for 3-channel (or "
            f"1-channel grayscale) images, and the model takes {channels}-channel images: "
            f"give --normalize none (images in [0, 1]) or MEAN/STD with {channels} values each",
        )
    head, _, tail = spec.partition("/")
    mean = tuple(float(v) for v in head.split(","))
    std = tuple(float(v) for v in tail.split(","))
    if len(mean) != channels:
        raise LurkerError(
            f"normalize={normalize!r} gives {len(mean)} value(s) each but the images have "
            f"{channels} channel(s): give {channels} means and {channels} stds",
            cli=f"--normalize {normalize!r} gives {len(mean)} value(s) each but the model takes "
            f"{channels}-channel images: give {channels} means and {channels} stds",
        )
    return mean, std


def load_dataset(
    spec: str,
    image_size: int,
    *,
    channels: int | None = None,
    normalize: str | None = None,
    reload: bool = False,
) -> ProbeDataset:
    """The dataset a CLI spec names: ``digits`` (``digits:train``/``digits:test``), a folder,
    or code that makes it (``file.py:fn``, ``pkg.mod:fn``: :func:`code_dataset`).

    ``channels`` should match the model's input (None: digits 1, folders 3). A folder's
    images are normalised as ``normalize`` says (:func:`normalize_stats`; None:
    :func:`default_normalize`'s, ImageNet's statistics for 3 channels, none for 1;
    ``raw``: uint8 0..255). Digits are fed in [0, 1]: any other
    ``normalize`` than ``none`` is refused rather than ignored. ``reload``: the folder is
    a run's, read again (the explorer, unit images, the map): its empty class folders
    were warned about when the probe read it, and are not again.
    """
    name, _, split = spec.partition(":")
    if name == "digits":
        if normalize is not None and parse_normalize(normalize) != "none":
            raise LurkerError(
                f"normalize={normalize!r}: the digits are fed in [0, 1] as they are; "
                "normalize applies to image folders (leave it out, or give 'none')",
                cli=f"--normalize {normalize}: the digits are fed in [0, 1] as they are; "
                "--normalize applies to image folders (leave it out)",
            )
        return digits(image_size, channels=channels or 1, split=split or "all")
    path = Path(spec).expanduser()
    if is_code_spec(spec):
        if normalize is not None and parse_normalize(normalize) != "none":
            raise LurkerError(
                f"normalize={normalize!r}: a dataset made by code ({spec}) is fed as its items "
                "are; normalize applies to image folders (normalise in the dataset, or leave "
                "it out)",
                cli=f"--normalize {normalize}: a dataset made by code ({spec}) is fed as its "
                "items are; --normalize applies to image folders (normalise in the dataset, "
                "or leave it out)",
            )
        return code_dataset(spec)
    if path.exists():
        if channels not in (None, 1, 3):
            raise LurkerError(f"image folders have 1 or 3 channels; the model wants {channels}")
        c = channels or 3
        mean, std = normalize_stats(normalize, c)
        raw = normalize is not None and parse_normalize(normalize) == "raw"
        return image_folder(
            path, image_size, mean=mean, std=std, channels=c, warn_empty=not reload, raw=raw
        )
    raise LurkerError(
        f"unknown dataset {spec!r}: give 'digits' (or 'digits:train' / 'digits:test'), an "
        f"existing directory laid out as {_LAYOUT}, or code that makes the dataset: "
        "'path/to/file.py:make_dataset' or 'package.module:make_dataset'."
    )


def is_code_spec(spec: str) -> bool:
    """Whether a dataset spec names code (``file.py:fn``, ``pkg.mod:fn``) rather than the
    digits or a folder: what comes before the last ':' is a ``.py`` file or a dotted module
    name (not a drive letter, ``C:\\data``, nor a path, ``/data/imgs:v2``), and no folder
    of that name exists."""
    target = spec.strip().rpartition(":")[0].strip()
    if not target or spec.partition(":")[0] == "digits" or Path(spec).expanduser().exists():
        return False
    return target.endswith(".py") or (
        len(target) > 1 and re.fullmatch(r"[A-Za-z_][\w.]*", target) is not None
    )


def code_spec_file(spec: str) -> Path | None:
    """The file a ``file.py:fn`` spec loads (None for ``pkg.mod:fn``): a run records it
    absolute, so the dataset is found again from any directory."""
    target = spec.strip().rpartition(":")[0].strip()
    return Path(target).expanduser() if target.endswith(".py") else None


def code_dataset(spec: str) -> ProbeDataset:
    """The dataset a ``file.py:fn`` or ``pkg.mod:fn`` spec makes (a zero-argument callable,
    or a dataset object, as MODEL specs are taken), checked to be a map-style dataset of
    ``(input tensor, class index)`` pairs before a model is fed it, so that a wrong return
    is said in one line rather than as an error deep in a DataLoader."""
    from ..models import load_spec_object

    ds = load_spec_object(spec, "Dataset spec", DataSpecError)
    if isinstance(ds, _Base):  # lurker's own (digits, image_folder): already checked
        return ds
    _refuse_unindexed(ds, spec)
    try:
        n = len(ds)
        item = ds[0] if n else None
    except Exception as e:
        raise DataSpecError(
            f"Dataset spec '{spec}': reading its first item raised {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else '(no message)'}. {_CODE_FIX}"
        ) from e
    if not n:
        raise DataSpecError(f"Dataset spec '{spec}' gave an empty dataset (no items). {_CODE_FIX}")
    if isinstance(item, (tuple, list)) and not item:
        raise DataSpecError(
            f"Dataset spec '{spec}': item 0 is an empty {type(item).__name__}. {_CODE_FIX}"
        )
    # the items as the probe reads them, by the same rules as a dataset given from Python:
    # (input,) unlabelled, (input, label, anything else), numpy inputs taken
    wrapped = WrappedDataset(ds)
    try:
        wrapped[0]
    except DataSpecError:
        raise
    except LurkerError as e:  # a dict item, an input that is no tensor: said by the wrapper
        raise DataSpecError(f"Dataset spec '{spec}': {e} {_CODE_FIX}") from None
    # the file absolute, as the run records the spec: a resume from elsewhere is the same
    wrapped.description = f"{absolute_spec(spec)} ({type(ds).__name__}, {n} samples)"
    return wrapped


def fingerprint(ds: Any) -> list[dict[str, Any]]:
    """A few items of a dataset made by code (first, middle, last), summed up so that the
    same dataset made again can be told from another: a spec read again by the explorer
    (``lurker serve``) must give the items the probe swept, or the pages would show other
    samples' tokens or values under the probe's numbers (an unseeded random dataset).
    Integer inputs are kept exactly (a hash); floating ones as their shape, sum, sum of
    squares and first values, compared with a tolerance (another machine's arithmetic)."""
    import hashlib

    n = len(ds)
    out = []
    for i in sorted({0, n // 2, n - 1}) if n else []:
        x, y = ds[i][:2]
        x = torch.as_tensor(x).detach().cpu()
        entry: dict[str, Any] = {"item": i, "shape": list(x.shape), "label": int(y)}
        if x.is_floating_point() or x.is_complex():
            v = x.double().flatten()
            # (None for a value that is not finite: a run's meta is strict JSON)
            entry["sum"] = _finite(float(v.sum()))
            entry["sumsq"] = _finite(float((v * v).sum()))
            entry["head"] = [_finite(float(a)) for a in v[:16]]
        else:
            entry["sha256"] = hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()
        out.append(entry)
    return out


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def fingerprint_differs(recorded: list[dict[str, Any]], ds: Any) -> str | None:
    """Where ``ds`` differs from the ``recorded`` :func:`fingerprint` (item and what), or
    None when it matches."""
    n = len(ds)
    if recorded and recorded[-1]["item"] != n - 1:
        return f"it has {n} items, and the probe swept {recorded[-1]['item'] + 1}"
    try:
        now = fingerprint(ds)
    except Exception as e:  # an item that no longer reads
        return f"reading its items raised {type(e).__name__}: {e}"
    return fingerprints_differ(recorded, now)


def fingerprints_differ(recorded: list[dict[str, Any]], now: list[dict[str, Any]]) -> str | None:
    """Where the :func:`fingerprint` ``now`` differs from the ``recorded`` one (item and
    what), or None when they match: integer inputs exactly, floating ones to a relative
    1e-5 of the item's scale (the same data read twice, or on another machine, matches;
    other values, such as another normalisation, do not)."""
    by_item = {e["item"]: e for e in now}
    if recorded and now and recorded[-1]["item"] != now[-1]["item"]:
        return f"it has {now[-1]['item'] + 1} items, and the probe swept {recorded[-1]['item'] + 1}"
    for was in recorded:
        got = by_item.get(was["item"])
        i = was["item"]
        other = f"item {i}'s input holds other values than when it was probed"
        if (
            got is None
            or got.get("shape") != was.get("shape")
            or got.get("label") != was.get("label")
        ):
            return f"item {i} is not the item the probe swept (its shape or label differ)"
        if ("sha256" in was) != ("sha256" in got):
            return f"item {i}'s input is of another kind (integers or floats) than when probed"
        if "sha256" in was and got["sha256"] != was["sha256"]:
            return other
        if "sum" in was:
            # float sums of zero-centred data are near 0 and differ by roundoff: the scale
            # of a value is the item's root mean square, and of a sum sqrt(numel) times it
            numel = max(1, math.prod(was["shape"]))
            sumsq = was["sumsq"] if was["sumsq"] is not None else 0.0
            rms = math.sqrt(max(sumsq, 0.0) / numel)
            if not (
                _close(got["sum"], was["sum"], 1e-5 * rms * math.sqrt(numel))
                and _close(got["sumsq"], was["sumsq"], 1e-5 * max(sumsq, 0.0))
                and len(got["head"]) == len(was["head"])
                and all(_close(a, b, 1e-5 * rms) for a, b in zip(got["head"], was["head"]))
            ):
                return other
    return None


def _close(a: float | None, b: float | None, tol: float) -> bool:
    """Equal up to a relative 1e-4 or ``tol`` (a value that is not finite, stored as None,
    equals one: missing values stay so)."""
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=tol + 1e-12)


# --------------------------------------------------------------------------- display


def load_run_dataset(
    config: Mapping[str, Any], image_size: int, spec: str | None = None
) -> ProbeDataset:
    """A run's dataset read again (the explorer, unit images, the map), fed as its probe
    fed it: ``spec`` (default the run's recorded ``data``) at the run's ``image_size`` and
    input channels, a folder normalised as :func:`recorded_normalize` says (digits are
    fed in [0, 1]), its empty classes not warned about again."""
    spec = spec if spec is not None else str(config["data"])
    code = is_code_spec(spec)
    folder = spec.partition(":")[0] != "digits" and not code
    ds = load_dataset(
        spec,
        image_size,
        channels=(config.get("input_shape") or [None])[0],
        normalize=recorded_normalize(config) if folder else None,
        reload=True,
    )
    recorded = config.get("data_fingerprint")
    if code and recorded and absolute_spec(spec) == str(config.get("data")):
        why = fingerprint_differs(recorded, ds)
        if why is not None:
            raise DataSpecError(
                f"Dataset spec '{spec}' makes another dataset than the one probed: {why}. "
                "Its pages would show other samples under the probe's numbers; make the "
                "dataset the same each time (seed its randomness, keep its file) and probe "
                "again if it changed."
            )
    return ds


def denormalize(img: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo ``Normalize(mean, std)`` on a (C, H, W) image, clamped to [0, 1] for display."""
    shape = (-1,) + (1,) * (img.dim() - 1)
    m = torch.as_tensor(list(mean), dtype=img.dtype, device=img.device).reshape(shape)
    s = torch.as_tensor(list(std), dtype=img.dtype, device=img.device).reshape(shape)
    return (img * s + m).clamp(0.0, 1.0)


def to_pil(img: Tensor) -> Image.Image:
    """A [0, 1] float image (C, H, W) or (H, W) as a uint8 PIL image: "L" for 1 channel, else RGB."""
    t = img.detach().float().cpu()
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        raise LurkerError(f"to_pil needs a (1|3, H, W) or (H, W) image, got {tuple(img.shape)}")
    arr = (t.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)  # "L" or "RGB"


def pil_to_tensor(image: Image.Image) -> Tensor:
    """A PIL image as the probe feeds it: a float (C, H, W) tensor in [0, 1], "L" as one
    channel, other modes as RGB (what a dataset whose transform stops at a PIL image
    gives the model)."""
    arr = np.asarray(image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode))
    t = torch.from_numpy(arr.copy()).float() / 255.0
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


def is_clip(img: Tensor) -> bool:
    """Whether ``img`` is a video clip ``(C, D, H, W)`` (1 or 3 channels), as a 3-D CNN
    (r3d_18, mc3_18) takes: a picture of it is one of its frames (:func:`clip_frame`)."""
    return img.dim() == 4 and img.shape[0] in (1, 3)


def middle_frame(frames: int) -> int:
    """The frame a clip of ``frames`` frames is shown as, when no peak picks one."""
    return frames // 2


def clip_frame(img: Tensor, frame: int | None = None) -> Tensor:
    """Frame ``frame`` of a ``(C, D, H, W)`` clip as a ``(C, H, W)`` image (default: the
    middle one, :func:`middle_frame`); an image ``(C, H, W)``/``(H, W)`` as it is.

    to_pil shows images, not clips: a clip is shown one frame at a time, and the caller
    says which (a unit's crop: the frame of its peak, :func:`lurker.probe.layout.peak_frame`).
    """
    if not is_clip(img):
        return img
    d = int(img.shape[1])
    f = middle_frame(d) if frame is None else frame
    if not 0 <= f < d:
        raise LurkerError(f"frame {f} is not in this clip of {d} frames {tuple(img.shape)}")
    return img[:, f]


def input_image(dataset: ProbeDataset, sample_id: int, frame: int | None = None) -> Image.Image:
    """Sample ``sample_id`` as the model saw it (after resize/crop, normalisation undone);
    a video clip as its frame ``frame`` (default the middle one, :func:`clip_frame`)."""
    item = dataset[sample_id]
    if isinstance(item, Skipped):
        raise LurkerError(f"sample {sample_id} ({item.path}) cannot be read: {item.reason}")
    x = clip_frame(item[0], frame)
    require_picture(x, sample_id)
    if x.dtype == torch.uint8:  # raw 0..255 values (a model that scales them itself)
        x = x.float() / 255.0
    return to_pil(denormalize(x, dataset.mean, dataset.std))


def require_picture(x: Tensor, sample_id: int) -> None:
    """Refuse an input that has no picture (token ids, a text model's input, or another
    tensor than an image or a clip's frame), naming what it is, rather than with to_pil's
    complaint about shapes."""
    if x.dim() in (2, 3) and (x.dim() == 2 or x.shape[0] in (1, 3)):
        return
    what = (
        f"a sequence of {x.numel()} token ids"
        if x.dim() == 1 and not x.is_floating_point()
        else f"a tensor of shape {tuple(x.shape)} ({x.dtype})"
    )
    raise LurkerError(
        f"sample {sample_id} is {what}, not an image (C, H, W) with 1 or 3 channels or a "
        "video clip: it has no picture to show"
    )
