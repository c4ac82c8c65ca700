"""What the probe's sweep feeds: consumers of the probed layers' outputs, batch by batch.

The sweep (:mod:`.sweep`) runs each batch through the model once and hands every probed
layer's output to each consumer as the op produces it. A consumer keeps whatever it
accumulates, saves and restores it with the sweep's checkpoint, merges it across
``torchrun`` ranks and writes it into the run. The per-unit statistics
(:class:`UnitStatsConsumer`) are one consumer; later statistics are more, added without
touching the sweep's loop.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..errors import LurkerError, warn
from ..models import is_probabilities, probabilities
from ..store import LayerResult, RunWriter
from .stats import OLDER_FORMATS, HostBatch, UnitStats

if TYPE_CHECKING:
    from .sweep import Layer

__all__ = [
    "Batch",
    "BatchConsumer",
    "ChannelRangeConsumer",
    "EmbeddingConsumer",
    "LabelsConsumer",
    "RelevanceConsumer",
    "UnitStatsConsumer",
]


@dataclass(frozen=True)
class Batch:
    """One batch as consumers see it, all on the sweep's device (unreadable images dropped)."""

    images: Tensor  # (B, ...) the model's input
    ids: Tensor  # (B,) int64 global dataset indices: unique, so merges never double-count
    labels: Tensor  # (B,) int64 class indices, -1 for unlabelled samples
    num_classes: int  # classes met so far (at least): every label of the batch is below it


class BatchConsumer(ABC):
    """Accumulates something over the sweep from the probed layers' outputs.

    Per batch the sweep calls :meth:`begin` once, then :meth:`update` for each probed layer
    in the order the forward produces them. After the last batch every rank calls
    :meth:`merge` (a collective under ``torchrun``), then rank 0 calls :meth:`finish`
    inside the run's one write transaction. :meth:`state_dict` goes into the checkpoint
    under :attr:`key`; a resumed sweep hands it back to :meth:`load_state_dict` instead.
    """

    key: ClassVar[str]  # this consumer's entry in the checkpoint: unique among consumers

    #: Layers beyond the probed ones whose outputs this consumer needs: the sweep hooks
    #: them too and hands their outputs to this consumer only.
    extra_layers: Sequence[Layer] = ()

    def begin(self, batch: Batch) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Prepare for ``batch`` before any layer's output arrives (default: nothing)."""

    def end(self, batch: Batch, output: Any) -> None:  # noqa: B027 (an optional hook)
        """Take the model's ``output`` for ``batch`` after the forward (default: nothing)."""

    @abstractmethod
    def update(self, layer: Layer, output: Tensor, batch: Batch) -> None:
        """Fold ``layer``'s ``output`` for ``batch`` in.

        ``output`` is the live tensor (no copy, whatever its layout: see
        :meth:`Layer.units`): read it during the call, as an in-place op later in the
        forward may change it.
        """

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything accumulated so far, as CPU tensors and plain values (``torch.save``
        with ``weights_only`` must load it)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of an interrupted sweep over the same layers.

        Raise :class:`~lurker.errors.LurkerError` saying what to do when ``state`` cannot
        be continued (the sweep prefixes the checkpoint's path).
        """

    @abstractmethod
    def merge(self, group: Any = None) -> None:
        """Combine the ranks' accumulations in place (a collective: all ranks call it, in
        the same order; a single process never calls it)."""

    @abstractmethod
    def finish(self, writer: RunWriter) -> None:
        """Write the result into the run (rank 0 only, inside ``writer.batch()``)."""

    def discard(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Delete whatever this consumer keeps beside the checkpoint, once its results are
        written or merged away (default: nothing)."""


class UnitStatsConsumer(BatchConsumer):
    """Per-unit statistics of every probed layer (:class:`~.stats.UnitStats`): the run's
    layers and units, with their top-k samples, means, class means and histograms.

    ``describe(layer)`` gives a layer's stored description (the :class:`LayerResult` fields
    other than the statistics: name, module, op, kind, shape, rf, layout); the sweep owns
    it, as it comes from the trace. ``batch_size`` is the least number of samples a device
    buffer holds (see :class:`~.stats.UnitStats`).
    """

    key = "stats"

    def __init__(
        self,
        layers: Sequence[Layer],
        *,
        k: int,
        num_classes: int,
        device: torch.device,
        hist_bins: int,
        batch_size: int,
        describe: Callable[[Layer], dict[str, Any]],
    ) -> None:
        self.layers = list(layers)
        self.device = device
        self.describe = describe
        self.num_classes = num_classes
        self._host: HostBatch | None = None
        # per-sample statistics are buffered on the device (16 bytes per unit and sample)
        # and folded in every few batches; keep all layers' buffers together under ~512 MiB
        widths = sum(layer.width for layer in self.layers)
        buffered = max(batch_size, min(4096, (512 << 20) // (16 * widths)))
        self.stats = {
            layer.op.index: UnitStats(
                layer.width,
                k,
                num_classes,
                device=device,
                hist_bins=hist_bins,
                buffer_samples=None if device.type == "cpu" else buffered,
            )
            for layer in self.layers
        }

    def begin(self, batch: Batch) -> None:
        """The batch's ids and labels as the CPU kernels take them, once for all layers;
        room first for classes the sweep met in this batch (labels read from the items)."""
        self.grow_classes(batch.num_classes)
        cpu = self.device.type == "cpu"
        self._host = HostBatch(batch.ids, batch.labels, self.num_classes) if cpu else None

    def grow_classes(self, num_classes: int) -> None:
        """Give every layer's statistics ``num_classes`` classes, if they hold fewer."""
        if num_classes > self.num_classes:
            for stats in self.stats.values():
                stats.grow_classes(num_classes)
            self.num_classes = num_classes

    def drop_classes(self) -> None:
        """Keep no per-class statistics: the run turned out unlabelled (an item's label was
        no class index), so the classes met before are dropped, not mixed with none."""
        for stats in self.stats.values():
            stats.drop_classes()
        self.num_classes = 0

    def update(self, layer: Layer, output: Tensor, batch: Batch) -> None:
        """One vectorised top-k and histogram update for all of ``layer``'s units."""
        self.stats[layer.op.index].update(
            layer.units(output), batch.ids, batch.labels, host=self._host
        )

    def state_dict(self) -> dict[str, Any]:
        """Each layer's :meth:`UnitStats.state_dict`, by layer name."""
        return {layer.name: self.stats[layer.op.index].state_dict() for layer in self.layers}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore each layer's statistics; refuse the statistics of an older lurker, whose
        histograms cannot be brought onto the order-independent grid (format 1) or whose
        mean lists lack their entries' peaks (format 2): never a run that mixes the two."""
        old = sorted({s.get("format") for s in state.values()} & OLDER_FORMATS.keys())
        if old:
            raise LurkerError(
                f"its unit statistics were written by an older lurker, {OLDER_FORMATS[old[0]]}. "
                "Delete it to sweep again from the start, or finish the sweep with the lurker "
                "version that started it."
            )
        for layer in self.layers:
            self.stats[layer.op.index] = UnitStats.from_state_dict(
                state[layer.name], device=self.device
            )
        self.num_classes = max(s.num_classes for s in self.stats.values())
        self.grow_classes(self.num_classes)  # (the same on every layer)

    def merge(self, group: Any = None) -> None:
        """All-reduce each layer's statistics (in op order, the same on every rank), once
        every rank holds the classes any rank met (labels read from the items: each rank
        meets those of its own shard)."""
        most = torch.tensor([self.num_classes], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX, group=group)
        self.grow_classes(int(most))
        for i in sorted(self.stats):
            self.stats[i].all_reduce(group)

    def finish(self, writer: RunWriter) -> None:
        """Write every layer with its units' statistics (the run's layers table), and name
        the samples whose activations were NaN or infinite (meta ``non_finite``, and a
        warning): they rank first in every top list they reach and make means NaN. Those
        ids are only the ones that reached a top list (k per unit), so meta
        ``non_finite_samples`` gives, per such layer, how many samples at least had one
        (the most of any unit, counted over every sample), for the explorer's graph."""
        results = []
        odd: dict[str, list[int]] = {}
        many: dict[str, int] = {}
        for layer in self.layers:
            r = self.stats[layer.op.index].result()
            ids = _non_finite(r)
            if ids is not None:
                odd[layer.name] = ids
                bad = int((r["hist_nan"] + r["hist_posinf"]).max())
                many[layer.name] = max(bad, len(ids))
            results.append(
                LayerResult(
                    **self.describe(layer),
                    mean_values=r["mean_values"],
                    mean_ids=r["mean_ids"],
                    mean_y=r["mean_y"],
                    mean_x=r["mean_x"],
                    max_values=r["max_values"],
                    max_ids=r["max_ids"],
                    max_y=r["max_y"],
                    max_x=r["max_x"],
                    unit_mean=r["unit_mean"],
                    unit_max=r["unit_max"],
                    class_mean=r["class_mean"],
                    hist=r["hist"],
                    hist_edges=r["hist_edges"],
                )
            )
        writer.write_layers_result(results)
        writer.meta_set("non_finite", odd)
        writer.meta_set("non_finite_samples", many)
        if odd:
            samples = sorted({i for ids in odd.values() for i in ids})
            shown = ", ".join(map(str, samples[:10])) + (", ..." if len(samples) > 10 else "")
            layers = ", ".join(list(odd)[:5]) + (", ..." if len(odd) > 5 else "")
            warn(
                f"probe: {len(odd)} layer(s) ({layers}) had NaN or infinite activations"
                + (
                    f", on at least {max(many.values())} samples (in the top lists: {shown})"
                    if samples
                    else ""
                )
                + ": they rank first in the top lists they reach and make the units' means "
                "NaN or infinite. Check those inputs (or the model) and probe again; the run "
                "lists them in meta['non_finite']"
            )


def _non_finite(r: Mapping[str, Tensor]) -> list[int] | None:
    """The samples whose NaN or +inf values are in a layer's top lists (None: none, and
    every unit's mean is finite or -inf, as masked attention scores may be)."""
    ids: set[int] = set()
    for values, who in ((r["max_values"], r["max_ids"]), (r["mean_values"], r["mean_ids"])):
        bad = (torch.isnan(values) | torch.isposinf(values)) & (who >= 0)
        ids.update(int(i) for i in who[bad].tolist())
    mean = r["unit_mean"]
    if not ids and not (torch.isnan(mean) | torch.isposinf(mean)).any():
        return None
    return sorted(ids)


class RelevanceConsumer(BatchConsumer):
    """Each unit's relevance-max list: the ``k`` samples where the unit carried the most
    LRP relevance for the model's own prediction (Achtibat et al.'s relevance maximization,
    as zennit-crp ranks reference samples), beside the activation lists.

    Per batch it runs one LRP backward from the predicted class (``lurker.explain``'s rule
    engine, ``composite`` as there) recording the relevance arriving at every probed
    layer, summed over each unit's positions. It ignores the forward's outputs: the
    backward needs its own forward with the rules in place.
    """

    key = "relevance"

    def __init__(
        self,
        model: torch.nn.Module,
        layers: Sequence[Layer],
        *,
        k: int,
        device: torch.device,
        composite: str | None = None,
    ) -> None:
        self.model = model
        self.layers = list(layers)
        self.k = k
        self.device = device
        self.composite = composite
        self._engine: Any = None
        self.values = {
            layer.name: torch.full((layer.width, k), -torch.inf, device=device)
            for layer in self.layers
        }
        self.ids = {
            layer.name: torch.full((layer.width, k), -1, dtype=torch.long, device=device)
            for layer in self.layers
        }

    @property
    def settings(self) -> dict[str, Any]:
        """What the lists rank by, stored in the run's meta."""
        composite = self._engine.composite if self._engine is not None else self.composite
        return {"target": "prediction", "composite": composite, "k": self.k}

    def begin(self, batch: Batch) -> None:
        from ..explain.base import no_param_grads, untouched
        from ..explain.lrp import Engine

        x = batch.images
        with untouched(self.model), no_param_grads(self.model), torch.enable_grad():
            if self._engine is None:
                self._engine = Engine(self.model, x, self.composite)
            rel, _ = self._engine.run(x, None, record=[layer.op.label for layer in self.layers])
        for layer in self.layers:
            r = rel.recorded[layer.op.label]
            if r.numel() == 0:  # no relevance reaches it (not between input and output)
                per = torch.zeros(len(x), layer.width, device=x.device)
            else:
                u = layer.units(r)  # (B, C, *positions)
                per = u.reshape(u.shape[0], u.shape[1], -1).sum(2).to(torch.float32)
            self._fold(layer.name, per.T, batch.ids)

    def _fold(self, name: str, values: Tensor, ids: Tensor) -> None:
        """Fold a batch's ``values`` (units, n) of samples ``ids`` (n,) into the lists."""
        v = torch.cat([self.values[name], values.to(self.device)], 1)
        i = torch.cat([self.ids[name], ids.to(self.device).expand(values.shape[0], -1)], 1)
        self._keep(name, v, i)

    def _keep(self, name: str, v: Tensor, i: Tensor) -> None:
        """Keep the ``k`` best of candidates ``v``/``i`` (units, n); ties go to the smaller
        sample id, so the lists depend on neither batch order nor ranks."""
        v = v.nan_to_num(nan=-torch.inf)  # a NaN relevance never takes a rank (sorts first)
        by_id = i.masked_fill(i < 0, torch.iinfo(torch.long).max).argsort(dim=1, stable=True)
        v, i = v.gather(1, by_id), i.gather(1, by_id)
        order = v.argsort(dim=1, descending=True, stable=True)[:, : self.k]
        self.values[name], self.ids[name] = v.gather(1, order), i.gather(1, order)

    def update(self, layer: Layer, output: Tensor, batch: Batch) -> None:
        """Nothing: the relevance comes from :meth:`begin`'s own backward."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "values": {n: v.cpu() for n, v in self.values.items()},
            "ids": {n: i.cpu() for n, i in self.ids.items()},
            "composite": self.composite,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("composite") != self.composite:
            raise LurkerError(
                f"its relevance lists were made with composite {state.get('composite')!r}, "
                f"this probe asks for {self.composite!r}; resume with the same composite"
            )
        for name in self.values:
            self.values[name] = state["values"][name].to(self.device)
            self.ids[name] = state["ids"][name].to(self.device)

    def merge(self, group: Any = None) -> None:
        """Gather every rank's lists and keep the best ``k`` (in layer order)."""
        import torch.distributed as dist

        world = dist.get_world_size(group)
        for layer in self.layers:
            name = layer.name
            vs = [torch.empty_like(self.values[name]) for _ in range(world)]
            is_ = [torch.empty_like(self.ids[name]) for _ in range(world)]
            dist.all_gather(vs, self.values[name], group=group)
            dist.all_gather(is_, self.ids[name], group=group)
            self._keep(name, torch.cat(vs, 1), torch.cat(is_, 1))

    def finish(self, writer: RunWriter) -> None:
        """Write the lists (after the unit statistics, which create the layers)."""
        lists = {n: (self.values[n].cpu().numpy(), self.ids[n].cpu().numpy()) for n in self.values}
        writer.write_relevance(lists, self.settings)


#: The most bytes of per-sample features a probe keeps (float16, on the CPU).
EMBED_BUDGET = 4 << 30


class EmbeddingConsumer(BatchConsumer):
    """Every sample's feature vector at one layer (mean-pooled over its positions, kept as
    float16 on the CPU) with the model's prediction and confidence (its probability: lurker.models.probabilities): what
    the dataset map (:mod:`lurker.map`) reduces to 2-D, gathered during the sweep.

    With ``rows`` (a file beside the checkpoint) a checkpoint appends only the samples
    gathered since the previous one to that file and records how many rows are committed,
    so a long sweep writes each feature once instead of all of them at every checkpoint.
    A resume reads the committed rows back; rows appended after the last checkpoint (a
    crash between the two writes) are cut off by the next save, never read.
    """

    key = "embedding"

    def __init__(self, layer: Layer, *, probed: bool, rows: Path | None = None) -> None:
        self.layer = layer
        self.extra_layers = () if probed else (layer,)
        self.rows = rows
        self._feats: list[Tensor] = []
        self._ids: list[Tensor] = []
        self._pred: list[Tensor] = []
        self._conf: list[Tensor] = []
        self._own: bool | None = None  # the model's output is probabilities (first batch)
        self._saved_chunks = 0  # leading chunks of the lists already in the rows file
        self._saved_rows = 0  # rows of the file that the last checkpoint committed
        self._overflow = 0  # finite features that float16 turned into inf
        self._largest = 0.0  # the largest finite magnitude among the features (float32)

    @property
    def settings(self) -> dict[str, Any]:
        """What the features are, stored in the run's meta as ``embedding``; with
        ``overflow`` (how many values float16 stored as inf, and the largest magnitude)
        when the layer's values exceed float16's range, so a reader of the run can tell."""
        out: dict[str, Any] = {
            "layer": self.layer.name,
            "op": self.layer.op.label,
            "dim": self.layer.width,
            "pooled": bool(self.layer.layout.positions),
        }
        if self._overflow:
            out["overflow"] = {"values": self._overflow, "max_abs": self._largest}
        return out

    def overflow_message(self) -> str | None:
        """Why some stored features are inf and what to do instead (None: none are)."""
        if not self._overflow:
            return None
        return (
            f"embedding of layer {self.layer.name!r}: {self._overflow:,} feature value"
            f"{'s' if self._overflow != 1 else ''} exceed float16's range (65,504; the "
            f"largest magnitude is {self._largest:.4g}) and {'are' if self._overflow != 1 else 'is'}"
            " stored as inf, so the dataset map refuses these features. Embed another layer "
            "(embed=LAYER, `--embed-layer`), or scale the model's values down; for the exact "
            'float32 values use a trace ("Activations of chosen layers over a stimulus set" '
            "in docs/tracing.md)"
        )

    @property
    def _row_dtype(self) -> np.dtype:
        """One sample's record in the rows file (fixed size, so row n sits at n * size)."""
        return np.dtype(
            [("id", "<i8"), ("pred", "<i8"), ("conf", "<f4"), ("f", "<f2", (self.layer.width,))]
        )

    def update(self, layer: Layer, output: Tensor, batch: Batch) -> None:
        if layer.op.index != self.layer.op.index:
            return
        u = layer.units(output)
        f = u.reshape(u.shape[0], u.shape[1], -1).float().mean(2)  # pool in float32
        full = f.to("cpu")
        half = full.to(torch.float16)
        lost = int((half.isinf() & full.isfinite()).sum())  # float16 overflowed them
        if lost:
            self._overflow += lost
            self._largest = max(self._largest, float(full[full.isfinite()].abs().max()))
        self._feats.append(half)
        self._ids.append(batch.ids.to("cpu"))

    def end(self, batch: Batch, output: Any) -> None:
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        n = len(batch.ids)
        if isinstance(out, Tensor) and out.dim() == 2 and out.shape[0] == n and out.shape[1] > 1:
            # the logits' argmax: a softmax of tiny logits (a random-init head) is
            # uniform in float32, and its max would name class 0 for every sample
            pred = out.detach().float().argmax(1)
            # a model ending in a softmax gives probabilities already: decided on the first
            # batch, at the output's own precision, and kept for every batch of the pass
            if self._own is None:
                self._own = is_probabilities(out, 1)
            conf = probabilities(out.detach(), 1, self._own).gather(1, pred[:, None])[:, 0]
        else:  # not a (B, classes) logit tensor: no prediction to tell
            pred = torch.full((n,), -1, dtype=torch.long)
            conf = torch.full((n,), float("nan"))
        self._pred.append(pred.to("cpu", torch.long))
        self._conf.append(conf.to("cpu", torch.float32))

    def arrays(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(ids, features, pred, conf)`` so far, sorted by sample id."""
        ids, feats, pred, conf = self._concat(0)
        order = ids.argsort()
        return ids[order], feats[order], pred[order], conf[order]

    def _concat(self, start: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The rows of chunks ``start:`` in gathering order."""
        if len(self._ids) <= start:
            w = self.layer.width
            empty = torch.empty(0, dtype=torch.long)
            return empty, torch.empty(0, w, dtype=torch.float16), empty, torch.empty(0)
        return (
            torch.cat(self._ids[start:]),
            torch.cat(self._feats[start:]),
            torch.cat(self._pred[start:]),
            torch.cat(self._conf[start:]),
        )

    def _set(self, ids: Tensor, feats: Tensor, pred: Tensor, conf: Tensor) -> None:
        self._ids, self._feats, self._pred, self._conf = [ids], [feats], [pred], [conf]

    def state_dict(self) -> dict[str, Any]:
        """With a rows file: append the new rows to it (durably, before the checkpoint
        that commits them is written) and return their count; else every row."""
        if self.rows is None:
            ids, feats, pred, conf = self.arrays()
            return {
                "layer": self.layer.name, "ids": ids, "features": feats, "pred": pred,
                "conf": conf, "overflow": self._overflow, "max_abs": self._largest,
            }  # fmt: skip
        ids, feats, pred, conf = self._concat(self._saved_chunks)
        rec = np.empty(len(ids), self._row_dtype)
        rec["id"], rec["pred"], rec["conf"] = ids.numpy(), pred.numpy(), conf.numpy()
        rec["f"] = feats.numpy()
        dt = self._row_dtype
        fd = os.open(self.rows, os.O_RDWR | os.O_CREAT, 0o644)
        with os.fdopen(fd, "r+b") as f:
            f.truncate(self._saved_rows * dt.itemsize)  # rows no checkpoint committed
            f.seek(0, os.SEEK_END)
            f.write(rec.tobytes())
            f.flush()
            os.fsync(f.fileno())
        self._saved_chunks, self._saved_rows = len(self._ids), self._saved_rows + len(ids)
        return {
            "layer": self.layer.name,
            "rows_file": self.rows.name,
            "rows": self._saved_rows,
            "row_bytes": dt.itemsize,
            "overflow": self._overflow,
            "max_abs": self._largest,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("layer") != self.layer.name:
            raise LurkerError(
                f"its features are of layer {state.get('layer')!r}, this probe embeds "
                f"{self.layer.name!r}; resume with the same embed="
            )
        self._overflow = int(state.get("overflow", 0))
        self._largest = float(state.get("max_abs", 0.0))
        if "features" in state:  # every row inside the checkpoint
            self._set(state["ids"], state["features"], state["pred"], state["conf"])
            self._saved_chunks = self._saved_rows = 0  # the next save writes them all
            return
        n, dt = int(state["rows"]), self._row_dtype
        path = self.rows.parent / state["rows_file"] if self.rows is not None else None
        have = path.stat().st_size if path is not None and path.exists() else 0
        if path is None or state.get("row_bytes") != dt.itemsize or have < n * dt.itemsize:
            raise LurkerError(
                f"its features were saved in {state['rows_file']!r} beside it, which is "
                f"missing, shorter than the {n:,} rows it commits or of another width; "
                "delete the checkpoint to sweep again from the start"
            )
        rec = np.fromfile(path, dtype=dt, count=n)
        self._set(
            torch.from_numpy(rec["id"].copy()),
            torch.from_numpy(rec["f"].copy()),
            torch.from_numpy(rec["pred"].copy()),
            torch.from_numpy(rec["conf"].copy()),
        )
        self._saved_chunks, self._saved_rows = 1, n

    def discard(self) -> None:
        """Delete the rows file (the run is written, or this rank's part is merged)."""
        if self.rows is not None:
            self.rows.unlink(missing_ok=True)

    def merge(self, group: Any = None) -> None:
        """Gather every rank's samples (disjoint shards) on rank 0, the one that writes, in
        id order (not on every rank: the features can be gigabytes)."""
        import torch.distributed as dist

        first = dist.get_rank(group) == 0
        parts: list[Any] | None = [None] * dist.get_world_size(group) if first else None
        mine = (*self.arrays(), self._overflow, self._largest)
        dist.gather_object(
            mine, parts, dst=dist.get_global_rank(group, 0) if group else 0, group=group
        )
        if parts is not None:
            self._set(*(torch.cat([p[i] for p in parts]) for i in range(4)))
            self._set(*self.arrays())
            self._overflow = sum(p[4] for p in parts)
            self._largest = max(p[5] for p in parts)

    def finish(self, writer: RunWriter) -> None:
        ids, feats, pred, conf = self.arrays()
        if (message := self.overflow_message()) is not None:
            warn(message)
        writer.write_embedding(
            ids.numpy(), feats.numpy(), pred.numpy(), conf.numpy(), self.settings
        )


class ChannelRangeConsumer(BatchConsumer):
    """Each input channel's least and greatest finite value over the dataset, and its count
    of finite values, on a run of signals: the data's own scale, which feature
    visualization bounds each channel's signal to (a raw waveform within ±0.6 must not get
    ±3 pulses). One masked reduction of the input per batch, none of the activations; min,
    max and count merge exactly in any order (batches, resumes, ranks).

    ``channel_axis``: the sample's axis (batch not counted) holding the channels, 0 for
    ``(C, T)``, 1 for a channels-last ``(T, C)``, None for a waveform ``(T,)`` (one
    channel).
    """

    key = "channel_range"

    def __init__(self, channels: int, channel_axis: int | None, device: torch.device) -> None:
        self.channels = int(channels)
        self.channel_axis = channel_axis
        self.low = torch.full((self.channels,), float("inf"), dtype=torch.float64, device=device)
        self.high = torch.full((self.channels,), -float("inf"), dtype=torch.float64, device=device)
        self.count = torch.zeros(self.channels, dtype=torch.int64, device=device)

    def begin(self, batch: Batch) -> None:
        """Fold the batch's input in (before the forward: an in-place op cannot change it).
        A min and a max over the batch's other axes, in place; only a batch with a value
        that is not finite (or any batch on a GPU, where asking would wait for it) takes
        the masked reductions that leave such values out."""
        x = batch.images
        dims = tuple(
            d for d in range(x.dim()) if self.channel_axis is None or d != 1 + self.channel_axis
        )
        plain = False
        if x.device.type == "cpu":  # asking whether all is finite costs no wait here
            lo, hi = x.amin(dim=dims).reshape(-1), x.amax(dim=dims).reshape(-1)
            plain = bool(torch.isfinite(lo).all() and torch.isfinite(hi).all())
        if plain:
            self.count += x.numel() // self.channels
        else:  # masked with Python scalars: no tensor copied to the device, no sync
            finite = torch.isfinite(x)
            lo = x.masked_fill(~finite, float("inf")).amin(dim=dims).reshape(-1)
            hi = x.masked_fill(~finite, -float("inf")).amax(dim=dims).reshape(-1)
            self.count += finite.sum(dim=dims).reshape(-1)
        self.low = torch.minimum(self.low, lo.double())
        self.high = torch.maximum(self.high, hi.double())

    def update(self, layer: Layer, output: Tensor, batch: Batch) -> None:
        """Nothing: the range is of the input, taken in :meth:`begin`."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "channel_axis": self.channel_axis,
            "low": self.low.cpu(),
            "high": self.high.cpu(),
            "count": self.count.cpu(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        low = state["low"]
        if state.get("channel_axis") != self.channel_axis or len(low) != self.channels:
            raise LurkerError(
                "its channel range is of another input layout: delete it to sweep again "
                "from the start"
            )
        dev = self.low.device
        self.low = low.to(dev, torch.float64)
        self.high = state["high"].to(dev, torch.float64)
        self.count = state["count"].to(dev, torch.int64)

    def merge(self, group: Any = None) -> None:
        """All-reduce: min of the lows, max of the highs, sum of the counts."""
        import torch.distributed as dist

        dist.all_reduce(self.low, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(self.high, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(self.count, group=group)

    def result(self) -> dict[str, list[Any]]:
        """``{"min", "max", "finite"}``, one entry per channel (min and max null for a
        channel with no finite value)."""
        n = self.count.cpu().tolist()
        lo, hi = self.low.cpu().tolist(), self.high.cpu().tolist()
        return {
            "min": [v if c else None for v, c in zip(lo, n, strict=True)],
            "max": [v if c else None for v, c in zip(hi, n, strict=True)],
            "finite": [int(c) for c in n],
        }

    def finish(self, writer: RunWriter) -> None:
        """Meta ``channel_range``."""
        writer.meta_set("channel_range", self.result())


class LabelsConsumer(BatchConsumer):
    """Every swept sample's label, as its item carries it, for a dataset that cannot tell
    its labels without reading its items (no ``targets``): the sweep reads each item once,
    so the run's classes and samples' labels are collected here rather than by a pass of
    their own. The labels are kept on the sweep's device (no sync per batch), indexed by
    sample id, -1 for samples not swept (or skipped, or unlabelled); ranks sweep disjoint
    shards, so their merge is a max.

    ``ignored`` is the run's ``labels_ignored`` meta once an item's label was no class index
    (the sweep decides it, in the main process, from the batch): the run is then unlabelled,
    every label -1, and it stays so through a checkpoint and its resume."""

    key = "labels"

    def __init__(self, size: int, device: torch.device) -> None:
        self.labels = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.ignored: dict[str, Any] | None = None

    def ignore(self, why: dict[str, Any]) -> None:
        """Make the run unlabelled for ``why`` (``{"item", "reason"}``): the labels read so
        far are forgotten, and the batches to come carry none."""
        self.ignored = why
        self.labels.fill_(-1)

    def begin(self, batch: Batch) -> None:
        """Record the batch's labels under its sample ids."""
        self.labels.index_copy_(0, batch.ids, batch.labels)

    def update(self, layer: Layer, output: Tensor, batch: Batch) -> None:
        """Nothing: the labels come with the batch, taken in :meth:`begin`."""

    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.labels.cpu(), "ignored": self.ignored}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state["labels"]
        if len(saved) != len(self.labels):
            raise LurkerError(
                f"its labels are of {len(saved)} samples, and the dataset has "
                f"{len(self.labels)}: delete it to sweep again from the start"
            )
        self.labels = saved.to(self.labels.device, torch.int64)
        self.ignored = state.get("ignored")  # (None in a checkpoint from before it was kept)

    def merge(self, group: Any = None) -> None:
        """All-reduce MAX: each sample's label comes from the one rank that swept it."""
        import torch.distributed as dist

        dist.all_reduce(self.labels, op=dist.ReduceOp.MAX, group=group)

    def result(self) -> list[int]:
        """Every sample's label by sample id, -1: none (not swept, skipped, unlabelled)."""
        return [int(v) for v in self.labels.cpu().tolist()]

    def finish(self, writer: RunWriter) -> None:
        """Nothing: the sweep names the run's classes and samples from :meth:`result`."""
