"""``/api/runs/{run}/samples``: the dataset's samples and where each ranks in top-k lists."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from lurker.vocab import words_of

from ..classes import class_names, name_of, no_scores, stored_probability
from ..deps import entry, on_model, session
from ..errors import ApiError
from ..schemas import (
    Appearance,
    LayerCount,
    ListedSample,
    Prediction,
    SampleDetail,
    SampleModel,
    SamplePage,
    SignalDoc,
)
from ..session import Session
from ..state import channel_names
from .layers import feature_tile, plotted, signal_tile

router = APIRouter(prefix="/api", tags=["samples"])

#: The largest page of samples one request returns.
MAX_PAGE = 1000
#: A sample's top-list entries per page by default, and at most: a sample can be in the
#: top-k of thousands of units.
APPEARANCES_PAGE = 200
MAX_APPEARANCES = 2000
#: The first token ids a listed sample of a run of token ids carries (what its tile shows).
TILE_TOKENS = 16


@router.get("/runs/{run_id}/samples", response_model=SamplePage, summary="A page of samples")
def list_samples(
    request: Request,
    run_id: str,
    offset: int = Query(0, ge=0, le=2**62),
    limit: int = Query(100, ge=1, le=MAX_PAGE),
) -> SamplePage:
    e = entry(request, run_id)
    rows = e.sample_rows(offset, limit)
    # the recorded top class, for the page to mark misclassified samples as the Map does;
    # only where the outputs are the dataset's classes (else it is no label to compare)
    run = e.open_run()
    names = class_names(run)
    page = SamplePage(
        total=e.sample_count(),
        offset=offset,
        limit=limit,
        samples=[listed_sample(run, names, row) for row in rows],
    )
    s = session(request, e)
    if s.token_length() is not None:
        page.tokens_error = add_listed_tokens(s, page.samples)
    if s.vector_length() is not None:
        page.features_error = add_listed_features(s, page.samples)
    if s.signal_shape() is not None:
        page.signal_error = add_listed_signals(s, page.samples)
    return page


def add_listed_signals(s: Session, samples: list[ListedSample]) -> str | None:
    """Each listed sample's signal as a layer tile draws it (per column min..max: a page of
    1000 long recordings stays small), or why they are not at hand."""
    tiles, why = s.read_samples(samples, lambda x: signal_tile(s.sample_signal(x.id, x.path)))
    if tiles is None:
        return why
    for x, tile in zip(samples, tiles, strict=True):
        x.signal = tile
    return None


def add_listed_tokens(s: Session, samples: list[ListedSample]) -> str | None:
    """Each listed sample's first :data:`TILE_TOKENS` ids (and words, with a vocabulary),
    read from the dataset for this page only; else why not (all or none: no tile from a
    dataset that changed)."""
    firsts, why = s.read_samples(
        samples, lambda x: s.sample_tokens(x.id, x.path, first=TILE_TOKENS)
    )
    if firsts is None:
        return why
    vocab = s.vocab()
    for x, ids in zip(samples, firsts, strict=True):
        x.tokens = ids
        x.token_text = None if vocab is None else words_of(ids, vocab)
    return None


def add_listed_features(s: Session, samples: list[ListedSample]) -> str | None:
    """Each listed sample's values binned as a layer tile shows them (at most 64 cells: a
    page of 1000 samples of 500 features stays small), or why they are not at hand."""
    tiles, why = s.read_samples(samples, lambda x: feature_tile(s.sample_features(x.id, x.path)))
    if tiles is None:
        return why
    for x, tile in zip(samples, tiles, strict=True):
        x.features = tile
    return None


def listed_sample(run: Any, names: list[str], row: tuple[int, Any, Any, Any]) -> ListedSample:
    """A sample as a list of samples shows it (served, and a static export's): with the
    top class the run recorded (``pred``), to mark the misclassified as the Map page does,
    only where the model's outputs are the dataset's classes (``names``, from
    :func:`class_names`; empty otherwise: a class to compare with no label)."""
    i, path, label, cname = row
    q = run.stored_prediction(i) if names else None
    return ListedSample(
        id=i,
        path=path,
        label=label,
        class_name=cname,
        pred=None if q is None else q[0],
        pred_name=None if q is None else name_of(names, q[0]),
    )


@router.get(
    "/runs/{run_id}/samples/{sample_id}",
    response_model=SampleDetail,
    summary="One sample, the model's prediction (with a model) and the top-k lists it is in",
)
async def sample_detail(
    request: Request,
    run_id: str,
    sample_id: int = Path(ge=0, le=2**62),
    offset: int = Query(0, ge=0, le=2**62, description="first top-list entry of the page"),
    limit: int = Query(
        APPEARANCES_PAGE, ge=1, le=MAX_APPEARANCES, description="top-list entries per page"
    ),
) -> SampleDetail:
    # the run-store part in a worker thread; the prediction on the model's own thread
    detail = await run_in_threadpool(_sample_detail, request, run_id, sample_id, offset, limit)
    s = session(request, entry(request, run_id))
    if s.model_reason() is None:
        sid = detail.sample.id

        def predict() -> None:
            try:
                if s.dataset_reason() is not None:
                    raise ApiError(409, f"no dataset: {s.dataset_reason()}")
                preds = s.predictions(s.live_input(f"sample-{sid}"))
                detail.prediction = [Prediction.model_validate(p) for p in preds]
                if not preds:
                    detail.prediction_error = no_scores(s.entry.open_run())
            except ApiError as err:
                detail.prediction_error = err.detail

        await on_model(s, predict)
    if s.token_length() is not None:
        await run_in_threadpool(add_tokens, s, detail)
    if s.vector_length() is not None:
        await run_in_threadpool(add_features, s, detail)
    if s.signal_shape() is not None:
        detail.signal_error = s.dataset_reason()  # the values: its signal document
    return detail


#: the most columns a signal document is cut into (a plot wider than any screen)
MAX_SIGNAL_COLUMNS = 20_000


@router.get(
    "/runs/{run_id}/samples/{sample_id}/signal.json",
    response_model=SignalDoc,
    summary="A signal sample's values, channels first (or per column min..max)",
)
def sample_signal(
    request: Request,
    response: Response,
    run_id: str,
    sample_id: int = Path(ge=0, le=2**62),
    columns: int | None = Query(
        None,
        ge=1,
        le=MAX_SIGNAL_COLUMNS,
        description="cut each channel into at most this many columns, each its min..max",
    ),
    v: str | None = Query(
        None, description="the run's `images_version`: the answer is then cached for good"
    ),
) -> SignalDoc:
    e = entry(request, run_id)
    sid, path, _, _ = e.sample_row(sample_id)
    s = session(request, e)
    doc = signal_document(s, sid, path, columns)
    # as a sample's image: the run's token names these values for good (a run probed again
    # has another token); without it, or an earlier run's, the browser asks again
    current = v is not None and v == e.images_version and not e.changed()
    response.headers["Cache-Control"] = (
        "public, max-age=31536000, immutable" if current else "no-cache"
    )
    return doc


def signal_document(s: Session, sid: int, path: str | None, columns: int | None) -> SignalDoc:
    """Sample ``sid``'s signal document (the served endpoint and the static export's one
    file per sample): every value, or with ``columns`` each channel cut as a layer's tile
    is (:func:`~.layers.signal_tile`, all channels), rounded to 7 significant digits (a
    relative error up to 5e-7: what a plot can show)."""
    shape = s.signal_shape()
    if shape is None:
        raise ApiError(
            409, "this run's inputs are not signals (channels x time): it has no signal.json"
        )
    reason = s.dataset_reason()
    if reason is not None:
        raise ApiError(404, f"the signal of sample {sid} is not at hand: {reason}")
    values = s.sample_signal(sid, path)
    names = channel_names(s.entry.open_run())
    if columns is None:
        return SignalDoc(
            id=sid,
            length=shape[1],
            channels=shape[0],
            channel_names=names,
            values=[_plotted(row) for row in values],
        )
    tile = signal_tile(values, columns, len(values))
    return SignalDoc(
        id=sid,
        length=tile.length,
        channels=tile.channels,
        channel_names=names,
        starts=tile.starts,
        lo=tile.lo,  # (rounded as every tile is)
        hi=tile.hi,
    )


def _plotted(row: list[float | None]) -> list[float | None]:
    """A channel's values as :func:`~.layers.plotted` rounds them; None stays None."""
    return [None if v is None else plotted(v) for v in row]


def add_features(s: Session, detail: SampleDetail) -> None:
    """A feature-vector sample's values on its document, or why they are not at hand
    (the served page and the static export alike)."""
    reason = s.dataset_reason()
    if reason is None:
        try:
            detail.features = s.sample_features(detail.sample.id, detail.sample.path)
        except ApiError as err:
            reason = err.detail
    detail.features_error = reason


def add_tokens(s: Session, detail: SampleDetail) -> None:
    """A token-id sample's ids on its document, or why they are not at hand (the served
    page and the static export alike)."""
    reason = s.dataset_reason()
    if reason is None:
        try:
            detail.tokens = s.sample_tokens(detail.sample.id, detail.sample.path)
            vocab = s.vocab()
            detail.token_text = None if vocab is None else words_of(detail.tokens, vocab)
        except ApiError as err:
            reason = err.detail
    detail.tokens_error = reason


def _sample_detail(
    request: Request, run_id: str, sample_id: int, offset: int, limit: int
) -> SampleDetail:
    e = entry(request, run_id)
    sid, path, label, cname = e.sample_row(sample_id)
    run = e.open_run()
    index = e.appearances()
    left = index.left_out(sid)
    appearances = [
        Appearance(
            layer=run.layers[layer].name,
            unit=unit,
            list=("max", "mean", "relevance")[which],
            rank=rank,
            value=value if value == value and abs(value) != float("inf") else None,
        )
        for layer, unit, which, rank, value in index.of(sid, offset, limit)
    ]
    stored = run.stored_prediction(sid)
    if stored is not None and stored[1] != stored[1]:
        stored = None  # no probability recorded: nothing to show beside the class
    names = class_names(run) if stored is not None else []
    return SampleDetail(
        sample=SampleModel(id=sid, path=path, label=label, class_name=cname),
        prediction=None,
        prediction_error=None,
        stored_prediction=None
        if stored is None
        else Prediction(
            class_=stored[0],
            name=names[stored[0]] if stored[0] < len(names) else None,
            prob=stored_probability(stored[1]),
        ),
        total=index.count(sid),
        offset=offset,
        limit=limit,
        layers=[LayerCount(layer=run.layers[i].name, count=n) for i, n in index.per_layer(sid)],
        appearances=appearances,
        left_out=sum(n for _, n in left),
        left_out_layers=[LayerCount(layer=run.layers[i].name, count=n) for i, n in left],
    )
