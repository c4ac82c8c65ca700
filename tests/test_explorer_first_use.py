"""What a first-time user of the explorer sees on a narrow (800 px) window, in a real
browser (Debian's chromium) over the helper's small digits run with its model attached."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from explorer_fixtures import (  # noqa: F401
    ExplorerRun,
    explorer_run,
    skip_without_browser,
    strict_page,
)

skip_without_browser()


@pytest.fixture(scope="module")
def served(explorer_run: ExplorerRun) -> Iterator[dict[str, Any]]:  # noqa: F811
    from lurker.server import create_app
    from lurker.server.serve import background

    with background(create_app(explorer_run.path, model_obj=explorer_run.model)) as url:
        yield {"url": url, "id": explorer_run.path.name, "path": explorer_run.path}


def test_live_op_list_shows_every_shape_whole_on_a_narrow_window(
    browser: Any, served: dict
) -> None:
    """At 800 px a long op type (``adaptive_avg_pool2d``) used to push its row's shape out
    of the list (``1x3`` for ``1x32x4x4``): the type is shortened, the shape never."""
    with strict_page(browser, width=800) as pg:
        pg.goto(served["url"] + f"#/r/{served['id']}/live?image=sample-0&op=linear_2")
        pg.wait_for_selector(".op-list li[data-op=adaptive_avg_pool2d_1]")
        rows = pg.eval_on_selector_all(
            ".op-list li[data-op]",
            """els => els.map(li => {
                const s = li.querySelector('.op-shape'), box = li.closest('ul').getBoundingClientRect();
                return [li.dataset.op, s.textContent, s.scrollWidth <= s.clientWidth,
                        s.getBoundingClientRect().right <= box.right - 1,
                        li.querySelector('.op-type').title];
            })""",
        )
        graph = pg.evaluate(
            f"fetch('api/runs/{served['id']}/graph').then(r => r.json())"
            ".then(d => Object.fromEntries(d.nodes.map(n => [n.l, [n.s, n.t]])))"
        )
        for op, shown, whole, inside, op_type in rows:
            assert whole and inside, f"{op}: its shape {shown!r} is cut off"
            assert shown == "\u00d7".join(map(str, graph[op][0][0])), op  # the shape, whole
            assert op_type == graph[op][1]  # a shortened type is readable on hover
        assert "adaptive_avg_pool2d_1" in [r[0] for r in rows]  # the long type is listed


def test_home_says_when_the_run_was_probed_as_the_runs_list_does(
    browser: Any, served: dict
) -> None:
    """The home page said ``2026-12-06T09:12:40+00:00``, wrapped over two lines on a
    narrow window, where the runs list says ``2026-12-06 09:12 UTC``."""
    from lurker.store import Run

    with Run.open(served["path"]) as run:
        created, version = run.meta["created"], run.meta["lurker_version"]
    want = datetime.fromisoformat(created).strftime("%Y-%m-%d %H:%M UTC")
    with strict_page(browser, width=800) as pg:
        pg.goto(served["url"] + f"#/r/{served['id']}")
        cell = pg.locator("dt:text-is('probed') + dd")
        assert cell.inner_text() == f"{want} with lurker {version}"
        assert cell.locator("span").get_attribute("title") == created  # the exact time
