"""A small probed run for the explorer's server tests, made once per test process.

The digits CNN trained for one epoch (seconds) and probed on the 360 test digits, with
its model spec, weights and data recorded in the run's config (as `lurker probe` does),
so the server can load the model and the dataset on its own.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

_BUILT: dict[str, ExplorerRun] = {}

CHROMIUM = Path("/usr/bin/chromium")
STATIC = Path(__file__).resolve().parents[1] / "src" / "lurker" / "server" / "static"


def skip_without_browser() -> None:
    """Skip the calling test module where the browser tests cannot run: no Debian
    chromium, no built front end, no Playwright or uvicorn."""
    if not CHROMIUM.exists():
        pytest.skip(
            "the browser tests need Debian's chromium at /usr/bin/chromium (make sysdeps)",
            allow_module_level=True,
        )
    if not (STATIC / "index.html").exists():
        pytest.skip(
            f"the explorer's front end is not built ({STATIC}/index.html): run `make web`",
            allow_module_level=True,
        )
    pytest.importorskip("playwright.sync_api")
    pytest.importorskip("uvicorn")


@dataclass(frozen=True)
class ExplorerRun:
    path: Path
    weights: Path
    model: torch.nn.Module


def probe_digits(
    out: Path, weights: Path, *, seed: int = 0, k: int = 5, **options: Any
) -> torch.nn.Module:
    """Train the digits CNN (``seed``) for an epoch, save its weights to ``weights`` and
    probe it into ``out`` with the spec, weights and data recorded (the server attaches the
    model by itself); ``options`` go to ``probe``. Returns the model (eval)."""
    from lurker.examples import train_digits
    from lurker.probe import probe
    from lurker.probe.data import load_dataset

    model, _ = train_digits(1, seed=seed, log=lambda *_: None)
    torch.save(model.state_dict(), weights)
    run = probe(
        model,
        load_dataset("digits:test", 16, channels=1),
        out=out,
        k=k,
        batch_size=128,
        progress=False,
        meta={
            "model_spec": "lurker.examples:DigitsNet",
            "weights": str(weights),
            "data": "digits:test",
        },
        **options,
    )
    assert run is not None
    run.close()
    return model.eval()


def build_run(root: Path) -> ExplorerRun:
    weights = root / "digits.pt"
    out = root / "runs" / "digits"
    model = probe_digits(out, weights, relevance=True)
    # feature visualizations of a few units of the last conv (the unit pages' fourth tab)
    import lurker

    lurker.featviz(model, FEATVIZ_LAYER, units=FEATVIZ_UNITS, steps=16, run=out).save(out)
    # a second objective: unit 1 has both, unit 6 a neuron image only; and a layer with
    # neuron images only (the grid falls back to them)
    lurker.featviz(
        model, FEATVIZ_LAYER, units=FEATVIZ_NEURON_UNITS, objective="neuron", steps=16, run=out
    ).save(out)
    lurker.featviz(
        model, FEATVIZ_NEURON_LAYER, units=[0, 3], objective="neuron", steps=8, run=out
    ).save(out)
    return ExplorerRun(out, weights, model.eval())


FEATVIZ_LAYER = "features.8"
FEATVIZ_UNITS = [0, 1, 2, 5]
FEATVIZ_NEURON_UNITS = [1, 6]  # objective "neuron" of FEATVIZ_LAYER
FEATVIZ_NEURON_LAYER = "features.4"  # neuron images only, of units 0 and 3


@pytest.fixture(scope="session")
def explorer_run(tmp_path_factory: pytest.TempPathFactory) -> ExplorerRun:
    """The run (shared by every test file of this process; never written by tests except
    its image cache). Under pytest's temporary root, which pytest prunes: a folder of
    ``/tmp`` would be left behind by every test session."""
    if "run" not in _BUILT:
        _BUILT["run"] = build_run(tmp_path_factory.mktemp("explorer-run"))
    return _BUILT["run"]


@pytest.fixture(scope="module", name="served")
def served_explorer_run(explorer_run: ExplorerRun) -> Iterator[dict[str, Any]]:
    """The shared run served with its model, once per test module that imports this
    (with ``explorer_run``) and asks for ``served``: ``url`` (its pages, ``URL#/r/RUN``),
    ``api`` (``URL/api/runs/RUN``) and ``run`` (the :class:`ExplorerRun`). Named apart
    from ``served`` so that importing it shadows no test's argument."""
    from lurker.server import create_app
    from lurker.server.serve import background

    with background(create_app(explorer_run.path, model_obj=explorer_run.model)) as url:
        name = explorer_run.path.name
        yield {"url": f"{url}#/r/{name}", "api": f"{url}api/runs/{name}", "run": explorer_run}


def summary_rank_behind(app: Any, url: Callable[[int], str], started: threading.Event) -> int:
    """Send 60 model requests (``url(i)``, more than the 40 worker threads) to ``app``,
    then, once the model is busy, a run-summary request: its position among the answers.
    Requests waiting for the model must hold no worker thread, so it answers early."""
    import asyncio
    import concurrent.futures

    import httpx2 as httpx

    order: list[str] = []

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/api/runs/digits/live/sample-1")).status_code == 200

            async def model_request(i: int) -> None:
                r = await c.get(url(i))
                assert r.status_code == 200, r.text
                order.append("model")

            tasks = [asyncio.create_task(model_request(i)) for i in range(60)]
            for _ in range(3000):  # (bounded: a request that fails never starts one)
                if started.is_set() or any(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.01)
            assert started.is_set(), [t.exception() for t in tasks if t.done()][:1]
            await asyncio.sleep(0.1)
            r = await c.get("/api/runs/digits")
            assert r.status_code == 200
            order.append("summary")
            await asyncio.gather(*tasks)

    # In a thread of its own: a Playwright browser of another test in this process keeps an
    # event loop running in the main thread, where asyncio.run would refuse to start.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, main()).result()
    assert order.count("model") == 60
    return order.index("summary")


class SiteServer(ThreadingHTTPServer):
    """The static file server of :func:`static_server`."""

    # a page asks for many files at once; the default backlog of 5 connections
    # overflows on a loaded machine and the browser sees ERR_CONNECTION_RESET
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A browser that drops a request it no longer needs (an image of a page it
        left) breaks the pipe the answer is written to: harmless, and said by no traceback
        on stderr. Any other error is printed as the server always does."""
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


@contextlib.contextmanager
def static_server(site: Path) -> Iterator[str]:
    """Serve an exported site with Python's static file server (what `lurker export`
    promises to work with), on a free port in a thread: yields its URL."""
    import functools
    from http.server import SimpleHTTPRequestHandler

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = SiteServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        thread.join(10)


def watch(browser: Any, width: int = 1280, height: int = 900) -> tuple[Any, Any, list[str]]:
    """``(context, page, errors)``: a new page whose console errors, uncaught exceptions
    and HTTP error answers are collected in ``errors`` (tests assert it stays empty)."""
    ctx = browser.new_context(viewport={"width": width, "height": height})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    pg.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    return ctx, pg, errors


def assert_no_filters(page: Any, base: str, layer: str, unit: int) -> None:
    """The layer page and one unit's page of ``base`` (``URL#/r/RUN``) show no filters and
    keep no empty room for them: what a layer that does not read the image, or a site
    without the model's weights, shows."""
    page.goto(f"{base}/layer/{layer}")
    page.wait_for_selector(".unit-grid .unit-card")
    page.wait_for_load_state("networkidle")
    assert page.locator("#filters").count() == 0
    assert page.locator(".filters-slot").bounding_box() is None  # the slot takes no room
    page.goto(f"{base}/unit/{layer}/{unit}")
    page.wait_for_selector(".topk")
    page.wait_for_load_state("networkidle")
    assert page.locator("#unit-filter").count() == 0


@contextlib.contextmanager
def strict_page(browser: Any, width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A page that fails the test on any console error, uncaught exception or HTTP error
    answer (checked when the block ends)."""
    ctx, pg, errors = watch(browser, width, height)
    yield pg
    ctx.close()
    assert not errors, f"console errors: {errors}"


def forget_mean_peaks(run_dir: Path) -> None:
    """Make a run look as an older lurker wrote it: its mean lists' y/x are -1 (that
    lurker kept no peaks for the mean list)."""
    import sqlite3

    import numpy as np

    from lurker.store.schema import TOP_DTYPE

    with contextlib.closing(sqlite3.connect(run_dir / "run.db")) as db, db:
        for rowid, blob in db.execute("SELECT rowid, top FROM units").fetchall():
            top = np.frombuffer(blob, TOP_DTYPE).copy().reshape(2, -1)
            top["y"][1] = top["x"][1] = -1
            db.execute("UPDATE units SET top = ? WHERE rowid = ?", (top.tobytes(), rowid))


def shown_percent(p: float) -> str:
    """A probability as the pages show it (web/src/dom.ts ``pct``): to 0.1%, but never a
    rounded 100.0% or 0.0% for a value that is not exactly 1 or 0."""
    if 0 < p < 0.0005:
        return "<0.1%"
    if 0.9995 <= p < 1:
        return ">99.9%"
    return f"{100 * p:.1f}%"


@contextlib.contextmanager
def served_run(
    root: Path, rid: str, model: Any, data: Any, layer: str, k: int
) -> Iterator[dict[str, Any]]:
    """Probe ``model`` on ``data`` into ``root/rid`` from Python (a run that records no
    model or dataset) and serve it twice: with its model and dataset (``url``), and bare,
    as `lurker serve RUN` serves it (``bare``)."""
    from lurker.probe import probe
    from lurker.server import create_app
    from lurker.server.serve import background

    run = probe(model, data, out=root / rid, k=k, batch_size=16, progress=False)
    assert run is not None and layer in [info.name for info in run.layers]
    run.close()
    with (
        background(create_app(root / rid, model_obj=model, dataset=data)) as url,
        background(create_app(root / rid)) as bare,
    ):
        yield {
            "url": url.rstrip("/"),
            "bare": bare.rstrip("/"),
            "model": model,
            "data": data,
            "run": root / rid,
        }


def get_json(url: str) -> Any:
    """A GET that must answer 200, as JSON."""
    import httpx2 as httpx

    r = httpx.get(url)
    assert r.status_code == 200, r.text
    return r.json()


def canvas_pixels(page: Any, selector: str) -> list[Any]:
    """The RGB pixels of each canvas under ``selector`` (once all are drawn: lazy ones
    draw when scrolled into view)."""
    for c in page.locator(selector).all():
        c.scroll_into_view_if_needed()
    page.wait_for_function(
        "sel => { const cs = [...document.querySelectorAll(sel)];"
        " return cs.length > 0 && cs.every(c => c.dataset.ready === '1'); }",
        arg=selector,
        timeout=15000,
    )
    shots = page.locator(selector).evaluate_all(
        "cs => cs.map(c => [c.height, c.width,"
        " Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)])"
    )
    import numpy as np

    return [np.array(d, np.uint8).reshape(hh, ww, 4)[..., :3] for hh, ww, d in shots]


def assert_signal_max_list(
    doc: dict[str, Any], maps: torch.Tensor, k: int, span: Callable[[int, int], list[int]]
) -> list[dict[str, Any]]:
    """A signal unit document's max list equals brute force over ``maps`` (the unit's
    ``(samples, T')`` values from forward hooks): the top ``k`` samples by their peak, each
    value, peak position, and the span ``span(sample_id, x)`` its peak sees; the values
    themselves are left to the sample's one signal document. Returns the entries."""
    peak, where = maps.max(1)
    top = doc["top"]["max"]
    assert [e["sample_id"] for e in top] == torch.argsort(-peak)[:k].tolist()
    for e in top:
        sid = e["sample_id"]
        assert e["value"] == pytest.approx(float(peak[sid]), rel=1e-5)
        assert e["x"] == int(where[sid])
        assert e["span"] == span(sid, e["x"])
        assert "signal" not in e
    return top


def without_weights(run: Path, root: Path) -> Path:
    """A copy of ``run`` under ``root`` (its explanation cache included) whose recorded
    weights file does not exist here: a server cannot load its model."""
    import shutil

    from lurker.store import RunWriter, run_lock

    copy = root / run.name
    shutil.copytree(run, copy)
    with run_lock(copy):
        w = RunWriter.reopen(copy)
        try:
            w.meta_set("config", {**w.meta_get("config"), "weights": str(root / "gone.pt")})
        finally:
            w.close()
    return copy
