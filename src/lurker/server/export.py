"""``lurker export RUN SITE``: the explorer as a static site, no Python needed to view it.

The site is the same front end, told by ``<meta name="lurker-mode" content="static">`` to
read files instead of the API. Files are written straight from the run by the API's own
route functions (no HTTP round trip per file), so every document equals the API's answer,
and the layout is made to scale to real runs (see docs/explorer.md, "Static export"):

* ``data/<static_path(api path)>.json`` for the run list, each run's summary, graph,
  dataset map (when it has one) and layers, and for the samples that some unit ranks in
  its top-k (the others have no page);
* a layer's units in chunks, ``data/runs/R/layers/L/units/chunk-<i>.json`` (``units``:
  the API's unit documents, in order), found through ``units/index.json`` (the chunk size,
  and each unit's top image and crop box for the layer grid);
* each top-k sample's image once, ``data/runs/R/samples/<id>/image.png``: the front end
  cuts the receptive-field crops of entries whose peak the run stores (the max lists', and
  the mean lists' of runs probed since the probe kept them) from it (as
  ``lurker.probe.images.crop`` does), and their gradient crops from the cached gradient
  image, so no crop file per entry; cached gradients and an older run's mean-list crops
  (they need the model: ``lurker images RUN``) are exported at their API paths;
* ``data/runs/R/exported-samples.json``: the samples the site holds;
* the explanations precomputed into the run's cache (``lurker images RUN --explanations``)
  at the Explain endpoints' paths (the top class; bare heatmap PNG and JSON per method),
  each explained sample's predictions and input, and ``data/runs/R/explained.json``
  saying which samples have which methods;
* with the run's recorded model (loaded here, once: the site itself runs none), a first
  layer's filters at the Filters endpoints' paths: the run's ``filters.json``, each
  filter layer's ``filters.json`` and ``filters.png``, and each unit's ``filter.png`` at
  the scale the unit page asks for (``filter.png?scale=N``, a file name as any query);
  ``units/index.json`` says whether its layer has them (``filters``), so a page never
  asks for a file the export did not write;
* ``.lurker-export.json``: every file the export wrote, so that the next export into the
  folder deletes exactly those (stale bundles and images go) and never another file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from lurker.errors import LurkerError, warn
from lurker.store.featviz import featviz_images
from lurker.store.files import UNKNOWN_ORIGIN, cache_trusted, cache_unknown, safe_component
from lurker.vocab import VocabLike

from .routes.samples import APPEARANCES_PAGE
from .state import NotServableError

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_CACHE_NAME = re.compile(r"^(\d{5,})-(max|mean)-(\d{3,})\.png$")
_HEAD = re.compile(r"<head(\s[^>]*)?>", re.I)
_MODE = re.compile(r"<meta\s+name=[\"']lurker-mode[\"'][^>]*>", re.I)
MODE_META = '<meta name="lurker-mode" content="static">'
#: A layer's unit documents are written in chunks of about this many bytes (a chunk is
#: what one unit page fetches), at most :data:`MAX_CHUNK` units each.
CHUNK_BYTES = 192 * 1024
MAX_CHUNK = 256
#: Image kinds a top-k entry has; "input" and the "crop" of an entry with a stored peak
#: are cut in the browser from the sample's image, its "grad_crop" from its "grad" (an
#: exported cached file, as are the crops of entries without a stored peak).
KINDS = ("input", "crop", "grad", "grad_crop")


def static_segment(segment: str) -> str:
    """One URL path segment as a file name: every character outside ``[A-Za-z0-9._-]``
    becomes ``~XX`` per UTF-8 byte (upper-case hex). The front end's ``api.ts`` has the
    same function, so both sides agree on every file name."""
    return "".join(
        ch if ch in _SAFE else "".join(f"~{b:02X}" for b in ch.encode("utf-8")) for ch in segment
    )


def static_path(api_path: str) -> str:
    """An API path below ``/api`` (``/runs/a/samples?offset=0&limit=100``, query included)
    as a relative file path: each segment URL-decoded, then made safe by
    :func:`static_segment` (as ``api.ts`` does with ``decodeURIComponent``)."""
    path = api_path.removeprefix("/api/") if api_path.startswith("/api/") else api_path
    return "/".join(static_segment(unquote(s)) for s in path.strip("/").split("/"))


def _rel(*segments: object) -> str:
    """The file path of API path segments (raw, not URL-encoded)."""
    return "/".join(static_segment(str(s)) for s in segments)


class _Progress:
    """``export: 120/4,300 items, 233 files`` on stderr, at most every :attr:`every`
    seconds, and at the end. The total is counted before anything is written, in items
    known up front (each top-k sample, unit and explained sample, and each run's other
    documents), so it never moves: how many files an item writes is known only once
    written (a sample's further pages, a clip's frames, cached images). The files are
    those in ``written`` (the manifest's list: the front end's files too) and, at the
    end, the manifest itself: what the site holds, for a user who counts them."""

    every = 1.0

    def __init__(self, enabled: bool, written: set[str]):
        self.enabled = enabled
        self.done = 0
        self.total = 0
        self.written = written
        self.last = 0.0

    def step(self) -> None:
        """One item done."""
        self.done += 1
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            self._line()

    def _line(self, end: str = "", manifest: int = 0) -> None:
        files = len(self.written) + manifest
        print(
            f"export: {self.done:,}/{self.total:,} items, {files:,} files{end}",
            file=sys.stderr,
            flush=True,
        )

    def close(self, out: Path) -> None:
        if self.enabled:
            self._line(f", done: {out}", manifest=1)  # written by now


def export_site(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    static_dir: str | os.PathLike[str] | None = None,
    dataset: Any = None,
    vocab: VocabLike | None = None,
    make_images: bool = True,
    progress: bool = True,
) -> Path:
    """Write the static explorer of ``run`` (a run directory or a folder of runs) to ``out``.

    ``out`` must be empty, missing, or an earlier export: the files that export wrote (its
    :data:`MANIFEST` lists them) are replaced, any other file in ``out`` is kept. The
    built front end (``make``) must exist. With ``make_images``, each top-k sample's image
    is made from the dataset into the run's cache when it is not cached yet; gradient
    images need the model: make them first with ``lurker images RUN``. Returns ``out``.
    """
    from starlette.requests import Request

    from .app import STATIC_DIR, create_app
    from .routes.runs import list_runs

    static = Path(static_dir) if static_dir is not None else STATIC_DIR
    if not (static / "index.html").is_file():
        raise LurkerError(
            f"the explorer's front end is not built (no index.html in {static}); run `make` "
            "in the lurker repository (it builds web/ into the package), then export again"
        )
    site = Path(out)
    earlier = _check_out(site)
    try:
        app = create_app(run, static_dir=static, dataset=dataset, live=False, vocab=vocab)
    except NotServableError as e:
        raise e.for_verb("export") from None
    # the route functions read only request.app: the documents are the API's own
    request = Request({"type": "http", "app": app, "method": "GET", "headers": []})
    try:
        # planned before anything is written (a run whose recorded model is not the one it
        # was probed with has its filters left out, warned of, here)
        entries = app.state.registry.entries.values()
        runs = [_plan(request, e) for e in entries if e.run is not None]
    except BaseException:
        app.state.registry.close()
        raise
    site.mkdir(parents=True, exist_ok=True)
    # the earlier export's files go first (old hashed bundles, images of units no longer
    # in the run would linger beside the new ones); nothing else in the folder is touched
    _remove_written(site, earlier)
    written: set[str] = set()
    bar = _Progress(progress, written)
    out_files = _Files(site, "data", bar, written)
    try:
        _copy_front_end(static, site, written)
        bar.total = sum(plan.items for plan in runs) + 1  # and runs.json, written last
        for plan in runs:
            _export_run(request, plan, out_files, make_images)
        out_files.json(_rel("runs"), list_runs(request))
        bar.step()
    finally:
        app.state.registry.close()
        # also when interrupted: the next export then removes what this one wrote
        _write_manifest(site, written)
    bar.close(site)
    return site


class _Files:
    """Writes the site's files under ``site/folder`` (``data/``), and records each in
    ``written`` (paths relative to ``site``: the manifest, and the progress's count)."""

    def __init__(self, site: Path, folder: str, bar: _Progress, written: set[str]):
        self.site = site
        self.folder = folder
        self.bar = bar
        self.written = written

    def text(self, relative: str, body: str) -> None:
        _write(self._target(relative), body.encode("utf-8"))

    def json(self, relative: str, doc: Any) -> None:
        self.text(relative + ".json", _dumps(doc))

    def image(self, relative: str, found: bytes | Path) -> None:
        target = self._target(relative)
        if isinstance(found, bytes):
            _write(target, found)
        else:
            _link(found, target)

    def _target(self, relative: str) -> Path:
        return _claim(self.site, f"{self.folder}/{relative}", self.written)


def _dumps(doc: Any) -> str:
    """JSON as the API sends it (pydantic models dumped as FastAPI serializes them)."""
    if hasattr(doc, "model_dump"):
        doc = doc.model_dump(mode="json", by_alias=True)
    return json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


@dataclass
class _Plan:
    """What a run's export writes, found before writing (the progress total)."""

    entry: Any
    ranked: list[int]  # the samples some top-k list holds (max, mean, relevance)
    explained: dict[str, Any]  # the explanations its cache holds (``explained_index``)
    filters: _FilterPlan | None = None  # None: no model to draw them from

    @property
    def items(self) -> int:
        """Progress items: each top-k sample, unit and explained sample, the filters (the
        listing, each filter layer, each of its units' kernels), and the rest."""
        units = sum(info.num_units for info in self.entry.run.layers)
        kernels = 0
        if self.filters is not None:
            kernels = 1 + sum(1 + f.weight.shape[0] for f in self.filters.layers.values())
        return len(self.ranked) + units + len(self.explained["samples"]) + kernels + 1


@dataclass
class _FilterPlan:
    """The run's filters, drawn from its recorded model loaded for the export (only the
    first layers' weights are kept: a folder of runs never holds all their models)."""

    listing: Any  # FilterLayers
    layers: dict[str, Any]  # layer name -> Filters
    documents: dict[str, Any]  # layer name -> its LayerFilters


def _filter_plan(request: Any, e: Any) -> _FilterPlan | None:
    """The run's filters when it records a model that loads here, else None: a run that
    records none has none (silently); one whose model fails to load is warned about, and
    the site shows no filters (as served without the model)."""
    from .errors import ApiError
    from .routes.filters import filter_listing, filters_document, layer_filters
    from .session import ModelSource, Session

    # a session of its own: the export's app attaches no model (its documents need none)
    s = Session(e, ModelSource(device=request.app.state.source.device))
    reason = s.model_reason()
    try:
        if reason is not None:
            raise ApiError(409, reason)
        s.model()  # loaded and checked to be the run's before any layer is looked at
        listing = filter_listing(s)
        layers = {name: layer_filters(s, name) for name in listing.layers}
        documents = {name: filters_document(s, f) for name, f in layers.items()}
    except (ApiError, LurkerError) as err:
        if s.mismatch is not None:  # its filters would be another model's: left out
            warn(
                f"run {e.id}: the site shows no first-layer filters: they are drawn from the "
                f"run's model, and {s.mismatch}"
            )
            return None
        if s.config.get("model_spec"):
            why = err.detail if isinstance(err, ApiError) else str(err)
            warn(f"run {e.id}: the site shows no first-layer filters, they need the model: {why}")
        return None
    return _FilterPlan(listing, layers, documents)


def _plan(request: Any, e: Any) -> _Plan:
    from .deps import session
    from .explained import explained_index

    index = e.appearances()
    # max, mean and relevance lists (their tied tails too: the unit pages show them)
    ranked = np.union1d(index.sample, index.tails).astype(np.int64).tolist()
    return _Plan(e, ranked, explained_index(session(request, e)), _filter_plan(request, e))


def _export_run(request: Any, plan: _Plan, files: _Files, make_images: bool) -> None:
    from .classes import class_names
    from .deps import session
    from .errors import ApiError
    from .routes.layers import feature_tile, layer_detail
    from .routes.runs import run_summary
    from .routes.samples import (
        TILE_TOKENS,
        _sample_detail,
        add_features,
        add_listed_signals,
        add_tokens,
        listed_sample,
        signal_document,
    )

    e = plan.entry
    s = session(request, e)
    run = e.run
    ranked = plan.ranked
    # each top-k sample: its page and its image (made from the dataset if need be)
    images: dict[int, bytes | Path] = {}
    listed = []
    names = class_names(run)
    tokens = s.token_length() is not None  # sequences of token ids: no picture to write
    vectors = s.vector_length() is not None  # feature vectors: no picture either
    signals = s.signal_shape() is not None  # 1-D signals are drawn as lines: no picture
    pictureless = tokens or vectors or signals

    def sample_page(sid: int) -> Any:
        """The sample's page document, with its values where it has no picture, written."""
        detail = _sample_detail(request, e.id, sid, 0, APPEARANCES_PAGE)
        if tokens:
            add_tokens(s, detail)
        if vectors:
            add_features(s, detail)
        if signals:
            detail.signal_error = s.dataset_reason()
            if detail.signal_error is None:  # its values once, for every unit that ranks it
                try:
                    doc = signal_document(s, sid, detail.sample.path, None)
                except ApiError as err:  # the dataset changed since the probe: said, per sample
                    detail.signal_error = err.detail
                else:
                    files.json(_rel("runs", e.id, "samples", sid, "signal"), doc)
        files.json(_rel("runs", e.id, "samples", sid), detail)
        return detail

    for sid in ranked:
        detail = sample_page(sid)
        # the sample page's "show more" asks for the next pages of its top-list entries
        for offset in range(APPEARANCES_PAGE, detail.total, APPEARANCES_PAGE):
            query = f"{sid}?offset={offset}&limit={APPEARANCES_PAGE}"
            more = _sample_detail(request, e.id, sid, offset, APPEARANCES_PAGE)
            files.json(_rel("runs", e.id, "samples", query), more)
        # (a signal's image would be a C x T pixel strip no page shows, made into the
        # run's cache and counted among its cached images)
        found = (
            None
            if pictureless
            else _sample_image(s, sid, detail.sample.path, make_images, ApiError)
        )
        if found is not None:
            images[sid] = found
            files.image(_rel("runs", e.id, "samples", sid, "image.png"), found)
        # as the served list shows it: the recorded top class marks the misclassified
        one = detail.sample
        brief = listed_sample(run, names, (sid, one.path, one.label, one.class_name))
        # what its tile shows in place of a picture, as the served list sends it
        if detail.tokens is not None:
            brief.tokens = detail.tokens[:TILE_TOKENS]
            brief.token_text = (
                None if detail.token_text is None else detail.token_text[:TILE_TOKENS]
            )
        if detail.features is not None:
            brief.features = feature_tile(detail.features)
        if signals and detail.signal_error is None:  # as the served list's tile
            add_listed_signals(s, [brief])
        listed.append({**brief.model_dump(mode="json"), "image": found is not None})
        files.bar.step()
    # a site without some images says why, here and on its pages (a reason of its own:
    # with --no-images the dataset may well load, and the fix is another export)
    no_image = None
    if len(images) < len(ranked) and not pictureless:
        no_image = (
            (s.dataset_reason() or "their files are no longer in the run's dataset")
            if make_images
            else "the export was made with --no-images, which writes only the images the "
            "run's cache holds: export again without it (it makes them from the run's "
            "dataset), or first make them with `lurker images RUN`"
        )
        warn(
            f"run {e.id}: {len(ranked) - len(images)} of its {len(ranked)} top-k samples have "
            f"no image, so the site shows them without one: {no_image}"
        )
    files.json(
        _rel("runs", e.id, "exported-samples"),
        {"total": e.sample_count(), "samples": listed, "no_image": no_image},
    )
    _export_explanations(request, s, e, files, plan.explained, set(ranked), sample_page)
    fingerprint = run.meta.get("model_fingerprint")
    if cache_unknown(e.path, fingerprint):  # its gradients and explanations are left out
        warn(
            f"run {e.id}: its cache holds gradient images or explanations {UNKNOWN_ORIGIN} "
            "in this export; make them again with the run's model (`lurker images RUN`, "
            "and `--explanations top` for explanations), then export again"
        )
    trusted = cache_trusted(e.path, fingerprint)
    frames: dict[tuple[int, int], bool] = {}  # (sample, frame) of a clip: exported or not

    def frame_image(sid: int, frame: int) -> bool:
        """Export frame ``frame`` of clip sample ``sid`` (once): a clip unit's entries are
        shown on their peak's frame; False when the site cannot hold it."""
        if (sid, frame) not in frames:
            found = _frame_image(s, sid, frame, make_images, ApiError)
            frames[(sid, frame)] = found is not None
            if found is not None:
                files.image(_rel("runs", e.id, "samples", sid, "frames", frame) + ".png", found)
        return frames[(sid, frame)]

    drawn = plan.filters.layers if plan.filters is not None else {}
    for info in run.layers:
        files.json(_rel("runs", e.id, "layers", info.name), layer_detail(request, e.id, info.name))
        _export_units(
            request, e, info, files, images, no_image, frame_image, info.name in drawn, trusted
        )
    if plan.filters is not None:
        _export_filters(plan.filters, e.id, files)
    # feature visualizations stored in the run (`lurker featviz`): the unit pages show them
    for layer, objective, unit, copy, png in featviz_images(run):
        where = (
            _rel("runs", e.id, "layers", layer, "featviz", "direction", unit)  # its index
            if objective == "direction"
            else _rel("runs", e.id, "layers", layer, "units", unit, "featviz", objective)
        )
        files.image(f"{where}/{copy}.png", png)
    with contextlib.suppress(ApiError):  # a run without a graph (v2): the page says so
        files.json(_rel("runs", e.id, "graph"), e.graph_view())
    if run.has_map:  # the Map page (its hover images: the exported samples')
        from .routes.dataset_map import dataset_map

        files.json(_rel("runs", e.id, "map"), dataset_map(request, e.id))
    e._counted = None  # count the cached images again, with those just made
    files.json(_rel("runs", e.id), run_summary(request, e.id))
    files.bar.step()


def _export_explanations(
    request: Any,
    s: Any,
    e: Any,
    files: _Files,
    index: dict[str, Any],
    exported: set[int],
    sample_page: Callable[[int], Any],
) -> None:
    """The explanations the run's cache holds (``lurker images RUN --explanations``) at
    the paths the static Explain page asks for, and ``explained.json``: which samples
    have them, with which methods (the top class only, as precomputed; a language model's
    next token at the last position, at the target the sample names). On a run with no
    picture the page reads a held sample's values from its page document, written here
    (``sample_page``) where no top-k list holds the sample (``exported``)."""
    from urllib.parse import unquote, urlencode

    from .explained import TARGET, pictureless, sample_folder
    from .routes.explain import (
        CONCEPT_TOP,
        concept_png_response,
        concept_ranking,
        explain_png_response,
        explain_result,
    )
    from .routes.explain import methods as methods_doc

    # token ids, feature vectors, signals: scores in the JSON, no picture (the live
    # endpoints and heatmap PNGs answer 409 on such a run; the sample's page has its values)
    flat = pictureless(s)
    for held in index["samples"]:
        image, methods = held["image"], held["methods"]
        folder = sample_folder(e.path, image)
        base = ("runs", e.id, "live", image)
        target = held.get("target") or TARGET  # a language model's: its next token
        # the query as the page's client names the file: URL-decoded (head:3:0:31, not
        # head%3A3...), as static_path decodes each segment
        query = unquote(urlencode({"target": target}))
        if flat:
            sid = int(image.removeprefix("sample-"))
            if sid not in exported:  # precomputed beyond the top-k lists
                sample_page(sid)
                exported.add(sid)
            for m in methods:
                doc = explain_result(s, image, m, target, None)
                files.json(_rel(*base, "explain", f"{m}.json?{query}"), doc)
            if held["concepts"] is not None:  # a signal's: the maps are in the JSON
                ranking = concept_ranking(s, image, target, None, CONCEPT_TOP)
                files.json(
                    _rel(*base, "explain", f"concepts.json?{query}&top={CONCEPT_TOP}"), ranking
                )
            files.bar.step()
            continue
        files.json(_rel(*base), json.loads((folder / "live.json").read_text(encoding="utf-8")))
        files.image(_rel(*base, "input.png"), folder / "input.png")
        for m in methods:
            doc = explain_result(s, image, m, target, None)
            files.json(_rel(*base, "explain", f"{m}.json?{query}"), doc)
            png = explain_png_response(s, image, m, target, None, overlay=False)
            files.image(_rel(*base, "explain", f"{m}.png?{query}&overlay=0"), bytes(png.body))
        if held["concepts"] is not None:  # the ranking the page asks first, and its maps
            ranking = concept_ranking(s, image, target, None, CONCEPT_TOP)
            files.json(_rel(*base, "explain", f"concepts.json?{query}&top={CONCEPT_TOP}"), ranking)
            maps = unquote(urlencode({"target": target, "layer": ranking.layer, "overlay": 0}))
            for u in ranking.units:
                png = concept_png_response(s, image, u.unit, target, ranking.layer, overlay=False)
                files.image(
                    _rel(*base, "explain", "concepts", f"{u.unit}.png?{maps}"), bytes(png.body)
                )
        files.bar.step()
    if index["samples"]:  # the page's method list (titles, signs, layers)
        files.json(_rel("runs", e.id, "explain", "methods"), methods_doc(request, e.id))
    files.json(_rel("runs", e.id, "explained"), index)


def _export_filters(plan: _FilterPlan, run_id: str, files: _Files) -> None:
    """The Filters endpoints' answers, at their paths: the listing, each filter layer's
    document and grid, and each unit's kernel at the scale the unit page asks for."""
    from .routes.filters import grid_png, unit_png, unit_scale

    files.json(_rel("runs", run_id, "filters"), plan.listing)
    files.bar.step()
    for name, f in plan.layers.items():
        base = ("runs", run_id, "layers", name)
        files.json(_rel(*base, "filters"), plan.documents[name])
        files.image(_rel(*base, "filters.png"), grid_png(f))
        files.bar.step()
        scale = unit_scale(f)
        for unit in range(f.weight.shape[0]):
            png = unit_png(f, unit, scale)
            files.image(_rel(*base, "units", unit, f"filter.png?scale={scale}"), png)
            files.bar.step()


def _sample_image(
    s: Any, sid: int, path: str | None, make: bool, api_error: type[Exception]
) -> bytes | Path | None:
    """The sample's image: cached, else made from the dataset (``make``), else None."""
    cached = s.sample_file(sid)
    if cached.is_file() and cached.stat().st_size > 0:
        return cached  # type: ignore[no-any-return]
    if not make or s.dataset_reason() is not None:
        return None
    try:
        return s.sample_png(sid, path)  # type: ignore[no-any-return]
    except (api_error, LurkerError):
        return None  # the dataset changed since the probe: the site shows no image


def _frame_image(
    s: Any, sid: int, frame: int, make: bool, api_error: type[Exception]
) -> bytes | Path | None:
    """A clip sample's frame: cached, else made from the dataset (``make``), else None."""
    cached = s.frame_file(sid, frame)
    if cached.is_file() and cached.stat().st_size > 0:
        return cached  # type: ignore[no-any-return]
    if not make or s.dataset_reason() is not None:
        return None
    try:
        path = s.entry.sample_row(sid)[1]  # checked against the dataset's, as the sample's
        return s.frame_png(sid, path, frame)  # type: ignore[no-any-return]
    except (api_error, LurkerError):
        return None


def _export_units(
    request: Any,
    e: Any,
    info: Any,
    files: _Files,
    images: dict[int, bytes | Path],
    no_image: str | None,
    frame_image: Callable[[int, int], bool] = lambda sid, frame: False,
    filters: bool = False,
    trusted: bool = True,
) -> None:
    """A layer's unit documents in chunks, its cached entry images, and ``units/index``
    (with ``no_image``: why some top-k samples have no image, for the unit pages;
    ``filters``: whether the export holds the layer's filters; ``trusted``: whether the
    cache's model-made images are the run's model's, see ``cache_trusted``: else none)."""
    from .routes.units import unit_detail

    cached = _cached_unit_images(e.path / "cache", info.name) if trusted else {}
    base = ("runs", e.id, "layers", info.name)
    size = 0
    thumbs: list[dict[str, Any] | None] = []
    chunk: list[str] = []
    shown: list[dict[str, dict[str, list[int]]]] = []
    for unit in range(info.num_units):
        doc = unit_detail(request, e.id, info.name, unit).model_dump(mode="json", by_alias=True)
        text = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        if unit == 0:
            size = max(1, min(MAX_CHUNK, CHUNK_BYTES // max(len(text), 1)))
        chunk.append(text)
        avail: dict[str, dict[str, list[int]]] = {}
        for item in doc["top"].get("relevance") or []:  # whole samples: the input only
            if int(item["sample_id"]) in images:
                avail.setdefault("input", {}).setdefault("relevance", []).append(int(item["rank"]))
        for which in ("max", "mean"):
            for item in doc["top"][which]:
                rank, sid = int(item["rank"]), int(item["sample_id"])
                stored = item["y"] is not None  # a stored peak: the browser cuts the crop
                # a clip's entry is shown on its peak's frame, its crop cut from that frame
                shown_image = (
                    sid in images
                    if item.get("frame") is None
                    else sid in images and frame_image(sid, int(item["frame"]))
                )
                grad = ("grad", unit, which, rank) in cached
                # the gradient crop of an entry with a stored peak is cut in the browser
                # from its gradient image, by the same box, as the server's grad_crop is
                has = {
                    "input": shown_image,
                    "crop": shown_image if stored else ("crop", unit, which, rank) in cached,
                    "grad": grad,
                    "grad_crop": grad if stored else ("grad_crop", unit, which, rank) in cached,
                }
                for kind, ok in has.items():
                    if ok:
                        avail.setdefault(kind, {}).setdefault(which, []).append(rank)
                for kind in ("crop", "grad", "grad_crop"):
                    source = cached.get((kind, unit, which, rank))
                    if source is not None and not (kind in ("crop", "grad_crop") and stored):
                        files.image(_rel(*base, "units", unit, which, rank, f"{kind}.png"), source)
        shown.append(avail)
        files.bar.step()
        top = doc["top"]["max"][0] if doc["top"]["max"] else None
        thumbs.append(
            None
            if top is None
            or int(top["sample_id"]) not in images
            or (top.get("frame") is not None and not frame_image(top["sample_id"], top["frame"]))
            else {
                "sample": top["sample_id"],
                "box": top.get("box"),
                "crop": top["y"] is not None,
                # a clip's: the image is that frame's (only there: images name no frame)
                **({} if top.get("frame") is None else {"frame": top["frame"]}),
            }
        )
        if len(chunk) == size or unit == info.num_units - 1:
            first = unit + 1 - len(chunk)
            files.text(
                _rel(*base, "units", f"chunk-{first // size}") + ".json",
                f'{{"layer":{_dumps(info.name)},"offset":{first},'
                f'"units":[{",".join(chunk)}],"images":{_dumps(shown)}}}',
            )
            chunk, shown = [], []
    files.json(
        _rel(*base, "units", "index"),
        {
            "layer": info.name,
            "num_units": info.num_units,
            "chunk": size,
            "thumbs": thumbs,
            "no_image": no_image,
            "filters": filters,
        },
    )


def _cached_unit_images(cache: Path, layer: str) -> dict[tuple[str, int, str, int], Path]:
    """``(kind, unit, list, rank) -> file`` of the layer's cached entry images."""
    found = {}
    for kind in ("crop", "grad", "grad_crop"):
        for f in _files(cache / kind / safe_component(layer)):
            m = _CACHE_NAME.match(f.name)
            if m:
                found[(kind, int(m[1]), m[2], int(m[3]))] = f
    return found


#: The file in SITE listing (JSON) every file an export wrote there, relative to SITE:
#: the next export removes exactly those, never a file lurker did not write.
MANIFEST = ".lurker-export.json"
#: What an export made before the manifest existed can have written (its ``index.html``
#: marks it): the page, the front end's bundles (named ``name-HASH.ext`` by its build), and
#: the documents and images under ``data/`` (``runs.json``, ``runs/...``).
_LEGACY_BUNDLE = re.compile(r"^[\w.-]+-[\w-]{8}\.(?:js|css|map)$")


def _legacy_files(site: Path) -> set[str]:
    """The files in ``site`` an export from before the manifest wrote: any other file a
    user put beside them (in ``assets/`` or ``data/`` too) is kept."""
    found = {"index.html"}
    assets = site / "assets"
    if assets.is_dir():
        found |= {f"assets/{f.name}" for f in assets.iterdir() if _LEGACY_BUNDLE.match(f.name)}
    data = site / "data"
    if (data / "runs.json").is_file():
        found.add("data/runs.json")
    if (data / "runs").is_dir():
        found |= {
            f.relative_to(site).as_posix()
            for f in (data / "runs").rglob("*")
            if f.suffix in (".json", ".png") and (f.is_file() or f.is_symlink())
        }
    return found


def _check_out(site: Path) -> set[str]:
    """The files an earlier export wrote in ``site`` (relative paths; empty for a new or
    empty folder); raises if ``site`` is a file or a non-empty folder lurker did not make."""
    if site.exists() and not site.is_dir():
        raise LurkerError(f"cannot export to {site}: it is a file; name a folder")
    if not site.is_dir() or not any(site.iterdir()):
        return set()
    manifest = site / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise TypeError("'files' is not a list of paths")
        except (ValueError, KeyError, TypeError) as e:
            raise LurkerError(
                f"cannot export to {site}: its {MANIFEST}, the list of files an earlier "
                f"export wrote, is not readable ({e}); remove the folder or name a new one"
            ) from None
        return set(files)
    page = site / "index.html"
    if page.is_file() and "lurker-mode" in page.read_text(errors="replace"):
        return _legacy_files(site)  # an export from before the manifest
    raise LurkerError(
        f"cannot export to {site}: the folder is not empty and holds no earlier export "
        f"(no {MANIFEST}; lurker never deletes or overwrites files it did not write); "
        "name a new or empty folder"
    )


def _remove_written(site: Path, files: set[str]) -> None:
    """Delete the files of an earlier export (those inside ``site`` only), then the
    folders they leave empty (and listed ones that are empty); a file or folder someone
    added there is kept."""
    root = site.resolve()
    folders: set[Path] = set()
    for relative in sorted(files):
        target = site / relative
        try:
            inside = target.parent.resolve().is_relative_to(root)
        except OSError:
            continue
        if not inside:
            continue  # a manifest edited to point outside the site: never followed
        if target.is_dir() and not target.is_symlink():
            folders.add(target)
            continue
        if not (target.is_file() or target.is_symlink()):
            continue
        target.unlink()
        folders.update(p for p in target.parents if p != site and p.is_relative_to(site))
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def _write_manifest(site: Path, written: set[str]) -> None:
    tmp = site / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"lurker_export": 1, "files": sorted(written)}), encoding="utf-8")
    os.replace(tmp, site / MANIFEST)


def _claim(site: Path, relative: str, written: set[str]) -> Path:
    """``site/relative`` for this export to write, recorded in ``written``; refuses a path
    that would leave ``site`` or overwrite a file lurker did not write (the earlier
    export's files are gone by now, so anything there is someone else's)."""
    target = _inside(site, relative)
    if relative not in written:
        if target.exists() or target.is_symlink():
            raise LurkerError(
                f"cannot export to {site}: {relative} is there and no earlier export wrote "
                "it (lurker never overwrites files it did not write); move it away or name "
                "a new folder"
            )
        written.add(relative)
    return target


def _copy_front_end(static: Path, site: Path, written: set[str]) -> None:
    for item in sorted(static.rglob("*")):
        if item.is_file() and item != static / "index.html":
            target = _claim(site, item.relative_to(static).as_posix(), written)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, target)
    html = (static / "index.html").read_text(encoding="utf-8")
    if _MODE.search(html):
        html = _MODE.sub(MODE_META, html, count=1)
    elif _HEAD.search(html):
        html = _HEAD.sub(lambda m: m.group(0) + "\n    " + MODE_META, html, count=1)
    else:
        html = MODE_META + "\n" + html
    _write(_claim(site, "index.html", written), html.encode("utf-8"))


def _files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.stat().st_size > 0)
    except OSError:
        return []


def _inside(root: Path, relative: str) -> Path:
    """``root/relative``, refusing any path that would leave ``root``."""
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise LurkerError(f"refusing to write {relative!r}: it would leave {root}")
    return target


def _write(target: Path, body: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(body)


def _link(source: Path, target: Path) -> None:
    """A hard link where the filesystem allows it (cheap), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
