"""``/api/runs/{run}/layers/{layer}/units/{unit}``: one unit (Unit.to_dict and neighbours)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Request

from lurker.vocab import words_of

from ..classes import class_names, class_units
from ..deps import entry, session
from ..errors import ApiError
from ..schemas import UnitDetail
from ..state import (
    clip_frames,
    entry_frames,
    is_constant,
    positions_per_sample,
    signal_rf,
    signal_shape,
    signal_span,
    tied_tail_count,
    token_length,
    vector_length,
)

router = APIRouter(prefix="/api", tags=["units"])


@router.get(
    "/runs/{run_id}/layers/{layer}/units/{unit}",
    response_model=UnitDetail,
    summary="A unit: top-k lists, class means, histogram, previous and next unit",
)
def unit_detail(
    request: Request, run_id: str, layer: str, unit: int = Path(ge=0, le=2**31)
) -> UnitDetail:
    e = entry(request, run_id)
    info = e.layer(layer)
    index = e.unit_index(info, unit)
    run = e.open_run()
    found = run.unit(info.name, index)
    doc: dict[str, Any] = found.to_dict()
    size = run.meta.get("image_size")
    peaks = [item["value"] for item in doc["top"]["max"]]
    means = [item["value"] for item in doc["top"]["mean"]]
    positions = positions_per_sample(info)
    doc["constant"] = is_constant(found.mean, found.max, peaks, positions, means)
    k, samples = run.meta.get("k"), run.num_samples
    doc["tied_tail"] = {
        name: tied_tail_count([item["value"] for item in items], k, samples)
        for name, items in doc["top"].items()
        if items is not None and isinstance(k, int)
    }
    frames = clip_frames(run.meta.get("config") or {})
    for item in doc["top"]["max"] + doc["top"]["mean"]:  # the mean list's peaks: if stored
        item["box"] = _box(info, item["y"], item["x"], size)
        item["frame"], item["frames"] = entry_frames(info, item["y"], frames)
    if frames is not None:
        doc["clip_frames"] = frames
    length = token_length(e.open_run())
    if length is not None:
        doc["token_length"] = length
        doc["tokens_error"] = _add_tokens(session(request, e), doc)
    if vector_length(e.open_run()) is not None:
        doc["features_error"] = _add_features(session(request, e), doc)
    shape = signal_shape(e.open_run())
    if shape is not None:
        doc["signal_shape"] = list(shape)
        doc["layer"]["rf"] = signal_rf(e.open_run(), info)  # along time, whatever the axes
        for item in doc["top"]["max"] + doc["top"]["mean"]:
            item["span"] = signal_span(e.open_run(), info, item["x"], shape[1])
        doc["signal_error"] = _add_signals(session(request, e), doc)
    doc["prev"] = index - 1 if index > 0 else None
    doc["next"] = index + 1 if index + 1 < info.num_units else None
    doc["num_units"] = info.num_units
    places = _places(info, positions, signal=shape is not None, tokens=length is not None)
    doc["featviz"] = _featviz(e.open_run(), info.name, index, doc, places)
    doc["output_class"] = _output_class(e.open_run(), info, index)
    return UnitDetail.model_validate(doc)


def _add_tokens(s: Any, doc: dict[str, Any]) -> str | None:
    """Give each entry of a token run's lists its sample's token ids (the page shows the
    sequence, its peak token ``x`` marked); the reason when they cannot be had."""
    reason = s.dataset_reason()
    if reason is not None:
        return reason
    cache: dict[int, list[int]] = {}
    vocab = s.vocab()
    try:
        for entries in doc["top"].values():
            for item in entries or []:
                sid = item["sample_id"]
                if sid not in cache:
                    cache[sid] = s.sample_tokens(sid, item.get("path"))
                item["tokens"] = cache[sid]
                item["token_text"] = None if vocab is None else words_of(cache[sid], vocab)
    except ApiError as err:
        for entries in doc["top"].values():
            for item in entries or []:
                item.pop("token_text", None)
                item.pop("tokens", None)  # all or none: no list half from another dataset
        return err.detail
    return None


def _add_signals(s: Any, doc: dict[str, Any]) -> str | None:
    """Why a signal run's entries cannot be drawn (no dataset), else None. The entries
    carry their ``sample_id`` and ``span`` only: the page fetches each sample's signal
    document once (units share top samples; a unit of 18 entries over 64 x 5,000 values
    would otherwise weigh 100 MB)."""
    return s.dataset_reason()


def _add_features(s: Any, doc: dict[str, Any]) -> str | None:
    """Give each entry of a feature-vector run's lists its sample's feature values (the
    page shows them beside the unit's value); the reason when they cannot be had."""
    reason = s.dataset_reason()
    if reason is not None:
        return reason
    cache: dict[int, list[float | None]] = {}
    try:
        for entries in doc["top"].values():
            for item in entries or []:
                sid = item["sample_id"]
                if sid not in cache:
                    cache[sid] = s.sample_features(sid, item.get("path"))
                item["features"] = cache[sid]
    except ApiError as err:
        for entries in doc["top"].values():
            for item in entries or []:
                item.pop("features", None)  # all or none: no list half from another dataset
        return err.detail
    return None


def _output_class(run: Any, info: Any, unit: int) -> dict[str, Any] | None:
    """The class the unit stands for, where its layer is the model's output classes."""
    value = class_units(run).get(info.op or "")
    names = class_names(run)
    if value is None or not 0 <= unit < len(names):
        return None
    return {"class": unit, "name": names[unit], "value": value}


def _featviz(
    run: Any, layer: str, unit: int, doc: dict[str, Any], places: str
) -> dict[str, Any] | None:
    from lurker.store.featviz import unit_featviz

    found = unit_featviz(run, layer, unit)
    if found is None:
        return None
    views = []
    for objective in found.objectives:
        one = found if objective == found.objective else unit_featviz(run, layer, unit, objective)
        if one is None:  # written away between the two reads
            continue
        # the channel objective is the map's mean: its dataset counterpart is the mean
        # list's best; a neuron's (one position) is not, so it gets none
        top = doc["top"]["mean"]
        best = top[0] if top and objective == "channel" else None
        views.append(
            {
                "objective": objective,
                "meaning": _meaning(objective, one.settings, places),
                "activations": one.activations,
                "settings": one.settings,
                "best_dataset": best["value"] if best else None,
                "best_sample": best["sample_id"] if best else None,
                **_featviz_signals(run, layer, unit, objective, one),
            }
        )
    first = next((v for v in views if v["objective"] == found.objective), views[0])
    return {**first, "objectives": [v["objective"] for v in views], "views": views}


def _featviz_signals(run: Any, layer: str, unit: int, objective: str, one: Any) -> dict[str, Any]:
    """A signal run's stored signals of the unit, per copy, and the span each one's peak
    sees (``signals``, ``spans``); nothing for images."""
    if one.settings.get("input") != "signal":
        return {}
    from lurker.store.featviz import featviz_signal

    info = run.layer(layer)
    peaks = one.settings.get("peaks") or []
    # the neuron objective's signals are made for one position: the span shaded is what
    # that position sees (recorded with them), wherever each signal happens to peak
    neuron = objective == "neuron" and "span" in one.settings
    signals, spans = [], []
    for copy in range(len(one.activations)):
        values = featviz_signal(run, layer, unit, copy, objective)
        signals.append(values or [])
        if neuron:
            spans.append(one.settings["span"])
            continue
        peak = peaks[copy] if copy < len(peaks) else None
        length = len(values[0]) if values else 0
        spans.append(signal_span(run, info, peak, length) if peak is not None else None)
    return {"signals": signals, "spans": spans}


def _places(info: Any, positions: int, *, signal: bool, tokens: bool) -> str:
    """What a unit's per-sample mean is over, as the pages word it (web/src/images.ts
    ``layerPlaces``): "its map", "its 17 tokens" (a ViT's: a class token is no place of a
    map), "its time steps"; "" for a layer of one value per unit and sample."""
    if positions <= 1:
        return ""
    if tokens or (not info.rf and isinstance((info.layout or {}).get("boxes"), list)):
        return f"its {positions} tokens"
    return "its time steps" if signal else "its map"


def _meaning(objective: str, settings: dict[str, Any], places: str = "its map") -> str:
    """What an objective's images maximize, in words (the unit page's label); ``places``:
    what the channel objective's mean is over (:func:`_places`)."""
    if objective == "channel":
        if not places:  # one value per sample: no mean to take
            return "the unit's value (the value the probe ranks by)"
        return f"the unit's mean over {places} (the value the probe ranks by)"
    if objective == "neuron":
        pos = settings.get("position")
        token = settings.get("token")
        if token is not None and pos:  # a token layer: a patch token, by its grid place
            return f"the unit at token {token}, the patch at (row, column) = ({pos[0]}, {pos[1]})"
        if pos and len(pos) == 1:  # a signal's map: one step along time
            span = settings.get("span")
            seen = f" (it sees input samples {span[0]}-{span[1] - 1})" if span else ""
            return f"the unit at step t = {pos[0]} of its map along time{seen}"
        at = f"position (y, x) = ({pos[0]}, {pos[1]})" if pos else "one position"
        return f"the unit at {at} of its map"
    return objective


def _box(info: Any, y: int | None, x: int | None, size: list[int] | None) -> list[int] | None:
    """The input box the peak sees, or None where it has none."""
    if y is None or x is None or not size or len(size) < 2:
        return None
    from lurker.probe.layout import position_box

    try:
        box = position_box(info.layout, info.rf, y, x, (int(size[-2]), int(size[-1])))
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return None if box is None else [int(v) for v in box]
