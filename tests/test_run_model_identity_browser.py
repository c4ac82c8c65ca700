"""A run served with other weights than it was probed with: the Home page says, once, in
its "live model" row, that the model is not the run's and what to pass instead; the Live
page says it where it would run the model; the stored pages (a unit's top images) still
load. Oracle: the reason the server's summary gives, and the weights the run records."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from explorer_fixtures import probe_digits, skip_without_browser, strict_page

skip_without_browser()

SPEC = "lurker.examples:DigitsNet"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from lurker.examples import DigitsNet
    from lurker.server import create_app
    from lurker.server.serve import background

    root = tmp_path_factory.mktemp("identity-browser")
    probe_digits(root / "digits", root / "digits.pt", k=3)
    torch.manual_seed(1)
    torch.save(DigitsNet().state_dict(), root / "other.pt")
    app = create_app(root / "digits", model=SPEC, weights=str(root / "other.pt"))
    with background(app) as url:
        yield {"url": url, "root": root}


def _fact(pg: Any, name: str) -> str:
    pg.wait_for_selector("dl.facts dt")
    return pg.evaluate(
        """(name) => [...document.querySelectorAll('dl.facts dt')]
            .find(dt => dt.textContent === name).nextElementSibling.textContent""",
        name,
    )


def test_home_says_the_model_is_not_the_runs_and_the_stored_pages_work(
    browser: Any, served: dict[str, Any]
) -> None:
    import json
    import urllib.request

    url, root = served["url"], served["root"]
    with urllib.request.urlopen(f"{url}api/runs/digits/model-check?wait=60", timeout=90) as r:
        reason = json.load(r)["live_reason"]
    assert "is not the one run" in reason and f"--weights {root / 'digits.pt'}" in reason
    with strict_page(browser) as pg:
        pg.goto(f"{url}#/r/digits")
        fact = _fact(pg, "live model")
        assert fact.startswith("none (lurker serve RUN --model SPEC --weights W)")
        assert reason in fact
        assert pg.locator(f"text={reason[:60]}").count() == 1  # said once on the page
        assert pg.locator("a.button", has_text="Live view").count() == 0
        shot = os.environ.get("LURKER_SHOTS")
        if shot:
            pg.screenshot(path=str(Path(shot) / "home-other-weights.png"), full_page=True)
        pg.goto(f"{url}#/r/digits/live")
        pg.wait_for_selector(".notice.error")
        assert reason in pg.inner_text(".notice.error")
        pg.goto(f"{url}#/r/digits/unit/features.0/0?tab=max")
        pg.wait_for_selector("img")
        pg.wait_for_function(
            "() => [...document.querySelectorAll('main img')].length > 0 && "
            "[...document.querySelectorAll('main img')].every(i => i.complete && i.naturalWidth > 0)"
        )
