"""``lurker export RUN SITE``: the explorer as a static site, no Python needed to view it.

The site is the same front end, told by ``<meta name="lurker-mode" content="static">`` to
read files instead of the API: every JSON response the API can give without a model is
written to ``data/<static_path(api path)>.json`` and every cached PNG to
``data/<static_path(api path)>``. The JSON comes from the app's own endpoints (called
through FastAPI's TestClient), so the export can never disagree with the server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np

from lurker.errors import LurkerError
from lurker.store.files import safe_component

from .routes.samples import APPEARANCES_PAGE

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_CACHE_NAME = re.compile(r"^(\d{5,})-(max|mean)-(\d{3,})\.png$")
_SAMPLE_NAME = re.compile(r"^(\d{8,})\.png$")
_HEAD = re.compile(r"<head(\s[^>]*)?>", re.I)
_MODE = re.compile(r"<meta\s+name=[\"']lurker-mode[\"'][^>]*>", re.I)
MODE_META = '<meta name="lurker-mode" content="static">'
#: Samples per page of ``samples?offset=N&limit=SAMPLES_PAGE`` files (the client asks so).
SAMPLES_PAGE = 100


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


class _Progress:
    """``export: 120/4,300 files`` on stderr, at most once a second, and at the end."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.done = 0
        self.total = 0
        self.last = 0.0

    def add(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self.last >= 1.0:
            self.last = now
            self._line()

    def _line(self, end: str = "") -> None:
        print(f"export: {self.done:,}/{self.total:,} files{end}", file=sys.stderr, flush=True)

    def close(self, out: Path) -> None:
        if self.enabled:
            self._line(f", done: {out}")


def export_site(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    static_dir: str | os.PathLike[str] | None = None,
    dataset: Any = None,
    make_images: bool = True,
    progress: bool = True,
) -> Path:
    """Write the static explorer of ``run`` (a run directory or a folder of runs) to ``out``.

    ``out`` must be empty, missing, or an earlier export (it is updated in place). The
    built front end (``make``) must exist. With ``make_images``, the images that need only
    the dataset (every top-k sample, the receptive-field crops of the max lists) are made
    first, through the API, into the run's cache; then every cached PNG is exported.
    Gradient images need the model: make them with ``lurker images RUN``. Returns ``out``.
    """
    from fastapi.testclient import TestClient

    from .app import STATIC_DIR, create_app

    static = Path(static_dir) if static_dir is not None else STATIC_DIR
    if not (static / "index.html").is_file():
        raise LurkerError(
            f"the explorer's front end is not built (no index.html in {static}); run `make` "
            "in the lurker repository (it builds web/ into the package), then export again"
        )
    site = Path(out)
    _check_out(site)
    app = create_app(run, static_dir=static, dataset=dataset, live=False)
    bar = _Progress(progress)
    site.mkdir(parents=True, exist_ok=True)
    _copy_front_end(static, site)
    data = site / "data"
    with TestClient(app, raise_server_exceptions=True) as client:

        def get(api: str) -> bytes | None:
            r = client.get(api)
            if r.status_code != 200:
                return None
            return r.content

        runs = app.state.registry.entries
        if make_images:  # first: the summaries then count the images made
            for e in runs.values():
                summary = get(f"/api/runs/{quote(e.id, safe='')}") if e.run is not None else None
                if summary is not None and json.loads(summary)["holds"]["dataset"]:
                    made = list(_dataset_images(e))
                    bar.total += len(made)
                    for api in made:
                        get(api)  # made and cached by the server (a 404 if it cannot be)
                        bar.add()
        for e in runs.values():
            e._counted = None  # count the cached images again, with those just made
        jobs = list(_json_paths(app))
        bar.total += len(jobs)
        for api in jobs:
            body = get(api)
            if body is not None:
                _write(data, static_path(api) + ".json", body)
            bar.add()
        pngs = [p for e in runs.values() if e.run is not None for p in _png_files(e)]
        bar.total += len(pngs)
        for api, source in pngs:
            _link(source, _inside(data, static_path(api)))
            bar.add()
    bar.close(site)
    return site


def _check_out(site: Path) -> None:
    if site.exists() and not site.is_dir():
        raise LurkerError(f"cannot export to {site}: it is a file; name a folder")
    if site.is_dir() and any(site.iterdir()):
        page = site / "index.html"
        ours = page.is_file() and "lurker-mode" in page.read_text(errors="replace")
        if not ours:
            raise LurkerError(
                f"cannot export to {site}: the folder is not empty and holds no earlier "
                "export (lurker never deletes files it did not write); name a new folder"
            )


def _copy_front_end(static: Path, site: Path) -> None:
    for item in static.iterdir():
        if item.name == "index.html":
            continue
        target = site / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    html = (static / "index.html").read_text(encoding="utf-8")
    if _MODE.search(html):
        html = _MODE.sub(MODE_META, html, count=1)
    elif _HEAD.search(html):
        html = _HEAD.sub(lambda m: m.group(0) + "\n    " + MODE_META, html, count=1)
    else:
        html = MODE_META + "\n" + html
    (site / "index.html").write_text(html, encoding="utf-8")


def _json_paths(app: Any) -> Iterator[str]:
    """Every API path whose JSON the static site needs (no live endpoints)."""
    yield "/api/runs"
    for e in app.state.registry.entries.values():
        if e.run is None:
            continue
        base = f"/api/runs/{quote(e.id, safe='')}"
        yield base
        yield f"{base}/graph"
        yield f"{base}/map"  # a 404 (no map in the run) writes nothing
        for info in e.run.layers:
            layer = f"{base}/layers/{quote(info.name, safe='')}"
            yield layer
            for unit in range(info.num_units):
                yield f"{layer}/units/{unit}"
        total = e.sample_count()
        for offset in range(0, max(total, 1), SAMPLES_PAGE):
            yield f"{base}/samples?offset={offset}&limit={SAMPLES_PAGE}"
        index = e.appearances()
        for sid, *_ in e.sample_rows(0, total):
            yield f"{base}/samples/{sid}"
            # the sample page's "show more" asks for the next pages of its top-list entries
            for offset in range(APPEARANCES_PAGE, index.count(sid), APPEARANCES_PAGE):
                yield f"{base}/samples/{sid}?offset={offset}&limit={APPEARANCES_PAGE}"


def _dataset_images(e: Any) -> Iterator[str]:
    """API paths of the images made from the dataset alone: each top-k sample's image
    once, and the crop of every max-list entry."""
    base = f"/api/runs/{quote(e.id, safe='')}"
    index = e.appearances()
    for sid in np.unique(index.sample).tolist():
        yield f"{base}/samples/{sid}/image.png"
    layers = e.run.layers
    for i in np.flatnonzero(index.which == 0).tolist():
        layer = quote(layers[int(index.layer[i])].name, safe="")
        yield f"{base}/layers/{layer}/units/{int(index.unit[i])}/max/{int(index.rank[i])}/crop.png"


def _png_files(e: Any) -> Iterator[tuple[str, Path]]:
    """``(api path, cached file)`` for every PNG in the run's cache, and the "input" image
    of every top-k entry whose sample image is cached (a link to the sample's file)."""
    run = e.run
    cache = e.path / "cache"
    base = f"/runs/{e.id}"
    samples: dict[int, Path] = {}
    for f in _files(cache / "samples"):
        m = _SAMPLE_NAME.match(f.name)
        if m:
            samples[int(m[1])] = f
            yield f"{base}/samples/{int(m[1])}/image.png", f
    folders = {safe_component(info.name): info.name for info in run.layers}
    for kind in ("crop", "grad", "grad_crop"):
        for folder, layer in folders.items():
            for f in _files(cache / kind / folder):
                m = _CACHE_NAME.match(f.name)
                if m:
                    unit, which, rank = int(m[1]), m[2], int(m[3])
                    yield f"{base}/layers/{layer}/units/{unit}/{which}/{rank}/{kind}.png", f
    if samples:
        index = e.appearances()
        for i in range(len(index.sample)):
            f = samples.get(int(index.sample[i]))
            if f is not None:
                layer = run.layers[int(index.layer[i])].name
                which = "max" if index.which[i] == 0 else "mean"
                yield (
                    f"{base}/layers/{layer}/units/{int(index.unit[i])}/{which}/"
                    f"{int(index.rank[i])}/input.png",
                    f,
                )


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


def _write(root: Path, relative: str, body: bytes) -> None:
    target = _inside(root, relative)
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
