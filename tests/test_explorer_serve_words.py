"""Plain words on the explorer's first pages, in a real browser (Debian's chromium via
Playwright) over the shared digits run:

- a static export of a run that records its model names `lurker serve RUN` wherever it
  says what runs the model, never `--model SPEC`: the run holds the spec, so the reader
  has none to hunt for (the server loads the recorded model);
- the unit page's top-k captions put the class on the same line of every tile, at any
  window width: it wrapped under "0.0245 #1577" but sat beside "0 #5".
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from explorer_fixtures import (  # noqa: F401
    STATIC,
    ExplorerRun,
    explorer_run,
    skip_without_browser,
    static_server,
    strict_page,
)

skip_without_browser()


def test_static_export_names_the_serve_command_the_run_needs(
    browser: Any,
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Oracle: the run's recorded spec (the fixture probes with ``model_spec``), so the
    command that serves it with its model is plain ``lurker serve RUN``."""
    import json

    from lurker.cli import main
    from lurker.server import export_site

    if not (STATIC / "index.html").is_file():
        pytest.skip(f"the explorer's front end is not built ({STATIC}/index.html): run `make web`")
    run_dir = tmp_path / "digits"
    shutil.copytree(explorer_run.path, run_dir, ignore=shutil.ignore_patterns("cache"))
    res = CliRunner().invoke(
        main, ["images", str(run_dir), "--explanations", "1", "--methods", "saliency"]
    )
    assert res.exit_code == 0, res.output
    site = export_site(run_dir, tmp_path / "site", progress=False)
    summary = json.loads((site / "data/runs/digits.json").read_bytes())
    assert summary["model"]["spec"] == "lurker.examples:DigitsNet"
    held = json.loads((site / "data/runs/digits/explained.json").read_bytes())["samples"][0]
    pages = {
        "explain": f"explain?image={held['image']}",
        "explain, another class": f"explain?image={held['image']}&target=3",
        "explain, a sample not held": "explain?image=sample-1000",
        "live": "live",
        "sample": f"sample/{held['sample']}",
        "home": "",
    }
    said: dict[str, str] = {}
    with static_server(site) as url, strict_page(browser, 1280, 800) as pg:
        for name, page in pages.items():
            pg.goto(f"{url}#/r/digits/{page}".rstrip("/"))
            pg.wait_for_selector("main h1, main .notice")
            pg.wait_for_timeout(500)
            said[name] = pg.inner_text("body")
    wrong = {n: t for n, t in said.items() if "--model" in t or "SPEC" in t}
    assert not wrong, {n: [ln for ln in t.splitlines() if "SPEC" in ln] for n, t in wrong.items()}
    # and each page that needs the model says how to serve it
    for name in ["explain", "explain, another class", "explain, a sample not held", "live"]:
        assert "lurker serve RUN" in said[name], name
    assert "lurker serve RUN" in said["home"]


def test_unit_captions_put_the_class_on_one_line_for_every_tile(
    browser: Any,
    explorer_run: ExplorerRun,  # noqa: F811
) -> None:
    """At every width from 480 to 1400 px, every tile of each tab's top-k row has its
    class at the same height under its image, below the value and sample id."""
    from lurker.server import create_app
    from lurker.server.serve import background
    from lurker.store import Run

    with Run.open(explorer_run.path) as run:
        last = run.layers[-1].name
        unit = next(u.index for u in run.units(last) if u.max > u.mean)
    mixed: list[str] = []
    with (
        background(create_app(explorer_run.path)) as url,
        strict_page(browser, 1280, 800) as pg,
    ):
        for tab in ["relevance", "max", "mean"]:
            pg.goto(f"{url}#/r/digits/unit/{last}/{unit}?tab={tab}")
            pg.wait_for_selector(".top-entry figcaption .cls")
            for width in range(480, 1400, 23):
                pg.set_viewport_size({"width": width, "height": 800})
                rows = pg.eval_on_selector_all(
                    ".top-entry figcaption",
                    """fs => fs.map(f => {
                        const top = f.getBoundingClientRect().top;
                        const c = f.querySelector('.cls').getBoundingClientRect().top - top;
                        const v = f.querySelector('.value').getBoundingClientRect().top - top;
                        return [Math.round(c), Math.round(v)];
                    })""",
                )
                if len({c for c, _ in rows}) != 1 or any(c <= v for c, v in rows):
                    mixed.append(f"{tab} at {width} px: {rows}")
    assert not mixed, mixed[:4]
