"""The run store's on-disk schema (version :data:`SCHEMA_VERSION`), shared by writer and reader.

docs/run-store.md documents every table and column; keep the two in sync. Any change
that an older reader could misread (a renamed or retyped column, a new blob encoding)
must bump :data:`SCHEMA_VERSION`; purely additive changes that old readers ignore
(a new index, a new meta key) need not. The receptive-field record stored per layer has
its own version (:data:`RF_VERSION`) and JSON Schema (``lurker/schema/receptive.schema.json``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from lurker.errors import LurkerError

#: Stored in ``PRAGMA user_version`` and in ``meta.schema_version``. Version 2 keeps a
#: unit's top-k lists in its ``units`` row (``top`` blob) instead of a row per entry;
#: version 3 adds the traced graph (``graph`` table), each layer's op index and the
#: versioned receptive-field record; version 4 stores that record's version 2 (a ``t``
#: axis over the frames of a video clip's layers).
SCHEMA_VERSION = 4
#: Versions :class:`lurker.store.Run` opens. A version-2 run lacks the graph and the op
#: indices: reading them raises :class:`~lurker.store.MissingFromRunError`, nothing is made up.
READABLE_VERSIONS = (2, 3, 4)

#: The receptive-field record (``layers.rf``): ``schema`` and ``version`` fields of each.
RF_SCHEMA_ID = "lurker.receptive"
RF_VERSION = 2

DB_NAME = "run.db"
CACHE_DIR = "cache"
CHECKPOINT_NAME = "checkpoint.pt"
#: Held (``flock``) by the process writing the run; holds that process's id.
LOCK_NAME = ".lock"

STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"

TOP_LISTS = ("mean", "max")

#: Blob encodings (little-endian, so a run copied between machines reads the same).
HIST_DTYPE = np.dtype("<f8")  # counts can pass 2**24, where float32 stops being exact
EDGES_DTYPE = np.dtype("<f8")
CLASS_MEAN_DTYPE = np.dtype("<f4")
#: One slot of a top-k list. ``units.top`` holds 2 x k of them: the 'max' list (ranks
#: 0..k-1), then the 'mean' list. Empty slots have ``sample_id`` -1; ``y``/``x`` (the peak)
#: are -1 in the 'mean' list.
TOP_DTYPE = np.dtype([("sample_id", "<i8"), ("value", "<f8"), ("y", "<i4"), ("x", "<i4")])
#: Database page size: a unit's row (top lists, histogram, class means) fits in one page.
PAGE_SIZE = 16384


def has_layout_column(conn: Any) -> bool:
    """Whether ``layers`` has the ``layout`` column (added within version 2: runs written
    before it lack it, and their layers are laid out (N, C, ...))."""
    return has_column(conn, "layout")


def has_column(conn: Any, name: str) -> bool:
    """Whether ``layers`` has column ``name`` (columns added within a version are absent
    from the runs written before them)."""
    return any(row[1] == name for row in conn.execute("PRAGMA table_info(layers)"))


#: ``LayerInfo.rf_reason`` of a layer without a field in a run written before the reason
#: was kept (no ``rf_reason`` column).
RF_REASON_UNRECORDED = (
    "not recorded (this run was probed by a lurker that did not keep why a layer has no "
    "receptive field: probe it again to see why)"
)


DDL = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE classes (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL
);
CREATE TABLE samples (
    id           INTEGER PRIMARY KEY,
    path         TEXT,
    label        INTEGER,
    source_index INTEGER NOT NULL
);
CREATE TABLE skipped (
    id     INTEGER PRIMARY KEY,
    path   TEXT NOT NULL UNIQUE,
    reason TEXT NOT NULL
);
CREATE TABLE layers (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    module     TEXT,
    op         TEXT,
    kind       TEXT,
    num_units  INTEGER NOT NULL,
    shape      TEXT NOT NULL,
    rf         TEXT,
    position   INTEGER NOT NULL,
    hist_edges BLOB NOT NULL,
    layout     TEXT,
    op_index   INTEGER,
    rf_reason  TEXT
);
CREATE INDEX layers_by_module ON layers(module);
CREATE INDEX layers_by_op ON layers(op);
CREATE TABLE graph (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    doc TEXT NOT NULL
);
CREATE TABLE units (
    layer_id   INTEGER NOT NULL REFERENCES layers(id),
    unit       INTEGER NOT NULL,
    mean       REAL,
    max        REAL,
    hist       BLOB NOT NULL,
    class_mean BLOB NOT NULL,
    top        BLOB NOT NULL,
    PRIMARY KEY (layer_id, unit)
);
"""


#: The relevance-max lists (``probe(..., relevance=True)``): each unit's top-k samples by
#: its LRP relevance for the model's prediction. Additive (older readers ignore it), made
#: by the writer only for runs that hold them.
RELEVANCE_DDL = """
CREATE TABLE IF NOT EXISTS relevance (
    layer_id INTEGER NOT NULL REFERENCES layers(id),
    unit     INTEGER NOT NULL,
    top      BLOB NOT NULL,
    PRIMARY KEY (layer_id, unit)
);
"""


#: The dataset map's inputs (``probe(..., embed=...)``, ``lurker map``): every sample's
#: feature vector at one layer (float16, mean-pooled over positions), the model's
#: prediction (-1: none) and confidence (its probability, lurker.models.probabilities). Additive; meta ``embedding`` says
#: which layer.
EMBEDDING_DDL = """
CREATE TABLE IF NOT EXISTS embedding (
    sample_id INTEGER PRIMARY KEY,
    pred      INTEGER NOT NULL,
    conf      REAL,
    features  BLOB NOT NULL
);
"""

#: The dataset map: each sample's 2-D position with its prediction and confidence.
#: Additive; meta ``map`` says the layer, method and seconds taken.
MAP_DDL = """
CREATE TABLE IF NOT EXISTS map (
    sample_id INTEGER PRIMARY KEY,
    x         REAL NOT NULL,
    y         REAL NOT NULL,
    pred      INTEGER NOT NULL,
    conf      REAL
);
"""


def has_table(conn: Any, name: str) -> bool:
    """Whether the database holds the table ``name`` (the additive ones are optional)."""
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,))
    return row.fetchone() is not None


def has_relevance_table(conn: Any) -> bool:
    """Whether the run holds relevance-max lists (probed with ``relevance=True``)."""
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='relevance'")
    return row.fetchone() is not None


def has_graph_table(conn: Any) -> bool:
    """Whether the database has the ``graph`` table (runs of version 3 and later)."""
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='graph'")
    return row.fetchone() is not None


def rf_record(rf: Any) -> dict[str, Any]:
    """The receptive-field record a run stores for a layer: exactly the shape of
    ``receptive.schema.json``, with its ``schema`` and ``version``.

    ``rf`` is an ``RF`` (anything with ``to_dict()``) or its dict, with or without the
    ``schema``/``version`` fields (a record of another version is refused). Checked here,
    field by field, so that a reader (the web explorer) can rely on the documented shape;
    raises :class:`LurkerError` naming the first field that does not fit.
    """
    if hasattr(rf, "to_dict"):
        rf = rf.to_dict()
    if not isinstance(rf, Mapping):
        raise LurkerError(f"rf must be an RF or its dict, got {type(rf).__name__}")
    if (
        rf.get("schema", RF_SCHEMA_ID) != RF_SCHEMA_ID
        or rf.get("version", RF_VERSION) != RF_VERSION
    ):
        raise LurkerError(
            f"rf is a {rf.get('schema')!r} record of version {rf.get('version')!r}; "
            f"this lurker stores {RF_SCHEMA_ID!r} version {RF_VERSION}"
        )
    extra = sorted(set(rf) - {"schema", "version", "t", "y", "x", "input_size", "full", "exact"})
    if extra:
        raise LurkerError(f"rf has unknown field(s) {extra}")
    size = _ints(rf, "input_size", low=1)
    clip = rf.get("t") is not None
    if len(size) != 2 + clip:
        want = "[D, H, W] (it has a t axis)" if clip else "[H, W]"
        raise LurkerError(f"rf input_size must be {want}, got {rf['input_size']!r}")
    record = {
        "schema": RF_SCHEMA_ID,
        "version": RF_VERSION,
        "y": _axis(rf, "y", size[-2]),
        "x": _axis(rf, "x", size[-1]),
        "input_size": size,
        "full": _bool(rf, "full"),
        "exact": _bool(rf, "exact"),
    }
    if clip:
        record["t"] = _axis(rf, "t", size[0])
    return record


def _axis(rf: Mapping[str, Any], key: str, extent: int) -> dict[str, Any]:
    axis = rf.get(key)
    if not isinstance(axis, Mapping):
        raise LurkerError(f"rf {key} must be an axis object, got {axis!r}")
    extra = sorted(set(axis) - {"size", "stride", "start", "dim", "lo", "hi"})
    if extra:
        raise LurkerError(f"rf {key} has unknown field(s) {extra}")
    where = f"rf {key}"
    dim = axis.get("dim")
    if dim is not None and (not _is_int(dim) or dim < 0):
        raise LurkerError(f"{where}.dim must be a dim index >= 0 or None, got {dim!r}")
    lo, hi = _ints(axis, "lo", where=where), _ints(axis, "hi", where=where)
    if not lo or len(lo) != len(hi) or (dim is None and len(lo) != 1):
        raise LurkerError(
            f"{where}: lo and hi need one bound per position (one for a reduced axis), got "
            f"{len(lo)} and {len(hi)}"
        )
    if any(not 0 <= a <= b <= extent for a, b in zip(lo, hi)):
        raise LurkerError(f"{where}: bounds must satisfy 0 <= lo <= hi <= {extent}")
    return {
        "size": _number(axis, "size", where, low=0),
        # negative after a flip: positions run backwards along the input
        "stride": _number(axis, "stride", where),
        "start": _number(axis, "start", where),
        "dim": None if dim is None else int(dim),
        "lo": lo,
        "hi": hi,
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _ints(d: Mapping[str, Any], key: str, *, low: int = 0, where: str = "rf") -> list[int]:
    values = d.get(key)
    if not isinstance(values, (list, tuple, np.ndarray)) or not all(
        _is_int(v) and v >= low for v in values
    ):
        raise LurkerError(f"{where}.{key} must be a list of integers >= {low}, got {values!r}")
    return [int(v) for v in values]


def _number(d: Mapping[str, Any], key: str, where: str, low: float | None = None) -> int | float:
    value = d.get(key)
    if _is_int(value):
        value = int(value)
    elif isinstance(value, (float, np.floating)) and math.isfinite(value):
        value = float(value)
    else:
        raise LurkerError(f"{where}.{key} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise LurkerError(f"{where}.{key} must be >= {low}, got {value!r}")
    return value


def _bool(d: Mapping[str, Any], key: str) -> bool:
    value = d.get(key)
    if not isinstance(value, (bool, np.bool_)):
        raise LurkerError(f"rf.{key} must be true or false, got {value!r}")
    return bool(value)


def receptive_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the receptive-field record, shipped with lurker."""
    return json.loads(_rf_schema_text())


@cache
def _rf_schema_text() -> str:
    return resources.files("lurker").joinpath("schema/receptive.schema.json").read_text("utf-8")


def to_blob(values: np.ndarray, dtype: np.dtype) -> bytes:
    """Encode a 1-D array as raw little-endian bytes of ``dtype``."""
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


def from_blob(blob: bytes | None, dtype: np.dtype) -> np.ndarray:
    """Decode a blob written by :func:`to_blob` into a native float64 array."""
    if not blob:
        return np.zeros(0, dtype=np.float64)
    return np.frombuffer(blob, dtype=dtype).astype(np.float64)


def dump_json(value: Any) -> str:
    """JSON for meta values and layer fields; strict (no NaN), so any JSON parser reads it."""
    return json.dumps(value, allow_nan=False, sort_keys=True, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")
