"""The explorer's web app: the JSON API over one run or a folder of runs, and the front end.

``create_app`` opens every run read-only once; everything else (inverted indexes, the
graph view, datasets, models, images) is made on first request. Errors are JSON
``{"detail": ...}`` bodies that say what exists or what to do, never a traceback.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lurker.errors import LurkerError
from lurker.vocab import VocabLike

from .errors import ApiError
from .limits import UploadLimit
from .session import ModelSource
from .state import Registry

log = logging.getLogger("lurker.server")

#: Where `make` builds the front end (web/ -> here); shipped in the wheel.
STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Uploads larger than this are refused with 413.
UPLOAD_LIMIT = 20 << 20

_NOT_BUILT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lurker explorer: front end not built</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:40em;margin:4em auto;color:#222}}
code{{background:#eee;padding:0 .3em}}</style></head><body>
<h1>The explorer's front end is not built</h1>
<p>This lurker has no built web assets in <code>{where}</code>. Build them from
<code>web/</code> with <code>make</code> in the repository (it runs <code>npm ci</code> and
<code>npm run build</code>), then reload this page.</p>
<p>The JSON API works without them: <a href="/api/runs">/api/runs</a>,
<a href="/docs">/docs</a>, <a href="/openapi.json">/openapi.json</a>.</p>
</body></html>
"""


def _checked_vocab(registry: Registry, vocab: Any) -> tuple[Any, str]:
    """A vocabulary given to the server, checked now against the one served run of token
    ids it is for (a list for runs that need no callable), and that run's id; refused
    where there is none to give it to, and where there are several (a folder of text runs
    probed with different vocabularies would show one's words on the others)."""
    from lurker.vocab import as_vocab

    from .session import run_vocab
    from .state import token_length

    served = [(i, e.run) for i, e in registry.entries.items() if e.run is not None]
    texts = [(i, r) for i, r in served if token_length(r) is not None]
    if not texts:
        what = (
            f"run {served[0][1].path.name!r} takes inputs that are not token ids (a text model's)"
            if len(served) == 1
            else "none of the served runs takes token ids (a text model's inputs)"
        )
        raise LurkerError(
            f"a vocabulary names the words of token ids, and {what}: leave out the vocabulary",
            cli=f"--vocab names the words of token ids, and {what}: leave out --vocab",
        )
    if len(texts) > 1:
        names = ", ".join(repr(i) for i, _ in texts[:5])
        raise LurkerError(
            f"a vocabulary given to the server is one run's, and {len(texts)} served runs "
            f"take token ids ({names}): serve a single run with the vocabulary, or store each "
            "run's own with probe(..., vocab=...)",
            cli=f"--vocab is one run's, and {len(texts)} served runs take token ids "
            f"({names}): give --vocab with a single run, or store each run's own with "
            "probe(..., vocab=...)",
        )
    run_id, run = texts[0]
    try:
        run_vocab(run, vocab)
    except LurkerError as e:
        raise LurkerError(f"run {run.path.name!r}: {e}") from None
    kept = vocab if callable(vocab) and not isinstance(vocab, (list, dict)) else as_vocab(vocab)
    return kept, run_id


def create_app(
    source: str | os.PathLike[str],
    *,
    model: str | None = None,
    weights: str | None = None,
    model_obj: Any = None,
    dataset: Any = None,
    static_dir: str | os.PathLike[str] | None = None,
    device: str | None = None,
    upload_limit: int = UPLOAD_LIMIT,
    live: bool = True,
    vocab: VocabLike | None = None,
) -> FastAPI:
    """The explorer app over ``source``: a run directory or a folder of run directories.

    ``model``/``weights`` (a model spec as ``lurker probe`` takes it) attach a model for
    the live views to a single run served, or, in a folder of runs, to the runs whose
    recorded ``model_spec`` (and ``weights``, when recorded) match; ``model_obj`` (an
    ``nn.Module``) attaches to every run. Other runs load the model their config records,
    if any. Images a model makes are cached in a run's ``cache/`` only when it is the
    run's recorded model (same spec and weights); others are kept in memory. ``dataset`` replaces the runs' recorded
    dataset (for runs probed from Python). ``vocab`` (as ``probe(vocab=...)`` takes it, or
    ``lurker.vocab.read_vocab(path)``) gives the words of the served run of token ids, in
    place of any it stores; it is checked against the run's embedding now, and refused
    where no served run's inputs are token ids or several are (each run's own is the one
    its probe stored). ``live=False`` attaches no model at all (what
    the static export uses: its documents must not depend on one). Raises :class:`~lurker.server.state.NotServableError`
    when ``source`` holds no run.
    """
    if weights is not None and model is None and model_obj is None:
        raise LurkerError("weights were given without a model: pass model='SPEC' as well")
    registry = Registry(source)
    static = Path(static_dir) if static_dir is not None else STATIC_DIR

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        # torch takes a second or two to import: do it now, not on the first unit click
        threading.Thread(target=_warm_up, name="lurker-warm-up", daemon=True).start()
        yield
        registry.close()

    app = FastAPI(
        title="lurker explorer",
        version=_version(),
        summary="Browse a probed model: its graph, layers, units, samples and live activations.",
        lifespan=lifespan,
    )
    app.state.registry = registry
    vocab_run = None
    if vocab is not None:
        vocab, vocab_run = _checked_vocab(registry, vocab)
    app.state.source = ModelSource(
        spec=model,
        weights=weights,
        model_obj=model_obj,
        dataset=dataset,
        vocab=vocab,
        vocab_run=vocab_run,
        device=device,
        live=live,
        single=len(registry.entries) == 1,
    )
    app.state.static_dir = static
    app.state.upload_limit = upload_limit
    _install_errors(app)

    from .routes import (
        attention,
        dataset_map,
        explain,
        filters,
        graph,
        images,
        layers,
        live,
        runs,
        samples,
        units,
    )

    # attention before live: its path would else be read as live's .../ops/{op}/{side}
    routers = (
        runs,
        layers,
        filters,
        units,
        samples,
        images,
        graph,
        attention,
        live,
        explain,
        dataset_map,
    )
    for module in routers:
        app.include_router(module.router)
    # JSON documents (a layer of 512 units, a sample's appearances, the graph view)
    # shrink several-fold; PNGs are already compressed and small responses are left alone.
    # Level 5, not Starlette's 9: a 50,000-point map (1.6 MB) compresses in 0.09 s, not
    # 0.75 s, for 2.5% more bytes.
    app.add_middleware(GZipMiddleware, minimum_size=1024, compresslevel=5)
    # outermost: a too-large upload is refused before anything else reads its body
    app.add_middleware(UploadLimit)
    _install_static(app, static)
    return app


def _warm_up() -> None:
    """Import what the first unit and image requests need (torch among it)."""
    try:
        import lurker.probe.images
        import lurker.probe.layout  # noqa: F401
    except Exception:  # only a head start: the request that needs them reports any error
        return


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lurker")
    except Exception:  # not installed (a source checkout on PYTHONPATH)
        return "0"


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(LurkerError)
    async def lurker_error(_: Request, exc: LurkerError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such page or API endpoint; the API is listed at /docs and /openapi.json"
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("path", "query"))
            given = f" {err['input']!r}" if isinstance(err.get("input"), (str, int, float)) else ""
            parts.append(f"{where}{given}: {err.get('msg', 'invalid')}")
        return JSONResponse({"detail": "invalid request: " + "; ".join(parts)}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a user error: say so in one line, keep the traceback in the log.
        log.exception("lurker explorer: %s %s failed", request.method, request.url.path)
        return JSONResponse(
            {"detail": f"internal error: {type(exc).__name__}: {exc} (see the server's log)"},
            status_code=500,
        )


def _install_static(app: FastAPI, static: Path) -> None:
    """``/`` serves index.html; other paths the built assets, never outside ``static``."""
    root = static.resolve()

    def index() -> Response:
        page = root / "index.html"
        if not page.is_file():
            return HTMLResponse(_NOT_BUILT.format(where=root), status_code=503)
        return FileResponse(page, media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    def home() -> Response:
        return index()

    @app.get("/{path:path}", include_in_schema=False)
    def asset(path: str) -> Response:
        if path == "api" or path.startswith("api/"):
            raise ApiError(
                404, f"no API endpoint /{path}; the API is listed at /docs and /openapi.json"
            )
        target = (root / path).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise ApiError(404, f"no file /{path} in the explorer's assets")
        hashed = target.parent.name == "assets"  # Vite's content-hashed files
        cache = "public, max-age=31536000, immutable" if hashed else "public, max-age=3600"
        return FileResponse(target, headers={"Cache-Control": cache})
