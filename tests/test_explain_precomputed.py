"""Precomputed explanations: ``lurker images RUN --explanations`` keeps the Explain
endpoints' answers for dataset samples in the run's ``cache/`` (the run's own model only),
a fresh server answers from there without running the model, and ``lurker export`` writes
exactly those into the static site at the paths the static Explain page asks for."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

import lurker.explain as XP
from explorer_fixtures import ExplorerRun, explorer_run, without_weights  # noqa: F401
from lurker.cli import main
from lurker.server import create_app, export_site, static_segment

METHODS = ("saliency", "gradcam")
SAMPLES = (0, 1)
CONCEPT_LAYER = "features.9"  # the run's last probed spatial layer: concept relevance's
# default; Grad-CAM's is lurker.explain's own (its files are named without a layer)
CONCEPT_TOP = 8  # the units the Explain page ranks


def precomputed_copy(explorer_run: ExplorerRun, root: Path) -> Path:  # noqa: F811
    """A copy of the shared run (never written by tests) with SAMPLES explained by the CLI."""
    run = root / "digits"
    shutil.copytree(explorer_run.path, run, ignore=shutil.ignore_patterns("cache"))
    res = CliRunner().invoke(
        main,
        [
            "images", str(run), "--explanations", str(len(SAMPLES)),
            "--methods", ",".join([*METHODS, "concepts"]),
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"{len(SAMPLES) * (len(METHODS) + 1)} explanations made" in res.output
    return run


@pytest.fixture(scope="module")
def run(explorer_run: ExplorerRun, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    return precomputed_copy(explorer_run, tmp_path_factory.mktemp("precomputed"))


def counted(app: Any, run_id: str) -> list[int]:
    """Load the app's model for ``run_id`` (the run's own, from its recorded spec) and
    count its forward calls from now on."""
    from starlette.requests import Request

    from lurker.server.deps import entry, session

    request = Request({"type": "http", "app": app, "method": "GET", "headers": []})
    s = session(request, entry(request, run_id))
    assert not s.foreign_model
    calls = [0]
    s.model().register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def url(image: str, method: str, ext: str, overlay: str | None = None, **query: str) -> str:
    if overlay is not None:
        query["overlay"] = overlay
    q = "&".join(f"{k}={v}" for k, v in {"target": "top", **query}.items())
    return f"/api/runs/digits/live/{image}/explain/{method}.{ext}?{q}"


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_cache_holds_the_explanations_of_the_runs_model(
    run: Path,
    explorer_run: ExplorerRun,  # noqa: F811
) -> None:
    """Each cached heatmap equals lurker.explain's on the sample; the predictions kept
    beside them are the model's softmax."""
    from lurker.probe.data import load_dataset

    ds = load_dataset("digits:test", 16, channels=1)
    model = explorer_run.model
    folder = run / "cache" / "explain"
    assert sorted(p.name for p in folder.iterdir()) == [f"sample-{i}" for i in SAMPLES]
    for sid in SAMPLES:
        x = ds[sid][0][None]
        with torch.no_grad():
            probs = torch.softmax(model(x)[0], 0)
        live = json.loads((folder / f"sample-{sid}" / "live.json").read_text())
        assert [q["class"] for q in live["predictions"]] == probs.topk(5).indices.tolist()
        assert np.allclose(
            [q["prob"] for q in live["predictions"]], probs.topk(5).values, atol=1e-6
        )
        top = int(probs.argmax())
        for method, name, opts in (
            ("saliency", "saliency-top", {}),
            ("gradcam", "gradcam-top", {}),  # lurker.explain's default layer, as in Python
        ):
            heat = np.load(folder / f"sample-{sid}" / f"{name}.npy")
            want = XP.explain(model, x, target=top, method=method, **opts).heatmap(0)
            np.testing.assert_allclose(heat, want.numpy(), rtol=1e-5, atol=1e-7)
            doc = json.loads((folder / f"sample-{sid}" / f"{name}.json").read_text())
            assert doc["target"] == str(top)
        # concept relevance at the default layer: every unit's, and the top units' maps
        with np.load(folder / f"sample-{sid}" / f"concepts-top-{CONCEPT_LAYER}.npz") as z:
            relevance, units, heat = z["relevance"], z["units"], z["heat"]
        want = XP.concepts(model, x, top, layer=CONCEPT_LAYER, top=CONCEPT_TOP)
        np.testing.assert_allclose(relevance, want.relevance[0].double(), rtol=1e-5, atol=1e-7)
        assert sorted(units.tolist()) == sorted(want.units[0].tolist())
        for u, h in zip(units.tolist(), heat):
            i = want.units[0].tolist().index(u)
            np.testing.assert_allclose(h, want.heatmaps[0][i].sum(0), rtol=1e-5, atol=1e-7)


def test_a_fresh_server_answers_from_the_cache_without_the_model(
    run: Path,
    explorer_run: ExplorerRun,  # noqa: F811
) -> None:
    """Served from cache/: the same JSON and pixels as a server computing them (a foreign
    model object, which writes nothing into the run), and no forward call."""
    fresh = create_app(run)
    calls = counted(fresh, "digits")
    computing = create_app(run, model_obj=explorer_run.model)
    before = sorted(p.name for p in (run / "cache" / "explain").rglob("*"))
    with TestClient(fresh) as c, TestClient(computing) as other:
        for sid in SAMPLES:
            for method in METHODS:
                for overlay in ("0", "1"):
                    got = c.get(url(f"sample-{sid}", method, "png", overlay=overlay))
                    want = other.get(url(f"sample-{sid}", method, "png", overlay=overlay))
                    assert got.status_code == want.status_code == 200, got.text
                    assert np.array_equal(pixels(got.content), pixels(want.content))
                    assert got.headers["x-lurker-max"] == want.headers["x-lurker-max"]
                doc = c.get(url(f"sample-{sid}", method, "json")).json()
                ref = other.get(url(f"sample-{sid}", method, "json")).json()
                assert doc["cached"] is True and doc["seconds"] == 0.0
                for key in ("target", "target_class", "layer", "shape", "signed", "options"):
                    assert doc[key] == ref[key], key
                for key in ("min", "max", "sum"):
                    assert doc[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-9), key
        for sid in SAMPLES:  # the concept ranking and its maps, as the page asks them
            base = f"/api/runs/digits/live/sample-{sid}/explain/concepts"
            doc = c.get(f"{base}.json?target=top&top={CONCEPT_TOP}").json()
            ref = other.get(f"{base}.json?target=top&top={CONCEPT_TOP}").json()
            assert doc["cached"] is True and doc["layer"] == CONCEPT_LAYER
            assert [u["unit"] for u in doc["units"]] == [u["unit"] for u in ref["units"]]
            assert doc["total"] == pytest.approx(ref["total"], rel=1e-5)
            for u in doc["units"]:
                q = f"target=top&layer={CONCEPT_LAYER}&overlay=0"
                got, want = (
                    c.get(f"{base}/{u['unit']}.png?{q}"),
                    other.get(f"{base}/{u['unit']}.png?{q}"),
                )
                assert got.status_code == want.status_code == 200, got.text
                assert np.array_equal(pixels(got.content), pixels(want.content))
        assert calls[0] == 0
        # a foreign model's explanations stay out of the run's cache
        assert sorted(p.name for p in (run / "cache" / "explain").rglob("*")) == before
        # what is not cached (another class) runs the model, and is kept for next time
        r = c.get(url("sample-0", "saliency", "json").replace("target=top", "target=3"))
        assert r.status_code == 200 and r.json()["cached"] is False
        assert calls[0] > 0
        kept = run / "cache" / "explain" / "sample-0" / "saliency-3.json"
        assert kept.is_file()
    kept.unlink()
    kept.with_suffix(".npy").unlink()


def test_a_heatmap_cached_by_an_older_lurker_is_made_again(
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A cached heatmap without the current version (an older lurker's Grad-CAM was C
    times its map, and its min/max/sum said so) is not served: it is made again, equal
    to a fresh one, and the cache rewritten with the version."""
    from lurker.server.routes.explain import HEATMAP_VERSION

    run = tmp_path / "digits"
    shutil.copytree(explorer_run.path, run, ignore=shutil.ignore_patterns("cache"))
    app = create_app(run)
    with TestClient(app) as c:
        fresh = c.get(url("sample-0", "gradcam", "json")).json()
        meta = run / "cache" / "explain" / "sample-0" / "gradcam-top.json"
        doc = json.loads(meta.read_text())
        assert doc["version"] == HEATMAP_VERSION
        del doc["version"]  # as the older lurker wrote it, with a heatmap 3 times larger
        meta.write_text(json.dumps(doc))
        heat = meta.with_suffix(".npy")
        np.save(heat, 3 * np.load(heat))
    with TestClient(create_app(run)) as c:
        again = c.get(url("sample-0", "gradcam", "json")).json()
    assert again["cached"] is False
    for key in ("min", "max", "sum"):
        assert again[key] == pytest.approx(fresh[key], rel=1e-5, abs=1e-9), key
    assert json.loads(meta.read_text())["version"] == HEATMAP_VERSION


def test_export_writes_exactly_the_cached_explanations(
    run: Path,
    tmp_path: Path,
    explorer_run: ExplorerRun,  # noqa: F811
) -> None:
    """The site holds, per explained sample, its live document, input and each cached
    method's JSON and bare PNG at the static Explain page's paths (the API's answers, byte
    for byte for the PNGs), and explained.json lists them; nothing else under live/."""
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<html><head></head><body></body></html>")
    site = export_site(run, tmp_path / "site", static_dir=static, progress=False)
    data = site / "data" / "runs" / "digits"
    index = json.loads((data / "explained.json").read_text())
    assert index["target"] == "top"
    assert [(e["image"], e["methods"], e["concepts"]) for e in index["samples"]] == [
        (f"sample-{i}", list(METHODS), CONCEPT_LAYER) for i in SAMPLES
    ]
    expected = set()
    concepts = {}
    with TestClient(create_app(run)) as c:
        for sid in SAMPLES:
            ranking = c.get(
                f"/api/runs/digits/live/sample-{sid}/explain/concepts.json?target=top&top=8"
            )
            concepts[sid] = ranking.json()
    for sid in SAMPLES:
        image = f"sample-{sid}"
        expected |= {f"{image}.json", f"{image}/input.png"}
        for m in METHODS:
            expected.add(f"{image}/explain/" + static_segment(f"{m}.json?target=top") + ".json")
            expected.add(f"{image}/explain/" + static_segment(f"{m}.png?target=top&overlay=0"))
        expected.add(
            f"{image}/explain/" + static_segment(f"concepts.json?target=top&top={CONCEPT_TOP}")
            + ".json"
        )  # fmt: skip
        q = f"target=top&layer={CONCEPT_LAYER}&overlay=0"
        for u in concepts[sid]["units"]:
            expected.add(f"{image}/explain/concepts/" + static_segment(f"{u['unit']}.png?{q}"))
    live = data / "live"
    assert {str(p.relative_to(live)) for p in live.rglob("*") if p.is_file()} == expected
    for sid in SAMPLES:  # the ranking the page reads, as the server answers it
        path = static_segment(f"concepts.json?target=top&top={CONCEPT_TOP}") + ".json"
        assert json.loads((live / f"sample-{sid}" / "explain" / path).read_text()) == concepts[sid]
    with TestClient(create_app(run, model_obj=explorer_run.model)) as c:
        for sid in SAMPLES:
            image = f"sample-{sid}"
            assert json.loads((live / f"{image}.json").read_text()) == c.get(
                f"/api/runs/digits/live/{image}"
            ).json() | {"image": image}
            assert np.array_equal(
                pixels((live / image / "input.png").read_bytes()),
                pixels(c.get(f"/api/runs/digits/live/{image}/input.png").content),
            )
            for m in METHODS:
                png = live / image / "explain" / static_segment(f"{m}.png?target=top&overlay=0")
                served = c.get(url(image, m, "png", overlay="0")).content
                assert np.array_equal(pixels(png.read_bytes()), pixels(served))
                doc = json.loads(
                    (
                        live
                        / image
                        / "explain"
                        / (static_segment(f"{m}.json?target=top") + ".json")
                    ).read_text()
                )
                assert doc["max"] == pytest.approx(c.get(url(image, m, "json")).json()["max"])
    assert (data / "explain" / "methods.json").is_file()


def test_export_without_explanations_lists_none(
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path: Path,
) -> None:
    run = tmp_path / "digits"
    shutil.copytree(explorer_run.path, run, ignore=shutil.ignore_patterns("cache"))
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<html><head></head><body></body></html>")
    site = export_site(run, tmp_path / "site", static_dir=static, progress=False, make_images=False)
    data = site / "data" / "runs" / "digits"
    assert json.loads((data / "explained.json").read_text()) == {"target": "top", "samples": []}
    assert not (data / "live").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--explanations", "some"], "'top' or a number of samples"),
        (["--explanations", "0"], "'top' or a number of samples"),
        (["--explanations", "1", "--methods", "nope"], "unknown explanation method 'nope'"),
        (["--methods", "saliency"], "--methods goes with --explanations"),
        (["--explanations", "1", "--methods", ","], "names no method"),  # not 'concepts'
    ],
)
def test_bad_input(args: list[str], says: str, run: Path) -> None:
    res = CliRunner().invoke(main, ["images", str(run), *args])
    assert res.exit_code != 0
    assert says in res.output


def held_units(run: Path, sid: int) -> list[int]:
    """The units whose concept heatmaps the run's cache holds for the sample."""
    path = run / "cache" / "explain" / f"sample-{sid}" / f"concepts-top-{CONCEPT_LAYER}.npz"
    with np.load(path) as z:
        return [int(u) for u in z["units"]]


def test_a_server_that_cannot_load_the_model_serves_the_cache(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No model: the cached explanations, predictions and input answer byte for byte as a
    server with the run's model answers them, the ``explained`` index lists them, and what
    is not cached is a 409 saying why there is no model and how to attach one. With the
    model loadable, a cache hit loads no model."""
    import lurker.server.session as session_mod

    loads = [0]
    real = session_mod._load

    def counting(*a: Any) -> Any:
        loads[0] += 1
        return real(*a)

    monkeypatch.setattr(session_mod, "_load", counting)
    bare = without_weights(run, tmp_path)
    with TestClient(create_app(bare)) as c, TestClient(create_app(run)) as ref:
        holds = c.get("/api/runs/digits").json()["holds"]
        assert holds["live"] is False and "gone.pt" in holds["live_reason"]
        index = c.get("/api/runs/digits/explained").json()
        assert index == ref.get("/api/runs/digits/explained").json()
        assert [(e["image"], e["methods"]) for e in index["samples"]] == [
            (f"sample-{i}", list(METHODS)) for i in SAMPLES
        ]
        explanations = [
            url(f"sample-{sid}", method, *how)
            for sid in SAMPLES
            for method in METHODS
            for how in (("json",), ("png", "0"), ("png", "1"))
        ]
        q = f"target=top&layer={CONCEPT_LAYER}&overlay=0"
        for sid in SAMPLES:  # the concept ranking the page asks first, and each map held
            base = f"/api/runs/digits/live/sample-{sid}/explain/concepts"
            explanations.append(f"{base}.json?target=top&top={CONCEPT_TOP}")
            explanations += [f"{base}/{u}.png?{q}" for u in held_units(run, sid)]
        live = [
            f"/api/runs/digits/live/sample-{sid}{end}"
            for sid in SAMPLES
            for end in ("", "/input.png")
        ]
        for path in explanations + live:  # the live documents last: they load the model
            got = c.get(path)
            assert got.status_code == 200, (path, got.text)
            assert got.content == ref.get(path).content, path
            if path in explanations:
                assert loads[0] == 0  # the server with the model answered from the cache
        for e in index["samples"]:
            doc = c.get(f"/api/runs/digits/live/{e['image']}").json()
            assert doc["predictions"][0] == e["top"]
        # not cached: another class, an uncached sample, concept relevance
        for path in (
            url("sample-0", "saliency", "json").replace("target=top", "target=3"),
            url("sample-5", "saliency", "png"),
            "/api/runs/digits/live/sample-5",
            "/api/runs/digits/live/sample-0/explain/concepts.json?target=top&layer=features.4",
        ):
            r = c.get(path)
            assert r.status_code == 409, (path, r.text)
            assert "gone.pt" in r.json()["detail"] and "--weights" in r.json()["detail"]
        # a bad request says what is wrong with it, model or not
        r = c.get(url("sample-0", "nope", "json"))
        assert r.status_code == 404 and "unknown explanation method 'nope'" in r.text
        r = c.get(url("sample-0", "saliency", "json", layer="features.9"))
        assert r.status_code == 400 and "takes no layer" in r.text
        assert loads[0] == 1  # the live documents of the server with the model


def test_the_explained_index_lists_only_the_run_models_files(
    run: Path,
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A model object attached from Python is not the run's (its answers never go into
    cache/): the index lists nothing, even after it explained a sample. A sample whose
    live.json is damaged is left out, not a server error."""
    copy = tmp_path / "digits"
    shutil.copytree(run, copy)
    with TestClient(create_app(copy, model_obj=explorer_run.model)) as c:
        # a foreign model's answer is computed and held in memory, never listed as the run's
        assert c.get(url("sample-0", "saliency", "json")).json()["cached"] is False
        assert c.get("/api/runs/digits/explained").json() == {"target": "top", "samples": []}
    (copy / "cache" / "explain" / "sample-0" / "live.json").write_text("{not json")
    kept = copy / "cache" / "explain" / "sample-1" / f"concepts-top-{CONCEPT_LAYER}.npz"
    kept.unlink()
    with TestClient(create_app(copy)) as c:
        r = c.get("/api/runs/digits/explained")
        assert r.status_code == 200, r.text
        assert [(e["image"], e["concepts"]) for e in r.json()["samples"]] == [("sample-1", None)]
        # one unit's map asked alone: kept, but not the ranking's maps the page shows
        base = "/api/runs/digits/live/sample-1/explain/concepts"
        assert c.get(f"{base}/0.png?target=top").status_code == 200
        assert 0 in held_units(copy, 1) and len(held_units(copy, 1)) < CONCEPT_TOP
        assert c.get("/api/runs/digits/explained").json()["samples"][0]["concepts"] is None
        assert c.get(f"{base}.json?target=top&top={CONCEPT_TOP}").status_code == 200
        assert len(held_units(copy, 1)) >= CONCEPT_TOP
        assert c.get("/api/runs/digits/explained").json()["samples"][0]["concepts"] == (
            CONCEPT_LAYER
        )


def test_grad_cam_precomputed_at_an_older_default_layer_is_still_served(
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Before Grad-CAM's default became lurker.explain's own, ``lurker images
    --explanations`` stored it at the last probed spatial layer, under a name with that
    layer. A server without the model (and the explained index, and an export) still
    answers the default from that file, naming the layer it was made at; precomputing
    with the model makes today's default beside it."""
    run = tmp_path / "made" / "digits"
    shutil.copytree(explorer_run.path, run, ignore=shutil.ignore_patterns("cache"))
    res = CliRunner().invoke(  # the sample's live files, which the explained index reads
        main, ["images", str(run), "--explanations", "1", "--methods", "saliency"]
    )
    assert res.exit_code == 0, res.output
    with TestClient(create_app(run)) as c:  # an older lurker's file: its layer named
        old = c.get(url("sample-0", "gradcam", "json", layer=CONCEPT_LAYER)).json()
        today = c.get(url("sample-0", "gradcam", "json")).json()
    assert old["layer"] == CONCEPT_LAYER != today["layer"]
    folder = run / "cache" / "explain" / "sample-0"
    for ext in (".json", ".npy"):  # only the older lurker's file stays
        (folder / "gradcam-top").with_suffix(ext).unlink()
    assert (folder / f"gradcam-top-{CONCEPT_LAYER}.json").is_file()
    bare = without_weights(run, tmp_path)
    with TestClient(create_app(bare)) as c:
        got = c.get(url("sample-0", "gradcam", "json"))
        assert got.status_code == 200, got.text
        assert got.json()["layer"] == CONCEPT_LAYER and got.json()["cached"] is True
        assert got.json()["max"] == pytest.approx(old["max"], rel=1e-6)
        index = c.get("/api/runs/digits/explained").json()
        assert [e["methods"] for e in index["samples"]] == [["saliency", "gradcam"]]
    res = CliRunner().invoke(
        main, ["images", str(run), "--explanations", "1", "--methods", "gradcam"]
    )
    assert res.exit_code == 0, res.output
    assert "1 explanations made" in res.output  # today's default, not the older file
    assert (folder / "gradcam-top.json").is_file()


class BrightCumsum(torch.nn.Module):
    """Sums its maps along the width (an op LRP has no rule for) only on bright inputs:
    the zeros the method check traces take the ruled path, so concept relevance is
    refused only once it meets a real sample."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        if x.mean().item() > 0.5:
            h = torch.cumsum(h, -1)
        return self.fc(h.mean((2, 3)))


def bright_model() -> BrightCumsum:
    torch.manual_seed(0)
    return BrightCumsum().eval()


def bright_data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 8, 8, generator=g) + 0.5
    return torch.utils.data.TensorDataset(x, torch.tensor([0, 1, 0, 1]))


def test_a_sample_concept_relevance_fails_on_is_not_half_explained(tmp_path: Path) -> None:
    """``--methods saliency,concepts`` on a model whose sample 0 meets an op LRP has no
    rule for: the concept ranking was made after sample 0's live.json, input.png and
    saliency were written, so the failed command left it half explained (the Explain
    page showed its saliency, no concepts). Now nothing of it is written, and the command
    without concepts explains it. Oracle: lurker.explain's saliency."""
    from lurker.probe import probe
    from lurker.server.explained import explained_samples

    model = bright_model()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    meta = {
        "model_spec": f"{__name__}:bright_model",
        "weights": str(tmp_path / "w.pt"),
        "data": f"{__name__}:bright_data",
    }
    run = tmp_path / "r"
    probe(model, bright_data(), out=run, k=2, batch_size=2, progress=False, meta=meta).close()
    args = ["images", str(run), "--explanations", "2", "--methods"]
    res = CliRunner().invoke(main, [*args, "saliency,concepts"])
    assert res.exit_code != 0
    said = " ".join(res.output.split())
    assert said.startswith("error: sample 0: concept relevance is LRP"), said
    assert "no rule for cumsum_1" in said and "Traceback" not in res.output
    explained = run / "cache" / "explain"
    assert not explained.exists() or not [p for p in explained.rglob("*") if p.is_file()]
    assert explained_samples(run, _fingerprint(run)) == []
    res = CliRunner().invoke(main, [*args, "saliency"])
    assert res.exit_code == 0, res.output
    assert explained_samples(run, _fingerprint(run)) == ["sample-0", "sample-1"]
    want = XP.explain(model, bright_data().tensors[0][:2], method="saliency")
    for i in range(2):
        got = np.load(explained / f"sample-{i}" / "saliency-top.npy")
        np.testing.assert_allclose(got, want.heatmap(i).numpy(), rtol=1e-5, atol=1e-7)


def _fingerprint(run_dir: Path) -> str | None:
    """The model fingerprint the run records (its explanation cache is trusted under it)."""
    from lurker.store import Run

    with Run.open(run_dir) as run:
        return run.meta.get("model_fingerprint")
