"""The run store: the on-disk format of a ``lurker probe`` run (see docs/run-store.md).

A run is a directory holding ``run.db`` (SQLite, readable with plain ``sqlite3``), a
resumable ``checkpoint.pt`` while the probe runs, and a ``cache/`` of lazily made
images. :class:`RunWriter` writes it atomically; :class:`Run` reads it without the model.
"""

from lurker.store.errors import (
    MissingFromRunError,
    NotARunError,
    RunExistsError,
    RunIncompleteError,
    RunInUseError,
    SchemaVersionError,
    StoreError,
    UnitRangeError,
    UnknownLayerError,
    UnknownSampleError,
)
from lurker.store.featviz import StoredFeatViz, write_featviz
from lurker.store.files import atomic_write_bytes, run_lock
from lurker.store.run import LayerInfo, Run, Sample, TopEntry, Unit
from lurker.store.schema import SCHEMA_VERSION, receptive_json_schema
from lurker.store.writer import LayerResult, RunWriter

__all__ = [
    "SCHEMA_VERSION",
    "LayerInfo",
    "LayerResult",
    "MissingFromRunError",
    "NotARunError",
    "Run",
    "RunExistsError",
    "RunIncompleteError",
    "RunInUseError",
    "RunWriter",
    "Sample",
    "SchemaVersionError",
    "StoreError",
    "StoredFeatViz",
    "TopEntry",
    "Unit",
    "UnitRangeError",
    "UnknownLayerError",
    "UnknownSampleError",
    "atomic_write_bytes",
    "receptive_json_schema",
    "run_lock",
    "write_featviz",
]
