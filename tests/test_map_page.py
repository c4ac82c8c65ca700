"""The Map page in a real browser (Debian's chromium via Playwright) over the real server:
the canvas draws the run's map, hovering a dot shows that sample, clicking opens it, the
misclassified filter keeps exactly the misclassified samples (oracle: ``Run.map()``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from explorer_fixtures import static_server

CHROMIUM = Path("/usr/bin/chromium")
STATIC = Path(__file__).resolve().parents[1] / "src" / "lurker" / "server" / "static"
if not CHROMIUM.exists() or not (STATIC / "index.html").exists():
    pytest.skip(
        "the Map page test needs /usr/bin/chromium and the built front end (make web)",
        allow_module_level=True,
    )
pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two runs of a seeded DigitsNet on the 360 test digits: one with a (PCA) map, one
    without."""
    from lurker.examples import DigitsNet
    from lurker.map import make_map
    from lurker.probe import probe
    from lurker.probe.data import load_dataset
    from lurker.server import create_app
    from lurker.server.serve import background

    torch.manual_seed(0)
    model = DigitsNet().eval()
    data = load_dataset("digits:test", 16, channels=1)
    root = tmp_path_factory.mktemp("maps")
    for name, embed in (("mapped", True), ("plain", False)):
        run = probe(model, data, out=root / name, layers="classifier.1", progress=False,
                    embed=embed)  # fmt: skip
        if embed:
            make_map(run, method="pca").close()
        run.close()
    # a 12-output head over the 10 digit classes: predictions that are not labels
    other = DigitsNet().eval()
    other.classifier[3] = torch.nn.Linear(64, 12)
    run = probe(other, data, out=root / "other", layers="classifier.1", progress=False,
                embed=True)  # fmt: skip
    make_map(run, method="pca").close()
    run.close()
    from lurker.store import Run

    with (
        Run.open(root / "mapped") as run,
        background(create_app(root, model_obj=model, dataset=data)) as url,
    ):
        yield {"url": url, "map": run.map(), "root": root, "data": data}


#: The partly labelled run's labels and predictions: -1 is an unlabelled sample (as
#: STL-10's unlabelled split gives) or no prediction.
PARTLY_LABEL = np.array([0, 1, 2, 0, 1, -1, -1, -1, 2, 0, 1, 2])
PARTLY_PRED = np.array([0, 1, 1, 0, 2, 0, 1, 2, 2, 1, 1, 2])


def _partly_labelled(out: Path) -> None:
    """A run of 12 points, 3 of them unlabelled (written as ``lurker map`` writes maps)."""
    from lurker.store import RunWriter

    n = len(PARTLY_LABEL)
    meta = {"model": "synthetic", "model_fingerprint": "synthetic", "dataset": "synthetic",
            "k": 3, "image_size": [8, 8]}  # fmt: skip
    xy = np.random.default_rng(0).normal(size=(n, 2))
    with RunWriter.create(out, meta=meta) as w:
        w.set_classes(["a", "b", "c"])
        w.add_samples((i, f"synthetic/{i}.png", int(PARTLY_LABEL[i])) for i in range(n))
        w.write_layers_result([])
        w.write_map(np.arange(n), xy, PARTLY_PRED, np.full(n, 0.5),
                    {"layer": "fc", "method": "pca", "engine": "numpy", "seconds": 0.0})  # fmt: skip


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    pg.errors = errors
    yield pg
    ctx.close()


def _open(page: Any, served: dict[str, Any], query: str = "") -> dict[str, float]:
    page.goto(f"{served['url']}#/r/mapped/map{query}")
    page.wait_for_selector("canvas.map-canvas")
    page.wait_for_load_state("networkidle")
    return page.evaluate(
        "() => { const c = document.querySelector('canvas.map-canvas'); const r = "
        "c.getBoundingClientRect(); return {s: +c.dataset.scale, tx: +c.dataset.tx, ty: "
        "+c.dataset.ty, left: r.left, top: r.top}; }"
    )


def _screen(g: dict[str, float], x: float, y: float) -> tuple[float, float]:
    """Where the page draws the point (x, y) before any zoom."""
    return g["left"] + g["tx"] + x * g["s"], g["top"] + g["ty"] - y * g["s"]


def _isolated(m: Any, g: dict[str, float], among: Any = None) -> int:
    """The point (of ``among``, default all) farthest on screen from any other, so hovering
    it hits it alone."""
    xy = np.c_[m.x, -m.y] * g["s"]
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1)) + np.eye(len(xy)) * 1e9
    nearest = d.min(1)
    if among is not None:
        nearest = np.where(among, nearest, -1)
    return int(np.argmax(nearest))


def test_map_draws_hover_shows_the_sample_and_click_opens_it(page: Any, served: dict[str, Any]):
    m = served["map"]
    g = _open(page, served)
    assert page.locator("h1").inner_text().startswith(f"Map {len(m):,} samples")
    painted = page.evaluate(
        "() => { const c = document.querySelector('canvas.map-canvas'); const d = "
        "c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0; "
        "for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }"
    )
    assert painted > 1000  # hundreds of dots of several pixels each
    assert page.locator("canvas.map-canvas").get_attribute("data-shown") == str(len(m))
    i = _isolated(m, g)
    sid = int(m.ids[i])
    page.mouse.move(*_screen(g, float(m.x[i]), float(m.y[i])))
    tip = page.locator(".map-tip")
    tip.wait_for(state="visible")
    assert tip.get_attribute("data-sample") == str(sid)
    text = tip.inner_text()
    assert f"#{sid}" in text and f"label {m.label[i]}" in text and f"predicted {m.pred[i]}" in text
    page.wait_for_function("() => { const i = document.querySelector('.map-tip img'); "
                           "return i && i.complete && i.naturalWidth > 0; }")  # fmt: skip
    page.mouse.click(*_screen(g, float(m.x[i]), float(m.y[i])))
    page.wait_for_url(f"**#/r/mapped/sample/{sid}")
    # the map's own heading stays until the sample page is drawn (after its requests)
    page.locator("main h1", has_text=f"Sample {sid}").wait_for()
    assert not page.errors


@pytest.mark.parametrize("width", [800, 1280])
def test_hover_tip_stays_inside_the_map_at_its_edges(
    page: Any, served: dict[str, Any], width: int
) -> None:
    """The stage clips what passes its edges: the tip of a dot near the bottom or right
    edge went past them (placed below and right of the dot), its picture and prediction
    cut off on a projector's 800 px window. It must show whole, inside the stage."""
    m = served["map"]
    page.set_viewport_size({"width": width, "height": 900})  # the whole map on screen
    g = _open(page, served)
    stage = page.locator(".map-stage").bounding_box()
    tip = page.locator(".map-tip")
    # the lowest, the rightmost and the lowest-right dots (y grows upward in the map)
    for i in {int(np.argmin(m.y)), int(np.argmax(m.x)), int(np.argmax(m.x - m.y))}:
        page.mouse.move(*_screen(g, float(m.x[i]), float(m.y[i])))
        tip.wait_for(state="visible")
        box = tip.bounding_box()
        assert box["y"] + box["height"] <= stage["y"] + stage["height"] + 0.5, (i, box, stage)
        assert box["x"] + box["width"] <= stage["x"] + stage["width"] + 0.5, (i, box, stage)
        assert box["x"] >= stage["x"] - 0.5 and box["y"] >= stage["y"] - 0.5, (i, box, stage)
        page.mouse.move(stage["x"] + 2, stage["y"] + 2)  # off the dots: the tip goes
        tip.wait_for(state="hidden")
    assert not page.errors


def test_misclassified_filter_and_colour_toggle(page: Any, served: dict[str, Any]):
    m = served["map"]
    wrong = int(((m.label != m.pred) & (m.pred >= 0)).sum())
    _open(page, served)
    page.get_by_role("button", name="correct / wrong").click()
    assert f"misclassified ({wrong})" in page.locator(".map-legend").inner_text()
    page.get_by_label("misclassified only").check()
    assert page.locator("canvas.map-canvas").get_attribute("data-shown") == str(wrong)
    assert "mis=1" in page.url and "color=correct" in page.url
    page.reload()  # the URL keeps the view
    page.wait_for_selector("canvas.map-canvas")
    assert page.locator("canvas.map-canvas").get_attribute("data-shown") == str(wrong)
    assert not page.errors


def test_correct_legend_does_not_count_unlabelled_samples_as_correct(page: Any, tmp_path: Path):
    """Unlabelled samples are drawn grey, neither right nor wrong; the legend counts them
    apart (it called them correct: 'correct (7)' over 4 correct dots)."""
    known = PARTLY_LABEL >= 0
    right = int((known & (PARTLY_LABEL == PARTLY_PRED)).sum())
    wrong = int((known & (PARTLY_LABEL != PARTLY_PRED)).sum())
    from lurker.server import create_app
    from lurker.server.serve import background

    _partly_labelled(tmp_path / "partly")
    with background(create_app(tmp_path)) as url:
        page.goto(f"{url}#/r/partly/map?color=correct")
        page.wait_for_selector("canvas.map-canvas[data-shown]")
        items = page.locator(".map-legend > span").all_inner_texts()
    assert [t.strip() for t in items] == [
        f"correct ({right})",
        f"misclassified ({wrong})",
        f"no label or prediction ({int((~known).sum())})",
    ]
    assert (right, wrong) == (6, 3)
    assert not page.errors


def _keyboard_step(bx: np.ndarray, by: np.ndarray, shown: np.ndarray, cur: int, key: str) -> int:
    """Brute force of the page's rule: the nearest drawn dot within 45 degrees of the
    arrow's direction (screen y down), else the nearest on that side; -1: none."""
    ux, uy = {"ArrowRight": (1, 0), "ArrowLeft": (-1, 0), "ArrowUp": (0, -1), "ArrowDown": (0, 1)}[
        key
    ]
    dx, dy = bx - bx[cur], by - by[cur]
    along, across = dx * ux + dy * uy, np.abs(dx * uy - dy * ux)
    d = dx * dx + dy * dy
    ok = shown & (along > 0)
    for pool in (ok & (across <= along), ok):
        if pool.any():
            return int(np.flatnonzero(pool)[np.argmin(d[pool])])
    return -1


#: Near-black pixels around the point [x, y] of the map's canvas: the keyboard's ring
#: (neither a class colour nor the background is near black).
RING_PIXELS = (
    "([x, y]) => { const c = document.querySelector('canvas.map-canvas'); const k = "
    "window.devicePixelRatio || 1; const d = c.getContext('2d').getImageData("
    "Math.round((x - 12) * k), Math.round((y - 12) * k), Math.round(24 * k), "
    "Math.round(24 * k)).data; let n = 0; for (let i = 0; i < d.length; i += 4) "
    "n += d[i] < 60 && d[i + 1] < 60 && d[i + 2] < 60 && d[i + 3] > 200; return n; }"
)


def test_keyboard_moves_between_dots_and_opens_one(page: Any, served: dict[str, Any]):
    """Tab reaches the map; it starts on the dot nearest the centre; each arrow moves to
    the nearest dot in that direction (oracle: brute force over the map's points, placed
    as the page places them); the dot is named in a live region and the tip, ringed on
    the canvas; Enter opens its sample page."""
    m = served["map"]
    g = _open(page, served)
    size = page.evaluate(
        "() => { const c = document.querySelector('canvas.map-canvas'); "
        "return [c.clientWidth, c.clientHeight]; }"
    )
    bx = (g["tx"] + m.x.astype(np.float64) * g["s"]).astype(np.float32).astype(np.float64)
    by = (g["ty"] - m.y.astype(np.float64) * g["s"]).astype(np.float32).astype(np.float64)
    shown = np.ones(len(m), dtype=bool)
    canvas = page.locator("canvas.map-canvas")
    cur = int(np.argmin((bx - size[0] / 2) ** 2 + (by - size[1] / 2) ** 2))
    assert page.evaluate(RING_PIXELS, [bx[cur], by[cur]]) == 0  # no ring before focus
    for _ in range(40):  # Tab through the page to the map
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement?.classList.contains('map-canvas')"):
            break
    else:
        pytest.fail("Tab never reached the map")
    live = page.locator(".map-live")
    tip = page.locator(".map-tip")
    for key in [None, "ArrowRight", "ArrowRight", "ArrowDown", "ArrowLeft", "ArrowUp", "ArrowUp"]:
        if key is not None:
            want = _keyboard_step(bx, by, shown, cur, key)
            assert want >= 0
            page.keyboard.press(key)
            cur = want
        sid = int(m.ids[cur])
        page.wait_for_function(
            "id => document.querySelector('canvas.map-canvas').dataset.focused === id", arg=str(sid)
        )
        said = live.inner_text()
        assert f"sample #{sid}: label {m.label[cur]}" in said and f"predicted {m.pred[cur]}" in said
        assert tip.is_visible() and tip.get_attribute("data-sample") == str(sid)
        # ringed where it is drawn (not zoomed: where the page placed it)
        page.wait_for_function(f"xy => ({RING_PIXELS})(xy) > 20", arg=[bx[cur], by[cur]])
    assert canvas.evaluate("c => getComputedStyle(c).outlineStyle") == "solid"
    assert "arrow keys" in (canvas.get_attribute("aria-label") or "")
    page.keyboard.press("Enter")
    page.wait_for_url(f"**#/r/mapped/sample/{int(m.ids[cur])}")
    page.locator("main h1", has_text=f"Sample {int(m.ids[cur])}").wait_for()
    assert not page.errors


def test_box_select_lists_the_samples_inside(page: Any, served: dict[str, Any]):
    m = served["map"]
    g = _open(page, served)
    x0, x1 = np.quantile(m.x, [0.3, 0.7])
    y0, y1 = np.quantile(m.y, [0.3, 0.7])
    inside = ((m.x >= x0) & (m.x <= x1) & (m.y >= y0) & (m.y <= y1)).sum()
    a, b = _screen(g, x0, y1), _screen(g, x1, y0)
    page.keyboard.down("Shift")
    page.mouse.move(*a)
    page.mouse.down()
    page.mouse.move(*b, steps=5)
    page.mouse.up()
    page.keyboard.up("Shift")
    head = page.locator(".map-selection h2").inner_text()
    # the box's corners are rounded to pixels: a point on its edge may fall either side
    got = int(head.split(":")[1].split()[0].replace(",", ""))
    assert abs(got - inside) <= 3 and got > 0
    # the list is below the map: a badge on the map says how many and scrolls to it
    badge = page.locator(".map-picked")
    assert badge.is_visible() and badge.inner_text().startswith(f"{got:,} selected")
    badge.click()
    page.wait_for_function(
        "() => { const r = document.querySelector('.map-selection h2').getBoundingClientRect();"
        " return r.top >= 0 && r.bottom <= window.innerHeight; }"
    )
    page.keyboard.press("Escape")
    assert badge.is_hidden() and page.locator(".map-selection h2").count() == 0
    assert not page.errors


def _data(g: dict[str, float], sx: float, sy: float) -> tuple[float, float]:
    """The data point the page draws at page pixel (sx, sy) before any zoom."""
    return (sx - g["left"] - g["tx"]) / g["s"], (g["ty"] - (sy - g["top"])) / g["s"]


def _lasso(page: Any, screen: np.ndarray) -> None:
    """Drag through the page pixels ``screen`` (one pointer event per vertex) and let go."""
    page.mouse.move(*screen[0])
    page.mouse.down()
    for x, y in screen[1:]:
        page.mouse.move(float(x), float(y))
    page.mouse.up()


def _selected(page: Any) -> tuple[int, list[int]]:
    head = page.locator(".map-selection h2").inner_text()
    ids = page.locator(".map-selection .sample-card").evaluate_all(
        "els => els.map(e => +e.dataset.sample)"
    )
    return int(head.split(":")[1].split()[0].replace(",", "")), ids


def test_lasso_selects_the_samples_inside_the_drawn_outline(page: Any, served: dict[str, Any]):
    """A concave star and a self-crossing pentagram drawn with the lasso select exactly the
    samples a crossing-number oracle (scikit-image) puts inside the same outline in data
    coordinates; the pentagram's centre (wrapped twice) is outside by the even-odd rule."""
    from skimage.measure import points_in_poly

    m = served["map"]
    g = _open(page, served)
    page.get_by_role("button", name="lasso select").click()
    assert "tool=lasso" in page.url
    pts = np.c_[m.x, m.y].astype(np.float64)
    cx, cy = _screen(g, float(np.median(m.x)), float(np.median(m.y)))
    radius = 0.3 * (np.quantile(m.x, 0.9) - np.quantile(m.x, 0.1)) * g["s"]
    turns = np.arange(10) / 10 * 2 * np.pi
    star = np.c_[np.cos(turns), np.sin(turns)] * np.where(np.arange(10) % 2, 0.45, 1.0)[:, None]
    five = np.arange(5) / 5 * 2 * np.pi
    pentagram = np.c_[np.cos(2 * five), np.sin(2 * five)]  # every second corner of a pentagon
    for outline, twice_inside in ((star, None), (pentagram, 0.3)):
        # an outline of whole page pixels with no sample within 0.05 px of an edge (either
        # side would be right there): the first such size, from a few tried
        for size in radius * np.r_[1.0, 0.97, 1.03, 0.94, 1.06, 0.91]:
            screen = np.round(np.array([cx, cy]) + size * outline)
            poly = np.array([_data(g, x, y) for x, y in screen])
            a, b = poly, np.roll(poly, -1, 0)
            t = np.clip(((pts[:, None] - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1), 0, 1)
            gap = np.linalg.norm(pts[:, None] - (a + t[..., None] * (b - a)), axis=-1).min()
            if gap * g["s"] > 0.05:
                break
        else:
            raise AssertionError("no outline clear of the samples")
        inside = points_in_poly(pts, poly)
        want = sorted(int(i) for i in m.ids[inside])
        assert 5 < len(want) <= 120  # all of them listed as cards
        if twice_inside is not None:  # samples in the pentagram's centre are left out
            centre = np.hypot(*(pts - _data(g, cx, cy)).T) * g["s"] < twice_inside * size
            assert centre.any() and not inside[centre].any()
        _lasso(page, screen)
        count, ids = _selected(page)
        assert count == len(want) and ids == want
        head = page.locator(".map-selection h2").inner_text()
        wrong = int((m.label[inside] != m.pred[inside]).sum())
        assert f"{wrong} misclassified" in head
        assert page.locator(".map-lasso").is_hidden()  # the outline goes when released
        page.keyboard.press("Escape")
        assert page.locator(".map-selection h2").count() == 0
    assert not page.errors


def test_shift_drag_pans_while_the_lasso_is_chosen(page: Any, served: dict[str, Any]):
    m = served["map"]
    g = _open(page, served, "?tool=lasso")
    assert page.get_by_role("button", name="lasso select").get_attribute("aria-pressed") == "true"
    x, y = _screen(g, 0.0, 0.0)
    page.keyboard.down("Shift")
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 120, y - 40, steps=5)
    page.mouse.up()
    page.keyboard.up("Shift")
    assert page.locator(".map-selection h2").count() == 0  # nothing selected: the map moved
    i = _isolated(m, g)
    sx, sy = _screen(g, float(m.x[i]), float(m.y[i]))
    page.mouse.move(sx + 120, sy - 40)  # the dot is where the pan took it
    tip = page.locator(".map-tip")
    tip.wait_for(state="visible")
    assert tip.get_attribute("data-sample") == str(m.ids[i])
    assert not page.errors


def test_predictions_that_are_not_the_datasets_classes_are_not_called_wrong(
    page: Any, served: dict[str, Any]
):
    page.goto(f"{served['url']}#/r/other/map?color=correct&mis=1")
    page.wait_for_selector("canvas.map-canvas")
    page.wait_for_load_state("networkidle")
    note = page.locator(".notice", has_text="outputs")
    assert "The model has 12 outputs and the dataset 10 classes" in note.inner_text()
    assert page.locator("#map-mis").is_disabled()
    assert page.locator("button[data-color=correct]").is_disabled()
    assert "misclassified only (0)" in page.locator(".toolbar").inner_text()
    assert not page.errors


def test_run_without_map_says_how_to_make_one(page: Any, served: dict[str, Any]):
    page.goto(f"{served['url']}#/r/plain/map")
    note = page.locator(".notice")
    note.wait_for()
    assert "lurker map" in note.inner_text()


@pytest.fixture(scope="module")
def static_site(served: dict[str, Any]) -> Iterator[str]:
    """`lurker export` of both runs, served by a plain static file server (no lurker)."""

    from lurker.server.export import export_site

    site = export_site(served["root"], served["root"].parent / "site", dataset=served["data"],
                       progress=False)  # fmt: skip

    with static_server(site) as url:
        yield url


def test_static_export_shows_the_map(page: Any, served: dict[str, Any], static_site: str):
    import json

    m = served["map"]
    site = served["root"].parent / "site" / "data" / "runs"
    listed = json.loads((site / "mapped" / "exported-samples.json").read_text())["samples"]
    exported = {s["id"] for s in listed if s["image"]}
    assert 0 < len(exported) < len(m)
    g = _open(page, {"url": static_site.rstrip("/")})
    assert page.locator("canvas.map-canvas").get_attribute("data-shown") == str(len(m))
    for want in (True, False):  # an exported sample shows its image, another says so
        i = _isolated(m, g, np.isin(m.ids, list(exported)) == want)
        page.mouse.move(*_screen(g, float(m.x[i]), float(m.y[i])))
        tip = page.locator(".map-tip")
        tip.wait_for(state="visible")
        assert tip.get_attribute("data-sample") == str(m.ids[i])
        assert (tip.locator("img").count() == 1) == want
        assert ("not exported" in tip.inner_text()) != want
        page.mouse.move(1, 1)
    # a box around every dot: the samples the site lacks say so, as the tooltip does
    page.click("button[data-tool=box]")
    box = page.locator("canvas.map-canvas").bounding_box()
    page.mouse.move(box["x"] + 2, box["y"] + 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] - 2, steps=4)
    page.mouse.up()
    cards = page.locator(".map-selection .sample-card")
    cards.first.wait_for()
    for card in cards.all():
        sid = int(card.get_attribute("data-sample"))
        assert (card.locator("img").count() == 1) == (sid in exported)
        assert ("not exported" in card.inner_text()) == (sid not in exported)
    # a click on an exported dot opens its page, which shows the prediction the map holds
    # (no model runs in a static site)
    page.keyboard.press("Escape")
    wrong_exported = np.isin(m.ids, list(exported)) & (m.pred != m.label)
    assert wrong_exported.any()
    i = _isolated(m, g, wrong_exported)
    page.mouse.click(*_screen(g, float(m.x[i]), float(m.y[i])))
    page.wait_for_url(f"**#/r/mapped/sample/{m.ids[i]}")
    shown = page.locator("#pred-stored li")
    shown.wait_for()
    assert shown.inner_text() == f"{m.pred[i]} {100 * m.conf[i]:.1f}%"
    assert "no model attached" not in page.locator(".sample-head .facts").inner_text()
    page.go_back()
    page.wait_for_selector("canvas.map-canvas")
    page.goto(f"{static_site}#/r/plain/map")
    note = page.locator(".notice")
    note.wait_for()
    assert "holds no dataset map" in note.inner_text() and "lurker map" in note.inner_text()
    assert not page.errors


def test_static_samples_list_marks_the_misclassified(
    page: Any, served: dict[str, Any], static_site: str
):
    """The static export's samples list marks the misclassified samples (``label →
    predicted``, from the prediction the run's map recorded) as the served list does: it
    showed the label alone. Oracle: ``Run.map()``, and the served page."""
    m = served["map"]
    truth = {int(i): (int(lab), int(pr)) for i, lab, pr in zip(m.ids, m.label, m.pred)}

    def cards(url: str) -> dict[int, tuple[str, bool]]:
        page.goto(url)
        page.wait_for_selector(".sample-card")
        got = page.eval_on_selector_all(
            ".sample-card",
            "els => els.map(e => [Number(e.dataset.sample), e.querySelector('small').textContent,"
            " e.querySelector('small').classList.contains('misclassified')])",
        )
        return {int(i): (text, wrong) for i, text, wrong in got}

    static = cards(f"{static_site}#/r/mapped/samples")
    assert any(truth[i][0] != truth[i][1] for i in static)  # some are misclassified
    for i, (text, wrong) in static.items():
        label, pred = truth[i]
        assert wrong == (label != pred), i
        assert text == (f"{label} → {pred}" if wrong else str(label)), (i, text)
    # in red (as the docs say, and the map's selection), not the muted grey of a label
    red = page.eval_on_selector(
        ".sample-card small.misclassified", "e => getComputedStyle(e).color"
    )
    assert red == "rgb(164, 14, 38)", red
    served_cards = cards(f"{served['url']}#/r/mapped/samples")  # its first 100
    both = static.keys() & served_cards.keys()
    assert any(static[i][1] for i in both)
    assert {i: served_cards[i] for i in both} == {i: static[i] for i in both}
    assert not page.errors


@pytest.fixture(scope="module")
def imageless_site(
    served: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The mapped run exported with --no-images and no image cached: a page per top-k
    sample, no image of any."""
    import shutil

    from lurker.server.export import export_site

    root = tmp_path_factory.mktemp("imageless")
    run = root / "mapped"
    shutil.copytree(served["root"] / "mapped", run, ignore=shutil.ignore_patterns("cache"))
    with pytest.warns(UserWarning, match="--no-images"):
        site = export_site(run, root / "site", make_images=False, progress=False)
    with static_server(site) as url:
        yield url


def test_a_sample_exported_without_its_image_still_opens(
    page: Any, served: dict[str, Any], imageless_site: str
):
    """A dot of a sample the site holds without its image says it has no image (not that the
    sample is not exported) and opens its page; no request for a missing image is made."""
    m = served["map"]
    listed = page.request.get(f"{imageless_site}data/runs/mapped/exported-samples.json").json()
    paged = {s["id"] for s in listed["samples"]}
    assert paged and not any(s["image"] for s in listed["samples"])
    g = _open(page, {"url": imageless_site.rstrip("/")})
    i = _isolated(m, g, np.isin(m.ids, list(paged)))
    page.mouse.move(*_screen(g, float(m.x[i]), float(m.y[i])))
    tip = page.locator(".map-tip")
    tip.wait_for(state="visible")
    assert tip.get_attribute("data-sample") == str(m.ids[i])
    assert tip.locator("img").count() == 0 and "image not exported" in tip.inner_text()
    page.mouse.click(*_screen(g, float(m.x[i]), float(m.y[i])))
    page.wait_for_url(f"**#/r/mapped/sample/{m.ids[i]}")
    page.wait_for_selector("#top-k-of")
    assert not page.errors


TABLEAU = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac"]  # fmt: skip
BACKGROUND = (0xFB, 0xFC, 0xFD)


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A run holding only a 6,000-point map (drawn as squares in a pixel buffer), written
    the way `lurker map` writes one."""
    from lurker.server import create_app
    from lurker.server.serve import background
    from lurker.store import RunWriter

    rng = np.random.default_rng(0)
    n = 6000
    label = rng.integers(0, 10, n)
    xy = rng.normal(0, 10, (10, 2))[label] + rng.normal(0, 3, (n, 2))
    root = tmp_path_factory.mktemp("large")
    meta = {"model": "synthetic", "model_fingerprint": "synthetic", "dataset": "synthetic"}
    with RunWriter.create(root / "large", meta=meta) as w:
        w.set_classes([f"class {i}" for i in range(10)])
        w.add_samples((i, f"s/{i}.png", int(label[i])) for i in range(n))
        w.write_layers_result([])
        w.write_map(np.arange(n), xy, label, np.ones(n), {"layer": "fc", "method": "tsne"})
    with background(create_app(root)) as url:
        yield {"url": url, "xy": xy, "label": label}


def test_many_points_are_drawn_in_their_class_colour(page: Any, large: dict[str, Any]):
    """Every isolated point's pixel holds its class colour at 90% over the background
    (oracle: the blend computed here); pixels far from every point hold the background.
    With a selection, the points outside it fade and those inside keep their colour."""
    page.goto(f"{large['url']}#/r/large/map")
    page.wait_for_selector("canvas.map-canvas[data-shown='6000']")
    page.wait_for_load_state("networkidle")
    g = page.evaluate(
        "() => { const c = document.querySelector('canvas.map-canvas'); return {s: "
        "+c.dataset.scale, tx: +c.dataset.tx, ty: +c.dataset.ty, w: c.width, h: c.height}; }"
    )
    read = (
        "() => { const c = document.querySelector('canvas.map-canvas'); return Array.from("
        "c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }"
    )
    pixels = np.array(page.evaluate(read), np.uint8).reshape(g["h"], g["w"], 4)
    xy = large["xy"]
    sx, sy = g["tx"] + xy[:, 0] * g["s"], g["ty"] - xy[:, 1] * g["s"]
    screen = np.c_[sx, sy]
    d = np.sqrt(((screen[:, None] - screen[None]) ** 2).sum(-1)) + np.eye(len(xy)) * 1e9
    apart = (d.min(1) > 8) & (sx > 8) & (sy > 8) & (sx < g["w"] - 8) & (sy < g["h"] - 8)
    assert apart.sum() >= 5
    for i in np.flatnonzero(apart):
        colour = np.array([int(TABLEAU[large["label"][i]][j : j + 2], 16) for j in (1, 3, 5)])
        want = 0.9 * colour + 0.1 * np.array(BACKGROUND)
        got = pixels[int(sy[i]), int(sx[i])]
        assert np.abs(got[:3] - want).max() <= 2 and got[3] == 255, (i, got, want)
    yy, xx = np.mgrid[0 : g["h"] : 7, 0 : g["w"] : 7]
    grid = np.c_[xx.ravel(), yy.ravel()]
    far = np.ones(len(grid), bool)
    for chunk in np.array_split(np.arange(len(xy)), 20):
        near = np.abs(grid[:, None] - screen[chunk][None]).max(-1).min(1) < 6
        far &= ~near
    assert far.sum() > 1000
    assert (pixels[grid[far, 1], grid[far, 0]] == [*BACKGROUND, 255]).all()
    # a box selection over the right half: the points outside fade to 15% over the
    # background, those inside are drawn again on top in their own colour at 90%
    box = page.locator("canvas.map-canvas").bounding_box()
    page.keyboard.down("Shift")
    page.mouse.move(box["x"] + g["w"] / 2, box["y"] + 1)
    page.mouse.down()
    page.mouse.move(box["x"] + g["w"] - 1, box["y"] + g["h"] - 1, steps=5)
    page.mouse.up()
    page.keyboard.up("Shift")
    page.wait_for_selector(".map-selection h2")
    # drawn in the next animation frame: wait for the one after it
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    pixels = np.array(page.evaluate(read), np.uint8).reshape(g["h"], g["w"], 4)
    bg = np.array(BACKGROUND)
    checked = [0, 0]
    for i in np.flatnonzero(apart & (np.abs(sx - g["w"] / 2) > 8)):
        colour = np.array([int(TABLEAU[large["label"][i]][j : j + 2], 16) for j in (1, 3, 5)])
        faded = 0.15 * colour + 0.85 * bg
        inside = sx[i] > g["w"] / 2
        want = 0.9 * colour + 0.1 * faded if inside else faded
        got = pixels[int(sy[i]), int(sx[i])]
        assert np.abs(got[:3] - want).max() <= 2, (i, inside, got, want)
        checked[int(inside)] += 1
    assert min(checked) >= 2, checked
    assert not page.errors


def test_runs_page_tells_runs_of_one_model_apart(
    page: Any, served: dict[str, Any], static_site: str
):
    """Three runs of one architecture: each row says when it was probed (oracle: the run's
    own meta) and whether it has a map, linked to its Map page; served and exported alike."""
    from lurker.store import Run

    root = served["root"]
    for url in (served["url"], static_site):
        page.goto(f"{url}#/")
        rows = page.locator("table.runs tbody tr")
        rows.first.wait_for()
        assert [r.get_attribute("data-run") for r in rows.all()] == ["mapped", "other", "plain"]
        for row in rows.all():
            rid = row.get_attribute("data-run")
            with Run.open(root / rid) as run:
                created, has_map = run.meta["created"], run.has_map
            probed = row.locator(".run-probed")
            assert probed.get_attribute("title") == created
            assert probed.inner_text().replace("\n", " ").startswith(created[:10])
            assert "DigitsNet" in row.locator(".run-model").inner_text()
            assert row.locator(".run-map a").count() == int(has_map)
        page.locator("tr[data-run=mapped] .run-map a").click()
        page.wait_for_url("**#/r/mapped/map")
        page.wait_for_selector("canvas.map-canvas")
        page.go_back()
        page.wait_for_selector("table.runs")
    assert not page.errors


def test_sample_page_without_images_keeps_the_reason_in_its_box(
    page: Any, served: dict[str, Any], tmp_path: Path
):
    """A run whose recorded dataset is gone (nothing cached): the sample page says why in
    place of the image, and the long reason stays in that box instead of running over the
    list below; the recorded prediction still shows."""
    import json
    import shutil
    import sqlite3

    from lurker.server import create_app
    from lurker.server.serve import background

    copy = tmp_path / "mapped"
    shutil.copytree(served["root"] / "mapped", copy, ignore=shutil.ignore_patterns("cache"))
    with sqlite3.connect(copy / "run.db") as conn:  # the folder it was probed from, moved
        (value,) = conn.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
        config = {**json.loads(value), "data": str(tmp_path / "moved-away" / "images")}
        conn.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps(config),))
    m = served["map"]
    with background(create_app(copy)) as url:
        page.goto(f"{url}#/r/mapped/sample/{m.ids[0]}")
        note = page.locator("div.sample-img .notice")
        note.wait_for()
        text = note.inner_text()
        assert text.startswith("No images to show:") and not text.endswith("..")
        box = page.locator("div.sample-img").bounding_box()
        inner = note.bounding_box()
        below = page.locator("main h2").bounding_box()
        assert inner["y"] + inner["height"] <= box["y"] + box["height"] + 0.5
        assert inner["x"] + inner["width"] <= box["x"] + box["width"] + 0.5
        assert box["y"] + box["height"] <= below["y"]
        shown = page.locator("#pred-stored li").inner_text()
        assert shown == f"{m.pred[0]} {100 * m.conf[0]:.1f}%"
    assert not page.errors


def test_near_certain_confidence_is_not_shown_as_certain(page: Any, tmp_path: Path):
    """A confident model (a trained head's scale): a sample whose top probability is
    0.99996 showed "100%" on the Map (the API rounded it to 4 decimals, to 1.0) and
    "100.0%" on its sample page, and its runner-up's 0.00002 "0.0%": rounding read as
    certainty. The map's confidence is now the stored float32, and pages say ">99.9%" and
    "<0.1%". Oracle: softmax of the model's logits, in float64."""
    import json
    import urllib.request

    from lurker.examples import DigitsNet
    from lurker.map import make_map
    from lurker.probe import probe
    from lurker.probe.data import load_dataset
    from lurker.server import create_app
    from lurker.server.serve import background

    torch.manual_seed(0)
    model = DigitsNet().eval()
    with torch.no_grad():
        model.classifier[3].weight.mul_(1000)
    data = load_dataset("digits:test", 16, channels=1)
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        probs = torch.softmax(model(x).double(), 1).numpy()
    top, second = probs.max(1), np.sort(probs, 1)[:, -2]
    # a confidence that 4 decimals round to 1 (and toFixed(1) to 100.0), float32 does not;
    # and a runner-up that rounds to 0.0%
    near = np.flatnonzero((top >= 0.99995) & (top < 1 - 1e-6) & (second > 0) & (second < 5e-4))
    assert len(near), "the test needs a sample whose confidence rounds to 100.0%"
    i = int(near[0])
    run = probe(model, data, out=tmp_path / "sharp", layers="classifier.1", progress=False,
                embed=True)  # fmt: skip
    make_map(run, method="pca").close()
    run.close()
    with background(create_app(tmp_path, model_obj=model, dataset=data)) as url:
        with urllib.request.urlopen(f"{url}api/runs/sharp/map") as r:
            doc = json.load(r)
        k = doc["ids"].index(i)
        assert doc["conf"][k] != 1.0
        assert doc["conf"][k] == pytest.approx(top[i], rel=1e-6)
        # the sample document's stored probability is the same number (one figure per page)
        for j in range(0, len(doc["ids"]), 37):
            with urllib.request.urlopen(f"{url}api/runs/sharp/samples/{doc['ids'][j]}") as r:
                assert json.load(r)["stored_prediction"]["prob"] == doc["conf"][j]
        page.goto(f"{url}#/r/sharp/sample/{i}")
        preds = page.locator("ol.preds li")
        preds.first.wait_for()
        shown = preds.all_inner_texts()
        assert shown[0] == f"{probs[i].argmax()} >99.9%"
        assert shown[1].endswith(" <0.1%")
        assert not any(t.endswith(" 100.0%") or t.endswith(" 0.0%") for t in shown)
    assert not page.errors
