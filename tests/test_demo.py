"""`make demo`, the main job: trains, probes, then serves the explorer and prints its URL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

STATIC = Path(__file__).resolve().parents[1] / "src" / "lurker" / "server" / "static"


def test_demo_serves_the_explorer(tmp_path: Path) -> None:
    if not (STATIC / "index.html").exists():
        pytest.skip("the explorer's front end is not built: run `make web`")
    env = {**os.environ, "DISPLAY": "", "WAYLAND_DISPLAY": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lurker.demo", "--out", str(tmp_path / "out"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    url = None
    try:
        deadline = time.monotonic() + 300  # training, probing, the map, the images
        assert proc.stdout is not None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.fullmatch(r"(http://127\.0\.0\.1:\d+/)\n", line)
            url = m.group(1) if m else None
        assert url, "the demo printed no explorer URL:\n" + "".join(lines[-30:])
        with urllib.request.urlopen(url, timeout=30) as r:
            page = r.read().decode()
        assert r.status == 200 and "<script" in page and 'content="served"' in page
        # the model's check against the run's fingerprint ends (it runs in the background)
        with urllib.request.urlopen(url + "api/runs/run/model-check?wait=60", timeout=90) as r:
            assert json.load(r)["state"] == "ok"
        with urllib.request.urlopen(url + "api/runs/run", timeout=30) as r:
            summary = json.load(r)
        # the run records its model and data: the live page works with no --model
        assert summary["holds"]["live"] is True and summary["holds"]["graph"] is True
        assert summary["holds"]["map"] is True  # the Map page shows every digit
        assert summary["dataset"]["size"] == 1797 and summary["model"]["name"] == "DigitsNet"
        assert [layer["name"] for layer in summary["layers"]][:1] == ["features.0"]
        # every layer's images were made by the demo, not on first request
        assert summary["holds"]["cached_images"] > 5000
        with urllib.request.urlopen(url + "api/runs/run/samples/0", timeout=30) as r:
            sample = json.load(r)
        assert sample["prediction"] and len(sample["prediction"]) == 5
        assert summary["holds"]["featviz"], "README: the demo stores featviz in the run"
        _readme_tells_what_the_demo_wrote(tmp_path / "out", "".join(lines))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def _readme_tells_what_the_demo_wrote(out: Path, printed: str) -> None:
    """README.md's `make demo writes everything to demo-out/` paragraph names files the demo
    writes, and the run's cache holds what it and the demo's own line say: README and the
    demo said the cache held receptive-field crops, which `write_all` makes only when asked
    (the explorer cuts them from the sample images)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    paragraph = readme.split("`make demo` writes everything to `demo-out/`:")[1].split("\n\n")[0]
    named = re.findall(r"`([\w./-]+\.\w+|run/)`", paragraph)
    assert {"graph.svg", "graph-depth1.svg", "summary.txt", "trace.json", "run/"} <= set(named)
    assert all((out / name).exists() for name in named), [
        n for n in named if not (out / n).exists()
    ]
    cache = {p.name for p in (out / "run" / "cache").iterdir()}
    assert {"samples", "grad"} <= cache and not cache & {"crop", "grad_crop"}
    line = next(x for x in printed.splitlines() if "images of every layer's units" in x)
    assert (
        "cuts the receptive-field crops" in line and "cuts the receptive-field crops" in paragraph
    )
