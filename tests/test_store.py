"""The run store: exact round trip, resume/overwrite rules, atomicity, clear errors."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lurker.errors import LurkerError
from lurker.store import (
    SCHEMA_VERSION,
    LayerResult,
    MissingFromRunError,
    NotARunError,
    Run,
    RunExistsError,
    RunIncompleteError,
    RunWriter,
    SchemaVersionError,
    StoreError,
    UnitRangeError,
    UnknownLayerError,
    atomic_write_bytes,
    receptive_json_schema,
)
from lurker.store.schema import rf_record

CLASSES = ["cat", "dog", "crane", "crane"]
N_SAMPLES = 12
K = 4
BINS = 8
SRC = str(Path(__file__).resolve().parents[1] / "src")


def meta(fp: str = "fp-A", model: str = "torchvision:resnet18") -> dict:
    return {
        "model": model,
        "model_fingerprint": fp,
        "dataset": "folder:/data/x",
        "k": K,
        "image_size": 32,
        "config": {"batch_size": 4},
    }


def rf_dict() -> dict:
    """A receptive field as ``RF.to_dict()`` gives it: a conv with kernel 11, stride 4,
    padding 2 on a 32 x 32 input (7 x 7 output positions)."""
    lo = [max(0, 4 * i - 2) for i in range(7)]
    hi = [min(32, 4 * i - 2 + 11) for i in range(7)]
    axis = {"size": 11, "stride": 4, "start": -2, "lo": lo, "hi": hi}
    return {
        "y": {**axis, "dim": 2},
        "x": {**axis, "dim": 3},
        "input_size": [32, 32],
        "full": False,
        "exact": True,
    }


def layer_result(name: str, c: int, seed: int, *, empty_slots: bool = False) -> LayerResult:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    mean_ids = np.stack([rng.permutation(N_SAMPLES)[:K] for _ in range(c)])
    max_ids = np.stack([rng.permutation(N_SAMPLES)[:K] for _ in range(c)])
    if empty_slots:
        mean_ids[0, 2:] = -1
        max_ids[1, 3:] = -1
    hist = rng.integers(0, 1000, size=(c, BINS))
    hist[0, 0] = 2**40  # beyond float32's exact integers
    return LayerResult(
        name=name,
        module=f"features.{seed}",
        op=f"conv2d_{seed}",
        kind="Conv2d",
        shape=(c, 7, 7),
        rf=rf_dict() if seed == 1 else None,
        mean_values=-np.sort(-rng.standard_normal((c, K)).astype(f32), axis=1),
        mean_ids=mean_ids,
        max_values=-np.sort(-rng.standard_normal((c, K)).astype(f32), axis=1),
        max_ids=max_ids,
        max_y=rng.integers(0, 7, size=(c, K)),
        max_x=rng.integers(0, 7, size=(c, K)),
        # the mean list's peaks: given for one layer, unknown (an older probe's) for the other
        mean_y=rng.integers(0, 7, size=(c, K)) if seed == 2 else None,
        mean_x=rng.integers(0, 7, size=(c, K)) if seed == 2 else None,
        unit_mean=rng.standard_normal(c).astype(f32),
        unit_max=rng.standard_normal(c).astype(f32) + 3,
        class_mean=rng.standard_normal((c, len(CLASSES))).astype(f32),
        hist=hist,
        hist_edges=np.linspace(-1, 5, BINS + 1).astype(f32),
    )


def labels() -> list[int]:
    return [i % len(CLASSES) if i != 5 else -1 for i in range(N_SAMPLES)]


def start(path: Path, fp: str = "fp-A", **kw: object) -> RunWriter:
    w = RunWriter.create(path, meta=meta(fp), **kw)
    w.set_classes(CLASSES)
    w.add_samples((i, None if i == 3 else f"img/{i}.png", lab) for i, lab in enumerate(labels()))
    w.add_skipped([("img/bad.png", "cannot identify image file")])
    return w


def complete_run(path: Path, fp: str = "fp-A", **kw: object) -> list[LayerResult]:
    results = [layer_result("conv1", 6, 1, empty_slots=True), layer_result("layer1.0", 5, 2)]
    with start(path, fp, **kw) as w:
        w.write_layers_result(results)
    return results


def test_round_trip_exact(tmp_path: Path) -> None:
    results = complete_run(tmp_path / "run")
    with Run.open(tmp_path / "run") as run:
        assert run.meta["model_fingerprint"] == "fp-A"
        assert run.meta["status"] == "complete" and run.complete
        assert run.meta["schema_version"] == SCHEMA_VERSION
        assert run.meta["k"] == K and run.meta["config"] == {"batch_size": 4}
        assert run.classes == CLASSES
        assert [info.name for info in run.layers] == ["conv1", "layer1.0"]
        assert run.skipped == [("img/bad.png", "cannot identify image file")]
        for res, info in zip(results, run.layers):
            # the receptive field comes back as the versioned record
            rf = None if res.rf is None else {"schema": "lurker.receptive", "version": 2, **res.rf}
            assert (info.module, info.op, info.kind, info.shape, info.rf) == (
                res.module,
                res.op,
                res.kind,
                res.shape,
                rf,
            )
            c = info.num_units
            assert c == len(res.unit_mean)
            for u in range(c):
                unit = run.unit(info.name, u)
                assert unit.mean == float(res.unit_mean[u]) and unit.max == float(res.unit_max[u])
                for which, ids, vals in (
                    ("mean", res.mean_ids, res.mean_values),
                    ("max", res.max_ids, res.max_values),
                ):
                    top = unit.top(which)
                    keep = [r for r in range(K) if ids[u, r] >= 0]
                    assert [e.rank for e in top] == keep
                    assert [e.sample_id for e in top] == [int(ids[u, r]) for r in keep]
                    assert [e.value for e in top] == [float(vals[u, r]) for r in keep]
                    ys, xs = (res.max_y, res.max_x) if which == "max" else (res.mean_y, res.mean_x)
                    if ys is not None:
                        assert [(e.y, e.x) for e in top] == [
                            (int(ys[u, r]), int(xs[u, r])) for r in keep
                        ]
                    else:  # not stored: None, never a made-up (-1, -1)
                        assert all(e.y is None and e.x is None for e in top)
                    for e in top:
                        lab = labels()[e.sample_id]
                        assert e.label == (None if lab < 0 else lab)
                        assert e.class_name == (None if lab < 0 else CLASSES[lab])
                        assert e.path == (None if e.sample_id == 3 else f"img/{e.sample_id}.png")
                np.testing.assert_array_equal(unit.class_mean_array(), res.class_mean[u])
                assert list(unit.class_means()) == ["cat", "dog", "crane (2)", "crane (3)"]
                counts, edges = unit.histogram()
                np.testing.assert_array_equal(counts, res.hist[u])
                np.testing.assert_array_equal(edges, res.hist_edges)
    # Empty slots are simply absent.
    with Run.open(tmp_path / "run") as run:
        assert len(run.unit("conv1", 0).top("mean")) == 2
        assert len(run.unit("conv1", 1).top("max")) == 3


def test_queries_and_export(tmp_path: Path) -> None:
    results = complete_run(tmp_path / "run")
    with Run.open(tmp_path / "run") as run:
        res = results[1]
        by_max = run.units("layer1.0", order_by="max")
        assert [u.index for u in by_max] == list(np.argsort(-res.unit_max, kind="stable"))
        assert [u.index for u in run.units("layer1.0", "mean", limit=2)] == list(
            np.argsort(-res.unit_mean, kind="stable")[:2]
        )
        assert [u.index for u in run.units("layer1.0", "index")] == list(range(5))
        # Lookup by op label and by module path.
        assert run.layer("conv2d_2").name == "layer1.0"
        assert run.layer("features.1").name == "conv1"
        samples = run.samples([4, 0, 5])
        assert [(s.id, s.label, s.class_name) for s in samples] == [
            (4, 0, "cat"),
            (0, 0, "cat"),
            (5, None, None),
        ]
        d = run.to_dict("conv1", 0)
        text = json.dumps(d, allow_nan=False)
        assert json.loads(text)["unit"] == 0
        assert d["layer"]["rf"] == {"schema": "lurker.receptive", "version": 2, **rf_dict()}
        assert len(d["top"]["max"]) == K and d["top"]["max"][0]["y"] is not None
        assert len(d["top"]["mean"]) == 2 and d["top"]["mean"][0]["y"] is None
        assert d["histogram"]["counts"][0] == 2**40
        path = run.cache_path("crop", "layer1/0:../x", 3, 1, "max")
        assert path.parent.is_dir() and path.suffix == ".png"
        assert (tmp_path / "run" / "cache") in path.parents and ".." not in path.parts


def test_plain_sqlite_readable(tmp_path: Path) -> None:
    results = complete_run(tmp_path / "run")
    db = sqlite3.connect(tmp_path / "run" / "run.db")
    (version,) = db.execute("PRAGMA user_version").fetchone()
    assert version == SCHEMA_VERSION
    # a unit's top lists: one blob of 2 x k records, as docs/run-store.md lays them out
    ((k,),) = db.execute("SELECT value FROM meta WHERE key = 'k'").fetchall()
    (blob,) = db.execute(
        "SELECT u.top FROM units u JOIN layers l ON l.id = u.layer_id "
        "WHERE l.name = 'layer1.0' AND u.unit = 3"
    ).fetchone()
    dtype = np.dtype([("sample_id", "<i8"), ("value", "<f8"), ("y", "<i4"), ("x", "<i4")])
    lists = np.frombuffer(blob, dtype).reshape(2, int(k))
    assert lists[0]["sample_id"].tolist() == results[1].max_ids[3].tolist()
    assert lists[0]["y"].tolist() == results[1].max_y[3].tolist()
    assert lists[1]["sample_id"].tolist() == results[1].mean_ids[3].tolist()
    assert lists[1]["y"].tolist() == results[1].mean_y[3].tolist()  # type: ignore[index]
    plan = " ".join(
        str(r)
        for r in db.execute("EXPLAIN QUERY PLAN SELECT top FROM units WHERE layer_id=1 AND unit=3")
    )
    assert "SEARCH" in plan
    (blob,) = db.execute("SELECT hist FROM units WHERE layer_id = 1 AND unit = 0").fetchone()
    assert np.frombuffer(blob, "<f8")[0] == 2**40
    db.close()


def test_other_model_refused_same_resumed_overwrite_replaces(tmp_path: Path) -> None:
    path = tmp_path / "run"
    complete_run(path, "fp-A")
    with pytest.raises(RunExistsError) as info:
        RunWriter.create(path, meta=meta("fp-B", model="torchvision:vgg16"))
    msg = str(info.value)
    assert "overwrite=True" in msg and "resnet18" in msg and "vgg16" in msg
    assert "--overwrite" in info.value.for_cli()
    assert isinstance(info.value, LurkerError)
    # Same model: resumed, data intact; a different k is refused.
    with RunWriter.create(path, meta=meta("fp-A")) as w:
        assert w.resumed and w.status == "complete"
        assert w.checkpoint_path.parent == path
    with pytest.raises(RunExistsError, match="k=4"):
        RunWriter.create(path, meta={**meta("fp-A"), "k": 9})
    # Overwrite: a fresh, empty run of the new model.
    atomic_write_bytes(path / "checkpoint.pt", b"old")
    with RunWriter.create(path, meta=meta("fp-B"), overwrite=True) as w:
        assert not w.resumed and w.meta_get("model_fingerprint") == "fp-B"
    assert not (path / "checkpoint.pt").exists()
    with Run.open(path, allow_incomplete=True) as run:
        assert run.layers == [] and run.classes == []


def test_non_run_directory_never_clobbered(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunExistsError, match="holds no lurker run"):
        RunWriter.create(tmp_path, meta=meta(), overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(NotARunError, match="not a lurker run"):
        Run.open(tmp_path)


def test_incomplete_run_refused(tmp_path: Path) -> None:
    start(tmp_path / "run").close()
    with pytest.raises(RunIncompleteError) as info:
        Run.open(tmp_path / "run")
    assert "incomplete" in str(info.value) and "--out" in str(info.value)
    assert "was interrupted" in str(info.value)
    # while a probe holds the run's lock (another process writing it), resuming would be
    # refused: the message says it is still running, and which process writes it
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lurker.store import run_lock\n"
         "with run_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)",
         str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunIncompleteError) as info:
            Run.open(tmp_path / "run")
        said = str(info.value)
        assert f"still running (process {holder.pid} is writing it)" in said, said
        assert "Resume" not in said
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(RunIncompleteError, match="was interrupted"):  # the lock is free again
        Run.open(tmp_path / "run")
    # A new data write on a complete run demotes it until results are rewritten.
    complete_run(tmp_path / "r2")
    with RunWriter.create(tmp_path / "r2", meta=meta()) as w:
        w.add_samples([(99, "img/99.png", 1)])
        assert w.status == "running"
    with pytest.raises(RunIncompleteError):
        Run.open(tmp_path / "r2")


def test_a_run_whose_probe_is_still_starting_says_so(tmp_path: Path) -> None:
    """A probe holds its --out (the lock) for the minute it loads and traces its model
    before it creates run.db: `lurker images` and `lurker serve` on it then said "not a
    lurker run directory (no run.db); point at the --out directory of `lurker probe`",
    which it is. Now they say its probe is still starting, and which process runs it."""
    from lurker.server.state import NotServableError, Registry

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lurker.store import run_lock\n"
         "with run_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)",
         str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunIncompleteError) as info:
            Run.open(out)
        said = str(info.value)
        assert f"its probe is still starting (process {holder.pid} holds" in said, said
        assert "not a lurker run" not in said
        with pytest.raises(NotServableError) as served:
            Registry(out)
        said = str(served.value)
        assert f"its probe is still starting (process {holder.pid} holds" in said, said
    finally:
        holder.kill()
        holder.wait()
    # the probe was killed before it wrote anything: its lock is free, no run there
    with pytest.raises(NotARunError, match="not a lurker run directory"):
        Run.open(out)


def test_failure_mid_write_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run"
    w = start(path)
    original = RunWriter._insert_layer
    calls = []

    def flaky(self: RunWriter, cur: sqlite3.Cursor, position: int, arrays: object) -> None:
        if calls:
            raise RuntimeError("disk on fire")
        calls.append(position)
        original(self, cur, position, arrays)

    monkeypatch.setattr(RunWriter, "_insert_layer", flaky)
    results = [layer_result("conv1", 6, 1), layer_result("layer1.0", 5, 2)]
    with pytest.raises(RuntimeError, match="disk on fire"):
        w.write_layers_result(results)
    assert calls == [0]
    assert w.status == "running"
    w.close()
    with Run.open(path, allow_incomplete=True) as run:
        assert not run.complete and run.layers == []
        assert run._query("SELECT count(*) FROM units") == [(0,)]
        assert len(run.samples(range(N_SAMPLES))) == N_SAMPLES  # earlier commits kept
    monkeypatch.setattr(RunWriter, "_insert_layer", original)
    with RunWriter.create(path, meta=meta()) as w2:  # resume and finish
        w2.write_layers_result(results)
    with Run.open(path) as run:
        assert len(run.layers) == 2


def test_batch_is_one_transaction_and_keeps_the_checkpoint_until_it_commits(
    tmp_path: Path,
) -> None:
    """Writes inside ``batch()`` commit together; if the batch fails after the results were
    written, nothing is stored and the checkpoint (the probe's resumable work) is kept."""
    path = tmp_path / "run"
    complete_run(path)
    with RunWriter.create(path, meta=meta()) as w:
        w.checkpoint_path.write_bytes(b"state")
        with pytest.raises(RuntimeError, match="late failure"), w.batch():
            w.set_classes(CLASSES[::-1])
            w.meta_set("sweep", {"images": 1})
            w.write_layers_result([layer_result("only", 3, 7)])
            assert w.checkpoint_path.exists()  # not before the commit
            raise RuntimeError("late failure")
        assert w.checkpoint_path.read_bytes() == b"state"
        with Run.open(path) as run:  # as it was: the first results, complete
            assert [info.name for info in run.layers] == ["conv1", "layer1.0"]
            assert run.classes == CLASSES and "sweep" not in run.meta
        with w.batch():
            w.meta_set("sweep", {"images": 1})
            w.write_layers_result([layer_result("only", 3, 7)])
        assert not w.checkpoint_path.exists()
    with Run.open(path) as run:
        assert [info.name for info in run.layers] == ["only"] and run.meta["sweep"]
        assert run.unit("only", 2).top("max")


def test_failed_commit_keeps_the_checkpoint_and_the_writer_usable(tmp_path: Path) -> None:
    """A commit that fails (here: a reader holds the database past the busy timeout) stores
    nothing, and the clean-ups waiting for it never run: not then, and not at the next
    write's commit. The writer goes on and can write the results again."""
    path = tmp_path / "run"
    with start(path) as w:
        w.checkpoint_path.write_bytes(b"state")
        w._conn.execute("PRAGMA busy_timeout = 50")
        reader = sqlite3.connect(path / "run.db")
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM meta").fetchall()  # a read lock, kept
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            w.write_layers_result([layer_result("only", 3, 7)])
        reader.close()
        assert w.checkpoint_path.read_bytes() == b"state"
        w.meta_set("note", "after the failure")
        assert w.checkpoint_path.read_bytes() == b"state"
        assert w.status == "running"
        w.write_layers_result([layer_result("only", 3, 7)])
        assert not w.checkpoint_path.exists()
    with Run.open(path) as run:
        assert [info.name for info in run.layers] == ["only"]
        assert run.meta["note"] == "after the failure"


def test_process_crash_mid_write_recovers(tmp_path: Path) -> None:
    """A real kill (no Python cleanup) mid-transaction leaves a hot journal, not corruption."""
    path = tmp_path / "run"
    start(path).close()
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path[:0] = [{SRC!r}, {str(Path(__file__).parent)!r}]
        from test_store import layer_result, meta
        from lurker.store import RunWriter
        w = RunWriter.create({str(path)!r}, meta=meta())
        w._conn.execute("PRAGMA cache_size=1")  # spill pages to the db file early
        orig = RunWriter._insert_layer
        def die(self, cur, position, arrays):
            orig(self, cur, position, arrays)
            os._exit(3)
        RunWriter._insert_layer = die
        w.write_layers_result([layer_result("a", 64, 1), layer_result("b", 5, 2)])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert (path / "run.db-journal").exists()
    with Run.open(path, allow_incomplete=True) as run:  # rolls the hot journal back
        assert not (path / "run.db-journal").exists()
        assert not run.complete and run.layers == []
        assert run._query("SELECT count(*) FROM units") == [(0,)]
        assert run._query("PRAGMA integrity_check") == [("ok",)]
    with pytest.raises(RunIncompleteError):
        Run.open(path)


def test_atomic_write_bytes(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "img.png"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["img.png"]

    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["img.png"]


def test_unknown_layer_and_unit_errors(tmp_path: Path) -> None:
    complete_run(tmp_path / "run")
    with Run.open(tmp_path / "run") as run:
        with pytest.raises(UnknownLayerError) as info:
            run.layer("conv_1")
        msg = str(info.value)
        assert "conv1" in msg and "layer1.0" in msg and "Did you mean" in msg
        assert isinstance(info.value, KeyError) and isinstance(info.value, LurkerError)
        with pytest.raises(UnitRangeError, match=r"6 units \(0\.\.5\)"):
            run.unit("conv1", 6)
        with pytest.raises(IndexError):
            run.unit("conv1", -1)
        # a float is no unit (3.7 read as unit 3 silently), an int no layer name
        with pytest.raises(
            UnitRangeError, match=r"a unit is an int index \(0\.\.5 in 'conv1'\), got 3\.7"
        ):
            run.unit("conv1", 3.7)
        assert run.unit("conv1", np.int64(3)).index == 3
        import torch

        assert run.unit("conv1", torch.tensor(3)).index == 3  # (logits.argmax())
        with pytest.raises(
            UnknownLayerError, match=r"a layer is named by a string.*got 0; .*conv1"
        ):
            run.layer(0)


def test_schema_version_mismatch(tmp_path: Path) -> None:
    complete_run(tmp_path / "run")
    db = sqlite3.connect(tmp_path / "run" / "run.db")
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(SchemaVersionError) as info:
        Run.open(tmp_path / "run")
    assert "99" in str(info.value) and str(SCHEMA_VERSION) in str(info.value)
    assert (info.value.found, info.value.expected) == (99, SCHEMA_VERSION)
    with pytest.raises(RunExistsError, match="schema version 99"):
        RunWriter.create(tmp_path / "run", meta=meta())


def test_bad_shapes_rejected_before_writing(tmp_path: Path) -> None:
    with start(tmp_path / "run") as w:
        bad = layer_result("conv1", 6, 1)
        bad.max_y = np.zeros((5, K))
        with pytest.raises(LurkerError, match="max_y"):
            w.write_layers_result([bad])
        assert w.status == "running"


def test_bulk_write_round_trip(tmp_path: Path) -> None:
    # Many multi-row INSERT statements per layer, the last one partial: every row comes back.
    rng = np.random.default_rng(0)
    c, k, n = 512, 9, 50_000
    layers = []
    for i in range(24):
        ids = rng.integers(0, n, size=(c, k))
        layers.append(
            LayerResult(
                name=f"l{i}",
                module=f"m{i}",
                op=f"op{i}",
                kind="Conv2d",
                shape=(c, 14, 14),
                mean_values=rng.standard_normal((c, k)),
                mean_ids=ids,
                max_values=rng.standard_normal((c, k)),
                max_ids=ids,
                max_y=rng.integers(0, 14, (c, k)),
                max_x=rng.integers(0, 14, (c, k)),
                unit_mean=rng.standard_normal(c),
                unit_max=rng.standard_normal(c),
                class_mean=rng.standard_normal((c, 10)),
                hist=rng.integers(0, 100, (c, 64)),
                hist_edges=np.linspace(0, 1, 65),
            )
        )
    with RunWriter.create(tmp_path / "run", meta=meta()) as w:
        w.write_layers_result(layers)
    with Run.open(tmp_path / "run") as run:
        assert run.unit("l23", 511).top("max")[0].sample_id == int(layers[23].max_ids[511, 0])
        for i, u in [(0, 0), (5, 137), (23, 511)]:
            res, unit = layers[i], run.unit(f"l{i}", u)
            top = unit.top("max")
            assert [e.sample_id for e in top] == res.max_ids[u].tolist()
            assert [e.value for e in top] == res.max_values[u].tolist()
            assert [(e.y, e.x) for e in top] == list(
                zip(res.max_y[u].tolist(), res.max_x[u].tolist())
            )
            assert [e.value for e in unit.top("mean")] == res.mean_values[u].tolist()
        rows = run._conn.execute("SELECT count(*) FROM units").fetchone()[0]
        assert rows == 24 * 512


# -- version 3: the graph, op indices, the receptive-field record ------------------------


def _graph_doc() -> dict:
    """A real graph document: what ``trace.to_json()`` gives for a small CNN."""
    import torch
    from torch import nn

    import lurker

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3)).eval()
    return lurker.trace(model, torch.randn(1, 3, 16, 16)).to_json()


def test_graph_and_op_indices_round_trip(tmp_path: Path) -> None:
    doc = _graph_doc()
    labels = [op["label"] for op in doc["ops"]]
    conv = labels.index("conv2d_2")
    results = [layer_result("conv1", 6, 1), layer_result("layer1.0", 5, 2)]
    results[0].op, results[0].op_index = "conv2d_2", conv
    results[1].op, results[1].op_index = labels[conv - 1], conv - 1
    with start(tmp_path / "run") as w:
        w.set_graph(doc)
        w.write_layers_result(results)
    with Run.open(tmp_path / "run") as run:
        assert run.schema_version == SCHEMA_VERSION == 4
        assert run.graph_json() == json.loads(json.dumps(doc))
        assert [(i.op_index, i.op_label) for i in run.layers] == [
            (conv, "conv2d_2"),
            (conv - 1, labels[conv - 1]),
        ]
        d = run.to_dict("conv1", 0)["layer"]
        assert (d["op_index"], d["op_label"]) == (conv, "conv2d_2")
        from lurker.graph import Graph

        assert run.graph == Graph.from_json(doc)
        assert run.graph.ops[run.layer("conv1").op_index].label == "conv2d_2"
    # stored as the document's text: plain sqlite3 reads it
    db = sqlite3.connect(tmp_path / "run" / "run.db")
    (text,) = db.execute("SELECT doc FROM graph").fetchone()
    ((index,),) = db.execute("SELECT op_index FROM layers WHERE name = 'conv1'").fetchall()
    db.close()
    assert json.loads(text)["ops"][index]["label"] == "conv2d_2"


def test_op_index_must_name_the_layers_op(tmp_path: Path) -> None:
    doc = _graph_doc()
    bad = layer_result("conv1", 6, 1)
    bad.op, bad.op_index = "conv2d_2", 0  # op 0 is the input
    with start(tmp_path / "run") as w:
        w.set_graph(doc)
        with pytest.raises(LurkerError, match="op_index 0 names op 'input_1'"):
            w.write_layers_result([bad])
        bad.op_index = None
        with pytest.raises(LurkerError, match="op_index None"):
            w.write_layers_result([bad])
        with pytest.raises(LurkerError, match="graph document"):
            w.set_graph({"nodes": []})
        assert w.status == "running"


def test_run_without_graph_says_so(tmp_path: Path) -> None:
    complete_run(tmp_path / "run")  # written without set_graph or op indices
    with Run.open(tmp_path / "run") as run:
        for read in (run.graph_json, lambda: run.graph, lambda: run.layers[0].op_index):
            with pytest.raises(MissingFromRunError, match=r"[Pp]robe the model again"):
                read()
        assert run.layers[0].op_label == "conv2d_1"


@pytest.fixture(scope="module")
def rf_validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = receptive_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_rf_record_matches_its_json_schema(tmp_path: Path, rf_validator) -> None:
    """The stored record is exactly the documented shape: the JSON Schema accepts it, and
    it accepts nothing but the record's fields."""
    import torch
    import torchvision

    import lurker
    from lurker.graph.receptive import receptive_fields

    complete_run(tmp_path / "run")
    with Run.open(tmp_path / "run") as run:
        record = run.layer("conv1").rf
    rf_validator.validate(record)
    assert record["schema"] == "lurker.receptive" and record["version"] == 2
    # every receptive field of real models, through the writer's normalisation
    for model, x in [
        (torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)),
        (torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.Upsample(scale_factor=1.5)),
         torch.randn(1, 2, 10)),
        (torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3, stride=(2, 1, 1)), torch.nn.ReLU()),
         torch.randn(1, 3, 6, 9, 9)),  # a video clip: its fields have a t axis
    ]:  # fmt: skip
        rfs = receptive_fields(lurker.trace(model, x))
        assert rfs
        for rf in rfs.values():
            stored = rf_record(rf.to_dict())
            rf_validator.validate(stored)
            assert stored == {"schema": "lurker.receptive", "version": 2, **rf.to_dict()}
    # the schema refuses what the record is not
    for broken in (
        {k: v for k, v in record.items() if k != "version"},
        {**record, "version": 1},
        {**record, "input_size": [4, 32, 32]},  # [D, H, W] only with a t axis
        {**record, "extra": 1},
        {**record, "y": {**record["y"], "lo": [-1, 0]}},
        {**record, "input_size": [32]},
    ):
        assert not rf_validator.is_valid(broken)


def test_bad_rf_refused_before_writing(tmp_path: Path) -> None:
    good = rf_dict()
    cases = {
        "unknown field": {**good, "size": [11, 11]},
        "one bound per position": {**good, "x": {**good["x"], "hi": good["x"]["hi"][:-1]}},
        r"lo <= hi <= 32": {**good, "y": {**good["y"], "hi": [40] * 7}},
        "version 1": {**good, "version": 1},
        "finite number": {**good, "y": {**good["y"], "size": float("inf")}},
    }
    with start(tmp_path / "run") as w:
        for why, rf in cases.items():
            res = layer_result("conv1", 6, 1)
            res.rf = rf
            with pytest.raises(LurkerError, match=why):
                w.write_layers_result([res])
        assert w.status == "running"


# -- a version-2 run still opens --------------------------------------------------------

#: The layout of a version-2 run, as lurker wrote it before version 3 (schema.py at the
#: time): no graph table, no layers.op_index, receptive fields without schema/version.
V2_DDL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE classes (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE samples (id INTEGER PRIMARY KEY, path TEXT, label INTEGER,
                      source_index INTEGER NOT NULL);
CREATE TABLE skipped (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, reason TEXT NOT NULL);
CREATE TABLE layers (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, module TEXT, op TEXT,
                     kind TEXT, num_units INTEGER NOT NULL, shape TEXT NOT NULL, rf TEXT,
                     position INTEGER NOT NULL, hist_edges BLOB NOT NULL, layout TEXT);
CREATE TABLE units (layer_id INTEGER NOT NULL REFERENCES layers(id), unit INTEGER NOT NULL,
                    mean REAL, max REAL, hist BLOB NOT NULL, class_mean BLOB NOT NULL,
                    top BLOB NOT NULL, PRIMARY KEY (layer_id, unit));
"""


def _v2_run(path: Path) -> None:
    """A version-2 run written by hand: 2 classes, 3 samples, one layer of 2 units, k=2."""
    path.mkdir()
    db = sqlite3.connect(path / "run.db")
    db.executescript(V2_DDL)
    meta_rows = {
        "schema_version": 2,
        "status": "complete",
        "lurker_version": "0.0.9",
        "model": "Net",
        "model_fingerprint": "fp-old",
        "k": 2,
        "image_size": [8, 8],
        "config": {},
        "dataset": "tensors",
    }
    db.executemany(
        "INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta_rows.items()]
    )
    db.executemany("INSERT INTO classes VALUES (?, ?)", [(0, "cat"), (1, "dog")])
    db.executemany(
        "INSERT INTO samples VALUES (?, ?, ?, ?)",
        [(0, "a.png", 0, 0), (1, None, 1, 1), (2, None, None, 2)],
    )
    old_rf = rf_dict()  # v2: RF.to_dict() as it was, no schema or version
    db.execute(
        "INSERT INTO layers VALUES (1, 'features.0', 'features.0', 'conv2d_1', 'Conv2d', 2, "
        "'[2, 7, 7]', ?, 0, ?, NULL)",
        (json.dumps(old_rf), np.array([0.0, 1.0, 2.0], "<f8").tobytes()),
    )
    rec = np.dtype([("sample_id", "<i8"), ("value", "<f8"), ("y", "<i4"), ("x", "<i4")])
    tops = {
        0: [(2, 5.0, 1, 2), (0, 4.0, 3, 3), (1, 2.5, -1, -1), (-1, np.nan, -1, -1)],
        1: [(1, 9.0, 0, 6), (2, 1.0, 6, 0), (0, 0.5, -1, -1), (2, 0.25, -1, -1)],
    }
    for unit, (mean, mx) in enumerate([(1.5, 5.0), (0.75, 9.0)]):
        db.execute(
            "INSERT INTO units VALUES (1, ?, ?, ?, ?, ?, ?)",
            (
                unit,
                mean,
                mx,
                np.array([1.0, 2.0], "<f8").tobytes(),
                np.array([0.5, 1.5], "<f4").tobytes(),
                np.array(tops[unit], rec).tobytes(),
            ),
        )
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()


def test_v2_run_opens_and_names_what_it_lacks(tmp_path: Path) -> None:
    _v2_run(tmp_path / "old")
    with Run.open(tmp_path / "old") as run:
        assert run.schema_version == 2 and run.complete
        (info,) = run.layers
        assert (info.name, info.op_label, info.num_units, info.shape) == (
            "features.0", "conv2d_1", 2, (2, 7, 7),
        )  # fmt: skip
        assert info.rf == rf_dict()  # as stored, nothing added
        assert [(u.index, u.max) for u in run.units("features.0")] == [(1, 9.0), (0, 5.0)]
        assert [(u.index, u.mean) for u in run.units("features.0", "mean")] == [(0, 1.5), (1, 0.75)]
        top = run.unit("features.0", 0).top("max")
        assert [(e.sample_id, e.value, e.y, e.x, e.class_name) for e in top] == [
            (2, 5.0, 1, 2, None),
            (0, 4.0, 3, 3, "cat"),
        ]
        mean_top = run.unit("features.0", 0).top("mean")
        assert [(e.sample_id, e.value, e.y) for e in mean_top] == [(1, 2.5, None)]
        assert [e.sample_id for e in run.unit("features.0", 1).top("mean")] == [0, 2]
        assert run.unit("features.0", 1).class_means() == {"cat": 0.5, "dog": 1.5}
        payload = run.to_dict("features.0", 1)
        assert payload["layer"]["op_index"] is None and payload["layer"]["op_label"] == "conv2d_1"
        with pytest.raises(MissingFromRunError) as err:
            _ = run.graph
        msg = str(err.value)
        assert err.value.missing == "graph" and isinstance(err.value, StoreError)
        assert "version 2" in msg and "0.0.9" in msg and "Probe the model again" in msg
        with pytest.raises(MissingFromRunError, match="store version 2") as err:
            run.graph_json()
        with pytest.raises(MissingFromRunError, match="no op index") as err:
            _ = info.op_index
        assert err.value.missing == "op_index"
    # never resumed into a v3 run (that would mix the formats); overwrite replaces it
    with pytest.raises(RunExistsError, match="schema version 2"):
        RunWriter.create(tmp_path / "old", meta={**meta("fp-old"), "model": "Net"})


# -- reading a run loads no torch -------------------------------------------------------


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run written by the probe: a small CNN over 12 random images."""
    import torch
    from torch import nn

    import lurker

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.ReLU()
    )
    data = torch.utils.data.TensorDataset(torch.randn(12, 3, 16, 16), torch.arange(12) % 3)
    out = tmp_path_factory.mktemp("probed") / "run"
    lurker.probe(model, data, out=out, k=3, batch_size=5, progress=False, device="cpu").close()
    return out


def test_probe_writes_graph_op_indices_and_rf_records(probed_run: Path, rf_validator) -> None:
    import torch

    import lurker

    with Run.open(probed_run) as run:
        doc = run.graph_json()
        assert doc["schema"] == "lurker.trace"
        ops = doc["ops"]
        assert [i.name for i in run.layers] == ["0", "1", "3", "4"]
        for info in run.layers:
            op = ops[info.op_index]
            assert op["index"] == info.op_index and op["label"] == info.op_label
            assert info.name in op["module_outputs"]
            assert op["outputs"][0]["shape"][1:] == list(info.shape)
            rf_validator.validate(info.rf)
        # the stored graph is the probed model's: the same ops as tracing it again
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(4, 6, 3), torch.nn.ReLU(),
        )  # fmt: skip
        again = lurker.trace(model, torch.randn(1, 3, 16, 16)).to_json()
        assert [(o["label"], o["parents"]) for o in ops] == [
            (o["label"], o["parents"]) for o in again["ops"]
        ]


def _fresh_python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_reading_a_run_loads_no_torch(probed_run: Path) -> None:
    out = _fresh_python(
        f"""
        import sys
        import lurker.store
        from lurker.store import Run
        assert "torch" not in sys.modules, "import lurker.store"
        with Run.open({str(probed_run)!r}) as run:
            names = [info.name for info in run.layers]
            top = run.units(names[-1], limit=2)[0].top("max")
            doc = run.graph_json()
            indices = [info.op_index for info in run.layers]
            graph = run.graph  # lurker.graph.Graph, torch-free
            assert [graph.ops[i].label for i in indices] == [i.op_label for i in run.layers]
            payload = run.to_dict(names[0], 0)
        import lurker
        with lurker.Run.open({str(probed_run)!r}) as run:
            run.layers
        assert isinstance(lurker.LurkerError("x"), Exception) and lurker.__version__
        import json
        print(json.dumps([len(names), len(top), indices, payload["layer"]["op_index"]]))
        print("torch" in sys.modules)
        """
    )
    found, torch_loaded = out.splitlines()
    assert torch_loaded == "False"
    n_layers, n_top, indices, first = json.loads(found)
    with Run.open(probed_run) as run:  # what this (torch-loaded) process reads
        assert [n_layers, n_top] == [4, 3]
        assert indices == [info.op_index for info in run.layers] and first == indices[0]


def test_package_root_is_lazy_and_complete() -> None:
    out = _fresh_python(
        """
        import sys
        import lurker
        assert "torch" not in sys.modules, "import lurker"
        listed = dir(lurker)
        missing = [n for n in lurker.__all__ if n not in listed]
        assert not missing, missing
        from lurker import *  # every name of __all__ imports
        assert callable(lurker.probe) and lurker.probe is sys.modules["lurker.probe"]
        assert lurker.probe.probe.__name__ == "probe"  # the function, beside the package
        ns = {}
        exec("from lurker import " + ", ".join(lurker.__all__), ns)
        assert ns["Run"].__module__ == "lurker.store.run" and ns["trace"].__module__.startswith("lurker.capture")
        assert lurker.store.Run is ns["Run"]  # subpackages as attributes, as before
        try:
            lurker.no_such_name
        except AttributeError as exc:
            print(exc)
        """
    )
    assert "module 'lurker' has no attribute 'no_such_name'" in out


def test_graph_import_loads_no_torch() -> None:
    code = "import sys, lurker.graph; print('torch' in sys.modules)"
    assert _fresh_python(code).strip() == "False"


def test_a_blocks_module_path_names_the_probed_layer_that_is_its_output(tmp_path: Path) -> None:
    """``run.layer('block')`` (a block's path, as the model's print shows it; what
    ``lurker featviz --layer`` and the explorer take) is the probed layer that is the block's
    output, as ``lurker probe --layers block`` reads it; a module whose output was not
    probed is said so, with how to probe it, not listed as unknown."""
    import torch
    from torch import nn

    import lurker

    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    model = nn.Sequential(block, nn.Conv2d(4, 6, 3), nn.ReLU()).eval()
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 12, 12), torch.arange(8) % 2)
    with lurker.probe(model, data, out=tmp_path / "run", k=2, progress=False, device="cpu") as run:
        names = [i.name for i in run.layers]
        assert "0" not in names and "0.2" in names  # the block's output: its ReLU
        assert run.layer("0").name == "0.2"
        assert run.unit("0", 1).layer == "0.2"
        with pytest.raises(UnknownLayerError) as err:
            run.layer("0.1")  # the BatchNorm: not probed
        said = str(err.value)
        assert "output of module '0.1'" in said and "was not probed" in said, said
        assert "--layers 0.1" in said, said
        with pytest.raises(UnknownLayerError, match="no layer 'nope'"):
            run.layer("nope")


def test_a_blocks_path_names_its_output_even_where_an_op_inside_it_is_probed(
    tmp_path: Path,
) -> None:
    """A residual block's add lives in the block itself (its module path is the block's),
    so ``run.layer('blk')`` matched the add, not the block's output, once the add was
    probed (``layers='*'``), and refused the path outright when two such ops were: the
    block's output wins, as the docstring says; ops inside it keep their own names."""
    import torch
    from torch import nn

    import lurker

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.conv(x) + x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Block(), Block()).eval()
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 8, 8), torch.arange(8) % 2)
    with lurker.probe(
        model, data, out=tmp_path / "run", layers=["*"], k=2, progress=False, device="cpu"
    ) as run:
        adds = [i.name for i in run.layers if i.module == "1"]
        assert adds == ["add_1"]  # the add inside the block carries the block's path
        assert run.layer("1").name == "1.relu"
        assert run.layer("2").name == "2.relu"
        assert run.layer("add_1").name == "add_1"
        assert run.layer("1.conv").name == "1.conv"
