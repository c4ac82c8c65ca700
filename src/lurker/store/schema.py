"""The run store's on-disk schema (version :data:`SCHEMA_VERSION`), shared by writer and reader.

docs/run-store.md documents every table and column; keep the two in sync. Any change
that an older reader could misread (a renamed or retyped column, a new blob encoding)
must bump :data:`SCHEMA_VERSION`; purely additive changes that old readers ignore
(a new index, a new meta key) need not.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

#: Stored in ``PRAGMA user_version`` and in ``meta.schema_version``. Version 2 keeps a
#: unit's top-k lists in its ``units`` row (``top`` blob) instead of a row per entry.
SCHEMA_VERSION = 2

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
    return any(row[1] == "layout" for row in conn.execute("PRAGMA table_info(layers)"))


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
    layout     TEXT
);
CREATE INDEX layers_by_module ON layers(module);
CREATE INDEX layers_by_op ON layers(op);
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
