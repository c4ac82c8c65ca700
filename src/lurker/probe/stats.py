"""Streaming per-unit statistics for the probe: a few kernels per layer per batch.

The probe sweeps a dataset once; for every unit (channel) of a layer :class:`UnitStats` keeps
the top-k samples by spatial mean and by spatial max (each with the sample's peak position), per-class mean
activations, a histogram of spatial means on a canonical grid (see :func:`_grid`), and dataset
mean/max. Memory is independent of the dataset size.

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
# 3: peaks of the mean list's entries too; 2: histograms on a canonical grid, peaks of the max
# list only; 1: histograms over a range fixed by the first batch
_STATE_FORMAT = 3
# statistics formats of older lurkers that a resume refuses, and why they cannot be used
OLDER_FORMATS = {
    1: "whose histograms used a range fixed by the first batch and clamped the values "
    "outside it, and cannot be converted to order-independent histograms",
    2: "which kept no peak positions for the mean lists' entries (they cannot be made up "
    "for the samples already swept)",
}
_E_MIN = -149  # the finest histogram bin: 2**-149, float32's spacing near zero
_EXTRA = 3  # histogram columns after the bins: -inf, +inf and NaN means
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


def _grid(lo: float, hi: float, bins: int) -> tuple[int, int]:
    """The canonical histogram grid ``(e, m)`` of finite values spanning ``[lo, hi]``.

    Bins are ``2**e`` wide with edges ``(m + i) * 2**e`` for i in 0..bins, and ``e`` is the
    smallest integer such that ``floor(hi / 2**e) - floor(lo / 2**e) < bins`` and ``2**e`` is
    no finer than the float32 spacing at ``max(|lo|, |hi|)`` (``2**-149`` near zero);
    ``m = floor(lo / 2**e)``. So every value lies in a half-open bin ``[edge_i, edge_i+1)``
    and the grid depends only on the extremes of the values, never on how they arrived: when
    the extremes grow, ``e`` can only grow and each old bin lies inside one new bin (a bin
    2**(e+d) wide is a union of 2**d aligned bins 2**e wide), so counts are merged exactly
    (:func:`_rebin`) and nothing is ever clamped or seen twice. Needs ``bins >= 2`` (a single
    bin cannot hold values of both signs on such a grid).

    Also compiled by numba (:mod:`lurker.probe._kernels`): keep to what it supports.
    """
    a = max(abs(lo), abs(hi))
    e = _E_MIN
    if a > 0.0:
        e = max(e, math.frexp(a)[1] - 24)  # the float32 spacing at a: 2**(exponent - 24)
    span = hi - lo
    if span > 0.0:
        # bins must be wider than span / bins: start just below that, step up (exact test)
        e = max(e, math.frexp(span / bins)[1] - 2)
    while math.floor(hi * math.ldexp(1.0, -e)) - math.floor(lo * math.ldexp(1.0, -e)) >= bins:
        e += 1
    return e, math.floor(lo * math.ldexp(1.0, -e))


def _bin_index(values: torch.Tensor, e: int, m: int, exact64: bool = True) -> torch.Tensor:
    """``floor(v / 2**e) - m`` of finite float32 ``values`` as int64, exactly.

    In float64 the scaling by a power of two is exact. Without float64 (MPS) it takes two
    float32 scalings, each within float32's range and exact unless the result is below 2**-126,
    where the floor is 0 or -1 anyway (a negative value that rounds to -0.0 gets its -1 back).
    """
    if exact64:
        q = torch.floor(values.to(torch.float64) * math.ldexp(1.0, -e))
    else:
        a = -e // 2
        q = values.to(torch.float32) * math.ldexp(1.0, a) * math.ldexp(1.0, -e - a)
        q = torch.floor(q) - ((q == 0) & (values < 0)).to(q.dtype)
    return q.to(torch.int64) - m


def _rebin(
    hist: torch.Tensor, bins: int, old: tuple[int, int], new: tuple[int, int]
) -> torch.Tensor:
    """``hist`` (C, bins + extra columns) counted on grid ``old`` = (e, m), on the coarser or
    shifted grid ``new`` that covers all its values: old bin i lies in new bin
    ``floor((m_old + i) / 2**(e_new - e_old)) - m_new``. The extra columns are kept."""
    d = min(new[0] - old[0], 40)  # |m + i| < 2**26: a larger shift changes nothing
    src = torch.arange(old[1], old[1] + bins, dtype=torch.int64, device=hist.device)
    src = torch.div(src, 1 << d, rounding_mode="floor") - new[1]
    inside = (src >= 0) & (src < bins)  # only empty old bins can fall outside
    counts = torch.zeros_like(hist[:, :bins])
    counts.index_add_(1, src[inside], hist[:, :bins][:, inside])
    return torch.cat([counts, hist[:, bins:]], dim=1)


class UnitStats:
    """Running statistics of every unit of one layer, updated once per batch for all units.

    ``update`` takes the layer's output for a batch, shaped (B, C), (B, C, L) or (B, C, H, W);
    a unit's *spatial mean* and *spatial max* are taken over its L or H*W positions (a (B, C)
    output has one position). Kept per unit:

    * top-k samples by spatial mean and top-k by spatial max, each entry with where the unit
      peaked on that sample, (y, x) (the first maximal position in row-major order, the first
      NaN if any; 1-D maps give y = 0, (B, C) maps y = x = 0), ordered by value descending
      then sample id ascending;
    * sum and count of spatial means per class (labels < 0 are unlabelled and skipped);
    * count, sum of spatial means, max of spatial maxima;
    * a histogram of the finite spatial means in ``hist_bins`` bins; -inf, +inf and NaN means
      are counted apart, never in a bin.

    The histogram's edges are shared by all units of the layer and lie on the canonical grid of
    :func:`_grid`: bins a power of two wide, at multiples of their width, the narrowest on which
    the finite means seen so far span fewer than ``hist_bins`` bins. When a batch widens that
    span the counts are merged exactly into the coarser grid, so the histogram is exactly that
    of all values on the final edges (``numpy.histogram`` agrees), whatever the batch sizes,
    their order, the buffer, resumption, or the shards and ranks merged. The price: the data
    span between about half and all of the bins (the span fits where its bin width allows,
    not stretched to fill them), and the grid holds the running finite min/max of the
    means over all units (a host sync per fold off the CPU, as it decides the bins).

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
        buffer_samples: int | None = None,
    ) -> None:
        if num_units < 1 or k < 1 or num_classes < 0 or hist_bins < 2:
            raise ValueError(
                "UnitStats needs num_units >= 1, k >= 1, num_classes >= 0, hist_bins >= 2; got "
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
        # each entry's peak as y * 2**32 + x, laid out as the keys: the crops of either list
        # are cut around it without running the model again
        self._pos = torch.full((2, c, k), -1, dtype=i64, device=dev)
        # Sums/counts per class plus a last row for unlabelled samples: together they are the
        # dataset sums, so one matmul and one index_add_ serve both.
        self._class_sum = torch.zeros((num_classes + 1, c), dtype=self._acc, device=dev)
        self._class_count = torch.zeros(num_classes + 1, dtype=i64, device=dev)
        self._one = torch.ones(1, dtype=i64, device=dev)
        # Histogram bins, then columns counting -inf, +inf and NaN means (_EXTRA), so that one
        # index_add_ counts them all. int32 on the CPU path (half the memory its fold touches
        # per batch), widened before it could overflow.
        hist_dtype = torch.int32 if self._fused else i64
        self._hist = torch.zeros((c, hist_bins + _EXTRA), dtype=hist_dtype, device=dev)
        self._bin_offsets = torch.arange(c, dtype=i64, device=dev) * (hist_bins + _EXTRA)
        # The grid: running finite (min, max) of the means over all units, and (e, m) of
        # _grid(min, max), all float64 (exact) on the host; min > max while none was seen.
        self._hist_grid = torch.tensor([math.inf, -math.inf, 0.0, 0.0], dtype=torch.float64)
        # The sample buffer, allocated by the first update: per-sample spatial means ([0]) and
        # maxima ([1]) as (2, n, C), flat first-maximum indices (n, C), sample ids and labels.
        self.buffer_samples = buffer_samples
        self._buf: torch.Tensor | None = None
        self._buf_pos: torch.Tensor | None = None
        self._buf_ids: torch.Tensor | None = None
        self._buf_labels: torch.Tensor | None = None
        self._n = 0  # buffered samples
        self._width = 1  # map width of the buffered samples (to split flat indices into y, x)
        # see _update_fused: scratch arrays, and numpy views of the state (not pickled: a
        # copy's views would no longer share the state's memory)
        self._scratch: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._views: tuple[tuple[Any, ...], list[np.ndarray]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_views"] = state["_scratch"] = None
        return state

    # ------------------------------------------------------------------ histogram grid

    def _extend(self, lo: float, hi: float) -> None:
        """Widen the histogram's grid to take finite values in [lo, hi] (lo > hi: none),
        merging the counts so far into the new grid."""
        old_lo, old_hi, old_e, old_m = self._hist_grid.tolist()
        new_lo, new_hi = min(old_lo, lo), max(old_hi, hi)
        if new_lo == old_lo and new_hi == old_hi:
            return
        e, m = _grid(new_lo, new_hi, self.hist_bins)
        if old_lo <= old_hi and (e, m) != (old_e, old_m):
            self._hist = _rebin(self._hist, self.hist_bins, (int(old_e), int(old_m)), (e, m))
        self._hist_grid[:] = torch.tensor([new_lo, new_hi, e, m], dtype=torch.float64)

    def _hist_on(self, other: UnitStats) -> torch.Tensor:
        """``other``'s histogram on our grid (which must cover its values), on our device."""
        hist = other._hist.to(self.device, torch.int64)
        lo, hi, e, m = other._hist_grid.tolist()
        grid = (int(self._hist_grid[2]), int(self._hist_grid[3]))
        if lo <= hi and (int(e), int(m)) != grid:
            hist = _rebin(hist, self.hist_bins, (int(e), int(m)), grid)
        return hist

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
            self._fold(stat, pos, ids, rows, width)
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
        self._widen_hist(self._count + b)
        maps = x.view(b * c, size).numpy()
        bits = maps.view(np.int32)
        scratch = self._scratch  # per-map means and peak bit patterns, kept between batches
        if scratch is None or len(scratch[0]) != b * c:
            means = np.empty(b * c, np.float32)
            scratch = self._scratch = (means, means.view(np.int32), np.empty(b * c, np.int32))
        means, mean_bits, peaks = scratch
        state = (
            self._keys, self._pos, self._class_sum, self._class_count, self._hist,
            self._hist_grid,
        )  # fmt: skip
        views = self._views  # numpy views of the state, written in place; remade if replaced
        if views is None or any(a is not b for a, b in zip(views[0], state)):
            views = self._views = (state, [t.numpy() for t in state])
        with kernels.lock:
            kernels.use_threads(torch.get_num_threads())
            lo, hi = kernels.read(maps, bits, means, peaks)
            kernels.fold(bits, means, mean_bits, peaks, ids, rows, *views[1], lo, hi, width)
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
        )

    def _fold(
        self,
        stat: torch.Tensor,
        pos: torch.Tensor,
        ids: torch.Tensor,
        labels: torch.Tensor,
        width: int,
    ) -> None:
        """Fold n samples into the statistics: ``stat`` (2, n, C) spatial means and maxima,
        ``pos`` (n, C) flat first-maximum indices in maps ``width`` wide, ``ids`` and
        ``labels`` (n,) (label < 0: unlabelled)."""
        n = ids.shape[0]
        # Class counts; unlabelled samples go to the extra last row.
        rows = labels.masked_fill(labels < 0, self.num_classes)
        self._class_count.index_add_(0, rows, self._one.expand(n))
        self._count += n
        c = self.num_units
        # Top-k by mean and by max together: keep the best min(k, n) keys per unit of the new
        # samples, then re-select k from the current top-k and those. Both sides carry the
        # sample's peak position, split into y * 2**32 + x for the candidates only.
        keys = _encode(stat.transpose(1, 2), ids)  # (2, c, n), contiguous
        kn = min(self.k, n)
        cand = pos.T.expand(2, c, n)
        if kn < n:
            keys, sel = keys.topk(kn, dim=2, sorted=False)
            cand = cand.gather(2, sel)
        y = torch.div(cand, width, rounding_mode="floor")  # also for width 1: (H, 1) maps
        cand = torch.add(torch.sub(cand, y, alpha=width), y, alpha=_SHIFT)
        top = torch.cat([self._keys, keys], dim=2).topk(self.k, dim=2)
        self._keys = top.values
        self._pos = torch.cat([self._pos, cand], 2).gather(2, top.indices)

        # Class sums in the accumulator's float64 (a float32 sum rounded each fold's, so the
        # class means changed with the folds: buffer, batch size, resume): index_add_ on the
        # CPU, where it is deterministic; a one-hot matmul elsewhere, unlike atomic
        # index_add_ on GPUs. Non-finite means go in apart, lest 0 * inf put NaN into every
        # class.
        means = stat[0]  # (n, c)
        finite = torch.isfinite(means)
        vals = means.where(finite, 0.0).to(self._acc)
        if vals.device.type == "cpu":  # deterministic there, and several times faster
            self._class_sum.index_add_(0, rows, vals)
        else:
            onehot = torch.zeros((n, self.num_classes + 1), dtype=self._acc, device=self.device)
            onehot.scatter_(1, rows[:, None], 1.0)
            self._class_sum.add_(onehot.T @ vals)
        self._class_sum.index_add_(0, rows, means.where(~finite, 0.0).to(self._acc))

        # Histogram: widen the grid to the new finite extremes (the one host sync of a fold: it
        # decides the bins), then one index_add_ with the -inf, +inf, NaN columns.
        finite_lo = torch.where(finite, means, math.inf).amin()
        finite_hi = torch.where(finite, means, -math.inf).amax()
        self._extend(*torch.stack([finite_lo, finite_hi]).tolist())
        bins = self.hist_bins
        _, _, e, m = self._hist_grid.tolist()
        index = _bin_index(means.where(finite, 0.0), int(e), int(m), self._acc == torch.float64)
        special = torch.where(means != means, bins + 2, bins + (means > 0).to(torch.int64))
        cols = torch.where(finite, index, special)
        cols += self._bin_offsets[:c]
        self._hist.view(-1).index_add_(0, cols.reshape(-1), self._one.expand(cols.numel()))

    def grow_classes(self, num_classes: int) -> None:
        """Make room for ``num_classes`` classes (no-op when there is already as much): a
        dataset whose labels are known only as its items are read meets its classes during
        the sweep. New classes start empty; the unlabelled row stays last. Buffered samples
        keep their labels, not rows, so they fold in correctly afterwards."""
        if num_classes <= self.num_classes:
            return
        extra = num_classes - self.num_classes
        sums, counts = self._class_sum, self._class_count
        self._class_sum = torch.cat([sums[:-1], sums.new_zeros((extra, sums.shape[1])), sums[-1:]])
        self._class_count = torch.cat([counts[:-1], counts.new_zeros(extra), counts[-1:]])
        self.num_classes = num_classes

    def drop_classes(self) -> None:
        """Keep no classes: every sample's spatial mean moves to the unlabelled row, so the
        dataset sums (and the unit's mean) stay, and no class mean is kept. Buffered samples
        are folded in first, by the classes they came with."""
        self._flush()
        self._class_sum = self._class_sum.sum(0, keepdim=True)
        self._class_count = self._class_count.sum(0, keepdim=True)
        self.num_classes = 0

    # ------------------------------------------------------------------ combining states

    def _check_compatible(self, other: UnitStats) -> None:
        mine = (self.num_units, self.k, self.num_classes, self.hist_bins)
        theirs = (other.num_units, other.k, other.num_classes, other.hist_bins)
        if mine != theirs:
            raise ValueError(
                f"cannot merge UnitStats (num_units, k, num_classes, hist_bins)={theirs} "
                f"into {mine}"
            )

    def _reselect(self, keys: torch.Tensor, pos: torch.Tensor) -> None:
        """Keep the best k of candidate keys (2, C, n) and their peak positions (2, C, n)."""
        top = keys.topk(self.k, dim=2)
        self._keys = top.values
        self._pos = pos.gather(2, top.indices)

    def merge(self, other: UnitStats) -> None:
        """Fold ``other`` (e.g. another data shard's state) into this one.

        The result equals a single pass over both shards' data: top-k is re-selected from the
        union of both candidate sets with the same order keys, sums and counts add up, and both
        histograms are brought to the grid of the union's extremes before they are added.
        """
        self._flush()
        other._flush()
        self._check_compatible(other)
        self._extend(*other._hist_grid[:2].tolist())
        dev = self.device
        self._reselect(
            torch.cat([self._keys, other._keys.to(dev)], dim=2),
            torch.cat([self._pos, other._pos.to(dev)], dim=2),
        )
        self._count += other._count
        self._class_sum += other._class_sum.to(device=dev, dtype=self._acc)
        self._class_count += other._class_count.to(dev)
        self._widen_hist(self._count)
        self._hist += self._hist_on(other).to(self._hist.dtype)

    def all_reduce(self, group: Any = None) -> None:
        """Merge the states of all ranks of ``group`` in place; every rank ends with the result.

        Collective: call on all ranks. Top-k candidates are all-gathered and re-selected (the
        dataset max comes with them); sums, counts and histograms are SUM-reduced, the
        histograms once every rank has brought its own to the grid of all ranks' extremes.
        Tensors live on ``self.device``, so the backend must support it (gloo: CPU, nccl: CUDA).
        Layouts are checked across ranks first; on a mismatch every rank raises ValueError.
        """
        self._flush()
        dist = torch.distributed
        world = dist.get_world_size(group)
        dev = self.device
        lo, hi = self._hist_grid[:2].tolist()
        meta = torch.tensor(
            [self.num_units, self.k, self.num_classes, self.hist_bins, -lo, hi],
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
        extremes = table[:, 4:].amax(dim=0).tolist()  # (-min, max) over all ranks
        self._extend(-extremes[0], extremes[1])

        cands = torch.cat([self._keys, self._pos])  # (4, C, k): keys, then their peaks
        gathered = [torch.empty_like(cands) for _ in range(world)]
        dist.all_gather(gathered, cands, group=group)
        allc = torch.cat(gathered, dim=2)
        self._reselect(allc[:2], allc[2:])

        count = torch.tensor([self._count], dtype=torch.int64, device=dev)
        ints = torch.cat([count, self._class_count, self._hist.view(-1).to(torch.int64)])
        dist.all_reduce(ints, group=group)
        self._count = int(ints[0])
        self._widen_hist(self._count)
        self._class_count.copy_(ints[1 : self.num_classes + 2])
        self._hist.view(-1).copy_(ints[self.num_classes + 2 :])
        dist.all_reduce(self._class_sum, group=group)

    # ------------------------------------------------------------------ persistence

    _TENSORS = ("keys", "pos", "class_sum", "class_count", "hist", "hist_grid")

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """Everything needed to resume or merge later, as CPU tensors and plain values.

        The layout is internal (top-k as order keys, an unlabelled row in the class sums, columns
        for non-finite means in the histogram, its grid); use :meth:`result` to read statistics.
        Buffered samples are folded in first, so the state holds everything seen so far.
        """
        self._flush()
        state: dict[str, torch.Tensor | int] = {
            "format": _STATE_FORMAT,
            "num_units": self.num_units,
            "k": self.k,
            "num_classes": self.num_classes,
            "hist_bins": self.hist_bins,
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
        why = OLDER_FORMATS.get(state.get("format"))  # type: ignore[arg-type]
        if why is not None:
            raise ValueError(
                f"this UnitStats state (format {state['format']}) was saved by an older "
                f"lurker, {why}: sweep the data again"
            )
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"unsupported UnitStats state format {state.get('format')!r}")
        stats = cls(
            int(state["num_units"]),
            int(state["k"]),
            int(state["num_classes"]),
            device=device,
            hist_bins=int(state["hist_bins"]),
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
            setattr(stats, "_" + name, saved.to(device=mine.device, dtype=mine.dtype, copy=True))
        return stats

    # ------------------------------------------------------------------ output

    def result(self) -> dict[str, torch.Tensor]:
        """Final statistics as CPU tensors (C = num_units).

        ``mean_values/mean_ids/mean_y/mean_x`` and ``max_values/max_ids/max_y/max_x`` are
        (C, k), best first, y/x the sample's peak (its first maximum) in either list; unfilled
        slots hold value -inf and id/y/x -1. ``class_mean`` is (C, num_classes), NaN for
        classes without samples; ``class_count`` (num_classes,). ``unit_mean`` (NaN before any
        data) and ``unit_max`` (-inf before any data) are (C,), ``count`` a scalar. ``hist`` is
        (C, hist_bins), the counts of finite spatial means in ``[edge_i, edge_i+1)`` of
        ``hist_edges`` (hist_bins + 1,) float64, on the canonical grid of :func:`_grid` (NaN
        before any finite mean); ``hist_neginf``, ``hist_posinf`` and ``hist_nan`` (C,) count
        the other means. Folds in the buffered samples first.
        """
        self._flush()
        keys = self._keys.cpu()
        mean_values, mean_ids = _decode(keys[0])
        max_values, max_ids = _decode(keys[1])
        pos = self._pos.cpu()
        empty = keys == _EMPTY
        y = torch.div(pos, _SHIFT, rounding_mode="floor").masked_fill(empty, -1)
        x = (pos % _SHIFT).masked_fill(empty, -1)
        class_sum = self._class_sum.cpu().double()
        class_count = self._class_count.cpu()
        class_mean = class_sum[:-1] / class_count[:-1, None].double()
        unit_mean = class_sum.sum(dim=0) / self._count
        ext = self._hist.cpu().to(torch.int64)
        bins = self.hist_bins
        lo, hi, e, m = self._hist_grid.tolist()
        edges = torch.arange(bins + 1, dtype=torch.float64)
        if lo <= hi:  # exact: |m| + bins stays far below 2**53
            edges = (edges + m) * math.ldexp(1.0, int(e))
        else:
            edges.fill_(math.nan)
        return {
            "mean_values": mean_values,
            "mean_ids": mean_ids,
            "mean_y": y[0],
            "mean_x": x[0],
            "max_values": max_values,
            "max_ids": max_ids,
            "max_y": y[1],
            "max_x": x[1],
            "class_mean": class_mean.T.to(torch.float32).contiguous(),
            "class_count": class_count[:-1].clone(),
            "unit_mean": unit_mean.to(torch.float32),
            "unit_max": max_values[:, 0].clone(),
            "count": torch.tensor(self._count, dtype=torch.int64),
            "hist": ext[:, :bins].clone(),
            "hist_edges": edges,
            "hist_neginf": ext[:, bins].clone(),
            "hist_posinf": ext[:, bins + 1].clone(),
            "hist_nan": ext[:, bins + 2].clone(),
        }
