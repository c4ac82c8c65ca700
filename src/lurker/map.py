"""The dataset map: every sample placed in 2-D by its features at one layer.

:func:`reduce` turns features into 2-D positions (t-SNE, UMAP or PCA, seeded, so the same
features give the same map); :func:`make_map` does it for a run's stored features
(``probe(..., embed=True)``), collecting them first with the run's recorded model and
dataset when the run has none, and stores the map in the run (``run.map()``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .errors import LurkerError, warn

__all__ = ["METHODS", "Reduced", "collect_embedding", "holds_layer", "make_map", "reduce"]

Method = Literal["tsne", "umap", "pca"]
METHODS: tuple[str, ...] = ("tsne", "umap", "pca")
#: t-SNE first reduces the features to this many dimensions with PCA (as its authors do).
TSNE_PCA_DIMS = 50


@dataclass(frozen=True)
class Reduced:
    """2-D positions ``xy`` (n, 2) and how they were made."""

    xy: np.ndarray
    method: str  # "tsne", "umap" or "pca"
    engine: str  # the library that made them (openTSNE, scikit-learn, umap-learn, numpy)
    seconds: float


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def pca(x: np.ndarray, dims: int = 2) -> np.ndarray:
    """Projection on the ``dims`` first principal axes (float64 SVD of the centred data),
    each axis' sign fixed so that its largest loading is positive: deterministic."""
    c = x.astype(np.float64) - x.astype(np.float64).mean(0)
    if len(c) > 4 * c.shape[1]:  # many samples: eigenvectors of the covariance (d x d)
        w, v = np.linalg.eigh(c.T @ c)
        axes = v[:, np.argsort(w)[::-1][:dims]].T
    else:
        axes = np.linalg.svd(c, full_matrices=False)[2][:dims]
    flip = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(1)])
    return c @ (axes * flip[:, None]).T


def reduce(features: Any, method: str = "tsne", *, seed: int = 0) -> Reduced:
    """``features`` (n, dim) placed in 2-D with ``method`` (see :data:`METHODS`).

    t-SNE runs openTSNE (FFT-accelerated gradients) when it is installed, else
    scikit-learn's Barnes-Hut, after a PCA to 50 dimensions; UMAP needs umap-learn
    (``pip install lurker[map]``). The same features and seed give the same positions.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise LurkerError(f"reduce: features must be (samples, dims) with samples, got {x.shape}")
    if method not in METHODS:
        raise LurkerError(f"map method must be one of {', '.join(METHODS)}, got {method!r}")
    if not np.isfinite(x).all():
        raise LurkerError(
            "reduce: the features hold NaN or infinite values (the layer overflowed float16, "
            "or the model produced them); embed another layer"
        )
    n = len(x)
    if n < 2:
        raise LurkerError(f"reduce: a map places samples apart, and there is {n}: it needs 2")
    if not (x != x[0]).any():  # (t-SNE would divide by zero distances, and crash)
        raise LurkerError(
            f"reduce: every sample has the same features at this layer ({x.shape[1]} values, "
            f"all as in the first: {_some(x[0])}), so a map cannot tell them apart (a layer "
            "that never fires?); embed another layer"
        )
    t0 = time.perf_counter()
    if method == "pca" or n < 4:
        out = pca(x) if x.shape[1] >= 2 else np.c_[x[:, :1], np.zeros(n)]
        return Reduced(out.astype(np.float32), "pca", "numpy", time.perf_counter() - t0)
    if method == "umap":
        umap = umap_module()
        xy = umap.UMAP(n_components=2, random_state=seed, n_jobs=1).fit_transform(x)
        return Reduced(np.asarray(xy, np.float32), "umap", "umap-learn", time.perf_counter() - t0)
    if x.shape[1] > TSNE_PCA_DIMS:
        x = pca(x, TSNE_PCA_DIMS).astype(np.float32)
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3.0)))
    # a PCA start needs 2 feature dimensions; one feature starts from random positions
    init = "pca" if x.shape[1] >= 2 else "random"
    try:
        import openTSNE
    except ImportError:
        openTSNE = None
    if openTSNE is not None:
        emb = openTSNE.TSNE(
            n_components=2,
            perplexity=perplexity,
            initialization=init,
            negative_gradient_method="fft",
            neighbors="annoy" if n > 1000 else "exact",
            n_jobs=_threads(),
            random_state=seed,
            verbose=False,
        ).fit(x)
        xy, engine = np.asarray(emb), "openTSNE"
    else:
        from sklearn.manifold import TSNE

        xy = TSNE(
            n_components=2,
            perplexity=perplexity,
            init=init,
            random_state=seed,
            n_jobs=_threads(),
        ).fit_transform(x)
        engine = "scikit-learn"
    return Reduced(np.asarray(xy, np.float32), "tsne", engine, time.perf_counter() - t0)


def umap_module() -> Any:
    """umap-learn's module, or the error saying how to install it."""
    try:
        import umap  # type: ignore[import-not-found]
    except ImportError:
        raise LurkerError(
            "map method 'umap' needs umap-learn: pip install 'lurker[map]' (or umap-learn), "
            "or use --method tsne"
        ) from None
    return umap


def _some(v: np.ndarray) -> str:
    shown = ", ".join(f"{float(a):.4g}" for a in v[:4])
    return f"[{shown}{', ...' if len(v) > 4 else ''}]"


def collect_embedding(
    model: Any,
    dataset: Any,
    embed: bool | str = True,
    *,
    batch_size: int = 256,
    device: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Every sample's features at ``embed`` (as ``probe(..., embed=)`` keeps them) and the
    model's predictions, in one pass without probing: ``((ids, features, pred, conf),
    settings)``. Sample ids are dataset indices, as the probe numbers them."""
    from .probe import data as pdata

    ds = pdata.wrap(dataset)
    found = _resolve(model, ds, embed, device, said=("embed", "embed"))
    return _collect(model, ds, found, None, batch_size, device)


def _resolve(
    model: Any,
    ds: Any,
    embed: bool | str,
    device: str | None,
    said: tuple[str, str] = ("layer", "--layer"),
) -> tuple[Any, Any]:
    """The model's trace and the layer ``embed`` names in it (its canonical name: every
    alias of one op, module path or op label, resolves to the same layer); ``said``: how
    the caller's user named ``embed`` (in Python, on the command line)."""
    import torch

    from .capture import settled_trace
    from .models import default_device
    from .probe.sweep import embed_layer_of

    if len(ds) == 0:
        raise LurkerError("the dataset is empty: nothing to embed")
    dev = torch.device(device or default_device())
    model = model.eval().to(dev)
    x0 = ds.first_image().unsqueeze(0).to(dev)
    with torch.no_grad():
        tr = settled_trace(model, x0)
    return tr, embed_layer_of(tr, embed, arg=said[0], cli_arg=said[1])


def _collect(
    model: Any,
    ds: Any,
    found: tuple[Any, Any],
    indices: list[int] | None,
    batch_size: int,
    device: str | None,
) -> tuple[Any, dict[str, Any]]:
    """:func:`collect_embedding` over the items ``indices`` of ``ds`` (None: all), at the
    layer :func:`_resolve` ``found``."""
    import torch

    from .models import default_device
    from .probe import data as pdata
    from .probe.consumers import Batch, EmbeddingConsumer
    from .probe.sweep import check_embed_budget

    tr, layer = found
    dev = torch.device(device or default_device())
    check_embed_budget(layer, len(ds) if indices is None else len(indices))
    consumer = EmbeddingConsumer(layer, probed=False)
    items = ds if indices is None else torch.utils.data.Subset(ds, indices)  # ids: ds indices
    loader = torch.utils.data.DataLoader(
        items, batch_size=batch_size, shuffle=False, collate_fn=pdata.collate
    )

    def feed(op: Any, value: Any) -> None:
        consumer.update(layer, value[0] if isinstance(value, tuple) else value, batch)

    with torch.no_grad():
        for images, labels, ids in loader:
            if not len(images):
                continue
            batch = Batch(images.to(dev), ids.to(dev), labels.to(dev), 1)
            acts = tr.run(batch.images, save="none", hooks={layer.op.index: feed})
            consumer.end(batch, acts.output)
    return consumer.arrays(), consumer.settings


def make_map(
    run: Any,
    *,
    layer: str | None = None,
    method: str = "tsne",
    seed: int = 0,
    model: Any = None,
    dataset: Any = None,
    device: str | None = None,
) -> Any:
    """Reduce the run's per-sample features to 2-D and store the map in the run.

    ``run`` is a :class:`~lurker.store.Run` or its path. Without stored features (or when
    ``layer`` names another layer than they are of) they are collected first, with
    ``model``/``dataset`` when given, else the model and dataset the run records (as
    ``lurker serve`` loads them), and stored too. Returns the run reopened, holding the map.
    """
    from .probe import data as pdata
    from .store import Run, RunWriter, run_lock

    path = run.path if isinstance(run, Run) else run
    if method not in METHODS:
        raise LurkerError(f"map method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "umap":
        umap_module()  # refused before a pass over the dataset that could take hours, not after
    with Run.open(path) as r:
        stored = r.embedding() if r.has_embedding else None
        config = dict(r.meta.get("config") or {})
        size = (r.meta.get("image_size") or [224])[0]
    held = None if stored is None else stored.meta.get("layer")  # the stored features' layer
    kept = stored
    if stored is not None and layer is not None and not holds_layer(path, layer):
        stored = None  # unless the model's trace says ``layer`` is another name of theirs
    with run_lock(path):
        writer = RunWriter.reopen(path)
        try:
            if stored is None:
                model, dataset = _model_and_data(config, int(size), model, dataset, device, held)
                _check_model(model, path)
                ds = pdata.wrap(dataset)
                found = _resolve(model, ds, layer or True, device)
                if kept is not None and found[1].op.label == kept.meta.get("op"):
                    stored = kept  # another name of the layer held: no second sweep
            if stored is None:
                indices, run_ids = _align(path, ds)
                (at, feats, pred, conf), settings = _collect(model, ds, found, indices, 256, device)
                ids = run_ids[at.numpy()]  # the dataset's indices as the run's sample ids
                order = np.argsort(ids, kind="stable")
                ids, feats, pred, conf = (
                    ids[order], feats.numpy()[order], pred.numpy()[order], conf.numpy()[order]
                )  # fmt: skip
                writer.write_embedding(ids, feats, pred, conf, settings)
            else:
                ids, feats, pred, conf = stored.ids, stored.features, stored.pred, stored.conf
                settings = stored.meta
            if len(ids) == 0:
                raise LurkerError("no sample could be embedded (every image was unreadable)")
            if over := settings.get("overflow"):  # said with its numbers, not reduce's guess
                raise LurkerError(
                    f"the features of layer {settings.get('layer')!r} hold "
                    f"{over.get('values', 0):,} values beyond float16's range (65,504; the "
                    f"largest magnitude is {over.get('max_abs', 0):.4g}), stored as inf: "
                    "embed another layer (--layer), or scale the model's values down"
                )
            done = reduce(feats, method, seed=seed)
            writer.write_map(
                ids,
                done.xy,
                pred,
                conf,
                {
                    "layer": settings.get("layer"),
                    "method": done.method,
                    "engine": done.engine,
                    "seed": seed,
                    "seconds": round(done.seconds, 3),
                },
            )
        finally:
            writer.close()
    return Run.open(path)


def holds_layer(run: Any, layer: str) -> bool:
    """Whether the per-sample features ``run`` holds are of ``layer``, as the run alone can
    tell: ``layer`` is their layer's name or op label, or names (in the run's layer table,
    by name, op label or module path) a layer of that op. Another alias (an enclosing
    module's path, say) needs the model's trace to resolve, which :func:`make_map` does
    before it would sweep the dataset again."""
    from .store import Run, StoreError

    with Run.open(run.path if isinstance(run, Run) else run) as r:
        emb = (r.meta.get("embedding") or {}) if r.has_embedding else {}
        if not emb:
            return False
        if layer in (emb.get("layer"), emb.get("op")):
            return True
        try:
            info = r.layer(layer)
        except StoreError:
            return False
    return info.name == emb.get("layer") or (info.op is not None and info.op == emb.get("op"))


def _align(path: Any, ds: Any) -> tuple[list[int], np.ndarray]:
    """Which items of ``ds`` are the run's samples: their indices in ``ds``, and an array
    giving the run's sample id of each ``ds`` index (-1: not in the run).

    Datasets of files (image folders) match by file path relative to their folder, so a
    folder that was moved, or whose unreadable files were since fixed or removed (which
    shifts the indices), still lines up; the run's samples the folder no longer has get
    no features (reported by ``lurker map``). While the run's folder still exists, only
    that folder is accepted: a second folder of the same layout (``val/`` beside
    ``train/``) would match every relative path and give other images' features. Other
    datasets must have the description the run records, or (the same kind and length,
    the recorded place gone) be taken as moved, with a warning. Raise when the dataset is
    evidently not the run's.
    """
    from .probe import data as pdata
    from .store import Run

    with Run.open(path) as r:
        recorded = str(r.meta.get("dataset") or "")
        samples = r.samples(range(r.num_samples))
    run_ids = np.full(len(ds), -1, dtype=np.int64)
    run_paths = [s.path for s in samples]
    if ds.paths is not None and samples and all(run_paths):
        here = str(ds.root) if isinstance(ds, pdata.ImageFolderDataset) else _place(ds.description)
        there = _place(recorded)
        if not there or not os.path.isabs(there):
            warn(
                f"the run records its dataset as {recorded!r}, not an absolute path, so "
                f"lurker cannot tell whether {here} is that folder: matched by file paths "
                "within it (probe again to record the folder's absolute path)"
            )
        elif os.path.isdir(there) and not _same_dir(there, here):
            raise LurkerError(
                f"the dataset {here} is not the one the run was probed with: that is "
                f"{there}, which still exists; give it (--data {there}), or move it away if "
                "the images now live elsewhere"
            )
        mine = {_rel(p, here): i for i, p in enumerate(ds.paths)}
        found = [(mine.get(_rel(p, there)), s.id) for p, s in zip(run_paths, samples)]
        hits = [(i, sid) for i, sid in found if i is not None]
        if 2 * len(hits) <= len(samples):  # half or fewer: another folder
            lost = [p for (i, _), p in zip(found, run_paths) if i is None]
            raise LurkerError(
                f"the dataset {here} is not the one the run was probed with ({recorded}): "
                f"only {len(hits)} of the run's {len(samples)} images are in it (missing e.g. "
                f"{', '.join(lost[:3])}); give the run's dataset (--data)"
            )
        for i, sid in hits:
            run_ids[i] = sid
        return sorted(i for i, _ in hits), run_ids
    if ds.description != recorded or len(ds) != len(samples):
        # the same data read from elsewhere: same kind and length, and the recorded place
        # (an absolute path in the description, "CIFAR10(/data/cifar)") no longer exists
        there = _place(recorded)
        moved = (
            _kind(ds.description) == _kind(recorded)
            and len(ds) == len(samples)
            and os.path.isabs(there)
            and not os.path.exists(there)
        )
        if not moved:
            raise LurkerError(
                f"the dataset is {ds.description} with {len(ds)} samples, the run was probed "
                f"with {recorded or 'an unrecorded dataset'} with {len(samples)}: give the "
                "dataset the run was probed with (--data)"
            )
        warn(
            f"the dataset is {ds.description}, the run was probed with {recorded}, which no "
            "longer exists: taken as the same data moved (same kind, same length); the map "
            "is wrong if it is not"
        )
    run_ids[[s.id for s in samples]] = [s.id for s in samples]
    return [s.id for s in samples], run_ids


def _kind(description: str) -> str:
    """A dataset description without the place it was read from."""
    return description.split("(", 1)[0].strip()


def _place(description: str) -> str:
    """Where a dataset was read from, as its description names it: a folder's path
    itself, or what a wrapped dataset's description holds in parentheses
    (``ImageFolder(/data/train)``)."""
    if os.path.isabs(description) or not description.endswith(")") or "(" not in description:
        return description
    return description[description.index("(") + 1 : -1]


def _same_dir(a: str, b: str) -> bool:
    """Whether two paths name one folder (through links and mounts too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _rel(p: str, root: str) -> str:
    """``p`` relative to ``root`` when under it (the key that survives a moved folder)."""
    root = root.rstrip(os.sep)
    return p[len(root) + 1 :] if root and p.startswith(root + os.sep) else p


def _model_and_data(
    config: dict[str, Any],
    size: int,
    model: Any,
    dataset: Any,
    device: str | None,
    held: str | None = None,
) -> tuple[Any, Any]:
    """The model and dataset given, else the ones the run records (``held``: the layer of
    the features the run holds, when they are not the ones asked for)."""
    why = (
        f"the run holds per-sample features of {held!r} only: another layer's are collected "
        "with the model and dataset, and"
        if held
        else "the run holds no per-sample features and"
    )
    if model is None:
        spec = config.get("model_spec")
        if not spec:
            raise LurkerError(
                f"{why} it does not record its model (it was probed from Python): pass model= "
                "and dataset=" + ("" if held else ", or probe it with embed=True"),
                cli=f"{why} it does not record its model (it was probed from Python): pass "
                "--model SPEC [--weights W] --data D",
            )
        from .models import load_model

        weights = config.get("weights")
        if weights and not os.path.isfile(weights):
            raise LurkerError(
                f"the run's recorded weights {weights} do not exist here: pass --weights"
            )
        model = load_model(spec, weights, device=device or "cpu")
    if dataset is None:
        spec = config.get("data")
        if not spec:
            raise LurkerError(
                f"{why} it does not record its dataset: pass dataset="
                + ("" if held else ", or probe it with embed=True"),
                cli=f"{why} it does not record its dataset: pass --data D",
            )
        from .probe import data as pdata

        dataset = pdata.load_run_dataset(config, size, spec)
    from .models import channels_first_view

    # fed as the probe fed it: a channels-last model gets its (N, H, W, C) batches
    return channels_first_view(model, config.get("channel_dim")), dataset


def _check_model(model: Any, path: Any) -> None:
    """Refuse a model other than the run's: its features and predictions would be stored
    as the run's (the Map page's misclassified samples would be another model's)."""
    from lurker.probe.sweep import fingerprint
    from lurker.store import Run

    with Run.open(path) as r:
        want = r.meta.get("model_fingerprint")
    if want and fingerprint(model) != want:
        raise LurkerError(
            f"this model is not the one run {path} was probed with (its weights or "
            "architecture differ): give the run's model and weights (--model, --weights), or "
            "probe this model into a new run"
        )
