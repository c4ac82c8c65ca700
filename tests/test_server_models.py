"""Which model each served run gets, and what a model may write into a run's cache/.

Oracle: the runs' recorded configs (set here in run.db), the files on disk under each
run's cache/ (listed before and after), and the models run directly in the test.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from explorer_fixtures import ExplorerRun, explorer_run, forget_mean_peaks  # noqa: F401
from lurker.examples import DigitsNet
from lurker.probe.data import load_dataset
from lurker.probe.sweep import fingerprint
from lurker.server import create_app

GRAD = "/api/runs/{run}/layers/features.4/units/1/max/0/grad.png"
MEAN_CROP = "/api/runs/{run}/layers/features.4/units/2/mean/1/crop.png"


def _files(run: Path) -> set[str]:
    cache = run / "cache"
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()}


def _set_config(run: Path, **changes: object) -> None:
    with sqlite3.connect(run / "run.db") as conn:
        (value,) = conn.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
        config = json.loads(value)
        config.update(changes)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps(config),))


def _set_meta(run: Path, **changes: object) -> None:
    with sqlite3.connect(run / "run.db") as conn:
        for key, value in changes.items():
            conn.execute("UPDATE meta SET value = ? WHERE key = ?", (json.dumps(value), key))


def _copy(explorer_run: ExplorerRun, dest: Path) -> Path:  # noqa: F811
    shutil.copytree(explorer_run.path, dest, ignore=shutil.ignore_patterns("cache"))
    return dest


@pytest.fixture
def other_weights(tmp_path: Path) -> Path:
    torch.manual_seed(7)
    path = tmp_path / "other.pt"
    torch.save(DigitsNet().state_dict(), path)
    return path


def _top(model: torch.nn.Module, i: int) -> list[int]:
    x = load_dataset("digits:test", 16, channels=1)[i][0][None]
    with torch.no_grad():
        return torch.softmax(model.eval()(x)[0], 0).topk(5).indices.tolist()


def test_folder_model_attaches_only_to_matching_runs(
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path: Path,
    other_weights: Path,
):
    root = tmp_path / "runs"
    same = _copy(explorer_run, root / "same")
    other = _copy(explorer_run, root / "other")  # records other weights
    bare = _copy(explorer_run, root / "bare")  # records no model
    _set_config(other, weights=str(other_weights))
    _set_config(bare, model_spec=None, weights=None)
    theirs = DigitsNet()
    theirs.load_state_dict(torch.load(other_weights))
    _set_meta(other, model_fingerprint=fingerprint(theirs))  # as if probed with them
    app = create_app(root, model="lurker.examples:DigitsNet", weights=str(explorer_run.weights))
    with TestClient(app) as c:
        got = c.get("/api/runs/same/live/sample-4").json()["predictions"]
        assert [p["class"] for p in got] == _top(explorer_run.model, 4)
        # "other" keeps its own recorded model (the other weights), not the one given
        got = c.get("/api/runs/other/live/sample-4").json()["predictions"]
        assert [p["class"] for p in got] == _top(theirs, 4)
        probs = [p["prob"] for p in got]
        x = load_dataset("digits:test", 16, channels=1)[4][0][None]
        with torch.no_grad():
            want = torch.softmax(theirs(x)[0], 0).topk(5).values.tolist()
        assert probs == pytest.approx(want, abs=1e-5)
        # "bare" records no model: it has none
        assert c.get("/api/runs/bare/live/sample-4").status_code == 409
        # the runs page tells the three copies apart by what each records
        listed = {r["id"]: r for r in c.get("/api/runs").json()["runs"]}
        assert listed["other"]["weights"] == str(other_weights)
        assert listed["same"]["weights"] == str(explorer_run.weights)
        assert listed["same"]["spec"] == listed["other"]["spec"] is not None
        assert listed["bare"]["spec"] is None and listed["bare"]["weights"] is None
        assert c.get("/api/runs/bare").json()["holds"]["live"] is False
        # the run's own model writes its cache; another run's is made by its own model
        assert c.get(GRAD.format(run="same")).status_code == 200
        assert [f for f in _files(same) if f.startswith("grad")]


def test_a_foreign_model_never_writes_the_cache(
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path: Path,
    other_weights: Path,
):
    run = _copy(explorer_run, tmp_path / "digits")
    forget_mean_peaks(run)  # an older run: its mean-list crops are made with the model
    assert not (run / "cache").exists()
    # a single run served with other weights than it records: refused, nothing made
    app = create_app(run, model="lurker.examples:DigitsNet", weights=str(other_weights))
    with TestClient(app) as c:
        assert c.get(GRAD.format(run="digits")).status_code == 409
        assert c.get(MEAN_CROP.format(run="digits")).status_code == 409
    assert not (run / "cache").exists() or not _files(run)
    # the same weights from another file than it records: the run's model, but not the
    # file it records (which may change apart from this one): kept out of its cache too
    copied = tmp_path / "copied.pt"
    shutil.copyfile(explorer_run.weights, copied)
    app = create_app(run, model="lurker.examples:DigitsNet", weights=str(copied))
    with TestClient(app) as c:
        first = c.get(GRAD.format(run="digits"))
        assert first.status_code == 200 and first.content.startswith(b"\x89PNG")
        assert c.get(GRAD.format(run="digits")).content == first.content  # from memory
        assert c.get(MEAN_CROP.format(run="digits")).status_code == 200
        assert (
            c.get(GRAD.format(run="digits").replace("grad.png", "grad_crop.png")).status_code == 200
        )
    after = _files(run) if (run / "cache").exists() else set()
    assert not [f for f in after if "grad" in f or "mean" in f]
    # a model object from Python is not what the run records either
    app = create_app(run, model_obj=explorer_run.model)
    with TestClient(app) as c:
        assert c.get(GRAD.format(run="digits")).status_code == 200
        assert c.get(MEAN_CROP.format(run="digits")).status_code == 200
    after = _files(run) if (run / "cache").exists() else set()
    assert not [f for f in after if "grad" in f or "mean" in f]
    # served without a model now: nothing model-made is there to be served
    app = create_app(run, live=False)
    with TestClient(app) as c:
        assert c.get(GRAD.format(run="digits")).status_code == 404
    # the run's own model (spec and weights as recorded) does cache its images
    app = create_app(run, model="lurker.examples:DigitsNet", weights=str(explorer_run.weights))
    with TestClient(app) as c:
        assert c.get(GRAD.format(run="digits")).status_code == 200
    assert [f for f in _files(run) if f.startswith("grad")]


def test_a_model_in_training_mode_is_put_in_eval_mode(
    explorer_run: ExplorerRun,  # noqa: F811
    tmp_path: Path,
):
    model = DigitsNet()
    model.load_state_dict(explorer_run.model.state_dict())
    model.train()  # as a training script leaves it
    bn = model.features[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    oracle = DigitsNet()
    oracle.load_state_dict(explorer_run.model.state_dict())
    oracle.eval()
    run = _copy(explorer_run, tmp_path / "digits")
    app = create_app(run, model_obj=model)
    with TestClient(app) as c:
        for i in (4, 5, 4):
            got = c.get(f"/api/runs/digits/live/sample-{i}").json()["predictions"]
            x = load_dataset("digits:test", 16, channels=1)[i][0][None]
            with torch.no_grad():
                probs, idx = torch.softmax(oracle(x)[0], 0).topk(5)
            assert [p["class"] for p in got] == idx.tolist()
            assert [p["prob"] for p in got] == pytest.approx(probs.tolist(), abs=1e-6)
        assert c.get("/api/runs/digits/live/sample-4/ops/conv2d_1").status_code == 200
        assert c.get(GRAD.format(run="digits")).status_code == 200
    assert torch.equal(bn.running_mean, stats[0])
    assert torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
