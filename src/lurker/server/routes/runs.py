"""``/api/runs``: the served runs and each run's summary (the home page's manifest)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from lurker.vocab import per_character

from ..classes import class_units
from ..deps import entry, registry, session
from ..explained import explained_samples
from ..schemas import (
    DatasetInfo,
    Holds,
    LayerBrief,
    ModelCheck,
    ModelInfo,
    ProbeInfo,
    RunGeneration,
    RunList,
    RunListEntry,
    RunSummary,
    SkippedFile,
    TransparentImages,
)
from ..state import (
    RunEntry,
    channel_names,
    channel_range,
    feature_names,
    sample_rate,
    signal_shape,
    token_length,
    vector_length,
)

router = APIRouter(prefix="/api", tags=["runs"])

#: Skipped inputs listed in a summary (the rest are counted).
SKIPPED_LISTED = 100


def layer_brief(info: Any, class_value: str | None = None) -> LayerBrief:
    """A layer's summary; ``class_value``: what its units are of the output classes
    (``class_units``), where they are."""
    return LayerBrief(
        name=info.name,
        module=info.module,
        op=info.op,
        kind=info.kind,
        num_units=info.num_units,
        shape=list(info.shape),
        op_index=info._op_index,
        class_value=class_value,
    )


@router.get("/runs", response_model=RunList, summary="The served runs")
def list_runs(request: Request) -> RunList:
    out = []
    runs = registry(request)
    runs.refresh()  # runs made since the server started
    for run_id in list(runs.entries):
        e = runs.get(run_id)  # (opened again if probed again since)
        if e.run is None:
            out.append(RunListEntry(id=e.id, error=e.error))
            continue
        meta = e.run.meta
        cfg: dict[str, Any] = meta.get("config") or {}
        out.append(
            RunListEntry(
                id=e.id,
                model=meta.get("model"),
                spec=cfg.get("model_spec"),
                weights=cfg.get("weights"),
                dataset=meta.get("dataset"),
                created=meta.get("created"),
                status=meta.get("status"),
                layers=len(e.run.layers),
                units=sum(i.num_units for i in e.run.layers),
                samples=e.sample_count(),
                map=e.run.has_map,
            )
        )
    return RunList(runs=out)


@router.get(
    "/runs/{run_id}",
    response_model=RunSummary,
    summary="One run: model, dataset, probe settings, what it holds, its layers",
)
def run_summary(request: Request, run_id: str) -> RunSummary:
    e = entry(request, run_id)
    return summarize(request, e)


def _transparent(kept: Any) -> TransparentImages | None:
    """The run's ``transparent_images`` meta, or None where it is not a count and paths
    (not checked, or a run from before the probe kept it)."""
    if not isinstance(kept, dict) or not isinstance(kept.get("count"), int):
        return None
    return TransparentImages(
        count=kept["count"], examples=[str(p) for p in kept.get("examples") or []][:2]
    )


def _labels_ignored(kept: Any) -> str | None:
    """The reason of the run's ``labels_ignored`` meta (why its items' labels gave no
    classes), or None where there is none (labels were class indices, or an older run)."""
    reason = kept.get("reason") if isinstance(kept, dict) else None
    return reason if isinstance(reason, str) else None


def summarize(request: Request, e: RunEntry) -> RunSummary:
    run = e.open_run()
    # read before what they stand for: a token older than the summary's contents makes a
    # page look again for nothing, a newer one would hide from it what it lacks
    additions, featviz_layers = e.additions(), e.featviz_layers()
    meta = run.meta
    cfg: dict[str, Any] = meta.get("config") or {}
    has_graph = e.has_graph()
    params = ops = flops = flops_unknown = None
    if has_graph:
        graph = run.graph
        params, ops, flops = graph.num_params, graph.num_ops, graph.flops
        flops_unknown = graph.flops_unknown
    s = session(request, e)
    # a model other than the run's is said on the Home page before a live page asks for
    # it: the first summary starts loading and comparing it (on the model's thread) and
    # answers at once, `model_check` "checking" (not live) until it is done
    check = s.check_state()
    live_reason = s.model_reason()
    dataset_reason = s.dataset_reason()
    skipped = run._query("SELECT path, reason FROM skipped ORDER BY id LIMIT ?", (SKIPPED_LISTED,))
    skipped_count = run._query("SELECT count(*) FROM skipped")[0][0]
    scores = class_units(run)
    return RunSummary(
        id=e.id,
        model=ModelInfo(
            name=meta.get("model"),
            spec=cfg.get("model_spec"),
            weights=cfg.get("weights"),
            params=params,
            ops=ops,
            input_shape=cfg.get("input_shape"),
            flops=flops,
            flops_unknown=flops_unknown,
        ),
        dataset=DatasetInfo(
            spec=cfg.get("data"),
            description=meta.get("dataset"),
            size=e.sample_count(),
            classes=list(run.classes),
            skipped=[SkippedFile(path=p, reason=r) for p, r in skipped],
            skipped_count=int(skipped_count),
            transparent_images=_transparent(meta.get("transparent_images")),
            labels_ignored=_labels_ignored(meta.get("labels_ignored")),
            image_size=meta.get("image_size"),
            mean=cfg.get("mean"),
            std=cfg.get("std"),
            tokens=token_length(run),
            vocab_size=None if (v := s.vocab()) is None else len(v),
            vocab_chars=per_character(v),
            vocab_error=s.vocab_error(),
            features=vector_length(run),
            feature_names=feature_names(run),
            signal=None if (sig := signal_shape(run)) is None else list(sig),
            channel_names=channel_names(run),
            sample_rate=sample_rate(run),
            channel_range=channel_range(run),
        ),
        probe=ProbeInfo(
            k=meta.get("k"),
            hist_bins=cfg.get("hist_bins"),
            created=meta.get("created"),
            lurker_version=meta.get("lurker_version"),
            store_version=run.schema_version,
            status=meta.get("status"),
        ),
        holds=Holds(
            graph=has_graph,
            live=live_reason is None and check != "checking",
            live_reason=live_reason,
            model_check=check,
            dataset=dataset_reason is None,
            dataset_reason=dataset_reason,
            featviz=run.featviz_layers(),
            cached_images=e.cached_images(),
            map=run.has_map,
            relevance=run.has_relevance,
            explained=len(explained_samples(e.path, meta.get("model_fingerprint"))),
        ),
        missing=e.missing(),
        layers=[layer_brief(info, scores.get(info.op or "")) for info in run.layers],
        images_version=e.images_version,
        generation=e.generation,
        additions=additions,
        featviz_layers=featviz_layers,
    )


@router.get(
    "/runs/{run_id}/model-check",
    response_model=ModelCheck,
    summary="Where the check of the run's model against its recorded fingerprint stands",
)
async def model_check(
    request: Request,
    run_id: str,
    wait: float = Query(
        0.0,
        ge=0.0,
        le=60.0,
        description="seconds to wait for a check under way to end before answering",
    ),
) -> ModelCheck:
    """The model's check (the summary's ``holds.model_check``), started if need be;
    ``wait``: answered as soon as it ends, or after that many seconds, still
    ``checking`` (a page asks again). Never waits on the model's thread itself."""
    s = await run_in_threadpool(lambda: session(request, entry(request, run_id)))
    check = await run_in_threadpool(s.start_check)
    if check is not None and wait > 0 and not check.done():
        # asyncio.wait cancels nothing on timeout: the check goes on
        await asyncio.wait([asyncio.wrap_future(check)], timeout=wait)
    state = await run_in_threadpool(s.check_state)
    reason = await run_in_threadpool(s.model_reason)
    return ModelCheck(state=state, live=reason is None and state != "checking", live_reason=reason)


@router.get(
    "/runs/{run_id}/generation",
    response_model=RunGeneration,
    summary="The run's generation token: an open page polls it to notice a re-probe",
)
def run_generation(request: Request, run_id: str) -> RunGeneration:
    e = entry(request, run_id)  # (opened again if probed again since)
    status = e.run.meta.get("status") if e.run is not None else None
    return RunGeneration(
        id=e.id,
        generation=e.generation,
        status=status,
        images_version=e.images_version,
        additions=e.additions(),
        featviz_layers=e.featviz_layers(),
    )
