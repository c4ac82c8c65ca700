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
from ..deps import entry, live_call, range_header, session
from ..errors import ApiError
from ..schemas import (
    FeatureSide,
    KernelInfo,
    KernelValues,
    LiveImage,
    LiveInput,
    LiveInputBody,
    LiveLayerUnits,
    LiveOp,
    MapValues,
    OtherInput,
    PatchlessToken,
    SignalTime,
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
from ..state import signal_layout, signal_time_axis, signal_words
from . import json_get, made_png, png_get

router = APIRouter(prefix="/api", tags=["live"])

#: Decoded images larger than this many pixels are refused (a decompression bomb).
MAX_PIXELS = 40_000_000


#: Ops whose call is attention, by name: the live view offers their weights (routes/attention.py).
ATTENTION = frozenset({"scaled_dot_product_attention", "_native_multi_head_attention"})


def written_attention(s: Session) -> dict[int, Any]:
    """The live trace's softmax ops whose output is attention weights (attention written
    out by hand, :func:`lurker.graph.attention.attention_softmaxes`), found once per trace."""
    from lurker.graph.attention import attention_softmaxes

    tr = s.trace()
    return s.cached(
        ("written-attention", s.entry.generation, id(tr)), lambda: attention_softmaxes(tr)
    )


_CONTENT_ID = re.compile(r"[0-9a-f]{16}")
_SAMPLE_ID = re.compile(r"sample-([0-9]{1,19})")


def _images_only(s: Session) -> None:
    """Refuse a run whose inputs are token ids or feature vectors: the live view's maps and
    Explain's heatmaps are drawn over an image, which such an input does not have."""
    length = s.token_length()
    if length is not None:
        raise ApiError(
            409,
            "the live view's maps and Explain's heatmaps are drawn over images, and this "
            f"run's inputs are sequences of {length} token ids: type a sequence in the live "
            "view (POST .../live/inputs) to see the model's prediction and every probed "
            "layer's units; Explain (sample-N) scores each token of a sample",
        )
    features = s.vector_length()
    if features is not None:
        raise ApiError(
            409,
            f"the live view's maps are drawn over images, and this run's inputs are vectors "
            f"of {features} features, which have no picture: type the values in the live "
            "view (POST .../live/inputs) to see the model's prediction and every probed "
            "layer's units; Explain (sample-N) scores each feature of a sample",
        )


def image_id(s: Session, image: str, *, sequences: bool = False) -> str:
    """``image`` checked: a content id (16 hex digits, what an upload returns) or
    ``sample-N`` with N a sample of the run (404 naming the range otherwise); 409 on a run
    of token ids or feature vectors, whose image endpoints have no picture to draw on
    (``sequences``: a run of token ids is taken too, by an endpoint that needs no picture,
    its ids those of ``sample-N`` or of a sequence typed with ``POST .../live/inputs``)."""
    if not (sequences and s.token_length() is not None):
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
            prepared=s.upload_prepared(image_id),
        )

    return await live_call(request, run_id, work)


#: the longest sequence (ids typed or words) the live view takes
MAX_TOKENS = 4096


@router.post(
    "/runs/{run_id}/live/inputs",
    response_model=LiveInput,
    responses={409: {"description": "the run's inputs are images"}},
    summary="Run the model on typed token ids, words or feature values: its prediction and "
    "every probed layer's units",
)
async def typed_input(request: Request, run_id: str, body: LiveInputBody) -> LiveInput:
    def work(s: Session) -> LiveInput:
        import torch

        from .. import state

        run = s.entry.open_run()
        ids = words = features = names = None
        if s.token_length() is not None:
            ids = _token_ids(s, body)
            vocab = s.vocab()
            words = [vocab[i] if vocab and i < len(vocab) else None for i in ids]
            x = torch.tensor(ids, dtype=_dtype(s, torch.int64))
        elif (length := s.vector_length()) is not None:
            names = state.feature_names(run)
            dtype = _dtype(s, torch.float32)
            features = _features(body, length, names, dtype)
            x = torch.tensor(features, dtype=dtype)
        elif (signal := s.signal_shape()) is not None:
            raise ApiError(
                409,
                f"this run's inputs are signals of {signal_words(signal)}: "
                "Live on a signal run takes a dataset sample (open sample-N, GET "
                ".../live/sample-N/...); typed inputs are for runs of token ids or feature "
                "vectors",
            )
        else:
            raise ApiError(
                409,
                "this run's inputs are images: upload one (POST .../live/images) or open a "
                "dataset sample (sample-N); typed inputs are for runs of token ids or "
                "feature vectors",
            )
        input_id = s.add_input(x)
        fitted = None
        padded_from = None
        try:
            layers = s.layer_units(input_id)
        except ApiError as e:
            length = s.token_length()
            if ids is None or length is None or len(ids) == length:
                raise
            refit = _fit_length(s, ids, length, vocab)
            if refit is None:  # no pad id to fill a short sequence with: the model's error
                e.detail = (
                    f"{e.detail} (this input has {len(ids)} tokens; the run's sequences "
                    f"have {length}, and the run knows no padding id to fill them with: "
                    f"try a sequence of {length})"
                )
                raise
            if len(refit[0]) > len(ids):  # padded: the typed tokens, then the pad id
                padded_from = len(ids)
            ids, fitted = refit
            words = [vocab[i] if vocab and i < len(vocab) else None for i in ids]
            x = torch.tensor(ids, dtype=x.dtype)
            input_id = s.add_input(x)
            try:
                layers = s.layer_units(input_id)
            except ApiError as again:
                again.detail = f"{fitted[:-1]}; the model still fails: {again.detail}"
                raise again from None
        # a language model's next token after the last typed token, not after the padding
        preds = s.predictions(x, last=None if padded_from is None else padded_from - 1)
        return LiveInput(
            input=input_id,
            ids=ids,
            words=words,
            fitted=fitted,
            padded_from=padded_from,
            features=None if features is None else [float(v) for v in x.double().tolist()],
            feature_names=names,
            predictions=preds,
            predictions_note=None if preds else no_scores(run),
            layers=[
                LiveLayerUnits(
                    layer=info.name,
                    op=info.op,
                    num_units=int(mean.numel()),
                    positions=positions,
                    mean=json_values(mean.numpy()[None])[0],
                    max=(top := json_values(peak.numpy()[None])[0]),
                    peak=None
                    if at is None
                    else [None if v is None or i < 0 else int(i) for v, i in zip(top, at.tolist())],
                    top=_top(peak),
                )
                for info, mean, peak, positions, at in layers
            ],
        )

    return await live_call(request, run_id, work)


#: vocabulary entries read as the padding token where the model's embedding names none
PAD_WORDS = ("<pad>", "[PAD]", "<PAD>", "[pad]", "<|pad|>")


def pad_id(s: Session, vocab: list[str | None] | None) -> tuple[int, str] | None:
    """The run's padding id and where it comes from: the one its dataset named (``pad_id``,
    ``pad_token_id`` or ``pad_index``, stored by the probe as ``pad_id``: said, not
    guessed), else the ``padding_idx`` of the embedding that reads the input (the model's
    own, as the trace recorded the call), else the one vocabulary entry spelled as a
    padding token (``<pad>``, ``[PAD]``); None when the run knows none (then nothing is
    guessed)."""
    from lurker.vocab import id_space

    named = s.entry.open_run().meta_now("pad_id")
    if isinstance(named, int) and not isinstance(named, bool) and named >= 0:
        return named, "the dataset's pad id"
    tr = s.trace()
    if tr.inputs:
        for c in tr.inputs[0].children:
            op = tr.ops[c]
            p = op.kwargs.get("padding_idx") if op.name == "embedding" else None
            if isinstance(p, int) and not isinstance(p, bool):
                rows = next((int(w.shape[0]) for w in op.params[:1] if w.shape), None)
                if p < 0 and rows is not None:
                    p += rows
                if p >= 0:
                    return p, "the embedding's padding_idx"
    rows = id_space(tr) or (len(vocab) if vocab else 0)
    hits = {i for i, w in enumerate(vocab or []) if w in PAD_WORDS and i < rows}
    if len(hits) == 1:
        i = hits.pop()
        return i, f"the vocabulary's {vocab[i]!r}"  # type: ignore[index]
    return None


def _fit_length(
    s: Session, ids: list[int], length: int, vocab: list[str | None] | None
) -> tuple[list[int], str] | None:
    """``ids`` made the run's ``length`` for a model that takes no other: a longer sequence
    cut to its first ``length`` tokens, a shorter one padded at its end with the run's
    padding id; with what was done, said in words. None for a short one and no pad id."""
    if len(ids) > length:
        cut = len(ids) - length
        return ids[:length], (
            f"Truncated: the model takes only the run's {length} tokens, so the last {cut} "
            f"of the {len(ids)} typed were dropped."
        )
    pad = pad_id(s, vocab)
    if pad is None:
        return None
    n = length - len(ids)
    word = vocab[pad[0]] if vocab and pad[0] < len(vocab) and vocab[pad[0]] else None
    shown = f"{word!r} (id {pad[0]})" if word else f"id {pad[0]}"
    return ids + [pad[0]] * n, (
        f"Padded: the model takes only the run's {length} tokens, so the {len(ids)} typed "
        f"were followed by {n} x {shown}, the padding id ({pad[1]}); tokens {len(ids)}.."
        f"{length - 1} are padding."
    )


def _dtype(s: Session, default: Any) -> Any:
    """The dtype the run's trace recorded for the model's input (as the probe fed it)."""
    import torch

    dtype = getattr(torch, s.input_dtype(), None)
    return dtype if isinstance(dtype, torch.dtype) else default


def _top(peak: Any, n: int = 10) -> list[int]:
    """The ``n`` units of largest value, highest first (ties: the lower unit), finite only."""
    v = peak.numpy()
    ok = [i for i in range(v.size) if np.isfinite(v[i])]
    return sorted(ok, key=lambda i: (-v[i], i))[:n]


def _token_ids(s: Session, body: LiveInputBody) -> list[int]:
    """The ids of a typed sequence: ``ids`` checked (integers within the model's
    embedding), or ``text`` split at whitespace and each word looked up in the run's
    vocabulary (exactly, else ignoring case where that names one word), or, with a
    character-level vocabulary, each character looked up exactly; a word not in it is
    named, never dropped."""
    from lurker.vocab import id_space, per_character

    if (body.text is None) == (body.ids is None) or body.features is not None:
        raise ApiError(
            422,
            'this run\'s inputs are token ids: send {"text": "some words"} (looked up '
            'in the run\'s vocabulary) or {"ids": [1, 2, 3]}',
        )
    vocab = s.vocab()
    rows = id_space(s.entry.open_run().graph) or (len(vocab) if vocab else None)
    if body.text is not None:
        if not vocab:
            why = s.vocab_error()
            raise ApiError(
                422,
                "this run has no vocabulary to look words up in"
                + (f" ({why})" if why else "")
                + ": type the token ids as numbers, or serve the run with its vocabulary "
                "(lurker serve RUN --vocab FILE, or probe(..., vocab=...))",
            )
        exact: dict[str, int] = {}
        folded: dict[str, set[int]] = {}
        for i, w in enumerate(vocab):
            if w is None:
                continue
            exact.setdefault(w, i)
            folded.setdefault(w.casefold(), set()).add(i)
        ids, unknown = [], []
        chars = per_character(vocab)
        # a character-level vocabulary reads each character, spaces included, exactly;
        # any other splits the text at whitespace into words
        for word in body.text if chars else body.text.split():
            hit = exact.get(word)
            if hit is None and not chars and len(folded.get(word.casefold(), ())) == 1:
                hit = next(iter(folded[word.casefold()]))
            if hit is None:
                unknown.append(word)
            else:
                ids.append(hit)
        if unknown:
            shown = ", ".join(repr(w) for w in dict.fromkeys(unknown))
            what = "characters" if chars else "words"
            raise ApiError(
                422,
                f"not in the run's vocabulary ({sum(w is not None for w in vocab)} {what}): "
                f"{shown}; use other {what}, or type the token ids as numbers",
            )
    else:
        ids = []
        for pos, v in enumerate(body.ids or []):
            if isinstance(v, str) and re.fullmatch(r"\s*-?[0-9]+\s*", v):
                v = int(v)
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ApiError(422, f"token {pos} is {v!r}, not a token id (a whole number)")
            if v < 0 or (rows is not None and v >= rows):
                span = f"0..{rows - 1}" if rows is not None else "0 or more"
                raise ApiError(
                    422,
                    f"token {pos} is id {v}, out of range: the model's embedding looks up ids "
                    f"{span}",
                )
            ids.append(v)
    if not ids:
        raise ApiError(422, "the sequence is empty: type at least one word or id")
    if len(ids) > MAX_TOKENS:
        raise ApiError(422, f"the sequence has {len(ids)} tokens; the limit is {MAX_TOKENS}")
    return ids


def _features(body: LiveInputBody, length: int, names: list[str] | None, dtype: Any) -> list[float]:
    """``features`` checked: ``length`` numbers finite in the model's input ``dtype`` (a
    float64 1e308 is inf in float32, which would give every score NaN), a bad one named
    (by its feature name where the run has them)."""
    import torch

    if body.features is None or body.text is not None or body.ids is not None:
        raise ApiError(
            422,
            f"this run's inputs are vectors of {length} features: send "
            '{"features": [one number per feature]}',
        )
    if len(body.features) != length:
        raise ApiError(
            422,
            f"{len(body.features)} values given; the model takes {length} features, one value each",
        )
    out = []
    for i, v in enumerate(body.features):
        what = f"feature {i}" + (f" ({names[i]})" if names else "")
        if isinstance(v, str):
            try:
                if "_" in v:  # Python's float() reads "1_0" as 10: no number a person types
                    raise ValueError(v)
                v = float(v)
            except ValueError:
                raise ApiError(422, f"{what} is {v!r}, not a number") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ApiError(422, f"{what} is {v!r}, not a number")
        try:
            f = float(v)
        except OverflowError:  # an integer beyond any float (10**400)
            raise ApiError(
                422,
                f"{what} is {str(v)[:24]}... ({len(str(v))} digits): too large for a number "
                "the model can take; give a finite number",
            ) from None
        if not np.isfinite(f):
            raise ApiError(422, f"{what} is {v}: give a finite number")
        cast = torch.tensor(f, dtype=dtype) if dtype.is_floating_point else None
        if cast is not None and not bool(torch.isfinite(cast)):
            name = str(dtype).replace("torch.", "")
            raise ApiError(
                422,
                f"{what} is {f:g}, beyond the model's input dtype {name} (which holds at most "
                f"{torch.finfo(dtype).max:g}): give a smaller number",
            )
        out.append(f)
    return out


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
        x = s.live_input(image_id(s, image))
        return LiveImage(
            image=image,
            name=s.upload_name(image),
            predictions=(preds := s.predictions(x)),
            predictions_note=None if preds else no_scores(s.entry.open_run()),
            width=int(x.shape[-1]),
            height=int(x.shape[-2]) if x.dim() > 1 else 1,  # a waveform: one channel
            input_note=s.upload_note(image),
            prepared=s.upload_prepared(image),
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


@png_get(
    router,
    "/runs/{run_id}/live/{image}/input.png",
    "The image as the model sees it (resized, cropped)",
)
async def input_png(request: Request, run_id: str, image: str) -> Response:
    from lurker.probe.images import png_bytes

    def work(s: Session) -> bytes:
        return png_bytes(s.input_pil(image_id(s, image)))

    try:
        data = await live_call(request, run_id, work)
    except ApiError as e:
        data = _kept(request, run_id, image, "input.png", e)
    return made_png(data)


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


def _signal_time(s: Session, tr: Any, op: Any, m: Maps | None) -> SignalTime | None:
    """Where the output of ``op`` (shown as ``m``) lies along time on a run of signals:
    the model's input itself (channels first, channels last or a one-axis waveform: its
    maps are the signal's channels) or an elementwise copy of it (its channels and
    samples, see :meth:`Session.keeps_input`), or its stride in samples where the receptive field
    along the signal's time is exact (never a guess: a field through an op of unknown
    footprint gives none)."""
    if m is None or m.one_value_maps:
        return None
    run = s.entry.open_run()
    layout = signal_layout(run)
    if layout is None:
        return None  # not a signal run
    channels, length, last = layout
    if s.keeps_input(op):  # the input, or an elementwise chain on it (a dropout, x * 0.5)
        # its maps one per channel of the input, in order (units on the channel axis)
        if list(m.maps.shape) != [channels, 1, length] or (
            len(m.shape) == 3 and (m.unit_axis != 2 if last else m.unit_axis not in (None, 1))
        ):
            return None
        model_input = getattr(op, "kind", None) == "input"
        return SignalTime(model_input=model_input, channels=True, stride=1.0, start=0.0)
    time = _time_axis(m)
    if time is None:
        return None
    # each op's field along time, once per session (its live trace is made once)
    fields = s.cached(("live-time-fields", s.entry.generation), lambda: _fields(tr, run))
    rf = fields.get(op.index)
    if rf is None or not rf.exact or rf.full or rf.x.dim != time or rf.x.stride <= 0:
        return SignalTime()  # (a flip's negative stride: steps run backwards, said as unknown)
    return SignalTime(stride=float(rf.x.stride), start=float(rf.x.start))


def _fields(tr: Any, run: Any) -> dict[int, Any]:
    """Every op's receptive field along the signal's time on the live trace ``tr``; none
    where the field rules cannot follow the graph (no stride then, not a wrong one)."""
    from lurker.graph.receptive import receptive_fields

    try:  # time on the input's axis 1 where it is not its last
        return receptive_fields(tr, time_axis=signal_time_axis(run))
    except Exception:
        return {}


def _time_axis(m: Maps) -> int | None:
    """The axis of a side's tensor ``(1, ., .)`` its lines run along: the one that is not
    its units' (an LSTM's ``(1, T, units)``: axis 1), axis 2 where the maps are the tensor
    as stored; None for a side that is not one row per unit over time."""
    if len(m.shape) != 3 or m.maps.shape[1] != 1:
        return None
    if m.unit_axis is None:
        return 2 if list(m.maps.shape) == [m.shape[1], 1, m.shape[2]] else None
    return {1: 2, 2: 1}.get(m.unit_axis)


@router.get(
    "/runs/{run_id}/live/{image}/ops/{op}",
    response_model=LiveOp,
    summary="An op of the trace on this image: its input and output shapes, its kernel",
)
async def live_op(request: Request, run_id: str, image: str, op: str) -> LiveOp:
    return await live_call(request, run_id, lambda s: _live_op(s, image, op))


def _live_op(s: Session, image: str, op: str) -> LiveOp:
    node, inp, out = s.op_maps(image_id(s, image), op)
    k = s.conv_kernel(node)
    tr = s.trace()
    from lurker.graph.nodes import OpRef, refs

    args = refs(node)
    ref = next((r for r in args if isinstance(r, OpRef)), None)
    src = None if ref is None or inp is None else tr.ops[ref.index]
    return LiveOp(
        op=node.label,
        index=node.index,
        name=node.name,
        kind=node.kind,
        input=None if inp is None else _side(inp),
        input_op=None if src is None else src.label,
        other_inputs=_other_inputs(tr, args, None if src is None else ref),
        output=_side(out),
        input_time=None if src is None else _signal_time(s, tr, src, inp),
        output_time=_signal_time(s, tr, node, out),
        attention=node.name in ATTENTION or node.index in written_attention(s),
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


def _other_inputs(tr: Any, args: list[Any], shown: Any) -> list[OtherInput]:
    """The tensor arguments of an op besides ``shown`` (the one its input maps are of),
    each once, in argument order: the ops' outputs by label, the parameters by name."""
    from lurker.graph.nodes import OpRef

    out: list[OtherInput] = []
    seen = {shown}
    for r in args:
        if r in seen:
            continue
        seen.add(r)
        if isinstance(r, OpRef):
            meta = tr.ops[r.index].outputs[r.output]
            out.append(OtherInput(op=tr.ops[r.index].label, shape=list(meta.shape)))
        else:
            out.append(OtherInput(param=r.name, shape=list(r.shape)))
    return out


def _channel_map(
    s: Session, image: str, op: str, side: str, channel: int
) -> tuple[str, np.ndarray]:
    node, inp, out = s.op_maps(image_id(s, image), op)
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


#: The most values one request for all of an op's lines returns (units x time steps).
MAX_LINE_VALUES = 2_000_000


@json_get(
    router,
    "/runs/{run_id}/live/{image}/ops/{op}/{side}",
    MapValues,
    "Every channel of a 1-D op's input or output (units x time), raw values",
)
async def lines_json(
    request: Request, run_id: str, image: str, op: str, side: Literal["input", "output"]
) -> MapValues:
    """All channels of an op over time at once, ``shape`` ``[channels, T]``: what the live
    view of a run of signals draws as one line per unit (a map one row high would be a
    strip of grey pixels). 409 on a map with rows (an image's: ask per channel)."""

    def work(s: Session) -> MapValues:
        node, inp, out = s.op_maps(image_id(s, image), op)
        pair = inp if side == "input" else out
        if pair is None:
            raise ApiError(404, f"op {node.label!r} has no tensor input to show (its input: none)")
        maps = pair.maps.numpy()
        if maps.shape[1] != 1:
            raise ApiError(
                409,
                f"the {side} of {node.label!r} has maps of {maps.shape[1]} x {maps.shape[2]} "
                "positions, not one row over time: ask for one channel at a time "
                f"(.../ops/{node.label}/{side}/CHANNEL)",
            )
        if maps.size > MAX_LINE_VALUES:
            raise ApiError(
                413,
                f"the {side} of {node.label!r} holds {maps.size:,} values (more than "
                f"{MAX_LINE_VALUES:,} at once): ask for one channel at a time "
                f"(.../ops/{node.label}/{side}/CHANNEL)",
            )
        a = maps[:, 0, :]
        return MapValues(shape=list(a.shape), **_values(a))

    return await live_call(request, run_id, work)


@png_get(
    router,
    "/runs/{run_id}/live/{image}/ops/{op}/{side}/{channel}.png",
    "One channel of an op's input or output as an 8-bit grayscale PNG",
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
        "X-Lurker-Scale": str(scale),
        # over the finite values: "none" when no value is finite
        "X-Lurker-Min": range_header(lo),
        "X-Lurker-Max": range_header(hi),
        "X-Lurker-Nonfinite": str(nonfinite),
    }
    return made_png(data, headers)


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
        image_id(s, image)
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
