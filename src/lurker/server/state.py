"""The runs a server serves, each opened read-only once, and what is derived from them lazily.

Run ids are the run folders' names. A request's run id is looked up in this table and
never joined onto a path, so no id can reach outside the served folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lurker.errors import LurkerError
from lurker.store import MissingFromRunError, Run, StoreError
from lurker.store.files import GENERATION_MARKER, lock_holder
from lurker.store.schema import DB_NAME, HIST_DTYPE, TOP_DTYPE, from_blob
from lurker.vocab import reads_ids

from .errors import ApiError, listing, not_found

if TYPE_CHECKING:
    from lurker.store.run import LayerInfo

    from .session import ModelSource, Session


class NotServableError(LurkerError):
    """The folder given to the server is neither a run nor a folder of runs.

    Keeps ``path`` and ``reason`` apart from the verb, so a command other than ``serve``
    (``export``) can say what it could not do: :meth:`for_verb`.
    """

    def __init__(self, path: Path, reason: str, verb: str = "serve"):
        super().__init__(f"cannot {verb} {path}: {reason}")
        self.path = path
        self.reason = reason

    def for_verb(self, verb: str) -> NotServableError:
        """The same error, worded for the command ``verb`` (``"export"``)."""
        return NotServableError(self.path, self.reason, verb)


#: float32's unit roundoff: the probe reads maps, sums them and keeps means in float32.
ROUNDOFF = 2.0**-24


def _nonfinite_samples(meta: dict[str, Any]) -> dict[str, int]:
    """Per probed layer with NaN or +inf, how many samples at least had one: the probe's
    ``non_finite_samples`` (counted over every sample), else, for a run probed before it,
    how many the top lists name (``non_finite``: at most k per unit)."""
    names = meta.get("non_finite") or {}
    counts = meta.get("non_finite_samples") or {}
    return {layer: max(int(counts.get(layer, 0)), len(ids)) for layer, ids in names.items()}


def positions_per_sample(info: LayerInfo) -> int:
    """How many values one unit has per sample: its map's positions (1 for a layer of
    one value per unit, a Linear's ``(N, units)``). The output per sample is units x
    positions, whatever the layout."""
    size = int(np.prod(info.shape, dtype=np.int64)) if len(info.shape) else 1
    return max(1, size // max(1, info.num_units))


def clip_frames(config: dict[str, Any]) -> int | None:
    """The frames of a run's inputs when they are video clips ``(C, D, H, W)`` (its
    config's ``input_shape``); ``None`` for images."""
    shape = config.get("input_shape") or []
    return int(shape[1]) if len(shape) == 4 and shape[0] in (1, 3) else None


def token_length(run: Run) -> int | None:
    """How many token ids each of a run's inputs holds when they are sequences of token ids
    (its config's ``input_shape`` one axis, its graph's input an integer tensor read by a
    lookup, an embedding: a text model's ``(N, L)`` batch); ``None`` for images, clips,
    integer samples of a signal and runs without a graph. Such
    inputs have no picture: the explorer shows their tokens instead."""
    shape = (run.meta.get("config") or {}).get("input_shape") or []
    if len(shape) != 1 or not (input_dtype(run) or "").startswith(("int", "uint")):
        return None
    # ids look something up (an embedding); integer samples of a waveform are not ids
    return int(shape[0]) if reads_ids(run.graph) else None


def vector_length(run: Run) -> int | None:
    """How many values each of a run's inputs holds when they are flat vectors of numbers
    and not token ids (its config's ``input_shape`` one axis: a tabular model's features);
    ``None`` for images, clips, token ids and a raw waveform the model reads as a
    one-channel signal (:func:`signal_layout`). Such inputs have no picture: the explorer
    says so instead of asking for one."""
    shape = (run.meta.get("config") or {}).get("input_shape") or []
    if len(shape) != 1 or token_length(run) is not None or signal_layout(run) is not None:
        return None
    return int(shape[0])


def signal_words(shape: tuple[int, int] | list[int]) -> str:
    """A signal ``(C, T)`` in words, as messages say it: "8 channels x 512 samples", "1
    channel x 4000 samples" (a waveform)."""
    c, t = int(shape[0]), int(shape[1])
    return f"{c} channel{'' if c == 1 else 's'} x {t} samples"


def signal_shape(run: Run) -> tuple[int, int] | None:
    """``(C, T)`` where a run's inputs are signals, channels by time, whatever the order of
    a sample's own two axes (see :func:`signal_layout`); ``None`` for images, clips, flat
    vectors, token ids and two axes the run's graph does not read as a signal. Such inputs
    have no picture: the explorer draws them as lines, channels first."""
    found = signal_layout(run)
    return None if found is None else (found[0], found[1])


# run -> its signal layout: asked on every request, so the graph is read once per Run
# object (a run probed again in place is opened as a new Run: RunEntry.run)
_SIGNALS: weakref.WeakKeyDictionary[Run, tuple[int, int, bool] | None] = weakref.WeakKeyDictionary()


def signal_layout(run: Run) -> tuple[int, int, bool] | None:
    """``(C, T, channels_last)`` where a run's inputs are signals: each sample two axes
    that the model's graph reads as channels and time, the way
    :func:`lurker.explain.axes.graph_input_axes` reads them for Explain (the first op
    that reads one of the input's axes as channels). Channels at the sample's first axis
    (a ``Conv1d`` stack's ``(N, C, T)`` batch: an EEG's ``(8, 256)``, a waveform's
    ``(1, 4000)``) is a signal ``(C, T)``, and so is one axis ``(T,)`` the model unsqueezes
    into a ``Conv1d``'s one channel (``(1, T)``); channels at its last axis (a transpose into a
    ``Conv1d``, an ``LSTM``/``GRU`` with ``batch_first``, a ``Linear`` per step) a
    channels-last signal, stored ``(T, C)`` and served channels first
    (``channels_last`` True). A one-channel image (unsqueezed into a ``Conv2d``), token
    ids, other shapes, no graph, or a graph that does not say: ``None``, not a signal
    (two axes alone cannot tell a ``(12, 12)`` image from a signal)."""
    if run in _SIGNALS:
        return _SIGNALS[run]
    found = _read_signal(run, (run.meta.get("config") or {}).get("input_shape") or [])
    _SIGNALS[run] = found
    return found


def _read_signal(run: Run, shape: list[Any]) -> tuple[int, int, bool] | None:
    if len(shape) not in (1, 2):
        return None
    try:
        graph = run.graph
    except (MissingFromRunError, StoreError):
        return None  # no graph to tell a signal from a one-channel image
    from lurker.explain.axes import graph_signal_layout

    return graph_signal_layout(graph, shape)


def signal_span(run: Run, info: LayerInfo, x: int | None, length: int) -> list[int] | None:
    """The half-open span ``[t0, t1)`` of input samples the peak at position ``x`` of a
    layer of a signal run sees (its receptive field along time, clipped to the signal's
    ``length``: :func:`signal_rf`); None for a layer without positions (it sees the whole
    signal) or no receptive field."""
    rf = signal_rf(run, info)
    if x is None or rf is None or not info.position_axes:
        return None
    from lurker.probe.layout import position_box

    try:
        box = position_box(info.layout, rf, 0, x, (1, length))
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    if box is None or box[2] >= box[3]:
        return None  # no place in the signal, or it lies in padding alone
    return [int(box[2]), int(box[3])]


# run -> each op's receptive field along a channels-last signal's time (per Run object)
_FIELDS: weakref.WeakKeyDictionary[Run, dict[int, dict[str, Any]]] = weakref.WeakKeyDictionary()


def signal_time_axis(run: Run) -> int | None:
    """The model input's axis that time runs along where it is not the last, as
    ``receptive_fields(time_axis=)`` takes it: 1 for a channels-last ``(N, T, C)`` signal
    and a one-axis waveform ``(N, T)``; None for a ``(N, C, T)`` signal (time last, as the
    probe's own fields read it) and for runs that are not signals."""
    found = signal_layout(run)
    return 1 if found is not None and (found[2] or signal_waveform(run)) else None


def signal_waveform(run: Run) -> bool:
    """Whether a signal run's samples are raw waveforms of one axis ``(T,)`` that the model
    gives its one channel itself (served as ``(1, T)``): the one test the server reads."""
    shape = (run.meta.get("config") or {}).get("input_shape") or []
    return len(shape) == 1 and signal_layout(run) is not None


def signal_rf(run: Run, info: LayerInfo) -> dict[str, Any] | None:
    """A layer's receptive field along time on a signal run: the probe's own for a
    ``(C, T)`` signal (computed over the last axis, time); for a channels-last ``(T, C)``
    one, over which the probe's fields are not along time, and a one-axis waveform
    ``(T,)``, for which the probe computes none, from the run's graph with time on axis 1
    (once per run generation). An RNN's output at a step sees every
    step up to it (``[0, t + 1)``), as its field says. None where there is none."""
    if signal_time_axis(run) is None:  # not a signal, or (C, T): the probe's, along T
        return info.rf
    try:
        index = int(info.op_index)
    except MissingFromRunError:
        return None
    return signal_fields(run).get(index)


def signal_fields(run: Run) -> dict[int, dict[str, Any]]:
    """Every op's receptive field along time on a signal run, from the run's graph (time
    on the input's axis 1 for a channels-last signal or a waveform, its last axis for a
    ``(C, T)`` one), by op index, once per Run object; empty for a run that is no signal
    or a graph the field rules cannot follow (no spans, not wrong ones)."""
    fields = _FIELDS.get(run)
    if fields is None:
        from lurker.graph.receptive import receptive_fields

        fields = {}
        if signal_layout(run) is not None:
            with contextlib.suppress(Exception):
                found = receptive_fields(run.graph, time_axis=signal_time_axis(run))
                fields = {i: rf.to_dict() for i, rf in found.items()}
        _FIELDS[run] = fields
    return fields


def feature_names(run: Run) -> list[str] | None:
    """The names of a feature-vector run's values, one per feature, as the probe stored
    them from the dataset's ``feature_names``; ``None`` where it had none (or the run's
    inputs are not feature vectors)."""
    length = vector_length(run)
    names = (run.meta.get("config") or {}).get("feature_names")
    if length is None or not isinstance(names, list) or len(names) != length:
        return None
    return [str(n) for n in names]


def channel_names(run: Run) -> list[str] | None:
    """The names of a signal run's channels (EEG electrodes, ``Fz``, ``Cz``...), as the
    probe stored them from the dataset's ``channel_names``; ``None`` where it had none,
    the run is not a signal, or they do not name each of its ``C`` channels."""
    shape = signal_shape(run)
    names = (run.meta.get("config") or {}).get("channel_names")
    if shape is None or not isinstance(names, list) or len(names) != shape[0]:
        return None
    return [str(n) for n in names]


def sample_rate(run: Run) -> float | None:
    """A signal run's sampling rate in Hz, as the probe stored it from the dataset's
    ``sample_rate``: the pages give times in seconds by it. ``None`` where it had none,
    the run is not a signal, or the stored value is not a positive finite number."""
    return None if signal_shape(run) is None else run.sample_rate


def channel_range(run: Run) -> dict[str, list[Any]] | None:
    """A signal run's ``{min, max, finite}``, one entry per channel: each input channel's
    least and greatest finite value over the dataset and its count of finite values, as
    the probe recorded them (featviz bounds each channel's signal to them). ``None`` where
    the run is not a signal or was probed before they were recorded."""
    shape = signal_shape(run)
    got = run.meta.get("channel_range")
    if shape is None or not isinstance(got, dict):
        return None
    parts = [got.get(k) for k in ("min", "max", "finite")]
    if not all(isinstance(p, list) and len(p) == shape[0] for p in parts):
        return None
    return {"min": parts[0], "max": parts[1], "finite": parts[2]}


def input_dtype(run: Run) -> str | None:
    """The dtype of the model's input as the run's trace recorded it (``"float32"``), or
    None without a graph: what a sample is cast to before the model sees it again."""
    try:
        inputs = run.graph.inputs
    except (MissingFromRunError, StoreError):
        return None
    dtypes = [m.dtype for m in inputs[0].outputs[:1]] if inputs else []
    return str(dtypes[0]) if dtypes and dtypes[0] else None


def token_window(tokens: list[int], peak: int, reach: int = 3) -> tuple[int, list[int]]:
    """The tokens around ``peak`` (``reach`` either side, clipped to the sequence) and the
    index of the first: what a layer's tile shows of its top sequence."""
    start = max(0, min(peak, len(tokens)) - reach)
    return start, tokens[start : peak + reach + 1]


def entry_frames(
    info: LayerInfo, y: int | None, frames: int | None
) -> tuple[int | None, list[int] | None]:
    """For a peak at row ``y`` of a video model's layer (``frames`` per clip): the frame
    its images are cut from and its box drawn on, and the half-open range ``[t0, t1)`` of
    frames it sees (``None`` without a receptive field over frames: a run probed before
    they were stored). ``(None, None)`` for images, layers without frames, or no peak."""
    if frames is None or y is None:
        return None, None
    from lurker.probe.layout import peak_frame, position_frames

    try:
        frame = peak_frame(info.layout, info.shape, y, frames, info.rf)
        seen = position_frames(info.rf, y) if frame is not None else None
    except (ValueError, KeyError, TypeError, IndexError):
        return None, None
    if seen is not None and not seen[0] <= frame < seen[1]:  # type: ignore[operator]
        seen = None  # it sees no frame (padding in time): the frame is a guess, say none
    return frame, None if seen is None else [int(seen[0]), int(seen[1])]


def unrecorded_frame(info: LayerInfo, frames: int | None) -> bool:
    """Whether a peak's place in time is what a clip's entry is shown on: a video model's
    layer with frames among its positions (an entry of it with no stored peak, an older
    run's mean list, has no known frame)."""
    return frames is not None and info.position_axes == 3


def constant_tolerance(positions: int) -> float:
    """Relative gap allowed between a constant unit's stored dataset mean and its max.

    Every value of a constant unit is ``c``, so every sample's peak is ``c`` exactly (a
    max rounds nothing); only the mean carries rounding. Each sample's spatial mean is a
    float32 sum of ``positions`` equal values over their number: a plain sequential sum
    is off by up to about ``positions / 4.3`` units of roundoff (``u = 2**-24``) of ``c``
    (measured, 64 to 50,176 positions), the probe's SIMD sum on the CPU by less (140 u for
    112x112 maps, AVX2), and nothing for ``c = 0``. The dataset mean adds the samples' means
    up: float64 on CPU and CUDA (exact here: every sample's mean is the same float), a
    float32 product per buffered fold off the CPU (measured up to 22 u). Hence
    ``(64 + positions / 4) u``: about 5e-6 of ``c`` for 8x8 maps, 2e-4 for 112x112."""
    return ROUNDOFF * (64 + positions / 4)


def is_constant(
    mean: float | None, mx: float | None, peaks: Any, positions: int, means: Any = None
) -> bool:
    """Whether a unit holds the same value ``mx`` on every sample at every position.

    Each sample's spatial mean is at most its peak, which is at most the max, so the
    dataset mean of those means equals the max only if every value is the max. Checked as:
    both finite, every listed peak (the max list's values: every sample's peak is the max
    for a constant unit, exactly) equal to the max, and the mean within
    :func:`constant_tolerance` of it. A unit of exactly ``0`` (a ReLU that never fires)
    is decided exactly (the sums of zeros round nothing). A unit whose values depart from
    ``c`` only downwards and by less in all than the tolerance of its sum (an upward one
    breaks the ties of the max list) would pass that alone (a ReLU6 at its ceiling but
    for a few of its 112x112 positions): ``means``, the mean list's values, closes the
    gap. A constant unit's samples all have the same spatial mean (the same float: the
    same values summed the same way), so that list is ties, and the dataset mean of equal
    means is that value but for the fold's rounding; a dip anywhere either breaks the ties
    or leaves a sample without one, whose mean is then above the dataset's.
    """
    if mean is None or mx is None or not (math.isfinite(mean) and math.isfinite(mx)):
        return False
    if any(v is None or float(v) != mx for v in peaks):  # NaN (None) is unequal
        return False
    if abs(mx - mean) > constant_tolerance(positions) * abs(mx):
        return False
    if means is None:
        return True
    vals = [float(v) for v in means if v is not None]
    if not vals or any(v != vals[0] for v in vals):
        return False
    return abs(vals[0] - mean) <= ROUNDOFF * 64 * abs(mx)


def slots_constant(mean: float | None, mx: float | None, top: np.ndarray, positions: int) -> bool:
    """:func:`is_constant` of a unit from its stored top lists (``TOP_DTYPE`` slots: the
    max list, then the mean list; unfilled slots have sample id -1)."""
    k = len(top) // 2
    if not k:
        return False
    filled = top["sample_id"] >= 0
    peaks, means = top["value"][:k][filled[:k]], top["value"][k:][filled[k:]]
    return is_constant(mean, mx, peaks, positions, means)


def _ties(values: np.ndarray) -> bool:
    """Whether a top list's values are all equal (ties, ranked by sample id alone)."""
    return len(values) > 0 and bool(np.all(values == values[0]))


def _tied_tail(values: np.ndarray, keep: np.ndarray, samples: int) -> np.ndarray:
    """Which entries of one top list (``keep``: its filled slots, a prefix) are its tied
    tail: two or more entries at the end of a full list sharing the value 0 (a ReLU that
    did not fire, a relevance of 0 where the unit carried nothing), or the whole of a full
    list all of one value (a peak every sample reaches: the bias at a digit's blank
    border, a ReLU6's 6), in a run of more ``samples`` than the list holds. Samples outside
    the list may share that value, so which of them the list holds is by sample id:
    listing them as ranking the sample would be a claim the data does not make. Any other
    tie is kept: two samples that both reach a ReLU6's 6 behind ones above it, or a
    duplicate image, do rank (review: dropping them hid real entries)."""
    return _tied_tail_rows(values[None], keep[None], samples)[0]


def tied_tail_count(values: list[float | None], k: int, samples: int) -> int:
    """How many entries end one unit's top list (its filled entries' ``values``, a list of
    ``k`` slots) as its tied tail: :func:`_tied_tail`, the rule the sample pages leave
    such entries out by, for the unit page to dim the same ones."""
    n = len(values)
    if not n or n > k:
        return 0
    v = np.full(k, np.nan)
    v[:n] = [np.nan if x is None else x for x in values]
    keep = np.zeros(k, bool)
    keep[:n] = True
    return int(_tied_tail(v, keep, samples).sum())


def _same_length(
    rows: list[tuple[int, Any, Any, bytes]],
) -> list[list[tuple[int, Any, Any, bytes]]]:
    """``rows`` (unit, mean, max, top blob) grouped by the length of their top lists, so
    each group stacks into one 2-D array (a run's lists have one length; a group per length
    keeps any other run right)."""
    groups: dict[int, list[tuple[int, Any, Any, bytes]]] = {}
    for r in rows:
        groups.setdefault(len(r[3]), []).append(r)
    return [g for n, g in groups.items() if n // TOP_DTYPE.itemsize >= 2]


def _slots_constant_rows(
    means: list[Any], maxes: list[Any], top: np.ndarray, positions: int
) -> np.ndarray:
    """:func:`slots_constant` of many units at once: ``top`` is ``(units, 2k)`` slots (the
    max list, then the mean list), ``means`` and ``maxes`` their stored mean and max (None
    where unknown). The same tests as :func:`is_constant`, row by row."""
    n, width = top.shape
    k = width // 2
    mean = np.array([np.nan if v is None else v for v in means], np.float64)
    mx = np.array([np.nan if v is None else v for v in maxes], np.float64)
    filled = top["sample_id"] >= 0
    value = top["value"]
    with np.errstate(invalid="ignore", over="ignore"):
        ok = np.isfinite(mean) & np.isfinite(mx)
        peaks, pf = value[:, :k], filled[:, :k]
        ok &= np.all((peaks == mx[:, None]) | ~pf, axis=1)
        ok &= ~(np.abs(mx - mean) > constant_tolerance(positions) * np.abs(mx))
        vals, vf = value[:, k:], filled[:, k:]
        any_mean = vf.any(axis=1)
        first = vals[np.arange(n), np.argmax(vf, axis=1)] if k else np.full(n, np.nan)
        ok &= any_mean & np.all((vals == first[:, None]) | ~vf, axis=1)
        ok &= np.abs(first - mean) <= ROUNDOFF * 64 * np.abs(mx)
    return ok


def _tied_tail_rows(values: np.ndarray, keep: np.ndarray, samples: int) -> np.ndarray:
    """:func:`_tied_tail` of many top lists at once (one a row; ``keep`` their filled
    slots, a prefix of each row): an entry is in the tail where it and every filled entry
    after it equal the last, the tail holds two or more, the row is full, and the last is
    0 or the tail is the whole row."""
    n = keep.sum(axis=1)
    rows = np.arange(len(values))
    last = values[rows, np.maximum(n - 1, 0)]
    pos = np.arange(values.shape[1])[None, :]
    inside = pos < n[:, None]
    same = (values == last[:, None]) & inside
    # an entry is in the tail where it and every filled entry after it equal the last
    tail = np.flip(np.cumprod(np.flip(same | ~inside, axis=1), axis=1), axis=1).astype(bool)
    tail &= inside
    full = n == values.shape[1]
    count = tail.sum(axis=1)
    ok = (count >= 2) & full & ((last == 0) | (count == n)) & (samples > values.shape[1])
    return tail & ok[:, None]


@dataclass
class Appearances:
    """Inverted index of every unit's top-k lists: sample id -> (layer, unit, list, rank,
    value), sorted by sample id so one sample's entries are one slice (two binary
    searches), and within a sample by layer order, then rank (a sample's strongest places
    in each layer first), then list (max first), then unit.

    The lists of units constant on the dataset are left out (their entries are ties,
    ranked by sample id alone: a ReLU that never fires lists the first k samples), and so
    is a list's tied tail (``_tied_tail``: a relevance of 0 where a unit carried nothing);
    ``left`` counts them per sample and layer position."""

    sample: np.ndarray
    layer: np.ndarray
    unit: np.ndarray
    which: np.ndarray  # 0: max list, 1: mean list
    rank: np.ndarray
    value: np.ndarray
    left: dict[int, dict[int, int]] = field(default_factory=dict)
    #: The samples of tied tails: left out here, but their unit pages still show them.
    tails: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def left_out(self, sample_id: int) -> list[tuple[int, int]]:
        """``(layer position, entries)`` of the sample's entries in constant units'
        lists, left out of the index, in layer order."""
        return sorted(self.left.get(sample_id, {}).items())

    def _slice(self, sample_id: int) -> tuple[int, int]:
        lo = int(np.searchsorted(self.sample, sample_id, "left"))
        hi = int(np.searchsorted(self.sample, sample_id, "right"))
        return lo, hi

    def count(self, sample_id: int) -> int:
        lo, hi = self._slice(sample_id)
        return hi - lo

    def per_layer(self, sample_id: int) -> list[tuple[int, int]]:
        """``(layer position, entries)`` of the sample's layers, in layer order."""
        lo, hi = self._slice(sample_id)
        layers, counts = np.unique(self.layer[lo:hi], return_counts=True)
        return [(int(a), int(b)) for a, b in zip(layers, counts, strict=True)]

    def of(
        self, sample_id: int, offset: int = 0, limit: int | None = None
    ) -> list[tuple[int, int, int, int, float]]:
        """The sample's entries ``offset`` to ``offset + limit`` (all by default)."""
        lo, hi = self._slice(sample_id)
        start = min(hi, lo + offset)
        stop = hi if limit is None else min(hi, start + limit)
        return [
            (
                int(self.layer[i]),
                int(self.unit[i]),
                int(self.which[i]),
                int(self.rank[i]),
                float(self.value[i]),
            )
            for i in range(start, stop)
        ]


#: What tells one version of a run's database from another: ``(device, inode, mtime,
#: size)`` of its ``run.db`` (None when there is none). A probe with ``overwrite=True``
#: makes a new file (another inode), and every commit (a resumed probe, ``lurker featviz``,
#: ``lurker map``) changes its mtime: the server reads nothing else the run may write.
Signature = tuple[int, int, int, int] | None


def db_signature(path: Path) -> Signature:
    """The :data:`Signature` of the run directory ``path``'s database now."""
    try:
        st = (path / DB_NAME).stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass
class RunEntry:
    """One served run (``run`` is None when the folder entry is not readable: ``error``).

    ``signature`` is the database's as it was when the run was opened: once the file
    differs (the run probed again), :meth:`Registry.get` opens it again with a new entry,
    so nothing this one cached (its session's model, LRUs, derived data) is served for
    the new run, and :meth:`changed` tells the old entry's work not to write its results
    into the new run's ``cache/``.
    """

    id: str
    path: Path
    run: Run | None
    error: str | None = None
    session: Session | None = None
    signature: Signature = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _appearances: Appearances | None = field(default=None, repr=False)
    _graph_view: dict[str, Any] | None = field(default=None, repr=False)
    _counted: tuple[float, int] | None = field(default=None, repr=False)
    _sample_count: int | None = field(default=None, repr=False)
    _last_sample: int | None = field(default=None, repr=False)
    _additions: tuple[Signature, tuple[dict[str, str | None], dict[str, str]]] | None = field(
        default=None, repr=False
    )

    def __post_init__(self) -> None:
        if self.signature is None:
            self.signature = db_signature(self.path)

    def changed(self) -> bool:
        """Whether the run at this path is no longer the one this entry opened: probed
        again (another ``created``), or its probe went on (another status). A write that
        only adds to the run (``lurker featviz``, ``lurker map``) changes the database file
        but not the run: this entry reads it live, its model and caches kept."""
        now = db_signature(self.path)
        if now == self.signature:
            return False
        if (
            now is not None
            and self.signature is not None
            and now[:2] == self.signature[:2]  # the same file (a probe again makes a new one,
            # and this entry's open run keeps the old one's inode from being reused)
            and self.run is not None
            and Run.stored_identity(self.path) == self.run.identity
        ):
            self.signature = now  # the same run, added to
            return False
        return True

    @property
    def images_version(self) -> str | None:
        """A token of the run as this entry opened it: which probe made it (``created``,
        ``status``), its database file (device, inode: a probe again makes a new one) and
        its image cache (the marker file ``cache/.generation``, made here when missing: a
        cache deleted and filled again, say by a newer lurker, may hold other pictures
        under the same names, and has a new marker). The run's images (samples, top-k
        entries) change only with these, so an image URL carrying the token can be cached
        for good. None while the run is not complete, or when the marker cannot be made
        (a read-only run: its images are revalidated instead)."""
        if self.run is None or not self.run.complete or self.signature is None:
            return None
        marker = self.path / "cache" / GENERATION_MARKER
        try:
            st = marker.stat()
        except FileNotFoundError:
            try:
                marker.parent.mkdir(exist_ok=True)
                # made once, never touched again (a touch would change it under a token
                # another request just handed out)
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                st = marker.stat()
            except OSError:
                return None
        except OSError:
            return None
        # (a cache of unknown origin made the run's model's drops its files and this
        # marker: lurker.store.files.claim_cache; a browser never keeps the dropped ones)
        cache = (st.st_ino, st.st_ctime_ns)
        key = repr((*self.run.identity, *self.signature[:2], cache))
        return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]

    @property
    def generation(self) -> str:
        """A token of the run as this entry opened it: which probe made it and how far
        (``created``, ``status``) and its database file (a probe again makes a new one).
        A page compares it with the one it read to notice that the run changed under it
        (re-probed, or a resumed probe finished). Not the image cache: deleting
        ``cache/`` changes no value a page shows (only :attr:`images_version`)."""
        identity = self.run.identity if self.run is not None else (None, self.error)
        sig = self.signature[:2] if self.signature is not None else None
        key = repr((*identity, sig))
        return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]

    def additions(self) -> dict[str, str | None]:
        """:meth:`lurker.store.Run.additions` now (read again only when the database file
        changed: a page polls it every few seconds)."""
        return self._addition_tokens()[0]

    def featviz_layers(self) -> dict[str, str]:
        """:meth:`lurker.store.Run.featviz_tokens` now (cached as :meth:`additions`): a page
        of one layer looks only at its layer's token, so ``lurker featviz`` on another
        layer leaves it alone."""
        return self._addition_tokens()[1]

    def _addition_tokens(self) -> tuple[dict[str, str | None], dict[str, str]]:
        if self.run is None:
            return {"featviz": None, "map": None, "vocab": None}, {}
        now = db_signature(self.path)
        with self._lock:
            if self._additions is not None and self._additions[0] == now:
                return self._additions[1]
        # (a write between the two reads is seen by the next call: the signature taken
        # before them no longer matches)
        layers = self.run.featviz_tokens()
        added = self.run.additions(layers)
        # a probe again of a finished run stores a vocabulary without sweeping: the pages
        # showing ids (or other words) are out of date
        words = self.run.meta_now("vocab")
        added["vocab"] = (
            None if words is None else hashlib.sha256(json.dumps(words).encode()).hexdigest()[:16]
        )
        tokens = added, layers
        with self._lock:
            self._additions = (now, tokens)
        return tokens

    # -- lookups that raise 404s listing what exists -----------------------------------

    def open_run(self) -> Run:
        if self.run is None:
            raise ApiError(409, f"run {self.id!r} cannot be read: {self.error}")
        return self.run

    def layer(self, name: str) -> LayerInfo:
        run = self.open_run()
        for info in run.layers:
            if info.name == name:
                return info
        raise not_found("layer", name, [i.name for i in run.layers], f"in run {self.id!r}")

    def unit_index(self, info: LayerInfo, unit: int) -> int:
        if not 0 <= unit < info.num_units:
            raise ApiError(
                404,
                f"no unit {unit} in layer {info.name!r}: it has {info.num_units} units "
                f"(0..{info.num_units - 1})",
            )
        return unit

    def sample_count(self) -> int:
        if self._sample_count is None:
            self._sample_count = int(self.open_run()._query("SELECT count(*) FROM samples")[0][0])
        return self._sample_count

    def last_sample_id(self) -> int:
        """The largest sample id of the run (-1 when it has none)."""
        if self._last_sample is None:
            found = self.open_run()._query("SELECT max(id) FROM samples")[0][0]
            self._last_sample = -1 if found is None else int(found)
        return self._last_sample

    def sample_row(self, sample_id: int) -> tuple[int, str | None, int | None, str | None]:
        rows = self.open_run()._query(
            "SELECT s.id, s.path, s.label, c.name FROM samples s "
            "LEFT JOIN classes c ON c.id = s.label WHERE s.id = ?",
            (int(sample_id),),
        )
        if not rows:
            total = self.sample_count()
            near = self.sample_rows(0, 20)
            ids = [r[0] for r in near]
            raise ApiError(
                404,
                f"no sample {sample_id} in run {self.id!r}: it has {total} samples; ids: "
                f"{listing(ids, 20)}",
            )
        sid, path, label, cname = rows[0]
        return int(sid), path, label, cname

    def sample_rows(
        self, offset: int, limit: int
    ) -> list[tuple[int, str | None, int | None, str | None]]:
        return [
            (int(sid), path, label, cname)
            for sid, path, label, cname in self.open_run()._query(
                "SELECT s.id, s.path, s.label, c.name FROM samples s "
                "LEFT JOIN classes c ON c.id = s.label ORDER BY s.id LIMIT ? OFFSET ?",
                (int(limit), int(offset)),
            )
        ]

    # -- derived data, made once --------------------------------------------------------

    def layer_rows(
        self, info: LayerInfo
    ) -> tuple[list[tuple[int, float, float, int, int, bool, tuple[int, int] | None]], Any]:
        """``(unit, mean, max, top max sample, top mean sample, constant, that sample's peak
        (y, x) or None)`` per unit and the summed histogram counts, in one query (the layer
        page's payload)."""
        rows = self.open_run()._query(
            "SELECT unit, mean, max, hist, top FROM units WHERE layer_id = ? ORDER BY unit",
            (info.id,),
        )
        out = []
        total: np.ndarray | None = None
        positions = positions_per_sample(info)
        for unit, mean, mx, hist, top in rows:
            counts = from_blob(hist, HIST_DTYPE)
            if len(counts):
                total = counts.copy() if total is None else total + counts
            slots = np.frombuffer(bytes(top), TOP_DTYPE) if top is not None else None
            first_max = first_mean = -1
            constant = False
            peak = None
            if slots is not None and len(slots):
                half = len(slots) // 2
                first_max = int(slots["sample_id"][0])
                first_mean = int(slots["sample_id"][half])
                constant = slots_constant(mean, mx, slots, positions)
                if positions > 1 and first_max >= 0 and int(slots["y"][0]) >= 0:
                    peak = (int(slots["y"][0]), int(slots["x"][0]))
            out.append((int(unit), mean, mx, first_max, first_mean, constant, peak))
        return out, total

    def appearances(self) -> Appearances:
        """The inverted index of all top lists, built on first use (one query)."""
        with self._lock:
            if self._appearances is None:
                self._appearances = self._build_appearances()
            return self._appearances

    def _build_appearances(self) -> Appearances:
        run = self.open_run()
        samples = run.num_samples  # a list's tied tail needs more samples than it holds
        position = {info.id: i for i, info in enumerate(run.layers)}
        positions = {info.id: positions_per_sample(info) for info in run.layers}
        parts: dict[str, list[np.ndarray]] = {
            k: [] for k in ("sample", "layer", "unit", "which", "rank", "value")
        }
        # units constant on the dataset: their lists are ties, left out and counted per
        # sample and layer (``Appearances.left``)
        constant: set[tuple[int, int]] = set()
        left: dict[int, dict[int, int]] = {}
        tails: list[np.ndarray] = []

        def leave_out(ids: np.ndarray, layer: int) -> None:
            for sid in ids[ids >= 0].tolist():
                per = left.setdefault(int(sid), {})
                per[layer] = per.get(layer, 0) + 1

        # one layer's units at once (a ResNet-50 has 50,000 units: one numpy pass per
        # layer, not per unit, builds the index in a fraction of a second, not seconds)
        rows: dict[int, list[tuple[int, Any, Any, bytes]]] = {}
        for layer_id, unit, mean, mx, top in run._query(
            "SELECT layer_id, unit, mean, max, top FROM units"
        ):
            if top is None or layer_id not in position or not len(top):
                continue
            rows.setdefault(layer_id, []).append((int(unit), mean, mx, bytes(top)))
        for layer_id, unit_rows in rows.items():
            layer = position[layer_id]
            for same in _same_length(unit_rows):
                units = np.array([r[0] for r in same], np.int64)
                slots = np.frombuffer(b"".join(r[3] for r in same), TOP_DTYPE)
                slots = slots.reshape(len(same), -1)
                const = _slots_constant_rows(
                    [r[1] for r in same], [r[2] for r in same], slots, positions[layer_id]
                )
                for u in units[const].tolist():
                    constant.add((layer, u))
                sid = slots["sample_id"]
                leave_out(sid[const].ravel(), layer)  # the max and the mean list
                sid, val = sid[~const], slots["value"][~const]
                units = units[~const]
                keep = sid >= 0
                k = sid.shape[1] // 2
                for half in (slice(0, k), slice(k, sid.shape[1])):  # each list's tied tail
                    tail = _tied_tail_rows(val[:, half], keep[:, half], samples)
                    leave_out(sid[:, half][tail], layer)
                    tails.append(sid[:, half][tail])
                    keep[:, half] &= ~tail
                idx = np.broadcast_to(np.arange(sid.shape[1]), sid.shape)
                parts["sample"].append(sid[keep])
                parts["value"].append(val[keep])
                parts["which"].append((idx >= k)[keep].astype(np.int8))
                parts["rank"].append((idx % k)[keep].astype(np.int32))
                parts["layer"].append(np.full(int(keep.sum()), layer, np.int32))
                parts["unit"].append(
                    np.broadcast_to(units[:, None], sid.shape)[keep].astype(np.int32)
                )
        if run.has_relevance:  # the relevance-max lists: list 2
            for layer_id, unit, top in run._query("SELECT layer_id, unit, top FROM relevance"):
                if layer_id not in position:
                    continue
                layer = position[layer_id]
                slots = np.frombuffer(bytes(top), TOP_DTYPE)
                keep = slots["sample_id"] >= 0
                # a constant unit's relevance list is left out only if it is ties too (a
                # constant other than 0 may carry relevance that ranks samples)
                if (layer, int(unit)) in constant and _ties(slots["value"][keep]):
                    leave_out(slots["sample_id"], layer)
                    continue
                tail = _tied_tail(slots["value"], keep, samples)
                leave_out(slots["sample_id"][tail], layer)
                tails.append(slots["sample_id"][tail])
                keep &= ~tail
                n = int(keep.sum())
                parts["sample"].append(slots["sample_id"][keep])
                parts["value"].append(slots["value"][keep])
                parts["which"].append(np.full(n, 2, np.int8))
                parts["rank"].append(np.arange(len(slots), dtype=np.int32)[keep])
                parts["layer"].append(np.full(n, layer, np.int32))
                parts["unit"].append(np.full(n, unit, np.int32))
        tied = np.unique(np.concatenate(tails)) if tails else np.zeros(0, np.int64)
        if not parts["sample"]:
            empty = np.zeros(0, np.int64)
            return Appearances(empty, empty, empty, empty, empty, np.zeros(0), left, tied)
        cat = {k: np.concatenate(v) for k, v in parts.items()}
        order = np.lexsort((cat["unit"], cat["which"], cat["rank"], cat["layer"], cat["sample"]))
        return Appearances(*(cat[k][order] for k in parts), left, tied)

    def graph_view(self) -> dict[str, Any]:
        """``lurker.graph.view.graph_view(run.graph)`` with the probed layers named on their
        ops, made once per run."""
        with self._lock:
            if self._graph_view is None:
                try:
                    from lurker.graph.view import graph_view
                except ImportError:
                    raise ApiError(
                        501,
                        "this lurker has no graph view (lurker.graph.view is missing); "
                        "update lurker to browse the graph",
                    ) from None
                run = self.open_run()
                try:
                    graph = run.graph
                except MissingFromRunError as e:
                    raise ApiError(404, str(e)) from None
                layers = {info.op: info.name for info in run.layers if info.op}
                self._graph_view = graph_view(
                    graph, layers=layers, nonfinite=_nonfinite_samples(run.meta)
                )
            return self._graph_view

    def has_graph(self) -> bool:
        run = self.open_run()
        try:
            return run._has_graph() and bool(run._query("SELECT 1 FROM graph WHERE id = 1"))
        except StoreError:
            return False

    def missing(self) -> list[str]:
        """What the run lacks that newer runs hold (names of MissingFromRunError.missing)."""
        run = self.open_run()
        out = []
        if not self.has_graph():
            out.append("graph")
        if any(info._op_index is None for info in run.layers):
            out.append("op_index")
        return out

    def cached_images(self) -> int:
        """PNG files in the run's ``cache/`` (counted at most every 10 s: a big run has many)."""
        now = time.monotonic()
        if self._counted is not None and now - self._counted[0] < 10.0:
            return self._counted[1]
        count = 0
        stack = [self.path / "cache"]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    for e in it:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(Path(e.path))
                        elif e.name.endswith(".png"):
                            count += 1
            except OSError:
                continue
        self._counted = (now, count)
        return count


class Registry:
    """The runs of one server: a single run directory, or the run folders inside a folder."""

    def __init__(self, source: str | os.PathLike[str], sources: ModelSource | None = None):
        root = Path(source).expanduser()
        if not root.exists():
            raise NotServableError(root, "the path does not exist")
        if root.is_file() and root.name == DB_NAME:
            root = root.parent
        if not root.is_dir():
            raise NotServableError(
                root,
                f"it is a file; expected a run directory (holding {DB_NAME}, the --out of "
                "`lurker probe`) or a folder of run directories",
            )
        self.root = root
        self.single = (root / DB_NAME).is_file()
        folders = (
            [root]
            if self.single
            else sorted(p for p in root.iterdir() if p.is_dir() and (p / DB_NAME).is_file())
        )
        if not folders:
            holder = lock_holder(root)
            if holder is not None:  # a probe into it is still loading and tracing its model
                raise NotServableError(
                    root,
                    f"its probe is still starting (process {holder} holds the directory and "
                    f"has not created {DB_NAME} yet). Serve it when that process has finished",
                )
            raise NotServableError(
                root,
                f"it is neither a lurker run (no {DB_NAME} in it) nor a folder of runs (no "
                f"sub-folder holds a {DB_NAME}). Expected the --out directory of `lurker "
                "probe`, or a folder holding such directories.",
            )
        self.entries: dict[str, RunEntry] = {}
        self._lock = threading.Lock()
        for folder in folders:
            self._add(folder.resolve().name if folder == root else folder.name, folder)
        if self.single and self.entries[next(iter(self.entries))].run is None:
            entry = next(iter(self.entries.values()))
            raise NotServableError(root, str(entry.error))

    def _add(self, name: str, folder: Path) -> RunEntry:
        signature = db_signature(folder)  # before opening: a write meanwhile reopens it later
        try:
            run: Run | None = Run.open(folder)
            error = None
        except LurkerError as e:
            run, error = None, str(e)
        added = RunEntry(name, folder, run, error, signature=signature)
        self.entries[name] = added
        return added

    def refresh(self) -> None:
        """Serve the runs made in the folder since the server started (a probe that ran
        beside it), and open again those that could not be read (one half written then)."""
        if self.single:
            return
        with self._lock:
            for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
                known = self.entries.get(folder.name)
                if (known is None or known.run is None) and (folder / DB_NAME).is_file():
                    self._add(folder.name, folder)

    def get(self, run_id: str) -> RunEntry:
        """The run ``run_id``, opened again when its database changed since it was opened
        (a probe with ``overwrite=True`` into its directory): a new entry, with nothing
        the old one cached. The old entry is not closed: requests still using it finish
        on the run as it was."""
        entry = self.entries.get(run_id)
        if entry is not None and entry.changed():
            with self._lock:
                entry = self.entries[run_id]
                if entry.changed():
                    stale = entry
                    entry = self._add(run_id, entry.path)
                    # the old session points back at its entry: without the cycle, its
                    # model and thread go when the requests still using them finish
                    stale.session = None
        if entry is None:
            self.refresh()  # a run made since the server started
            entry = self.entries.get(run_id)
        if entry is None:
            raise not_found("run", run_id, list(self.entries))
        return entry

    def close(self) -> None:
        for entry in self.entries.values():
            if entry.run is not None:
                entry.run.close()
