"""Errors the run store raises: each names the run, the cause and the fix."""

from __future__ import annotations

from lurker.errors import LurkerError


class StoreError(LurkerError):
    """Base class for run-store problems."""


class NotARunError(StoreError):
    """The path is not a lurker run directory (or its ``run.db`` is unreadable)."""


class RunExistsError(StoreError):
    """The output directory already holds a run that cannot be resumed (another model, ...)."""


class RunInUseError(StoreError):
    """Another process is writing the run (a probe into the same directory)."""


class RunIncompleteError(StoreError):
    """The run has no final results yet: the probe was interrupted or is still running."""


class SchemaVersionError(StoreError):
    """The run was written with a schema version this lurker cannot read."""

    def __init__(self, message: str, found: int, expected: int):
        super().__init__(message)
        self.found = found
        self.expected = expected


class MissingFromRunError(StoreError):
    """The run does not hold what was asked for (a run of an older schema version lacks
    the graph and the layers' op indices); the message says how to get it."""

    def __init__(self, message: str, missing: str):
        super().__init__(message)
        self.missing = missing


class _KeyMessage:
    """Mixin: print the message as-is (``KeyError`` would ``repr`` it)."""

    def __str__(self) -> str:
        args = getattr(self, "args", ())
        return str(args[0]) if args else ""


class UnknownLayerError(_KeyMessage, StoreError, KeyError):
    """No layer of the run has that name, module path or op label."""


class UnknownSampleError(_KeyMessage, StoreError, KeyError):
    """A sample id that the run does not hold."""


class UnitRangeError(StoreError, IndexError):
    """A unit index outside ``0 .. num_units - 1`` of its layer."""
