"""A page of the explorer open while its run is probed again (``lurker probe --overwrite``).

The page must never go on showing the earlier run's values and pictures as the current
ones: a navigation after the re-probe shows the new run (and says the run changed), and a
page left open says that what it shows is the earlier run, with a button that draws the
new one. Oracle: the run's store opened directly (``lurker.store.Run``) before and after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from explorer_fixtures import probe_digits, skip_without_browser, strict_page, watch

skip_without_browser()

LAYER = "features.4"
UNIT = 0


def _top(path: Path) -> list[tuple[int, float]]:
    """The unit's max list as the store holds it now: (sample id, value) per rank."""
    from lurker.store import Run

    with Run.open(path) as run:
        return [(e.sample_id, float(e.value)) for e in run.unit(LAYER, UNIT).top("max")]


def _shown(pg: Any) -> list[tuple[int, float]]:
    """The max list the unit page shows: (sample id, value) per card."""
    pg.wait_for_selector(".top-entry[data-sample]")
    cards = pg.eval_on_selector_all(
        ".topk .top-entry[data-sample]",
        "els => els.map(e => [Number(e.dataset.sample), Number(e.dataset.value)])",
    )
    return [(int(s), float(v)) for s, v in cards]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A folder holding run ``d`` (the digits CNN, seed 0), served in a thread; ``reprobe``
    probes the same directory again with another model (seed 1)."""
    from lurker.server import create_app
    from lurker.server.serve import background

    out, weights = tmp_path / "runs" / "d", tmp_path / "d.pt"
    model = probe_digits(out, weights, seed=0, k=3, overwrite=True)
    with background(create_app(tmp_path / "runs")) as url:
        yield {
            "url": url,
            "out": out,
            "model": model,
            "reprobe": lambda: probe_digits(out, weights, seed=1, k=3, overwrite=True),
        }


def _version(pg: Any) -> str:
    return pg.evaluate("fetch('api/runs/d').then(r => r.json()).then(s => s.images_version)")


def test_a_navigation_after_a_reprobe_shows_the_new_run(browser: Any, served: dict) -> None:
    """Unit page, layer page, re-probe, back to the unit page: the page reads the run
    again, shows the new run's list and images (the new image token), and says why."""
    old = _top(served["out"])
    unit = f"#/r/d/unit/{LAYER}/{UNIT}?tab=max"
    with strict_page(browser) as pg:
        pg.goto(served["url"] + unit)
        assert _shown(pg) == old
        pg.evaluate(f"location.hash = '#/r/d/layer/{LAYER}'")
        pg.wait_for_selector(".unit-grid .unit-id")
        old_version = _version(pg)
        served["reprobe"]()
        new = _top(served["out"])
        assert [s for s, _ in new] != [s for s, _ in old]  # the two runs' lists differ
        pg.evaluate(f"location.hash = '{unit}'")
        pg.wait_for_selector(".run-changed[data-state=fresh]")
        assert _shown(pg) == new
        bar = pg.inner_text(".run-changed")
        assert "Run d was probed again" in bar and "shows the new run" in bar
        new_version = _version(pg)
        assert new_version != old_version
        srcs = pg.eval_on_selector_all(".topk .top-entry img", "els => els.map(e => e.src)")
        assert srcs and all(f"v={new_version}" in s for s in srcs), srcs
        pg.click(".run-changed button")  # dismiss
        assert pg.locator(".run-changed").is_hidden()


def _reprobed_under(pg: Any, served: dict) -> tuple[list, list]:
    """Open the unit page, probe its run again, and let the page look (as when its tab is
    looked at again, what it also checks every few seconds) until its bar says it is
    stale: the unit's max list before and after."""
    old = _top(served["out"])
    pg.goto(served["url"] + f"#/r/d/unit/{LAYER}/{UNIT}?tab=max")
    assert _shown(pg) == old
    served["reprobe"]()
    new = _top(served["out"])
    pg.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    pg.wait_for_selector(".run-changed[data-state=stale]")
    return old, new


def test_an_open_page_says_it_shows_the_earlier_run(browser: Any, served: dict) -> None:
    """A unit page left open during a re-probe: when the tab is looked at again it says
    that what it shows is the earlier run; its button draws the new run's list."""
    with strict_page(browser) as pg:
        old, new = _reprobed_under(pg, served)
        assert "what it shows is the earlier run" in pg.inner_text(".run-changed")
        assert _shown(pg) == old  # never redrawn unasked
        pg.click("text=Show the new run")
        pg.wait_for_selector(".run-changed[data-state=fresh]")
        assert _shown(pg) == new


def test_generation_endpoint_follows_the_run(served: dict) -> None:
    """``/api/runs/d/generation`` matches the summary's ``generation`` and changes with a
    re-probe (what the pages poll)."""
    import json
    from urllib.request import urlopen

    def get(path: str) -> dict:
        with urlopen(served["url"] + path) as r:
            return json.loads(r.read())

    summary = get("api/runs/d")
    before = summary["generation"]
    assert get("api/runs/d/generation") == {
        "id": "d",
        "generation": before,
        "status": "complete",
        "images_version": summary["images_version"],
        "additions": {"featviz": None, "map": None, "vocab": None},  # neither written yet
        "featviz_layers": {},
    }
    assert summary["additions"] == {"featviz": None, "map": None, "vocab": None}
    assert get("api/runs/d/generation")["generation"] == before  # stable while unchanged
    served["reprobe"]()
    after = get("api/runs/d/generation")["generation"]
    assert after != before
    assert get("api/runs/d")["generation"] == after


def test_a_toggle_on_a_stale_page_draws_the_new_run(browser: Any, served: dict) -> None:
    """The bar says the page shows the earlier run; a click that only swaps image URLs
    (the unit page's image / gradient toggle) must not put the new run's pictures under
    the earlier run's values and sample ids: it draws the page from the new run."""
    with strict_page(browser) as pg:
        old, new = _reprobed_under(pg, served)
        assert [s for s, _ in new] != [s for s, _ in old]
        pg.click(".seg[aria-label='image or gradient'] button[data-value=grad]")
        pg.wait_for_selector(".run-changed[data-state=fresh]")
        pg.wait_for_selector(".topk img[data-kind=grad]")
        assert _shown(pg) == new  # the values beside the pictures are the new run's
        version = _version(pg)
        srcs = pg.eval_on_selector_all(".topk .top-entry img", "els => els.map(e => e.src)")
        assert srcs and all("/grad.png" in s and f"v={version}" in s for s in srcs), srcs
        assert "img=grad" in pg.evaluate("location.hash")  # the click's choice is kept


def _get(url: str) -> dict:
    import json
    from urllib.request import urlopen

    with urlopen(url) as r:
        return json.loads(r.read())


def test_writes_that_add_to_the_run_leave_its_generation_alone(served: dict) -> None:
    """``lurker featviz``, ``lurker map`` and deleting the run's ``cache/`` (to free disk or
    remake its images) are no re-probe: the generation stays, so no open page says the run
    was probed again. ``lurker featviz`` and ``lurker map`` each change their own token of
    ``additions`` (what the pages showing them look at), each leaving the other's alone.
    Deleting ``cache/`` changes only the image token (its files may be made anew, other
    pictures under the same names)."""
    import shutil

    import lurker
    from lurker.map import make_map

    gen = served["url"] + "api/runs/d/generation"
    first = _get(gen)
    assert (
        first["images_version"]
        and first["images_version"] == _get(served["url"] + "api/runs/d")["images_version"]
    )
    lurker.featviz(served["model"], "features.8", units=[0, 1], steps=4).save(served["out"])
    after_featviz = _get(gen)
    assert after_featviz["additions"]["featviz"] is not None
    assert after_featviz["additions"]["map"] is None
    make_map(served["out"], method="pca")
    after_writes = _get(gen)
    summary = _get(served["url"] + "api/runs/d")
    assert summary["holds"]["map"]  # both writes landed
    assert after_writes["additions"]["featviz"] == after_featviz["additions"]["featviz"]
    assert after_writes["additions"]["map"] is not None
    assert summary["additions"] == after_writes["additions"]
    unchanged = {"additions": None, "featviz_layers": None}
    assert {**after_writes, **unchanged} == {**first, **unchanged}
    # the same units made again (other settings): a new token
    lurker.featviz(served["model"], "features.8", units=[0, 1], steps=5).save(served["out"])
    again = _get(gen)["additions"]
    assert again["featviz"] != after_writes["additions"]["featviz"]
    assert again["map"] == after_writes["additions"]["map"]
    _get(served["url"] + "api/runs/d/samples/0")  # (any request: the cache is in use)
    shutil.rmtree(served["out"] / "cache")
    after_delete = _get(gen)
    assert after_delete["generation"] == first["generation"]
    assert after_delete["images_version"] not in (None, first["images_version"])


def test_a_deleted_image_cache_is_no_reprobe_to_an_open_page(browser: Any, served: dict) -> None:
    """The run's ``cache/`` deleted under an open unit page: no bar, and the next page
    asks for the run's images under the new image token (not the old one, which the
    browser keeps as immutable)."""
    import shutil

    unit = f"#/r/d/unit/{LAYER}/{UNIT}?tab=max"
    with strict_page(browser) as pg:
        pg.goto(served["url"] + unit)
        shown = _shown(pg)
        old_version = _version(pg)
        shutil.rmtree(served["out"] / "cache")
        new_version = _version(pg)
        assert new_version != old_version
        # the poll (as when the tab is looked at again) answers before the bar could show
        with pg.expect_response(lambda r: r.url.endswith("/api/runs/d/generation")):
            pg.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
        pg.evaluate(f"location.hash = '#/r/d/layer/{LAYER}'")
        pg.wait_for_selector(".unit-grid .unit-id")
        pg.evaluate(f"location.hash = '{unit}'")
        assert _shown(pg) == shown
        srcs = pg.eval_on_selector_all(".topk .top-entry img", "els => els.map(e => e.src)")
        assert srcs and all(f"v={new_version}" in s for s in srcs), srcs
        assert pg.locator(".run-changed").is_hidden()


#: ``window.__busy``: the page's fetches and JSON reads not yet done, each counted off a
#: task after it settles, so after the promise chains it started (what the page did with
#: the answer) ran: 0 means the page acted on every answer it was given.
_COUNT_FETCHES = """
window.__busy = 0;
const done = () => setTimeout(() => window.__busy--, 0);
const fetch0 = window.fetch;
window.fetch = (...args) => { window.__busy++; return fetch0(...args).finally(done); };
const json0 = Response.prototype.json;
Response.prototype.json = function () { window.__busy++; return json0.call(this).finally(done); };
"""


@pytest.mark.parametrize("first", ["navigation", "poll"])
def test_a_poll_during_a_navigation_reports_the_reprobe_once(
    browser: Any, served: dict, first: str
) -> None:
    """After a re-probe, a navigation and the page's poll ask at once whether the run
    changed (the poll's timer, or the tab looked at again, while the navigation waits for
    its answer). Both read the token the tab held: each said "changed", so the page just
    drawn from the new run said it showed the earlier run. Now the run is checked once and
    the page drawn says it shows the new run. The answers are held back (``page.route``)
    and let go in the order that showed the fault: the navigation's first."""
    unit = f"#/r/d/unit/{LAYER}/{UNIT}?tab=max"
    held: list[Any] = []

    def hold(route: Any) -> None:
        if route.request.url.endswith("?sync"):
            route.continue_()
        else:
            held.append(route)

    with strict_page(browser) as pg:
        pg.add_init_script(_COUNT_FETCHES)
        pg.goto(served["url"] + f"#/r/d/layer/{LAYER}")
        pg.wait_for_selector(".unit-grid .unit-id")
        served["reprobe"]()
        new = _top(served["out"])
        pg.route("**/api/runs/d/generation*", hold)
        navigate = f"location.hash = '{unit}'"
        poll = "document.dispatchEvent(new Event('visibilitychange'))"
        for js in [navigate, poll] if first == "navigation" else [poll, navigate]:
            pg.evaluate(js)
            # a request made after it: once it passed the route, so did the page's
            pg.evaluate("fetch('api/runs/d/generation?sync').then(r => r.status)")
        assert held
        navigation = held[0] if first == "navigation" else held[-1]
        rest = [r for r in held if r is not navigation]
        navigation.continue_()
        pg.wait_for_selector(".run-changed[data-state=fresh]")
        assert _shown(pg) == new
        for route in rest:  # (none: one check per run at a time)
            route.continue_()
        pg.unroute("**/api/runs/d/generation*")
        pg.wait_for_function("window.__busy === 0")  # every answer read and acted on
        assert pg.get_attribute(".run-changed", "data-state") == "fresh"
        assert _shown(pg) == new


def test_a_navigation_asks_for_its_page_beside_the_check(browser: Any, served: dict) -> None:
    """A navigation asks whether the run changed beside its page's own requests, not
    before them (a round trip on every click): with the check's answer held back, the
    unit page still asks for its document and draws it. Then the answer, a re-probe, is
    let go: the page is drawn again from the new run, and says so."""
    unit = f"#/r/d/unit/{LAYER}/{UNIT}?tab=max"
    held: list[Any] = []
    with strict_page(browser) as pg:
        pg.goto(served["url"] + f"#/r/d/layer/{LAYER}")
        pg.wait_for_selector(".unit-grid .unit-id")
        old = _top(served["out"])
        served["reprobe"]()
        new = _top(served["out"])
        assert [s for s, _ in new] != [s for s, _ in old]
        pg.route("**/api/runs/d/generation*", lambda route: held.append(route))
        with pg.expect_request(
            lambda r: r.url.endswith(f"/api/runs/d/layers/{LAYER}/units/{UNIT}")
        ):
            pg.evaluate(f"location.hash = '{unit}'")
        pg.wait_for_selector(".topk .top-entry[data-sample]")
        assert len(held) == 1  # asked, and still unanswered
        held[0].continue_()
        pg.unroute("**/api/runs/d/generation*")
        pg.wait_for_selector(".run-changed[data-state=fresh]")
        assert _shown(pg) == new
        version = _version(pg)
        srcs = pg.eval_on_selector_all(".topk .top-entry img", "els => els.map(e => e.src)")
        assert srcs and all(f"v={version}" in s for s in srcs), srcs


def _looked_at(pg: Any) -> None:
    """The tab looked at again: the page asks whether its run changed (as every few s)."""
    with pg.expect_response(lambda r: r.url.endswith("/api/runs/d/generation")):
        pg.evaluate("document.dispatchEvent(new Event('visibilitychange'))")


def test_featviz_under_an_open_unit_page_says_it_lacks_them(browser: Any, served: dict) -> None:
    """``lurker featviz`` writes images of the unit an open unit page shows: the page
    says it lacks them, and its button draws them (the feature visualization tab). A
    navigation back to a unit page seen before shows them too (not its held document).
    The layer page beside it, whose units got none, is not told."""
    import lurker

    layer = "features.8"
    unit = f"#/r/d/unit/{layer}/0?tab=max"
    with strict_page(browser) as pg:
        pg.goto(served["url"] + f"#/r/d/unit/{layer}/1?tab=max")
        pg.wait_for_selector(".topk .top-entry[data-sample]")
        pg.evaluate(f"location.hash = '{unit}'")
        pg.wait_for_selector(".topk .top-entry[data-sample]")
        assert pg.locator("[data-tab=featviz]").count() == 0
        lurker.featviz(served["model"], layer, units=[0, 1], steps=4).save(served["out"])
        _looked_at(pg)
        pg.wait_for_selector(".run-changed[data-state=stale]")
        bar = pg.inner_text(".run-changed")
        assert "new feature visualizations" in bar and "probed again" not in bar
        assert pg.locator("[data-tab=featviz]").count() == 0  # never redrawn unasked
        pg.click("text=Show the new results")
        pg.wait_for_selector("[data-tab=featviz]")
        assert pg.locator(".run-changed").is_hidden()
        pg.evaluate(f"location.hash = '#/r/d/unit/{layer}/1?tab=max'")  # seen before
        pg.wait_for_selector("[data-tab=featviz]")
        assert pg.locator(".run-changed").is_hidden()


def test_map_under_an_open_map_page_says_it_lacks_it(browser: Any, served: dict) -> None:
    """``lurker map`` on a run whose Map page is open (saying there is no map): the page
    says the run has a new map, and its button draws it, every sample a dot (oracle: the
    store's map). Another navigation needs no button: a unit page is not told."""
    from lurker.map import make_map
    from lurker.store import Run

    ctx, pg, errors = watch(browser)
    with contextlib.closing(ctx):
        pg.add_init_script(_COUNT_FETCHES)
        pg.goto(served["url"] + "#/r/d/map")
        pg.wait_for_selector("text=lurker map")
        assert pg.locator("canvas.map-canvas").count() == 0
        make_map(served["out"], method="pca").close()
        with Run.open(served["out"]) as run:
            dots = len(run.map().ids)
        _looked_at(pg)
        pg.wait_for_selector(".run-changed[data-state=stale]")
        assert "a new dataset map" in pg.inner_text(".run-changed")
        pg.click("text=Show the new results")
        pg.wait_for_selector("canvas.map-canvas[data-shown]")
        assert pg.get_attribute("canvas.map-canvas", "data-shown") == str(dots)
        assert pg.locator(".run-changed").is_hidden()
        pg.evaluate(f"location.hash = '#/r/d/unit/{LAYER}/{UNIT}'")
        pg.wait_for_selector(".topk .top-entry[data-sample]")
        make_map(served["out"], method="pca").close()  # again: the unit page shows none of it
        _looked_at(pg)
        pg.wait_for_function("window.__busy === 0")  # the answer read and acted on
        assert pg.locator(".run-changed").is_hidden()
    # the page without a map asked for it once: the 404 that says to make one
    assert [e for e in errors if "/api/runs/d/map" not in e and "404" not in e] == []
    assert sum("/api/runs/d/map" in e for e in errors) == 1


_PIXELS = """async () => { const i = document.querySelector('.frame img[src*=featviz]'); await i.decode();
 const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
 const x = c.getContext('2d'); x.drawImage(i, 0, 0);
 return Array.from(x.getImageData(0, 0, c.width, c.height).data); }"""


def test_featviz_made_again_shows_the_new_images_not_the_browsers_copy(
    browser: Any, served: dict
) -> None:
    """``lurker featviz`` remaking a unit's images (other steps, seed) writes them under the
    same path: after "Show the new results" the page must show the new pictures (oracle:
    the store's PNG, decoded), not the browser's copy of the old ones beside new values."""
    import io

    import numpy as np
    from PIL import Image

    import lurker
    from lurker.store import Run
    from lurker.store.featviz import featviz_png

    layer = "features.8"

    def stored() -> list[int]:
        with Run.open(served["out"]) as r:
            png = featviz_png(r, layer, 2, 0, "channel")
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA")).ravel().tolist()

    lurker.featviz(served["model"], layer, units=[2], steps=4).save(served["out"])
    with strict_page(browser) as pg:
        pg.goto(served["url"] + f"#/r/d/unit/{layer}/2?tab=featviz")
        pg.wait_for_selector(".frame img[src*=featviz]")
        before = pg.evaluate(_PIXELS)
        assert before == stored()
        lurker.featviz(served["model"], layer, units=[2], steps=40, seed=7).save(served["out"])
        after = stored()
        assert after != before
        _looked_at(pg)
        pg.wait_for_selector(".run-changed[data-state=stale]")
        pg.click("text=Show the new results")
        pg.wait_for_function(
            "() => !document.querySelector('.run-changed') || "
            "getComputedStyle(document.querySelector('.run-changed')).display === 'none' || "
            "document.querySelector('.run-changed').hidden"
        )
        pg.wait_for_selector(".frame img[src*=featviz]")
        assert pg.evaluate(_PIXELS) == after


def test_featviz_tokens_are_per_layer_in_the_api(served: dict) -> None:
    """``/generation`` and the summary give each layer's featviz token: ``lurker featviz``
    on one layer changes that layer's alone (the pages of another layer look at theirs)."""
    import lurker

    gen = served["url"] + "api/runs/d/generation"
    assert _get(gen)["featviz_layers"] == {}
    lurker.featviz(served["model"], "features.8", units=[0], steps=2).save(served["out"])
    first = _get(gen)["featviz_layers"]
    assert set(first) == {"features.8"}
    lurker.featviz(served["model"], LAYER, units=[0], steps=2).save(served["out"])
    second = _get(gen)["featviz_layers"]
    assert set(second) == {"features.8", LAYER} and second["features.8"] == first["features.8"]
    lurker.featviz(served["model"], LAYER, units=[0], steps=3).save(served["out"])
    third = _get(gen)
    assert third["featviz_layers"]["features.8"] == first["features.8"]
    assert third["featviz_layers"][LAYER] != second[LAYER]
    assert _get(served["url"] + "api/runs/d")["featviz_layers"] == third["featviz_layers"]


def test_featviz_of_another_layer_leaves_an_open_unit_page_alone(
    browser: Any, served: dict
) -> None:
    """``lurker featviz --layers features.8`` under an open unit page of another layer:
    no bar, and a navigation within that layer asks for none of its documents again; a
    unit page of ``features.8`` opened before is told (its own layer's images)."""
    import lurker

    fetched: list[str] = []
    ctx, pg, errors = watch(browser)
    with contextlib.closing(ctx):
        pg.add_init_script(_COUNT_FETCHES)
        pg.on("request", lambda r: fetched.append(r.url))
        pg.goto(served["url"] + f"#/r/d/unit/{LAYER}/1?tab=max")
        pg.wait_for_selector(".topk .top-entry[data-sample]")
        pg.evaluate(f"location.hash = '#/r/d/unit/{LAYER}/0?tab=max'")
        pg.wait_for_selector(".topk .top-entry[data-sample]")
        lurker.featviz(served["model"], "features.8", units=[0], steps=2).save(served["out"])
        _looked_at(pg)
        pg.wait_for_function("window.__busy === 0")  # the answer read and acted on
        assert pg.locator(".run-changed").is_hidden()
        fetched.clear()
        pg.evaluate(f"location.hash = '#/r/d/unit/{LAYER}/1?tab=max'")  # seen before
        pg.wait_for_selector(".topk .top-entry[data-sample]")
        pg.wait_for_function("window.__busy === 0")
        assert not [u for u in fetched if f"/api/runs/d/layers/{LAYER}" in u], fetched
        assert pg.locator(".run-changed").is_hidden()
        # the layer written: its unit page is told
        pg.evaluate("location.hash = '#/r/d/unit/features.8/0?tab=max'")
        pg.wait_for_selector(".topk .top-entry[data-sample]")
        pg.wait_for_selector("[data-tab=featviz]")
        lurker.featviz(served["model"], "features.8", units=[0], steps=3).save(served["out"])
        _looked_at(pg)
        pg.wait_for_selector(".run-changed[data-state=stale]")
        assert "new feature visualizations" in pg.inner_text(".run-changed")
    assert errors == []
