"""The explorer in a real browser: Debian's chromium driven by Playwright, over the real
server (uvicorn in a thread) and a small probed run with its model attached.

What each page shows is checked against independent oracles: the run read back with
lurker.store.Run, and the model itself (a forward hook) for the live feature maps and
kernels. No page may log a console error.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from explorer_fixtures import ExplorerRun, explorer_run  # noqa: F401

CHROMIUM = Path("/usr/bin/chromium")
STATIC = Path(__file__).resolve().parents[1] / "src" / "lurker" / "server" / "static"

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
playwright = pytest.importorskip("playwright.sync_api")
pytest.importorskip("uvicorn")

LAYER = "features.4"  # conv2d_2: a conv with 16 input and 32 output channels, 8x8 maps
OP = "conv2d_2"


@pytest.fixture(scope="session")
def explorer(explorer_run: ExplorerRun) -> Iterator[dict[str, Any]]:  # noqa: F811
    """The server helper's small run (360 digits, its model attached) served on a free port
    by uvicorn in a thread."""
    from lurker.probe.data import load_dataset
    from lurker.server import create_app
    from lurker.server.serve import background
    from lurker.store import Run

    model = explorer_run.model
    with (
        background(create_app(explorer_run.path, model_obj=model)) as url,
        Run.open(explorer_run.path) as run,
    ):
        yield {
            "url": url,
            "run": run,
            "id": explorer_run.path.name,
            "model": model,
            "ds": load_dataset("digits:test", 16, channels=1),
        }


@pytest.fixture
def console() -> list[str]:
    """The console errors of the test's page (a test that provokes one clears it)."""
    return []


@pytest.fixture
def page(browser: Any, console: list[str]) -> Iterator[Any]:
    """A 1280x800 page that fails the test on any console error or uncaught exception."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = ctx.new_page()
    errors = console
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    pg.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    yield pg
    ctx.close()
    assert not errors, f"console errors: {errors}"


def go(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_load_state("networkidle")


def images_loaded(page: Any, selector: str) -> None:
    """Every image under ``selector`` finished loading with real pixels."""
    page.wait_for_function(
        "sel => { const imgs = [...document.querySelectorAll(sel)];"
        " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }",
        arg=selector,
        timeout=15000,
    )


def png_values(page: Any, src: str) -> tuple[np.ndarray, dict[str, str]]:
    from PIL import Image

    res = page.request.get(page.url.split("#")[0] + src)
    assert res.ok, res.text()
    return np.asarray(Image.open(io.BytesIO(res.body()))), res.headers


def test_home_and_runs_list(page: Any, explorer: dict[str, Any]) -> None:
    run = explorer["run"]
    go(page, explorer["url"])
    page.wait_for_url(f"**#/r/{explorer['id']}")  # one run: the list opens it
    page.wait_for_selector("table.layers")
    rows = page.locator("table.layers tbody tr")
    assert rows.count() == len(run.layers)
    for i, info in enumerate(run.layers):
        cells = rows.nth(i).locator("td")
        assert cells.nth(1).inner_text() == info.name
        assert cells.nth(4).inner_text() == str(info.num_units)
    text = page.locator("main").inner_text()
    assert "DigitsNet" in text and str(len(explorer["ds"])) in text
    assert page.locator(".topbar").inner_text().split()[:2] == ["lurker", explorer["id"]]
    for name in ("Home", "Graph", "Layers", "Samples", "Live"):
        assert page.locator(".main-nav a", has_text=name).count() == 1


def test_layer_grid_unit_toggles_and_history(page: Any, explorer: dict[str, Any]) -> None:
    run, rid = explorer["run"], explorer["id"]
    info = next(i for i in run.layers if i.name == LAYER)
    go(page, f"{explorer['url']}#/r/{rid}/layer/{LAYER}?sort=max")
    cards = page.locator(".unit-card")
    assert cards.count() == info.num_units
    by_max = [u.index for u in run.units(LAYER, order_by="max")]
    shown = [int(cards.nth(i).get_attribute("data-unit")) for i in range(cards.count())]
    assert shown == by_max
    assert page.locator("svg.histogram text", has_text="activation").count() >= 1
    page.get_by_role("button", name="index").click()
    assert page.locator(".unit-card").first.get_attribute("data-unit") == "0"
    assert "sort=index" in page.url

    # open a unit from the grid
    unit = 5
    page.locator(f'.unit-card[data-unit="{unit}"]').click()
    page.wait_for_url(f"**/unit/{LAYER}/{unit}**")
    page.wait_for_selector(".top-entry")
    images_loaded(page, ".top-entry img")
    expected = run.unit(LAYER, unit)
    for which in ("max", "mean"):
        page.locator(f'.tabs button[data-tab="{which}"]').click()
        figs = page.locator(".top-entry")
        top = expected.top(which)
        assert figs.count() == len(top)
        for fig, e in zip(figs.all(), top, strict=True):
            assert int(fig.get_attribute("data-sample")) == e.sample_id
            assert float(fig.get_attribute("data-value")) == pytest.approx(e.value, rel=1e-6)
    assert page.locator(".peak").count() == 0  # the peak box is the max tab's
    # the relevance-max list (the run was probed with relevance=True): the samples' images
    page.locator('.tabs button[data-tab="relevance"]').click()
    figs = page.locator(".top-entry")
    top = expected.top("relevance")
    assert figs.count() == len(top) > 0 and "tab=relevance" in page.url
    for fig, e in zip(figs.all(), top, strict=True):
        assert int(fig.get_attribute("data-sample")) == e.sample_id
        assert float(fig.get_attribute("data-value")) == pytest.approx(e.value, rel=1e-6)
        src = fig.locator("img").get_attribute("src")
        assert src.endswith(f"/samples/{e.sample_id}/image.png")
    images_loaded(page, ".top-entry img")
    assert page.locator('button[data-value="grad"]').count() == 0
    page.locator('.tabs button[data-tab="max"]').click()
    assert page.locator(".peak").count() == len(expected.top("max"))

    first = page.locator(".top-entry img").first
    before = first.get_attribute("src")
    page.locator('button[data-value="grad"]').click()
    assert first.get_attribute("src").endswith("/grad.png") and first.get_attribute("src") != before
    images_loaded(page, ".top-entry img")
    page.locator('button[data-value="1"]').click()
    assert first.get_attribute("src").endswith("/grad_crop.png")
    images_loaded(page, ".top-entry img")
    page.locator('button[data-value="input"]').click()
    assert first.get_attribute("src").endswith("/crop.png")
    images_loaded(page, ".top-entry img")
    assert "img=input" in page.url and "crop=1" in page.url and "tab=max" in page.url

    # classes bar chart: the ten highest class means, in order
    means = sorted(
        ((k, v) for k, v in expected.class_means().items() if np.isfinite(v)), key=lambda kv: -kv[1]
    )[:10]
    labels = page.locator("svg.bars-h text.label").evaluate_all(
        "els => els.map(e => e.firstChild.nodeValue)"
    )
    assert labels == [k for k, _ in means]

    # keyboard and history
    page.keyboard.press("ArrowRight")
    page.wait_for_url(f"**/unit/{LAYER}/{unit + 1}?**")
    page.wait_for_selector(".top-entry")
    page.go_back()
    page.wait_for_url(f"**/unit/{LAYER}/{unit}?**")
    page.go_back()
    page.wait_for_url(f"**/layer/{LAYER}**")
    page.wait_for_selector(".unit-card")
    page.go_forward()
    page.wait_for_url(f"**/unit/{LAYER}/{unit}**")
    assert page.locator("h1").inner_text().startswith(f"{LAYER} · unit {unit}")
    graph = page.locator("a", has_text="place in graph")
    assert graph.get_attribute("href").endswith(f"/graph?focus={info.op_label}")


def test_a_late_page_never_renders_into_the_next(page: Any, explorer: dict[str, Any]) -> None:
    """Navigating away before a page's data arrives: the late page must not be appended."""
    base, rid = explorer["url"], explorer["id"]
    held: list[Any] = []
    page.route("**/api/runs/*/samples/3", lambda route: held.append(route))  # held back
    page.goto(f"{base}#/r/{rid}/sample/3")
    deadline = time.monotonic() + 20
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert held, "the sample page never asked for its JSON"
    page.evaluate(f"location.hash = '#/r/{rid}/layer/features.4'")
    page.wait_for_selector(".unit-card")
    held[0].continue_()  # now the sample page's data arrives, late
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(300)
    text = page.inner_text("main")
    assert "Units that rank it" not in text and "Sample 3" not in text
    assert page.locator(".unit-card").count() == 32


def test_samples_and_sample(page: Any, explorer: dict[str, Any]) -> None:
    run, rid = explorer["run"], explorer["id"]
    go(page, f"{explorer['url']}#/r/{rid}/samples")
    cards = page.locator(".sample-card")
    assert cards.count() == min(100, len(explorer["ds"]))
    page.locator("a", has_text="next →").first.click()
    page.wait_for_url("**offset=100")
    page.wait_for_selector('.sample-card[data-sample="100"]')

    # the top sample of some unit: it must list that unit
    info = run.layers[0]
    sid = run.unit(info.name, 0).top("max")[0].sample_id
    go(page, f"{explorer['url']}#/r/{rid}/sample/{sid}")
    page.wait_for_selector(".chip")
    images_loaded(page, "img.sample-img")
    want = {
        (i.name, u.index, which)
        for i in run.layers
        for u in run.units(i.name)
        for which in ("max", "mean")
        if any(e.sample_id == sid for e in u.top(which))
    }
    chips = page.locator(".chip")
    got = set()
    for chip in chips.all():
        layer = chip.locator("xpath=ancestor::section[1]//h3/a").inner_text()
        got.add((layer, int(chip.get_attribute("data-unit")), chip.get_attribute("data-list")))
    assert got == want
    sample = run.sample(sid)
    text = page.locator("main").inner_text()
    assert f"Sample {sid}" in text and f"{sample.class_name} ({sample.label})" in text
    with torch.no_grad():
        probs = torch.softmax(explorer["model"](explorer["ds"][sid][0][None]), 1)[0]
    top = [str(int(c)) for c in probs.argsort(descending=True)[:5]]
    assert [t.split()[0] for t in page.locator(".preds li").all_inner_texts()] == top


def test_live_upload_maps_and_kernel(page: Any, explorer: dict[str, Any]) -> None:
    from PIL import Image

    rid, model = explorer["id"], explorer["model"]
    go(page, f"{explorer['url']}#/r/{rid}/live")
    rng = np.random.default_rng(0)
    pixels = (rng.random((16, 16)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, "PNG")
    page.set_input_files(
        "#live-file", {"name": "x.png", "mimeType": "image/png", "buffer": buf.getvalue()}
    )
    page.wait_for_url("**image=**")
    page.locator(f'.op-list li[data-op="{OP}"]').click()
    page.wait_for_url(f"**op={OP}**")
    page.wait_for_selector('.fmaps[data-side="output"] .fmap img')

    # what the model computes for the uploaded image, through a forward hook
    seen: dict[str, torch.Tensor] = {}
    conv = model.features[4]
    hook = conv.register_forward_hook(
        lambda m, i, o: seen.update(input=i[0].detach(), output=o.detach())
    )
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(pixels).float()[None, None] / 255.0)
    finally:
        hook.remove()
    top5 = [str(int(c)) for c in logits[0].argsort(descending=True)[:5]]
    assert [t.split()[0] for t in page.locator(".live-result .preds li").all_inner_texts()] == top5

    for side, channel in (("output", 3), ("input", 7)):
        img = page.locator(f'.fmaps[data-side="{side}"] .fmap[data-channel="{channel}"] img')
        img.scroll_into_view_if_needed()
        images_loaded(page, f'.fmaps[data-side="{side}"] .fmap[data-channel="{channel}"] img')
        shown, headers = png_values(page, img.get_attribute("src"))
        scale = int(headers.get("x-lurker-scale", "1"))
        v = seen[side][0, channel].numpy()
        lo, hi = float(v.min()), float(v.max())
        want = np.zeros_like(v) if hi == lo else np.round(255 * (v - lo) / (hi - lo))
        assert shown.shape == (v.shape[0] * scale, v.shape[1] * scale)
        assert np.abs(shown[::scale, ::scale].astype(int) - want.astype(int)).max() <= 1
        assert float(headers["x-lurker-min"]) == pytest.approx(lo, rel=1e-5, abs=1e-6)
        assert float(headers["x-lurker-max"]) == pytest.approx(hi, rel=1e-5, abs=1e-6)

    # kernel between input 7 and output 3: click the input map, then the output map
    page.locator('.fmaps[data-side="input"] .fmap[data-channel="7"]').click()
    page.locator('.fmaps[data-side="output"] .fmap[data-channel="3"]').click()
    page.wait_for_selector('.kernel[data-out="3"][data-in="7"] td')
    cells = page.locator(".kernel td")
    shown_w = np.array([float(c.get_attribute("data-value")) for c in cells.all()])
    weight = conv.weight[3, 7].detach().numpy().ravel()
    np.testing.assert_allclose(shown_w, weight, rtol=1e-6, atol=1e-7)
    images_loaded(page, ".pair img")


def test_graph_page_and_errors(page: Any, console: list[str], explorer: dict[str, Any]) -> None:
    rid = explorer["id"]
    go(page, f"{explorer['url']}#/r/{rid}/graph?focus={OP}")
    assert page.locator("main").inner_text().strip()
    assert page.locator(".notice.error").count() == 0
    assert not console
    # an unknown layer says what exists (the API's 404 body); the browser logs the 404
    go(page, f"{explorer['url']}#/r/{rid}/layer/nope")
    page.wait_for_selector(".notice.error")
    msg = page.locator(".notice.error").inner_text()
    assert "nope" in msg and LAYER in msg
    assert all("404" in e for e in console)
    console.clear()


@pytest.fixture(scope="session")
def static_site(
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """`lurker export` of the run, served by a plain static file server (no lurker)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from lurker.server.export import export_site

    site = export_site(explorer_run.path, tmp_path_factory.mktemp("site") / "site", progress=False)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    thread.join(10)


def test_static_export_pages(
    page: Any, console: list[str], static_site: str, explorer: dict[str, Any]
) -> None:
    run, rid = explorer["run"], explorer["id"]
    go(page, static_site)
    page.wait_for_url(f"**#/r/{rid}")
    page.wait_for_selector("table.layers")
    assert page.locator("table.layers tbody tr").count() == len(run.layers)

    go(page, f"{static_site}#/r/{rid}/layer/{LAYER}")
    page.wait_for_selector(".unit-card")
    assert page.locator(".unit-card").count() == run.layer(LAYER).num_units
    images_loaded(page, ".unit-card img")

    go(page, f"{static_site}#/r/{rid}/unit/{LAYER}/2?tab=max")
    page.wait_for_selector(".top-entry")
    images_loaded(page, ".top-entry img")
    shown = [
        int(s)
        for s in page.locator(".top-entry").evaluate_all("es => es.map(e => e.dataset.sample)")
    ]
    assert shown == [e.sample_id for e in run.unit(LAYER, 2).top("max")]
    page.locator('button[data-value="1"]').click()  # crops of the max list are exported
    images_loaded(page, ".top-entry img")

    go(page, f"{static_site}#/r/{rid}/samples?offset=100")
    page.wait_for_selector('.sample-card[data-sample="100"]')
    page.wait_for_load_state("networkidle")
    # the export holds the images of top-k samples only: the others 404 and say so
    ranked = {
        e.sample_id
        for i in run.layers
        for u in run.units(i.name)
        for w in ("max", "mean")
        for e in u.top(w)
    }
    missing = {
        int(c.get_attribute("data-sample")) for c in page.locator(".sample-card:has(.no-img)").all()
    }
    assert not missing & ranked  # (the served tests may have cached the others)
    sid = shown[0]
    go(page, f"{static_site}#/r/{rid}/sample/{sid}")
    page.wait_for_selector(".chip")
    images_loaded(page, "img.sample-img")

    go(page, f"{static_site}#/r/{rid}/live")
    assert "lurker serve" in page.locator("main .notice").inner_text()
    go(page, f"{static_site}#/r/{rid}/explain?image=sample-1")
    assert "lurker serve" in page.locator("main .notice").inner_text()

    # nothing failed to load but those sample images
    failed = {int(e.split("/samples/")[1].split("/")[0]) for e in console if e.startswith("404 ")}
    assert missing <= failed and not failed & ranked
    assert all("404" in e for e in console)
    console.clear()


def test_explain_page(page: Any, explorer: dict[str, Any]) -> None:
    """Every method's heatmap loads over the sample; the one slider sets every overlay's
    opacity; another target class reloads them all; the sample page links here."""
    from lurker.explain import METHODS
    from lurker.explain import concepts as lurker_concepts

    rid, model, ds = explorer["id"], explorer["model"], explorer["ds"]
    sid = 5
    with torch.no_grad():
        top = torch.softmax(model(ds[sid][0][None])[0], 0).topk(5).indices.tolist()

    go(page, f"{explorer['url']}#/r/{rid}/sample/{sid}")
    page.locator("#explain-this").click()
    page.wait_for_url(f"**#/r/{rid}/explain?image=sample-{sid}")
    page.wait_for_selector(".explain-card")
    assert page.locator(".methods .explain-card").count() == len(METHODS)
    images_loaded(page, ".methods img.heat")
    heat = page.locator(".methods img.heat")
    srcs = heat.evaluate_all("es => es.map(e => e.getAttribute('src'))")
    assert sorted(s.split("/explain/")[1].split(".png")[0] for s in srcs) == sorted(METHODS)
    assert all("target=top" in s and "overlay=0" in s for s in srcs)
    # the top-5 target chooser, the top class marked
    classes = page.locator(".target-list .target").evaluate_all(
        "es => es.map(e => Number(e.dataset.class))"
    )
    assert classes == top
    assert page.locator(".target-list .target.on").get_attribute("data-class") == str(top[0])
    # captions filled from the JSON (min/max/sum; Grad-CAM names its layer)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.methods figcaption')]"
        ".every(f => f.textContent.includes('max'))"
    )
    assert "features.9" in page.locator('.explain-card[data-method="gradcam"]').inner_text()

    # concept relevance of the default layer: 8 units, each map loaded, each linked to its
    # unit page (the layer is probed), ranked as lurker.explain.concepts ranks them
    page.wait_for_selector(".concept")
    assert page.locator(".concept").count() == 8
    images_loaded(page, ".concepts img.heat")
    units = page.locator(".concept").evaluate_all("es => es.map(e => Number(e.dataset.unit))")
    want = lurker_concepts(model, ds[sid][0][None], layer="features.9", top=8)
    assert units == want.units[0].tolist()
    links = page.locator(".concept h3 a").evaluate_all("es => es.map(e => e.getAttribute('href'))")
    assert links == [f"#/r/{rid}/unit/features.9/{u}" for u in units]
    heat = page.locator("img.heat")  # method and concept overlays alike

    opacities = "es => es.map(e => getComputedStyle(e).opacity)"
    assert set(heat.evaluate_all(opacities)) == {"0.7"}
    page.locator("#explain-opacity").fill("0.25")
    assert set(heat.evaluate_all(opacities)) == {"0.25"}
    assert page.locator("#explain-opacity-value").inner_text() == "25%"
    assert "opacity=0.25" in page.url

    second = top[1]
    page.locator(f'.target-list .target[data-class="{second}"]').click()
    page.wait_for_url(f"**target={second}**")
    page.wait_for_function(
        "t => { const imgs = [...document.querySelectorAll('.methods img.heat')];"
        " return imgs.length > 0 && imgs.every(i => i.src.includes('target=' + t)"
        " && i.complete && i.naturalWidth > 0); }",
        arg=str(second),
        timeout=20000,
    )
    assert page.locator(".methods img.heat").count() == len(METHODS)
    assert page.locator(".target-list .target.on").get_attribute("data-class") == str(second)
    assert set(page.locator(".methods img.heat").evaluate_all(opacities)) == {"0.25"}

    # a unit target: typed as LAYER:CHANNEL, linked to its unit page
    page.locator("#explain-unit").fill(f"{LAYER}:3")
    page.locator("#explain-unit").press("Enter")
    page.wait_for_url(f"**target={LAYER}:3**".replace(":", "%3A"))
    page.wait_for_selector(f'main a[href="#/r/{rid}/unit/{LAYER}/3"]')
    assert "for unit features.4:3" in page.locator("main h2").first.inner_text()
    images_loaded(page, ".methods img.heat")
