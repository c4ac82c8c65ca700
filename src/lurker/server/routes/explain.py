"""``/api/runs/{run}/live/{image}/explain``: why the model decided this, per method.

Each method of :data:`lurker.explain.METHODS` explains the current live image (an upload
or ``sample-N``) for a target: a class index, ``top`` (the top predicted class) or a unit
``LAYER:CHANNEL``. One attribution per (image, method, target, layer) is computed on the
model's own thread (``deps.live_call``, as the live routes do: a request waiting for a
busy model holds no worker thread, so the run-store endpoints stay fast), and kept in a
small LRU, so the page's PNG and JSON requests and a later opacity
or overlay change cost no recomputation. A dataset sample's explanation by the run's own
model is also kept in the run's ``cache/explain/`` (the exact heatmap and its metadata), so a
later server answers without the model and ``lurker export`` can write it
(``lurker images RUN --explanations`` fills it ahead). Concept relevance is kept the same
way: every unit's relevance and the conditional heatmaps made so far, in one ``.npz``.

The heatmap is ``Explanation.heatmap``: the attribution summed over the input's channels
(one channel's value where each holds the whole, as Grad-CAM's do),
coloured as :func:`lurker.explain.overlay.colorize` does: scaled by ``max |heatmap|`` (one
scale for both signs), signed methods blue-white-red, unsigned ones black-red-yellow, with
opacity ``|heatmap| / max |heatmap|``. ``overlay=0`` serves that as RGBA (the page stacks
it over the image); the default draws it over the image as the model sees it.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import re
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any

import numpy as np
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from lurker.errors import LurkerError, collected
from lurker.explain.base import BASELINE_EXAMPLES
from lurker.explain.tokens import SUMMED, TOKEN_METHODS
from lurker.store import atomic_write_bytes
from lurker.store.files import safe_component
from lurker.vocab import embedding_reads_ids, words_of

from ..classes import class_names, name_of
from ..deps import cached_or_live, entry, range_header, session
from ..errors import ApiError, model_failed
from ..schemas import (
    ConceptRanking,
    ConceptUnit,
    ExplainedIndex,
    ExplainMethod,
    ExplainMethods,
    ExplainResult,
)
from ..session import Session
from ..state import signal_words
from . import json_get, made_png, png_get
from .live import image_id

router = APIRouter(prefix="/api", tags=["explain"])


#: Heatmaps smaller than this (pixels, longer side) are upscaled by nearest neighbour.
MIN_PX = 224
#: Attributions kept per served run (a 224x224 heatmap is 200 KB).
CACHED = 64
_SAMPLE = re.compile(r"sample-[0-9]{1,19}")


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
    #: what the method warned of (a Grad-CAM map the target does not reach, guided
    #: backprop on a network with no ReLU): what the page says under the heatmap
    notes: list[str] = field(default_factory=list)


class ExplainCache:
    """LRU of a served run's explain answers: :class:`Result` by (image, method, target,
    layer), and Grad-CAM's default layer by (image, target)."""

    def __init__(self, size: int = CACHED) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, ...], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, ...]) -> Any:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key: tuple[str, ...], value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


_caches_lock = threading.Lock()


def _cache(s: Session, name: str = "explain_cache") -> ExplainCache:
    """The session's cache ``name``: its attributions, or (``explain_defaults``) the
    default layers found for them."""
    with _caches_lock:
        cache = getattr(s, name, None)
        if cache is None:
            cache = ExplainCache()
            setattr(s, name, cache)
        return cache


def _methods() -> dict[str, Any]:
    import lurker.explain as xp

    return xp.METHODS


def _needs_layer(cls: Any) -> bool:
    params = inspect.signature(cls.compute).parameters
    return "layer" in params and params["layer"].kind is inspect.Parameter.KEYWORD_ONLY


def _spatial_layers(s: Session) -> list[str]:
    """The run's layers whose units make maps larger than 1x1 (by their layouts: channels
    of a conv, channels-last maps, tokens of image patches; on a signal, positions along
    time): Grad-CAM's and concept relevance's choices."""
    from lurker.probe.layout import Layout

    run = s.entry.open_run()
    signal = s.signal_shape() is not None
    out = []
    for info in run.layers:
        if info.shape is None:
            continue
        shape = list(info.shape)  # stored without the batch axis
        if info.layout:  # lurker.explain's own rule (Grad-CAM's choices)
            lay = Layout.from_dict(info.layout)
            shape.insert(lay.batch, 1)  # the layout's axes count it
            spatial = lay.makes_map(shape, line=signal)
        else:  # a run from before layouts: (C, H, W) as the probe then read it
            spatial = len(shape) == 3 and shape[1] * shape[2] > 1
        if spatial:
            out.append(info.name)
    return out


#: ops that mix a sequence's tokens: in a ViT whose head reads the class token, the patch
#: tokens after the last of them no longer reach the output (their Grad-CAM is all zeros)
_ATTENTION = ("scaled_dot_product_attention", "_native_multi_head_attention", "softmax")


def _reads_one_token(op: Any) -> bool:
    """Whether ``op`` picks single entries of an axis by an int index (``x[:, 0]``,
    ``x.select(1, 0)``): how a class-token head reads its token. A slice (``x[:, 1:]``,
    timm's average over the patch tokens) keeps them all."""
    if op.name == "select":
        return True
    if op.name not in ("getitem", "__getitem__"):
        return False
    index = op.args[1] if len(op.args) > 1 else None
    parts = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(p, int) and not isinstance(p, bool) for p in parts)


def _before_last_attention(s: Session, layers: list[str]) -> list[str]:
    """``layers`` up to the last one probed before the graph's last attention op, where
    the head reads one token after it (a ViT's class token: the patch tokens after the last
    attention do not reach it); all of them when the graph has no attention, when none of
    them comes before it, or when the head reads every token (Swin's and timm's average
    pooling: the last map reaches the target, as ``lurker.explain``'s own default finds by
    its gradient)."""
    run = s.entry.open_run()
    try:
        ops = run.graph.ops
        index = {i.name: i.op_index for i in run.layers}
    except LurkerError:  # a run without its graph: nothing to go by
        return layers
    last = max((op.index for op in ops if op.name in _ATTENTION), default=None)
    if last is None:
        return layers
    if not any(_reads_one_token(op) for op in ops if op.index > last and op.kind == "op"):
        return layers
    early = [n for n in layers if index.get(n) is not None and index[n] < last]
    return early or layers


def _default_layer(s: Session, target: str, before: bool = False) -> str | None:
    """Concept relevance's layer when none is asked (its units get unit pages, so a probed
    layer), and Grad-CAM's for a unit target: the run's last probed spatial layer (before
    the last attention op where the head reads one token: patch tokens still reach a
    class-token head there), or for a unit target of a probed layer the last one at or
    before that layer (the target must depend on the layer; ``before``: strictly before
    it, as concept relevance needs the relevance to pass the layer). Grad-CAM for a class
    uses ``lurker.explain``'s own default, as Python does."""
    layers = _spatial_layers(s)
    names = [i.name for i in s.entry.open_run().layers]
    unit_layer = _unit_layer(s, target)
    if unit_layer is not None:
        upto = names.index(unit_layer) - (1 if before else 0)
        layers = [n for n in layers if names.index(n) <= upto]
    else:
        layers = _before_last_attention(s, layers)
    return layers[-1] if layers else None


def _unit_layer(s: Session, target: str) -> str | None:
    """The probed layer of a unit target ``LAYER:CHANNEL[:Y:X]``, else None."""
    names = {i.name for i in s.entry.open_run().layers}
    unit_layer = target.strip().rsplit(":", 1)[0] if ":" in target else None
    while unit_layer is not None and unit_layer not in names and ":" in unit_layer:
        unit_layer = unit_layer.rsplit(":", 1)[0]  # LAYER:CHANNEL:Y:X
    return unit_layer if unit_layer in names else None


def _layer_module(s: Session, name: str | None) -> str | None:
    """The module that ran a layer's op: a run layer's module, or for a trace label (the
    explain package's default layer) its op's module in the run's graph; else None."""
    if not name:
        return None
    run = s.entry.open_run()
    info = next((i for i in run.layers if i.name == name), None)
    if info is not None:
        return info.module or None
    try:
        ops = run.graph.ops
    except LurkerError:  # a run without its graph
        return None
    return next((op.module or None for op in ops if op.label == name), None)


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


def _options(method: str, x: Any, length: int | None = None) -> dict[str, Any]:
    """The server's options per method: deterministic (a seeded SmoothGrad, so the cache
    and a recomputation agree) and bounded in cost (about 15x15 occlusion windows at any
    input size; about 30 along a signal of ``length`` samples)."""
    if method == "smoothgrad":
        return {"seed": 0}
    if method == "occlusion" and length is not None:  # a signal: windows along time
        window = max(2, round(length / 16))  # across all channels (its (C, T) or (T, C))
        return {"window": window, "strides": max(1, window // 2)}
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


def _key(
    s: Session, image: str, method: str, target: str, layer: str | None
) -> tuple[str, str, str, str]:
    """The request's cache key (image, method, target, layer; the layer method's default
    layer when none is asked), or the error that says what is wrong with it."""
    methods = _methods()
    cls = methods.get(method)
    if s.token_length() is not None or s.vector_length() is not None:
        image = _flat_sample(s, image, method if cls is not None else None)
    elif s.signal_shape() is not None:
        image = _signal_sample(s, image)
    else:
        image = image_id(s, image)
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
    if layer is None and _needs_layer(cls) and _unit_layer(s, target) is not None:
        layer = _default_layer(s, target)  # a unit of a probed layer: at or before it
    # else "": lurker.explain's own default, as in Python (a ViT's last block's first norm,
    # which is not a probed layer), resolved per image when computed
    return (image, method, target.strip(), layer or "")


#: why a run of token ids that no nn.Embedding reads has no explanation
_NO_EMBEDDING = (
    "Explain attributes token ids at the nn.Embedding that looks them up, and this model "
    "reads its ids otherwise (an EmbeddingBag, one_hot, an index): no method applies"
)


def _flat_sample(s: Session, image: str, method: str | None) -> str:
    """On a run whose inputs have no picture (token ids, feature vectors): ``image``
    checked as a dataset sample (uploads are images, which such a run does not take) and
    ``method`` as one that scores each token or feature (409 naming those that do: the
    others draw on an image's pixels)."""
    from lurker.explain.tokens import not_for_tokens

    length = s.token_length()
    tokens = length is not None
    what = (
        f"sequences of {length} token ids" if tokens else f"vectors of {s.vector_length()} features"
    )
    if not _SAMPLE.fullmatch(image):
        raise ApiError(
            409,
            f"this run's inputs are {what}: Explain attributes a dataset sample's "
            f"{'tokens' if tokens else 'features'} (sample-N), and uploads (images) do not "
            f"apply; got {image!r}",
        )
    _check_sample(s, image)
    if tokens and not embedding_reads_ids(s.entry.open_run().graph):
        raise ApiError(409, _NO_EMBEDDING)
    if method is not None and method not in TOKEN_METHODS:
        if tokens:
            raise ApiError(409, str(not_for_tokens(method)))
        raise ApiError(
            409,
            f"method {method!r} draws on an image, and this run's inputs are {what}; the "
            "methods that score each feature: " + ", ".join(TOKEN_METHODS),
        )
    return image


def _check_sample(s: Session, image: str) -> None:
    """``sample-N`` names a sample of the run (404 naming the range if not)."""
    last = s.entry.last_sample_id()
    if not 0 <= int(image[7:]) <= last:
        raise ApiError(
            404, f"no sample {image[7:]} in run {s.entry.id!r}: sample ids are 0..{last}"
        )


def _signal_sample(s: Session, image: str) -> str:
    """On a run of signals ``(C, T)``: ``image`` checked as a dataset sample (uploads are
    images, which such a run does not take)."""
    c, t = s.signal_shape() or (0, 0)
    if not _SAMPLE.fullmatch(image):
        raise ApiError(
            409,
            f"this run's inputs are signals of {signal_words((c, t))}: Explain attributes "
            f"a dataset sample's signal (sample-N), and uploads (images) do not apply; got "
            f"{image!r}",
        )
    _check_sample(s, image)
    return image


def _hit(s: Session, key: tuple[str, str, str, str], read: Any = None) -> Any:
    """The answer from the server's LRU or, read by ``read`` (default: an attribution's
    files), the run's ``cache/``; never the model."""
    cache = _cache(s)
    hit = cache.get(key) or (read or _read_stored)(s, key)
    if hit is not None:
        cache.put(key, hit)
    return hit


def _explained(
    s: Session, image: str, method: str, target: str, layer: str | None, keep: bool = True
) -> tuple[Result, bool]:
    """The attribution (cached), or the error that says what is wrong; on the model's
    thread. ``keep``: also write it into the run's ``cache/`` (see :func:`unkept_result`)."""
    key = _key(s, image, method, target, layer)
    hit = _hit(s, key)
    if hit is not None:
        return hit, True
    x = s.live_input(key[0])
    model = s.model()
    cache = _cache(s)
    # what LRP's refusal suggests instead: not integrated gradients where the model fails
    # on the zeros the explorer runs it from (asked before the lock, which that takes)
    instead = _NO_IG_METHODS if method == "lrp" and zeros_refused(s) is not None else None
    with s.model_lock:
        hit = cache.get(key)  # computed by a request that held the lock before this one
        if hit is not None:
            return hit, True
        layer = key[3] or None
        if layer is None and _needs_layer(_methods()[method]):
            layer = _own_default(s, model, x, target, key[0])
        result = _compute(s, model, x, method, target, layer, instead)
        cache.put(key, result)
        if keep:
            _write_disk(s, key, result)
    return result, False


def unkept_result(
    s: Session, image: str, method: str, target: str = "top", layer: str | None = None
) -> tuple[tuple[str, str, str, str], Result]:
    """The explanation and its cache key, computed (or read) but not yet written into
    the run's ``cache/``: ``lurker images --explanations`` makes every method of a sample
    before it writes any file of it, so that a method that fails leaves no sample half
    explained (:func:`keep_result` writes it)."""
    return _key(s, image, method, target, layer), _explained(
        s, image, method, target, layer, keep=False
    )[0]


def keep_result(s: Session, key: tuple[str, str, str, str], result: Result) -> None:
    """Write an :func:`unkept_result` into the run's ``cache/``."""
    _write_disk(s, key, result)


def cached_result(
    s: Session, image: str, method: str, target: str = "top", layer: str | None = None
) -> Result | None:
    """The explanation the run's ``cache/`` (or the server's LRU) holds for this request
    (the layer method's default layer when ``layer`` is None), or None; never runs the
    model."""
    try:
        return _hit(s, _key(s, image, method, target, layer))
    except ApiError:
        return None


def stored_result(
    s: Session,
    image: str,
    method: str,
    target: str = "top",
    layer: str | None = None,
    older: bool = True,
) -> Result | None:
    """The explanation the run's ``cache/`` holds on disk for this request, or None: what
    a fresh server (or a static export) can answer without the model, unlike the LRU,
    which also holds a foreign model's answers and uploads. ``older``: a layer method's
    default may be the file an older lurker made at its default then (see
    :func:`_read_stored`)."""
    try:
        return _read_stored(s, _key(s, image, method, target, layer), older=older)
    except ApiError:
        return None


# ------------------------------------------------------------------ the run's cache/
def disk_file(s: Session, key: tuple[str, str, str, str], writing: bool = False) -> FilePath | None:
    """``cache/explain/<image>/<method>-<target>[-<layer>].json`` for a dataset sample
    explained by the run's own model; None for uploads (their ids live only as long as
    the server) and for a foreign model (what it makes is not the run's). A cache not
    stamped with the run's model (an older lurker's, of unknown origin) is read as empty,
    and ``writing`` makes it this model's first (its untrusted files dropped)."""
    image, method, target, layer = key
    if not _SAMPLE.fullmatch(image) or s.foreign_model:
        return None
    if writing:
        try:
            s.claim_cache()
        except OSError:  # a read-only run: kept in memory only
            return None
    elif not s.cache_trusted():
        return None
    parts = [method, target] + ([layer] if layer else [])
    name = "-".join(safe_component(p) for p in parts)
    return s.entry.path / "cache" / "explain" / image / f"{name}.json"


#: what a cached heatmap is: 2 since Grad-CAM's and channel-spanning occlusion's are their
#: map, not its sum over the channels (version 1, unversioned, was C times larger)
HEATMAP_VERSION = 2


def _read_disk(s: Session, key: tuple[str, str, str, str]) -> Result | None:
    """The explanation from the run's cache: ``.npy`` (the heatmap, float32, exact) and
    ``.json`` (the rest, written last: its presence means the pair is complete)."""
    meta = disk_file(s, key)
    if meta is None:
        return None
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
        heat = np.load(meta.with_suffix(".npy"), allow_pickle=False)
    except (OSError, ValueError):
        return None
    if doc.get("key") != list(key) or heat.ndim != 2 or doc.get("version") != HEATMAP_VERSION:
        return None  # a name collision, or a heatmap an older lurker made: recompute
    import torch

    return Result(
        heat=torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32)),
        signed=bool(doc["signed"]),
        target=str(doc["target"]),
        target_class=doc["target_class"],
        layer=doc["layer"],
        delta=doc["delta"],
        options=doc["options"],
        seconds=float(doc["seconds"]),
        notes=[str(n) for n in doc.get("notes") or []],  # (none in files from before notes)
    )


def _read_stored(
    s: Session, key: tuple[str, str, str, str], older: bool | None = None
) -> Result | None:
    """:func:`_read_disk`, and for a layer method's default layer, the file an older lurker
    precomputed at its default then, the last probed spatial layer (the result names the
    layer it was made at): ``older`` True for what the run holds on disk (the explained
    index, an export), None for a request, where the model, when at hand, makes
    ``lurker.explain``'s own default instead."""
    if older is None:
        older = s.model_reason() is not None
    hit = _read_disk(s, key)
    if hit is None and older and not key[3] and _needs_layer(_methods()[key[1]]):
        legacy = _default_layer(s, key[2])
        if legacy:
            hit = _read_disk(s, (*key[:3], legacy))
    return hit


def _write_disk(s: Session, key: tuple[str, str, str, str], r: Result) -> None:
    """Keep a sample's explanation in the run's cache (atomically, as unit images are); a
    read-only run keeps it in memory only; so does a run probed again while it was made
    (its model and inputs were the old run's)."""
    if s.entry.changed():
        return
    meta = disk_file(s, key, writing=True)
    if meta is None:
        return
    buf = io.BytesIO()
    np.save(buf, r.heat.numpy().astype(np.float32), allow_pickle=False)
    doc = {
        "key": list(key),
        "version": HEATMAP_VERSION,
        "signed": r.signed,
        "target": r.target,
        "target_class": r.target_class,
        "layer": r.layer,
        "delta": r.delta if r.delta is None or math.isfinite(r.delta) else None,
        "options": r.options,
        "seconds": r.seconds,
        "notes": r.notes,
    }
    try:
        atomic_write_bytes(meta.with_suffix(".npy"), buf.getvalue(), durable=False)
        atomic_write_bytes(meta, json.dumps(doc).encode("utf-8"), durable=False)
    except OSError:
        pass


@dataclass
class Prepared:
    """A request's target and layer checked and named as the explain package names them."""

    xb: Any  # the input batch on the model's device
    target: Any  # for lurker.explain: int, "top" or a UnitTarget with a model layer name
    asked: str  # the unit target as asked (the run's layer name), or ""
    layer: str | None  # the layer for lurker.explain (module path or trace label)
    #: the run's layer names by the explain package's names of them, where they differ
    renamed: dict[str, str] = field(default_factory=dict)

    def said(self, message: str) -> str:
        """The explain package's ``message`` in the run's words (``lin:1``, as asked, not
        the op label ``linear_1:1`` it was passed on as)."""
        for model_name, run_name in self.renamed.items():
            message = re.sub(rf"(?<![\w.:]){re.escape(model_name)}(?![\w.])", run_name, message)
        return message


def _prepare(s: Session, model: Any, x: Any, target: str, layer: str | None) -> Prepared:
    """Parse ``target`` (400 when malformed) and check the layers it and ``layer`` name
    (404 with the explain package's message when not in the model)."""
    import torch

    from lurker.explain.base import untouched
    from lurker.explain.cli import parse_target
    from lurker.explain.targets import Forward, UnitTarget

    try:
        parsed = parse_target(target)
    except LurkerError as e:
        raise ApiError(400, str(e).replace("--target", "target")) from None
    asked = ""
    renamed: dict[str, str] = {}
    if isinstance(parsed, UnitTarget):
        asked = str(parsed)
        renamed[_model_name(s, model, parsed.layer)] = parsed.layer
        parsed = UnitTarget(
            _model_name(s, model, parsed.layer),
            parsed.channel,
            parsed.y,
            parsed.x,
            unit_dim=_stored_unit_axis(s, parsed.layer),
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    xb = x.unsqueeze(0).to(device)
    name = None if layer is None else _model_name(s, model, layer)
    if layer is not None and name is not None:
        renamed[name] = layer
    renamed = {k: v for k, v in renamed.items() if k != v}
    prep = Prepared(xb, parsed, asked, name, renamed)
    try:
        with untouched(model):
            Forward(model, xb, parsed, layers=[name] if name else [])
    except LurkerError as e:
        said = prep.said(str(e))
        python = ": name a module path (model.named_modules()) or a trace label (lurker.trace(model, x))."
        if asked and python in said:  # a typed unit: in the page's words, with the run's layers
            layers = [i.name for i in s.entry.open_run().layers]
            more = f", ... {len(layers) - 12} more" if len(layers) > 12 else ""
            said = said.replace(
                python,
                f". A unit is LAYER:CHANNEL, its layer one of this run's ({', '.join(layers[:12])}"
                f"{more}) or any module of the model.",
            )
        raise ApiError(404, said) from None
    return prep


def _own_default(s: Session, model: Any, x: Any, target: str, image: str) -> str:
    """``lurker.explain``'s default layer for this input and target (the last map the
    target reaches: a CNN's last map, a ViT's last block's first norm), as Python's
    ``lurker.explain(model, x, method="gradcam")`` uses; found once per image and target
    (it runs the model a few times), so Grad-CAM and Grad-CAM++ share it."""
    from lurker.explain.base import untouched
    from lurker.explain.gradcam import default_layer

    found = _cache(s, "explain_defaults")
    key = (image, target.strip())
    hit = found.get(key)
    if hit is None:
        prep = _prepare(s, model, x, target, None)
        try:
            with untouched(model):
                hit = default_layer(model, prep.xb, prep.target)
        except LurkerError as e:
            raise ApiError(400, str(e)) from None
        except Exception as e:  # the model's own failure (as _compute says it)
            raise model_failed("Grad-CAM", e) from None
        found.put(key, hit)
    return str(hit)


def _stored_unit_axis(s: Session, name: str | None) -> int | None:
    """The unit axis a probed layer's stored layout names (it may be the user's
    ``--unit-dim``), so that the explorer's unit is the probe's; None for other layers."""
    info = next((i for i in s.entry.open_run().layers if i.name == name), None)
    return None if info is None or not info.layout else int(info.layout["unit"])


def _resolved(asked: str, target: Any) -> tuple[str, int | None]:
    """The target as the responses name it: the unit as asked, or the class index."""
    if asked:
        return asked, None
    return str(int(target[0])), int(target[0])


def _compute(
    s: Session,
    model: Any,
    x: Any,
    method: str,
    target: str,
    layer: str | None,
    instead: tuple[str, ...] | None = None,
) -> Result:
    """One attribution, or the 400 that says why the method cannot give it; ``instead``:
    the gradient methods LRP's refusal names, where not its own (which may not run)."""
    import lurker.explain as xp
    from lurker.explain.base import BaselineError
    from lurker.explain.lrp import NoRule

    vector = s.vector_length() is not None
    if vector and not x.is_floating_point():  # counts, a waveform's integer samples:
        x = x.float()  # attributed as the numbers they are (no gradient w.r.t. integers)
    try:
        prep = _prepare(s, model, x, target, layer)
    except ApiError:
        if layer is not None and method in ("gradcam", "gradcam_plus_plus"):
            _cam_layer_check(s, model, x, layer)  # an LSTM named by hand: a 400 saying why
        raise
    signal = s.signal_shape()
    options = _options(method, x, None if signal is None else signal[1])
    if vector and method == "smoothgrad":  # the paper's noise: 15% of the input's range
        finite = x[x.isfinite()]
        spread = float(finite.max() - finite.min()) if finite.numel() else 0.0
        options["stdev"] = 0.15 * spread if spread > 0 else 0.15
    if prep.layer is not None:
        options["layer"] = prep.layer
    start = time.perf_counter()
    try:
        with collected() as said:  # what the method warns of: the page's notes
            ex = xp.explain(model, prep.xb, target=prep.target, method=method, **options)
    except BaselineError as e:  # the explorer has no baseline option: say where there is one
        raise ApiError(
            400,
            prep.said(str(e)).removesuffix(".")
            + f" (in Python: lurker.explain(model, x, method={method!r}, baseline=...); "
            "the explorer runs it from zeros only).",
        ) from None
    except NoRule as e:
        raise ApiError(400, prep.said(str(e) if instead is None else e.said(instead))) from None
    except LurkerError as e:
        raise ApiError(400, prep.said(str(e))) from None
    except Exception as e:  # the model's own error, said in one line
        raise model_failed(method, e) from None
    seconds = time.perf_counter() - start
    resolved, cls = _resolved(prep.asked, ex.target)
    delta = None if ex.delta is None else float(ex.delta.reshape(-1)[0])
    # token ids (one score per token) and feature vectors (one per feature): a (1, L) map
    flat = prep.xb.dim() == 2 and (not prep.xb.is_floating_point() or s.vector_length() is not None)
    if s.signal_shape() is not None:  # (C, T) per channel, or (1, T): one value per position
        sig = ex.signal(0).float().cpu()
        heat = sig[None] if sig.dim() == 1 else sig
    else:
        heat = ex.attribution[:1].float().cpu() if flat else ex.heatmap(0).float().cpu()
    return Result(
        heat=heat,
        signed=bool(ex.signed),
        target=resolved,
        target_class=cls,
        layer=layer,
        delta=delta,
        options=_jsonable(ex.options),
        seconds=seconds,
        notes=said,
    )


def _cam_layer_check(s: Session, model: Any, x: Any, layer: str) -> None:
    """Grad-CAM's own error for a layer it cannot read as a map (an LSTM, whose op returns
    its output and its state): what the layer outputs and which layers qualify (400)."""
    import torch

    from lurker.explain.axes import input_axes
    from lurker.explain.base import untouched
    from lurker.explain.gradcam import is_signal, several_outputs

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    xb = x.unsqueeze(0).to(device)
    name = _model_name(s, model, layer)
    with untouched(model):
        err = several_outputs(model, xb, name, is_signal(input_axes(model, xb), xb))
    if err is not None:
        said = str(err) if name == layer else str(err).replace(repr(name), repr(layer))
        raise ApiError(400, said)


# ------------------------------------------------------------------ concept relevance
@dataclass
class ConceptResult:
    """Concept relevance at one layer: every unit's relevance and the conditional
    heatmaps computed so far (more are added as unit PNGs are asked for)."""

    target: str
    target_class: int | None
    composite: str
    relevance: Any  # (C,) float tensor
    heat: dict[int, Any]  # unit -> (H, W) conditional heatmap
    seconds: float


def _concept_key(
    s: Session, image: str, target: str, layer: str | None
) -> tuple[str, str, str, str]:
    """The request's cache key (image, "concepts", target, layer; the default layer when
    none is asked), or the error that says what is wrong with it."""
    import lurker.explain as xp

    if not hasattr(xp, "concepts"):
        raise ApiError(404, "this lurker has no concept relevance (lurker.explain.concepts)")
    image = _signal_sample(s, image) if s.signal_shape() is not None else image_id(s, image)
    if layer is None:
        layer = default_concept_layer(s, target)
        if layer is None:
            raise ApiError(
                400,
                "name a layer: this run has no probed layer with a spatial output "
                "(before the target unit's layer)",
            )
    return (image, "concepts", target.strip(), layer)


def _wanted(r: ConceptResult, units: Any) -> list[int]:
    """``units`` (a list, or an int: the top that many by relevance) of ``r``'s layer."""
    if isinstance(units, int):
        return [int(u) for u in r.relevance.argsort(descending=True)[:units]]
    return list(units)


def _concept_hit(s: Session, key: tuple[str, str, str, str], units: Any) -> ConceptResult | None:
    """The concept relevance from the server's LRU or the run's ``cache/`` when it holds
    the heatmaps of ``units`` (units past the layer's count need none); never the model."""
    hit = _hit(s, key, _read_concepts)
    if hit is None:
        return None
    channels = int(hit.relevance.numel())
    return hit if all(u in hit.heat for u in _wanted(hit, units) if u < channels) else None


def _concepts(
    s: Session, image: str, target: str, layer: str | None, units: Any
) -> tuple[ConceptResult, str, bool]:
    """The layer's concept relevance, with the conditional heatmaps of ``units`` (a list,
    or an int: the top that many) computed; cached per (image, target, layer); on the
    model's thread."""
    import lurker.explain as xp
    from lurker.explain.lrp import NoRule
    from lurker.explain.relevance import no_rule_said

    key = _concept_key(s, image, target, layer)
    image, layer = key[0], key[3]
    hit = _concept_hit(s, key, units)
    if hit is not None:
        return hit, layer, True
    cache = _cache(s)
    x = s.live_input(image)
    model = s.model()
    # what LRP's refusal suggests instead, asked before the lock (as in _explained)
    no_ig = zeros_refused(s) is not None
    with s.model_lock:
        hit = cache.get(key)
        if hit is not None:
            missing = [u for u in _wanted(hit, units) if u not in hit.heat]
            if not missing:
                return hit, layer, True
        prep = _prepare(s, model, x, target, layer)
        start = time.perf_counter()
        try:
            axis = _stored_unit_axis(s, layer)
            if hit is None:
                c = xp.concepts(
                    model,
                    prep.xb,
                    prep.target,
                    layer=prep.layer,
                    unit_dim=axis,
                    **({"top": units} if isinstance(units, int) else {"units": list(units)}),
                )
            else:
                c = xp.concepts(
                    model, prep.xb, prep.target, layer=prep.layer, units=missing, unit_dim=axis
                )
        except LurkerError as e:
            rule = e.__context__ if isinstance(e.__context__, NoRule) else None
            if no_ig and rule is not None:  # not integrated gradients, which fails on zeros
                raise ApiError(400, no_rule_said(rule, _NO_IG_METHODS[0])) from None
            raise ApiError(400, str(e)) from None
        except Exception as e:  # the model's own error, said in one line
            raise model_failed("concept relevance", e) from None
        seconds = time.perf_counter() - start
        # (k, C, H, W); a signal's (k, C, T) or (k, T, C), a waveform's (k, T)
        maps = c.heatmaps[0].float().cpu()
        if s.signal_shape() is not None:  # (C, T) per channel along time, as LRP's scores
            from lurker.explain.axes import input_axes

            if maps.dim() == 2:  # a waveform the model gives its one channel itself
                maps = maps[:, None]
            elif input_axes(model, prep.xb).channel == 2:  # a channels-last (T, C) signal
                maps = maps.transpose(1, 2)
            new = {int(u): maps[i].contiguous() for i, u in enumerate(c.units[0].tolist())}
        else:
            new = {int(u): maps[i].sum(0) for i, u in enumerate(c.units[0].tolist())}
        if hit is None:
            resolved, cls = _resolved(prep.asked, c.target)
            hit = ConceptResult(
                target=resolved,
                target_class=cls,
                composite=c.composite,
                relevance=c.relevance[0].double().cpu(),
                heat=new,
                seconds=seconds,
            )
            cache.put(key, hit)
        else:
            hit.heat.update(new)
            hit.seconds = seconds
        _write_concepts(s, key, hit)
    return hit, layer, False


def _read_concepts(s: Session, key: tuple[str, str, str, str]) -> ConceptResult | None:
    """Concept relevance from the run's cache: one ``.npz`` (every unit's relevance, the
    conditional heatmaps made so far, and the rest as JSON), rewritten whole as more
    heatmaps are made, so it is never half-written."""
    path = disk_file(s, key)
    if path is None:
        return None
    try:
        with np.load(path.with_suffix(".npz"), allow_pickle=False) as z:
            doc = json.loads(str(z["meta"]))
            relevance, units, heat = z["relevance"], z["units"], z["heat"]
    except (OSError, ValueError, KeyError):
        return None
    if doc.get("key") != list(key) or relevance.ndim != 1 or heat.ndim != 3:
        return None  # a name collision or a file from another lurker: recompute
    if len(units) != len(heat):
        return None
    import torch

    return ConceptResult(
        target=str(doc["target"]),
        target_class=doc["target_class"],
        composite=str(doc["composite"]),
        relevance=torch.from_numpy(np.ascontiguousarray(relevance, dtype=np.float64)),
        heat={
            int(u): torch.from_numpy(np.ascontiguousarray(h, dtype=np.float32))
            for u, h in zip(units, heat)
        },
        seconds=float(doc["seconds"]),
    )


def _write_concepts(s: Session, key: tuple[str, str, str, str], r: ConceptResult) -> None:
    """Keep a sample's concept relevance in the run's cache (see :func:`_read_concepts`)."""
    if s.entry.changed():  # (probed again meanwhile: not the new run's)
        return
    path = disk_file(s, key, writing=True)
    if path is None:
        return
    units = sorted(r.heat)
    meta = {
        "key": list(key),
        "target": r.target,
        "target_class": r.target_class,
        "composite": r.composite,
        "seconds": r.seconds,
    }
    buf = io.BytesIO()
    np.savez(
        buf,
        meta=np.array(json.dumps(meta)),
        relevance=r.relevance.double().numpy(),
        units=np.array(units, dtype=np.int64),
        heat=np.stack([r.heat[u].float().numpy() for u in units]),
    )
    with contextlib.suppress(OSError):  # a read-only run keeps it in memory only
        atomic_write_bytes(path.with_suffix(".npz"), buf.getvalue(), durable=False)


#: How many units the Explain page ranks (and a precomputed ranking holds maps of).
CONCEPT_TOP = 8


def default_concept_layer(s: Session, target: str = "top") -> str | None:
    """The layer concept relevance is computed at when none is asked."""
    return _default_layer(s, target, before=True)


def stored_concepts(s: Session, image: str, target: str = "top") -> str | None:
    """The default layer when the run's cache holds on disk its concept relevance for
    ``image`` and ``target`` with the top units' maps (what the Explain page asks first),
    else None."""
    try:  # (a signal run's samples are checked as such: image_id refuses them)
        key = _concept_key(s, image, target, None)
    except ApiError:
        return None
    layer = key[3]
    r = _read_concepts(s, key)
    # only a ranking with the maps the page shows (a unit's PNG asked alone keeps fewer)
    if r is None or not all(u in r.heat for u in _wanted(r, CONCEPT_TOP)):
        return None
    return layer


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

    s = session(request, entry(request, run_id))
    layers = _spatial_layers(s)
    by_embedding = s.token_length() is None or embedding_reads_ids(s.entry.open_run().graph)
    shown = {
        name: cls
        for name, cls in _methods().items()
        # token ids and feature vectors: the methods that score each token or feature
        # (none for ids no nn.Embedding reads)
        if (s.token_length() is None and s.vector_length() is None)
        or (name in TOKEN_METHODS and (s.token_length() is None or by_embedding))
    }
    # on a signal, each unit's conditional heatmap is scores along time
    concepts = hasattr(sys.modules.get("lurker.explain"), "concepts")
    refused = refusals(s) if concepts or set(shown) & set(_REFUSABLE) else {}
    zeros = zeros_refused(s) if "integrated_gradients" in shown else None
    # integrated gradients cannot be the way round LRP or Grad-CAM where it is greyed too
    instead = _INSTEAD_NO_IG if zeros is not None else _INSTEAD
    refused = {k: f"{why}; {instead}" for k, why in refused.items()}
    if zeros is not None:
        like = BASELINE_EXAMPLES[
            "vector"
            if s.vector_length() is not None
            else "signal"
            if s.signal_shape() is not None
            else "image"
        ]
        refused["integrated_gradients"] = (
            "Integrated gradients starts from an all-zero input, the only baseline the "
            f"explorer runs it from, and this model fails on one ({zeros}); in Python, "
            "lurker.explain(model, x, method='integrated_gradients', baseline=...) runs it "
            f"from a baseline the model accepts, such as {like}"
        )
    return ExplainMethods(
        methods=[
            ExplainMethod(
                name=name,
                summary=cls.summary,
                needs_layer=_needs_layer(cls),
                # on token ids a gradient's length per token (saliency, SmoothGrad) is
                # >= 0: only the methods whose scores are summed over the embedding keep
                # a sign, as the scores the method returns say
                signed=cls.signed
                if s.token_length() is None or not by_embedding
                else name in SUMMED,
                unavailable=refused.get(name),
            )
            for name, cls in shown.items()
        ],
        default_layer=None,  # Grad-CAM's: lurker.explain's own, per image (see _key)
        concept_layer=default_concept_layer(s, "top"),
        layers=layers,
        concepts=concepts,
        concepts_reason=refused.get(CONCEPTS_KEY) if concepts else None,
    )


#: the methods whose refusal can be told from the model's trace alone; concept
#: relevance (LRP through every layer) is said under CONCEPTS_KEY
_REFUSABLE = ("lrp", "gradcam", "gradcam_plus_plus")
CONCEPTS_KEY = "concepts"
#: what to use where LRP or Grad-CAM cannot go, by the Explain pages' method titles
_INSTEAD = "use Integrated gradients or Input \u00d7 gradient instead"
#: the same where the model refuses integrated gradients' all-zero baseline
_INSTEAD_NO_IG = "use Input \u00d7 gradient or Saliency instead"
#: the same by lurker.explain's names, for LRP's refusal (a 400)
_NO_IG_METHODS = ("input_x_gradient", "saliency")


def zeros_refused(s: Session) -> str | None:
    """The model's own error (``ValueError: ...``, one line) on the all-zero input the
    explorer runs integrated gradients from, its only baseline, and traces the model on
    for :func:`refusals`; None where the model runs on it, or there is no model, or the
    inputs are token ids (whose baseline is the embedding's output, not zeros fed to the
    model). Once per run generation."""
    if s.model_reason() is not None or s.token_length() is not None:
        return None
    try:
        model = s.model()
    except ApiError:
        return None

    def make() -> str | None:
        import torch

        from lurker.explain.base import untouched

        with s.model_lock:
            x = s.example_input(model)
            try:
                with untouched(model), torch.no_grad():
                    model(x)
            except Exception as e:  # the model's refusal of zeros, whatever it raises
                said = " ".join(str(e).split())
                return f"{type(e).__name__}: {said[:200]}" if said else type(e).__name__
        return None

    return s.cached(("explain-zeros", s.entry.generation), make)


def refusals(s: Session) -> dict[str, str]:
    """Why the run's model cannot give each method (and ``concepts``) that it cannot, by
    name, without what to use instead (the page and ``lurker images --explanations`` say
    that each in their own terms): from one trace of a zero input (LRP's rule plan,
    Grad-CAM's map layers), never an attribution; once per run generation. Empty when
    there is no model to ask (a precomputed run served without one keeps what it lists)
    or the run's inputs are not pictures or signals (token ids, feature vectors: those
    methods are not listed)."""
    if (
        s.model_reason() is not None
        or s.token_length() is not None
        or s.vector_length() is not None
    ):
        return {}
    try:
        model = s.model()
    except ApiError:
        return {}

    def make() -> dict[str, str]:
        from lurker.explain import gradcam, lrp

        out: dict[str, str] = {}
        x = None
        if zeros_refused(s) is not None:  # traced on zeros, it fails before any op LRP
            # or Grad-CAM would refuse: traced on the first dataset sample instead
            with contextlib.suppress(ApiError):
                x = s.live_input("sample-0")[None]
        with s.model_lock:
            if x is None:
                x = s.example_input(model)
            else:
                x = x.to(s.example_input(model).device)
            what = gradcam.no_map(model, x)
            no_rule = lrp.no_rule(model, x)
        if what is not None:
            out["gradcam"] = out["gradcam_plus_plus"] = (
                f"Grad-CAM weighs a layer's maps, and no layer of this model makes {what}"
            )
        if no_rule is not None:
            out.update(no_rule_reasons(no_rule))
        return out

    return s.cached(("explain-refusals", s.entry.generation), make)


def no_rule_reasons(no_rule: Any) -> dict[str, str]:
    """Why LRP and concept relevance cannot explain a model with an op LRP has no rule
    for (an :class:`lurker.explain.lrp.NoRule`), without what to use instead: each caller
    says that in its own terms."""
    return {
        "lrp": f"LRP has no rule for {no_rule.plain}",
        CONCEPTS_KEY: (
            f"concept relevance is LRP through every layer, and LRP has no rule for {no_rule.plain}"
        ),
    }


@router.get(
    "/runs/{run_id}/explained",
    response_model=ExplainedIndex,
    summary="The dataset samples whose explanations the run's cache holds (served with no model)",
)
def explained(request: Request, run_id: str) -> ExplainedIndex:
    from ..explained import explained_index

    return ExplainedIndex.model_validate(explained_index(session(request, entry(request, run_id))))


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
    "trace label; default lurker.explain's own (the last map the target reaches: a ViT's last "
    "block's first norm), or for a unit target the last probed spatial layer at or before "
    "the unit's",
)


OVERLAY = Query(True, description="draw over the image (false: RGBA heatmap alone)")
OPACITY = Query(0.5, ge=0, le=1, description="the opacity of the strongest value")
CONCEPT_LAYER = Query(
    None,
    max_length=500,
    description="the layer whose units are ranked: a run layer name, module path or trace "
    "label; default the run's last probed spatial layer",
)


def _png_response(pil: Any, heat: Any, target: str) -> Response:
    from PIL import Image

    from lurker.probe.images import png_bytes

    scale = _scale(tuple(heat.shape))
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    lo, hi, _ = _stats(heat)
    headers = {
        "X-Lurker-Scale": str(scale),
        "X-Lurker-Min": range_header(lo),  # "none" when no value is finite
        "X-Lurker-Max": range_header(hi),
        "X-Lurker-Target": target,
    }
    return made_png(png_bytes(pil), headers)


def _heat_image(
    s: Session, image: str, heat: Any, signed: bool, overlay: bool, opacity: float
) -> Any:
    """The heatmap over the image (RGB), or alone (RGBA)."""
    from PIL import Image

    from lurker.explain.overlay import overlay as draw

    if overlay:
        return draw(heat, _input_pil(s, image), signed=signed, alpha=opacity)
    return Image.fromarray(heat_rgba(heat, signed), "RGBA")


def _input_pil(s: Session, image: str) -> Any:
    """The image as the model sees it; without the dataset, the copy the run's
    explanation cache keeps of a sample (the same pixels)."""
    from PIL import Image

    from ..explained import cached_file

    try:
        return s.input_pil(image)
    except ApiError as e:
        kept = cached_file(s, image, "input.png")
        if e.status != 409 or kept is None:
            raise
        with Image.open(kept) as im:
            return im.copy()


@json_get(
    router,
    "/runs/{run_id}/live/{image}/explain/concepts",
    ConceptRanking,
    "Concept relevance: a layer's units ranked by their share of the relevance (LRP)",
)
async def concepts_json(
    request: Request,
    run_id: str,
    image: str,
    target: str = TARGET,
    layer: str | None = CONCEPT_LAYER,
    top: int = Query(CONCEPT_TOP, ge=1, le=64, description="how many units to rank"),
) -> ConceptRanking:

    def cached(s: Session) -> ConceptRanking | None:
        key = _concept_key(s, image, target, layer)  # a bad request: its error, model or not
        hit = _concept_hit(s, key, top)
        return None if hit is None else _ranking_doc(s, key[0], key[3], hit, top, True)

    return await cached_or_live(
        request, run_id, cached, lambda s: concept_ranking(s, image, target, layer, top)
    )


def concept_ranking(
    s: Session, image: str, target: str, layer: str | None, top: int
) -> ConceptRanking:
    r, name, cached = _concepts(s, image, target, layer, top)
    return _ranking_doc(s, _concept_key(s, image, target, name)[0], name, r, top, cached)


def _ranking_doc(
    s: Session, image: str, name: str, r: ConceptResult, top: int, cached: bool
) -> ConceptRanking:
    total = float(r.relevance.sum())
    # a share of all the relevance that passed the layer, whatever its sign: against the
    # signed total (which can be negative, or near 0) a supporting unit read as -22%
    spread = float(r.relevance.abs().sum())
    ranked = [int(u) for u in r.relevance.argsort(descending=True)[:top]]
    run = s.entry.open_run()
    names = class_names(run)
    cls = r.target_class
    shape = next(iter(r.heat.values())).shape
    signal = s.signal_shape() is not None
    return ConceptRanking(
        image=image,
        layer=name,
        probed=any(i.name == name for i in run.layers),
        target=r.target,
        target_class=cls,
        target_name=None if cls is None else name_of(names, cls),
        composite=r.composite,
        channels=int(r.relevance.numel()),
        total=total,
        units=[
            ConceptUnit(
                unit=u,
                relevance=float(r.relevance[u]),
                share=float(r.relevance[u]) / spread if spread else None,
                heatmap_sum=float(r.heat[u].double().sum()),
                # a signal's conditional heatmap: (C, T) per channel along time
                signal_scores=[
                    [float(v) if math.isfinite(v) else None for v in row]
                    for row in r.heat[u].tolist()
                ]
                if signal and u in r.heat
                else None,
            )
            for u in ranked
        ],
        scale=_scale(tuple(shape)),
        seconds=0.0 if cached else r.seconds,
        cached=cached,
    )


@png_get(
    router,
    "/runs/{run_id}/live/{image}/explain/concepts/{unit}.png",
    "A unit's conditional heatmap: the relevance that flowed through it (overlay=0: bare)",
)
async def concept_png(
    request: Request,
    run_id: str,
    image: str,
    unit: int = Path(ge=0, le=2**31),
    target: str = TARGET,
    layer: str | None = CONCEPT_LAYER,
    overlay: bool = OVERLAY,
    opacity: float = OPACITY,
) -> Response:

    def cached(s: Session) -> Response | None:
        key = _concept_key(s, image, target, layer)  # a bad request: its error, model or not
        if _concept_hit(s, key, [unit]) is None:
            return None
        return concept_png_response(s, image, unit, target, layer, overlay, opacity)

    return await cached_or_live(
        request,
        run_id,
        cached,
        lambda s: concept_png_response(s, image, unit, target, layer, overlay, opacity),
    )


def concept_png_response(
    s: Session,
    image: str,
    unit: int,
    target: str = "top",
    layer: str | None = None,
    overlay: bool = False,
    opacity: float = 0.5,
) -> Response:
    """The concept PNG endpoint's answer (the static export writes its body)."""
    signal = s.signal_shape()
    if signal is not None:
        raise ApiError(
            409,
            f"this run's inputs are signals of {signal_words(signal)}, "
            "which have no picture: the concept ranking's JSON (explain/concepts) holds each "
            "unit's conditional heatmap along time (signal_scores)",
        )
    r, name, _ = _concepts(s, image, target, layer, 1)
    channels = int(r.relevance.numel())
    if unit >= channels:
        raise ApiError(
            404, f"no unit {unit} in layer {name!r}: it has {channels} (0 to {channels - 1})"
        )
    if unit not in r.heat:
        r, name, _ = _concepts(s, image, target, layer, [unit])
    heat = r.heat[unit]
    return _png_response(_heat_image(s, image, heat, True, overlay, opacity), heat, r.target)


@png_get(
    router,
    "/runs/{run_id}/live/{image}/explain/{method}.png",
    "One method's heatmap over the image (overlay=0: the bare heatmap, RGBA)",
)
async def explain_png(
    request: Request,
    run_id: str,
    image: str,
    method: str,
    target: str = TARGET,
    layer: str | None = LAYER,
    overlay: bool = OVERLAY,
    opacity: float = OPACITY,
) -> Response:

    def cached(s: Session) -> Response | None:
        key = _key(s, image, method, target, layer)  # a bad request: its error, model or not
        r = _hit(s, key)
        return None if r is None else _explain_png(s, key[0], r, overlay, opacity)

    return await cached_or_live(
        request,
        run_id,
        cached,
        lambda s: explain_png_response(s, image, method, target, layer, overlay, opacity),
    )


def explain_png_response(
    s: Session,
    image: str,
    method: str,
    target: str = "top",
    layer: str | None = None,
    overlay: bool = False,
    opacity: float = 0.5,
) -> Response:
    """The PNG endpoint's answer (the static export writes its body)."""
    r, _ = _explained(s, image, method, target, layer)
    return _explain_png(s, image, r, overlay, opacity)


def _explain_png(s: Session, image: str, r: Result, overlay: bool, opacity: float) -> Response:
    length = s.token_length()
    if length is not None:
        raise ApiError(
            409,
            f"this run's inputs are sequences of {length} token ids, which have no picture: "
            "the explanation's JSON (the same URL without .png) holds each token's score",
        )
    signal = s.signal_shape()
    if signal is not None:
        raise ApiError(
            409,
            f"this run's inputs are signals of {signal_words(signal)}, "
            "which have no picture: the explanation's JSON (the same URL without .png) holds "
            "the scores along time (signal_scores)",
        )
    features = s.vector_length()
    if features is not None:
        raise ApiError(
            409,
            f"this run's inputs are vectors of {features} features, which have no picture: "
            "the explanation's JSON (the same URL without .png) holds each feature's score",
        )
    pil = _heat_image(s, image, r.heat, r.signed, overlay, opacity)
    return _png_response(pil, r.heat, r.target)


# registered after the PNG: "{method}" without a suffix would take "x.png"
@json_get(
    router,
    "/runs/{run_id}/live/{image}/explain/{method}",
    ExplainResult,
    "One method's attribution of the image: target resolved, min/max/sum, delta, options",
)
async def explain_json(
    request: Request,
    run_id: str,
    image: str,
    method: str,
    target: str = TARGET,
    layer: str | None = LAYER,
) -> ExplainResult:

    def cached(s: Session) -> ExplainResult | None:
        key = _key(s, image, method, target, layer)  # a bad request: its error, model or not
        r = _hit(s, key)
        return None if r is None else _result_doc(s, key[0], method, r, True)

    return await cached_or_live(
        request, run_id, cached, lambda s: explain_result(s, image, method, target, layer)
    )


def explain_result(
    s: Session, image: str, method: str, target: str, layer: str | None
) -> ExplainResult:
    r, cached = _explained(s, image, method, target, layer)
    return _result_doc(s, image, method, r, cached)


def _result_doc(s: Session, image: str, method: str, r: Result, cached: bool) -> ExplainResult:
    lo, hi, total = _stats(r.heat)
    names = class_names(s.entry.open_run())
    name = None if r.target_class is None else name_of(names, r.target_class)
    scores = tokens = text = None
    if s.token_length() is not None or s.vector_length() is not None:
        # one score per token or feature, in the input's order
        scores = [float(v) if math.isfinite(v) else None for v in r.heat[0].tolist()]
    if s.token_length() is not None:
        sid = int(image[7:])
        try:  # (a cached answer on a server without the dataset shows the scores alone)
            tokens = s.sample_tokens(sid, s.entry.sample_row(sid)[1])
        except ApiError:
            tokens = None
        vocab = s.vocab()
        text = None if tokens is None or vocab is None else words_of(tokens, vocab)
    signal_scores = None
    if s.signal_shape() is not None:  # per channel along time, or one row per position
        signal_scores = [
            [float(v) if math.isfinite(v) else None for v in row] for row in r.heat.tolist()
        ]
    return ExplainResult(
        signal_scores=signal_scores,
        image=image,
        method=method,
        target=r.target,
        target_class=r.target_class,
        target_name=name,
        layer=r.layer,
        layer_module=_layer_module(s, r.layer),
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
        notes=r.notes,
        scores=scores,
        tokens=tokens,
        token_text=text,
    )
