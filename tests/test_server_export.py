"""``lurker export``: the static site holds every file the static client will request,
each equal to what the API answers; ``static_segment`` matches the client's rule; and
``lurker serve`` prints its URL and serves."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from explorer_fixtures import ExplorerRun, explorer_run  # noqa: F401
from lurker.cli import main
from lurker.server import create_app, export_site, static_path, static_segment
from lurker.store import Run

ROOT = Path(__file__).resolve().parents[1]


def client_static_url(path: str) -> str:
    """The front end's rule (web/src/api.ts), written here independently: each
    URL-decoded segment's UTF-8 bytes outside [A-Za-z0-9._-] become ~XX."""
    out = []
    for seg in path.split("/")[1:]:
        raw = unquote(seg).encode("utf-8")
        out.append(
            "".join(
                chr(b) if re.fullmatch(rb"[A-Za-z0-9._-]", bytes([b])) else f"~{b:02X}" for b in raw
            )
        )
    return "data/" + "/".join(out)


def p(*segments: object) -> str:
    """The client's path builder: each segment URL-encoded (encodeURIComponent)."""
    return "".join("/" + quote(str(s), safe="-_.!~*'()") for s in segments)


@pytest.mark.parametrize(
    ("segment", "safe"),
    [
        ("features.0", "features.0"),
        ("linear_1:2", "linear_1~3A2"),
        ("a b", "a~20b"),
        ("é", "~C3~A9"),
        ("~", "~7E"),
        ("a/b", "a~2Fb"),
        ("samples?offset=0&limit=100", "samples~3Foffset~3D0~26limit~3D100"),
        ("..", ".."),
    ],
)
def test_static_segment(segment: str, safe: str):
    assert static_segment(segment) == safe
    assert "data/" + static_path(p("x", segment)) == client_static_url(p("x", segment))


@pytest.fixture(scope="module")
def static_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    static = tmp_path_factory.mktemp("static")
    (static / "assets").mkdir()
    (static / "index.html").write_text(
        '<!doctype html>\n<html><head><meta charset="utf-8"></head><body></body></html>\n'
    )
    (static / "assets" / "index-abc123.js").write_text("console.log(1)")
    (static / "favicon.svg").write_text("<svg/>")
    return static


@pytest.fixture(scope="module")
def site(
    explorer_run: ExplorerRun,  # noqa: F811
    static_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    out = tmp_path_factory.mktemp("export") / "site"
    return export_site(explorer_run.path, out, static_dir=static_dir, progress=False)


def test_front_end_in_static_mode(site: Path):
    html = (site / "index.html").read_text()
    assert '<meta name="lurker-mode" content="static">' in html
    assert (site / "assets" / "index-abc123.js").read_text() == "console.log(1)"
    assert (site / "favicon.svg").is_file()


def test_every_json_the_client_requests(site: Path, explorer_run: ExplorerRun):  # noqa: F811
    c = TestClient(create_app(explorer_run.path, static_dir=site, live=False))
    with Run.open(explorer_run.path) as run:
        layers = [(i.name, i.num_units) for i in run.layers]
    wanted = [p("runs"), p("runs", "digits")]
    for name, n in layers:
        wanted.append(p("runs", "digits", "layers", name))
        wanted += [p("runs", "digits", "layers", name, "units", u) for u in range(n)]
    wanted += [
        p("runs", "digits", "samples") + f"?offset={o}&limit=100" for o in range(0, 360, 100)
    ]
    wanted += [p("runs", "digits", "samples", i) for i in (0, 17, 359)]
    for path in wanted:
        file = site / (client_static_url(path) + ".json")
        assert file.is_file(), path
        api = c.get("/api" + path)
        assert api.status_code == 200
        assert json.loads(file.read_bytes()) == api.json(), path
    graph = c.get("/api/runs/digits/graph")
    assert (site / "data/runs/digits/graph.json").is_file() == (graph.status_code == 200)
    # no live documents: they need a model
    assert not list(site.glob("data/**/live*"))


def test_every_png_of_the_top_lists(site: Path, explorer_run: ExplorerRun):  # noqa: F811
    with Run.open(explorer_run.path) as run:
        info = run.layers[2]
        for unit in (0, info.num_units - 1):
            for which in ("max", "mean"):
                for e in run.unit(info.name, unit).top(which):
                    base = p("runs", "digits", "layers", info.name, "units", unit, which, e.rank)
                    inp = site / client_static_url(base + "/input.png")
                    sample = site / client_static_url(p("runs", "digits", "samples", e.sample_id))
                    assert inp.read_bytes() == Path(str(sample) + "/image.png").read_bytes()
                    crop = site / client_static_url(base + "/crop.png")
                    assert crop.is_file() == (which == "max")
    # every cached file is exported, at its API path
    c = TestClient(create_app(explorer_run.path))
    cached = sorted((explorer_run.path / "cache").rglob("*.png"))
    assert cached
    samples = [f for f in cached if f.parent.name == "samples"]
    for f in samples[:5]:
        api = p("runs", "digits", "samples", int(f.stem), "image.png")
        assert (site / client_static_url(api)).read_bytes() == c.get("/api" + api).content


def test_export_refuses_a_foreign_folder_and_unbuilt_assets(
    explorer_run: ExplorerRun,  # noqa: F811
    static_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    import lurker.server.app as app_module

    monkeypatch.setattr(app_module, "STATIC_DIR", static_dir)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    r = CliRunner().invoke(main, ["export", str(explorer_run.path), str(tmp_path / "mine")])
    assert r.exit_code == 2 and "not empty" in r.output
    with pytest.raises(Exception, match="not empty"):
        export_site(explorer_run.path, tmp_path / "mine", static_dir=static_dir)
    with pytest.raises(Exception, match="run `make`"):
        export_site(explorer_run.path, tmp_path / "new", static_dir=tmp_path / "nothing")


def test_cli_export(explorer_run: ExplorerRun, static_dir: Path, tmp_path: Path, monkeypatch):  # noqa: F811
    import lurker.server.app as app_module

    monkeypatch.setattr(app_module, "STATIC_DIR", static_dir)
    small = tmp_path / "run"
    shutil.copytree(explorer_run.path, small)
    r = CliRunner().invoke(main, ["export", str(small), str(tmp_path / "site"), "--no-images"])
    assert r.exit_code == 0, r.output
    assert "site:" in r.output
    assert (tmp_path / "site" / "data" / "runs.json").is_file()
    assert "export: " in r.output  # the progress line


def test_cli_serve_prints_url_and_serves(explorer_run: ExplorerRun):  # noqa: F811
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lurker.cli", "serve", str(explorer_run.path), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline().strip()  # type: ignore[union-attr]
        m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(line + "api/runs", timeout=5) as r:
                    status, body = r.status, json.loads(r.read())
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert status == 200 and body["runs"][0]["id"] == "digits"
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_serve_refuses_a_folder_without_runs(tmp_path: Path):
    r = CliRunner().invoke(main, ["serve", str(tmp_path), "--no-browser"])
    assert r.exit_code == 2
    assert "neither a lurker run" in r.output and "Traceback" not in r.output


def test_cli_serve_bad_model_fails_before_serving(explorer_run: ExplorerRun):  # noqa: F811
    r = CliRunner().invoke(
        main, ["serve", str(explorer_run.path), "--model", "nowhere:Nothing", "--no-browser"]
    )
    assert r.exit_code == 2
    assert "cannot load model 'nowhere:Nothing'" in r.output and "Traceback" not in r.output


def test_serve_helpers(monkeypatch: pytest.MonkeyPatch):
    from lurker.server import serve

    assert serve.url_of("0.0.0.0", 81) == "http://127.0.0.1:81/"
    assert serve.url_of("127.0.0.1", 8765) == "http://127.0.0.1:8765/"
    assert serve.url_of("::1", 9) == "http://[::1]:9/"
    monkeypatch.setattr(serve.sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not serve.has_display()
    monkeypatch.setenv("DISPLAY", ":0")
    assert serve.has_display()
    taken = serve.bind("127.0.0.1", 0)
    port = taken.getsockname()[1]
    taken.listen()
    try:
        with pytest.raises(Exception, match=f"port {port}"):
            serve.bind("127.0.0.1", port)
    finally:
        taken.close()


def test_export_writes_the_further_pages_of_a_sample(
    explorer_run: ExplorerRun,  # noqa: F811
    static_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    """A sample in more top lists than a page holds: the export writes each further page
    the sample page's "show more" asks for (pages of 7 here), equal to the API's."""
    import lurker.server.export as export

    monkeypatch.setattr(export, "APPEARANCES_PAGE", 7)
    site = export_site(
        explorer_run.path,
        tmp_path / "site",
        static_dir=static_dir,
        make_images=False,
        progress=False,
    )
    c = TestClient(create_app(explorer_run.path, static_dir=site, live=False))
    counts: dict[int, int] = {}
    with Run.open(explorer_run.path) as run:
        for info in run.layers:
            for u in run.units(info.name):
                for which in ("max", "mean"):
                    for e in u.top(which):
                        counts[e.sample_id] = counts.get(e.sample_id, 0) + 1
    sid = max(counts, key=lambda k: counts[k])
    base = p("runs", "digits", "samples", sid)
    assert counts[sid] > 14
    for offset in range(7, counts[sid], 7):
        path = f"{base}?offset={offset}&limit=7"
        file = site / (client_static_url(path) + ".json")
        assert file.is_file(), path
        assert json.loads(file.read_bytes()) == c.get("/api" + path).json()
    assert not (
        site / (client_static_url(f"{base}?offset={counts[sid]}&limit=7") + ".json")
    ).exists()
