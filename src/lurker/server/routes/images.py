"""PNG endpoints of a run: sample images and the images of units' top-k entries.

Served from the run's ``cache/``; made on first request (sample images and the crops of
entries whose peak the run stores from the dataset alone; gradients, and the mean-list
crops of runs that stored no peaks for that list, with the model) and cached.
"""

from __future__ import annotations

import os
from pathlib import Path as FsPath
from typing import Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from lurker.store.files import UNKNOWN_ORIGIN

from ..deps import entry, live_call, on_model, session
from ..errors import ApiError, wrong_model
from ..schemas import EntryPeaks
from ..session import Session
from ..state import RunEntry, clip_frames, entry_frames, unrecorded_frame
from . import made_png, png_get

router = APIRouter(prefix="/api", tags=["images"])


#: Images of a run's samples and of its units' top-k entries: the same URL names another
#: image once the run is probed again (other lists, another dataset or image size), so the
#: browser asks again each time; an unchanged file answers 304 (its ETag).
REVALIDATE = {"Cache-Control": "no-cache"}
#: The same images asked for with the run's current ``?v=`` token (its summary's
#: ``images_version``): that URL names this image for good (a run probed again has another
#: token), so the browser keeps it without asking again, a year.
IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}

VERSION = Query(
    None,
    description="the run's `images_version` (its summary): the answer is then cached for "
    "good (`immutable`); without it, or with an earlier run's, it is revalidated (ETag)",
)


def png_response(
    found: bytes | FsPath, request: Request | None = None, run: RunEntry | None = None
) -> Response:
    """A cached file (with an ETag of the file itself: 304 when ``request`` already holds
    it; immutable when ``request`` carries ``run``'s current ``images_version``) or PNG
    bytes a foreign model made (kept in memory, not the run's)."""
    if isinstance(found, bytes):
        return made_png(found)
    # opened once, its size, ETag and bytes all read from that one file: the cache may be
    # written again (a re-probe, the file's own lazy maker) or deleted between a stat and
    # a later open, and a Content-Length of one file with the bytes of another breaks the
    # image (ERR_CONTENT_LENGTH_MISMATCH). The PNGs are small.
    try:
        with open(found, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        raise ApiError(
            404, f"{found.name} was deleted from the run's cache while it was asked for: reload"
        ) from None
    # the file itself (inode, mtime to the nanosecond, size): Starlette's own ETag uses
    # the mtime in float seconds and the size, which two different PNGs may share
    etag = f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'
    asked = request.query_params.get("v") if request is not None else None
    current = (
        run is not None
        and asked is not None
        and asked == run.images_version
        and not run.changed()  # probed again since the lookup: this may be the old image
    )
    headers = {**(IMMUTABLE if current else REVALIDATE), "ETag": etag}
    if request is not None and request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="image/png", headers=headers)


@png_get(router, "/runs/{run_id}/samples/{sample_id}/image.png", "The sample as the model saw it")
def sample_image(
    request: Request,
    run_id: str,
    sample_id: int = Path(ge=0, le=2**62),
    v: str | None = VERSION,
) -> Response:
    return _sample_image(request, run_id, sample_id)


def _sample_image(request: Request, run_id: str, sample_id: int) -> Response:
    return _sample_png(request, run_id, sample_id, None)


def _sample_png(request: Request, run_id: str, sample_id: int, frame: int | None) -> Response:
    """A sample's image (``frame`` None) or one frame of a clip: from the cache, else made
    from the dataset, else a 404 that says why it cannot be."""
    e = entry(request, run_id)
    sid, path, _, _ = e.sample_row(sample_id)
    s = session(request, e)
    target = s.sample_file(sid) if frame is None else s.frame_file(sid, frame)
    if target.is_file() and target.stat().st_size > 0:
        return png_response(target, request, e)
    reason = s.dataset_reason()
    if reason is not None:
        what = f"the image of sample {sid}" if frame is None else f"frame {frame} of sample {sid}"
        raise ApiError(404, f"{what} is not cached and cannot be made: {reason}. {_cache_hint(s)}")
    made = s.sample_png(sid, path) if frame is None else s.frame_png(sid, path, frame)
    return png_response(made, request, e)


@png_get(
    router,
    "/runs/{run_id}/samples/{sample_id}/frames/{frame}.png",
    "One frame of a video clip sample, as the model saw it",
)
def frame_image(
    request: Request,
    run_id: str,
    sample_id: int = Path(ge=0, le=2**62),
    frame: int = Path(ge=0, le=2**31),
    v: str | None = VERSION,
) -> Response:
    return _frame_image(request, run_id, sample_id, frame)


def _frame_image(request: Request, run_id: str, sample_id: int, frame: int) -> Response:
    return _sample_png(request, run_id, sample_id, frame)


@png_get(
    router,
    "/runs/{run_id}/layers/{layer}/units/{unit}/featviz/{objective}/{copy}.png",
    "A feature visualization of the unit (stored in the run by `lurker featviz`)",
)  # declared before the entry images' route, whose /{which}/{rank}/{kind}.png matches it too
def featviz_image(
    request: Request,
    run_id: str,
    layer: str,
    objective: str,
    unit: int = Path(ge=0, le=2**31),
    copy: int = Path(ge=0, le=2**31),
) -> Response:
    e = entry(request, run_id)
    info = e.layer(layer)
    e.unit_index(info, unit)
    return _featviz_response(e, info.name, unit, copy, objective)


@png_get(
    router,
    "/runs/{run_id}/layers/{layer}/featviz/direction/{index}/{copy}.png",
    "A feature visualization of a direction in the layer's units (by its index)",
)
def direction_image(
    request: Request,
    run_id: str,
    layer: str,
    index: int = Path(ge=0, le=2**31),
    copy: int = Path(ge=0, le=2**31),
) -> Response:
    e = entry(request, run_id)
    # a direction's index is not a unit: not checked against the unit count
    return _featviz_response(e, e.layer(layer).name, index, copy, "direction")


def _featviz_response(e: RunEntry, layer: str, index: int, copy: int, objective: str) -> Response:
    """A stored feature visualization's PNG, or a 404 that says what the run lacks."""
    from lurker.store import MissingFromRunError
    from lurker.store.featviz import featviz_png

    try:
        png = featviz_png(e.open_run(), layer, index, copy, objective)
    except MissingFromRunError as err:
        raise ApiError(404, str(err)) from None
    # `lurker featviz` may write the layer again: revalidate rather than keep a day
    return made_png(png)


@png_get(
    router,
    "/runs/{run_id}/layers/{layer}/units/{unit}/{which}/{rank}/{kind}.png",
    "An image of one top-k entry: the input, its crop, the gradient, its crop",
)
async def unit_image(
    request: Request,
    run_id: str,
    layer: str,
    which: Literal["max", "mean"],
    kind: Literal["input", "crop", "grad", "grad_crop"],
    unit: int = Path(ge=0, le=2**31),
    rank: int = Path(ge=0, le=2**31),
    v: str | None = VERSION,
) -> Response:
    # the lookups and cached files in a worker thread; model work on the model's thread
    found = await run_in_threadpool(_unit_image, request, run_id, layer, which, kind, unit, rank)
    if isinstance(found, Response):
        return found
    s, name = found
    made = await on_model(s, lambda: s.model_image(kind, name, unit, rank, which))
    return png_response(made, request, s.entry)


@router.get(
    "/runs/{run_id}/layers/{layer}/units/{unit}/{which}/peaks",
    response_model=EntryPeaks,
    summary="Where the unit peaks on each entry of a top list (as stored; an older run's mean "
    "list: with the model)",
)
async def entry_peaks(
    request: Request,
    run_id: str,
    layer: str,
    which: Literal["max", "mean"],
    unit: int = Path(ge=0, le=2**31),
) -> EntryPeaks:
    e = entry(request, run_id)
    info = e.layer(layer)
    e.unit_index(info, unit)
    entries = await run_in_threadpool(lambda: e.open_run().unit(info.name, unit).top(which))
    stored = [[t.y, t.x] for t in entries if t.y is not None and t.x is not None]
    if len(stored) == len(entries):  # all in the run: no model needed
        peaks: list[list[int]] = stored
    else:
        found = await live_call(request, run_id, lambda s: s.entry_peaks(info.name, unit, which))
        peaks = [list(p) for p in found]
    frames = clip_frames(e.open_run().meta.get("config") or {})
    shown = (
        [entry_frames(info, y, frames)[0] for y, _ in peaks]
        if unrecorded_frame(info, frames)
        else None
    )
    return EntryPeaks(which=which, peaks=peaks, frames=shown)


def _unit_image(
    request: Request, run_id: str, layer: str, which: str, kind: str, unit: int, rank: int
) -> Response | tuple[Session, str]:
    e = entry(request, run_id)
    info = e.layer(layer)
    e.unit_index(info, unit)
    entries = e.open_run().unit(info.name, unit).top(which)
    if not rank < len(entries):
        raise ApiError(
            404,
            f"no rank {rank} in the {which!r} list of {info.name} unit {unit}: it has "
            f"{len(entries)} entries (ranks 0..{len(entries) - 1})",
        )
    top = entries[rank]
    s = session(request, e)
    if kind == "input":
        # a video model's layer: the frame of the peak (its box is drawn on it)
        frame, _ = entry_frames(info, top.y, s.clip_frames())
        if frame is not None:
            return _frame_image(request, run_id, top.sample_id, frame)
        # an older run's mean list stores no peak: its frame is found with the model (as
        # its crop's); without one, the clip's middle frame, as the page says
        if (
            top.y is None
            and unrecorded_frame(info, s.clip_frames())
            and s.model_reason() is None
            and s.dataset_reason() is None
        ):
            return s, info.name
        return _sample_image(request, run_id, top.sample_id)
    target = s.unit_file(kind, info.name, unit, which, rank)
    stored = kind == "crop" and top.y is not None and top.x is not None  # the peak is in the run
    # a model's image is served only when the cache says the run's model made it
    trusted = stored or s.cache_trusted()
    cached = target.is_file() and target.stat().st_size > 0
    if cached and trusted:
        return png_response(target, request, e)
    if stored and s.dataset_reason() is None:
        found = s.crop_png(info, unit, rank, top.sample_id, top.y, top.x, top.path, which)
        return png_response(found, request, e)
    model_reason, data_reason = s.model_reason(), s.dataset_reason()
    if model_reason is None and data_reason is None:
        return s, info.name
    if s.mismatch is not None:  # a model is attached, but not the run's: said as the model's
        raise wrong_model(e.id, s.mismatch)  # endpoints say it, whatever was asked first
    why = model_reason or data_reason
    if cached:  # there, but of unknown origin: not shown as the run's model's
        raise ApiError(
            404,
            f"the {kind} image of {info.name} unit {unit} ({which} list, rank {rank}) in the "
            f"run's cache was {UNKNOWN_ORIGIN}; making it again needs the model and the "
            f"dataset ({why}). {_cache_hint(s, kind)}",
        )
    serve = (
        "Serve the run with `lurker serve RUN --model SPEC --weights WEIGHTS`, or "
        if data_reason is None
        else ""
    )
    raise ApiError(
        404,
        f"the {kind} image of {info.name} unit {unit} ({which} list, rank {rank}) is not "
        f"cached, and making it needs the model and the dataset ({why}). {serve}"
        f"{_cache_hint(s, kind)}",
    )


def _cache_hint(s: Session, kind: str = "grad") -> str:
    """How to cache a run's images of ``kind``: the CLI for runs that record their model
    and data, Python for runs probed from Python (the CLI cannot rebuild their dataset).
    Crop files are made only when asked for (``--kinds``), so those ask for them."""
    crops = kind in ("crop", "grad_crop")
    if s.config.get("data") and s.config.get("model_spec"):
        asked = " --kinds crop,grad_crop" if crops else ""
        return f"Cache the images of the units' top samples with `lurker images RUN{asked}`"
    asked = "kinds=['crop', 'grad_crop']" if crops else ""
    return (
        "The run was probed from Python: cache its images with "
        f"`lurker.probe.UnitImages(run, model=model, dataset=dataset).write_all({asked})`, or "
        "serve it with `create_app(run, model_obj=model, dataset=dataset)`"
    )
