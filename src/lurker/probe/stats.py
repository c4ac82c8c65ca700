"""Streaming per-unit statistics for the probe: one vectorized update per layer per batch.

The probe sweeps a dataset once; for every unit (channel) of a layer :class:`UnitStats` keeps
the top-k samples by spatial mean and by spatial max (with the peak's position), per-class mean
activations, a histogram of spatial means, and dataset mean/max. Memory is independent of the
dataset size, and every update is a fixed ~35 kernels on the activation's device (two reductions
that read the activation once each, the rest on (C, B)-sized tensors) with no host sync, so the
cost does not grow with the number of units or images beyond what reading the activation takes.

Top-k ordering is value descending, then sample id ascending. To make that rule cheap and exact,
each (value, sample id) pair is packed into one int64 *order key* whose integer order is exactly
that rule (see :func:`_encode`): top-k then is a single ``torch.topk`` over unique keys, which is
deterministic no matter how ties, batches, shards or ranks are arranged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["UnitStats"]

_SHIFT = 1 << 32  # the value half of an order key sits above bit 32
_ID_MASK = (1 << 32) - 1  # ids are stored as ``_ID_MASK - id`` so smaller ids rank higher
_EMPTY = -(1 << 63)  # key of an unfilled slot: below every real (value, id) pair
_STATE_FORMAT = 1


def _encode(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Pack float32 ``values`` (..., B) and int64 ``ids`` (B,) into int64 order keys.

    The float's bit pattern is mapped to an int32 with the same order (flip the magnitude bits of
    negatives), shifted into the high half; the low half holds ``2**32 - 1 - id``. So a larger key
    means a larger value, or an equal value and a smaller id: the tie rule in one integer, which
    ``topk`` can select without any stable-sort gymnastics. ``-0.0`` is folded into ``+0.0`` and
    NaNs into one positive NaN (ranked above ``+inf``, as ``torch.sort`` ranks it) so that values
    that compare equal get equal high halves.
    """
    v = torch.where(torch.isnan(values), math.nan, values + 0.0)
    bits = v.view(torch.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return torch.add(_ID_MASK - ids, bits, alpha=_SHIFT)  # int64: high half value, low half id


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
    max(10% of |value|, 1)). That costs the one host sync of the whole sweep. Because it depends on
    the first batch, the histograms of states with different ranges cannot be combined:
    :meth:`merge` and :meth:`all_reduce` raise ValueError then. For several shards or ranks either
    pass ``hist_range`` or call :meth:`set_hist_range_from` with each rank's first batch before
    any update: it MIN/MAX-reduces the range across ranks so all agree, and equals what a single
    process would fix from the union of those batches.

    Sample ids must be unique over the dataset and lie in [0, 2**32) (checked only when they come
    on the CPU, to avoid device syncs); a sample seen twice (e.g. DistributedSampler padding)
    would be counted twice. Sums are accumulated in float64 (float32 on MPS, which lacks float64).
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
    ) -> None:
        if num_units < 1 or k < 1 or num_classes < 0 or hist_bins < 1:
            raise ValueError(
                "UnitStats needs num_units >= 1, k >= 1, num_classes >= 0, hist_bins >= 1; got "
                f"num_units={num_units}, k={k}, num_classes={num_classes}, hist_bins={hist_bins}"
            )
        self.num_units = num_units
        self.k = k
        self.num_classes = num_classes
        self.hist_bins = hist_bins
        self.device = torch.device(device)
        self._acc = torch.float32 if self.device.type == "mps" else torch.float64
        dev, c, i64 = self.device, num_units, torch.int64
        # The state is laid out so that an update needs as few kernels as possible:
        self._count = 0  # a host int: batch sizes are known on the host, so this never syncs
        # Order keys of the top-k by spatial mean ([0]) and by spatial max ([1]), best first; the
        # dataset max of a unit is its best max key, so it needs no state of its own.
        self._keys = torch.full((2, c, k), _EMPTY, dtype=i64, device=dev)
        self._max_pos = torch.full((c, k), -1, dtype=i64, device=dev)  # y * 2**32 + x
        self._zero_pos = torch.zeros((c, k), dtype=i64, device=dev)  # peaks of 1-position maps
        # Sums/counts per class plus a last row for unlabelled samples: together they are the
        # dataset sums, so one index_add_ serves both.
        self._class_sum = torch.zeros((num_classes + 1, c), dtype=self._acc, device=dev)
        self._class_count = torch.zeros(num_classes + 1, dtype=i64, device=dev)
        self._unlabelled = torch.full((1,), num_classes, dtype=i64, device=dev)
        self._one = torch.ones(1, dtype=i64, device=dev)
        # Histogram with an underflow column in front and an overflow column behind, so that a
        # single bucketize + index_add_ also counts the out-of-range values.
        self._hist = torch.zeros((c, hist_bins + 2), dtype=i64, device=dev)
        self._bin_offsets = torch.arange(c, dtype=i64, device=dev) * (hist_bins + 2)
        self._range: tuple[float, float] | None = None
        self._edges: torch.Tensor | None = None  # hist_bins + 1 float32 edges
        self._search: torch.Tensor | None = None  # the edges, last one nudged to just above hi
        if hist_range is not None:
            self._set_range(_check_range(hist_range))

    # ------------------------------------------------------------------ histogram range

    @property
    def hist_range(self) -> tuple[float, float] | None:
        """The histogram's (lo, hi), or None while it is still to be fixed by the first batch."""
        return self._range

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
        flat = act.to(device=self.device, dtype=torch.float32).reshape(*act.shape[:2], -1)
        return flat, act.shape[-1] if act.dim() > 2 else 1

    def update(
        self, act: torch.Tensor, sample_ids: torch.Tensor, labels: torch.Tensor | None
    ) -> None:
        """Fold one batch of a layer's output into the statistics of all its units at once.

        ``sample_ids`` are the batch's int64 global dataset indices (B,), ``labels`` its int64
        class indices (B,) or None to skip class statistics. About 35 kernels whatever B and C;
        no host sync except, once, to fix an automatic histogram range.
        """
        flat, width = self._maps(act)
        b = act.shape[0]
        if sample_ids.shape != (b,):
            raise ValueError(f"sample_ids must have shape ({b},), got {tuple(sample_ids.shape)}")
        if labels is not None and labels.shape != (b,):
            raise ValueError(f"labels must have shape ({b},), got {tuple(labels.shape)}")
        if b == 0:
            return
        # Range checks need the values on the host: only done when they already are (no sync).
        ids_cpu = sample_ids.device.type == "cpu"
        if ids_cpu and bool(((sample_ids < 0) | (sample_ids > _ID_MASK)).any()):
            raise ValueError("sample_ids must lie in [0, 2**32)")
        labels_cpu = labels is not None and labels.device.type == "cpu"
        if labels_cpu and bool((labels >= self.num_classes).any()):
            raise ValueError(f"labels must be < num_classes={self.num_classes}")
        dev = self.device
        ids = sample_ids.to(device=dev, dtype=torch.int64)
        # Spatial means and maxima side by side, written in place (no stacking copy). amax is
        # about twice as fast as max-with-indices; peak positions are found for candidates only.
        stat = torch.empty((2, b, self.num_units), dtype=torch.float32, device=dev)
        torch.mean(flat, dim=2, out=stat[0])
        torch.amax(flat, dim=2, out=stat[1])
        means = stat[0]

        # Top-k by mean and by max together: keep the batch's best min(k, B) keys per unit, then
        # re-select k from the current top-k and those. The max side carries peak positions.
        keys = _encode(stat.transpose(1, 2), ids)  # (2, C, B)
        kb = min(self.k, b)
        maps = flat.transpose(0, 1)  # (C, B, S)
        if kb < b:
            keys, sel = keys.topk(kb, dim=2, sorted=False)
            if flat.shape[2] > 1:
                maps = maps.gather(1, sel[1, :, :, None].expand(-1, -1, flat.shape[2]))
        if flat.shape[2] > 1:
            pos = maps.argmax(dim=2)  # the first maximal position on ties, row-major
            if width > 1:
                y = torch.div(pos, width, rounding_mode="floor")
                pos = torch.add(torch.sub(pos, y, alpha=width), y, alpha=_SHIFT)
        else:
            pos = self._zero_pos[:, :kb]
        top = torch.cat([self._keys, keys], dim=2).topk(self.k, dim=2)
        self._keys = top.values
        self._max_pos = torch.cat([self._max_pos, pos], dim=1).gather(1, top.indices[1])

        # Class sums and counts; unlabelled samples go to the extra last row.
        if labels is None:
            rows = self._unlabelled.expand(b)
        else:
            rows = labels.to(device=dev, dtype=torch.int64)
            rows = rows.masked_fill(rows < 0, self.num_classes)
        # Per-class sums of the batch as a one-hot matmul in float32 (index_add_ hits slow CPU
        # paths, up to ~1000x, for float64 and for some float32 inputs); across batches the
        # sums accumulate in float64.
        onehot = torch.zeros((b, self.num_classes + 1), dtype=means.dtype, device=dev)
        onehot.scatter_(1, rows[:, None], 1.0)
        self._class_sum += onehot.T @ means
        self._class_count.index_add_(0, rows, self._one.expand(b))
        self._count += b

        if self._search is None:
            finite = torch.isfinite(means)
            lo = torch.where(finite, means, math.inf).amin()
            hi = torch.where(finite, means, -math.inf).amax()
            self._set_range(_auto_range(*torch.stack([lo, hi]).tolist()))  # the one host sync
        assert self._search is not None
        cols = torch.bucketize(means, self._search, right=True) + self._bin_offsets
        weights = (means == means).to(torch.int64)  # NaN means are left out
        self._hist.view(-1).index_add_(0, cols.view(-1), weights.view(-1))

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
        self._hist += other._hist.to(dev)

    def all_reduce(self, group: Any = None) -> None:
        """Merge the states of all ranks of ``group`` in place; every rank ends with the result.

        Collective: call on all ranks. Top-k candidates are all-gathered and re-selected (the
        dataset max comes with them); sums, counts and histograms are SUM-reduced. Tensors live
        on ``self.device``, so the backend must support it (gloo: CPU, nccl: CUDA). Layouts and
        histogram ranges are checked across ranks first; on a mismatch every rank raises
        ValueError. Ranks that have no range yet (no data) adopt the others'.
        """
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
        ints = torch.cat([count, self._class_count, self._hist.view(-1)])
        dist.all_reduce(ints, group=group)
        self._count = int(ints[0])
        self._class_count.copy_(ints[1 : self.num_classes + 2])
        self._hist.view(-1).copy_(ints[self.num_classes + 2 :])
        dist.all_reduce(self._class_sum, group=group)

    # ------------------------------------------------------------------ persistence

    _TENSORS = ("keys", "max_pos", "class_sum", "class_count", "hist")

    def state_dict(self) -> dict[str, torch.Tensor | int | tuple[float, float] | None]:
        """Everything needed to resume or merge later, as CPU tensors and plain values.

        The layout is internal (top-k as order keys, an unlabelled row in the class sums, under-
        and overflow columns in the histogram); use :meth:`result` to read statistics.
        """
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
        cls, state: Mapping[str, Any], device: torch.device | str = "cpu"
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
        )
        stats._count = int(state["count"])
        for name in cls._TENSORS:
            mine = getattr(stats, "_" + name)
            saved = state[name]
            if tuple(saved.shape) != tuple(mine.shape):
                raise ValueError(
                    f"state {name!r} has shape {tuple(saved.shape)}, expected {tuple(mine.shape)}"
                )
            setattr(stats, "_" + name, saved.to(device=stats.device, dtype=mine.dtype))
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
        ``hist_overflow`` (C,) count.
        """
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
        ext = self._hist.cpu()
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
