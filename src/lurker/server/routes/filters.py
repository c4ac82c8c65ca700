"""``/api/runs/{run}/layers/{layer}/filters``: a first layer's convolution kernels as pictures.

A 2-D convolution that reads the model's input image (directly, or through elementwise ops
only: a normalisation, a dropout) with 1 or 3 input channels has kernels that are small
images of what each unit looks for, grey or RGB: what a teacher shows first (AlexNet's
conv1). Every kernel of the layer is scaled by the same number, the layer's largest
``|w|``, symmetrically around 0 (``round(128 + 127 * w / max|w|)``), so 0 is mid-grey
and colours and contrasts compare across units. Needs the model (409 otherwise); any
other layer is refused with a 404 saying why.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from ..deps import live_call
from ..errors import ApiError
from ..schemas import FilterLayers, FilterUnit, LayerFilters
from ..session import Session
from . import json_get, made_png, png_get

router = APIRouter(prefix="/api", tags=["filters"])

#: each grid cell's longer side is at least this many pixels (nearest-neighbour upscaled)
GRID_CELL = 24
#: pixels between the grid's cells (white)
GRID_GAP = 2
#: the unit page shows a kernel's longer side enlarged to at least this many pixels
UNIT_PIXELS = 112
#: the largest ``?scale=`` served (a 1x1 kernel on the unit page asks this, not 112)
MAX_SCALE = 64
#: a non-finite weight's colour: magenta, which no scaled value has
NONFINITE = (255, 0, 255)


@dataclass(frozen=True)
class Filters:
    """A layer's kernels as pictures: ``weight`` ``(units, channels, kh, kw)`` float64."""

    layer: str
    op: str
    param: str
    weight: np.ndarray
    max_abs: float

    def pixels(self, unit: int) -> np.ndarray:
        """Unit ``unit``'s kernel as ``uint8`` ``(kh, kw)`` (grey) or ``(kh, kw, 3)`` (RGB, or
        any kernel holding a non-finite weight, drawn magenta)."""
        return to_pixels(self.weight[unit], self.max_abs)


def to_pixels(w: np.ndarray, max_abs: float) -> np.ndarray:
    """A kernel ``(channels, kh, kw)`` as 8-bit pixels, ``round(128 + 127 * w / max_abs)``
    (0 is mid-grey 128; ``max_abs`` 0, all weights 0, is flat mid-grey)."""
    finite = np.isfinite(w)
    scaled = np.where(finite, w, 0.0) / max_abs if max_abs > 0 else np.zeros_like(w)
    pix = np.clip(np.rint(128 + 127 * scaled), 0, 255).astype(np.uint8)
    rgb = w.shape[0] == 3 or not finite.all()
    if not rgb:
        return pix[0]
    out = np.repeat(pix, 3, axis=0) if w.shape[0] == 1 else pix
    out = np.ascontiguousarray(np.moveaxis(out, 0, -1))
    out[~finite.all(axis=0)] = NONFINITE
    return out


def unit_scale(f: Filters) -> int:
    """The ``?scale=`` the unit page asks for (web/src/filters.ts's ``unitFilter``): the
    static export writes each unit's kernel at this scale only."""
    return min(MAX_SCALE, max(1, math.ceil(UNIT_PIXELS / max(f.weight.shape[2:]))))


def unit_png(f: Filters, unit: int, scale: int) -> bytes:
    """Unit ``unit``'s kernel as a PNG, upscaled ``scale`` times (nearest neighbour)."""
    return _png(f.pixels(unit), scale)


def _png(pix: np.ndarray, scale: int) -> bytes:
    from PIL import Image

    if scale > 1:
        pix = pix.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(pix, mode="RGB" if pix.ndim == 3 else "L").save(buf, format="PNG")
    return buf.getvalue()


def layer_filters(s: Session, layer: str) -> Filters:
    """The layer's kernels, or a 404 naming why the layer has none to draw: its op is not a
    convolution with a parameter weight, is transposed or grouped (a kernel sees only some
    channels), is not 2-D, has other than 1 or 3 input channels, or does not read the
    model's input (directly or through elementwise ops only)."""
    from lurker.graph.nodes import OpRef, refs

    info = s.entry.layer(layer)
    node = s.op(info.op) if info.op else None
    what = f"layer {info.name!r}" + (f" (op {info.op})" if info.op else "")
    k = s.conv_kernel(node) if node is not None else None
    if k is None:
        raise ApiError(
            404,
            f"{what} has no filters to draw: it is not a convolution whose weight is a "
            "parameter of the model; filters are drawn for a first layer's convolution",
        )
    if k.transposed or k.groups != 1:
        kind = "transposed" if k.transposed else f"grouped ({k.groups} groups)"
        raise ApiError(
            404,
            f"{what} is a {kind} convolution: its kernels are not each one picture of the "
            "whole input image, so no filters are drawn",
        )
    if k.weight.dim() != 4:
        raise ApiError(
            404,
            f"{what} is a {k.weight.dim() - 2}-D convolution; filters are drawn as pictures "
            "for a 2-D convolution (conv2d) only",
        )
    ref = next((r for r in refs(node) if isinstance(r, OpRef)), None)
    producer = s.trace().ops[ref.index] if ref is not None else None
    if producer is None or not s.keeps_input(producer):
        source = f"{producer.label} ({producer.name})" if producer is not None else "no tensor"
        why = (
            "the image reordered, moved or resized (its channels are not the image's colours "
            "as shown)"
            if producer is not None and _image_alone(s.trace(), producer)
            else "other layers' channels, not colours"
        )
        raise ApiError(
            404,
            f"{what} reads {source}, not the model's input image (directly or through "
            f"elementwise ops only): its kernels weigh {why}, so no filters are drawn",
        )
    flipped = _colour_flip(s, producer)
    if flipped is not None:
        raise ApiError(
            404,
            f"{what} reads the input image through {flipped}, which lurker does not know "
            "to keep a colour's meaning (1 - x, a negative factor or a square turn it around:"
            " a kernel drawn red could weigh less red), so no filters are drawn",
        )
    if k.in_channels not in (1, 3):
        raise ApiError(
            404,
            f"{what} reads {k.in_channels} channels; filters are drawn as pictures for 1 "
            "(grey) or 3 (RGB) input channels only",
        )
    if k.out_channels != info.num_units:
        raise ApiError(
            404,
            f"{what} has {info.num_units} units but its convolution {k.out_channels} "
            "outputs: its units are not one per kernel, so no filters are drawn",
        )
    w = k.weight.detach().to("cpu").double().numpy()
    finite = w[np.isfinite(w)]
    max_abs = float(np.abs(finite).max()) if finite.size else 0.0
    return Filters(info.name, node.label, k.param, w, max_abs)


def _image_alone(tr: Any, op: Any) -> bool:
    """Whether ``op``'s output is made from the model's input through ops of no parameter
    alone (a flip, an index, a resize, a pad: the image moved, still its colours), not
    through a layer's weights (another conv: other layers' channels)."""
    from lurker.graph.nodes import OpRef, refs

    seen: dict[int, bool] = {}

    def alone(o: Any) -> bool:
        if o.index not in seen:
            seen[o.index] = False  # (a graph has no cycle: a guard all the same)
            parents = [tr.ops[r.index] for r in refs(o) if isinstance(r, OpRef)]
            seen[o.index] = o.kind == "input" or (
                o.kind == "op"
                and not o.params
                and any(p.dist_from_input is not None for p in parents)
                and all(alone(p) for p in parents if p.dist_from_input is not None)
            )
        return seen[o.index]

    return alone(op)


#: ops through which the input's colours keep their meaning (more of a colour in, not less
#: out: non-decreasing per value), given the conditions of :func:`_colour_flip` (a positive
#: factor, the input as the minuend or dividend, a leaky ReLU's slope >= 0)
_KEEP_COLOUR = frozenset({
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide",
    "batch_norm", "instance_norm", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "feature_dropout", "contiguous", "clone",
    "detach", "to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda",
    # monotone non-decreasing functions: a clamp to [0, 1], an activation on the way
    "clamp", "clip", "clamp_min", "clamp_max", "nan_to_num", "pos", "positive", "relu",
    "relu6", "leaky_relu", "elu", "selu", "celu", "sigmoid", "tanh", "hardsigmoid",
    "hardtanh", "softplus", "logsigmoid", "exp", "expm1", "log", "log1p", "sqrt",
})  # fmt: skip
_FACTOR = frozenset({"mul", "multiply", "div", "divide", "true_divide"})


def _colour_flip(s: Session, op: Any) -> str | None:
    """The op (``label (name)``) on the way from the input image to a first convolution
    that may turn a colour's meaning around, or None where every op keeps it: an offset
    (``x - mean``), a factor that is a positive number, buffer or parameter (``x / std``),
    a per-channel norm of positive scale, a dropout or a copy. ``1 - x``, ``-x``, a square,
    a factor that is negative somewhere or unknown: the kernels' colours would mislead."""
    from lurker.graph.nodes import OpRef

    tr = s.trace()
    model = s.model()
    seen: set[int] = set()
    todo = [op]
    while todo:
        o = todo.pop()
        if o.index in seen or o.kind == "input":
            continue
        seen.add(o.index)
        name = o.name.rstrip("_")
        said = f"{o.label} ({o.name})"
        if name not in _KEEP_COLOUR:
            return said
        args = list(o.args)
        colour = [
            i for i, a in enumerate(args) if isinstance(a, OpRef) and s.keeps_input(tr.ops[a.index])
        ]
        if not colour:
            return said
        if name in ("sub", "subtract", "div", "divide", "true_divide") and colour != [0]:
            return said  # 1 - x, 1 / x, or x - x
        if name in _FACTOR and len(colour) != 1:
            return said  # x * x: a square turns negative values around
        if name == "leaky_relu":
            slope = o.kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
            if not isinstance(slope, (int, float)) or slope < 0:
                return said
        if name in _FACTOR or name in ("batch_norm", "instance_norm"):
            if name in _FACTOR:
                others = [a for i, a in enumerate(args) if i not in colour]
            else:  # (input, running_mean, running_var, weight, ...): the scale is weight
                weight = o.kwargs.get("weight", args[3] if len(args) > 3 else None)
                others = [weight] if weight is not None else []
            for a in others:
                if not _positive(a, tr, model):
                    return said
        todo.extend(tr.ops[args[i].index] for i in colour)
    return None


def _positive(a: Any, tr: Any, model: Any) -> bool:
    """Whether a factor of the input is positive everywhere: a number, or a parameter,
    buffer or constant whose value is at hand; anything else is not known to be."""
    import torch

    from lurker.graph.nodes import OpRef, ParamRef

    if isinstance(a, bool):
        return False
    if isinstance(a, (int, float)):
        return a > 0
    value = None
    try:
        if isinstance(a, ParamRef):
            value = model.get_parameter(a.name)
        elif isinstance(a, OpRef):
            node = tr.ops[a.index]
            if node.kind == "buffer":
                value = model.get_buffer(node.name)
            elif node.kind == "constant":
                value = node.activation
    except AttributeError:
        return False
    return isinstance(value, torch.Tensor) and bool((value.detach() > 0).all())


def grid_shape(units: int) -> tuple[int, int]:
    """``(columns, rows)`` of the grid: as square as it gets, filled row by row."""
    cols = max(1, math.ceil(math.sqrt(units)))
    return cols, math.ceil(units / cols)


def cell_scale(f: Filters) -> int:
    return max(1, math.ceil(GRID_CELL / max(f.weight.shape[2:])))


def grid_png(f: Filters) -> bytes:
    """Every unit's kernel, row by row, ``GRID_GAP`` white pixels around and between cells."""
    units, _, kh, kw = f.weight.shape
    cols, rows = grid_shape(units)
    scale = cell_scale(f)
    ch, cw = kh * scale, kw * scale
    out = np.full(
        (GRID_GAP + rows * (ch + GRID_GAP), GRID_GAP + cols * (cw + GRID_GAP), 3), 255, np.uint8
    )
    for u in range(units):
        pix = f.pixels(u)
        if pix.ndim == 2:
            pix = np.repeat(pix[..., None], 3, axis=2)
        y = GRID_GAP + (u // cols) * (ch + GRID_GAP)
        x = GRID_GAP + (u % cols) * (cw + GRID_GAP)
        out[y : y + ch, x : x + cw] = pix.repeat(scale, axis=0).repeat(scale, axis=1)
    if f.weight.shape[1] == 1 and np.isfinite(f.weight).all():
        out = out[..., 0]  # grey: one channel
    return _png(out, 1)


def filters_document(s: Session, f: Filters) -> LayerFilters:
    """The ``filters.json`` of ``f``'s layer: its scale, each unit's range, the grid's layout."""
    from lurker.probe.data import recorded_normalize

    units, channels, kh, kw = f.weight.shape
    cols, rows = grid_shape(units)
    per = f.weight.reshape(units, -1)
    fin = np.isfinite(per)
    lo = np.where(fin, per, np.inf).min(axis=1)
    hi = np.where(fin, per, -np.inf).max(axis=1)
    return LayerFilters(
        layer=f.layer,
        op=f.op,
        param=f.param,
        shape=list(f.weight.shape),
        channels=channels,
        colour="rgb" if channels == 3 else "grey",
        max_abs=f.max_abs,
        scaling=(
            "each weight w is the pixel round(128 + 127 * w / max_abs), max_abs the layer's "
            "largest |w|: 0 is mid-grey, and all units share the scale"
            + (
                "; RGB: the kernel's input channels 0, 1, 2 as red, green, blue (the model's "
                "input channels in the order the model reads them)"
                if channels == 3
                else ""
            )
        ),
        normalize=recorded_normalize(s.config),
        columns=cols,
        rows=rows,
        cell=[kh * cell_scale(f), kw * cell_scale(f)],
        gap=GRID_GAP,
        units=[
            FilterUnit(
                unit=u,
                min=float(lo[u]) if math.isfinite(lo[u]) else None,
                max=float(hi[u]) if math.isfinite(hi[u]) else None,
                nonfinite=int((~fin[u]).sum()),
            )
            for u in range(units)
        ],
    )


def filter_listing(s: Session) -> FilterLayers:
    """The run's ``filters.json``: its layers with filters, and why each other has none."""
    layers, reasons = [], {}
    for info in s.entry.open_run().layers:
        try:
            layer_filters(s, info.name)
        except ApiError as e:
            reasons[info.name] = str(e.detail)
        else:
            layers.append(info.name)
    return FilterLayers(layers=layers, reasons=reasons)


@json_get(
    router,
    "/runs/{run_id}/filters",
    FilterLayers,
    "Which probed layers have filters to draw (first convolutions), and why the others not",
)
async def filter_layers(request: Request, run_id: str) -> FilterLayers:
    return await live_call(request, run_id, filter_listing)


@json_get(
    router,
    "/runs/{run_id}/layers/{layer}/filters",
    LayerFilters,
    "A first convolution's kernels as pictures: the scale, each unit's range, the grid",
)
async def filters_doc(request: Request, run_id: str, layer: str) -> LayerFilters:
    return await live_call(request, run_id, lambda s: filters_document(s, layer_filters(s, layer)))


@png_get(
    router,
    "/runs/{run_id}/layers/{layer}/filters.png",
    "Every unit's kernel of a first convolution, one grid (row by row)",
)
async def filters_grid(request: Request, run_id: str, layer: str) -> Response:
    png = await live_call(request, run_id, lambda s: grid_png(layer_filters(s, layer)))
    return made_png(png)


@png_get(
    router,
    "/runs/{run_id}/layers/{layer}/units/{unit}/filter.png",
    "One unit's kernel of a first convolution as a picture",
)
async def unit_filter(
    request: Request,
    run_id: str,
    layer: str,
    unit: int = Path(ge=0, le=2**31),
    scale: int = Query(1, ge=1, le=MAX_SCALE, description="nearest-neighbour upscaling factor"),
) -> Response:
    def work(s: Session) -> bytes:
        f = layer_filters(s, layer)
        s.entry.unit_index(s.entry.layer(layer), unit)
        return unit_png(f, unit, scale)

    png = await live_call(request, run_id, work)
    return made_png(png)
