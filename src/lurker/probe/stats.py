"""Streaming per-unit statistics for the probe: a few kernels per layer per batch.

The probe sweeps a dataset once; for every unit (channel) of a layer :class:`UnitStats` keeps
the top-k samples by spatial mean and by spatial max (with the peak's position), per-class mean
activations, a histogram of spatial means, and dataset mean/max. Memory is independent of the
dataset size.

Off the CPU an update only reads the activation while it is live: one ``mean`` and one ``max``
(values and first-maximum indices) per batch, written with two small copies (sample ids,
labels) into preallocated buffers on the activation's device; no host sync. The real work (order
keys, top-k merge, class sums, histograms) runs over all buffered samples at once when the
buffer is full, and before anything reads or combines the state, so its ~30 kernels are paid
once per ``buffer_samples`` samples instead of once per batch. On the CPU, where every torch
call costs tens of microseconds, two compiled calls per batch do all of it at once (see
:mod:`lurker.probe._kernels`; without numba the CPU takes the buffered path too).

Top-k ordering is value descending, then sample id ascending. To make that rule cheap and exact,
each (value, sample id) pair is packed into one int64 *order key* whose integer order is exactly
that rule (see :func:`_encode`): top-k then is a single ``torch.topk`` over unique keys, which is
deterministic no matter how ties, batches, buffers, shards or ranks are arranged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

# lurker.probe._kernels once the first CPU UnitStats loads it (numba takes a second to
# import, which a trace alone should not pay); False if numba is missing.
_kernels: Any = None


def _cpu_kernels() -> Any:
    """The compiled CPU kernels, or None without numba (the CPU then takes the buffered
    torch path, which is slower)."""
    global _kernels
    if _kernels is None:
        try:
            from . import _kernels as kernels
        except ImportError:
            kernels = False
        _kernels = kernels
    return _kernels or None


__all__ = ["HostBatch", "UnitStats"]

_SHIFT = 1 << 32  # the value half of an order key sits above bit 32
_ID_MASK = (1 << 32) - 1  # ids are stored as ``_ID_MASK - id`` so smaller ids rank higher
_EMPTY = -(1 << 63)  # key of an unfilled slot: below every real (value, id) pair
_STATE_FORMAT = 1
_INT32_MAX = (1 << 31) - 1
# Default buffer length (samples) and size cap (bytes) of one layer, off the CPU and on it: on a
# GPU a longer buffer means fewer kernel launches; the CPU gains little beyond 1024 samples.
_BUFFER = {False: (4096, 64 << 20), True: (1024, 16 << 20)}


def _encode(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Pack float32 ``values`` (..., B) and int64 ``ids`` (B,) into int64 order keys.

    The float's bit pattern is mapped to an int32 with the same order (flip the magnitude bits of
    negatives), shifted into the high half; the low half holds ``2**32 - 1 - id``. So a larger key
    means a larger value, or an equal value and a smaller id: the tie rule in one integer, which
    ``topk`` can select without any stable-sort gymnastics. ``-0.0`` is folded into ``+0.0`` and
    NaNs into one positive NaN (ranked above ``+inf``, as ``torch.sort`` ranks it) so that values
    that compare equal get equal high halves.
    """
    v = torch.empty(values.shape, dtype=torch.float32, device=values.device)
    torch.add(values, 0.0, out=v)  # contiguous whatever the layout of ``values``
    nan = torch.isnan(v)
    if v.device.type != "cpu" or bool(nan.any()):  # a free check on the CPU, a sync elsewhere
        v.masked_fill_(nan, math.nan)
    bits = v.view(torch.int32)
    flip = bits >> 31
    bits ^= flip.bitwise_and_(0x7FFFFFFF)
    return torch.add(_ID_MASK - ids, bits, alpha=_SHIFT)  # int64: high half value, low half id


class HostBatch:
    """A batch's sample ids and class rows (unlabelled: ``num_classes``) as checked int64
    arrays for the CPU kernels, made once for all the layers the batch is handed to
    (:meth:`UnitStats.update`). The values are copied: the caller may refill its tensors."""

    __slots__ = ("ids", "num_classes", "rows")

    def __init__(self, sample_ids: torch.Tensor, labels: torch.Tensor | None, num_classes: int):
        ids = sample_ids.detach().to("cpu", torch.int64).numpy()
        if ((ids < 0) | (ids > _ID_MASK)).any():
            raise ValueError("sample_ids must lie in [0, 2**32)")
        if labels is None:
            rows = np.full(ids.shape, num_classes, dtype=np.int64)
        else:
            given = labels.detach().to("cpu", torch.int64).numpy()
            if (given >= num_classes).any():  # the kernels index class rows with them
                raise ValueError(f"labels must be < num_classes={num_classes}")
            rows = np.where(given < 0, num_classes, given)
        self.ids = ids.copy()
        self.rows = rows
        self.num_classes = num_classes


def _decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert :func:`_encode`: (values float32, ids int64), unfilled slots as (-inf, -1)."""
    high = torch.div(keys, _SHIFT, rounding_mode="floor")
    ids = _ID_MASK - (keys - high * _SHIFT)
    bits = high.to(torch.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    empty = keys == _EMPTY
    values = bits.view(torch.float32).masked_fill(empty, -math.inf)
    return values, ids.masked_fill(empty, -1)


def _auto_range(lo: float, hi: float) -> tuple[float, float]:
    """Pad a first-batch [lo, hi] by 10% of its span (equal bounds: by max(10% of |lo|, 1))."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return (-1.0, 1.0)
    span = hi - lo
    pad = 0.1 * span if span > 0 else max(0.1 * abs(lo), 1.0)
    return (lo - pad, hi + pad)


def _check_range(hist_range: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in hist_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"hist_range must be finite with lo < hi, got {hist_range!r}")
    return (lo, hi)


class UnitStats:
    """Running statistics of every unit of one layer, updated once per batch for all units.

    ``update`` takes the layer's output for a batch, shaped (B, C), (B, C, L) or (B, C, H, W);
    a unit's *spatial mean* and *spatial max* are taken over its L or H*W positions (a (B, C)
    output has one position). Kept per unit:

    * top-k samples by spatial mean, and top-k by spatial max with the peak's (y, x) (the first
      maximal position in row-major order; 1-D maps give y = 0, (B, C) maps y = x = 0), ordered
      by value descending then sample id ascending;
    * sum and count of spatial means per class (labels < 0 are unlabelled and skipped);
    * count, sum of spatial means, max of spatial maxima;
    * a histogram of spatial means with ``hist_bins`` equal bins over ``hist_range``. Values
      outside the range are clamped into the edge bins *and* counted in ``hist_underflow`` /
      ``hist_overflow``; NaN means are left out of the histogram.

    If ``hist_range`` is None the range is fixed by the first non-empty batch (min/max of its
    finite spatial means over all units, padded by 10% of the span; equal bounds are widened by
    max(10% of |value|, 1)). That costs the one host sync of the whole sweep, paid when the first
    buffer is folded in or :attr:`hist_range` is read, whichever comes first. Because it depends on
    the first batch, the histograms of states with different ranges cannot be combined:
    :meth:`merge` and :meth:`all_reduce` raise ValueError then. For several shards or ranks either
    pass ``hist_range`` or call :meth:`set_hist_range_from` with each rank's first batch before
    any update: it MIN/MAX-reduces the range across ranks so all agree, and equals what a single
    process would fix from the union of those batches.

    Sample ids must be unique over the dataset and lie in [0, 2**32) (checked only when they come
    on the CPU, to avoid device syncs); a sample seen twice (e.g. DistributedSampler padding)
    would be counted twice. Sums are accumulated in float64 (float32 on MPS, which lacks float64).

    Off the CPU updates are buffered: each batch's per-unit spatial means, maxima and
    first-maximum indices are written into device buffers for ``buffer_samples`` samples and
    folded into the statistics when the buffer is full, or when :meth:`result`,
    :meth:`state_dict`, :meth:`merge` or :meth:`all_reduce` need them. The default is 4096
    samples, fewer for wide layers so that a buffer stays within 64 MiB (16 bytes a sample and
    unit); on the CPU, which folds every batch in at once with compiled kernels and buffers only
    when numba is missing, 1024 and 16 MiB. Results do not depend on ``buffer_samples``, except
    sums by float rounding; a batch larger than the buffer is folded in directly.
    """

    def __init__(
        self,
        num_units: int,
        k: int,
        num_classes: int,
        *,
        device: torch.device | str,
        hist_bins: int = 64,
        hist_range: tuple[float, float] | None = None,
        buffer_samples: int | None = None,
    ) -> None:
        if num_units < 1 or k < 1 or num_classes < 0 or hist_bins < 1:
            raise ValueError(
                "UnitStats needs num_units >= 1, k >= 1, num_classes >= 0, hist_bins >= 1; got "
                f"num_units={num_units}, k={k}, num_classes={num_classes}, hist_bins={hist_bins}"
            )
        cpu = torch.device(device).type == "cpu"
        if buffer_samples is None:
            # 16 bytes per sample and unit: float32 mean and max, int64 peak index
            most, size = _BUFFER[cpu]
            buffer_samples = max(1, min(most, size // (16 * num_units)))
        elif buffer_samples < 1:
            raise ValueError(f"buffer_samples must be >= 1, got {buffer_samples}")
        self.num_units = num_units
        self.k = k
        self.num_classes = num_classes
        self.hist_bins = hist_bins
        self.device = torch.device(device)
        self._acc = torch.float32 if self.device.type == "mps" else torch.float64
        # The CPU folds each batch in at once with compiled kernels (see _update_fused).
        self._fused = cpu and _cpu_kernels() is not None
        dev, c, i64 = self.device, num_units, torch.int64
        # The state is laid out so that folding in a buffer needs as few kernels as possible:
        self._count = 0  # a host int: batch sizes are known on the host, so this never syncs
        # Order keys of the top-k by spatial mean ([0]) and by spatial max ([1]), best first; the
        # dataset max of a unit is its best max key, so it needs no state of its own.
        self._keys = torch.full((2, c, k), _EMPTY, dtype=i64, device=dev)
        self._max_pos = torch.full((c, k), -1, dtype=i64, device=dev)  # y * 2**32 + x
        # Sums/counts per class plus a last row for unlabelled samples: together they are the
        # dataset sums, so one matmul and one index_add_ serve both.
        self._class_sum = torch.zeros((num_classes + 1, c), dtype=self._acc, device=dev)
        self._class_count = torch.zeros(num_classes + 1, dtype=i64, device=dev)
        self._one = torch.ones(1, dtype=i64, device=dev)
        # Histogram with an underflow column in front and an overflow column behind, so that a
        # single bucketize + index_add_ also counts the out-of-range values. int32 on the CPU
        # path (half the memory its fold touches per batch), widened before it could overflow.
        hist_dtype = torch.int32 if self._fused else i64
        self._hist = torch.zeros((c, hist_bins + 2), dtype=hist_dtype, device=dev)
        self._bin_offsets = torch.arange(c, dtype=i64, device=dev) * (hist_bins + 2)
        self._range: tuple[float, float] | None = None
        self._edges: torch.Tensor | None = None  # hist_bins + 1 float32 edges
        self._search: torch.Tensor | None = None  # the edges, last one nudged to just above hi
        if hist_range is not None:
            self._set_range(_check_range(hist_range))
        # The sample buffer, allocated by the first update: per-sample spatial means ([0]) and
        # maxima ([1]) as (2, n, C), flat first-maximum indices (n, C), sample ids and labels.
        self.buffer_samples = buffer_samples
        self._buf: torch.Tensor | None = None
        self._buf_pos: torch.Tensor | None = None
        self._buf_ids: torch.Tensor | None = None
        self._buf_labels: torch.Tensor | None = None
        self._n = 0  # buffered samples
        self._width = 1  # map width of the buffered samples (to split flat indices into y, x)
        self._first = 0  # while the range is automatic and unfixed: the first batch's size
        # see _update_fused: scratch arrays, and numpy views of the state (not pickled: a
        # copy's views would no longer share the state's memory)
        self._scratch: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._views: tuple[tuple[Any, ...], list[np.ndarray]] | None = None

    # ------------------------------------------------------------------ histogram range

    @property
    def hist_range(self) -> tuple[float, float] | None:
        """The histogram's (lo, hi), or None while it is still to be fixed by the first batch."""
        self._fix_pending_range()
        return self._range

    def _fix_pending_range(self) -> None:
        """Fix an automatic range from the buffered first batch, if that is still to be done."""
        if self._range is None and self._first:
            assert self._buf is not None
            self._range_from_means(self._buf[0, : self._first])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_views"] = state["_scratch"] = None
        return state

    def _range_from_means(self, means: torch.Tensor) -> None:
        finite = torch.isfinite(means)
        lo = torch.where(finite, means, math.inf).amin()
        hi = torch.where(finite, means, -math.inf).amax()
        self._set_range(_auto_range(*torch.stack([lo, hi]).tolist()))  # the one host sync
        self._first = 0

    def _set_range(self, hist_range: tuple[float, float]) -> None:
        # Edges are computed on the CPU in float64 so every device and rank gets identical bits.
        self._range = hist_range
        edges = torch.linspace(*hist_range, self.hist_bins + 1, dtype=torch.float64)
        edges = edges.to(torch.float32)
        # bucketize(right=True) against these gives 0 for v < lo, bins + 1 for v > hi (v >= the
        # next float above hi), and i + 1 for v in bin i, where the top bin includes hi itself.
        search = edges.clone()
        search[-1] = torch.nextafter(edges[-1], torch.tensor(math.inf))
        self._edges, self._search = edges.to(self.device), search.to(self.device)

    def set_hist_range_from(self, act: torch.Tensor, group: Any = None) -> None:
        """Fix the histogram range from ``act`` as the first batch would, agreed across ranks.

        When torch.distributed is initialized the local min/max are MIN/MAX all-reduced over
        ``group`` (a rank may pass an empty batch), so every rank gets the same range: the one a
        single process would fix from all ranks' batches together. Collective: call on all ranks.
        """
        self._fix_pending_range()
        if self._range is not None:
            raise ValueError(f"the histogram range is already fixed at {self._range}")
        means = self._maps(act)[0].mean(dim=2)
        if means.numel():
            finite = torch.isfinite(means)
            lo = torch.where(finite, means, math.inf).amin()
            lo_hi = torch.stack([-lo, torch.where(finite, means, -math.inf).amax()])
        else:  # an empty shard contributes nothing to the MAX reduction
            lo_hi = torch.full((2,), -math.inf, device=self.device)
        if _dist_active():
            torch.distributed.all_reduce(lo_hi, torch.distributed.ReduceOp.MAX, group=group)
        neg_lo, hi = lo_hi.tolist()
        self._set_range(_auto_range(-neg_lo, hi))

    # ------------------------------------------------------------------ update

    def _maps(self, act: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The (B, C, S) float32 maps on our device, and the map width."""
        if act.dim() not in (2, 3, 4):
            raise ValueError(
                f"activation must be (B, C), (B, C, L) or (B, C, H, W); got shape {tuple(act.shape)}"
            )
        if act.shape[1] != self.num_units:
            raise ValueError(
                f"activation has {act.shape[1]} units (shape {tuple(act.shape)}), "
                f"UnitStats was built for {self.num_units}"
            )
        if act.dim() > 2 and act[0, 0].numel() == 0:
            raise ValueError(
                f"activation maps have no positions (shape {tuple(act.shape)}): nothing to "
                "take a mean or max of"
            )
        flat = act.detach().to(device=self.device, dtype=torch.float32)
        return flat.reshape(*act.shape[:2], -1), act.shape[-1] if act.dim() > 2 else 1

    def update(
        self,
        act: torch.Tensor,
        sample_ids: torch.Tensor,
        labels: torch.Tensor | None,
        *,
        host: HostBatch | None = None,
    ) -> None:
        """Fold one batch of a layer's output into the statistics of all its units at once.

        ``sample_ids`` are the batch's int64 global dataset indices (B,), ``labels`` its int64
        class indices (B,) or None to skip class statistics. ``act`` is read during the call
        (later in-place changes to it do not matter). Off the CPU the call costs four kernels
        (mean, max with indices, two small copies into the buffer) and no host sync, and the
        rest of the work waits until the buffer is folded in; on the CPU two compiled calls do
        all of it at once (see :meth:`_update_fused`). A caller that hands one batch to many
        layers may pass ``host=HostBatch(sample_ids, labels, num_classes)``, made once.
        """
        flat, width = self._maps(act)
        b = act.shape[0]
        if sample_ids.shape != (b,):
            raise ValueError(f"sample_ids must have shape ({b},), got {tuple(sample_ids.shape)}")
        if labels is not None and labels.shape != (b,):
            raise ValueError(f"labels must have shape ({b},), got {tuple(labels.shape)}")
        if b == 0:
            return
        if self._fused:
            kernels = _cpu_kernels()  # (an unpickled state has not loaded them yet)
            if kernels is not None:
                if host is None or host.num_classes != self.num_classes or len(host.ids) != b:
                    host = HostBatch(sample_ids, labels, self.num_classes)  # (kernels index by b)
                self._update_fused(kernels, flat, width, host.ids, host.rows)
                return
            self._fused = False  # unpickled where numba is missing: the torch path from now on
            self._hist = self._hist.to(torch.int64)
        # Range checks need the values on the host: only done when they already are (no sync).
        if sample_ids.device.type == "cpu":
            wide = sample_ids.to(torch.int64)  # int32 ids would wrap in the comparison
            if bool(((wide < 0) | (wide > _ID_MASK)).any()):
                raise ValueError("sample_ids must lie in [0, 2**32)")
        labels_cpu = labels is not None and labels.device.type == "cpu"
        if labels_cpu and bool((labels >= self.num_classes).any()):
            raise ValueError(f"labels must be < num_classes={self.num_classes}")
        if b > self.buffer_samples:  # too big to buffer: fold it in on its own
            self._flush()
            stat, pos = self._alloc(b)
            self._read(flat, stat, pos)
            ids = sample_ids.to(device=self.device, dtype=torch.int64)
            if labels is None:
                rows = torch.full((b,), -1, dtype=torch.int64, device=self.device)
            else:
                rows = labels.to(device=self.device, dtype=torch.int64)
            self._fold(stat, pos, ids, rows, width, b)
            return
        if self._n and (self._n + b > self.buffer_samples or width != self._width):
            self._flush()
        if self._buf is None:
            cap, dev = self.buffer_samples, self.device
            self._buf, self._buf_pos = self._alloc(cap)
            self._buf_ids = torch.empty(cap, dtype=torch.int64, device=dev)
            self._buf_labels = torch.empty(cap, dtype=torch.int64, device=dev)
        assert self._buf_pos is not None and self._buf_ids is not None
        assert self._buf_labels is not None
        at = slice(self._n, self._n + b)
        self._read(flat, self._buf[:, at], self._buf_pos[at])
        self._buf_ids[at].copy_(sample_ids)
        if labels is None:
            self._buf_labels[at].fill_(-1)
        else:
            self._buf_labels[at].copy_(labels)
        if self._range is None and not self._n:
            self._first = b  # the first batch fixes the automatic range
        self._n += b
        self._width = width

    def _update_fused(
        self, kernels: Any, flat: torch.Tensor, width: int, ids: np.ndarray, rows: np.ndarray
    ) -> None:
        """The CPU's update, unbuffered: two compiled calls read the (B, C, S) maps once and
        fold them in (top-k, peaks, class sums and counts, histogram); ``ids`` and ``rows``
        come from a :class:`HostBatch`; ``kernels`` is :mod:`lurker.probe._kernels`."""
        x = flat.contiguous()
        b, c, size = x.shape
        if self._range is None:
            self._range_from_means(x.mean(dim=2))
        assert self._search is not None
        self._widen_hist(self._count + b)
        maps = x.view(b * c, size).numpy()
        bits = maps.view(np.int32)
        scratch = self._scratch  # per-map means and peak bit patterns, kept between batches
        if scratch is None or len(scratch[0]) != b * c:
            means = np.empty(b * c, np.float32)
            scratch = self._scratch = (means, means.view(np.int32), np.empty(b * c, np.int32))
        means, mean_bits, peaks = scratch
        state = (
            self._keys, self._max_pos, self._class_sum, self._class_count, self._hist,
            self._search,
        )  # fmt: skip
        views = self._views  # numpy views of the state, written in place; remade if replaced
        if views is None or any(a is not b for a, b in zip(views[0], state)):
            views = self._views = (state, [t.numpy() for t in state])
        with kernels.lock:
            kernels.use_threads(torch.get_num_threads())
            kernels.read(maps, bits, means, peaks)
            kernels.fold(bits, means, mean_bits, peaks, ids, rows, *views[1], width)
        self._count += b

    def _widen_hist(self, count: int) -> None:
        """Make the histogram int64 if ``count`` samples could overflow an int32 bin."""
        if self._hist.dtype != torch.int64 and count > _INT32_MAX:
            self._hist = self._hist.to(torch.int64)

    def _alloc(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Room for n samples: stat (2, n, C) float32, flat peak indices (n, C) int64, sample-
        major so that an update writes contiguous rows."""
        c, dev = self.num_units, self.device
        stat = torch.empty((2, n, c), dtype=torch.float32, device=dev)
        return stat, torch.empty((n, c), dtype=torch.int64, device=dev)

    def _read(self, flat: torch.Tensor, stat: torch.Tensor, pos: torch.Tensor) -> None:
        """Spatial means and maxima of (B, C, S) maps into ``stat`` (2, B, C), and the flat
        index of each map's first maximum (row-major) into ``pos`` (B, C): two kernels."""
        torch.mean(flat, dim=2, out=stat[0])
        torch.max(flat, dim=2, out=(stat[1], pos))

    def _flush(self) -> None:
        """Fold the buffered samples into the statistics and empty the buffer."""
        if not self._n:
            return
        assert self._buf is not None and self._buf_pos is not None
        assert self._buf_ids is not None and self._buf_labels is not None
        n, self._n = self._n, 0
        self._fold(
            self._buf[:, :n],
            self._buf_pos[:n],
            self._buf_ids[:n],
            self._buf_labels[:n],
            self._width,
            self._first,
        )

    def _fold(
        self,
        stat: torch.Tensor,
        pos: torch.Tensor,
        ids: torch.Tensor,
        labels: torch.Tensor,
        width: int,
        first: int,
    ) -> None:
        """Fold n samples into the statistics: ``stat`` (2, n, C) spatial means and maxima,
        ``pos`` (n, C) flat first-maximum indices in maps ``width`` wide, ``ids`` and
        ``labels`` (n,) (label < 0: unlabelled). If the range is still automatic, the first
        ``first`` samples are the first batch, which fixes it."""
        if self._range is None:
            self._range_from_means(stat[0, :first])
        n = ids.shape[0]
        # Class counts; unlabelled samples go to the extra last row.
        rows = labels.masked_fill(labels < 0, self.num_classes)
        self._class_count.index_add_(0, rows, self._one.expand(n))
        self._count += n
        c = self.num_units
        # Top-k by mean and by max together: keep the best min(k, n) keys per unit of the new
        # samples, then re-select k from the current top-k and those. The max side carries the
        # peak positions, split into y * 2**32 + x for the candidates only.
        keys = _encode(stat.transpose(1, 2), ids)  # (2, c, n), contiguous
        kn = min(self.k, n)
        cand = pos.T  # (c, n)
        if kn < n:
            keys, sel = keys.topk(kn, dim=2, sorted=False)
            cand = cand.gather(1, sel[1])
        y = torch.div(cand, width, rounding_mode="floor")  # also for width 1: (H, 1) maps
        cand = torch.add(torch.sub(cand, y, alpha=width), y, alpha=_SHIFT)
        top = torch.cat([self._keys, keys], dim=2).topk(self.k, dim=2)
        self._keys = top.values
        self._max_pos = torch.cat([self._max_pos, cand], 1).gather(1, top.indices[1])

        # Class sums as a one-hot matmul in float32 (deterministic, unlike atomic index_add_ on
        # GPUs); across folds they accumulate in float64. Non-finite means go in apart, lest
        # 0 * inf put NaN into every class: their sum does not depend on order.
        means = stat[0]  # (n, c)
        finite = torch.isfinite(means)
        onehot = torch.zeros((n, self.num_classes + 1), dtype=stat.dtype, device=self.device)
        onehot.scatter_(1, rows[:, None], 1.0)
        self._class_sum.add_(onehot.T @ means.where(finite, 0.0))
        self._class_sum.index_add_(0, rows, means.where(~finite, 0.0).to(self._acc))

        # Histogram: under- and overflow columns included, NaN means left out. bucketize with
        # right=True gives 0 below lo, bins + 1 above hi, i + 1 in bin i.
        assert self._search is not None
        cols = torch.bucketize(means.contiguous(), self._search, right=True)
        cols += self._bin_offsets[:c]
        weights = (means == means).to(torch.int64)
        self._hist.view(-1).index_add_(0, cols.reshape(-1), weights.reshape(-1))

    # ------------------------------------------------------------------ combining states

    def _check_compatible(self, other: UnitStats) -> None:
        mine = (self.num_units, self.k, self.num_classes, self.hist_bins)
        theirs = (other.num_units, other.k, other.num_classes, other.hist_bins)
        if mine != theirs:
            raise ValueError(
                f"cannot merge UnitStats (num_units, k, num_classes, hist_bins)={theirs} "
                f"into {mine}"
            )
        if self._range is not None and other._range is not None and self._range != other._range:
            raise ValueError(
                f"cannot merge histograms over different ranges {other._range} and {self._range};"
                " pass hist_range or use set_hist_range_from so that all shards agree"
            )

    def _reselect(self, keys: torch.Tensor, pos: torch.Tensor) -> None:
        """Keep the best k of candidate keys (2, C, n) and the max side's positions (C, n)."""
        top = keys.topk(self.k, dim=2)
        self._keys = top.values
        self._max_pos = pos.gather(1, top.indices[1])

    def merge(self, other: UnitStats) -> None:
        """Fold ``other`` (e.g. another data shard's state) into this one.

        The result equals a single pass over both shards' data: top-k is re-selected from the
        union of both candidate sets with the same order keys, sums and counts add up.
        """
        self._flush()
        other._flush()
        self._check_compatible(other)
        if self._range is None and other._range is not None:
            self._set_range(other._range)
        dev = self.device
        self._reselect(
            torch.cat([self._keys, other._keys.to(dev)], dim=2),
            torch.cat([self._max_pos, other._max_pos.to(dev)], dim=1),
        )
        self._count += other._count
        self._class_sum += other._class_sum.to(device=dev, dtype=self._acc)
        self._class_count += other._class_count.to(dev)
        self._widen_hist(self._count)
        self._hist += other._hist.to(dev, self._hist.dtype)

    def all_reduce(self, group: Any = None) -> None:
        """Merge the states of all ranks of ``group`` in place; every rank ends with the result.

        Collective: call on all ranks. Top-k candidates are all-gathered and re-selected (the
        dataset max comes with them); sums, counts and histograms are SUM-reduced. Tensors live
        on ``self.device``, so the backend must support it (gloo: CPU, nccl: CUDA). Layouts and
        histogram ranges are checked across ranks first; on a mismatch every rank raises
        ValueError. Ranks that have no range yet (no data) adopt the others'.
        """
        self._flush()
        dist = torch.distributed
        world = dist.get_world_size(group)
        dev = self.device
        has_range = float(self._range is not None)
        lo, hi = self._range if self._range is not None else (0.0, 0.0)
        meta = torch.tensor(
            [self.num_units, self.k, self.num_classes, self.hist_bins, has_range, lo, hi],
            dtype=torch.float64,
            device=dev,
        )
        metas = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(metas, meta, group=group)
        table = torch.stack(metas).cpu()
        if not bool((table[:, :4] == table[0, :4]).all()):
            raise ValueError(
                "all_reduce: ranks disagree on (num_units, k, num_classes, hist_bins): "
                f"{table[:, :4].tolist()}"
            )
        ranges = {(r[5], r[6]) for r in table.tolist() if r[4]}
        if len(ranges) > 1:
            raise ValueError(
                f"all_reduce: ranks have different histogram ranges {sorted(ranges)}; pass "
                "hist_range or call set_hist_range_from on all ranks before the first update"
            )
        if ranges and self._range is None:
            self._set_range(ranges.pop())

        cands = torch.cat([self._keys, self._max_pos[None]])  # (3, C, k)
        gathered = [torch.empty_like(cands) for _ in range(world)]
        dist.all_gather(gathered, cands, group=group)
        allc = torch.cat(gathered, dim=2)
        self._reselect(allc[:2], allc[2])

        count = torch.tensor([self._count], dtype=torch.int64, device=dev)
        ints = torch.cat([count, self._class_count, self._hist.view(-1).to(torch.int64)])
        dist.all_reduce(ints, group=group)
        self._count = int(ints[0])
        self._widen_hist(self._count)
        self._class_count.copy_(ints[1 : self.num_classes + 2])
        self._hist.view(-1).copy_(ints[self.num_classes + 2 :])
        dist.all_reduce(self._class_sum, group=group)

    # ------------------------------------------------------------------ persistence

    _TENSORS = ("keys", "max_pos", "class_sum", "class_count", "hist")

    def state_dict(self) -> dict[str, torch.Tensor | int | tuple[float, float] | None]:
        """Everything needed to resume or merge later, as CPU tensors and plain values.

        The layout is internal (top-k as order keys, an unlabelled row in the class sums, under-
        and overflow columns in the histogram); use :meth:`result` to read statistics. Buffered
        samples are folded in first, so the state holds everything seen so far.
        """
        self._flush()
        state: dict[str, torch.Tensor | int | tuple[float, float] | None] = {
            "format": _STATE_FORMAT,
            "num_units": self.num_units,
            "k": self.k,
            "num_classes": self.num_classes,
            "hist_bins": self.hist_bins,
            "hist_range": self._range,
            "count": self._count,
        }
        for name in self._TENSORS:
            state[name] = getattr(self, "_" + name).detach().to("cpu", copy=True)
        return state

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Any],
        device: torch.device | str = "cpu",
        *,
        buffer_samples: int | None = None,
    ) -> UnitStats:
        """Rebuild a state saved by :meth:`state_dict` on ``device``."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"unsupported UnitStats state format {state.get('format')!r}")
        stats = cls(
            int(state["num_units"]),
            int(state["k"]),
            int(state["num_classes"]),
            device=device,
            hist_bins=int(state["hist_bins"]),
            hist_range=state["hist_range"],
            buffer_samples=buffer_samples,
        )
        stats._count = int(state["count"])
        stats._widen_hist(stats._count)
        for name in cls._TENSORS:
            mine = getattr(stats, "_" + name)
            saved = state[name]
            if tuple(saved.shape) != tuple(mine.shape):
                raise ValueError(
                    f"state {name!r} has shape {tuple(saved.shape)}, expected {tuple(mine.shape)}"
                )
            # a copy: updates write into the state in place, never into the caller's tensors
            setattr(stats, "_" + name, saved.to(device=stats.device, dtype=mine.dtype, copy=True))
        return stats

    # ------------------------------------------------------------------ output

    def result(self) -> dict[str, torch.Tensor]:
        """Final statistics as CPU tensors (C = num_units).

        ``mean_values/mean_ids`` and ``max_values/max_ids/max_y/max_x`` are (C, k), best first;
        unfilled slots hold value -inf and id/y/x -1. ``class_mean`` is (C, num_classes), NaN for
        classes without samples; ``class_count`` (num_classes,). ``unit_mean`` (NaN before any
        data) and ``unit_max`` (-inf before any data) are (C,), ``count`` a scalar. ``hist`` is
        (C, hist_bins) over ``hist_edges`` (hist_bins + 1,; NaN while no range is fixed), its edge
        bins including the clamped out-of-range values, which ``hist_underflow`` and
        ``hist_overflow`` (C,) count. Folds in the buffered samples first.
        """
        self._flush()
        keys = self._keys.cpu()
        mean_values, mean_ids = _decode(keys[0])
        max_values, max_ids = _decode(keys[1])
        pos = self._max_pos.cpu()
        empty = keys[1] == _EMPTY
        y = torch.div(pos, _SHIFT, rounding_mode="floor").masked_fill(empty, -1)
        x = (pos % _SHIFT).masked_fill(empty, -1)
        class_sum = self._class_sum.cpu().double()
        class_count = self._class_count.cpu()
        class_mean = class_sum[:-1] / class_count[:-1, None].double()
        unit_mean = class_sum.sum(dim=0) / self._count
        ext = self._hist.cpu().to(torch.int64)
        hist = ext[:, 1:-1].clone()
        hist[:, 0] += ext[:, 0]
        hist[:, -1] += ext[:, -1]
        if self._edges is None:
            edges = torch.full((self.hist_bins + 1,), math.nan)
        else:
            edges = self._edges.cpu()
        return {
            "mean_values": mean_values,
            "mean_ids": mean_ids,
            "max_values": max_values,
            "max_ids": max_ids,
            "max_y": y,
            "max_x": x,
            "class_mean": class_mean.T.to(torch.float32).contiguous(),
            "class_count": class_count[:-1].clone(),
            "unit_mean": unit_mean.to(torch.float32),
            "unit_max": max_values[:, 0].clone(),
            "count": torch.tensor(self._count, dtype=torch.int64),
            "hist": hist,
            "hist_edges": edges,
            "hist_underflow": ext[:, 0].clone(),
            "hist_overflow": ext[:, -1].clone(),
        }


def _dist_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()
