"""The probe's sweep: one pass over a dataset, statistics for every unit of every layer.

Per batch, the traced model is re-run under the replay mode, which hands the output of
each selected op to that layer's :class:`~lurker.probe.stats.UnitStats` as it is produced
(before any later in-place op can change it): one vectorised top-k merge per layer, no
per-image or per-unit Python loops, nothing stored per sample. State is checkpointed
every few batches (atomically), so a killed sweep resumes where it stopped; under
``torchrun`` each rank sweeps its shard and the statistics are merged with collectives.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import io
import numbers
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import Trace, trace
from ..capture._replay import Replayer, run_with
from ..errors import LurkerError
from ..graph.nodes import Op
from ..store import LayerResult, Run, RunWriter, atomic_write_bytes, run_lock
from .stats import HostBatch, UnitStats

CONV = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
LINEAR = {"linear", "addmm"}
ACTIVATIONS = {
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "gelu", "silu", "silu_", "sigmoid",
    "tanh", "elu", "elu_", "selu", "celu", "hardswish", "hardswish_", "hardsigmoid", "mish",
    "softplus", "hardtanh", "hardtanh_", "prelu", "glu",
}  # fmt: skip


@dataclass
class Layer:
    """A selected op and how to read units out of its output."""

    op: Op
    name: str  # module path when the op produces a module's output, else the op label
    channels_last: bool  # (B, L, C) outputs of linear layers on sequences

    def units(self, t: Tensor) -> Tensor:
        return t.transpose(1, -1) if self.channels_last else t


def _layer_name(op: Op) -> str:
    return op.module_outputs[0] if op.module_outputs else op.label


def _is_channels_last(op: Op, trace: Trace) -> bool:
    if op.shape is None or len(op.shape) != 3:
        return False
    node = op
    for _ in range(4):  # the op itself or the linear right before an activation
        if node.name in LINEAR:
            return True
        if node.name in CONV or not node.parents:
            return False
        node = trace.ops[node.parents[0]]
    return False


def _module_type(op: Op, trace: Trace) -> str | None:
    if not op.module_outputs:
        return None
    info = trace.modules.get(op.module_outputs[0].split(":")[0])
    return info.type if info else None


def select_layers(trace: Trace, layers: Sequence[str] | str | None = None) -> list[Layer]:
    """Pick the layers to probe.

    Default: every conv and linear op and every activation function, where the output has
    a channel dimension. ``layers`` may name op labels (``conv2d_3``), module paths
    (``features.10``), module types (``Conv2d``) or op names (``relu``), globs allowed.
    """
    candidates = [
        op
        for op in trace.ops
        if op.kind == "op" and op.shape is not None and len(op.shape) in (2, 3, 4)
    ]
    if layers is None:
        chosen = [op for op in candidates if op.name in CONV | LINEAR | ACTIVATIONS]
    else:
        pats = [layers] if isinstance(layers, str) else list(layers)
        chosen = []
        unmatched = set(pats)
        for op in candidates:
            names = [op.label, op.rolled, op.name, *op.module_outputs]
            mtype = _module_type(op, trace)
            if mtype:
                names.append(mtype)
            hit = [p for p in pats if any(fnmatch.fnmatchcase(n, p) for n in names)]
            if hit:
                chosen.append(op)
                unmatched.difference_update(hit)
        if unmatched:
            valid = sorted({_layer_name(op) for op in candidates})
            shown = ", ".join(valid[:60]) + (" ..." if len(valid) > 60 else "")
            raise LurkerError(
                f"No layer matches {sorted(unmatched)}. Name op labels, module paths, module "
                f"types or op names (globs allowed). Layers with channels here: {shown}"
            )
    if not chosen:
        raise LurkerError(
            "No layer with a channel dimension was found to probe; name layers explicitly."
        )
    return [Layer(op, _layer_name(op), _is_channels_last(op, trace)) for op in chosen]


def fingerprint(model: nn.Module) -> str:
    """Identifies a model by architecture AND weights, to refuse mixing two models' runs.

    Hashes names, shapes and a strided sample of up to 4,096 values per tensor: cheap even
    for large models, and two different trainings differ at sampled positions.
    """
    h = hashlib.sha1(type(model).__name__.encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            if p.numel():
                flat = p.detach().flatten()
                sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float64)
                h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _progress(total: int, enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("probing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} img/s"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def _one_writer(fn: Callable[..., Run]) -> Callable[..., Run]:
    """Run ``fn`` holding the run directory's lock (rank 0, the only writer, takes it):
    a second probe into the same ``out`` fails at once instead of redoing the sweep."""

    @functools.wraps(fn)
    def locked(*args: Any, out: str | os.PathLike[str], **kwargs: Any) -> Run:
        kwargs = _check_args(**kwargs)  # before the lock creates the directory
        if _dist()[0] != 0:
            return fn(*args, out=out, **kwargs)
        with run_lock(out):
            return fn(*args, out=out, **kwargs)

    return locked


def _check_args(**kwargs: Any) -> dict[str, Any]:
    """Refuse arguments the sweep cannot use before anything is traced or created; return
    them with integer ones as Python ints (numpy ones would not go into the run's JSON)."""
    at_least = {"k": 1, "batch_size": 1, "num_workers": 0, "hist_bins": 1}
    options = {"k": " (CLI: --k)", "batch_size": " (CLI: -b)", "num_workers": " (CLI: --workers)"}
    for name, low in at_least.items():
        value = kwargs.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < low:
            raise LurkerError(
                f"probe: {name} must be an integer >= {low}, got {value!r}{options.get(name, '')}."
            )
        kwargs[name] = int(value)
    every = kwargs.get("checkpoint_every")
    if every is not None and (not _is_int(every) or every < 1):
        raise LurkerError(
            f"probe: checkpoint_every must be None or an integer >= 1, got {every!r}."
        )
    seconds = kwargs.get("checkpoint_seconds")
    if seconds is not None and not (isinstance(seconds, (int, float)) and seconds >= 0):
        raise LurkerError(f"probe: checkpoint_seconds must be a number >= 0, got {seconds!r}.")
    return kwargs


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@_one_writer
def probe(
    model: nn.Module,
    dataset: Any,
    *,
    out: str | os.PathLike[str],
    layers: Sequence[str] | str | None = None,
    k: int = 9,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float = 30.0,
    hist_bins: int = 64,
    overwrite: bool = False,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> Run:
    """Sweep ``dataset`` once through ``model`` and store per-unit statistics in ``out``.

    ``dataset`` is any torch Dataset of (image, label), or one from
    :mod:`lurker.probe.data`. State is checkpointed every ``checkpoint_seconds`` (and
    every ``checkpoint_every`` batches, if given); rerunning the same call after an
    interruption resumes it. Under ``torchrun`` every rank sweeps its shard and rank 0
    writes the merged run. Arguments are checked before anything is created; while the
    probe runs, its process holds ``out`` (a second probe into it fails at once).
    """
    from . import data as pdata
    from .receptive import receptive_fields

    ds = pdata.wrap(dataset)
    if len(ds) == 0:
        raise LurkerError("The dataset is empty: nothing to probe.")
    rank, world = _dist()
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if dev.type == "cuda" and world > 1 and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    model = model.eval().to(dev)
    x0 = ds.first_image().unsqueeze(0).to(dev)
    with torch.no_grad():
        tr = trace(model, x0)
    selected = select_layers(tr, layers)
    try:
        rfs = receptive_fields(tr)
    except LurkerError:
        rfs = {}
    all_labels = _labels(ds)
    classes = list(ds.class_names or [str(i) for i in range(max(all_labels, default=-1) + 1)])
    num_classes = max(len(classes), 1)

    out = Path(out)
    run_meta = {
        "model": type(model).__name__,
        "model_fingerprint": fingerprint(model),
        "dataset": ds.description,
        "k": k,
        "image_size": list(x0.shape[2:]),
        "config": {
            "layers": [layer.name for layer in selected],
            "batch_size": batch_size,
            "hist_bins": hist_bins,
            "input_shape": list(x0.shape[1:]),
            "mean": ds.mean,
            "std": ds.std,
            **(meta or {}),
        },
    }
    if world > 1:
        prints: list[Any] = [None] * world
        torch.distributed.all_gather_object(prints, run_meta["model_fingerprint"])
        if len(set(prints)) > 1:
            raise LurkerError(
                f"The {world} processes hold different models (fingerprints {prints}): load "
                "the same weights on every rank before probing."
            )
    writer: RunWriter | None = None
    if rank == 0:
        writer = RunWriter.create(out, meta=run_meta, overwrite=overwrite)
    if world > 1:
        torch.distributed.barrier()
    ckpt = out / (f"checkpoint-rank{rank}.pt" if world > 1 else "checkpoint.pt")

    stats: dict[int, UnitStats] = {}
    done = 0
    skipped: list[tuple[str, str]] = []
    if ckpt.exists() and (writer is None or writer.resumed):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if (
            state.get("layers") == [layer.name for layer in selected]
            and state.get("world") == world
        ):
            done = int(state["done"])
            skipped = [tuple(s) for s in state["skipped"]]  # type: ignore[misc]
            for layer in selected:
                stats[layer.op.index] = UnitStats.from_state_dict(
                    state["stats"][layer.name], device=dev
                )
    widths = {
        layer.op.index: layer.op.shape[-1] if layer.channels_last else layer.op.shape[1]
        for layer in selected
    }
    # per-sample statistics are buffered on the device (16 bytes per unit and sample) and
    # folded in every few batches; keep all layers' buffers together under ~512 MiB
    buffered = max(batch_size, min(4096, (512 << 20) // (16 * sum(widths.values()))))
    for layer in selected:
        if layer.op.index not in stats:
            stats[layer.op.index] = UnitStats(
                widths[layer.op.index],
                k,
                num_classes,
                device=dev,
                hist_bins=hist_bins,
                buffer_samples=None if dev.type == "cpu" else buffered,
            )

    indices = list(range(rank, len(ds), world))  # disjoint shards, no padding duplicates
    todo = indices[done:]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, todo),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=pdata.collate,
        pin_memory=dev.type == "cuda",
    )
    by_index = {layer.op.index: layer for layer in selected}
    if world > 1 and any(s.hist_range is None for s in stats.values()):
        # one process fixes histogram ranges from its first batch (= the dataset's first
        # batch_size items) as it goes; ranks see other first batches, so each one runs
        # that same batch once up front and all agree without a collective
        _calibrate(tr, ds, by_index, stats, batch_size, dev)

    def save_checkpoint() -> None:
        buf = io.BytesIO()
        torch.save(
            {
                "done": done,
                "world": world,
                "layers": [layer.name for layer in selected],
                "skipped": [list(s) for s in _merge_skipped(skipped, ds.skipped)],
                "stats": {by_index[i].name: s.state_dict() for i, s in stats.items()},
            },
            buf,
        )
        atomic_write_bytes(ckpt, buf.getvalue())

    n_batches = 0
    replayer = Replayer(tr, by_index.keys(), lambda i, v: None)
    t_start = last_ckpt = time.perf_counter()
    seen = 0
    with _progress(len(indices), progress and rank == 0) as bar, torch.no_grad():
        task = bar.add_task("probe", total=len(indices), completed=done, rate="-")
        for batch in loader:
            images, labels, ids = batch  # unreadable images were dropped (ds.skipped)
            if len(images):
                images = images.to(dev, non_blocking=True)
                labels = labels.to(dev, non_blocking=True)
                ids = ids.to(dev, non_blocking=True)

                # the batch's ids and labels as the CPU kernels take them, once for all layers
                host = HostBatch(ids, labels, num_classes) if dev.type == "cpu" else None

                def update(idx: int, value: Any, labels=labels, ids=ids, host=host) -> None:
                    # an unfixed histogram range is fixed by the first batch's update
                    t = value[0] if isinstance(value, tuple) else value
                    stats[idx].update(by_index[idx].units(t), ids, labels, host=host)

                replayer.run(model, (images,), {}, update)
            step = min(batch_size, len(todo) - n_batches * batch_size)
            done += step
            seen += step
            n_batches += 1
            rate = seen / max(time.perf_counter() - t_start, 1e-9)
            bar.update(task, completed=done, rate=f"{rate:,.0f}")
            now = time.perf_counter()
            if now - last_ckpt >= checkpoint_seconds or (
                checkpoint_every and n_batches % checkpoint_every == 0
            ):
                save_checkpoint()  # a device sync and a file write: not every batch
                last_ckpt = now
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    sweep_s = time.perf_counter() - t_start
    skipped = _merge_skipped(skipped, ds.skipped)
    if world > 1:
        for i in sorted(stats):
            stats[i].all_reduce()
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, skipped)
        skipped = _merge_skipped(*gathered)
        figures: list[Any] = [None] * world  # the run's figures count every rank's share
        torch.distributed.all_gather_object(figures, (seen, sweep_s))
        seen = sum(n for n, _ in figures)
        sweep_s = max(t for _, t in figures)
    if rank != 0:
        if ckpt.exists():
            ckpt.unlink()
        torch.distributed.barrier()
        return None  # type: ignore[return-value]
    assert writer is not None
    results = []
    for layer in selected:
        r = stats[layer.op.index].result()
        rf = rfs.get(layer.op.index)
        results.append(
            LayerResult(
                name=layer.name,
                module=layer.op.module_outputs[0] if layer.op.module_outputs else layer.op.module,
                op=layer.op.label,
                kind=_module_type(layer.op, tr) or layer.op.name,
                shape=tuple(layer.op.shape[1:]),
                rf=rf.to_dict() if rf is not None else None,
                mean_values=r["mean_values"],
                mean_ids=r["mean_ids"],
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
    # One transaction (one fsync): classes, this call's config (on resume the store keeps
    # the first call's other meta; the config says how to load this call's model and data
    # again), the sweep's figures, samples, skipped files and results are all stored, and
    # the run marked complete, or none of it is.
    with writer.batch():
        writer.set_classes(classes)
        writer.meta_set("config", run_meta["config"])
        writer.meta_set(
            "sweep",
            {
                "seconds": sweep_s,
                "images": seen,
                "images_per_s": seen / max(sweep_s, 1e-9),
                "world": world,
            },
        )
        writer.add_samples(
            (i, path, all_labels[i] if all_labels[i] >= 0 else None, src)
            for i, path, _, src in ds.sample_rows()
        )
        writer.add_skipped(skipped)
        writer.write_layers_result(results)
    writer.close()
    if world > 1:
        torch.distributed.barrier()
    return Run.open(out)


def _labels(ds: Any) -> list[int]:
    """Every sample's label (-1: none), cheaply when the dataset can tell without images."""
    labels = ds.labels_list()
    if labels is not None:
        return [int(v) for v in labels]
    inner = getattr(ds, "dataset", None)
    targets = getattr(inner, "targets", None)
    if targets is None and isinstance(inner, torch.utils.data.TensorDataset):
        targets = inner.tensors[1] if len(inner.tensors) > 1 else None
    if targets is not None and len(targets) == len(ds):
        return [int(v) for v in targets]
    out = []  # last resort: one pass that reads every item
    for i in range(len(ds)):
        item = ds[i]
        out.append(int(item[1]) if isinstance(item, tuple) else -1)  # Skipped: no label
    return out


def _merge_skipped(*parts: Any) -> list[tuple[str, str]]:
    """Unreadable files from several sources (checkpoint, workers, ranks), once each."""
    seen: dict[str, str] = {}
    for part in parts:
        for path, reason in part:
            seen.setdefault(str(path), str(reason))
    return sorted(seen.items())


def _calibrate(
    tr: Trace, ds: Any, by_index: dict[int, Layer], stats: dict[int, UnitStats], n: int, dev
) -> None:
    """Fix each layer's histogram range from the dataset's first batch.

    Every rank (and a resumed sweep) sees the same first batch, so every rank agrees on
    the bins without a collective, and a distributed run equals a single-process one.
    """
    from . import data as pdata

    images, _, _ = pdata.collate([ds[i] for i in range(min(n, len(ds)))])

    def first(idx: int, value: Any) -> None:
        t = value[0] if isinstance(value, tuple) else value
        stats[idx].set_hist_range_from(by_index[idx].units(t))

    run_with(tr, (images.to(dev),), {}, by_index.keys(), first)
