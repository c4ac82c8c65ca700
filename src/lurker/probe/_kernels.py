"""Fused CPU kernels for :class:`~lurker.probe.stats.UnitStats`, compiled with numba.

On the CPU a torch kernel costs by the element *and* by the call (~10-30 us), and the
statistics of one batch of one layer need ~30 torch calls (order keys, top-k merge, class
sums, histogram); for a ResNet that cost a third of the forward pass. Here two compiled
calls per layer and batch do all of it, in parallel over maps (:func:`read`) and units
(:func:`fold`):

* each map is read once, for its sum and its max together, in SIMD: the max is taken over the
  floats' bit patterns as int32 (the largest non-negative pattern is the largest float; if all
  are negative, the smallest pattern is), which vectorises where a float max with NaN rules
  does not; a NaN or an inf shows in the sum (as does float32 overflow), and such rare maps
  take an exact scalar loop that sums in float64;
* the mean and max become order keys (the same int64 keys as
  :func:`lurker.probe.stats._encode`) that enter the unit's top-k if they beat its k-th key;
  peaks are located only for maps that enter a top-k (by max, or by mean: the mean list
  keeps where the sample peaked too, so crops need no second forward pass);
* the mean is added to the class sums and the histogram; the histogram's grid is first widened
  to the batch's finite extremes (:func:`lurker.probe.stats._grid`, compiled here too), merging
  the counts so far, as the torch path does.

The results are those of the torch path (same keys, same bins, class sums in the same order),
except that a map's values are summed in another order, so means may differ in the last bits;
the tests check both paths against each other and against a brute-force oracle.
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np
import torch
from numba import njit, prange

from . import stats

__all__ = ["fold", "lock", "read", "use_threads"]


def _compiled(fn):  # type: ignore[no-untyped-def]
    """``njit(parallel=True)``, cached on disk where numba finds a writable place, else
    compiled afresh in each process (numba refuses cache=True with nowhere to write)."""
    try:
        return njit(parallel=True, cache=True)(fn)
    except RuntimeError:
        return njit(parallel=True)(fn)


# numba's default thread pool ("workqueue") must not be entered by two threads at once.
lock = threading.Lock()


# what use_threads last set in this thread (numba's setting is per thread, and its setter
# costs microseconds per call)
_threads = threading.local()


def use_threads(n: int) -> None:
    """Run the kernels on ``n`` threads (at most numba's pool): as many as torch uses, so
    that e.g. torchrun ranks limited to one thread each do not all fan out to every core.

    Where numba's OpenMP threading layer loads the same OpenMP runtime as torch (one
    libgomp for both), starting it sets that runtime's thread count to numba's whole pool:
    torch would then run every later forward on all cores, ignoring
    ``torch.set_num_threads`` or ``OMP_NUM_THREADS``, and a convolution on another thread
    count rounds differently (the sweep's first batch would not match the same images in
    later batches, nor a resumed run). Torch's count is put back. (A pip install of torch
    bundles its own libgomp: the two runtimes are then apart, each with worker threads
    that spin a while after a parallel call, which contend on a machine with few cores.)"""
    if getattr(_threads, "n", None) != n:
        torch_threads = torch.get_num_threads()
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        _threads.n = n


# the order-key layout of stats._encode, which the keys made here must match bit for bit
_SHIFT = np.int64(stats._SHIFT)
_ID_MASK = np.int64(stats._ID_MASK)
_ABS = np.int32(0x7FFFFFFF)
_INF_BITS = np.int32(0x7F800000)
_NAN_BITS = np.int32(0x7FC00000)  # the one NaN that order keys use (torch's math.nan)

# the histogram grid of the torch path, compiled; numba's disk cache keys on this file only, so
# after changing stats._grid touch this file
_grid = njit(stats._grid)


@njit(inline="always")
def _key(bits, low):  # pragma: no cover - compiled
    """Order key of the float32 with bit pattern ``bits``: see stats._encode."""
    if bits & _ABS > _INF_BITS:
        bits = _NAN_BITS
    elif bits & _ABS == 0:
        bits = np.int32(0)  # -0.0 ranks with +0.0
    return np.int64(bits ^ ((bits >> 31) & _ABS)) * _SHIFT + low


@njit(fastmath={"reassoc", "nsz", "contract"})
def _sum_max(row, bits):  # pragma: no cover - compiled
    """Sum of a map in float32 (reassociated, so SIMD), and the bit pattern of its max."""
    s = np.float32(0.0)
    hi = np.int32(-2147483648)
    lo = np.int32(2147483647)
    for i in range(row.shape[0]):
        s += row[i]
        b = bits[i]
        hi = max(hi, b)
        lo = min(lo, b)
    return s, (hi if hi >= 0 else lo)


@njit
def _exact(row, bits):  # pragma: no cover - compiled
    """:func:`_sum_max` the slow way: a float64 sum (no float32 overflow) and the max by the
    order of :func:`_key`, NaN above all (the first NaN ends the scan)."""
    s = 0.0
    peak = bits[0]
    best = np.int32(-2147483648)
    for i in range(row.shape[0]):
        s += row[i]
        v = bits[i]
        if v & _ABS > _INF_BITS:
            return np.nan, v
        f = v ^ ((v >> 31) & _ABS)
        if f > best:
            best = f
            peak = v
    return s, peak


@njit(inline="always")
def _first(bits, peak):  # pragma: no cover - compiled
    """Position of the first maximum: the first NaN if ``peak`` is one, else the first value
    equal to it (either zero for a zero)."""
    p = 0
    if peak & _ABS > _INF_BITS:
        while bits[p] & _ABS <= _INF_BITS:
            p += 1
    elif peak & _ABS == 0:
        while bits[p] & _ABS != 0:
            p += 1
    else:
        while bits[p] != peak:
            p += 1
    return p


@_compiled
def read(x, bits, means, peaks):  # pragma: no cover - compiled
    """Spatial mean (float32) and the bit pattern of the max (int32) of each of the R maps of
    ``x`` (R, S) float32, whose int32 view is ``bits``, into ``means`` and ``peaks`` (R,).
    Returns the smallest and largest finite mean (inf, -inf if none), for :func:`fold`."""
    size = x.shape[1]
    lo = np.inf
    hi = -np.inf
    for r in prange(x.shape[0]):
        s, peak = _sum_max(x[r], bits[r])
        if not np.isfinite(s):  # a NaN or an inf in the map, or float32 overflow: exact
            s, peak = _exact(x[r], bits[r])
        mean = np.float32(s / size)
        means[r] = mean
        peaks[r] = peak
        if np.isfinite(mean):  # a min/max reduction over the threads: exact in any order
            lo = min(lo, np.float64(mean))
            hi = max(hi, np.float64(mean))
    return lo, hi


@_compiled
def fold(
    bits,
    means,
    mean_bits,
    peaks,
    ids,
    rows,
    keys,
    pos,
    class_sum,
    class_count,
    hist,
    grid,
    lo,
    hi,
    width,
):  # pragma: no cover - compiled
    """Fold one batch into the statistics of all units, in place.

    ``bits``: the (B * C, S) maps, sample-major, as int32 bit patterns; ``means`` (B * C,)
    float32 and ``mean_bits`` the same memory as int32, ``peaks`` the maxima's bit patterns, all
    from :func:`read`; ``ids``/``rows``: (B,) sample ids and class rows (the unlabelled row
    included); ``keys`` (2, C, k) (by mean, by max), ``pos`` (2, C, k)
    their entries' peaks as y * 2**32 + x, ``class_sum`` (classes + 1, C),
    ``class_count`` (classes + 1,), ``hist`` (C, bins + 3: bins, then -inf, +inf, NaN counts),
    ``grid`` (4,) float64: the finite min and max so far and the grid (e, m) of
    :func:`lurker.probe.stats._grid`: the state; ``lo``, ``hi``: the batch's finite extremes
    from :func:`read`; ``width``: the map width, to split a flat peak index into (y, x).
    """
    n = ids.shape[0]
    for b in range(n):
        class_count[rows[b]] += 1
    units = keys.shape[1]
    k = keys.shape[2]
    bins = hist.shape[1] - 3
    _widen(lo, hi, hist, grid, bins)
    scale = math.ldexp(1.0, -np.int64(grid[2]))  # bin of v: floor(v * scale) - m, exactly
    m = np.int64(grid[3])
    for c in prange(units):
        top_mean, top_max = keys[0, c], keys[1, c]
        at_mean, at_max = pos[0, c], pos[1, c]
        for b in range(n):
            r = b * units + c
            mean = means[r]
            low = _ID_MASK - ids[b]
            peak = peaks[r]
            where = np.int64(-1)  # the peak as y * 2**32 + x, once a list takes the map
            key = _key(mean_bits[r], low)
            if key > top_mean[k - 1]:
                p = _first(bits[r], peak)
                y = p // width
                where = np.int64(y) * _SHIFT + (p - y * width)
                j = k - 1
                while j > 0 and top_mean[j - 1] < key:
                    top_mean[j] = top_mean[j - 1]
                    at_mean[j] = at_mean[j - 1]
                    j -= 1
                top_mean[j] = key
                at_mean[j] = where
            key = _key(peak, low)
            if key > top_max[k - 1]:
                if where < 0:
                    p = _first(bits[r], peak)
                    y = p // width
                    where = np.int64(y) * _SHIFT + (p - y * width)
                j = k - 1
                while j > 0 and top_max[j - 1] < key:
                    top_max[j] = top_max[j - 1]
                    at_max[j] = at_max[j - 1]
                    j -= 1
                top_max[j] = key
                at_max[j] = where
            class_sum[rows[b], c] += mean
            if np.isfinite(mean):
                col = np.int64(math.floor(np.float64(mean) * scale)) - m
            elif mean != mean:
                col = bins + 2
            elif mean > 0:
                col = bins + 1
            else:
                col = bins
            hist[c, col] += 1


@njit
def _widen(batch_lo, batch_hi, hist, grid, bins):  # pragma: no cover - compiled
    """Widen the histogram's ``grid`` (see :func:`fold`) to take finite values in
    [batch_lo, batch_hi] (none if batch_lo > batch_hi), merging the counts so far into the new
    grid as stats._rebin does."""
    lo = grid[0]
    hi = grid[1]
    new_lo = min(lo, batch_lo)
    new_hi = max(hi, batch_hi)
    if new_lo == lo and new_hi == hi:
        return
    e, m = _grid(new_lo, new_hi, bins)
    old_e = np.int64(grid[2])
    old_m = np.int64(grid[3])
    if lo <= hi and (e != old_e or m != old_m):
        _rebin(hist, bins, old_e, old_m, e, m)
    grid[0] = new_lo
    grid[1] = new_hi
    grid[2] = e
    grid[3] = m


@_compiled
def _rebin(hist, bins, old_e, old_m, e, m):  # pragma: no cover - compiled
    """Every unit's bins counted on grid (old_e, old_m), on the grid (e, m) covering them."""
    shift = min(e - old_e, 40)  # |m + i| < 2**26: a larger shift changes nothing
    counts = np.zeros((hist.shape[0], bins), hist.dtype)
    for c in prange(hist.shape[0]):
        row = hist[c]
        for i in range(bins):
            if row[i] != 0:  # only empty old bins can fall outside the new grid
                counts[c, ((old_m + i) >> shift) - m] += row[i]
        row[:bins] = counts[c]
