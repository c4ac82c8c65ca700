"""Reading a run: :class:`Run` answers per-(layer, unit) queries straight from SQLite.

Nothing is loaded up front except the run's meta, class names and layer list, so a web
server can open a run of any size and serve single units with a few indexed lookups.
The connection is read-only and shareable between threads.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lurker.errors import close_names
from lurker.ops.catalogue import current_label
from lurker.store.errors import (
    MissingFromRunError,
    NotARunError,
    RunIncompleteError,
    SchemaVersionError,
    StoreError,
    UnitRangeError,
    UnknownLayerError,
    UnknownSampleError,
)
from lurker.store.featviz import ADDITIONS_KEY, featviz_writes, scan_featviz_tokens
from lurker.store.files import cache_file, lock_holder
from lurker.store.schema import (
    CLASS_MEAN_DTYPE,
    DB_NAME,
    EDGES_DTYPE,
    HIST_DTYPE,
    READABLE_VERSIONS,
    RF_REASON_UNRECORDED,
    SCHEMA_VERSION,
    STATUS_COMPLETE,
    TOP_DTYPE,
    TOP_LISTS,
    from_blob,
    has_column,
    has_graph_table,
    has_layout_column,
    has_relevance_table,
    has_table,
)

if TYPE_CHECKING:
    from lurker.graph import Graph
    from lurker.store.featviz import StoredFeatViz

_NAN = float("nan")


@dataclass(frozen=True)
class LayerInfo:
    """One probed layer. ``name`` is the trace label (or module path) the run keys on;
    ``op`` (= :attr:`op_label`) and :attr:`op_index` name the op it probes in the run's
    graph (:attr:`Run.graph`); ``rf`` is the receptive-field record of
    ``receptive.schema.json`` (as stored, without ``schema``/``version``, in version-2 runs).
    """

    name: str
    module: str | None
    op: str | None
    kind: str | None
    num_units: int
    shape: tuple[int, ...]
    #: Not in the repr (nor ``layout``): dozens of numbers per layer, and ``run.layers``
    #: ending a notebook cell is a list of every layer.
    rf: dict[str, Any] | None = field(repr=False)
    position: int = 0
    id: int = field(default=0, repr=False)
    #: Which axes of the op's full output hold the batch, the units and the positions
    #: (see lurker.probe.layout); ``None`` for runs written before layouts: (N, C, ...).
    layout: dict[str, Any] | None = field(default=None, repr=False)
    #: As stored: ``None`` where the run does not record it (read :attr:`op_index`).
    _op_index: int | None = field(default=None, repr=False)
    #: Why ``rf`` is ``None``: the op that broke the chain from the input and how
    #: (``"transpose_1 (transpose) swaps the input's y and x axes: ..."``); ``None`` where
    #: there is a field or the positions are no image grid; in a run written before the
    #: reason was kept, a text saying it is not recorded.
    rf_reason: str | None = field(default=None, repr=False)

    @property
    def position_axes(self) -> int | None:
        """How many axes of the output hold positions by the stored layout (3 on a video
        model's 3-D layer: time, height, width); None where the run records no layout."""
        positions = self.layout.get("positions") if isinstance(self.layout, dict) else None
        return len(positions) if isinstance(positions, list) else None

    @property
    def op_label(self) -> str | None:
        """The label of the probed op in the run's graph (the ``op`` column)."""
        return self.op

    @property
    def op_index(self) -> int:
        """Index of the probed op in the run's graph (``run.graph.ops[info.op_index]``).

        Raises :class:`MissingFromRunError` for a run that does not record it (one written
        before run-store version 3): it is never guessed from the label.
        """
        if self._op_index is None:
            raise MissingFromRunError(
                f"layer {self.name!r} has no op index: the run does not record which op of "
                "the model's graph each layer probes (runs of store version 2 do not). Probe "
                "the model again into a new run (another out directory, or overwrite=True) "
                "to get op indices and the graph",
                missing="op_index",
            )
        return self._op_index


@dataclass(frozen=True)
class Sample:
    """One dataset sample. ``label``/``class_name`` are ``None`` when unlabeled."""

    id: int
    path: str | None
    label: int | None
    class_name: str | None
    source_index: int | None = None


def _stored_peak(which: str, y: int, x: int) -> tuple[int, int] | tuple[None, None]:
    """A top-list slot's peak as stored: the max list's always; the mean list's unless -1
    (a run of a lurker that kept none: never made up); the relevance list has none."""
    if which == "max" or (which == "mean" and y >= 0 and x >= 0):
        return y, x
    return None, None


@dataclass(frozen=True)
class TopEntry:
    """One slot of a unit's top-k list; ``y``/``x``: where the unit peaked on the sample (the
    'max' list always; the 'mean' list in runs probed since the mean list kept its peaks, else
    None; the 'relevance' list never)."""

    rank: int
    sample_id: int
    value: float
    y: int | None
    x: int | None
    label: int | None
    class_name: str | None
    path: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "sample_id": self.sample_id,
            "value": _json_float(self.value),
            "y": self.y,
            "x": self.x,
            "label": self.label,
            "class_name": self.class_name,
            "path": self.path,
        }


@dataclass(frozen=True)
class Embedding:
    """Per-sample features of one layer (:meth:`Run.embedding`), rows in ``ids`` order."""

    ids: np.ndarray  # (n,) int64 sample ids, ascending
    features: np.ndarray  # (n, dim) float16
    pred: np.ndarray  # (n,) int64 predicted class, -1: none
    conf: np.ndarray  # (n,) float32 probability of pred (lurker.models.probabilities), NaN: none
    meta: dict[str, Any]  # layer, op, dim, pooled, dtype, samples

    def __repr__(self) -> str:
        """One line (the dataclass's printed every array: hundreds of lines ending a
        notebook cell): the layer, how many samples and the features' shape."""
        return (
            f"<Embedding of {self.meta.get('layer')!r}: {len(self.ids):,} samples, features "
            f"{tuple(self.features.shape)} {self.features.dtype}{_predicted(self.pred)}>"
        )


def _predicted(pred: np.ndarray) -> str:
    """How many rows hold a prediction, for a repr (``-1``: none)."""
    n = int((np.asarray(pred) >= 0).sum())
    return f", {n:,} with a prediction" if n else ""


@dataclass(frozen=True)
class MapData:
    """The dataset map (:meth:`Run.map`): one point per sample, in ``ids`` order."""

    ids: np.ndarray  # (n,) int64 sample ids, ascending
    x: np.ndarray  # (n,) float32
    y: np.ndarray  # (n,) float32
    label: np.ndarray  # (n,) int64 true class, -1: none
    pred: np.ndarray  # (n,) int64 predicted class, -1: none
    conf: np.ndarray  # (n,) float32 probability of pred (lurker.models.probabilities), NaN: none
    meta: dict[str, Any]  # layer, method, seconds, samples

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        """One line (the dataclass's printed all seven arrays: a 360-sample map was 300
        lines ending a notebook cell): the method, the layer and how many points."""
        labeled = int((np.asarray(self.label) >= 0).sum())
        wrong = int(((self.pred != self.label) & (self.label >= 0) & (self.pred >= 0)).sum())
        facts = f", {labeled:,} labeled" if labeled else ""
        facts += f", {wrong:,} misclassified" if labeled and (self.pred >= 0).any() else ""
        return (
            f"<MapData {self.meta.get('method')} of {self.meta.get('layer')!r}: "
            f"{len(self.ids):,} points{_predicted(self.pred)}{facts}>"
        )


@dataclass(frozen=True)
class Unit:
    """One unit (channel) of a layer; lists, class means and histogram load on demand."""

    layer: str
    index: int
    mean: float
    max: float
    info: LayerInfo = field(repr=False, compare=False)
    _run: Run = field(repr=False, compare=False)

    def top(self, which: Literal["max", "mean", "relevance"] = "max") -> list[TopEntry]:
        """The unit's top samples by spatial max (with peak y, x), by spatial mean (with the
        peak too where the run stored it: -1 in older runs reads as None), or by its
        relevance for the model's prediction (runs probed with ``relevance=True``)."""
        if which == "relevance":
            slots = np.frombuffer(self._relevance_blob(), TOP_DTYPE)
        elif which not in TOP_LISTS:
            raise ValueError(f"top list must be one of {(*TOP_LISTS, 'relevance')}, got {which!r}")
        else:
            lists = np.frombuffer(self._blob("top"), TOP_DTYPE)
            slots = lists.reshape(2, -1)[0 if which == "max" else 1] if len(lists) else lists
        filled = [(rank, slot) for rank, slot in enumerate(slots.tolist()) if slot[0] >= 0]
        if not filled:
            return []
        marks = ",".join("?" * len(filled))
        found = {
            sid: (label, cname, path)
            for sid, label, cname, path in self._run._query(
                "SELECT s.id, s.label, c.name, s.path FROM samples s "
                f"LEFT JOIN classes c ON c.id = s.label WHERE s.id IN ({marks})",
                [slot[0] for _, slot in filled],
            )
        }
        return [
            TopEntry(
                rank,
                sid,
                float(value),
                *_stored_peak(which, y, x),
                *found.get(sid, (None, None, None)),
            )
            for rank, (sid, value, y, x) in filled
        ]

    def class_mean_array(self) -> np.ndarray:
        """Mean activation per class id, as float64 (NaN where the probe had no data)."""
        return from_blob(self._blob("class_mean"), CLASS_MEAN_DTYPE)

    def class_means(self) -> dict[str, float]:
        """Mean activation per class name, in class-id order.

        Duplicate names (ImageNet has two 'crane's) get `` (id)`` appended so no class
        is lost; classes without names are keyed by their id.
        """
        names = self._run.class_keys
        return {
            names[i] if i < len(names) else str(i): float(v)
            for i, v in enumerate(self.class_mean_array())
        }

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)`` of the unit's activations; ``len(edges) == len(counts) + 1``."""
        return from_blob(self._blob("hist"), HIST_DTYPE), self._run._edges(self.info)

    def to_dict(self) -> dict[str, Any]:
        """Everything about the unit as strict JSON types (NaN becomes ``None``)."""
        counts, edges = self.histogram()
        return {
            "layer": {
                "name": self.info.name,
                "module": self.info.module,
                "op": self.info.op,
                "kind": self.info.kind,
                "num_units": self.info.num_units,
                "shape": list(self.info.shape),
                "rf": self.info.rf,
                "layout": self.info.layout,
                "op_label": self.info.op_label,
                "op_index": self.info._op_index,
                "rf_reason": self.info.rf_reason,
            },
            "unit": self.index,
            "mean": _json_float(self.mean),
            "max": _json_float(self.max),
            "top": {which: [e.to_dict() for e in self.top(which)] for which in self._run.top_lists},
            "class_means": {k: _json_float(v) for k, v in self.class_means().items()},
            "histogram": {
                "counts": [_json_float(v) for v in counts.tolist()],
                "edges": [_json_float(v) for v in edges.tolist()],
            },
        }

    def _relevance_blob(self) -> bytes:
        if not self._run.has_relevance:
            raise MissingFromRunError(
                f"run {self._run.path} holds no relevance-max lists: probe the model with "
                "relevance=True (`lurker probe --relevance`) to rank each unit's samples by "
                "its relevance for the prediction",
                missing="relevance",
            )
        rows = self._run._query(
            "SELECT top FROM relevance WHERE layer_id = ? AND unit = ?",
            (self.info.id, self.index),
        )
        return bytes(rows[0][0]) if rows else b""

    def _blob(self, column: Literal["hist", "class_mean", "top"]) -> bytes:
        rows = self._run._query(
            f"SELECT {column} FROM units WHERE layer_id = ? AND unit = ?",
            (self.info.id, self.index),
        )
        return bytes(rows[0][0]) if rows and rows[0][0] is not None else b""


class Run:
    """A probe run on disk, opened read-only. Use :meth:`open`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, version: int = SCHEMA_VERSION) -> None:
        self.path = path
        #: The run's store schema version (2, 3 or 4; see docs/run-store.md).
        self.schema_version = version
        self._conn = conn
        self._lock = threading.Lock()
        self._graph: Graph | None = None
        self.meta: dict[str, Any] = {
            k: json.loads(v) for k, v in self._query("SELECT key, value FROM meta")
        }
        self.classes: list[str] = [
            n for (n,) in self._query("SELECT name FROM classes ORDER BY id")
        ]
        layout_col = "layout" if has_layout_column(self._conn) else "NULL"
        op_index_col = "op_index" if version >= 3 else "NULL"
        reason_col = "rf_reason" if has_column(self._conn, "rf_reason") else "NULL"
        unrecorded = reason_col == "NULL"
        self.layers: list[LayerInfo] = [
            LayerInfo(
                name=name,
                module=module,
                # an op an older lurker named otherwise (linear_dynamic_1): the live
                # trace's and the stored graph's label (lurker.graph reads it so too)
                op=None if op is None else current_label(op),
                kind=None if kind is None else current_label(kind),
                num_units=int(num_units),
                shape=tuple(json.loads(shape)),
                rf=None if rf is None else json.loads(rf),
                position=int(position),
                id=int(layer_id),
                layout=None if layout is None else json.loads(layout),
                _op_index=None if op_index is None else int(op_index),
                rf_reason=RF_REASON_UNRECORDED if unrecorded and rf is None else reason,
            )
            for (
                layer_id,
                name,
                module,
                op,
                kind,
                num_units,
                shape,
                rf,
                position,
                layout,
                op_index,
                reason,
            ) in self._query(
                "SELECT id, name, module, op, kind, num_units, shape, rf, position, "
                f"{layout_col}, {op_index_col}, {reason_col} FROM layers ORDER BY position"
            )
        ]
        self._by_name = {info.name: info for info in self.layers}
        self._edge_cache: dict[int, np.ndarray] = {}
        seen: dict[str, int] = {}
        for name in self.classes:
            seen[name] = seen.get(name, 0) + 1
        #: Class names made unique for use as dict keys (see :meth:`Unit.class_means`).
        self.class_keys = [n if seen[n] == 1 else f"{n} ({i})" for i, n in enumerate(self.classes)]

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, allow_incomplete: bool = False) -> Run:
        """Open the run directory ``path`` (or its ``run.db``) for reading.

        Raises :class:`NotARunError` if it is not a run, :class:`SchemaVersionError` if
        it was written by an incompatible lurker, and :class:`RunIncompleteError` if the
        probe has not finished (unless ``allow_incomplete``).
        """
        root = Path(path)
        if root.name == DB_NAME and root.is_file():
            root = root.parent
        db = root / DB_NAME
        if not root.exists():
            raise NotARunError(f"no run at {root}: the path does not exist")
        if not db.is_file():
            holder = lock_holder(root)
            if holder is not None:  # a probe that is still loading and tracing its model
                raise RunIncompleteError(
                    f"run {root} is not written yet: its probe is still starting (process "
                    f"{holder} holds the directory and has not created {DB_NAME}). Open it "
                    "when that process has finished"
                )
            raise NotARunError(
                f"{root} is not a lurker run directory (no {DB_NAME}); "
                "point at the --out directory of `lurker probe`"
            )
        conn = _connect_ro(db)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            has_meta = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
            ).fetchone()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise NotARunError(f"{db} is not a readable lurker run database ({exc})") from exc
        if not has_meta:
            conn.close()
            raise NotARunError(f"{db} is an SQLite file but not a lurker run (no meta table)")
        if version not in READABLE_VERSIONS:
            conn.close()
            readable = " and ".join(map(str, READABLE_VERSIONS))
            raise SchemaVersionError(
                f"run {root} has schema version {version}, but this lurker reads versions "
                f"{readable}; open it with the lurker version that wrote it "
                f"(meta lurker_version), or probe again with overwrite=True (CLI: --overwrite)",
                found=int(version),
                expected=SCHEMA_VERSION,
            )
        run = cls(root, conn, int(version))
        status = run.meta.get("status")
        if status != STATUS_COMPLETE and not allow_incomplete:
            run.close()
            holder = lock_holder(root)
            if holder is not None:
                raise RunIncompleteError(
                    f"run {root} is incomplete (status {status!r}): its probe is still running "
                    f"(process {holder} is writing it). Open it when that process has finished"
                )
            raise RunIncompleteError(
                f"run {root} is incomplete (status {status!r}): its probe was interrupted. "
                f"Resume it by running the same probe again into {root} (the same "
                f"`lurker probe ... --out {root}` command, or the same probe() call)"
            )
        return run

    # -- queries -----------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Whether the probe finished and wrote all results."""
        return self.meta.get("status") == STATUS_COMPLETE

    def graph_json(self) -> dict[str, Any]:
        """The traced graph's JSON document, as the probe stored it (``trace.to_json()``).

        Needs neither the model nor torch. Raises :class:`MissingFromRunError` if the run
        holds no graph (runs of store version 2, or written without ``set_graph``).
        """
        rows = self._query("SELECT doc FROM graph WHERE id = 1") if self._has_graph() else []
        if not rows:
            why = (
                f"it was written by lurker {self.meta.get('lurker_version', '?')} with run-store "
                f"version {self.schema_version}, which did not store graphs"
                if self.schema_version < 3
                else "it was written without one (RunWriter.set_graph was not called)"
            )
            raise MissingFromRunError(
                f"run {self.path} holds no graph of its model: {why}. Probe the model again "
                "into a new run (another out directory, or overwrite=True; CLI: --overwrite) "
                "to store the graph and each layer's op index",
                missing="graph",
            )
        doc: dict[str, Any] = json.loads(rows[0][0])
        return doc

    @property
    def graph(self) -> Graph:
        """The traced graph (``lurker.graph.Graph.from_json(run.graph_json())``), read once.

        Raises :class:`MissingFromRunError` as :meth:`graph_json` does.
        """
        if self._graph is None:
            from lurker.graph import Graph  # torch-free, but only loaded when asked

            self._graph = Graph.from_json(self.graph_json())
        return self._graph

    def _has_graph(self) -> bool:
        with self._lock:
            return has_graph_table(self._conn)

    def _has_table(self, name: str) -> bool:
        rows = self._query("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,))
        return bool(rows)

    def featviz(self, layer: str, objective: str | None = None) -> StoredFeatViz:
        """The layer's stored feature visualizations (made by ``lurker featviz`` or
        ``FeatViz.save``): images, the activation each reached, the settings.

        ``objective`` picks among several stored (default ``"channel"`` where present).
        Raises :class:`MissingFromRunError` (saying how to make them) when there are none.
        """
        from lurker.store.featviz import read_featviz

        return read_featviz(self, layer, objective)

    def featviz_layers(self) -> list[str]:
        """Names of the layers with stored feature visualizations, in layer order."""
        from lurker.store.featviz import featviz_layers

        return featviz_layers(self)

    @property
    def has_relevance(self) -> bool:
        """Whether the run holds relevance-max lists (``probe(..., relevance=True)``)."""
        with self._lock:
            return has_relevance_table(self._conn)

    @property
    def sample_rate(self) -> float | None:
        """The sampling rate in Hz the probe recorded from a signal dataset's
        ``sample_rate``; None where it recorded none or not a positive finite number."""
        rate = (self.meta.get("config") or {}).get("sample_rate")
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            return None
        return float(rate) if math.isfinite(rate) and rate > 0 else None

    @property
    def num_samples(self) -> int:
        """How many samples the run holds (the readable images the probe swept)."""
        return int(self._query("SELECT count(*) FROM samples")[0][0])

    @property
    def has_embedding(self) -> bool:
        """Whether the run holds per-sample features (``probe(..., embed=...)``)."""
        with self._lock:
            return has_table(self._conn, "embedding")

    @property
    def has_map(self) -> bool:
        """Whether the run holds a dataset map (``lurker map RUN``)."""
        with self._lock:
            return has_table(self._conn, "map")

    def embedding(self) -> Embedding:
        """Every sample's stored feature vector with the model's prediction and confidence,
        in sample-id order. :class:`MissingFromRunError` when the run holds none.

        The features are float16, kept for the dataset map: about 3 significant digits,
        inf beyond 65,504. For exact values over a dataset, replay a trace
        (``lurker.trace(model, x, save=[layer]).run(batch)``; docs/tracing.md)."""
        if not self.has_embedding:
            raise MissingFromRunError(
                f"run {self.path} holds no per-sample features: probe with embed=True "
                "(`lurker probe --embed`), or run `lurker map RUN`, which collects them",
                missing="embedding",
            )
        rows = self._query("SELECT sample_id, pred, conf, features FROM embedding ORDER BY 1")
        meta = self._meta_now("embedding")
        dim = int(meta.get("dim") or (len(rows[0][3]) // 2 if rows else 0))
        feats = np.frombuffer(b"".join(r[3] for r in rows), np.float16).reshape(len(rows), dim)
        return Embedding(
            ids=np.array([r[0] for r in rows], np.int64),
            features=feats,
            pred=np.array([r[1] for r in rows], np.int64),
            conf=np.array([_nan(r[2]) for r in rows], np.float32),
            meta=meta,
        )

    def stored_prediction(self, sample_id: int) -> tuple[int, float] | None:
        """The model's top class and its probability (NaN: none) for one sample, as
        the probe (``embed=``) or ``lurker map`` recorded them: the map's when the run has
        one (what the Map page shows), else the embedding's. None when the run holds
        neither for the sample, or the model gave no class scores (-1). Lets a sample's
        page show the prediction with no model attached (a static export)."""
        for table in ("map", "embedding"):
            with self._lock:
                present = has_table(self._conn, table)
            if not present:
                continue
            rows = self._query(
                f"SELECT pred, conf FROM {table} WHERE sample_id = ?", (int(sample_id),)
            )
            if rows:
                pred, conf = rows[0]
                return None if pred < 0 else (int(pred), _nan(conf))
        return None

    def additions(self, featviz_layers: dict[str, str] | None = None) -> dict[str, str | None]:
        """A token of each thing a command adds to a complete run without probing it again:
        ``featviz`` (``lurker featviz``, all layers: :meth:`featviz_tokens` gives each
        layer's) and ``map`` (``lurker map``), None while it holds none. Another value
        means what it adds was written since: a page showing it (a unit's feature
        visualizations, the Map page) is out of date. Reads one meta row: each write
        stores a new token in its own transaction. ``featviz_layers``: what
        :meth:`featviz_tokens` gave now, if the caller asked it already."""
        stored = self._meta_now(ADDITIONS_KEY)
        layers = self._featviz_tokens(stored) if featviz_layers is None else featviz_layers
        featviz = (
            hashlib.sha256(repr(sorted(layers.items())).encode()).hexdigest()[:16]
            if layers
            else None
        )
        drawn: Any = None
        if self.has_map:
            # the map's meta (settings, seconds) with its token: a map written by a lurker
            # that wrote no token (made before them) still changes it
            drawn = hashlib.sha256(
                repr(
                    (stored.get("map"), self._query("SELECT value FROM meta WHERE key = 'map'"))
                ).encode()
            ).hexdigest()[:16]
        return {"featviz": featviz, "map": drawn}

    def featviz_tokens(self) -> dict[str, str]:
        """Each layer's token of its feature visualizations, by layer name (layers without
        any are left out): another value means ``lurker featviz`` wrote that layer since."""
        return self._featviz_tokens(self._meta_now(ADDITIONS_KEY))

    def _featviz_tokens(self, stored: dict[str, Any]) -> dict[str, str]:
        with self._lock:
            n = featviz_writes(self._conn)
            if (
                stored.get("featviz") is not None
                and n is not None
                and stored.get("featviz_writes") == n
            ):
                return {str(k): str(v) for k, v in dict(stored["featviz"]).items()}
            # featviz rows written before the tokens, or since by a lurker that writes none:
            # hashed from the rows (a scan per call, until the next write stores the tokens)
            return scan_featviz_tokens(self._conn)

    def meta_now(self, key: str) -> Any:
        """The meta value ``key`` as stored now, None without one: :attr:`meta` is read
        once, at open, and ``lurker map`` or a probe of a finished run (its ``vocab``) may
        write after this run opened."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def _meta_now(self, key: str) -> dict[str, Any]:
        """A meta entry that is a mapping, as stored now ({} without one)."""
        return dict(self.meta_now(key) or {})

    def map(self) -> MapData:
        """The dataset map: every sample's 2-D position, label, prediction and confidence,
        in sample-id order. :class:`MissingFromRunError` when the run holds none."""
        if not self.has_map:
            raise MissingFromRunError(
                f"run {self.path} holds no dataset map: make one with `lurker map RUN` "
                "(or lurker.make_map(run))",
                missing="map",
            )
        rows = self._query(
            "SELECT m.sample_id, m.x, m.y, m.pred, m.conf, s.label FROM map m "
            "LEFT JOIN samples s ON s.id = m.sample_id ORDER BY 1"
        )
        a = np.array([r[:3] for r in rows], np.float64).reshape(-1, 3)
        return MapData(
            ids=a[:, 0].astype(np.int64),
            x=a[:, 1].astype(np.float32),
            y=a[:, 2].astype(np.float32),
            label=np.array([-1 if r[5] is None else r[5] for r in rows], np.int64),
            pred=np.array([r[3] for r in rows], np.int64),
            conf=np.array([_nan(r[4]) for r in rows], np.float32),
            meta=self._meta_now("map"),
        )

    @property
    def top_lists(self) -> tuple[str, ...]:
        """The top-k lists each unit has: ``("max", "mean")``, and ``"relevance"`` when the
        run holds relevance-max lists."""
        return ("max", "mean", "relevance") if self.has_relevance else ("max", "mean")

    def layer(self, name: str) -> LayerInfo:
        """A layer by name, op label or module path (names win; a module must be unique; a
        block's path, such as ``layer3.1``, names the probed layer that is its output)."""
        if not isinstance(name, str):
            raise UnknownLayerError(
                f"a layer is named by a string (its name, op label or module path), got "
                f"{name!r}; run.layers lists them: {', '.join(i.name for i in self.layers[:8])}"
                + (", ..." if len(self.layers) > 8 else "")
            )
        if name in self._by_name:
            return self._by_name[name]
        output: LayerInfo | str | None = None
        for attr in ("op", "module"):
            if attr == "module":
                # a module whose output is probed names that layer, even where ops inside
                # it (a block's residual add) are probed too and carry its path
                output = self._module_output(name)
                if isinstance(output, LayerInfo):
                    return output
            key = current_label(name) if attr == "op" else name  # an old label too
            hits = [info for info in self.layers if getattr(info, attr) == key]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise UnknownLayerError(
                    f"{attr} {name!r} matches several layers of run {self.path}: "
                    f"{', '.join(h.name for h in hits)}; use one of these names"
                )
        raise UnknownLayerError(output or self._unknown_layer_message(name))

    def _module_output(self, name: str) -> LayerInfo | str | None:
        """The probed layer that is the output of module ``name``, as ``lurker probe
        --layers`` reads a module path: a block's path (``layer3.1``, what the model's print
        shows) names its last op (``layer3.1.relu:2``), which the layer is keyed on. None
        where the run's graph has no such module; why not, where its output is not probed
        or is several layers."""
        try:
            graph = self.graph
        except MissingFromRunError:  # an older run: module paths are its layers' only
            return None
        ops = [op for op in graph.ops if name in op.module_outputs]
        if not ops:
            return None
        hits = [
            info
            for info in self.layers
            for op in ops
            if (info._op_index == op.index if info._op_index is not None else info.op == op.label)
        ]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            return (
                f"module {name!r} outputs several layers of run {self.path}: "
                f"{', '.join(h.name for h in hits)}; use one of these names"
            )
        labels = ", ".join(op.label for op in ops)
        inside = [i.name for i in self.layers if (i.module or "").startswith(name + ".")]
        held = inside or [i.name for i in self.layers]
        shown = ", ".join(held[:8]) + (", ..." if len(held) > 8 else "")
        return (
            f"the output of module {name!r} (op {labels}) was not probed: no layer of run "
            f"{self.path} is it. Probe it (lurker probe --layers {name}; Python: "
            f"layers={name!r}) or name a layer the run holds"
            + (f" inside that module: {shown}" if inside else f": {shown}")
        )

    def _unknown_layer_message(self, name: str) -> str:
        valid = [info.name for info in self.layers]
        candidates = set(valid) | {x for i in self.layers for x in (i.op, i.module) if x}
        close = close_names(name, sorted(candidates), n=3, cutoff=0.5)
        shown = ", ".join(valid[:40]) + (
            f", ... ({len(valid) - 40} more)" if len(valid) > 40 else ""
        )
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"no layer {name!r} in run {self.path}.{hint} Valid layers: {shown or '(none)'}"

    def unit(self, layer: str, unit: int) -> Unit:
        """One unit of a layer; :class:`UnitRangeError` if ``unit`` is out of range."""
        info = self.layer(layer)
        try:  # ints, numpy's and torch's integers; 3.7 is no unit
            index = operator.index(unit) if not isinstance(unit, bool) else None
        except TypeError:
            index = None
        if index is None:
            raise UnitRangeError(
                f"a unit is an int index (0..{info.num_units - 1} in {info.name!r}), got {unit!r}"
            )
        if not 0 <= index < info.num_units:
            raise UnitRangeError(
                f"layer {info.name!r} has {info.num_units} units (0..{info.num_units - 1}); "
                f"unit {unit} does not exist"
            )
        rows = self._query(
            "SELECT mean, max FROM units WHERE layer_id = ? AND unit = ?", (info.id, index)
        )
        if not rows:
            raise StoreError(f"run {self.path} has no stored statistics for {info.name}:{index}")
        return Unit(info.name, index, _nan(rows[0][0]), _nan(rows[0][1]), info, self)

    def units(
        self,
        layer: str,
        order_by: Literal["max", "mean", "index"] = "max",
        limit: int | None = None,
    ) -> list[Unit]:
        """A layer's units, highest ``max``/``mean`` first (or by index), sorted in SQL."""
        orders = {"max": "max DESC, unit", "mean": "mean DESC, unit", "index": "unit"}
        if order_by not in orders:
            raise ValueError(f"order_by must be one of {sorted(orders)}, got {order_by!r}")
        info = self.layer(layer)
        rows = self._query(
            f"SELECT unit, mean, max FROM units WHERE layer_id = ? ORDER BY {orders[order_by]} "
            "LIMIT ?",
            (info.id, -1 if limit is None else int(limit)),
        )
        return [Unit(info.name, u, _nan(mean), _nan(mx), info, self) for u, mean, mx in rows]

    def samples(self, ids: Iterable[int]) -> list[Sample]:
        """Samples by id, in the order asked; :class:`UnknownSampleError` for unknown ids."""
        wanted = [int(i) for i in ids]
        found: dict[int, Sample] = {}
        unique = sorted(set(wanted))
        for start in range(0, len(unique), 500):  # stay under SQLite's variable limit
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for sid, path, label, src, cname in self._query(
                "SELECT s.id, s.path, s.label, s.source_index, c.name FROM samples s "
                f"LEFT JOIN classes c ON c.id = s.label WHERE s.id IN ({marks})",
                chunk,
            ):
                found[sid] = Sample(sid, path, label, cname, src)
        missing = [i for i in unique if i not in found]
        if missing:
            raise UnknownSampleError(f"run {self.path} has no sample(s) with id {missing[:10]}")
        return [found[i] for i in wanted]

    def sample(self, sample_id: int) -> Sample:
        """One sample by id."""
        return self.samples([sample_id])[0]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Inputs the probe could not read, as ``(path, reason)`` in the order met."""
        return [(p, r) for p, r in self._query("SELECT path, reason FROM skipped ORDER BY id")]

    def to_dict(self, layer: str, unit: int) -> dict[str, Any]:
        """One unit as a JSON-serializable dict (the web explorer's unit payload)."""
        return self.unit(layer, unit).to_dict()

    def cache_path(
        self, kind: str, layer: str, unit: int, rank: int, list: str, ext: str = "png"
    ) -> Path:
        """Path for a lazily made image in ``cache/`` (safe name, parents created).

        Write it with :func:`lurker.store.atomic_write_bytes` so concurrent readers
        never see a half-written image. The cache is wiped whenever results are rewritten.
        """
        return cache_file(self.path, kind, layer, unit, rank, list, ext)

    # -- plumbing ------------------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:  # one connection shared by a threaded web server
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                if not _is_hot_journal(exc):  # a writer crashed while this run was open
                    raise
                _roll_back_hot_journal(self.path / DB_NAME)
                return self._conn.execute(sql, params).fetchall()

    def _edges(self, info: LayerInfo) -> np.ndarray:
        if info.id not in self._edge_cache:
            rows = self._query("SELECT hist_edges FROM layers WHERE id = ?", (info.id,))
            self._edge_cache[info.id] = from_blob(rows[0][0], EDGES_DTYPE)
        return self._edge_cache[info.id]

    @property
    def identity(self) -> tuple[Any, Any]:
        """``(created, status)`` as this run was opened: which probe made it, and how far."""
        return self.meta.get("created"), self.meta.get("status")

    @staticmethod
    def stored_identity(path: str | os.PathLike[str]) -> tuple[Any, Any] | None:
        """:attr:`identity` of the run stored at ``path`` now (None when it cannot be
        read): another value than an open :class:`Run`'s means the directory was probed
        again, or its probe went on, since that run was opened; a command that only adds
        to a run (``lurker featviz``, ``lurker map``) leaves it."""
        try:
            conn = _connect_ro(Path(path) / DB_NAME)
            try:
                rows = conn.execute(
                    "SELECT key, value FROM meta WHERE key IN ('created', 'status')"
                ).fetchall()
            finally:
                conn.close()
        except sqlite3.Error:
            return None
        meta = {k: json.loads(v) for k, v in rows}
        return meta.get("created"), meta.get("status")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Run({str(self.path)!r}, model={self.meta.get('model')!r}, layers={len(self.layers)})"
        )


def _connect_ro(db: Path) -> sqlite3.Connection:
    """Read-only, thread-shareable connection; repairs an interrupted write first."""
    uri = db.resolve().as_uri() + "?mode=ro"
    for attempt in range(2):
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10.0)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError as exc:
            conn.close()
            if not _is_hot_journal(exc) or attempt:
                raise StoreError(f"cannot read run database {db}: {exc}") from exc
            _roll_back_hot_journal(db)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise NotARunError(f"{db} is not a readable lurker run database ({exc})") from exc
    raise AssertionError("unreachable")


def _is_hot_journal(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorname", "") == "SQLITE_READONLY_ROLLBACK"


def _roll_back_hot_journal(db: Path) -> None:
    """Undo a write that a crash interrupted, as SQLite's own crash recovery would.

    The crash left a hot journal that only a writable connection may roll back; a
    read-only one fails with SQLITE_READONLY_ROLLBACK. Rolling back is always safe: the
    journal holds the pages as they were before the uncommitted transaction.
    """
    try:
        repair = sqlite3.connect(db, timeout=10.0)
        try:
            repair.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            repair.close()
    except sqlite3.Error as exc:
        raise RunIncompleteError(
            f"run database {db} holds an interrupted write that needs write access to roll "
            f"back ({exc}); resume the probe, or open the run once as the user who wrote it"
        ) from exc


def _nan(value: float | None) -> float:
    """SQLite stores NaN as NULL; give it back as NaN."""
    return _NAN if value is None else float(value)


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
