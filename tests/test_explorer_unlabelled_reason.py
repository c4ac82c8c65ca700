"""A regression model's run (its items' labels are targets such as 2.5, not class indices)
is probed unlabelled: the explorer says why where it says a run has no classes, on Home
and in the unit page's class card, rather than a bare "unlabelled" that reads as if the
dataset had no labels. Oracle: the run's own ``labels_ignored`` meta, and a run of truly
unlabelled items (no reason) beside it."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from explorer_fixtures import skip_without_browser, strict_page

skip_without_browser()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import lurker
    from lurker.server import create_app
    from lurker.server.serve import background

    root = tmp_path_factory.mktemp("regression")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 1)).eval()
    x = torch.rand(12, 1, 8, 8)
    y = torch.rand(12) * 10 + 0.5  # regression targets with fractions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, ds in (
            ("reg", torch.utils.data.TensorDataset(x, y)),
            ("plain", torch.utils.data.TensorDataset(x)),
        ):
            lurker.probe(model, ds, out=root / name, layers=["1"], k=3, progress=False)
    with background(create_app(root)) as url:
        yield {"url": url, "root": root}


def _classes_fact(pg: Any) -> str:
    pg.wait_for_selector("dl.facts dt")
    return pg.evaluate(
        """() => [...document.querySelectorAll('dl.facts dt')]
            .find(dt => dt.textContent === 'classes').nextElementSibling.textContent"""
    )


def test_home_and_the_unit_page_say_why_a_run_has_no_classes(browser: Any, served: dict) -> None:
    from lurker.store import Run

    url = served["url"]
    with Run.open(served["root"] / "reg") as run:
        reason = run.meta["labels_ignored"]["reason"]

    with strict_page(browser) as pg:
        pg.goto(url + "#/r/reg")
        fact = _classes_fact(pg)
        assert reason.startswith("dataset item 0 has the label ")
        assert fact.startswith(f"unlabelled: {reason}") and "no class statistics" in fact
        pg.goto(url + "#/r/reg/unit/1/0?tab=max")
        pg.wait_for_selector("text=No class means")
        said = pg.locator("text=No class means").first.inner_text()
        assert reason in said and "unlabelled" in said
        pg.goto(url + "#/r/plain")
        assert _classes_fact(pg) == "unlabelled"
        pg.goto(url + "#/r/plain/unit/1/0?tab=max")
        pg.wait_for_selector("text=No class means")
        assert (
            pg.locator("text=No class means").first.inner_text()
            == "No class means (unlabelled data)."
        )
