"""Writing a run: :class:`RunWriter` and the :class:`LayerResult` it stores.

Every write is one SQLite transaction, and the database file itself is created under a
temporary name and renamed into place, so a crash at any moment leaves either no run or
a consistent one (``status='running'`` until :meth:`RunWriter.write_layers_result`
commits). Readers (:class:`lurker.store.Run`) only ever see committed data.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from lurker.errors import LurkerError
from lurker.store.errors import NotARunError, RunExistsError
from lurker.store.featviz import write_addition
from lurker.store.files import TMP_PREFIX, cache_file, fsync_dir
from lurker.store.schema import (
    CACHE_DIR,
    CHECKPOINT_NAME,
    CLASS_MEAN_DTYPE,
    DB_NAME,
    DDL,
    EDGES_DTYPE,
    EMBEDDING_DDL,
    HIST_DTYPE,
    LOCK_NAME,
    MAP_DDL,
    PAGE_SIZE,
    RELEVANCE_DDL,
    SCHEMA_VERSION,
    STATUS_COMPLETE,
    STATUS_RUNNING,
    TOP_DTYPE,
    dump_json,
    has_column,
    has_layout_column,
    rf_record,
    to_blob,
)

#: A numpy array, a torch tensor (any device) or anything ``np.asarray`` accepts.
ArrayLike = Any

#: Meta keys that must match for a resume: a run of another model, dataset, k or image
#: size cannot be continued without mixing two experiments.
RESUME_KEYS = ("model_fingerprint", "k", "image_size", "dataset")

_OWNED_KEYS = ("schema_version", "status")
_SET_STATUS = "UPDATE meta SET value = ? WHERE key = 'status'"


@dataclass(kw_only=True)
class LayerResult:
    """Final statistics of one layer, as the probe computed them (C units, top-k lists).

    Top-list slots whose sample id is ``-1`` (the dataset had fewer than k samples) are
    stored as empty (readers leave them out). ``mean_y``/``mean_x`` are where the unit
    peaked on each mean-list sample; ``None`` stores -1 (unknown: readers then find the
    peak with the model). ``shape`` is the layer's output shape
    without the batch axis; ``rf`` its receptive field (an ``RF`` or its dict, stored as
    the versioned record of ``receptive.schema.json``) or ``None``; ``layout`` which axes
    of the full output hold the batch, the units and the positions (``None``:
    ``(N, C, ...)``). ``op_index`` is the position in the run's graph of the op the layer
    probes (whose label is ``op``); a run with a graph needs it for every layer.
    """

    name: str
    module: str | None
    op: str | None
    kind: str | None
    shape: tuple[int, ...]
    mean_values: ArrayLike  # (C, k) spatial-mean activation of each top sample
    mean_ids: ArrayLike  # (C, k) sample ids, -1 = empty slot
    max_values: ArrayLike  # (C, k) spatial-max activation of each top sample
    max_ids: ArrayLike  # (C, k)
    max_y: ArrayLike  # (C, k) row of the peak in the layer's output grid
    max_x: ArrayLike  # (C, k) column of the peak
    unit_mean: ArrayLike  # (C,) mean activation over the dataset
    unit_max: ArrayLike  # (C,) max activation over the dataset
    class_mean: ArrayLike  # (C, num_classes) mean activation per class
    hist: ArrayLike  # (C, bins) histogram counts
    hist_edges: ArrayLike  # (bins + 1,) shared bin edges
    rf: Any = None  # an RF, its dict (see receptive.schema.json), or None
    mean_y: ArrayLike | None = None  # (C, k) row of each mean-list sample's peak; None: -1
    mean_x: ArrayLike | None = None  # (C, k) column of that peak
    layout: dict[str, Any] | None = None  # batch/unit/position axes (probe.layout.Layout)
    op_index: int | None = None  # the probed op's index in the run's graph
    #: why ``rf`` is None, where it is not an image grid's: the op that broke the chain
    rf_reason: str | None = None


@dataclass
class _Arrays:
    """A validated :class:`LayerResult` as contiguous numpy arrays."""

    result: LayerResult
    shape_json: str
    rf_json: str | None
    layout_json: str | None
    mean_values: np.ndarray
    mean_ids: np.ndarray
    max_values: np.ndarray
    max_ids: np.ndarray
    max_y: np.ndarray
    max_x: np.ndarray
    mean_y: np.ndarray
    mean_x: np.ndarray
    unit_mean: np.ndarray
    unit_max: np.ndarray
    class_mean: np.ndarray
    hist: np.ndarray
    hist_edges: np.ndarray


def _np(value: ArrayLike) -> np.ndarray:
    """Accept torch tensors without importing torch (the reader side must not need it)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _prepare(result: LayerResult, num_classes: int | None) -> _Arrays:
    """Convert and shape-check one layer before any database write begins."""
    name = result.name

    def fail(msg: str) -> LurkerError:
        return LurkerError(f"layer {name!r}: {msg}")

    unit_mean = _np(result.unit_mean).astype(np.float64).reshape(-1)
    c = unit_mean.shape[0]
    fields = ("mean_values", "mean_ids", "max_values", "max_ids", "max_y", "max_x")
    grids = {f: _np(getattr(result, f)) for f in fields}
    k = grids["max_ids"].shape[-1] if grids["max_ids"].ndim == 2 else -1
    if (result.mean_y is None) != (result.mean_x is None):
        raise fail("mean_y and mean_x come together (or neither: peaks unknown)")
    for f in ("mean_y", "mean_x"):
        given = getattr(result, f)
        grids[f] = np.full((c, max(k, 0)), -1) if given is None else _np(given)
    for f, arr in grids.items():
        if arr.shape != (c, k):
            raise fail(f"{f} has shape {arr.shape}, expected ({c}, k) like max_ids")
    unit_max = _np(result.unit_max).astype(np.float64).reshape(-1)
    if unit_max.shape != (c,):
        raise fail(f"unit_max has shape {unit_max.shape}, expected ({c},)")
    class_mean = _np(result.class_mean).astype(CLASS_MEAN_DTYPE)
    if class_mean.ndim != 2 or class_mean.shape[0] != c:
        raise fail(f"class_mean has shape {class_mean.shape}, expected ({c}, num_classes)")
    if num_classes and class_mean.shape[1] != num_classes:
        raise fail(
            f"class_mean has {class_mean.shape[1]} columns but the run has {num_classes} classes"
        )
    hist = _np(result.hist).astype(HIST_DTYPE)
    edges = _np(result.hist_edges).astype(EDGES_DTYPE).reshape(-1)
    if hist.ndim != 2 or hist.shape[0] != c or edges.shape != (hist.shape[1] + 1,):
        raise fail(f"hist {hist.shape} and hist_edges {edges.shape} must be ({c}, bins), (bins+1,)")
    if result.op_index is not None and (
        not isinstance(result.op_index, (int, np.integer)) or result.op_index < 0
    ):
        raise fail(f"op_index must be an op's index (an int >= 0), got {result.op_index!r}")
    try:
        rf = None if result.rf is None else rf_record(result.rf)
    except LurkerError as exc:
        raise fail(str(exc)) from exc
    try:
        shape_json = dump_json([int(s) for s in result.shape])
        rf_json = None if rf is None else dump_json(rf)
        layout_json = None if result.layout is None else dump_json(result.layout)
    except (TypeError, ValueError) as exc:
        raise fail(f"shape, rf and layout must be JSON-serializable without NaN ({exc})") from exc
    return _Arrays(
        result=result,
        shape_json=shape_json,
        rf_json=rf_json,
        layout_json=layout_json,
        mean_values=grids["mean_values"].astype(np.float64),
        mean_ids=grids["mean_ids"].astype(np.int64),
        max_values=grids["max_values"].astype(np.float64),
        max_ids=grids["max_ids"].astype(np.int64),
        max_y=grids["max_y"].astype(np.int64),
        max_x=grids["max_x"].astype(np.int64),
        mean_y=grids["mean_y"].astype(np.int64),
        mean_x=grids["mean_x"].astype(np.int64),
        unit_mean=unit_mean,
        unit_max=unit_max,
        class_mean=np.ascontiguousarray(class_mean),
        hist=np.ascontiguousarray(hist),
        hist_edges=edges,
    )


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _lurker_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lurker")
    except PackageNotFoundError:
        return "unknown"


def connect_rw(db: Path) -> sqlite3.Connection:
    """Writer connection: autocommit mode, so transactions are exactly our BEGIN/COMMIT."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def read_stored(db: Path) -> tuple[int, dict[str, Any]]:
    """``(user_version, meta)`` of an existing ``run.db``; :class:`NotARunError` if unreadable."""
    try:
        conn = sqlite3.connect(db, timeout=30.0)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            rows = conn.execute("SELECT key, value FROM meta").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise NotARunError(f"{db} is not a readable lurker run database ({exc})") from exc
    return int(version), {key: json.loads(value) for key, value in rows}


class RunWriter:
    """Creates or resumes a run directory and writes the probe's results into it.

    Use :meth:`create`; the probe then calls :meth:`set_classes`, :meth:`add_samples`,
    :meth:`add_skipped` as it goes and :meth:`write_layers_result` once at the end.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, *, resumed: bool) -> None:
        self.path = path
        self.resumed = resumed
        self._conn = conn
        self._batch: sqlite3.Cursor | None = None
        self._after_commit: list[Any] = []  # file clean-ups that wait for the commit

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], *, meta: dict[str, Any], overwrite: bool = False
    ) -> RunWriter:
        """Start a run at ``path``, or resume the one there if it is of the same model.

        ``meta`` must hold ``model`` and ``model_fingerprint``; ``dataset``, ``k``,
        ``image_size`` and ``config`` are recommended (see docs/run-store.md). If
        ``path`` holds a run of another model (or dataset, k, image size), raise
        :class:`RunExistsError` unless ``overwrite``, which deletes that run first, or the
        run never saved a batch (no checkpoint, no results: a probe that failed early),
        which is replaced since nothing would be lost. On resume the stored meta is kept
        (``resumed`` is True); update it with :meth:`meta_set`.
        """
        for key in ("model", "model_fingerprint"):
            if key not in meta:
                raise ValueError(f"RunWriter.create: meta needs {key!r}")
        for key in _OWNED_KEYS:
            if key in meta:
                raise ValueError(f"RunWriter.create: meta {key!r} is set by the store itself")
        root = Path(path)
        db = root / DB_NAME
        if root.exists() and not root.is_dir():
            raise RunExistsError(
                f"{root} is a file, not a run directory; choose another out directory",
                cli=f"{root} is a file, not a run directory; choose another --out",
            )
        if db.exists():
            if overwrite:
                _remove_run(root)
            else:
                try:
                    cls._check_resumable(root, db, meta)
                except RunExistsError:
                    if not _never_swept(root, db):
                        raise
                    _remove_run(root)  # nothing to lose: no checkpoint, no results
                else:
                    _remove_stale_tmp(root)
                    return cls(root, connect_rw(db), resumed=True)
        elif root.exists():
            _remove_stale_tmp(root)
            if any(p.name != LOCK_NAME for p in root.iterdir()):
                why = (
                    f"{root} is not empty and holds no lurker run (no {DB_NAME}); choose "
                    "another {} (lurker never deletes files it did not write)"
                )
                raise RunExistsError(why.format("out directory"), cli=why.format("--out"))
        root.mkdir(parents=True, exist_ok=True)
        full = {
            "lurker_version": _lurker_version(),
            "created": _now(),
            "dataset": None,
            "k": None,
            "image_size": None,
            "config": {},
            **meta,
            "schema_version": SCHEMA_VERSION,
            "status": STATUS_RUNNING,
        }
        _init_db(db, full)
        return cls(root, connect_rw(db), resumed=False)

    @classmethod
    def reopen(cls, path: str | os.PathLike[str]) -> RunWriter:
        """A writer on an existing complete run, for additive tables written after the
        probe (``lurker map``): nothing else is changed. Hold :func:`run_lock` around it."""
        from .run import Run

        Run.open(path).close()  # a complete, readable run, or the reader's clear error
        return cls(Path(path), connect_rw(Path(path) / DB_NAME), resumed=True)

    @staticmethod
    def _check_resumable(root: Path, db: Path, meta: dict[str, Any]) -> None:
        """Raise :class:`RunExistsError` unless the run at ``db`` may be continued."""

        def refuse(why: str) -> RunExistsError:
            return RunExistsError(
                f"{why} Pass overwrite=True to replace it, or choose another out directory.",
                cli=f"{why} Pass --overwrite to replace it, or choose another --out directory.",
            )

        try:
            version, stored = read_stored(db)
        except NotARunError as exc:
            raise refuse(f"{root} holds an unreadable run ({exc}).") from exc
        if version != SCHEMA_VERSION:
            raise refuse(
                f"{root} holds a run of schema version {version}; this lurker writes version "
                f"{SCHEMA_VERSION} and cannot resume it."
            )
        old_fp, new_fp = stored.get("model_fingerprint"), meta["model_fingerprint"]
        if old_fp != new_fp:
            raise refuse(
                f"{root} already holds a run of model {stored.get('model')!r} (fingerprint "
                f"{old_fp}), not of model {meta['model']!r} (fingerprint {new_fp})."
            )
        for key in RESUME_KEYS[1:]:
            if key in meta and key in stored and stored[key] != meta[key]:
                raise refuse(
                    f"{root} holds a run of the same model but with {key}={stored[key]!r}, "
                    f"not {meta[key]!r}; resuming would mix the two."
                )

    # -- metadata --------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        """Where the probe keeps its resumable state (write it with ``atomic_write_bytes``).

        :meth:`write_layers_result` deletes it once the results are committed.
        """
        return self.path / CHECKPOINT_NAME

    @property
    def status(self) -> str:
        """``'running'`` or ``'complete'``."""
        return str(self.meta_get("status"))

    def meta_get(self, key: str, default: Any = None) -> Any:
        """One meta value (decoded from JSON), or ``default``."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def meta_set(self, key: str, value: Any) -> None:
        """Store a small JSON-serializable value under ``key`` (committed at once)."""
        if key in _OWNED_KEYS:
            raise ValueError(f"meta {key!r} is managed by the store")
        with self._tx(demote=False) as cur:
            cur.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, dump_json(value))
            )

    # -- incremental writes ------------------------------------------------------------

    def set_classes(self, names: Sequence[str]) -> None:
        """Replace the class list; class id = position in ``names`` (= the dataset label)."""
        with self._tx() as cur:
            cur.execute("DELETE FROM classes")
            cur.executemany(
                "INSERT INTO classes(id, name) VALUES (?, ?)", enumerate(map(str, names))
            )

    def add_samples(
        self,
        rows: Iterable[
            tuple[int, str | None, int | None] | tuple[int, str | None, int | None, int]
        ],
        *,
        replace: bool = False,
    ) -> None:
        """Record samples as ``(id, path, label)`` or ``(id, path, label, source_index)``.

        ``path`` is ``None`` for in-memory datasets, ``label`` ``None`` or negative when
        unlabeled; ``source_index`` (index in the underlying dataset) defaults to ``id``.
        Re-adding an id replaces it, so a resumed probe may re-send a batch. ``replace``
        drops every sample recorded before, in the same transaction (a probe's final write:
        a rerun over a smaller dataset must not leave the old one's samples in the run).
        """

        def norm(row: tuple[Any, ...]) -> tuple[int, str | None, int | None, int]:
            sid, path, label = int(row[0]), row[1], row[2]
            label = None if label is None or int(label) < 0 else int(label)
            src = int(row[3]) if len(row) > 3 else sid
            return sid, None if path is None else str(path), label, src

        with self._tx() as cur:
            if replace:
                cur.execute("DELETE FROM samples")
            cur.executemany(
                "INSERT OR REPLACE INTO samples(id, path, label, source_index) VALUES (?,?,?,?)",
                map(norm, rows),
            )

    def add_skipped(self, rows: Iterable[tuple[str, str]], *, replace: bool = False) -> None:
        """Record unreadable inputs as ``(path, reason)``; a path seen again is updated.
        ``replace`` drops those recorded before (a file repaired since is no longer listed)."""
        with self._tx() as cur:
            if replace:
                cur.execute("DELETE FROM skipped")
            cur.executemany(
                "INSERT INTO skipped(path, reason) VALUES (?, ?) "
                "ON CONFLICT(path) DO UPDATE SET reason = excluded.reason",
                ((str(p), str(r)) for p, r in rows),
            )

    def set_graph(self, doc: dict[str, Any] | str) -> None:
        """Store the traced graph's JSON document (``trace.to_json()``), replacing any.

        Kept as the document's text, as is: :meth:`lurker.store.Run.graph_json` gives it
        back and ``Run.graph`` rebuilds the graph, with no model and no torch. A ``str``
        must be that document already serialised.
        """
        if isinstance(doc, str):
            text = doc
            try:
                parsed = json.loads(text)
            except ValueError as exc:
                raise LurkerError(f"set_graph: the text is not a JSON document ({exc})") from exc
        else:
            parsed = doc
            try:
                text = json.dumps(doc, allow_nan=False, separators=(",", ":"))
            except (TypeError, ValueError) as exc:
                raise LurkerError(f"set_graph: the document is not strict JSON ({exc})") from exc
        if not isinstance(parsed, dict) or not isinstance(parsed.get("ops"), list):
            raise LurkerError("set_graph: expected a graph document (an object with 'ops')")
        with self._tx() as cur:
            cur.execute("INSERT OR REPLACE INTO graph(id, doc) VALUES (1, ?)", (text,))

    def _graph_labels(self) -> list[Any] | None:
        """The op labels of the stored graph, by index; ``None`` if it has none."""
        row = self._conn.execute("SELECT doc FROM graph WHERE id = 1").fetchone()
        if row is None:
            return None
        return [
            op.get("label") if isinstance(op, dict) else None for op in json.loads(row[0])["ops"]
        ]

    # -- final results ---------------------------------------------------------------

    def write_layers_result(self, layers: Sequence[LayerResult]) -> None:
        """Store all layers' statistics and mark the run complete, in one transaction.

        Replaces any results already stored (a resumed run is rewritten, never merged).
        Everything is validated before the transaction starts; if anything fails
        midway, the transaction rolls back and the run stays as it was. After the
        commit the checkpoint and the image cache (now possibly stale) are deleted.
        """
        names = [layer.name for layer in layers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise LurkerError(f"write_layers_result: duplicate layer names {dupes}")
        num_classes = self._conn.execute("SELECT count(*) FROM classes").fetchone()[0]
        prepared = [_prepare(layer, num_classes) for layer in layers]
        if not has_layout_column(self._conn):  # a run made without the column
            self._conn.execute("ALTER TABLE layers ADD COLUMN layout TEXT")
        if not has_column(self._conn, "rf_reason"):
            self._conn.execute("ALTER TABLE layers ADD COLUMN rf_reason TEXT")
        labels = self._graph_labels()
        for layer in layers if labels is not None else ():
            i = layer.op_index
            if i is None or not 0 <= i < len(labels) or labels[i] != layer.op:
                found = labels[i] if i is not None and 0 <= i < len(labels) else None
                raise LurkerError(
                    f"layer {layer.name!r}: op_index {i!r} names op {found!r} of the run's "
                    f"graph, not its op {layer.op!r}; give each layer the index of its op"
                )
        with self._tx() as cur:
            # what was derived from the results being replaced goes with them, table and
            # meta key: a run re-probed without it must not read as holding it (empty), and
            # featviz rows name layers by row ids that the new layers reuse
            for derived in ("relevance", "embedding", "map", "featviz", "featviz_writes"):
                cur.execute(f"DROP TABLE IF EXISTS {derived}")
            cur.execute(
                "DELETE FROM meta WHERE key IN ('relevance', 'embedding', 'map', 'additions')"
            )
            cur.execute("DELETE FROM units")
            cur.execute("DELETE FROM layers")
            for position, arrays in enumerate(prepared):
                self._insert_layer(cur, position, arrays)
            cur.execute(_SET_STATUS, (dump_json(STATUS_COMPLETE),))
            self._after_commit.append(self._drop_checkpoint_and_cache)

    def write_relevance(
        self, lists: Mapping[str, tuple[ArrayLike, ArrayLike]], settings: Mapping[str, Any]
    ) -> None:
        """Store each layer's relevance-max lists: ``{layer name: (values, sample_ids)}``,
        both ``(units, k)``, best first, sample id -1 in empty slots; ``settings`` (the
        composite, the target) go into the meta as ``relevance``.

        Written after :meth:`write_layers_result` (it names the stored layers), in the same
        :meth:`batch`: it keeps the run's status as that left it.
        """
        ids = {
            name: (lid, n)
            for lid, name, n in self._conn.execute("SELECT id, name, num_units FROM layers")
        }
        rows: list[tuple[Any, ...]] = []
        for name, (values, sample_ids) in lists.items():
            if name not in ids:
                raise LurkerError(f"write_relevance: no stored layer {name!r}")
            lid, n = ids[name]
            v, s = _np(values).astype(np.float64), _np(sample_ids).astype(np.int64)
            if v.shape != s.shape or v.ndim != 2 or v.shape[0] != n:
                raise LurkerError(
                    f"write_relevance: layer {name!r} needs ({n}, k) values and sample ids, "
                    f"got {v.shape} and {s.shape}"
                )
            top = np.empty(v.shape, dtype=TOP_DTYPE)
            top["sample_id"], top["value"] = s, np.where(s < 0, np.nan, v)
            top["y"] = top["x"] = -1
            rows.extend(zip(repeat(lid), range(n), _rows(top)))
        self._replace_table(RELEVANCE_DDL, "relevance(layer_id, unit, top)", rows, dict(settings))

    def write_embedding(
        self,
        ids: ArrayLike,
        features: ArrayLike,
        pred: ArrayLike,
        conf: ArrayLike,
        settings: Mapping[str, Any],
    ) -> None:
        """Store every sample's feature vector (``(n, dim)``, kept as float16) with the
        model's prediction (-1: none) and confidence; ``settings`` (the layer, its op, the
        dimension) go into the meta as ``embedding``. Keeps the run's status."""
        i, f = _np(ids).astype(np.int64), np.ascontiguousarray(_np(features), np.float16)
        p, c = _np(pred).astype(np.int64), _np(conf).astype(np.float64)
        if f.ndim != 2 or not (len(i) == len(f) == len(p) == len(c)):
            raise LurkerError(
                f"write_embedding: needs n ids, (n, dim) features, n predictions and n "
                f"confidences, got {i.shape}, {f.shape}, {p.shape}, {c.shape}"
            )
        self._check_samples(i, "write_embedding")
        rows = zip(i.tolist(), p.tolist(), [None if v != v else v for v in c.tolist()], _rows(f))
        meta = {**settings, "dtype": "float16", "samples": len(i)}
        self._replace_table(EMBEDDING_DDL, "embedding(sample_id, pred, conf, features)", rows, meta)

    def write_map(
        self,
        ids: ArrayLike,
        xy: ArrayLike,
        pred: ArrayLike,
        conf: ArrayLike,
        settings: Mapping[str, Any],
    ) -> None:
        """Store the dataset map: each sample's 2-D position ``xy`` (``(n, 2)``) with its
        prediction and confidence; ``settings`` (layer, method, seconds) go into the meta
        as ``map``. Keeps the run's status."""
        i, a = _np(ids).astype(np.int64), _np(xy).astype(np.float64)
        p, c = _np(pred).astype(np.int64), _np(conf).astype(np.float64)
        if a.ndim != 2 or a.shape[1] != 2 or not (len(i) == len(a) == len(p) == len(c)):
            raise LurkerError(
                f"write_map: needs n ids, (n, 2) positions, n predictions and n confidences, "
                f"got {i.shape}, {a.shape}, {p.shape}, {c.shape}"
            )
        if not np.isfinite(a).all():
            raise LurkerError("write_map: positions must be finite")
        self._check_samples(i, "write_map")
        conf_rows = [None if v != v else v for v in c.tolist()]
        rows = zip(i.tolist(), a[:, 0].tolist(), a[:, 1].tolist(), p.tolist(), conf_rows)
        meta = {**settings, "samples": len(i)}
        self._replace_table(MAP_DDL, "map(sample_id, x, y, pred, conf)", rows, meta)

    def _replace_table(
        self, ddl: str, target: str, rows: Iterable[tuple[Any, ...]], meta: dict[str, Any]
    ) -> None:
        """Make an optional table if need be and replace its rows, with its meta key (the
        table's name) describing them, in one transaction that keeps the run's status."""
        table = target.split("(", 1)[0]
        with self._tx(demote=False) as cur:
            cur.execute(ddl.strip())
            cur.execute(f"DELETE FROM {table}")
            _insert_rows(cur, target, rows)
            cur.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (table, dump_json(meta))
            )
            if table == "map":  # what an open Map page polls
                write_addition(cur, "map")

    def _check_samples(self, ids: np.ndarray, what: str) -> None:
        """Refuse ids that are repeated or not among the run's samples."""
        if len(np.unique(ids)) != len(ids):
            raise LurkerError(f"{what}: sample ids repeat")
        known = {r[0] for r in self._conn.execute("SELECT id FROM samples")}
        unknown = [int(v) for v in ids if int(v) not in known][:10]
        if unknown:
            raise LurkerError(f"{what}: no sample(s) {unknown} in the run")

    def _drop_checkpoint_and_cache(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.checkpoint_path.unlink()
        shutil.rmtree(self.path / CACHE_DIR, ignore_errors=True)

    def _insert_layer(self, cur: sqlite3.Cursor, position: int, a: _Arrays) -> None:
        r = a.result
        c, k = a.max_ids.shape
        cur.execute(
            "INSERT INTO layers(name, module, op, kind, num_units, shape, rf, position, "
            "hist_edges, layout, op_index, rf_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.name,
                r.module,
                r.op,
                r.kind,
                c,
                a.shape_json,
                a.rf_json,
                position,
                to_blob(a.hist_edges, EDGES_DTYPE),
                a.layout_json,
                None if r.op_index is None else int(r.op_index),
                None if r.rf is not None else r.rf_reason,
            ),
        )
        layer_id = cur.lastrowid
        # each unit's top lists as one blob: 2 x k TOP_DTYPE records ('max', then 'mean'),
        # made for the whole layer at once and handed to SQLite as views of one buffer
        top = np.empty((c, 2, k), dtype=TOP_DTYPE)
        top["sample_id"] = np.stack([a.max_ids, a.mean_ids], axis=1)
        top["value"] = np.stack([a.max_values, a.mean_values], axis=1)
        top["y"][:, 0], top["x"][:, 0] = a.max_y, a.max_x
        top["y"][:, 1], top["x"][:, 1] = a.mean_y, a.mean_x
        empty = top["sample_id"] < 0
        top["value"][empty] = np.nan
        top["y"][empty] = top["x"][empty] = -1
        units = zip(
            repeat(layer_id),
            range(c),
            a.unit_mean.tolist(),
            a.unit_max.tolist(),
            _rows(a.hist),
            _rows(a.class_mean),
            _rows(top.reshape(c, -1)),
        )
        _insert_rows(cur, "units(layer_id, unit, mean, max, hist, class_mean, top)", units)

    # -- plumbing --------------------------------------------------------------------

    def cache_path(
        self, kind: str, layer: str, unit: int, rank: int, list: str, ext: str = "png"
    ) -> Path:
        """Same as :meth:`lurker.store.Run.cache_path`."""
        return cache_file(self.path, kind, layer, unit, rank, list, ext)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Make the writes inside one transaction (one commit, one fsync): all of them are
        stored, or none. The probe finishes a run this way."""
        if self._batch is not None:
            yield
            return
        with self._tx(demote=False) as cur:
            self._batch = cur
            try:
                yield
            finally:
                self._batch = None

    @contextlib.contextmanager
    def _tx(self, *, demote: bool = True) -> Iterator[sqlite3.Cursor]:
        """One write transaction, rolled back if anything inside raises (inside
        :meth:`batch`, part of the batch's transaction).

        With ``demote`` (every data write), the run's status becomes 'running' in the same
        transaction. That keeps the invariant readers rely on: ``status='complete'`` means
        the stored results describe exactly the stored samples and classes.
        """
        cur = self._batch
        outer = cur is None  # else part of the batch's transaction
        if outer:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
        try:
            if demote:
                cur.execute(_SET_STATUS, (dump_json(STATUS_RUNNING),))
            yield cur
            if outer:
                # clean-ups only after the commit: a crash before it must still find the
                # checkpoint; a failed COMMIT (a busy database) is rolled back below, and
                # the writer stays usable
                done, self._after_commit = self._after_commit, []
                self._conn.execute("COMMIT")
        except BaseException:
            if outer:
                self._after_commit.clear()
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
            raise
        if outer:
            for clean_up in done:
                clean_up()

    def close(self) -> None:
        """Close the database connection (idempotent)."""
        self._conn.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# Bound variables per statement in _insert_rows: SQLite's oldest default limit.
_MAX_VARIABLES = 999


def _insert_rows(cur: sqlite3.Cursor, target: str, rows: Iterable[tuple[Any, ...]]) -> None:
    """INSERT ``rows`` into ``target`` (``table(col, ...)``, one value per column), many rows
    per statement: a multi-row VALUES binds for about half of what executemany's row-by-row
    statements cost (86k top-k rows of a ResNet: 0.13 s instead of 0.21 s)."""
    width = target.count(",") + 1
    per = max(1, _MAX_VARIABLES // width)
    row = "(" + ", ".join("?" * width) + ")"

    def statement(n: int) -> str:
        return f"INSERT INTO {target} VALUES " + ", ".join([row] * n)

    full = statement(per)
    flat = list(chain.from_iterable(rows))
    step = per * width
    for start in range(0, len(flat), step):
        chunk = flat[start : start + step]
        cur.execute(full if len(chunk) == step else statement(len(chunk) // width), chunk)


def _rows(a: np.ndarray) -> list[memoryview]:
    """The rows of an array as views of its bytes (SQLite binds them as blobs), with no
    bytes object made per row."""
    a = np.ascontiguousarray(a)
    n = a.nbytes // len(a) if len(a) else 0
    if not n:
        return [b""] * len(a)
    flat = memoryview(a.reshape(-1).view(np.uint8))
    return [flat[i : i + n] for i in range(0, a.nbytes, n)]


def _init_db(db: Path, meta: dict[str, Any]) -> None:
    """Build the schema in a temporary file and rename it to ``db``: all or nothing."""
    tmp = db.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}.db"
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            conn.execute("BEGIN")
            for statement in DDL.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?)",
                ((key, dump_json(value)) for key, value in meta.items()),
            )
            conn.execute(f"PRAGMA user_version = {int(SCHEMA_VERSION)}")
            conn.execute("COMMIT")
        finally:
            conn.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, db)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(db.parent)


def _never_swept(root: Path, db: Path) -> bool:
    """Whether the run at ``db`` holds nothing a rerun could lose: still running, no
    results and no checkpoint (its probe failed before saving any batch), so another
    probe may replace it even with other arguments."""
    if any(root.glob("checkpoint*.pt")):
        return False
    try:
        _, stored = read_stored(db)
        conn = sqlite3.connect(db, timeout=30.0)
        try:
            (layers,) = conn.execute("SELECT count(*) FROM layers").fetchone()
        finally:
            conn.close()
    except (NotARunError, sqlite3.DatabaseError):
        return False
    return stored.get("status") == STATUS_RUNNING and layers == 0


def _remove_run(root: Path) -> None:
    """Delete what a run consists of (database, journal, checkpoints, cache), nothing else."""
    for name in (DB_NAME, f"{DB_NAME}-journal", f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
        with contextlib.suppress(FileNotFoundError):
            (root / name).unlink()
    # the checkpoint, the ranks' checkpoints and the rows files the probe keeps beside them
    for entry in (*root.glob("checkpoint*.pt"), *root.glob("checkpoint*.rows")):
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
    shutil.rmtree(root / CACHE_DIR, ignore_errors=True)
    _remove_stale_tmp(root)


def _remove_stale_tmp(root: Path) -> None:
    """Delete temporary files a crashed write left behind (they are never valid data)."""
    for entry in root.glob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            entry.unlink()
