"""``/api/runs/{run}/live``: the model on an uploaded image or a dataset sample.

Predictions, any op's input and output feature maps (one channel per request, PNG or raw
JSON) and convolution kernels. Needs a model (409 naming ``lurker serve RUN --model``
otherwise), except a dataset sample's predictions and input the run's explanation cache
keeps (``lurker images RUN --explanations``): those are served from there when the model
(or the dataset) is not available. The endpoints are async: their work runs on the model's own thread (one per
model, see :func:`~lurker.server.deps.live_call`), so requests waiting for the model hold
no worker thread and the other endpoints stay fast.
"""

from __future__ import annotations

import io
import re
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, File, Path, Request, UploadFile
from fastapi.responses import Response

from ..classes import no_scores
from ..deps import MODEL_MADE, entry, live_call, range_header, session
from ..errors import ApiError
from ..schemas import (
    FeatureSide,
    KernelInfo,
    KernelValues,
    LiveImage,
    LiveOp,
    MapValues,
    PatchlessToken,
)
from ..session import (
    Maps,
    Session,
    constant_maps,
    finite_range,
    json_values,
    map_png,
    nonfinite_counts,
    nonfinite_maps,
)
from . import json_get

router = APIRouter(prefix="/api", tags=["live"])

PNG = {200: {"content": {"image/png": {}}, "description": "a PNG image"}}
#: Decoded images larger than this many pixels are refused (a decompression bomb).
MAX_PIXELS = 40_000_000


_CONTENT_ID = re.compile(r"[0-9a-f]{16}")
_SAMPLE_ID = re.compile(r"sample-([0-9]{1,19})")


def _images_only(s: Session) -> None:
    """Refuse a run whose inputs are token ids or feature vectors: the live view's maps and
    Explain's heatmaps are drawn over an image, which such an input does not have."""
    length = s.token_length()
    if length is not None:
        raise ApiError(
            409,
            f"the live view and Explain show images, and this run's inputs are sequences of "
            f"{length} token ids: a sample's page shows its tokens and the model's prediction, "
            "a unit's page its top sequences with the peak token marked",
        )
    features = s.vector_length()
    if features is not None:
        raise ApiError(
            409,
            f"the live view shows images, and this run's inputs are vectors of {features} "
            "features, which have no picture: a sample's page shows the model's prediction, "
            "and Explain (sample-N) each feature's attribution",
        )


def _image_id(s: Session, image: str) -> str:
    """``image`` checked: a content id (16 hex digits, what an upload returns) or
    ``sample-N`` with N a sample of the run (404 naming the range otherwise); 409 on a run
    of token ids, which the live view and Explain (made for images) cannot show."""
    _images_only(s)
    if _CONTENT_ID.fullmatch(image):
        return image
    m = _SAMPLE_ID.fullmatch(image)
    if m is None:
        raise ApiError(
            404,
            f"no live image {image!r}: ids are the 16 hex digits uploads return, or sample-N",
        )
    last = s.entry.last_sample_id()
    if not 0 <= int(m.group(1)) <= last:
        raise ApiError(
            404,
            f"no sample {m.group(1)} in run {s.entry.id!r}: sample ids are 0..{last}"
            if last >= 0
            else f"no sample {m.group(1)}: run {s.entry.id!r} has no samples",
        )
    return image


@router.post(
    "/runs/{run_id}/live/images",
    response_model=LiveImage,
    responses={400: {"description": "not an image"}, 413: {"description": "too large"}},
    summary="Upload an image; returns its id and the model's top-5 predictions",
)
async def upload(request: Request, run_id: str, file: Annotated[UploadFile, File()]) -> LiveImage:
    limit: int = request.app.state.upload_limit
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise ApiError(
            413,
            f"the upload is larger than the limit of {limit / 2**20:.0f} MB; send a smaller "
            "image (the model sees it resized anyway)",
        )
    if not data:
        raise ApiError(400, f"the upload {file.filename or ''!r} is empty; send an image file")
    name = file.filename

    def work(s: Session) -> LiveImage:
        _images_only(s)
        image = _decode(data, name)
        # a browser sends the base name; a client may send a path: keep its last part
        image_id = s.add_upload(data, image, re.split(r"[\\/]", name)[-1] if name else None)
        x = s.live_input(image_id)
        return LiveImage(
            image=image_id,
            name=s.upload_name(image_id),
            predictions=(preds := s.predictions(x)),
            predictions_note=None if preds else no_scores(s.entry.open_run()),
            width=image.width,  # type: ignore[attr-defined]
            height=image.height,  # type: ignore[attr-defined]
            input_note=s.upload_note(image_id),
        )

    return await live_call(request, run_id, work)


def _decode(data: bytes, name: str | None) -> object:
    from PIL import Image, UnidentifiedImageError

    what = repr(name) if name else "the upload"
    try:
        # (no warnings.catch_warnings here: it swaps process-wide state that concurrent
        # requests restore out of order; MAX_PIXELS is below Pillow's own bomb limit, so
        # the size check refuses what Pillow would only warn of)
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ApiError(
                    413,
                    f"{what} is {im.width}x{im.height} pixels; the limit is "
                    f"{MAX_PIXELS // 1_000_000} megapixels",
                )
            im.load()
            return im.copy()
    except ApiError:
        raise
    except UnidentifiedImageError:
        raise ApiError(
            400,
            f"{what} is not an image this server can read (PNG, JPEG, GIF, BMP, WebP, TIFF, "
            "...); send an image file",
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(413, f"{what} has too many pixels: {e}") from None
    except Exception as e:  # truncated or corrupt data: Pillow raises many kinds
        raise ApiError(
            400, f"{what} is a corrupt or truncated image ({type(e).__name__}: {e})"
        ) from None


@router.get(
    "/runs/{run_id}/live/{image}",
    response_model=LiveImage,
    summary="The model's top-5 predictions for an uploaded image or sample-N",
)
async def predictions(request: Request, run_id: str, image: str) -> LiveImage:
    def work(s: Session) -> LiveImage:
        x = s.live_input(_image_id(s, image))
        return LiveImage(
            image=image,
            name=s.upload_name(image),
            predictions=(preds := s.predictions(x)),
            predictions_note=None if preds else no_scores(s.entry.open_run()),
            width=int(x.shape[-1]),
            height=int(x.shape[-2]),
            input_note=s.upload_note(image),
        )

    try:
        return await live_call(request, run_id, work)
    except ApiError as e:
        return LiveImage.model_validate_json(_kept(request, run_id, image, "live.json", e))


def _kept(request: Request, run_id: str, image: str, name: str, err: ApiError) -> bytes:
    """After a 409 (no model, or no dataset), the run's own model's answer for a dataset
    sample as its explanation cache keeps it; else ``err`` again."""
    from ..explained import cached_file

    if err.status != 409:
        raise err
    path = cached_file(session(request, entry(request, run_id)), image, name)
    if path is None:
        raise err
    return path.read_bytes()


@router.get(
    "/runs/{run_id}/live/{image}/input.png",
    response_class=Response,
    responses=PNG,
    summary="The image as the model sees it (resized, cropped)",
)
async def input_png(request: Request, run_id: str, image: str) -> Response:
    from lurker.probe.images import png_bytes

    def work(s: Session) -> bytes:
        return png_bytes(s.input_pil(_image_id(s, image)))

    try:
        data = await live_call(request, run_id, work)
    except ApiError as e:
        data = _kept(request, run_id, image, "input.png", e)
    return Response(data, media_type="image/png", headers=MODEL_MADE)


def _side(m: Maps) -> FeatureSide:
    return FeatureSide(
        shape=m.shape,
        channels=int(m.maps.shape[0]),
        map_shape=[int(m.maps.shape[1]), int(m.maps.shape[2])],
        unit_axis=m.unit_axis,
        note=m.note,
        one_value_maps=m.one_value_maps,
        constant={} if m.one_value_maps else constant_maps(m.maps),
        nonfinite=nonfinite_maps(m.maps),
        patchless=[
            PatchlessToken(token=token, values=json_values(values.numpy()[None])[0])
            for token, values in m.patchless
        ],
    )


@router.get(
    "/runs/{run_id}/live/{image}/ops/{op}",
    response_model=LiveOp,
    summary="An op of the trace on this image: its input and output shapes, its kernel",
)
async def live_op(request: Request, run_id: str, image: str, op: str) -> LiveOp:
    return await live_call(request, run_id, lambda s: _live_op(s, image, op))


def _live_op(s: Session, image: str, op: str) -> LiveOp:
    node, inp, out = s.op_maps(_image_id(s, image), op)
    k = s.conv_kernel(node)
    tr = s.trace()
    from lurker.graph.nodes import OpRef, refs

    ref = next((r for r in refs(node) if isinstance(r, OpRef)), None)
    return LiveOp(
        op=node.label,
        index=node.index,
        name=node.name,
        kind=node.kind,
        input=None if inp is None else _side(inp),
        input_op=None if ref is None or inp is None else tr.ops[ref.index].label,
        output=_side(out),
        kernel=None
        if k is None
        else KernelInfo(
            shape=list(k.weight.shape),
            param=k.param,
            groups=k.groups,
            transposed=k.transposed,
            in_channels=k.in_channels,
            out_channels=k.out_channels,
        ),
    )


def _channel_map(
    s: Session, image: str, op: str, side: str, channel: int
) -> tuple[str, np.ndarray]:
    node, inp, out = s.op_maps(_image_id(s, image), op)
    pair = inp if side == "input" else out
    if pair is None:
        raise ApiError(404, f"op {node.label!r} has no tensor input to show (its input: none)")
    maps = pair.maps
    if not channel < maps.shape[0]:
        raise ApiError(
            404,
            f"no channel {channel} in the {side} of {node.label!r}: it has {maps.shape[0]} "
            f"channels (0..{maps.shape[0] - 1})",
        )
    return node.label, maps[channel].numpy()


@router.get(
    "/runs/{run_id}/live/{image}/ops/{op}/{side}/{channel}.png",
    response_class=Response,
    responses=PNG,
    summary="One channel of an op's input or output as an 8-bit grayscale PNG",
)
async def channel_png(
    request: Request,
    run_id: str,
    image: str,
    op: str,
    side: Literal["input", "output"],
    channel: int = Path(ge=0, le=2**31),
) -> Response:
    def work(s: Session) -> tuple[tuple[bytes, int, float | None, float | None], int]:
        _, a = _channel_map(s, image, op, side, channel)
        return map_png(a), int(a.size - np.isfinite(a).sum())

    (data, scale, lo, hi), nonfinite = await live_call(request, run_id, work)
    headers = {
        **MODEL_MADE,
        "X-Lurker-Scale": str(scale),
        # over the finite values: "none" when no value is finite
        "X-Lurker-Min": range_header(lo),
        "X-Lurker-Max": range_header(hi),
        "X-Lurker-Nonfinite": str(nonfinite),
        "Access-Control-Expose-Headers": (
            "X-Lurker-Scale, X-Lurker-Min, X-Lurker-Max, X-Lurker-Nonfinite"
        ),
    }
    return Response(data, media_type="image/png", headers=headers)


@json_get(
    router,
    "/runs/{run_id}/live/{image}/ops/{op}/{side}/{channel}",
    MapValues,
    "One channel of an op's input or output, raw values",
)
async def channel_json(
    request: Request,
    run_id: str,
    image: str,
    op: str,
    side: Literal["input", "output"],
    channel: int = Path(ge=0, le=2**31),
) -> MapValues:
    def work(s: Session) -> MapValues:
        _, a = _channel_map(s, image, op, side, channel)
        return MapValues(shape=list(a.shape), **_values(a))

    return await live_call(request, run_id, work)


@json_get(
    router,
    "/runs/{run_id}/live/{image}/ops/{op}/kernels/{out}/{inp}",
    KernelValues,
    "The convolution kernel from input channel `in` to output channel `out` of an op",
)
async def kernel_json(
    request: Request,
    run_id: str,
    image: str,
    op: str,
    out: int = Path(ge=0, le=2**31),
    inp: int = Path(ge=0, le=2**31),
) -> KernelValues:
    def work(s: Session) -> KernelValues:
        _image_id(s, image)
        return _kernel(s, op, out, inp)

    return await live_call(request, run_id, work)


def _span(r: range) -> str:
    return str(r.start) if len(r) == 1 else f"{r.start}..{r.stop - 1}"


def _kernel(s: Session, op: str, out: int, inp: int) -> KernelValues:
    """The kernel through which input channel ``inp`` feeds output channel ``out``: in a
    grouped convolution only the inputs of the output's group feed it, through the
    weight at the input's place in the group (``weight[out, inp - group start]``); in a
    transposed one the weight is ``[in, out / groups, ...]``
    (``weight[inp, out - group start]``)."""
    node = s.op(op)
    k = s.conv_kernel(node)
    if k is None:
        raise ApiError(
            404,
            f"op {node.label!r} ({node.name}) has no convolution kernel: it is not a "
            "convolution whose weight is a parameter of the model",
        )
    shape = list(k.weight.shape)
    if not (out < k.out_channels and inp < k.in_channels):
        raise ApiError(
            404,
            f"no kernel [{out}, {inp}] in {k.param} {shape}: {node.label} has "
            f"{k.out_channels} outputs (0..{k.out_channels - 1}) and {k.in_channels} inputs "
            f"(0..{k.in_channels - 1})",
        )
    idx = k.index(out, inp)
    if idx is None:
        feeds = k.inputs_of(out)
        depthwise = " (depthwise)" if k.groups == k.in_channels else ""
        raise ApiError(
            404,
            f"input {inp} does not feed output {out} in {node.label}: it is a grouped "
            f"{'transposed ' if k.transposed else ''}convolution with {k.groups} groups"
            f"{depthwise}, and output {out}, in group {k.group_of_output(out) + 1} of {k.groups}, "
            f"is fed by input{'s' if len(feeds) > 1 else ''} {_span(feeds)} only",
        )
    w = k.weight[idx].detach().to("cpu").double().numpy()
    grid = w.reshape(1, -1) if w.ndim <= 1 else w.reshape(-1, w.shape[-1])
    return KernelValues(
        shape=list(w.shape),
        **_values(grid),
        param=k.param,
        index=list(idx),
        groups=k.groups,
        transposed=k.transposed,
    )


def _values(a: Any) -> dict[str, Any]:
    """A 2-D array's fields of :class:`MapValues`: its finite range, its values (non-finite
    ones null) and how many are not finite, by kind."""
    lo, hi = finite_range(a)
    return {"min": lo, "max": hi, "values": json_values(a), "nonfinite": nonfinite_counts(a)}
