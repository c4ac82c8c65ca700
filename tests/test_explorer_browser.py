"""The explorer in a real browser: Debian's chromium driven by Playwright, over the real
server (uvicorn in a thread) and a small probed run with its model attached.

What each page shows is checked against independent oracles: the run read back with
lurker.store.Run, and the model itself (a forward hook) for the live feature maps and
kernels. No page may log a console error.
"""

from __future__ import annotations

import inspect
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from explorer_fixtures import (  # noqa: F401
    FEATVIZ_LAYER,
    FEATVIZ_NEURON_LAYER,
    FEATVIZ_NEURON_UNITS,
    FEATVIZ_UNITS,
    ExplorerRun,
    canvas_pixels,
    explorer_run,
    shown_percent,
    skip_without_browser,
    static_server,
)

skip_without_browser()

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
    # what the run holds, and what it does not (with the command that makes it)
    holds = page.locator(".card", has_text="This run holds").inner_text()
    assert run.has_relevance and "by max, by mean and by relevance for the prediction" in holds
    assert "none (lurker map RUN)" in holds
    fv = run.featviz_layers()
    assert (
        (f"{len(fv)} layer" in holds and fv[0] in holds) if fv else "none (lurker featviz" in holds
    )
    assert "computed on request" in holds
    assert page.locator(".entry-links a", has_text="Live view").count() == 1  # model attached


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
        # the run's images_version: the browser keeps the image (docs/explorer.md)
        path, _, version = src.partition("?v=")
        assert path.endswith(f"/samples/{e.sample_id}/image.png") and version
    images_loaded(page, ".top-entry img")
    assert page.locator('button[data-value="grad"]').count() == 0
    page.locator('.tabs button[data-tab="max"]').click()
    assert page.locator(".peak").count() == len(expected.top("max"))

    first = page.locator(".top-entry img").first
    before = first.get_attribute("src")
    page.locator('button[data-value="grad"]').click()
    path = first.get_attribute("src").split("?")[0]
    assert path.endswith("/grad.png") and first.get_attribute("src") != before
    images_loaded(page, ".top-entry img")
    page.locator('button[data-value="1"]').click()
    assert first.get_attribute("src").split("?")[0].endswith("/grad_crop.png")
    images_loaded(page, ".top-entry img")
    page.locator('button[data-value="input"]').click()
    assert first.get_attribute("src").split("?")[0].endswith("/crop.png")
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
    # the layer page stays until the unit page is drawn (after the run's generation check)
    page.locator("h1", has_text=f"{LAYER} · unit {unit}").wait_for()
    assert page.locator("h1").inner_text().startswith(f"{LAYER} · unit {unit}")
    graph = page.locator("a", has_text="place in graph")
    assert graph.get_attribute("href").endswith(f"/graph?focus={info.op_label}")


def test_unit_page_of_a_token_layer_marks_the_peak_tokens_patch(page: Any, tmp_path: Path) -> None:
    """A ViT block's positions are tokens: no receptive field, each token stands for a
    patch. The unit page names its crop the token's patch (not a receptive field) and marks,
    on the full image, the patch of each entry's peak token; the class token has none."""
    from torchvision.models import VisionTransformer

    from lurker.probe import probe
    from lurker.probe.data import load_dataset
    from lurker.server import create_app
    from lurker.server.serve import background
    from lurker.store import Run

    torch.manual_seed(0)
    size, patch, layer = 16, 4, "encoder.layers.encoder_layer_0"
    model = VisionTransformer(
        image_size=size, patch_size=patch, num_layers=1, num_heads=2, hidden_dim=16,
        mlp_dim=32, num_classes=10,
    ).eval()  # fmt: skip
    with torch.no_grad():  # unit 5 peaks at the class token on every sample (a residual)
        model.class_token[0, 0, 5] = 50.0
    data = load_dataset("digits:test", size, channels=3)
    out = tmp_path / "runs" / "vit"
    meta = {"data": "digits:test"}  # so that the server finds the samples
    probe(model, data, out=out, layers=[layer], k=6, progress=False, meta=meta).close()
    grid = size // patch
    with background(create_app(out, model_obj=model)) as url, Run.open(out) as run:
        assert run.layer(layer).rf is None and run.layer(layer).layout["boxes"]
        unit = 0
        top = run.unit(layer, unit).top("max")
        go(page, f"{url}#/r/vit/unit/{layer}/{unit}?tab=max&crop=0")
        page.wait_for_selector(".top-entry")
        images_loaded(page, ".top-entry img")
        assert page.locator('button[data-value="1"]').inner_text() == "token's patch"
        assert "the patch of the peak's token" in page.inner_text(".toolbar")
        assert "receptive field" not in page.inner_text(".toolbar")
        marks = page.locator(".top-entry").evaluate_all(
            "es => es.map(e => { const m = e.querySelector('.peak');"
            " return m && !m.hidden ? [m.style.top, m.style.height, m.style.left,"
            " m.style.width].map(parseFloat) : null; })"
        )
        assert len(marks) == len(top)
        for e, mark in zip(top, marks, strict=True):
            token = e.x  # the token axis; 0 is the class token
            if token == 0:
                assert mark is None
                continue
            r, c = divmod(token - 1, grid)  # patch tokens in row-major order
            want = [r * patch, patch, c * patch, patch]  # top, height, left, width in px
            assert mark is not None, e.rank
            assert [round(v * size / 100, 3) for v in mark] == want, e.rank
        assert any(m is not None for m in marks)

        # a mean-list crop is tagged as the class token's where the unit peaks there, as a
        # max-list entry is (oracle: the block's output by a forward hook, by hand)
        def peaks(unit: int) -> list[int]:
            xs = torch.stack([data[e.sample_id][0] for e in run.unit(layer, unit).top("mean")])
            seen: list[torch.Tensor] = []
            hook = dict(model.named_modules())[layer].register_forward_hook(
                lambda m, i, o: seen.append(o)
            )
            with torch.no_grad():
                model(xs)
            hook.remove()
            return seen[0][:, :, unit].argmax(1).tolist()

        for unit in (0, 5):
            want = [rank for rank, token in enumerate(peaks(unit)) if token == 0]
            assert (unit == 5) == (want == list(range(6)))
            go(page, f"{url}#/r/vit/unit/{layer}/{unit}?tab=mean&crop=1")
            page.wait_for_selector(".top-entry")
            page.wait_for_load_state("networkidle")
            if want:
                page.wait_for_selector(".top-entry .token-tag")
            tagged = page.locator(".top-entry").evaluate_all(
                "es => es.map(e => e.querySelector('.token-tag')?.textContent ?? null)"
            )
            assert [i for i, t in enumerate(tagged) if t == "class token"] == want
            assert all(t in (None, "class token") for t in tagged)
            if want:
                assert "the unit peaks at a token with no patch" in page.inner_text(".toolbar")
                page.screenshot(path=str(tmp_path / "unit-mean-crop.png"), full_page=True)

        # the live view of the block: the class token's value at each unit beside its maps
        go(page, f"{url}#/r/vit/live?image=sample-3&op={layer}")
        strip = page.locator('.card[data-side="output"] .patchless[data-token="0"]')
        strip.wait_for()
        assert strip.locator("h4").inner_text().startswith("class token")
        assert strip.locator("svg.vector-strip .bars rect").count() == 16
        page.screenshot(path=str(tmp_path / "live-class-token.png"), full_page=True)
        page.goto("about:blank")  # no map left loading once the server stops


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
        for which in run.top_lists
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
    assert f"Sample {sid}" in text
    # the digits' class names are their indices: the label is said once, not "0 (0)"
    assert sample.class_name == str(sample.label)
    assert page.locator("#sample-label").inner_text() == str(sample.label)
    with torch.no_grad():
        probs = torch.softmax(explorer["model"](explorer["ds"][sid][0][None]), 1)[0]
    top = [str(int(c)) for c in probs.argsort(descending=True)[:5]]
    assert [t.split()[0] for t in page.locator(".preds li").all_inner_texts()] == top


def test_sample_page_shows_more_appearances(page: Any, explorer: dict[str, Any]) -> None:
    """The first page of top-list entries comes in pages (cut to 5 here by rewriting the
    request); every layer is listed with its count at once; "show more" loads the rest,
    each layer's chips in the API's order (rank, then list, then unit)."""
    run, rid = explorer["run"], explorer["id"]
    found: dict[int, list[tuple]] = {}
    for pos, info in enumerate(run.layers):
        for u in run.units(info.name):
            for wpos, which in enumerate(run.top_lists):
                top = u.top(which)
                # a unit that is the same everywhere (here: a ReLU that never fires, mean =
                # max = 0) has lists of ties, which the page leaves out
                if u.mean == u.max and len({e.value for e in top}) == 1:
                    continue
                for e in top:
                    found.setdefault(e.sample_id, []).append(
                        ((pos, e.rank, wpos, u.index), (info.name, u.index, which))
                    )
    sid = max(found, key=lambda k: len(found[k]))
    want = [row for _, row in sorted(found[sid])]
    assert 5 < len(want) <= 205
    page.route(
        f"**/api/runs/{rid}/samples/{sid}",
        lambda route: route.continue_(url=route.request.url + "?offset=0&limit=5"),
    )
    go(page, f"{explorer['url']}#/r/{rid}/sample/{sid}")
    page.wait_for_selector(".chip")
    assert page.locator(".chip").count() == 5
    layers = [w[0] for w in want]
    # "layer L · N lists": a layer named by a number (a Sequential's "8") is not read as a count
    heads = [h.split(" ") for h in page.locator("section.appear h3").all_inner_texts()]
    assert all(h[0] == "layer" and h[2] == "·" and h[4] in ("list", "lists") for h in heads)
    assert [h[1] for h in heads] == list(dict.fromkeys(layers))
    assert [int(h[3]) for h in heads] == [layers.count(x) for x in dict.fromkeys(layers)]
    more = page.locator("#more-appearances")
    assert more.inner_text() == f"show the other {len(want) - 5}"
    # the layers not whole in the first page say how much of them is shown
    partial = [x for x in dict.fromkeys(layers) if layers[:5].count(x) < layers.count(x)]
    assert [h[1] for h in heads if "shown" in h] == partial
    more.click()
    page.wait_for_function(f"() => document.querySelectorAll('.chip').length === {len(want)}")
    assert more.is_hidden()
    got = []
    for section in page.locator("section.appear").all():
        layer = section.get_attribute("data-layer")
        for chip in section.locator(".chip").all():
            got.append(
                (layer, int(chip.get_attribute("data-unit")), chip.get_attribute("data-list"))
            )
    assert got == want
    assert "shown" not in page.locator("main").inner_text()  # no layer left partly shown


def test_image_picker_on_live_and_explain(page: Any, explorer: dict[str, Any]) -> None:
    """Both pages take a dataset sample through the same picker; a bad id is refused with
    the range; the live page names the op and links to it in the graph."""
    rid = explorer["id"]
    n = len(explorer["ds"])
    go(page, f"{explorer['url']}#/r/{rid}/live")
    page.locator("#live-sample").fill(str(n))
    page.locator("#live-use-sample").click()
    assert f"0 to {n - 1}" in page.locator(".live-input .notice.error").inner_text()
    page.locator("#live-sample").fill("4")
    page.locator("#live-use-sample").click()
    page.wait_for_url("**image=sample-4**")
    page.locator(f'.op-list li[data-op="{OP}"]').click()
    page.wait_for_url(f"**op={OP}**")
    page.wait_for_selector(".live-maps h2 a.in-graph")
    head = page.locator(".op-picker h3")
    assert head.inner_text() == f"Op {OP} · show in the graph"
    for link in (head.locator("a"), page.locator(".live-maps h2 a.in-graph")):
        assert link.get_attribute("href") == f"#/r/{rid}/graph?focus={OP}"
    assert page.locator("#live-sample").input_value() == "4"
    page.locator(".live-maps h2 a.in-graph").click()
    page.wait_for_url(f"**/graph?focus={OP}")

    go(page, f"{explorer['url']}#/r/{rid}/explain")
    page.locator("#explain-sample").fill("5")
    page.locator("#explain-use-sample").click()
    page.wait_for_url(f"**#/r/{rid}/explain?image=sample-5")
    page.wait_for_selector(".explain-card")


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
    page.wait_for_selector(".live-result .preds li")  # (the page may still be redrawing)
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

    from lurker.server.export import export_site

    site = export_site(explorer_run.path, tmp_path_factory.mktemp("site") / "site", progress=False)

    with static_server(site) as url:
        yield url


def as_rgb(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_static_export_pages(
    page: Any, console: list[str], static_site: str, explorer: dict[str, Any]
) -> None:
    """Walk the exported site (home, layer, unit with both tabs and the crop toggle,
    samples, a sample): no request fails (the page fixture fails the test on any 4xx), and
    the crops cut in the browser equal the server's crop.png pixel for pixel."""
    run, rid = explorer["run"], explorer["id"]
    go(page, static_site)
    page.wait_for_url(f"**#/r/{rid}")
    page.wait_for_selector("table.layers")
    assert page.locator("table.layers tbody tr").count() == len(run.layers)

    go(page, f"{static_site}#/r/{rid}/layer/{LAYER}")
    page.wait_for_selector(".unit-card")
    info = run.layer(LAYER)
    assert page.locator(".unit-card").count() == info.num_units
    images_loaded(page, ".unit-card img")
    page.get_by_role("button", name="crop").click()  # thumbnails: crops cut from the samples
    page.get_by_role("button", name="index").click()
    thumbs = canvas_pixels(page, ".unit-card canvas")
    assert len(thumbs) == info.num_units
    served = page.request.get(
        f"{explorer['url']}api/runs/{rid}/layers/{LAYER}/units/0/max/0/crop.png"
    )
    assert np.array_equal(thumbs[0], as_rgb(served.body()))

    unit = 2
    go(page, f"{static_site}#/r/{rid}/unit/{LAYER}/{unit}?tab=max")
    page.wait_for_selector(".top-entry")
    images_loaded(page, ".top-entry img")
    top = run.unit(LAYER, unit).top("max")
    shown = [
        int(s)
        for s in page.locator(".top-entry").evaluate_all("es => es.map(e => e.dataset.sample)")
    ]
    assert shown == [e.sample_id for e in top]
    assert page.locator(".peak").count() == len(top)
    page.locator('button[data-value="1"]').click()  # receptive-field crops, cut here
    crops = canvas_pixels(page, ".top-entry canvas")
    assert len(crops) == len(top)
    for e, cut in zip(top, crops, strict=True):
        url = f"{explorer['url']}api/runs/{rid}/layers/{LAYER}/units/{unit}/max/{e.rank}/crop.png"
        want = as_rgb(page.request.get(url).body())
        assert cut.shape == want.shape and np.array_equal(cut, want), e.rank
    page.locator('.tabs button[data-tab="mean"]').click()
    page.wait_for_selector(".top-entry")
    # the mean list's crops too: cut here around the peaks the run stores, no model needed
    mean = run.unit(LAYER, unit).top("mean")
    crops = canvas_pixels(page, ".top-entry canvas")
    assert len(crops) == len(mean) and not page.locator(".top-entry .no-img").count()
    for e, cut in zip(mean, crops, strict=True):
        url = f"{explorer['url']}api/runs/{rid}/layers/{LAYER}/units/{unit}/mean/{e.rank}/crop.png"
        want = as_rgb(page.request.get(url).body())
        assert cut.shape == want.shape and np.array_equal(cut, want), e.rank
    page.locator('button[data-value="0"]').click()
    images_loaded(page, ".top-entry img")
    assert page.locator(".top-entry img").count() == len(run.unit(LAYER, unit).top("mean"))

    assert run.has_relevance  # the relevance tab: whole samples, exported too
    page.locator('.tabs button[data-tab="relevance"]').click()
    images_loaded(page, ".top-entry img")
    assert page.locator(".top-entry img").count() == len(run.unit(LAYER, unit).top("relevance")) > 0

    lists = run.top_lists
    ranked = {
        e.sample_id for i in run.layers for u in run.units(i.name) for w in lists for e in u.top(w)
    }
    go(page, f"{static_site}#/r/{rid}/samples")
    page.wait_for_selector(".sample-card")
    cards = [int(c.get_attribute("data-sample")) for c in page.locator(".sample-card").all()]
    assert cards == sorted(ranked)[:100]  # only the exported samples, in id order
    assert f"holds the {len(ranked)} samples" in page.locator("main .notice").inner_text()
    images_loaded(page, ".sample-card img")

    sid = shown[0]
    go(page, f"{static_site}#/r/{rid}/sample/{sid}")
    page.wait_for_selector(".chip")
    images_loaded(page, "img.sample-img")

    go(page, f"{static_site}#/r/{rid}/live")
    assert "lurker serve" in page.locator("main .notice").inner_text()
    go(page, f"{static_site}#/r/{rid}/explain?image=sample-1")
    assert "lurker serve" in page.locator("main .notice").inner_text()

    # a layer or a sample the export lacks: the page's error says what exists, and the
    # site asks for no file it does not hold (no 404 in the console)
    go(page, f"{static_site}#/r/{rid}/layer/nope")
    page.wait_for_selector(".notice.error")
    msg = page.locator(".notice.error").inner_text()
    assert "no layer 'nope'" in msg and all(i.name in msg for i in run.layers)
    others = sorted(set(range(len(explorer["ds"]))) - ranked)
    if others:
        go(page, f"{static_site}#/r/{rid}/sample/{others[0]}")
        page.wait_for_selector(".notice.error")
        assert "not in this static export" in page.locator(".notice.error").inner_text()
    go(page, f"{static_site}#/r/{rid}/unit/{LAYER}/{info.num_units}")
    page.wait_for_selector(".notice.error")
    assert f"it has {info.num_units} units" in page.locator(".notice.error").inner_text()


def test_explain_page(page: Any, console: list[str], explorer: dict[str, Any]) -> None:
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
    # Grad-CAM at lurker.explain's own default layer, as Python has it
    from lurker.explain.gradcam import default_layer

    cam_layer = default_layer(model, ds[sid][0][None])
    caption = page.locator('.explain-card[data-method="gradcam"] figcaption').inner_text()
    assert caption.startswith(f"at {cam_layer}")

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
    # by default at Explanation.overlay's alpha (and `lurker explain --alpha`'s)
    from lurker.explain import Explanation

    overlay_alpha = inspect.signature(Explanation.overlay).parameters["alpha"].default
    assert set(heat.evaluate_all(opacities)) == {str(overlay_alpha)} == {"0.5"}
    assert page.locator("#explain-opacity-value").inner_text() == "50%"
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

    # a typo in the unit: one request, one message that lists the run's layers, no cards
    failed: list[str] = []
    page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
    page.locator("#explain-unit").fill("nope:3")
    page.locator("#explain-unit").press("Enter")
    page.wait_for_url("**target=nope%3A3**")
    note = page.locator(".notice.error")
    note.wait_for()
    assert "Target nope:3: layer 'nope' is not in the model" in note.inner_text()
    assert "its layer one of this run's (features.0" in note.inner_text()
    page.wait_for_load_state("networkidle")
    assert page.locator(".explain-card").count() == 0 and page.locator(".concept").count() == 0
    assert len(failed) == 1, failed
    assert len(console) == 2 and "target=nope%3A3" in console[0], console  # that one 404
    console.clear()


@pytest.fixture(scope="module")
def explained_site(
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    """A copy of the run with samples 0 and 1 explained (saliency, Grad-CAM) and sample 0's
    concept relevance by `lurker images --explanations`, exported and served by a plain
    static file server."""
    import shutil

    from lurker.server.explained import precompute
    from lurker.server.export import export_site

    root = tmp_path_factory.mktemp("explained")
    run = root / "digits"
    shutil.copytree(explorer_run.path, run, ignore=shutil.ignore_patterns("cache"))
    precompute(run, 2, ["saliency", "gradcam"], progress=False)
    precompute(run, 1, ["concepts"], progress=False)
    with pytest.warns(UserWarning, match="--no-images"):  # no sample images: said so
        site = export_site(run, root / "site", progress=False, make_images=False)

    with static_server(site) as url:
        yield {"url": url, "run": run}


def open_precomputed(page: Any, url: str, sample: int) -> None:
    """Open the Explain page with no model: its picker offers the two precomputed samples
    and no upload; pick ``sample``: its image, the saliency and Grad-CAM heatmaps and their
    captions load."""
    go(page, f"{url}#/r/digits/explain")
    options = page.locator("#explain-sample option").evaluate_all("os => os.map(o => o.value)")
    assert options == ["0", "1"]
    assert page.locator("#explain-file").count() == 0  # an upload runs the model
    page.locator("#explain-sample").select_option(str(sample))
    page.locator("#explain-use-sample").click()
    page.wait_for_url(f"**image=sample-{sample}**")
    page.wait_for_selector(".methods .explain-card")
    assert page.locator(".methods .explain-card").evaluate_all(
        "es => es.map(e => e.dataset.method)"
    ) == ["saliency", "gradcam"]
    images_loaded(page, ".methods img.heat")
    images_loaded(page, ".explain-image img.live-img")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.methods figcaption')]"
        ".every(f => f.textContent.includes('max'))"
    )


def concepts_shown(page: Any, layer: str) -> None:
    """The concept section shows the precomputed ranking at ``layer``: eight unit cards
    whose maps load, each linked to its unit page, and the layer choice fixed."""
    page.wait_for_selector(".concepts .concept")
    assert page.locator(".concepts .concept").count() == 8
    images_loaded(page, ".concepts img.heat")
    assert page.locator("#concept-layer").is_disabled()
    assert f"Precomputed at {layer}" in page.locator(".concept-section").inner_text()
    href = page.locator(".concepts .concept a.name").first.get_attribute("href")
    assert f"/unit/{layer}/" in href


def test_static_home_says_what_the_export_holds(page: Any, explained_site: dict[str, Any]) -> None:
    """The export's home: its precomputed explanations linked, no live view offered."""
    go(page, f"{explained_site['url']}#/r/digits")
    holds = page.locator(".card", has_text="This run holds")
    holds.wait_for()
    assert "2 samples precomputed" in holds.inner_text()
    assert "none in a static export" in holds.inner_text()
    assert page.locator(".entry-links a", has_text="Live view").count() == 0


def test_static_explain_page_of_precomputed_samples(
    page: Any,
    explained_site: dict[str, Any],
    explorer_run: ExplorerRun,  # noqa: F811
) -> None:
    """The exported Explain page offers the explained samples only, shows their heatmaps
    (the served ones, pixel for pixel) with the opacity slider, keeps the target to the top
    class and says what needs a server; no request fails (the page fixture)."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from lurker.server import create_app

    url = explained_site["url"]
    open_precomputed(page, url, 1)
    # Grad-CAM precomputed at lurker.explain's own default layer, as the server has it
    from lurker.explain.gradcam import default_layer
    from lurker.probe.data import load_dataset

    x = load_dataset("digits:test", 16, channels=1)[1][0][None]
    cam = page.locator('.explain-card[data-method="gradcam"] figcaption').inner_text()
    assert cam.startswith(f"at {default_layer(explorer_run.model, x)}")
    # the target chooser: the top class on, the others disabled; the page says why
    buttons = page.locator(".target-list .target")
    assert buttons.count() == 5
    assert buttons.evaluate_all("es => es.map(e => e.disabled)") == [False] + [True] * 4
    assert "lurker serve" in page.locator(".static-note").inner_text()
    assert "lurker serve" in page.locator(".concept-section .notice").inner_text()
    assert page.locator("#explain-layer").is_disabled()
    page.locator("#explain-opacity").fill("0.3")
    opacities = page.locator(".methods img.heat").evaluate_all(
        "es => es.map(e => getComputedStyle(e).opacity)"
    )
    assert set(opacities) == {"0.3"}
    page.screenshot(path=str(explained_site["run"].parent / "static-explain.png"))

    # each heatmap the page shows is the served one, pixel for pixel
    srcs = page.locator(".methods img.heat").evaluate_all("es => es.map(e => e.src)")
    with TestClient(create_app(explained_site["run"], model_obj=explorer_run.model)) as c:
        for src, method in zip(srcs, ["saliency", "gradcam"], strict=True):
            res = page.request.get(src)
            assert res.ok
            served = c.get(
                f"/api/runs/digits/live/sample-1/explain/{method}.png?target=top&overlay=0"
            )
            assert served.status_code == 200
            got = np.asarray(Image.open(io.BytesIO(res.body())))
            assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(served.content))))

    # sample 0's concept relevance was precomputed: its ranking and maps, the layer fixed
    go(page, f"{url}#/r/digits/explain?image=sample-0")
    concepts_shown(page, "features.9")
    with TestClient(create_app(explained_site["run"], model_obj=explorer_run.model)) as c:
        base = "/api/runs/digits/live/sample-0/explain/concepts"
        ranking = c.get(f"{base}.json?target=top&top=8").json()
        shown = page.locator(".concepts .concept").evaluate_all(
            "es => es.map(e => +e.dataset.unit)"
        )
        assert shown == [u["unit"] for u in ranking["units"]]
        for src in page.locator(".concepts img.heat").evaluate_all("es => es.map(e => e.src)"):
            unit = src.split("/concepts/")[1].split(".png")[0]
            served = c.get(f"{base}/{unit}.png?target=top&layer=features.9&overlay=0")
            assert served.status_code == 200
            got = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())))
            assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(served.content))))

    # a sample page links to the Explain page only where the export holds explanations
    held = page.request.get(f"{url}data/runs/digits/exported-samples.json").json()
    pages = [int(x["id"]) for x in held["samples"]]
    # and shows the predictions the export holds with them (made with the run's model)
    for sid in [i for i in (0, 1) if i in pages] + [next(i for i in pages if i > 1)]:
        go(page, f"{url}#/r/digits/sample/{sid}")
        page.wait_for_selector("#top-k-of")
        assert page.locator("#explain-this").count() == (1 if sid in (0, 1) else 0)
        facts = page.locator(".sample-head .facts").inner_text()
        if sid in (0, 1):
            live = page.request.get(f"{url}data/runs/digits/live/sample-{sid}.json").json()
            shown = page.locator(".sample-head ol.preds li").all_inner_texts()
            want = [
                f"{q['name'] or q['class']} {shown_percent(q['prob'])}" for q in live["predictions"]
            ]
            assert shown == want and "no model attached" not in facts
            assert page.locator("#pred-precomputed").count() == 1
        else:  # a static site runs no model and this run recorded no predictions
            assert "not in this export" in facts and "lurker serve" in facts

    # a sample without explanations: the page says so and offers the explained ones
    go(page, f"{url}#/r/digits/explain?image=sample-7")
    page.wait_for_selector(".notice.error")
    assert "lurker serve" in page.locator(".notice.error").inner_text()
    assert page.locator("#explain-sample option").count() == 2


@pytest.fixture(scope="module")
def course_site(
    explained_site: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The explained run exported without images (``--no-images``, nothing cached) into
    ``course/explorer/`` of a web root, as a teacher puts it on a course page: served by a
    plain static file server from the root, so every path the pages ask is under the
    sub-folder. Yields the site's URL."""
    from lurker.server.export import export_site

    root = tmp_path_factory.mktemp("www")
    with pytest.warns(UserWarning, match="--no-images"):
        export_site(
            explained_site["run"], root / "course" / "explorer", progress=False, make_images=False
        )
    with static_server(root) as url:
        yield url + "course/explorer/"


def test_static_export_in_a_sub_folder_says_why_images_are_missing(
    page: Any,
    course_site: str,
    explorer_run: ExplorerRun,  # noqa: F811
) -> None:
    """Under a sub-folder every page loads with no failed request (the page fixture), and
    an export made with --no-images says so where an image is missing (not that the
    dataset could not be loaded: it loads), once above a unit's tiles, which fit their word."""
    from lurker.store import Run

    with Run.open(explorer_run.path) as run:
        top = run.unit(LAYER, 2).top("max")
        ranked = {
            e.sample_id
            for i in run.layers
            for u in run.units(i.name)
            for w in run.top_lists
            for e in u.top(w)
        }
    go(page, course_site)
    page.wait_for_selector("table.layers")

    go(page, f"{course_site}#/r/digits/samples")
    assert (
        page.locator("#no-image-why")
        .inner_text()
        .startswith(f"{len(ranked)} of them have no image here")
    )
    assert "--no-images" in page.locator("#no-image-why").inner_text()

    go(page, f"{course_site}#/r/digits/layer/{LAYER}")
    page.wait_for_selector(".unit-card")
    assert "--no-images" in page.locator("#no-image-why").inner_text()

    go(page, f"{course_site}#/r/digits/unit/{LAYER}/2?tab=max")
    page.wait_for_selector(".top-entry")
    why = page.locator("#entries-missing").inner_text()
    assert "--no-images" in why and "lurker images RUN" in why and "could not be loaded" not in why
    tiles = page.locator(".top-entry .no-img")
    assert tiles.all_inner_texts() == ["not in this export"] * len(top)
    # each word fits its tile: nothing spills out of it
    assert tiles.evaluate_all(
        "ts => ts.every(t => t.scrollHeight <= t.clientHeight && t.scrollWidth <= t.clientWidth)"
    )
    page.locator('button[data-value="1"]').click()  # the max list's crops: cut from the same images
    assert page.locator(".top-entry .no-img").count() == len(top)
    assert page.locator("#entries-missing").inner_text() == why

    # a feature visualization's best dataset sample: no request for the missing image
    go(page, f"{course_site}#/r/digits/unit/{FEATVIZ_LAYER}/{FEATVIZ_UNITS[0]}?tab=featviz")
    images_loaded(page, ".top-entry.featviz img")
    assert page.locator(".top-entry.best .no-img").inner_text() == "not in this export"
    assert "--no-images" in page.locator(".top-entry.best .no-img").get_attribute("title")

    go(page, f"{course_site}#/r/digits/sample/0")
    text = page.locator(".sample-head .notice").inner_text()
    assert "--no-images" in text and "could not be loaded" not in text
    # its precomputed explanations open from here, their heatmaps load under the sub-folder
    page.locator("#explain-this").click()
    page.wait_for_url("**/course/explorer/#/r/digits/explain?image=sample-0")
    images_loaded(page, ".methods img.heat")


def test_live_links_only_where_a_model_runs(
    page: Any, explorer: dict[str, Any], course_site: str
) -> None:
    """The graph's "see OP live" and a sample's "Open in live view" lead to the live view
    where a model runs; a static export, whose live view only says it needs a server,
    offers neither."""
    for base, served in ((explorer["url"], True), (course_site, False)):
        go(page, f"{base}#/r/digits/graph?focus={OP}")
        page.wait_for_selector("svg.graph .nd.current")  # the focused op, as a click marks it
        link = page.locator(".graph-bar .live-link")
        assert link.is_visible() == served
        if served:
            assert link.get_attribute("href").endswith(f"/live?op={OP}")
        go(page, f"{base}#/r/digits/sample/0")
        page.wait_for_selector("#top-k-of")
        assert page.locator('main a[href$="/live?image=sample-0"]').count() == (1 if served else 0)


def test_static_explain_says_a_linked_layer_is_not_held(page: Any, course_site: str) -> None:
    """A link to an exported Explain page asking a Grad-CAM or concept layer (one shared
    from a served page) shows the precomputed default-layer heatmaps and says so, as it
    does for a target; a link without one says nothing of it."""
    go(page, f"{course_site}#/r/digits/explain?image=sample-0")
    page.wait_for_selector(".methods .explain-card")
    assert page.locator("#explain-layer-not-held").count() == 0
    go(page, f"{course_site}#/r/digits/explain?image=sample-0&layer={LAYER}&clayer=features.0")
    said = page.locator("#explain-layer-not-held").inner_text()
    assert f"Grad-CAM at layer {LAYER}" in said and "concept relevance at layer features.0" in said
    # the run records its model: serving it needs no --model (a command the reader cannot fill)
    assert "lurker serve RUN" in said and "--model" not in said
    go(page, f"{course_site}#/r/digits/explain?image=sample-0&layer={LAYER}")
    said = page.locator("#explain-layer-not-held").inner_text()
    assert f"Grad-CAM at layer {LAYER} runs the model" in said and "concept" not in said


def test_explain_page_of_a_server_without_the_model(
    page: Any,
    console: list[str],
    explained_site: dict[str, Any],
    tmp_path: Path,
) -> None:
    """A server that cannot load the run's model (its weights are gone) shows the
    explanations the run's cache holds, as the served API answers them, with no failed
    request; the page says why there is no model and offers only what is cached."""
    import shutil

    from fastapi.testclient import TestClient

    from lurker.server import create_app
    from lurker.server.serve import background
    from lurker.store import RunWriter, run_lock

    run = tmp_path / "digits"
    shutil.copytree(explained_site["run"], run)
    with run_lock(run):
        w = RunWriter.reopen(run)
        w.meta_set("config", {**w.meta_get("config"), "weights": str(tmp_path / "gone.pt")})
        w.close()
    with background(create_app(run)) as url:
        open_precomputed(page, url, 0)
        note = page.locator(".static-note").first.inner_text()
        assert "gone.pt" in note and "lurker serve" in note
        concepts_shown(page, "features.9")
        buttons = page.locator(".target-list .target")
        assert buttons.evaluate_all("es => es.map(e => e.disabled)") == [False] + [True] * 4
        assert page.locator("#explain-layer").is_disabled()
        page.screenshot(path=str(tmp_path / "explain-no-model.png"))
        srcs = page.locator(".methods img.heat").evaluate_all("es => es.map(e => e.src)")
        with TestClient(create_app(explained_site["run"])) as c:  # its model loads
            for src, method in zip(srcs, ["saliency", "gradcam"], strict=True):
                res = page.request.get(src)
                assert res.ok
                want = c.get(
                    f"/api/runs/digits/live/sample-0/explain/{method}.png?{src.split('?')[1]}"
                )
                assert want.status_code == 200 and res.body() == want.content
        # a sample the cache does not hold: the page says why (the server's 409)
        go(page, f"{url}#/r/digits/explain?image=sample-7")
        page.wait_for_selector(".notice.error")
        assert "gone.pt" in page.locator(".notice.error").inner_text()
        assert any("409" in e for e in console)
        console.clear()


def _featviz_walk(page: Any, base: str, run: Any, rid: str) -> None:
    """The unit page's feature visualization tab and the layer grid's featviz thumbnails
    show the images stored in the run, byte for byte, beside the best dataset sample."""
    stored = run.featviz(FEATVIZ_LAYER)
    unit = FEATVIZ_UNITS[1]
    go(page, f"{base}#/r/{rid}/unit/{FEATVIZ_LAYER}/{unit}?tab=featviz")
    page.wait_for_selector("figure.featviz img")
    images_loaded(page, ".top-entry img")
    fig = page.locator("figure.featviz")
    assert fig.count() == 1
    assert float(fig.get_attribute("data-value")) == pytest.approx(stored.activations[1][0])
    src = fig.locator("img").get_attribute("src")
    assert page.request.get(page.url.split("#")[0] + src).body() == stored.png(unit)
    best = run.unit(FEATVIZ_LAYER, unit).top("mean")[0]
    assert int(page.locator("figure.best").get_attribute("data-sample")) == best.sample_id
    assert "128" not in page.inner_text(".toolbar") and "16 steps" in page.inner_text(".toolbar")
    # a unit without one has no such tab
    go(page, f"{base}#/r/{rid}/unit/{FEATVIZ_LAYER}/3?tab=featviz")
    page.wait_for_selector(".top-entry")
    assert page.locator('.tabs button[data-tab="featviz"]').count() == 0
    # the layer grid: the featviz thumbnail where there is one, a note elsewhere
    go(page, f"{base}#/r/{rid}/layer/{FEATVIZ_LAYER}?thumb=featviz&sort=index")
    page.wait_for_selector(".unit-card")
    images_loaded(page, ".unit-card img")
    with_img = [
        int(c.get_attribute("data-unit")) for c in page.locator(".unit-card:has(img)").all()
    ]
    made = sorted(set(FEATVIZ_UNITS) | set(FEATVIZ_NEURON_UNITS))
    assert with_img == made  # unit 6 has a neuron image only: shown, marked "neuron"
    assert page.locator(".unit-card .no-img", has_text="no feature visualization").count() == (
        next(i.num_units for i in run.layers if i.name == FEATVIZ_LAYER) - len(made)
    )
    marked = [
        int(c.get_attribute("data-unit"))
        for c in page.locator(".unit-card:has(.fv-objective)").all()
    ]
    assert marked == sorted(set(FEATVIZ_NEURON_UNITS) - set(FEATVIZ_UNITS))
    neuron = run.featviz(FEATVIZ_LAYER, "neuron")
    for u in made:
        img = page.locator(f'.unit-card[data-unit="{u}"] img')
        want = "channel" if u in FEATVIZ_UNITS else "neuron"
        assert img.get_attribute("data-objective") == want
        body = page.request.get(page.url.split("#")[0] + img.get_attribute("src")).body()
        assert body == (stored if want == "channel" else neuron).png(u)
    assert "neuron objective" in page.inner_text(".featviz-note")


def _featviz_objectives_walk(page: Any, base: str, run: Any, rid: str, shot: Any) -> None:
    """A unit with channel and neuron images shows both (a switch labelled with what each
    maximizes), each objective's images byte for byte; a layer with neuron images only
    gets featviz thumbnails of them, saying so."""
    channel = run.featviz(FEATVIZ_LAYER, "channel")
    neuron = run.featviz(FEATVIZ_LAYER, "neuron")
    unit = next(u for u in FEATVIZ_NEURON_UNITS if u in FEATVIZ_UNITS)
    go(page, f"{base}#/r/{rid}/unit/{FEATVIZ_LAYER}/{unit}?tab=featviz")
    page.wait_for_selector("figure.featviz img")
    root = page.url.split("#")[0]
    fig = page.locator("figure.featviz")
    assert fig.get_attribute("data-objective") == "channel"
    assert page.request.get(root + fig.locator("img").get_attribute("src")).body() == channel.png(
        unit
    )
    assert "mean over its map" in page.inner_text(".featviz-caption")
    page.click('.toolbar button[data-value="neuron"]')
    page.wait_for_selector('figure.featviz[data-objective="neuron"] img')
    images_loaded(page, ".top-entry img")
    fig = page.locator("figure.featviz")
    assert fig.count() == 1 and "objective=neuron" in page.url
    assert float(fig.get_attribute("data-value")) == pytest.approx(
        neuron.activations[neuron.units.index(unit)][0]
    )
    src = fig.locator("img").get_attribute("src")
    assert page.request.get(root + src).body() == neuron.png(unit)
    pos = neuron.unit_settings(unit)["position"]
    assert f"position (y, x) = ({pos[0]}, {pos[1]})" in page.inner_text(".featviz-caption")
    assert page.locator("figure.best").count() == 0  # a neuron's value has no dataset twin
    if shot is not None:
        shot(page)
    # the objective is kept in the address: a reload shows the neuron images again
    page.reload()
    page.wait_for_selector('figure.featviz[data-objective="neuron"] img')
    # a layer with neuron images only: the grid offers and shows them
    only = run.featviz(FEATVIZ_NEURON_LAYER)
    go(page, f"{base}#/r/{rid}/layer/{FEATVIZ_NEURON_LAYER}?thumb=featviz&sort=index")
    page.wait_for_selector(".unit-card")
    images_loaded(page, ".unit-card img")
    with_img = [
        int(c.get_attribute("data-unit")) for c in page.locator(".unit-card:has(img)").all()
    ]
    assert with_img == only.units
    for u in only.units:
        src = page.locator(f'.unit-card[data-unit="{u}"] img').get_attribute("src")
        assert page.request.get(root + src).body() == only.png(u)
    assert "no channel-objective images" in page.inner_text(".featviz-note")


def test_feature_visualization_pages(page: Any, explorer: dict[str, Any]) -> None:
    _featviz_walk(page, explorer["url"], explorer["run"], explorer["id"])


def test_feature_visualization_pages_static(
    page: Any, static_site: str, explorer: dict[str, Any]
) -> None:
    _featviz_walk(page, static_site, explorer["run"], explorer["id"])


def test_a_unit_page_shows_every_objective(page: Any, explorer: dict[str, Any]) -> None:
    import os

    where = os.environ.get("LURKER_SCREENSHOTS")

    def shot(p: Any) -> None:
        if where:
            p.screenshot(path=os.path.join(where, "unit-two-objectives.png"), full_page=True)

    _featviz_objectives_walk(page, explorer["url"], explorer["run"], explorer["id"], shot)


def test_a_unit_page_shows_every_objective_static(
    page: Any, static_site: str, explorer: dict[str, Any]
) -> None:
    _featviz_objectives_walk(page, static_site, explorer["run"], explorer["id"], None)


def test_explain_page_shows_a_methods_notes(page: Any, explorer: dict[str, Any]) -> None:
    """A method's warning (``notes`` in its JSON: a Grad-CAM map that is 0 everywhere, a
    ReLU rule on a network without ReLUs) is shown under its heatmap, where the numbers
    alone (max 0, or the same map as another method) would mislead; a method without
    notes shows none. The digits CNN has none of its own, so the gradcam answer is given
    one on its way to the page (the server's notes are tests/test_server_explain.py's)."""
    import json

    note = "Grad-CAM at 'features.9' is 0 everywhere: the target does not depend on it."

    def with_note(route: Any) -> None:
        r = route.fetch()
        body = {**r.json(), "notes": [note]}
        route.fulfill(response=r, body=json.dumps(body))

    page.route("**/explain/gradcam.json?*", with_note)
    go(page, f"{explorer['url']}#/r/{explorer['id']}/explain?image=sample-5")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.methods figcaption')]"
        ".every(f => f.textContent.includes('max'))"
    )
    card = page.locator('.explain-card[data-method="gradcam"] .explain-note')
    assert card.count() == 1 and card.inner_text() == note
    assert page.locator(".methods .explain-note").count() == 1  # the other methods: none
