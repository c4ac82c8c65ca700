"""Request-scoped lookups shared by the routers: the registry, a run, its session."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from .session import ModelSource, Session
from .state import Registry, RunEntry

#: Images a model makes on request (live maps, explanations, a foreign model's gradients):
#: they change when the server attaches other weights under the same URL, so the browser
#: must ask again rather than keep them for a day.
MODEL_MADE = {"Cache-Control": "no-cache"}


def range_header(v: float | None) -> str:
    """A map's min or max in an ``X-Lurker-Min``/``Max`` header: ``repr`` of the number,
    ``none`` where the map has no finite value (its JSON says null), the one convention
    of every route that draws a map, so a client tests for one word."""
    return "none" if v is None or not math.isfinite(v) else repr(v)


#: JSON of a run changes only when the run is probed again.
JSON_CACHE = {"Cache-Control": "no-cache"}


T = TypeVar("T")


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


async def on_model(s: Session, work: Callable[[], T]) -> T:
    """``work()`` run on the model's own thread (one per model), awaited: a request waiting
    for a busy model holds no worker thread, so the run-store endpoints stay fast."""
    return await asyncio.wrap_future(s.executor().submit(work))


async def live_call(request: Request, run_id: str, work: Callable[[Session], T]) -> T:
    """``work(session)`` of run ``run_id`` on its model's thread, after checking that the
    run has a model (409 naming how to attach one)."""
    s = session(request, entry(request, run_id))

    def run() -> T:
        s.model()
        return work(s)

    return await on_model(s, run)


async def cached_or_live(
    request: Request,
    run_id: str,
    cached: Callable[[Session], T | None],
    work: Callable[[Session], T],
) -> T:
    """``cached(session)`` (on a worker thread: it reads the run's ``cache/``) when it has
    the answer, without loading the model; else :func:`live_call` of ``work`` (409 naming
    how to attach a model when there is none)."""
    s = session(request, entry(request, run_id))
    hit = await run_in_threadpool(cached, s)
    if hit is not None:
        return hit
    return await live_call(request, run_id, work)
