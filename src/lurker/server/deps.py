"""Request-scoped lookups shared by the routers: the registry, a run, its session."""

from __future__ import annotations

from fastapi import Request

from .session import ModelSource, Session
from .state import Registry, RunEntry

#: Cache header of images that never change for a run (sample images, unit images).
IMMUTABLE = {"Cache-Control": "public, max-age=86400"}
#: JSON of a run changes only when the run is probed again.
JSON_CACHE = {"Cache-Control": "no-cache"}


def registry(request: Request) -> Registry:
    return request.app.state.registry  # type: ignore[no-any-return]


def entry(request: Request, run_id: str) -> RunEntry:
    """The served run ``run_id`` (404 listing the runs)."""
    return registry(request).get(run_id)


def session(request: Request, run_entry: RunEntry) -> Session:
    """The run's session (dataset, model, live state), made on first use."""
    source: ModelSource = request.app.state.source
    with run_entry._lock:
        if run_entry.session is None:
            run_entry.session = Session(run_entry, source)
        return run_entry.session
