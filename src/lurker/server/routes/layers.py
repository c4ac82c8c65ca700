"""``/api/runs/{run}/layers/{layer}``: a layer's units in one payload (the layer grid)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from lurker.store.featviz import direction_featviz, featviz_signals, featviz_units
from lurker.vocab import words_of

from ..classes import class_names, class_units
from ..deps import entry, session
from ..schemas import (
    DirectionBrief,
    FeatureTile,
    FeatureValue,
    Histogram,
    LayerDetail,
    SignalTile,
    UnitBrief,
    UnitWeight,
)
from ..state import (
    positions_per_sample,
    signal_rf,
    signal_shape,
    signal_span,
    token_length,
    token_window,
    vector_length,
)
from .runs import layer_brief

router = APIRouter(prefix="/api", tags=["layers"])


def _f(v: float | None) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


@router.get(
    "/runs/{run_id}/layers/{layer}",
    response_model=LayerDetail,
    summary="A layer: its units' mean, max and top samples, the summed histogram",
)
def layer_detail(request: Request, run_id: str, layer: str) -> LayerDetail:
    e = entry(request, run_id)
    info = e.layer(layer)
    rows, counts = e.layer_rows(info)
    edges = e.open_run()._edges(info)
    value = class_units(e.open_run()).get(info.op or "")
    windows = _token_windows(request, e, rows, info)
    vocab = session(request, e).vocab() if windows else None
    features, features_error = session(request, e).cached(
        ("layer-features", e.generation, layer),
        lambda: _top_features(request, e, rows),
        keep=lambda made: made[1] is None,  # not a reason the dataset cannot give them
    )
    signals, signals_error = session(request, e).cached(
        ("layer-signals", e.generation, layer),
        lambda: _top_signals(request, e, rows),
        keep=lambda made: made[1] is None,
    )
    shape = signal_shape(e.open_run())
    return LayerDetail(
        layer=layer_brief(info, value),
        rf=info.rf if shape is None else signal_rf(e.open_run(), info),
        rf_reason=info.rf_reason,
        layout=info.layout,
        histogram=Histogram(
            edges=[_f(v) for v in edges.tolist()],
            counts=[] if counts is None else [_f(v) for v in counts.tolist()],
        ),
        units=[
            UnitBrief(
                unit=u,
                mean=_f(mean),
                max=_f(mx),
                top_max=tm if tm >= 0 else None,
                top_mean=tn if tn >= 0 else None,
                constant=constant,
                top_max_peak=None if peak is None else list(peak),
                top_max_span=None
                if shape is None or peak is None or tm < 0
                else signal_span(e.open_run(), info, peak[-1], shape[1]),
                top_max_tokens=windows[u][1] if u in windows else None,
                top_max_tokens_start=windows[u][0] if u in windows else None,
                top_max_token_text=(
                    words_of(windows[u][1], vocab) if u in windows and vocab is not None else None
                ),
            )
            for u, mean, mx, tm, tn, constant, peak in rows
        ],
        featviz_units=featviz_units(e.open_run(), info.name) or None,
        featviz_objectives=_featviz_objectives(e.open_run(), info.name),
        featviz_directions=_directions(e.open_run(), info.name),
        constant_units=sum(1 for row in rows if row[5]),
        class_names=class_names(e.open_run()) if value else None,
        features=features,
        features_error=features_error,
        signals=signals,
        signals_error=signals_error,
        featviz_signals=None
        if shape is None
        else session(request, e).cached(  # decoded once per layer and featviz write
            ("layer-featviz-signals", e.generation, layer, e.featviz_layers().get(info.name)),
            lambda: _featviz_tiles(e.open_run(), info.name),
        ),
    )


#: the most cells a layer tile's strip draws (bins of consecutive features beyond)
TILE_BINS = 64


def _top_tiles(
    request: Request, e: Any, rows: list[Any], tile_of: Callable[[Any, int, str | None], Any]
) -> tuple[dict[str, Any] | None, str | None]:
    """Each unit's top max sample (by sample id: units share samples) as its tile shows it
    in place of an image (``tile_of(session, sample id, path)``: a feature strip, a
    signal's plot), or why the dataset cannot give them (all or none: no tile from a
    dataset that changed)."""
    s = session(request, e)
    tops = list(dict.fromkeys(tm for _, _, _, tm, _, _, _ in rows if tm >= 0))
    tiles, why = s.read_samples(tops, lambda sid: tile_of(s, sid, e.sample_row(sid)[1]))
    if tiles is None:
        return None, why
    return {str(sid): tile for sid, tile in zip(tops, tiles, strict=True)}, None


def _top_features(
    request: Request, e: Any, rows: list[Any]
) -> tuple[dict[str, FeatureTile] | None, str | None]:
    """On a run of feature vectors: each unit's top sample's values as its tile."""
    if vector_length(e.open_run()) is None:
        return None, None
    return _top_tiles(
        request, e, rows, lambda s, sid, path: feature_tile(s.sample_features(sid, path))
    )


def _cell_starts(n: int, cells: int) -> list[int]:
    """Where each of ``cells`` runs of consecutive items of ``n`` begins, as numpy's
    array_split cuts them (the first ``n % cells`` one item longer)."""
    return [i * (n // cells) + min(i, n % cells) for i in range(cells)]


def _cells(values: list[Any], starts: list[int]) -> Iterator[list[Any]]:
    """``values`` cut at ``starts``."""
    for i, first in enumerate(starts):
        yield values[first : starts[i + 1] if i + 1 < len(starts) else len(values)]


def feature_tile(values: list[float | None], bins: int = TILE_BINS, top: int = 3) -> FeatureTile:
    """``values`` as a tile draws them: at most ``bins`` cells of consecutive features,
    each the signed value of largest |value| in it (null where one is not finite: a NaN
    is shown, not hidden by its neighbours), and the ``top`` largest by |value|."""
    n = len(values)
    starts = _cell_starts(n, min(n, bins))
    strip: list[float | None] = []
    for cell in _cells(values, starts):
        finite = [v for v in cell if v is not None]
        strip.append(None if len(finite) < len(cell) else max(finite, key=abs))
    order = sorted(range(n), key=lambda i: (values[i] is None, -abs(values[i] or 0.0), i))
    return FeatureTile(
        count=n,
        starts=starts,
        strip=strip,
        top=[FeatureValue(index=i, value=values[i]) for i in order[:top]],
    )


#: the most pixel columns a signal tile draws (each its samples' min..max beyond)
TILE_COLUMNS = 48
#: the most channels a signal tile draws (lanes of a 96-pixel tile: more would be hairs)
TILE_CHANNELS = 8


def _top_signals(
    request: Request, e: Any, rows: list[Any]
) -> tuple[dict[str, SignalTile] | None, str | None]:
    """On a run of signals: each unit's top sample's lines as its tile."""
    if signal_shape(e.open_run()) is None:
        return None, None
    return _top_tiles(
        request, e, rows, lambda s, sid, path: signal_tile(s.sample_signal(sid, path))
    )


def plotted(v: float) -> float:
    """A value to 7 significant digits (a relative error up to 5e-7, all a plot can show): a
    float64's 17 digits would more than double a signal's JSON for nothing."""
    return float(f"{v:.7g}")


def signal_tile(
    values: list[list[float | None]] | np.ndarray,
    columns: int = TILE_COLUMNS,
    channels: int = TILE_CHANNELS,
) -> SignalTile:
    """``values`` (one list per channel, or a ``(C, T)`` array) as a tile draws them: per
    channel (the first ``channels``), at most ``columns`` columns of consecutive samples
    (numpy's array_split), each its least and greatest value; null where one is not
    finite (a NaN is shown as a gap, not hidden by its neighbours)."""
    n = len(values[0]) if len(values) else 0
    starts = _cell_starts(n, max(1, min(n, columns))) if n else []
    shown = min(channels, len(values))
    if not n:
        empty: list[list[float | None]] = [[] for _ in range(shown)]
        return SignalTile(length=0, channels=len(values), starts=[], lo=empty, hi=[*empty])
    # a value that is not finite (None in lists) as NaN, which each cell's min and max keep
    rows = np.array(
        [[np.nan if v is None else v for v in row] for row in values[:channels]]
        if not isinstance(values, np.ndarray)
        else values[:channels],
        dtype=np.float64,
    )
    rows[~np.isfinite(rows)] = np.nan
    lows = np.minimum.reduceat(rows, starts, axis=1).tolist()
    highs = np.maximum.reduceat(rows, starts, axis=1).tolist()

    def cells(row: list[float]) -> list[float | None]:
        return [None if math.isnan(v) else plotted(v) for v in row]

    return SignalTile(
        length=n,
        channels=len(values),
        starts=starts,
        lo=[cells(row) for row in lows],
        hi=[cells(row) for row in highs],
    )


def _token_windows(
    request: Request, e: Any, rows: list[Any], info: Any
) -> dict[int, tuple[int, list[int]]]:
    """On a run of token ids with its dataset at hand: per unit, the tokens of its top max
    sample around the peak token (the first tokens on a layer whose positions are not the
    tokens: none, or fewer, a strided convolution's), which its tile shows in place of an
    image; none where the dataset cannot give them."""
    length = token_length(e.open_run())
    if length is None:
        return {}
    per_token = positions_per_sample(info) == length
    s = session(request, e)
    tops = list(dict.fromkeys(tm for _, _, _, tm, _, _, _ in rows if tm >= 0))
    seqs, _ = s.read_samples(tops, lambda sid: s.sample_tokens(sid, e.sample_row(sid)[1]))
    if seqs is None:  # a dataset that changed: the unit page says why; no tile guesses
        return {}
    by_id = dict(zip(tops, seqs, strict=True))
    return {
        u: token_window(by_id[tm], peak[1] if per_token and peak is not None else 0)
        for u, _, _, tm, _, _, peak in rows
        if tm >= 0
    }


def _featviz_tiles(run: Any, layer: str) -> dict[str, SignalTile] | None:
    """On a signal run: each unit's stored feature visualization as a tile draws it, so
    the grid draws lines from one document rather than a grey strip or a request per unit:
    its channel objective's, else its neuron objective's (the grid's rule for images)."""
    found = {**featviz_signals(run, layer, "neuron"), **featviz_signals(run, layer, "channel")}
    return {str(unit): signal_tile(values) for unit, values in found.items()} or None


def _featviz_objectives(run: Any, layer: str) -> dict[str, list[int]] | None:
    """The units with a stored image, per objective that names units (directions: below)."""
    found = {o: featviz_units(run, layer, o) for o in ("channel", "neuron")}
    return {o: units for o, units in found.items() if units} or None


def _directions(run: Any, layer: str) -> list[DirectionBrief] | None:
    """The directions with stored images, each with the units it weighs most (by |weight|,
    ties by unit index): what a reader needs to tell what the direction mixes."""
    out = []
    for d in direction_featviz(run, layer):
        order = sorted(range(len(d.direction)), key=lambda u: (-abs(d.direction[u]), u))
        out.append(
            DirectionBrief(
                index=d.index,
                activations=[_f(a) for a in d.activations],
                units=len(d.direction),
                top_units=[UnitWeight(unit=u, weight=d.direction[u]) for u in order[:5]],
            )
        )
    return out or None
