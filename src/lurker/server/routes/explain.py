"""``/api/runs/{run}/live/{image}/explain``: why the model decided this, per method.

Each method of :data:`lurker.explain.METHODS` explains the current live image (an upload
or ``sample-N``) for a target: a class index, ``top`` (the top predicted class) or a unit
``LAYER:CHANNEL``. One attribution per (image, method, target, layer) is computed, off
the event loop (FastAPI runs these sync endpoints in worker threads) under the model's
lock, and kept in a small LRU, so the page's PNG and JSON requests and a later opacity
or overlay change cost no recomputation.

The heatmap is the attribution summed over the input's channels (``Explanation.heatmap``),
coloured as :func:`lurker.explain.overlay.colorize` does: scaled by ``max |heatmap|`` (one
scale for both signs), signed methods blue-white-red, unsigned ones black-red-yellow, with
opacity ``|heatmap| / max |heatmap|``. ``overlay=0`` serves that as RGBA (the page stacks
it over the image); the default draws it over the image as the model sees it.
"""

from __future__ import annotations

import inspect
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from lurker.errors import LurkerError

from ..deps import IMMUTABLE, entry
from ..errors import ApiError
from ..schemas import ExplainMethod, ExplainMethods, ExplainResult
from ..session import Session
from .live import PNG, _image_id, _live

router = APIRouter(prefix="/api", tags=["explain"])

#: Heatmaps smaller than this (pixels, longer side) are upscaled by nearest neighbour.
MIN_PX = 224
#: Attributions kept per served run (a 224x224 heatmap is 200 KB).
CACHED = 64


@dataclass
class Result:
    """One attribution, reduced to what the endpoints serve."""

    heat: Any  # (H, W) float32 tensor on the CPU
    signed: bool
    target: str
    target_class: int | None
    layer: str | None
    delta: float | None
    options: dict[str, Any]
    seconds: float


class ExplainCache:
    """LRU of :class:`Result` by (image, method, target, layer)."""

    def __init__(self, size: int = CACHED) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str, str, str], Result] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str, str]) -> Result | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key: tuple[str, str, str, str], value: Result) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


_caches_lock = threading.Lock()


def _cache(s: Session) -> ExplainCache:
    with _caches_lock:
        cache = getattr(s, "explain_cache", None)
        if cache is None:
            cache = s.explain_cache = ExplainCache()  # type: ignore[attr-defined]
        return cache


def _methods() -> dict[str, Any]:
    import lurker.explain as xp

    return xp.METHODS


def _needs_layer(cls: Any) -> bool:
    params = inspect.signature(cls.compute).parameters
    return "layer" in params and params["layer"].kind is inspect.Parameter.KEYWORD_ONLY


def _spatial_layers(s: Session) -> list[str]:
    run = s.entry.open_run()
    return [
        info.name
        for info in run.layers
        if info.shape is not None and len(info.shape) == 3 and info.shape[1] * info.shape[2] > 1
    ]


def _default_layer(s: Session, target: str) -> str | None:
    """A layer method's layer when none is asked: the run's last probed spatial layer, or
    for a unit target of a probed layer the last one at or before that layer (the target
    must depend on the layer)."""
    layers = _spatial_layers(s)
    names = [i.name for i in s.entry.open_run().layers]
    unit_layer = target.strip().rsplit(":", 1)[0] if ":" in target else None
    while unit_layer is not None and unit_layer not in names and ":" in unit_layer:
        unit_layer = unit_layer.rsplit(":", 1)[0]  # LAYER:CHANNEL:Y:X
    if unit_layer in names:
        upto = names.index(unit_layer)
        layers = [n for n in layers if names.index(n) <= upto]
    return layers[-1] if layers else None


def _model_name(s: Session, model: Any, name: str) -> str:
    """A run layer name as the explain package names layers: its module path when the
    model has that module, else its op's trace label; any other name is passed on."""
    run = s.entry.open_run()
    info = next((i for i in run.layers if i.name == name), None)
    if info is None:
        return name
    modules = dict(model.named_modules())
    if info.module and info.module in modules:
        return info.module
    return info.op or name


def _options(method: str, x: Any) -> dict[str, Any]:
    """The server's options per method: deterministic (a seeded SmoothGrad, so the cache
    and a recomputation agree) and bounded in cost (about 15x15 occlusion windows at any
    input size)."""
    if method == "smoothgrad":
        return {"seed": 0}
    if method == "occlusion":
        side = min(int(x.shape[-2]), int(x.shape[-1]))
        window = max(2, round(side / 8))
        return {"window": window, "strides": max(1, window // 2)}
    return {}


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(i) for i in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(i) for k, i in v.items()}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return repr(v)


def _explained(
    request: Request, run_id: str, image: str, method: str, target: str, layer: str | None
) -> tuple[Session, Result, bool]:
    """The attribution (cached), or the error that says what is wrong."""
    s = _live(request, run_id)
    image = _image_id(image)
    methods = _methods()
    cls = methods.get(method)
    if cls is None:
        raise ApiError(
            404, f"unknown explanation method {method!r}; supported: {', '.join(methods)}"
        )
    if layer is not None and not _needs_layer(cls):
        raise ApiError(
            400,
            f"method {method!r} explains at the input and takes no layer; the methods with a "
            "layer: " + ", ".join(n for n, c in methods.items() if _needs_layer(c)),
        )
    if layer is None and _needs_layer(cls):
        layer = _default_layer(s, target)
    key = (image, method, target.strip(), layer or "")
    cache = _cache(s)
    hit = cache.get(key)
    if hit is not None:
        return s, hit, True
    x = s.live_input(image)
    model = s.model()
    with s.model_lock:
        hit = cache.get(key)  # computed by a request that held the lock before this one
        if hit is not None:
            return s, hit, True
        result = _compute(s, model, x, method, target, layer)
        cache.put(key, result)
    return s, result, False


def _compute(s: Session, model: Any, x: Any, method: str, target: str, layer: str | None) -> Result:
    import torch

    import lurker.explain as xp
    from lurker.explain.base import untouched
    from lurker.explain.cli import parse_target
    from lurker.explain.targets import Forward, UnitTarget

    try:
        parsed = parse_target(target)
    except LurkerError as e:
        raise ApiError(400, str(e).replace("--target", "target")) from None
    asked = parsed
    if isinstance(parsed, UnitTarget):
        parsed = UnitTarget(_model_name(s, model, parsed.layer), parsed.channel, parsed.y, parsed.x)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    xb = x.unsqueeze(0).to(device)
    options = _options(method, x)
    if layer is not None:
        options["layer"] = _model_name(s, model, layer)
    # layers named (Grad-CAM's, a unit target's) checked first: a name not in the model
    # is a 404 with the explain package's message
    taps = [options["layer"]] if "layer" in options else []
    try:
        with untouched(model):
            Forward(model, xb, parsed, layers=taps)
    except LurkerError as e:
        raise ApiError(404, str(e)) from None
    start = time.perf_counter()
    try:
        ex = xp.explain(model, xb, target=parsed, method=method, **options)
    except LurkerError as e:
        raise ApiError(400, str(e)) from None
    except Exception as e:  # the model's own error, said in one line
        raise ApiError(400, f"{method} failed on this image: {type(e).__name__}: {e}") from None
    seconds = time.perf_counter() - start
    heat = ex.heatmap(0).float().cpu()
    if isinstance(ex.target, UnitTarget):
        resolved, cls = str(asked), None  # as asked: the run's layer name
    else:
        cls = int(ex.target[0])
        resolved = str(cls)
    delta = None if ex.delta is None else float(ex.delta.reshape(-1)[0])
    return Result(
        heat=heat,
        signed=bool(ex.signed),
        target=resolved,
        target_class=cls,
        layer=layer,
        delta=delta,
        options=_jsonable(ex.options),
        seconds=seconds,
    )


def _scale(shape: tuple[int, ...]) -> int:
    longest = max(shape) if shape else 1
    return math.ceil(MIN_PX / longest) if longest < MIN_PX else 1


def heat_rgba(heat: Any, signed: bool) -> np.ndarray:
    """The bare heatmap ``(H, W, 4)`` uint8: colorize's colour and opacity."""
    from lurker.explain.overlay import colorize

    rgb, alpha = colorize(heat, signed)
    rgba = np.concatenate([rgb.numpy(), alpha.numpy()[None]], 0).transpose(1, 2, 0)
    return np.rint(np.clip(rgba, 0, 1) * 255).astype(np.uint8)


def _stats(heat: Any) -> tuple[float, float, float]:
    h = heat.double()
    fin = h[h.isfinite()]
    if not fin.numel():
        return math.nan, math.nan, math.nan
    return float(fin.min()), float(fin.max()), float(fin.sum())


@router.get(
    "/runs/{run_id}/explain/methods",
    response_model=ExplainMethods,
    summary="The attribution methods the Explain page can show, and the layers to explain at",
)
def methods(request: Request, run_id: str) -> ExplainMethods:
    from ..deps import session

    s = session(request, entry(request, run_id))
    layers = _spatial_layers(s)
    return ExplainMethods(
        methods=[
            ExplainMethod(
                name=name, summary=cls.summary, needs_layer=_needs_layer(cls), signed=cls.signed
            )
            for name, cls in _methods().items()
        ],
        default_layer=layers[-1] if layers else None,
        layers=layers,
    )


TARGET = Query(
    "top",
    max_length=500,
    description="a class index, 'top' (the top predicted class) or a unit LAYER:CHANNEL "
    "(LAYER:CHANNEL:Y:X for one position)",
)
LAYER = Query(
    None,
    max_length=500,
    description="the layer of a layer method (Grad-CAM): a run layer name, module path or "
    "trace label; default the run's last probed spatial layer",
)


@router.get(
    "/runs/{run_id}/live/{image}/explain/{method}.png",
    response_class=Response,
    responses=PNG,
    summary="One method's heatmap over the image (overlay=0: the bare heatmap, RGBA)",
)
def explain_png(
    request: Request,
    run_id: str,
    image: str,
    method: str,
    target: str = TARGET,
    layer: str | None = LAYER,
    overlay: bool = Query(True, description="draw over the image (false: RGBA heatmap alone)"),
    opacity: float = Query(0.5, ge=0, le=1, description="the strongest attribution's opacity"),
) -> Response:
    from PIL import Image

    from lurker.explain.overlay import overlay as draw
    from lurker.probe.images import _png

    s, r, _ = _explained(request, run_id, image, method, target, layer)
    if overlay:
        pil = draw(r.heat, s.input_pil(image), signed=r.signed, alpha=opacity)
    else:
        pil = Image.fromarray(heat_rgba(r.heat, r.signed), "RGBA")
    scale = _scale(tuple(r.heat.shape))
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    lo, hi, _ = _stats(r.heat)
    headers = {
        **IMMUTABLE,
        "X-Lurker-Scale": str(scale),
        "X-Lurker-Min": repr(lo),
        "X-Lurker-Max": repr(hi),
        "X-Lurker-Target": r.target,
        "Access-Control-Expose-Headers": "X-Lurker-Scale, X-Lurker-Min, X-Lurker-Max, "
        "X-Lurker-Target",
    }
    return Response(_png(pil), media_type="image/png", headers=headers)


# registered after the PNG: "{method}" without a suffix would take "x.png"
@router.get(  # the same without ".json", as the client names JSON documents
    "/runs/{run_id}/live/{image}/explain/{method}",
    response_model=ExplainResult,
    include_in_schema=False,
)
@router.get(
    "/runs/{run_id}/live/{image}/explain/{method}.json",
    response_model=ExplainResult,
    summary="One method's attribution of the image: target resolved, min/max/sum, delta, options",
)
def explain_json(
    request: Request,
    run_id: str,
    image: str,
    method: str,
    target: str = TARGET,
    layer: str | None = LAYER,
) -> ExplainResult:
    s, r, cached = _explained(request, run_id, image, method, target, layer)
    lo, hi, total = _stats(r.heat)
    names = s.entry.open_run().classes
    name = None
    if r.target_class is not None:
        name = names[r.target_class] if r.target_class < len(names) else str(r.target_class)
    return ExplainResult(
        image=image,
        method=method,
        target=r.target,
        target_class=r.target_class,
        target_name=name,
        layer=r.layer,
        signed=r.signed,
        shape=[int(r.heat.shape[0]), int(r.heat.shape[1])],
        min=lo,
        max=hi,
        sum=total,
        delta=r.delta,
        options=r.options,
        scale=_scale(tuple(r.heat.shape)),
        seconds=0.0 if cached else r.seconds,
        cached=cached,
    )
