"""``/api/runs/{run}/map``: the dataset map (every sample in 2-D), for the Map page."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from lurker.errors import LurkerError

from ..classes import model_outputs, stored_probability
from ..deps import entry
from ..errors import ApiError
from ..schemas import MapDoc
from ..state import signal_fields, token_length

router = APIRouter(prefix="/api", tags=["map"])


def _rounded(a: np.ndarray, span: float) -> list[float]:
    """Coordinates to 1/100,000 of the map's span: finer than any screen, and short."""
    digits = max(0, int(np.ceil(5 - np.log10(max(span, 1e-12)))))
    return np.round(a.astype(np.float64), digits).tolist()


def _one_token(op: Any) -> tuple[int, int] | None:
    """``(axis, index)`` where ``op`` picks one entry of an axis after the batch by an int
    index, keeping every other axis whole (``x[:, 0]``, ``x.select(1, 0)``): how a ViT's
    head reads its class token; else None (a slice keeps them all)."""
    if op.name == "select" and len(op.args) > 2:
        axis, index = op.args[1], op.args[2]
        ok = isinstance(axis, int) and isinstance(index, int) and axis >= 1
        return (axis, index) if ok else None
    if op.name not in ("getitem", "__getitem__") or len(op.args) < 2:
        return None
    parts = op.args[1] if isinstance(op.args[1], tuple) else (op.args[1],)
    full = slice(None)
    ints = [i for i, p in enumerate(parts) if isinstance(p, int) and not isinstance(p, bool)]
    if len(ints) != 1 or ints[0] < 1 or any(p != full for p in parts[: ints[0]]):
        return None
    if any(p != full for p in parts[ints[0] + 1 :]):
        return None
    return ints[0], parts[ints[0]]


def layer_said(run: Any, layer: str | None) -> str | None:
    """What the map's layer is, where its name (an op label, ``getitem_7``) does not say:
    one entry picked off axis 1 of an op's output, ``the class token (token 0) of the
    output of vit.encoder.ln (op layer_norm_5)``, from the run's graph; None for any other
    layer or a run without its graph.

    The entry is called a token only where axis 1 is one: the run's token layers of that
    length (a token they give no patch: a class token) or its token ids; a time step where
    the signal's time runs along it (its receptive field); else by its index on the axis
    (a conv's ``(B, C, L)`` output has channels there, which "token" would misname)."""
    if not layer:
        return None
    try:
        ops = run.graph.ops
    except LurkerError:
        return None
    by_index = {o.index: o for o in ops}
    op = next((o for o in ops if o.label == layer and o.kind == "op"), None)
    picked = None if op is None else _one_token(op)
    if op is None or picked is None or not op.parents:
        return None
    parent = by_index.get(op.parents[0])
    if parent is None or len(parent.shape or ()) != 3 or picked[0] != 1:
        return None
    count = parent.shape[1]
    token = picked[1] % count
    boxes = [b for i in run.layers if isinstance(b := (i.layout or {}).get("boxes"), list)]
    boxes = [b for b in boxes if len(b) == count]
    rf = signal_fields(run).get(parent.index) or {}
    if any(b[token] is None for b in boxes):  # a token with no patch: a class token
        what = f"the class token (token {token})"
    elif boxes or token_length(run) == count:
        what = f"token {token} of {count}"
    elif (rf.get("x") or {}).get("dim") == 1 and (rf.get("y") or {}).get("dim") is None:
        last = " (the last)" if token == count - 1 else ""
        what = f"time step {token} of {count}{last}"
    else:
        what = f"entry {token} of axis 1 ({count} long)"
    where = f"{parent.module} (op {parent.label})" if parent.module else f"op {parent.label}"
    return f"{what} of the output of {where}"


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
        layer_said=layer_said(run, m.meta.get("layer")),
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
