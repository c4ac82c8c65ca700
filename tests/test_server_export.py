"""``lurker export``: the static site holds every file the static client will request,
each equal to what the API answers; ``static_segment`` matches the client's rule; and
``lurker serve`` prints its URL and serves."""

from __future__ import annotations

import io
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

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from explorer_fixtures import (  # noqa: F401
    FEATVIZ_LAYER,
    FEATVIZ_UNITS,
    ExplorerRun,
    assert_no_filters,
    canvas_pixels,
    explorer_run,
    forget_mean_peaks,
)
from lurker.cli import main
from lurker.server import create_app, export_site, static_path, static_segment
from lurker.store import Run
from lurker.store.files import claim_cache

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


def ranked_samples(path: Path) -> set[int]:
    """Every sample some unit ranks in a top-k list (max, mean, and relevance when the
    run has it), read back with the store (oracle)."""
    with Run.open(path) as run:
        lists = ("max", "mean", "relevance") if run.has_relevance else ("max", "mean")
        return {
            e.sample_id
            for info in run.layers
            for u in run.units(info.name)
            for which in lists
            for e in u.top(which)
        }


def test_every_json_equals_the_api(site: Path, explorer_run: ExplorerRun):  # noqa: F811
    c = TestClient(create_app(explorer_run.path, static_dir=site, live=False))
    with Run.open(explorer_run.path) as run:
        layers = [(i.name, i.num_units) for i in run.layers]
    for path in [p("runs"), p("runs", "digits"), p("runs", "digits", "graph")]:
        assert json.loads((site / (client_static_url(path) + ".json")).read_bytes()) == (
            c.get("/api" + path).json()
        ), path
    for name, n in layers:
        layer = p("runs", "digits", "layers", name)
        assert json.loads((site / (client_static_url(layer) + ".json")).read_bytes()) == (
            c.get("/api" + layer).json()
        )
        # the unit documents: in chunks found through the layer's index, each the API's
        index = json.loads((site / client_static_url(layer + "/units/index.json")).read_bytes())
        assert index["num_units"] == n and index["chunk"] >= 1
        for u in range(n):
            chunk_file = client_static_url(layer + f"/units/chunk-{u // index['chunk']}.json")
            chunk = json.loads((site / chunk_file).read_bytes())
            doc = chunk["units"][u - chunk["offset"]]
            api = c.get("/api" + layer + f"/units/{u}").json()
            assert doc == api, (name, u)
            top = api["top"]["max"][0]
            assert index["thumbs"][u] == {
                "sample": top["sample_id"],
                "box": top["box"],
                "crop": True,
            }
    # a page per top-k sample and no other; each equals the API's
    ranked = ranked_samples(explorer_run.path)
    pages = {int(f.stem) for f in (site / "data/runs/digits/samples").glob("*.json")}
    assert pages == ranked
    for sid in sorted(ranked)[:: max(1, len(ranked) // 12)]:
        path = p("runs", "digits", "samples", sid)
        assert json.loads((site / (client_static_url(path) + ".json")).read_bytes()) == (
            c.get("/api" + path).json()
        )
    listed = json.loads((site / "data/runs/digits/exported-samples.json").read_bytes())
    assert listed["total"] == c.get("/api/runs/digits").json()["dataset"]["size"]
    assert [s["id"] for s in listed["samples"]] == sorted(ranked)
    # as the served list sends it (the sample's brief, and what a tile without a picture
    # shows: null on a run of images)
    sid = sorted(ranked)[0]
    (first,) = c.get(f"/api/runs/digits/samples?offset={sid}&limit=1").json()["samples"]
    assert first["id"] == sid
    assert listed["samples"][0] == {**first, "image": True}
    assert listed["no_image"] is None  # every image there: no reason to give
    # no pages of the sample list, no live documents (they need a model)
    assert not list(site.glob("data/**/samples~3F*")) and not list(site.glob("data/**/live*"))


def test_images_once_per_sample_and_crops_cut_from_them(
    site: Path,
    explorer_run: ExplorerRun,  # noqa: F811
):
    from lurker.probe.images import crop

    c = TestClient(create_app(explorer_run.path))
    ranked = ranked_samples(explorer_run.path)
    images = {int(f.parent.name) for f in (site / "data/runs/digits/samples").glob("*/image.png")}
    assert images == ranked
    for sid in sorted(ranked)[:5]:
        api = p("runs", "digits", "samples", sid, "image.png")
        assert (site / client_static_url(api)).read_bytes() == c.get("/api" + api).content
    # no per-entry inputs or crops: the browser cuts them from the sample image, the mean
    # list's too (the run stores where each of its samples peaked)
    assert not list(site.glob("data/**/input.png"))
    assert not list(site.glob("data/**/crop.png"))
    # what the browser does (crop of the sample image by the unit document's box) is the
    # server's crop of the entry, for every entry of both lists of a layer
    with Run.open(explorer_run.path) as run:
        info = run.layers[2]
    units = site / f"data/runs/digits/layers/{info.name}/units"
    size = json.loads((units / "index.json").read_bytes())["chunk"]
    for unit in range(info.num_units):
        doc = c.get(f"/api/runs/digits/layers/{info.name}/units/{unit}").json()
        chunk = json.loads((units / f"chunk-{unit // size}.json").read_bytes())
        shown = chunk["images"][unit - chunk["offset"]]
        for which in ("max", "mean"):
            assert shown["crop"][which] == [e["rank"] for e in doc["top"][which]]
            for e in doc["top"][which]:
                path = site / f"data/runs/digits/samples/{e['sample_id']}/image.png"
                cut = np.asarray(crop(Image.open(path), tuple(e["box"])))
                served = c.get(
                    f"/api/runs/digits/layers/{info.name}/units/{unit}/{which}/{e['rank']}/crop.png"
                )
                assert served.status_code == 200
                assert np.array_equal(cut, np.asarray(Image.open(io.BytesIO(served.content))))


def test_file_count_is_bounded(site: Path, explorer_run: ExplorerRun):  # noqa: F811
    """samples in top-k (page + image each) + per layer (document, index, chunks) + the
    run list, summary, graph, sample list and explained.json (no explanation cached):
    nothing per unit or per top-k entry but a first layer's kernels."""
    ranked = ranked_samples(explorer_run.path)
    with Run.open(explorer_run.path) as run:
        layers = [(i.name, i.num_units) for i in run.layers]
    chunks = 0
    for name, n in layers:
        index = json.loads(
            (
                site / client_static_url(p("runs", "digits", "layers", name, "units", "index.json"))
            ).read_bytes()
        )
        chunks += -(-n // index["chunk"])
    files = [f for f in (site / "data").rglob("*") if f.is_file()]
    cached = [f for f in files if f.name in ("grad.png", "grad_crop.png", "crop.png")]
    featviz = [f for f in files if f.parent.parent.name == "featviz"]
    with Run.open(explorer_run.path) as run:
        made = sum(
            len(run.featviz(layer, o).units)
            for layer in run.featviz_layers()
            for o in ("channel", "neuron")
            if o in _objectives(run, layer)
        )
    assert made == len(FEATVIZ_UNITS) + 4  # channel; neuron: 2 units here, 2 in features.4
    assert len(featviz) == made  # one image per unit and objective made
    # a first layer's filters (the export has the run's model): the listing, its document
    # and grid, and a kernel per unit (the one thing per unit: what its page shows)
    drawn = json.loads((site / "data/runs/digits/filters.json").read_bytes())["layers"]
    filters = [f for f in files if f.name.startswith("filter")]
    assert len(filters) == 1 + sum(2 + n for name, n in layers if name in drawn)
    assert len(files) - len(cached) - len(featviz) - len(filters) == (
        2 * len(ranked) + 2 * len(layers) + chunks + 5
    )
    assert chunks < sum(n for _, n in layers) / 4


def test_feature_visualizations_exported(site: Path, explorer_run: ExplorerRun):  # noqa: F811
    """Each stored feature visualization at the API path the unit page reads, as stored."""
    with Run.open(explorer_run.path) as run:
        stored = run.featviz(FEATVIZ_LAYER)
        for unit in FEATVIZ_UNITS:
            path = p("runs", "digits", "layers", FEATVIZ_LAYER, "units", unit, "featviz")
            file = site / client_static_url(f"{path}/channel/0.png")
            assert file.read_bytes() == stored.png(unit)
        # every objective: the neuron images too, of a layer that has only those as well
        for layer in run.featviz_layers():
            for o in _objectives(run, layer):
                held = run.featviz(layer, o)
                for unit in held.units:
                    path = p("runs", "digits", "layers", layer, "units", unit, "featviz", o)
                    file = site / client_static_url(f"{path}/0.png")
                    assert file.read_bytes() == held.png(unit)


def _objectives(run: Run, layer: str) -> list[str]:
    """The objectives ``layer`` has stored images of (the API's view of the run)."""
    from lurker.store import MissingFromRunError

    found = []
    for o in ("channel", "neuron"):
        try:
            run.featviz(layer, o)
        except MissingFromRunError:
            continue
        found.append(o)
    return found


def test_cached_model_images_exported_and_listed(
    explorer_run: ExplorerRun,  # noqa: F811
    static_dir: Path,
    tmp_path: Path,
):
    """A gradient or a mean-list crop in the run's cache (made with the run's model, the
    cache stamped so: a run of an older lurker, which kept no peaks for the mean list) is
    exported at its API path and
    listed in the unit's chunk; a second export replaces the first."""
    run_dir = tmp_path / "digits"
    shutil.copytree(explorer_run.path, run_dir, ignore=shutil.ignore_patterns("cache"))
    forget_mean_peaks(run_dir)
    with Run.open(run_dir) as run:
        info = run.layers[1]
        fingerprint = run.meta.get("model_fingerprint")
    claim_cache(run_dir, fingerprint)  # made by the run's model, as `lurker images` stamps it
    grad = run_dir / "cache" / "grad" / info.name / "00003-mean-001.png"
    crop = run_dir / "cache" / "crop" / info.name / "00003-mean-002.png"
    for f, colour in ((grad, 7), (crop, 9)):
        f.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.new("L", (4, 4), colour).save(buf, "PNG")
        f.write_bytes(buf.getvalue())
    out = tmp_path / "site"
    (out / "data" / "runs" / "stale").mkdir(parents=True)
    (out / "data" / "runs" / "stale" / "graph.json").write_text("{}")
    (out / "index.html").write_text('<meta name="lurker-mode" content="static">')
    with pytest.warns(UserWarning, match="--no-images") as caught:
        export_site(run_dir, out, static_dir=static_dir, progress=False, make_images=False)
    assert not (out / "data" / "runs" / "stale").exists()  # an earlier export's data goes
    base = out / "data/runs/digits/layers" / info.name / "units"
    assert (base / "3/mean/1/grad.png").read_bytes() == grad.read_bytes()
    assert (base / "3/mean/2/crop.png").read_bytes() == crop.read_bytes()
    index = json.loads((base / "index.json").read_bytes())
    chunk = json.loads((base / f"chunk-{3 // index['chunk']}.json").read_bytes())
    shown = chunk["images"][3 - chunk["offset"]]
    assert shown["grad"] == {"mean": [1]} and shown["crop"] == {"mean": [2]}
    # without images made and none cached, the site holds no sample image and says so
    assert "input" not in shown and not list(out.glob("data/**/image.png"))
    listed = json.loads((out / "data/runs/digits/exported-samples.json").read_bytes())
    assert listed["samples"] and not any(s["image"] for s in listed["samples"])
    assert all(t is None for t in index["thumbs"])
    # ...and why: the export was told not to make them (the dataset loads: it is not the
    # reason the pages would give), said once as the export runs and in what the pages read
    n = len(listed["samples"])
    assert [str(w.message) for w in caught] == [
        f"run digits: {n} of its {n} top-k samples have no image, so the site shows them "
        f"without one: {listed['no_image']}"
    ]
    assert "--no-images" in listed["no_image"] and "lurker images RUN" in listed["no_image"]
    assert index["no_image"] == listed["no_image"]


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
    assert (tmp_path / "site" / "data" / "runs" / "run" / "exported-samples.json").is_file()
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


def test_cli_export_of_a_non_run_says_export(
    static_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The message shared with serve said "cannot serve NOT_A_RUN" to `lurker export`."""
    import lurker.server.app as app_module

    monkeypatch.setattr(app_module, "STATIC_DIR", static_dir)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.txt").write_text("x")
    for source, why in [("empty", "it is neither a lurker run"), ("a.txt", "it is a file")]:
        r = CliRunner().invoke(main, ["export", str(tmp_path / source), str(tmp_path / "site")])
        assert r.exit_code == 2, r.output
        assert f"cannot export {tmp_path / source}: {why}" in r.output, r.output
        assert "serve" not in r.output and "Traceback" not in r.output
    assert not (tmp_path / "site").exists()  # refused before anything was written


def test_cli_serve_refuses_a_folder_without_runs(tmp_path: Path):
    r = CliRunner().invoke(main, ["serve", str(tmp_path), "--no-browser"])
    assert r.exit_code == 2
    assert f"cannot serve {tmp_path}: it is neither a lurker run" in r.output
    assert "Traceback" not in r.output


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
    capsys: pytest.CaptureFixture[str],
):
    """A sample in more top lists than a page holds: the export writes each further page
    the sample page's "show more" asks for (pages of 7 here), equal to the API's; the
    progress line counts them, and no image it does not write, so it ends at its total."""
    import lurker.server.export as export

    monkeypatch.setattr(export, "APPEARANCES_PAGE", 7)
    site = export_site(
        explorer_run.path,
        tmp_path / "site",
        static_dir=static_dir,
        make_images=False,
        progress=True,
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]
    on_disk = sum(1 for f in site.rglob("*") if f.is_file())  # the front end's too
    assert last.endswith(f" items, {on_disk:,} files, done: {site}"), last
    c = TestClient(create_app(explorer_run.path, static_dir=site, live=False))
    counts: dict[int, int] = {}
    with Run.open(explorer_run.path) as run:
        for info in run.layers:
            for u in run.units(info.name):
                for which in run.top_lists:
                    top = u.top(which)
                    if u.mean == u.max and len({e.value for e in top}) == 1:
                        continue  # a never-firing unit's ties: left out of sample pages
                    for e in top:
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


def test_export_progress_total_is_known_before_writing(
    explorer_run: ExplorerRun,  # noqa: F811
    static_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    """Every progress line names the same total, counted before the first file is
    written (a total that grew as the export went read as a wrong estimate), and the last
    line reaches it: the total is the run's top-k samples and units (read from the run
    itself here), its explained samples (none), its filters (it records its model) and
    runs.json and the run's documents."""
    import lurker.server.export as export

    monkeypatch.setattr(export._Progress, "every", 0.0)  # a line per item
    site = export_site(explorer_run.path, tmp_path / "site", static_dir=static_dir)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("export: ")]
    counts = [re.match(r"export: ([\d,]+)/([\d,]+) items, ([\d,]+) files", x) for x in lines]
    assert all(counts), lines
    done = [int(m[1].replace(",", "")) for m in counts]
    totals = {int(m[2].replace(",", "")) for m in counts}
    with Run.open(explorer_run.path) as run:
        units = sum(info.num_units for info in run.layers)
        ranked = {e.sample_id for i in run.layers for u in run.units(i.name)
                  for w in run.top_lists for e in u.top(w)}  # fmt: skip
    # the filters, drawn from the run's recorded model: the listing, each filter layer,
    # each of its units' kernels (the oracle: the served listing and the run's layers)
    listing = TestClient(create_app(explorer_run.path)).get("/api/runs/digits/filters").json()
    with Run.open(explorer_run.path) as run:
        filters = 1 + sum(1 + run.layer(name).num_units for name in listing["layers"])
    assert listing["layers"] and filters > 2
    total = len(ranked) + units + filters + 2
    assert totals == {total}, (totals, lines[:3])
    assert done == sorted(done) and done[-1] == total
    assert len(lines) > units  # a line per item: the total was there from the first
    # the count is what the site holds: the front end's files and the manifest too (it
    # said only data/'s, 857 files of a site of 880)
    on_disk = sum(1 for f in site.rglob("*") if f.is_file())
    assert lines[-1].endswith(f", {on_disk:,} files, done: {site}")


def _tree(folder: Path) -> set[str]:
    return {f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file()}


def test_reexport_replaces_only_what_lurker_wrote(
    explorer_run: ExplorerRun,  # noqa: F811
    static_dir: Path,
    tmp_path: Path,
):
    """Exporting again into a site removes the earlier export's files (an old hashed
    bundle, the images of samples the run no longer shows) and keeps the files someone
    added. Oracle: a fresh export of the same run and front end into an empty folder."""
    new_static = tmp_path / "static2"
    shutil.copytree(static_dir, new_static)
    (new_static / "assets" / "index-abc123.js").rename(new_static / "assets" / "index-def456.js")
    out = tmp_path / "site"
    export_site(explorer_run.path, out, static_dir=static_dir, progress=False)
    assert list(out.glob("data/runs/*/samples/*/image.png"))  # the first one has images
    (out / "CNAME").write_text("lurker.example.org")  # added by hand (a site's host)
    (out / "assets" / "custom.css").write_text("body {}")
    # the run again, without its images (the cache gone): no image of the first export fits
    run_dir = tmp_path / "digits"
    shutil.copytree(explorer_run.path, run_dir, ignore=shutil.ignore_patterns("cache"))
    with pytest.warns(UserWarning, match="--no-images"):  # (the site says so too)
        export_site(run_dir, out, static_dir=new_static, progress=False, make_images=False)
        fresh = export_site(
            run_dir, tmp_path / "fresh", static_dir=new_static, progress=False, make_images=False
        )
    assert _tree(out) - {"CNAME", "assets/custom.css"} == _tree(fresh)
    assert not (out / "assets" / "index-abc123.js").exists()
    assert (out / "CNAME").read_text() == "lurker.example.org"
    assert (out / "assets" / "custom.css").read_text() == "body {}"
    listed = json.loads((out / ".lurker-export.json").read_text())["files"]
    assert set(listed) == _tree(fresh) - {".lurker-export.json"}


def test_reexport_of_an_export_made_before_the_manifest(
    explorer_run: ExplorerRun,  # noqa: F811
    static_dir: Path,
    tmp_path: Path,
):
    """A site exported by a lurker without the manifest (its index.html says so): what
    such an export wrote (its page, its front end's hashed bundles, data/runs.json and the
    documents and images under data/runs/) is replaced; anything a user put beside them,
    in assets/ and data/ too, is kept."""
    out = tmp_path / "site"
    (out / "assets").mkdir(parents=True)
    (out / "assets" / "index-0ldBndl3.js").write_text("old")
    (out / "assets" / "custom.css").write_text("body {}")
    (out / "data" / "runs" / "gone" / "samples" / "3").mkdir(parents=True)
    (out / "data" / "runs" / "gone" / "graph.json").write_text("{}")
    (out / "data" / "runs" / "gone" / "samples" / "3" / "image.png").write_bytes(b"png")
    (out / "data" / "notes.txt").write_text("mine too")
    (out / "index.html").write_text('<meta name="lurker-mode" content="static">')
    (out / "notes.md").write_text("mine")
    export_site(explorer_run.path, out, static_dir=static_dir, progress=False, make_images=False)
    assert not (out / "assets" / "index-0ldBndl3.js").exists()
    assert not (out / "data" / "runs" / "gone").exists()
    assert (out / "notes.md").read_text() == "mine"
    assert (out / "data" / "notes.txt").read_text() == "mine too"
    assert (out / "assets" / "custom.css").read_text() == "body {}"
    assert (out / ".lurker-export.json").is_file()


def test_export_never_overwrites_a_file_it_did_not_write(
    explorer_run: ExplorerRun,  # noqa: F811
    static_dir: Path,
    tmp_path: Path,
):
    """A file someone put where the export writes (here the front end's bundle) is not
    replaced: the export refuses, naming it, and the file is kept."""
    out = tmp_path / "site"
    export_site(explorer_run.path, out, static_dir=static_dir, progress=False, make_images=False)
    (out / ".lurker-export.json").write_text(json.dumps({"files": ["index.html"]}))
    with pytest.raises(Exception, match=r"assets/index-abc123\.js is there"):
        export_site(
            explorer_run.path, out, static_dir=static_dir, progress=False, make_images=False
        )
    assert (out / "assets" / "index-abc123.js").read_text() == "console.log(1)"


def test_gradient_crops_cut_in_the_browser_from_the_exported_gradients(
    browser: object,
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path: Path,
):
    """A teacher who made the default images (``lurker images RUN``: inputs and gradients)
    and exported gets the gradient crops too: the static unit page cuts each entry's
    gradient image by its box, equal pixel for pixel to the server's ``grad_crop.png``
    (made with the model: the oracle), and the export writes no grad_crop file. They were
    "not in this export" tiles although the site held everything they are cut from."""
    from explorer_fixtures import STATIC, static_server, strict_page
    from lurker.probe import UnitImages
    from lurker.probe.data import load_dataset

    if not (STATIC / "index.html").is_file():
        pytest.skip(f"the explorer's front end is not built ({STATIC}/index.html): run `make web`")
    run_dir = tmp_path / "digits"
    shutil.copytree(explorer_run.path, run_dir, ignore=shutil.ignore_patterns("cache"))
    layer = "features.4"
    with Run.open(run_dir) as run:
        unit = next(u.index for u in run.units(layer) if u.max > u.mean)
        images = UnitImages(run, explorer_run.model, load_dataset("digits:test", 16, channels=1))
        images.write_all(layers=[layer], kinds=["input", "grad"], progress=False)
    assert not (run_dir / "cache" / "grad_crop").exists()  # what `lurker images` makes
    site = export_site(run_dir, tmp_path / "site", progress=False)
    units = site / f"data/runs/digits/layers/{layer}/units"
    index = json.loads((units / "index.json").read_bytes())
    chunk = json.loads((units / f"chunk-{unit // index['chunk']}.json").read_bytes())
    shown = chunk["images"][unit - chunk["offset"]]
    assert shown["grad"]["max"] and shown["grad_crop"] == shown["grad"]
    assert not list(site.glob("data/**/grad_crop.png"))  # cut in the browser instead

    c = TestClient(create_app(run_dir, model_obj=explorer_run.model))
    with static_server(site) as url, strict_page(browser) as pg:
        for which in ("max", "mean"):
            pg.goto(f"{url}#/r/digits/unit/{layer}/{unit}?tab={which}&img=grad&crop=1")
            pg.wait_for_selector(".top-entry")
            assert pg.locator(".top-entry .no-img").count() == 0, "a tile says it is missing"
            shots = canvas_pixels(pg, ".top-entry canvas")
            assert len(shots) == len(shown["grad_crop"][which])
            for rank, cut in enumerate(shots):
                api = f"/api/runs/digits/layers/{layer}/units/{unit}/{which}/{rank}/grad_crop.png"
                served = c.get(api)
                assert served.status_code == 200, served.text
                want = np.asarray(Image.open(io.BytesIO(served.content)).convert("RGB"))
                assert np.array_equal(cut, want), (which, rank)


def test_entry_captions_name_their_class_whole_at_any_width(
    browser: object,
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path: Path,
):
    """Under each top-k image of the exported unit pages, the class is shown whole at any
    window width: where value, id and class do not fit a tile (a k=9 run at 1280 px), the
    class goes on a line of its own. Cut, "class 7" read "clas…", naming no class."""
    from explorer_fixtures import STATIC, static_server, strict_page

    if not (STATIC / "index.html").is_file():
        pytest.skip(f"the explorer's front end is not built ({STATIC}/index.html): run `make web`")
    site = export_site(explorer_run.path, tmp_path / "site", progress=False)
    with Run.open(explorer_run.path) as run:
        pages = [
            (info.name, next(u.index for u in run.units(info.name) if u.max > u.mean))
            for info in (run.layers[0], run.layers[-1])
        ]
    cut: list[str] = []
    with static_server(site) as url, strict_page(browser) as pg:
        for layer, unit in pages:
            pg.goto(f"{url}#/r/digits/unit/{layer}/{unit}?tab=max")
            pg.wait_for_selector(".top-entry .cls")
            for width in range(480, 1400, 23):
                pg.set_viewport_size({"width": width, "height": 900})
                cut += pg.eval_on_selector_all(
                    ".top-entry .cls",
                    f"""es => es.filter(e => e.scrollWidth > e.clientWidth
                        || e.getBoundingClientRect().right
                           > e.closest('figcaption').getBoundingClientRect().right + 0.5)
                        .map(e => '{layer} at {width} px: ' + e.textContent)""",
                )
    assert not cut, f"class captions cut: {cut[:5]}"


def test_exported_explain_heading_states_a_bound_as_a_bound(
    browser: object,
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path: Path,
):
    """The heatmaps' heading of an exported explanation gives the top class's probability
    as the pages show it: a bound (">99.9%") reads "p > 99.9%", not "p = >99.9%", an
    equality to a bound; other values stay "p = 42.0%". Oracle: the predictions the export
    holds, formatted by the pages' rule (the test's one-epoch model is never that sure, so
    one sample's recorded top probability is made a confident model's 0.9997)."""
    from explorer_fixtures import STATIC, shown_percent, static_server, strict_page

    if not (STATIC / "index.html").is_file():
        pytest.skip(f"the explorer's front end is not built ({STATIC}/index.html): run `make web`")
    run_dir = tmp_path / "digits"
    shutil.copytree(explorer_run.path, run_dir, ignore=shutil.ignore_patterns("cache"))
    res = CliRunner().invoke(
        main, ["images", str(run_dir), "--explanations", "2", "--methods", "saliency"]
    )
    assert res.exit_code == 0, res.output
    site = export_site(run_dir, tmp_path / "site", progress=False)
    held = json.loads((site / "data/runs/digits/explained.json").read_bytes())["samples"]
    images = [e["image"] for e in held]
    assert len(images) == 2
    files = {i: site / f"data/runs/digits/live/{i}.json" for i in images}
    sure = json.loads(files[images[0]].read_bytes())
    sure["predictions"][0]["prob"] = 0.9997
    files[images[0]].write_text(json.dumps(sure))
    probs = {i: json.loads(f.read_bytes())["predictions"][0]["prob"] for i, f in files.items()}
    shown = {i: shown_percent(p) for i, p in probs.items()}
    assert shown[images[0]] == ">99.9%" and shown[images[1]][0].isdigit(), shown
    with static_server(site) as url, strict_page(browser) as pg:
        for image, s in shown.items():
            pg.goto(f"{url}#/r/digits/explain?image={image}")
            heading = pg.locator("h2:has-text('Heatmaps') .sub")
            heading.wait_for()
            want = f"p {s[0]} {s[1:]}" if s[0] in "<>" else f"p = {s}"
            assert heading.inner_text().endswith(f"· {want}"), (image, heading.inner_text())


def _without_model_spec(run: Path, dest: Path) -> Path:
    """A copy of ``run`` at ``dest`` that records no model (its cache left out)."""
    from lurker.store import RunWriter, run_lock

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("cache"))
    with run_lock(dest):
        w = RunWriter.reopen(dest)
        try:
            config = w.meta_get("config")
            w.meta_set("config", {k: v for k, v in config.items() if k != "model_spec"})
        finally:
            w.close()
    return dest


def test_exported_pages_name_the_command_that_serves_the_run_with_its_model(
    browser: object,
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path: Path,
):
    """The exported Home, Live and Explain pages say how to get the model: for a run that
    records its model spec, `lurker serve RUN` alone (the oracle: the server, given no
    model, attaches it); they asked for `--model SPEC` and `--weights W`, which sent the
    reader hunting for a spec the run holds. A run that records none still gets them."""
    from explorer_fixtures import STATIC, static_server, strict_page

    if not (STATIC / "index.html").is_file():
        pytest.skip(f"the explorer's front end is not built ({STATIC}/index.html): run `make web`")
    served = TestClient(create_app(explorer_run.path, static_dir=STATIC))
    assert served.get("/api/runs/digits/model-check?wait=60").json()["state"] == "ok"
    assert served.get("/api/runs/digits").json()["holds"]["live"] is True
    bare = _without_model_spec(explorer_run.path, tmp_path / "runs" / "digits")
    shown: dict[str, list[str]] = {}
    for name, run in (("recorded", explorer_run.path), ("bare", bare)):
        site = export_site(run, tmp_path / name, progress=False, make_images=False)
        with static_server(site) as url, strict_page(browser) as pg:
            for page, sel in (
                ("", "text=live model"),
                ("/live", ".notice"),
                ("/explain", ".notice"),
            ):
                pg.goto(f"{url}#/r/digits{page}")
                pg.wait_for_selector(sel)
                text = pg.inner_text("main")
                shown.setdefault(name, []).append(
                    re.findall(r"lurker serve [\w.-]+(?: --model SPEC)?", text)[-1]
                )
    # RUN, the run's folder, on every page (the run's id is a name, not a path)
    assert shown["recorded"] == ["lurker serve RUN"] * 3
    assert shown["bare"] == ["lurker serve RUN --model SPEC"] * 3


def _pixels(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


def test_first_layer_filters_exported_as_served(site: Path, explorer_run: ExplorerRun):  # noqa: F811
    """With the run's recorded model the export writes the Filters endpoints' answers at
    the paths the static pages ask for: the listing and each filter layer's document equal
    the served JSON, its grid and each unit's kernel (at the unit page's `?scale=`, named
    by its query) decode to the served pixels, and those are the model's own weights scaled
    (oracle: round(128 + 127 w / max|w|), nearest-neighbour enlarged). Other layers hold
    none, and each layer's units index says which."""
    import math

    served = TestClient(create_app(explorer_run.path, static_dir=site))
    listing = served.get("/api/runs/digits/filters").json()
    assert listing["layers"], listing  # the digits CNN's first conv reads the image
    exported = site / (client_static_url(p("runs", "digits", "filters")) + ".json")
    assert json.loads(exported.read_bytes()) == listing
    params = dict(explorer_run.model.named_parameters())
    with Run.open(explorer_run.path) as run:
        names = [i.name for i in run.layers]
    for name in names:
        layer = p("runs", "digits", "layers", name)
        index = json.loads((site / client_static_url(layer + "/units/index.json")).read_bytes())
        assert index["filters"] is (name in listing["layers"]), name
        if name not in listing["layers"]:
            assert not list((site / client_static_url(layer)).rglob("filter*")), name
            continue
        doc = served.get(f"/api{layer}/filters").json()
        assert (
            json.loads((site / (client_static_url(layer + "/filters") + ".json")).read_bytes())
            == doc
        )
        grid = (site / client_static_url(layer + "/filters.png")).read_bytes()
        assert np.array_equal(
            _pixels(grid), _pixels(served.get(f"/api{layer}/filters.png").content)
        )
        w = params[doc["param"]].detach().double().numpy()
        kh, kw = w.shape[2:]
        scale = max(1, math.ceil(112 / max(kh, kw)))  # what web/src/filters.ts asks for
        for u in range(w.shape[0]):
            url = layer + f"/units/{u}/filter.png?scale={scale}"
            got = _pixels((site / client_static_url(url)).read_bytes())
            assert np.array_equal(got, _pixels(served.get("/api" + url).content)), (name, u)
            want = np.rint(128 + 127 * w[u, 0] / np.abs(w).max()).astype(np.uint8)
            assert np.array_equal(got, want.repeat(scale, 0).repeat(scale, 1)), (name, u)


def test_exported_pages_show_the_filters_only_with_the_model(
    browser: object,
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path: Path,
):
    """An export made with the run's recorded model shows the layer page's Filters grid
    (its picture loaded, a cell per unit) and the unit page's kernel as served; one of the
    same run recording no model writes no filter file and its pages show neither, no empty
    box and no request for a file the site lacks (strict pages: no console error, no 404)."""
    from explorer_fixtures import STATIC, static_server, strict_page

    if not (STATIC / "index.html").is_file():
        pytest.skip(f"the explorer's front end is not built ({STATIC}/index.html): run `make web`")
    served = TestClient(create_app(explorer_run.path, static_dir=STATIC))
    layer = served.get("/api/runs/digits/filters").json()["layers"][0]
    units = len(served.get(f"/api/runs/digits/layers/{layer}/filters").json()["units"])
    loaded = "(s) => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0; }"
    site = export_site(explorer_run.path, tmp_path / "recorded", progress=False, make_images=False)
    with static_server(site) as url, strict_page(browser) as pg:
        pg.goto(f"{url}#/r/digits/layer/{layer}")
        pg.wait_for_function(loaded, arg="#filters .filter-grid img")
        assert pg.locator("#filters a.filter-cell").count() == units
        pg.locator('#filters a.filter-cell[data-unit="1"]').click()  # (cells in the grid's order)
        pg.wait_for_url(f"**#/r/digits/unit/{layer}/1")
        pg.wait_for_function(loaded, arg="#unit-filter img")
        assert "mid-grey is 0" in pg.locator("#unit-filter").inner_text()
        pg.screenshot(path=str(tmp_path / "unit.png"))
    bare = _without_model_spec(explorer_run.path, tmp_path / "runs" / "digits")
    site = export_site(bare, tmp_path / "bare", progress=False, make_images=False)
    assert not list((site / "data").rglob("filter*"))
    with static_server(site) as url, strict_page(browser) as pg:
        assert_no_filters(pg, f"{url}#/r/digits", layer, 1)
