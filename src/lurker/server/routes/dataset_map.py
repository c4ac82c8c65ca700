"""``/api/runs/{run}/map``: the dataset map (every sample in 2-D), for the Map page."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request

from ..classes import model_outputs, stored_probability
from ..deps import entry
from ..errors import ApiError
from ..schemas import MapDoc

router = APIRouter(prefix="/api", tags=["map"])


def _rounded(a: np.ndarray, span: float) -> list[float]:
    """Coordinates to 1/100,000 of the map's span: finer than any screen, and short."""
    digits = max(0, int(np.ceil(5 - np.log10(max(span, 1e-12)))))
    return np.round(a.astype(np.float64), digits).tolist()


@router.get(
    "/runs/{run_id}/map",
    response_model=MapDoc,
    summary="The dataset map: every sample's 2-D position, label, prediction, confidence",
)
def dataset_map(request: Request, run_id: str) -> MapDoc:
    e = entry(request, run_id)
    run = e.open_run()
    if not run.has_map:
        raise ApiError(
            404,
            f"run {run_id!r} holds no dataset map: make one with `lurker map {run.path}` "
            "(t-SNE of the penultimate layer's features; seconds for a few thousand samples)",
        )
    m = run.map()
    n = len(m)
    if n:
        ext = [float(m.x.min()), float(m.x.max()), float(m.y.min()), float(m.y.max())]
    else:
        ext = [0.0, 0.0, 0.0, 0.0]
    span = max(ext[1] - ext[0], ext[3] - ext[2])
    outputs = model_outputs(run)
    return MapDoc(
        layer=m.meta.get("layer"),
        method=str(m.meta.get("method", "")),
        engine=m.meta.get("engine"),
        seconds=m.meta.get("seconds"),
        count=n,
        classes=list(run.classes),
        extent=ext,
        ids=m.ids.tolist(),
        x=_rounded(m.x, span),
        y=_rounded(m.y, span),
        label=m.label.tolist(),
        pred=m.pred.tolist(),
        conf=[stored_probability(v) for v in m.conf.astype(np.float32)],
        outputs=outputs,
        comparable=outputs == len(run.classes)
        if outputs is not None
        else bool(n) and int(m.pred.max()) < len(run.classes),
    )
