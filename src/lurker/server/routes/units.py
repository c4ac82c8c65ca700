"""``/api/runs/{run}/layers/{layer}/units/{unit}``: one unit (Unit.to_dict and neighbours)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Request

from ..deps import entry
from ..schemas import UnitDetail
from ..state import is_constant, positions_per_sample

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
    found = e.open_run().unit(info.name, index)
    doc: dict[str, Any] = found.to_dict()
    size = e.open_run().meta.get("image_size")
    peaks = [item["value"] for item in doc["top"]["max"]]
    means = [item["value"] for item in doc["top"]["mean"]]
    positions = positions_per_sample(info)
    doc["constant"] = is_constant(found.mean, found.max, peaks, positions, means)
    for item in doc["top"]["max"]:
        item["box"] = _box(info, item["y"], item["x"], size)
    doc["prev"] = index - 1 if index > 0 else None
    doc["next"] = index + 1 if index + 1 < info.num_units else None
    doc["num_units"] = info.num_units
    doc["featviz"] = _featviz(e.open_run(), info.name, index, doc)
    return UnitDetail.model_validate(doc)


def _featviz(run: Any, layer: str, unit: int, doc: dict[str, Any]) -> dict[str, Any] | None:
    from lurker.store.featviz import unit_featviz

    found = unit_featviz(run, layer, unit)
    if found is None:
        return None
    # the channel objective is the map's mean: its dataset counterpart is the mean list's
    # best; a neuron's (one position) is not, so it gets none
    best = doc["top"]["mean"][0] if doc["top"]["mean"] and found.objective == "channel" else None
    return {
        "objective": found.objective,
        "objectives": found.objectives,
        "activations": found.activations,
        "settings": found.settings,
        "best_dataset": best["value"] if best else None,
        "best_sample": best["sample_id"] if best else None,
    }


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
