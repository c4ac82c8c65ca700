"""A page seen again costs no image request: the run's images are asked for with its
``images_version`` (``?v=``), which the server answers as immutable.

Counted at the server (an ASGI wrapper around the app), not in the browser, whose request
events also report answers it took from its own cache."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from explorer_fixtures import ExplorerRun, explorer_run, skip_without_browser  # noqa: F401

skip_without_browser()

LAYER = "features.4"


class CountImages:
    """The app, recording every PNG request it answers: ``(path, query, status)``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[tuple[str, str, int]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith(".png"):
            return await self.app(scope, receive, send)
        status: list[int] = []

        async def sent(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, sent)
        self.seen.append((scope["path"], scope["query_string"].decode(), status[0]))


@pytest.fixture(scope="module")
def served(explorer_run: ExplorerRun) -> Iterator[dict[str, Any]]:  # noqa: F811
    from lurker.server import create_app
    from lurker.server.serve import background

    counted = CountImages(create_app(explorer_run.path))
    with background(counted) as url:
        yield {"url": url, "count": counted, "id": explorer_run.path.name}


def thumbnails_shown(page: Any) -> int:
    """Wait until every thumbnail of the layer grid shows its image; how many there are."""
    page.wait_for_selector(".unit-grid img")
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('.unit-grid img')];"
        " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }",
        timeout=20000,
    )
    return page.locator(".unit-grid img").count()


def test_a_layer_page_seen_again_requests_no_image(browser: Any, served: dict[str, Any]) -> None:
    layer = f"{served['url']}#/r/{served['id']}/layer/{LAYER}"
    seen = served["count"].seen
    ctx = browser.new_context(viewport={"width": 1280, "height": 2000})  # every tile on screen
    try:
        first = ctx.new_page()
        first.goto(layer)
        shown = thumbnails_shown(first)
        assert shown > 8
        asked = [s for s in seen if f"/layers/{LAYER}/units/" in s[0]]
        assert len(asked) >= shown and all(q.startswith("v=") for _, q, _ in asked)
        seen.clear()
        # a second visit: another tab, and a reload of the first
        again = ctx.new_page()
        again.goto(layer)
        assert thumbnails_shown(again) == shown
        first.reload()
        assert thumbnails_shown(first) == shown
        assert seen == []  # not even a 304 per image
    finally:
        ctx.close()
