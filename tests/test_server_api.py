"""The explorer's read-only JSON and PNG API, checked against the run itself.

Oracle: lurker.store.Run read directly, numpy over its blobs, and the run's image cache
files; never the server's own helpers.
"""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from explorer_fixtures import (  # noqa: F401
    FEATVIZ_LAYER,
    FEATVIZ_NEURON_LAYER,
    FEATVIZ_NEURON_UNITS,
    FEATVIZ_UNITS,
    ExplorerRun,
    explorer_run,
    forget_mean_peaks,
)
from lurker.probe.data import input_image, load_dataset
from lurker.server import NotServableError, create_app
from lurker.store import SCHEMA_VERSION, Run


@pytest.fixture(scope="module")
def client(explorer_run: ExplorerRun, tmp_path_factory: pytest.TempPathFactory) -> TestClient:  # noqa: F811
    static = tmp_path_factory.mktemp("static")
    (static / "assets").mkdir()
    (static / "index.html").write_text("<!doctype html><html><head></head><body>hi</body></html>")
    (static / "assets" / "app-1234.js").write_text("console.log('x')")
    with TestClient(create_app(explorer_run.path, static_dir=static)) as c:
        yield c


@pytest.fixture(scope="module")
def run(explorer_run: ExplorerRun) -> Run:  # noqa: F811
    with Run.open(explorer_run.path) as r:
        yield r


def test_runs_list(client: TestClient, run: Run):
    body = client.get("/api/runs").json()
    assert body == {
        "runs": [
            {
                "id": "digits",
                "model": "DigitsNet",
                "spec": run.meta["config"]["model_spec"],
                "weights": run.meta["config"]["weights"],
                "dataset": run.meta["dataset"],
                "created": run.meta["created"],
                "status": "complete",
                "layers": len(run.layers),
                "units": sum(i.num_units for i in run.layers),
                "samples": 360,
                "map": False,
                "error": None,
            }
        ]
    }


def test_run_summary(client: TestClient, run: Run):
    # (the model's check against the run's fingerprint runs in the background: ended first)
    assert client.get("/api/runs/digits/model-check?wait=60").json()["state"] == "ok"
    r = client.get("/api/runs/digits")
    assert r.status_code == 200
    s = r.json()
    assert s["id"] == "digits"
    assert s["model"]["name"] == "DigitsNet"
    assert s["model"]["spec"] == "lurker.examples:DigitsNet"
    assert s["model"]["params"] == run.graph.num_params == 47626
    assert s["model"]["ops"] == run.graph.num_ops
    assert s["model"]["input_shape"] == [1, 16, 16]
    assert s["dataset"]["spec"] == "digits:test"
    assert s["dataset"]["size"] == 360
    assert s["dataset"]["classes"] == [str(d) for d in range(10)]
    assert s["dataset"]["skipped"] == [] and s["dataset"]["skipped_count"] == 0
    assert s["dataset"]["image_size"] == [16, 16]
    assert s["probe"]["k"] == 5 and s["probe"]["store_version"] == SCHEMA_VERSION
    assert s["probe"]["status"] == "complete"
    assert s["holds"]["graph"] is True
    assert s["holds"]["live"] is True  # the run records a loadable model
    assert s["missing"] == []
    assert [ly["name"] for ly in s["layers"]] == [i.name for i in run.layers]
    first = s["layers"][0]
    info = run.layers[0]
    assert first == {
        "name": info.name,
        "module": info.module,
        "op": info.op,
        "kind": info.kind,
        "num_units": info.num_units,
        "shape": list(info.shape),
        "op_index": info.op_index,
        "class_value": None,  # a hidden layer: its units are no classes
    }
    assert len(r.content) < 500_000


def test_layer(client: TestClient, run: Run):
    info = run.layers[1]
    body = client.get(f"/api/runs/digits/layers/{info.name}").json()
    assert body["layer"]["name"] == info.name
    assert body["rf"] == info.rf and body["layout"] == info.layout
    units = run.units(info.name, order_by="index")
    assert [u["unit"] for u in body["units"]] == list(range(info.num_units))
    for got, unit in zip(body["units"], units):
        assert got["mean"] == pytest.approx(unit.mean) and got["max"] == pytest.approx(unit.max)
        assert got["top_max"] == unit.top("max")[0].sample_id
        assert got["top_mean"] == unit.top("mean")[0].sample_id
    counts = np.sum([u.histogram()[0] for u in units], axis=0)
    edges = units[0].histogram()[1]
    assert body["histogram"]["counts"] == pytest.approx(counts.tolist())
    assert body["histogram"]["edges"] == pytest.approx(edges.tolist())


def test_unit(client: TestClient, run: Run):
    info = run.layers[0]
    last = info.num_units - 1
    for index, prev, nxt in ((0, None, 1), (3, 2, 4), (last, last - 1, None)):
        body = client.get(f"/api/runs/digits/layers/{info.name}/units/{index}").json()
        want = run.unit(info.name, index).to_dict()
        for key in ("unit", "mean", "max", "class_means", "histogram"):
            assert body[key] == want[key]
        assert body["layer"] == want["layer"]
        for which in ("max", "mean"):
            added = (
                "box",
                "frame",
                "frames",
                "tokens",
                "token_text",
                "features",
                "span",
            )  # what the API adds
            got = [{k: v for k, v in e.items() if k not in added} for e in body["top"][which]]
            assert got == want["top"][which]
            # images, not video clips: no frames
            assert all(e["frame"] is None and e["frames"] is None for e in body["top"][which])
            # images, not signals: no span (a signal's values are its own document)
            assert all(e["span"] is None and "signal" not in e for e in body["top"][which])
        assert body["clip_frames"] is None
        assert (body["prev"], body["next"], body["num_units"]) == (prev, nxt, info.num_units)
    # the peak's box is the receptive field of (y, x): 3x3 around it, clipped
    top = body["top"]["max"][0]
    y, x = top["y"], top["x"]
    assert top["box"] == [max(y - 1, 0), min(y + 2, 16), max(x - 1, 0), min(x + 2, 16)]


def test_samples_page(client: TestClient, run: Run):
    body = client.get("/api/runs/digits/samples?offset=350&limit=100").json()
    assert body["total"] == 360 and body["offset"] == 350
    ids = [s["id"] for s in body["samples"]]
    assert ids == list(range(350, 360))
    want = run.samples(ids)
    assert [(s["label"], s["class_name"], s["path"]) for s in body["samples"]] == [
        (w.label, w.class_name, w.path) for w in want
    ]


_LEFT: dict[int, dict[int, dict[str, int]]] = {}  # id(run) -> sample -> layer -> left out


def _brute_appearances(run: Run) -> dict[int, list[tuple]]:
    """Every unit's top lists read one unit at a time: sample id -> its entries in the
    order the API promises (layer order, rank, max list before mean before relevance, unit).
    Lists of ties of a unit that is the same everywhere (here: ReLUs that never fire, mean =
    max = 0) are left out, and so is a full list's tail of two or more zeros (a relevance
    of 0 of a unit that feeds a dead one), all counted in ``left``."""
    found: dict[int, list[tuple]] = {}
    for pos, info in enumerate(run.layers):
        for u in range(info.num_units):
            unit = run.unit(info.name, u)
            for which_pos, which in enumerate(run.top_lists):  # with "relevance": probed so
                top = unit.top(which)
                values = [e.value for e in top]
                tail = next(i for i, v in enumerate(values) if v == values[-1]) if top else 0
                k = run.meta["k"]
                full = len(top) == k and run.num_samples > k
                # zeros ending a full list, or a full list all of one value, are ties
                if len(top) - tail < 2 or not full or (values[-1] != 0 and tail != 0):
                    tail = len(top)
                if unit.mean == unit.max and len(set(values)) == 1:
                    tail = 0
                for e in top[tail:]:
                    left = _LEFT.setdefault(id(run), {}).setdefault(e.sample_id, {})
                    left[info.name] = left.get(info.name, 0) + 1
                for e in top[:tail]:
                    found.setdefault(e.sample_id, []).append(
                        ((pos, e.rank, which_pos, u), (info.name, u, which, e.rank, e.value))
                    )
    return {sid: [row for _, row in sorted(rows)] for sid, rows in found.items()}


def _rows(body: dict) -> list[tuple]:
    return [(a["layer"], a["unit"], a["list"], a["rank"], a["value"]) for a in body["appearances"]]


def test_sample_appearances(client: TestClient, run: Run):
    found = _brute_appearances(run)
    some = [*sorted(found, key=lambda s: -len(found[s]))[:3], min(found)]
    for sid in some:
        body = client.get(f"/api/runs/digits/samples/{sid}").json()
        want = found[sid]
        assert body["sample"]["id"] == sid
        assert body["sample"]["class_name"] == run.sample(sid).class_name
        assert body["total"] == len(want) and body["offset"] == 0 and body["limit"] == 200
        assert _rows(body) == [(*w[:4], pytest.approx(w[4])) for w in want[:200]]
        counts: dict[str, int] = {}
        for w in want:
            counts[w[0]] = counts.get(w[0], 0) + 1
        assert [(x["layer"], x["count"]) for x in body["layers"]] == list(counts.items())
        left = _LEFT[id(run)].get(sid, {})
        assert body["left_out"] == sum(left.values())
        assert [(x["layer"], x["count"]) for x in body["left_out_layers"]] == list(left.items())
        # a model is recorded in the run: the sample page carries its prediction
        assert body["prediction"] is not None and len(body["prediction"]) == 5
    assert _LEFT[id(run)].get(min(found))  # the run has dead units: the check means something
    unranked = next(i for i in range(360) if i not in found)
    body = client.get(f"/api/runs/digits/samples/{unranked}").json()
    assert (body["appearances"], body["total"], body["layers"]) == ([], 0, [])


def test_sample_appearances_are_paged(client: TestClient, run: Run):
    found = _brute_appearances(run)
    sid = max(found, key=lambda s: len(found[s]))
    want = found[sid]
    assert len(want) > 20  # several pages of 7
    pages = []
    for offset in range(0, len(want) + 7, 7):
        body = client.get(f"/api/runs/digits/samples/{sid}?offset={offset}&limit=7").json()
        assert (body["total"], body["offset"], body["limit"]) == (len(want), offset, 7)
        assert len(body["appearances"]) == max(0, min(7, len(want) - offset))
        pages += _rows(body)
    assert pages == [(*w[:4], pytest.approx(w[4])) for w in want]
    for bad in ("limit=0", "limit=2001", "offset=-1", "limit=x"):
        r = client.get(f"/api/runs/digits/samples/{sid}?{bad}")
        assert r.status_code == 422, bad
        assert ("limit" in r.json()["detail"]) or ("offset" in r.json()["detail"])
    # what was given, named with the parameter
    detail = client.get(f"/api/runs/digits/samples/{sid}?limit=x").json()["detail"]
    assert detail.startswith("invalid request: limit 'x': "), detail


def test_sample_image_from_dataset(client: TestClient, explorer_run: ExplorerRun):  # noqa: F811
    r = client.get("/api/runs/digits/samples/7/image.png")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    # revalidated (a run probed again names another image by this URL); unchanged: 304
    assert r.headers["cache-control"] == "no-cache"
    again = client.get(
        "/api/runs/digits/samples/7/image.png", headers={"If-None-Match": r.headers["etag"]}
    )
    assert again.status_code == 304
    got = np.asarray(Image.open(io.BytesIO(r.content)))
    want = np.asarray(input_image(load_dataset("digits:test", 16, channels=1), 7))
    assert np.array_equal(got, want)
    assert (explorer_run.path / "cache" / "samples" / "00000007.png").is_file()


def test_unit_images(client: TestClient, run: Run):
    info = run.layers[0]
    entry = run.unit(info.name, 2).top("max")[1]
    base = f"/api/runs/digits/layers/{info.name}/units/2/max/1"
    r = client.get(f"{base}/input.png")
    assert r.status_code == 200
    sample = client.get(f"/api/runs/digits/samples/{entry.sample_id}/image.png")
    assert r.content == sample.content
    crop = client.get(f"{base}/crop.png")
    assert crop.status_code == 200 and crop.headers["content-type"] == "image/png"
    grad = client.get(f"{base}/grad.png")  # made with the run's recorded model
    assert grad.status_code == 200
    assert Image.open(io.BytesIO(grad.content)).size == (16, 16)
    assert run.cache_path("grad", info.name, 2, 1, "max").is_file()


def test_not_found_bodies_list_what_exists(client: TestClient, run: Run):
    r = client.get("/api/runs/nope")
    assert r.status_code == 404 and r.json() == {"detail": "no run 'nope'; runs: digits"}
    r = client.get("/api/runs/digits/layers/nope")
    assert r.status_code == 404
    assert run.layers[0].name in r.json()["detail"] and "layers:" in r.json()["detail"]
    n = run.layers[0].num_units
    r = client.get(f"/api/runs/digits/layers/{run.layers[0].name}/units/{n}")
    assert r.status_code == 404 and f"0..{n - 1}" in r.json()["detail"]
    r = client.get("/api/runs/digits/samples/360")
    assert r.status_code == 404 and "360 samples" in r.json()["detail"]
    r = client.get(f"/api/runs/digits/layers/{run.layers[0].name}/units/0/max/5/input.png")
    assert r.status_code == 404 and "ranks 0..4" in r.json()["detail"]
    r = client.get("/api/runs/digits/layers/x/units/0/sideways/0/input.png")
    assert r.status_code == 422
    r = client.get("/api/nothing")
    assert r.status_code == 404 and "/docs" in r.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/runs/%2e%2e",
        "/api/runs/..%2f..%2f",
        "/api/runs/%2e%2e%2f%2e%2e%2fetc/layers/x",
        "/api/runs/digits/layers/..%2f..%2frun.db",
        "/api/runs/digits/layers/%2e%2e/units/0/max/0/input.png",
        "/..%2f..%2f..%2fetc%2fpasswd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/assets/..%2f..%2frun.db",
        "/assets/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    ],
)
def test_traversal_never_leaves_the_run(client: TestClient, path: str):
    r = client.get(path)
    assert r.status_code in (404, 422)
    assert b"root:" not in r.content and b"SQLite" not in r.content


def test_json_is_compressed(client: TestClient, explorer_run: ExplorerRun):  # noqa: F811
    """Large JSON documents travel gzip-compressed, and decode to the same document."""
    with Run.open(explorer_run.path) as run:
        layer = max(run.layers, key=lambda info: info.num_units).name
    r = client.get(f"/api/runs/digits/layers/{layer}", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers.get("content-encoding") == "gzip"
    assert len(r.json()["units"]) > 0
    plain = client.get(f"/api/runs/digits/layers/{layer}", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.json() == r.json()


def test_front_end(client: TestClient):
    r = client.get("/")
    assert r.status_code == 200 and "hi" in r.text
    assert r.headers["cache-control"] == "no-cache"
    r = client.get("/assets/app-1234.js")
    assert r.status_code == 200 and "immutable" in r.headers["cache-control"]
    assert client.get("/assets/nope.js").status_code == 404


def test_front_end_not_built(explorer_run: ExplorerRun, tmp_path: Path):  # noqa: F811
    c = TestClient(create_app(explorer_run.path, static_dir=tmp_path / "none"))
    r = c.get("/")
    assert r.status_code == 503 and "text/html" in r.headers["content-type"]
    assert "make" in r.text and "Traceback" not in r.text
    assert c.get("/api/runs").status_code == 200


def test_openapi_lists_every_endpoint(client: TestClient):
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    for p in (
        "/api/runs",
        "/api/runs/{run_id}",
        "/api/runs/{run_id}/layers/{layer}",
        "/api/runs/{run_id}/layers/{layer}/units/{unit}",
        "/api/runs/{run_id}/samples",
        "/api/runs/{run_id}/samples/{sample_id}",
        "/api/runs/{run_id}/samples/{sample_id}/image.png",
        "/api/runs/{run_id}/layers/{layer}/units/{unit}/{which}/{rank}/{kind}.png",
        "/api/runs/{run_id}/graph",
        "/api/runs/{run_id}/live/images",
        "/api/runs/{run_id}/live/{image}/ops/{op}/{side}/{channel}.png",
    ):
        assert p in paths
    for path, ops in spec["paths"].items():
        for op in ops.values():
            assert "200" in op["responses"], path


def test_folder_of_runs(explorer_run: ExplorerRun, tmp_path: Path):  # noqa: F811
    root = tmp_path / "runs"
    shutil.copytree(explorer_run.path, root / "a", ignore=shutil.ignore_patterns("cache"))
    (root / "broken").mkdir()
    (root / "broken" / "run.db").write_bytes(b"not a database at all" * 100)
    (root / "notes").mkdir()  # no run.db: not listed
    c = TestClient(create_app(root))
    runs = c.get("/api/runs").json()["runs"]
    assert [r["id"] for r in runs] == ["a", "broken"]
    assert runs[0]["error"] is None and runs[0]["units"] > 0
    assert runs[1]["error"] and "not a readable lurker run" in runs[1]["error"]
    assert c.get("/api/runs/a").status_code == 200
    r = c.get("/api/runs/broken")
    assert r.status_code == 409 and "cannot be read" in r.json()["detail"]


def test_refuses_a_folder_without_runs(tmp_path: Path):
    (tmp_path / "x").mkdir()
    with pytest.raises(NotServableError, match=r"neither a lurker run.*folder of runs"):
        create_app(tmp_path)
    with pytest.raises(NotServableError, match="does not exist"):
        create_app(tmp_path / "missing")


def test_version_2_run_reports_what_it_lacks(explorer_run: ExplorerRun, tmp_path: Path):  # noqa: F811
    old = tmp_path / "old"
    shutil.copytree(explorer_run.path, old, ignore=shutil.ignore_patterns("cache"))
    db = sqlite3.connect(old / "run.db")
    db.execute("DROP TABLE graph")
    db.execute("UPDATE layers SET op_index = NULL")
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    c = TestClient(create_app(old))
    s = c.get("/api/runs/old").json()
    assert s["missing"] == ["graph", "op_index"]
    assert s["holds"]["graph"] is False and s["model"]["params"] is None
    assert s["layers"][0]["op_index"] is None
    r = c.get("/api/runs/old/graph")
    assert r.status_code in (404, 501) and "graph" in r.json()["detail"]
    assert c.get(f"/api/runs/old/layers/{s['layers'][0]['name']}/units/0").status_code == 200


def test_without_model_or_dataset_cached_images_are_served(
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path: Path,
):
    """A run probed from Python (no model or data recorded): cached files are served,
    the rest is a 404 that says what to do."""
    bare = tmp_path / "bare"
    shutil.copytree(explorer_run.path, bare, ignore=shutil.ignore_patterns("cache"))
    db = sqlite3.connect(bare / "run.db")
    db.execute("UPDATE meta SET value = '{}' WHERE key = 'config'")
    db.commit()
    db.close()
    (bare / "cache" / "samples").mkdir(parents=True)
    _png_file(bare / "cache" / "samples" / "00000003.png")
    c = TestClient(create_app(bare))
    assert c.get("/api/runs/bare").json()["holds"]["live"] is False
    r = c.get("/api/runs/bare/samples/3/image.png")
    assert r.status_code == 200
    r = c.get("/api/runs/bare/samples/4/image.png")
    # `lurker images` cannot rebuild a dataset the run does not record: the fix is Python
    detail = r.json()["detail"]
    assert r.status_code == 404 and "lurker images" not in detail
    assert "UnitImages(run, model=model, dataset=dataset).write_all()" in detail
    holds = c.get("/api/runs/bare").json()["holds"]
    assert holds["dataset"] is False and "does not record its dataset" in holds["dataset_reason"]
    assert holds["cached_images"] == 1
    with Run.open(bare) as run:
        name = run.layers[0].name
    r = c.get(f"/api/runs/bare/layers/{name}/units/0/max/0/grad.png")
    assert r.status_code == 404 and "create_app(run, model_obj=model" in r.json()["detail"]
    # crop files are made only when asked for: the fix asks for them
    r = c.get(f"/api/runs/bare/layers/{name}/units/0/max/0/grad_crop.png")
    assert "write_all(kinds=['crop', 'grad_crop'])" in r.json()["detail"]
    r = c.get("/api/runs/bare/live/sample-1")
    assert r.status_code == 409 and "lurker serve RUN --model" in r.json()["detail"]


def test_a_moved_dataset_folder_is_said_before_any_image_fails(
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path: Path,
):
    """A run whose recorded image folder is gone (the run copied to another machine): the
    manifest says so at once, naming the folder, so the pages show that instead of a grid
    of images that all fail."""
    moved = tmp_path / "moved"
    shutil.copytree(explorer_run.path, moved, ignore=shutil.ignore_patterns("cache"))
    gone = tmp_path / "photos-moved-away"
    with sqlite3.connect(moved / "run.db") as db:
        (value,) = db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
        config = {**json.loads(value), "data": str(gone), "model_spec": None}
        db.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps(config),))
    c = TestClient(create_app(moved))
    holds = c.get("/api/runs/moved").json()["holds"]  # before any image was asked for
    assert holds["dataset"] is False and holds["cached_images"] == 0
    assert str(gone) in holds["dataset_reason"] and "does not exist" in holds["dataset_reason"]
    gone.mkdir()  # put back (empty here): the server no longer says it is missing
    assert TestClient(create_app(moved)).get("/api/runs/moved").json()["holds"]["dataset"]


def _png_file(path: Path) -> Path:
    Image.new("L", (16, 16), 128).save(path)
    return path


def test_graph_view(client: TestClient, run: Run):
    pytest.importorskip("lurker.graph.view")
    from lurker.graph.view import graph_view

    r = client.get("/api/runs/digits/graph")
    assert r.status_code == 200
    layers = {info.op: info.name for info in run.layers if info.op}
    assert r.json() == json.loads(json.dumps(graph_view(run.graph, layers=layers)))
    assert all(name in r.text for name in layers.values())


def test_graph_view_is_typed_in_openapi(client: TestClient):
    """/openapi.json documents the graph document with the view's own JSON Schema; the
    served document validates against what the spec says, and a broken one does not.
    (schemathesis 4.32's response check cannot read ``prefixItems`` with ``items: false``,
    so the check is jsonschema's 2020-12 validator, the dialect of OpenAPI 3.1.)"""
    import jsonschema

    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/api/runs/{run_id}/graph"]["get"]
    documented = op["responses"]["200"]["content"]["application/json"]["schema"]
    text = (Path(__file__).parents[1] / "src/lurker/schema/graph_view.schema.json").read_text()
    on_disk = json.loads(text)
    assert documented == {k: v for k, v in on_disk.items() if not k.startswith("$")}
    assert documented["required"] and documented["properties"]["nodes"]["items"]["properties"]
    doc = client.get("/api/runs/digits/graph").json()
    validator = jsonschema.Draft202012Validator(documented)
    validator.validate(doc)
    broken = {**doc, "nodes": [{**doc["nodes"][0], "i": "zero"}, *doc["nodes"][1:]]}
    assert not validator.is_valid(broken)


def test_feature_visualizations(client: TestClient, run: Run):
    """The unit document names its stored images and the values they reached (and the
    best dataset sample's, for comparison); the PNG endpoint serves them as stored."""
    stored = run.featviz(FEATVIZ_LAYER)
    assert set(c_holds(client)["featviz"]) == {FEATVIZ_LAYER, FEATVIZ_NEURON_LAYER}
    layer = client.get(f"/api/runs/digits/layers/{FEATVIZ_LAYER}").json()
    assert layer["featviz_units"] == FEATVIZ_UNITS == stored.units
    assert (
        client.get(f"/api/runs/digits/layers/{run.layers[0].name}").json()["featviz_units"] is None
    )
    for i, unit in enumerate(FEATVIZ_UNITS):
        doc = client.get(f"/api/runs/digits/layers/{FEATVIZ_LAYER}/units/{unit}").json()
        fv = doc["featviz"]
        both = ["channel", "neuron"] if unit in FEATVIZ_NEURON_UNITS else ["channel"]
        assert fv["objective"] == "channel" and fv["objectives"] == both
        assert fv["activations"] == pytest.approx(stored.activations[i].tolist())
        assert fv["settings"]["steps"] == 16
        best = run.unit(FEATVIZ_LAYER, unit).top("mean")[0]
        assert (fv["best_sample"], fv["best_dataset"]) == (
            best.sample_id,
            pytest.approx(best.value),
        )
        r = client.get(
            f"/api/runs/digits/layers/{FEATVIZ_LAYER}/units/{unit}/featviz/channel/0.png"
        )
        assert r.status_code == 200 and r.content == stored.png(unit)
        assert r.headers["content-type"] == "image/png"
    assert client.get(f"/api/runs/digits/layers/{FEATVIZ_LAYER}/units/3").json()["featviz"] is None
    r = client.get(f"/api/runs/digits/layers/{FEATVIZ_LAYER}/units/3/featviz/channel/0.png")
    assert r.status_code == 404 and "lurker featviz" in r.json()["detail"]
    r = client.get(f"/api/runs/digits/layers/{FEATVIZ_LAYER}/units/0/featviz/neuron/0.png")
    assert r.status_code == 404 and "'neuron'" in r.json()["detail"]


def test_every_objective_of_a_unit_and_the_layer_grids_fallback(client: TestClient, run: Run):
    """A unit with channel and neuron images lists both, each with its own values, settings
    and meaning, and serves each objective's PNG as stored; a unit or layer with neuron
    images only is listed under that objective (the grid's fallback)."""
    channel = run.featviz(FEATVIZ_LAYER, "channel")
    neuron = run.featviz(FEATVIZ_LAYER, "neuron")
    assert neuron.units == FEATVIZ_NEURON_UNITS
    layer = client.get(f"/api/runs/digits/layers/{FEATVIZ_LAYER}").json()
    assert layer["featviz_units"] == channel.units  # channel only, as before
    assert layer["featviz_objectives"] == {"channel": channel.units, "neuron": neuron.units}
    only = client.get(f"/api/runs/digits/layers/{FEATVIZ_NEURON_LAYER}").json()
    assert only["featviz_units"] is None
    assert only["featviz_objectives"] == {"neuron": run.featviz(FEATVIZ_NEURON_LAYER).units}
    assert run.featviz(FEATVIZ_NEURON_LAYER).objective == "neuron"
    for unit in FEATVIZ_NEURON_UNITS:
        fv = client.get(f"/api/runs/digits/layers/{FEATVIZ_LAYER}/units/{unit}").json()["featviz"]
        views = {v["objective"]: v for v in fv["views"]}
        held = {"channel": channel, "neuron": neuron}
        want = [o for o in ("channel", "neuron") if unit in held[o].units]
        assert fv["objectives"] == list(views) == want
        assert fv["objective"] == want[0]  # the top-level fields: channel where present
        for o, v in views.items():
            stored = held[o]
            i = stored.units.index(unit)
            assert v["activations"] == pytest.approx(stored.activations[i].tolist())
            assert v["settings"] == stored.unit_settings(unit)
            r = client.get(
                f"/api/runs/digits/layers/{FEATVIZ_LAYER}/units/{unit}/featviz/{o}/0.png"
            )
            assert r.status_code == 200 and r.content == stored.png(unit)
        pos = neuron.unit_settings(unit)["position"]
        assert (
            views["neuron"]["meaning"]
            == f"the unit at position (y, x) = ({pos[0]}, {pos[1]}) of its map"
        )
        assert views["neuron"]["best_sample"] is None  # a neuron's value has no dataset twin
        if "channel" in views:
            assert "mean over its map" in views["channel"]["meaning"]
            assert views["channel"]["best_sample"] is not None


def c_holds(client: TestClient) -> dict:
    return client.get("/api/runs/digits").json()["holds"]


def test_a_folder_of_runs_serves_runs_made_after_the_server_started(tmp_path: Path):
    import torch

    from lurker.examples import DigitsNet
    from lurker.probe import probe

    torch.manual_seed(0)
    data = load_dataset("digits:test", 16, channels=1)
    net = DigitsNet().eval()
    probe(net, data, out=tmp_path / "a", layers="features.4", progress=False).close()
    client = TestClient(create_app(tmp_path))
    assert [r["id"] for r in client.get("/api/runs").json()["runs"]] == ["a"]
    probe(net, data, out=tmp_path / "b", layers="features.4", progress=False).close()
    # opened directly by its link, and listed
    assert client.get("/api/runs/b").json()["id"] == "b"
    assert [r["id"] for r in client.get("/api/runs").json()["runs"]] == ["a", "b"]
    assert client.get("/api/runs/c").status_code == 404


def test_uncached_crops_say_how_to_make_them(explorer_run: ExplorerRun, tmp_path: Path):  # noqa: F811
    """Without a model, an uncached image names the command that makes it: crop files
    (an older run's mean-list crop, a gradient's crop) only when asked for, with `--kinds`.
    A run that stores its mean list's peaks has those crops made from the dataset alone."""

    copy = tmp_path / "digits"
    shutil.copytree(explorer_run.path, copy, ignore=shutil.ignore_patterns("cache"))
    with TestClient(create_app(copy, live=False)) as c, Run.open(copy) as run:
        r = c.get(f"/api/runs/digits/layers/{run.layers[1].name}/units/0/mean/0/crop.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    forget_mean_peaks(copy)  # as an older lurker wrote it: no peaks in the mean list
    shutil.rmtree(copy / "cache")
    with TestClient(create_app(copy, live=False)) as c, Run.open(copy) as run:
        base = f"/api/runs/digits/layers/{run.layers[1].name}/units/0"
        for path, asked in (
            ("mean/0/crop.png", True),
            ("max/0/grad_crop.png", True),
            ("max/0/grad.png", False),
        ):
            r = c.get(f"{base}/{path}")
            detail = r.json()["detail"]
            assert r.status_code == 404, detail
            want = "`lurker images RUN --kinds crop,grad_crop`" if asked else "`lurker images RUN`"
            assert want in detail, detail
