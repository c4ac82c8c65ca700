"""An ImageFolder whose class folders are numbers (``1`` .. ``10``): class 1 is the folder
``10`` (folders sort as strings), so "class 10" could be read as the class at index 10.
Every page names a class the same way: its name, and its index too where the name is a
number other than its index ("class 10 (index 1)"). Oracle: the folder names, sorted as
ImageFolder sorts them, and each sample's file (its folder is its class).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from explorer_fixtures import skip_without_browser, strict_page

skip_without_browser()

FOLDERS = [str(i) for i in range(1, 11)]
CLASSES = sorted(FOLDERS)  # ImageFolder's order: "1", "10", "2", ..., "9"


def _expected(name: str) -> str:
    """What the pages call the class named ``name`` (from the folder list alone)."""
    index = CLASSES.index(name)
    return name if name == str(index) else f"{name} (index {index})"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from click.testing import CliRunner
    from PIL import Image

    from lurker.cli import main
    from lurker.examples import DigitsNet
    from lurker.server import create_app
    from lurker.server.serve import background

    root = tmp_path_factory.mktemp("numeric")
    rng = np.random.default_rng(0)
    for c in FOLDERS:
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            pixels = (rng.random((16, 16)) * 255).astype("uint8")
            Image.fromarray(pixels).save(root / "imgs" / c / f"{i}.png")
    torch.manual_seed(0)
    torch.save(DigitsNet().state_dict(), root / "w.pt")
    res = CliRunner().invoke(main, [
        "probe", "lurker.examples:DigitsNet", "-w", str(root / "w.pt"),
        "--data", str(root / "imgs"), "--image-size", "16", "--out", str(root / "runs" / "n"),
        "-l", "features.4", "-l", "classifier.3", "--device", "cpu", "-k", "6",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    with background(create_app(root / "runs")) as url:
        yield {"url": url, "run": root / "runs" / "n"}


def _folder_of(run: Path, sample: int) -> str:
    from lurker.store import Run

    with Run.open(run) as r:
        return Path(r.sample(sample).path).parent.name


def test_the_unit_page_names_numeric_classes_with_their_index(browser: Any, served: dict) -> None:
    """Top-k captions, the class chart and an output unit's class line."""
    with strict_page(browser) as pg:
        pg.goto(served["url"] + "#/r/n/unit/features.4/0?tab=max")
        pg.wait_for_selector(".topk .top-entry[data-sample] .cls")
        cards = pg.eval_on_selector_all(
            ".topk .top-entry[data-sample]",
            "els => els.map(e => [Number(e.dataset.sample), e.querySelector('.cls').textContent])",
        )
        assert cards
        for sample, caption in cards:
            assert caption == f"class {_expected(_folder_of(served['run'], sample))}", caption
        # whole: "class 10 (index 1)" cut to "class 1…" would name another class
        indexed = pg.eval_on_selector_all(
            ".top-entry .cls",
            "cs => cs.filter(c => c.textContent.includes('(index'))"
            ".map(c => c.scrollWidth <= c.clientWidth)",
        )
        assert indexed and all(indexed)
        texts = pg.eval_on_selector_all(
            "svg.bars-h text.label", "ts => ts.map(t => t.firstChild.textContent)"
        )
        named = [t for t in texts if re.fullmatch(r"\d+( \(index \d+\))?", t)]
        assert len(named) == 10  # the ten classes' bars, each named as the captions name it
        assert sorted(named) == sorted(_expected(c) for c in CLASSES), named
        pg.goto(served["url"] + "#/r/n/unit/classifier.3/1")
        pg.wait_for_selector("#output-class")
        assert "of class '10' (index 1)" in pg.inner_text("#output-class")


def test_live_and_explain_name_the_class_as_the_unit_page_does(browser: Any, served: dict) -> None:
    """The live top-5 and the Explain page (its target list, heading and concept line)."""
    with strict_page(browser) as pg:
        pg.goto(served["url"] + "#/r/n/live?image=sample-0")
        pg.wait_for_selector(".live-result .preds li .pname")
        names = pg.locator(".live-result .preds li .pname").all_inner_texts()
        assert len(names) == 5
        assert all(n == _expected(n.split()[0]) for n in names), names
        whole = "ns => ns.every(n => n.scrollWidth <= n.clientWidth)"
        assert pg.eval_on_selector_all(".live-result .preds .pname", whole)  # never "1 (ind…"
        pg.goto(served["url"] + "#/r/n/explain?image=sample-0")
        pg.wait_for_selector(".methods .explain-card")
        targets = pg.locator(".target-list .pname").all_inner_texts()
        assert targets == names
        assert pg.eval_on_selector_all(".target-list .pname", whole)
        heading = pg.locator("main h2").first.inner_text()
        assert f"for class {names[0]} (the top prediction)" in heading, heading
        pg.wait_for_selector(".concept")
        line = pg.locator(".concept-section > p").first.inner_text()
        assert f"for class {names[0]};" in line, line
