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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import Trace, trace
from ..errors import LurkerError
from ..graph.nodes import Op
from ..store import LayerResult, Run, RunWriter, atomic_write_bytes, run_lock
from .layout import Layout, Skip, infer_layouts, op_names, rf_matches
from .stats import HostBatch, UnitStats

CONV = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
LINEAR = {"linear", "addmm"}
ACTIVATIONS = {
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "gelu", "silu", "silu_", "sigmoid",
    "tanh", "elu", "elu_", "selu", "celu", "hardswish", "hardswish_", "hardsigmoid", "mish",
    "softplus", "hardtanh", "hardtanh_", "prelu", "glu",
}  # fmt: skip


ATTENTION = {"scaled_dot_product_attention", "_native_multi_head_attention"}
_PRODUCTS = {"matmul", "bmm", "baddbmm", "einsum", "mm"}


@dataclass
class Layer:
    """A selected op and how to read units out of its output (see :mod:`.layout`)."""

    op: Op
    name: str  # module path when the op produces a module's output, else the op label
    layout: Layout

    @property
    def width(self) -> int:
        """The number of units."""
        return int(self.op.shape[self.layout.unit])  # type: ignore[index]

    def units(self, t: Tensor) -> Tensor:
        """``t`` as the (B, C, *positions) view :class:`UnitStats` takes."""
        return self.layout.units(t)


def _layer_name(op: Op) -> str:
    return op.module_outputs[0] if op.module_outputs else op.label


def _module_type(op: Op, trace: Trace) -> str | None:
    if not op.module_outputs:
        return None
    info = trace.modules.get(op.module_outputs[0].split(":")[0])
    return info.type if info else None


def _is_transformer(trace: Trace) -> bool:
    """Attention anywhere: a fused attention op, or a softmax over a product of tensors."""
    for op in trace.ops:
        if op.name in ATTENTION:
            return True
        if op.name == "softmax":
            todo, seen = list(op.parents), 0
            while todo and seen < 4:  # the product, maybe scaled or masked on the way
                parent = trace.ops[todo.pop(0)]
                if parent.name in _PRODUCTS and not parent.params:
                    return True
                todo.extend(parent.parents[:1])
                seen += 1
    return False


_CONTAINERS = {"Sequential", "ModuleList", "ModuleDict"}


def _blocks(trace: Trace) -> set[str]:
    """Module paths of repeated blocks: modules with submodules, not plain containers,
    with a sibling of the same type (``encoder.layers.encoder_layer_3``, Swin's
    ``features.1.0``, timm's ``blocks.5``)."""
    out = set()
    for path, info in trace.modules.items():
        parent = trace.modules.get(info.parent) if info.parent is not None else None
        if not path or parent is None or not info.children or info.type in _CONTAINERS:
            continue
        same = [
            c for c in parent.children if c in trace.modules and trace.modules[c].type == info.type
        ]
        if len(same) >= 2:
            out.add(path)
    return out


def _default_ops(trace: Trace, candidates: list[Op]) -> list[Op]:
    """CNNs: every conv, linear and activation op with a (B, C[, L | H, W]) output.

    Transformers: the outputs of repeated blocks, the MLP hidden layers (an activation
    right after a linear) and convs outside the blocks (patch embeddings, stems); not the
    reshapes and attention internals in between."""
    if not _is_transformer(trace):
        return [
            op
            for op in candidates
            if op.name in CONV | LINEAR | ACTIVATIONS and len(op.shape or ()) in (2, 3, 4)
        ]
    blocks = _blocks(trace)

    def in_block(op: Op) -> bool:
        return any(path in blocks for path, _ in op.modules)

    def wanted(op: Op) -> bool:
        if {m.split(":")[0] for m in op.module_outputs} & blocks:
            return True  # a block's output
        if op.name in ACTIVATIONS:  # an MLP's hidden layer
            return any(trace.ops[p].name in LINEAR for p in op.parents[:1])
        return op.name in CONV and not in_block(op)

    return [op for op in candidates if wanted(op)]


def _has_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def select_layers(
    trace: Trace,
    layers: Sequence[str] | str | None = None,
    *,
    unit_dim: int | Mapping[str, int] | None = None,
    skipped: list[tuple[str, str]] | None = None,
    layouts: Mapping[int, Layout | Skip] | None = None,
) -> list[Layer]:
    """Pick the layers to probe, each with its layout (which axis holds the units).

    Default: for CNNs every conv and linear op and every activation function; for
    transformers the block outputs and MLP hidden layers. ``layers`` may name op labels
    (``conv2d_3``), module paths (``features.10``), module types (``Conv2d``) or op names
    (``relu``), globs allowed. Ops whose units lurker cannot locate (see
    :func:`~lurker.probe.layout.infer_layouts`) are left out and appended to ``skipped`` as
    ``(name, reason)``; a layer named exactly (no glob, not a type or op name) that cannot
    be probed raises :class:`LurkerError` with the reason. ``unit_dim`` names the unit
    axis: an int for every selected layer, or ``{pattern: axis}``.
    """
    candidates = [
        op for op in trace.ops if op.kind == "op" and op.shape is not None and len(op.shape) >= 2
    ]
    types = {op.index: [t] for op in candidates if (t := _module_type(op, trace))}
    if layouts is None:
        layouts = infer_layouts(trace, unit_dim=unit_dim, names=types)
    exact: set[int] = set()
    if layers is None:
        chosen = _default_ops(trace, candidates)
    else:
        pats = [layers] if isinstance(layers, str) else list(layers)
        chosen = []
        unmatched = set(pats)
        for op in candidates:
            names = op_names(op, types)
            hit = [p for p in pats if any(fnmatch.fnmatchcase(n, p) for n in names)]
            if hit:
                chosen.append(op)
                unmatched.difference_update(hit)
                specific = [op.label, op.rolled, *op.module_outputs]
                if any(not _has_glob(p) and p in specific for p in hit):
                    exact.add(op.index)
        if unmatched:
            valid = sorted({_layer_name(op) for op in candidates})
            shown = ", ".join(valid[:60]) + (" ..." if len(valid) > 60 else "")
            raise LurkerError(
                f"No layer matches {sorted(unmatched)}. Name op labels, module paths, module "
                f"types or op names (globs allowed). Layers with channels here: {shown}"
            )
    if isinstance(unit_dim, Mapping):
        keys = [n for op in chosen for n in op_names(op, types)]
        unused = [p for p in unit_dim if not any(fnmatch.fnmatchcase(n, p) for n in keys)]
        if unused:
            shown = ", ".join(sorted({_layer_name(op) for op in chosen})[:40])
            raise LurkerError(
                f"unit_dim names {unused}, which match none of the layers to probe ({shown}). "
                "Use their names (globs allowed), or select the layer with layers=."
            )
    out: list[Layer] = []
    seen: set[int] = set()
    for op in chosen:
        if op.index in seen:
            continue
        seen.add(op.index)
        lay = layouts.get(op.index)
        if isinstance(lay, Layout):
            out.append(Layer(op, _layer_name(op), lay))
            continue
        if layers is None and not (isinstance(lay, Skip) and lay.per_sample):
            continue  # weights or position tables computed in forward: not activations
        reason = lay.reason if isinstance(lay, Skip) else "it is not a per-sample activation"
        if op.index in exact:
            raise LurkerError(
                f"Layer {_layer_name(op)!r} ({op.label}, output {list(op.shape or ())}) cannot "
                f"be probed: {reason}. If you know which axis holds its units, pass "
                f"unit_dim={{{_layer_name(op)!r}: AXIS}} (CLI: --unit-dim "
                f"{_layer_name(op)}=AXIS), counting the batch axis."
            )
        if skipped is not None:
            skipped.append((_layer_name(op), reason))
    if not out:
        why = "; ".join(f"{n}: {r}" for n, r in (skipped or [])[:5])
        raise LurkerError(
            "No layer with a unit (channel) axis was found to probe"
            + (f" ({why})" if why else "")
            + "; name layers explicitly, with unit_dim= where lurker cannot tell the axis."
        )
    return out


def settled_trace(model: nn.Module, x: Tensor) -> Trace:
    """Trace ``model`` on ``x`` as it will run on every later batch.

    Some models change their own state in their first forward (timm's LeViT and
    EfficientFormer cache attention biases), so later forwards run fewer ops than the
    first: the probe replays the model on many batches, so it traces it again once the
    state has settled.
    """
    tr = trace(model, x)
    if tr.state_changes:
        tr = trace(model, x)
    return tr


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
    at_least = {"k": 1, "batch_size": 1, "num_workers": 0, "hist_bins": 2}
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
    unit_dim: int | Mapping[str, int] | None = None,
) -> Run:
    """Sweep ``dataset`` once through ``model`` and store per-unit statistics in ``out``.

    ``dataset`` is any torch Dataset of (image, label), or one from
    :mod:`lurker.probe.data`. State is checkpointed every ``checkpoint_seconds`` (and
    every ``checkpoint_every`` batches, if given); rerunning the same call after an
    interruption resumes it. Under ``torchrun`` every rank sweeps its shard and rank 0
    writes the merged run. Arguments are checked before anything is created; while the
    probe runs, its process holds ``out`` (a second probe into it fails at once).

    Each layer's batch, unit and position axes are found from the trace (see
    :mod:`lurker.probe.layout`); layers whose units cannot be located are skipped, printed
    and listed in the run's meta (``skipped_layers``). ``unit_dim`` names the unit axis
    (counting the batch axis) for every layer, or per layer as ``{pattern: axis}``.
    """
    from ..graph.receptive import receptive_fields
    from . import data as pdata

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
        tr = settled_trace(model, x0)
    try:
        rfs = receptive_fields(tr)
    except LurkerError:
        rfs = {}
    layer_skips: list[tuple[str, str]] = []
    types = {op.index: [t] for op in tr.ops if (t := _module_type(op, tr))}
    layouts = infer_layouts(tr, (x0,), unit_dim=unit_dim, names=types, rfs=rfs)
    selected = select_layers(tr, layers, unit_dim=unit_dim, skipped=layer_skips, layouts=layouts)
    if layer_skips and progress and rank == 0:
        print(f"lurker: skipping {len(layer_skips)} layer(s) whose units it cannot locate:")
        for name, reason in layer_skips:
            print(f"  {name}: {reason}")
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
        if any(s.get("format") == 1 for s in state.get("stats", {}).values()):
            raise LurkerError(
                f"{ckpt} was written by an older lurker, whose histograms used a range fixed by "
                "the first batch and clamped the values outside it; it cannot be resumed with "
                "order-independent histograms. Delete it to sweep again from the start, or "
                "finish the sweep with the lurker version that started it."
            )
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
    widths = {layer.op.index: layer.width for layer in selected}
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

                def update(op: Any, value: Any, labels=labels, ids=ids, host=host) -> None:
                    t = value[0] if isinstance(value, tuple) else value
                    stats[op.index].update(by_index[op.index].units(t), ids, labels, host=host)

                tr.run(images, save="none", hooks=dict.fromkeys(by_index, update))
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
        # one gather: every rank's unreadable files, and its share of the run's figures
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, (skipped, seen, sweep_s))
        skipped = _merge_skipped(*(g[0] for g in gathered))
        seen = sum(g[1] for g in gathered)
        sweep_s = max(g[2] for g in gathered)
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
        if rf is not None and not rf_matches(layer.layout, rf):
            rf = None  # its y/x are not this layer's position axes
        results.append(
            LayerResult(
                name=layer.name,
                module=layer.op.module_outputs[0] if layer.op.module_outputs else layer.op.module,
                op=layer.op.label,
                op_index=layer.op.index,
                kind=_module_type(layer.op, tr) or layer.op.name,
                shape=tuple(n for d, n in enumerate(layer.op.shape) if d != layer.layout.batch),
                rf=rf.to_dict() if rf is not None else None,
                layout=layer.layout.to_dict(),
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
        writer.set_graph(tr.to_json())  # the layers' op_index and op label index into it
        writer.meta_set(
            "skipped_layers", [{"layer": name, "reason": why} for name, why in layer_skips]
        )
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
