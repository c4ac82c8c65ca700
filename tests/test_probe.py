"""lurker.probe: exact top-k against brute force, resume after SIGKILL, distributed merge."""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from torch import nn

import dist_ranks
import lurker
from lurker.errors import LurkerError
from lurker.examples import DigitsNet
from lurker.probe import UnitImages, probe, select_layers
from lurker.probe.data import digits, image_folder

LAYERS = ["features.0", "features.2", "features.6", "classifier.1", "classifier.3"]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DigitsNet().eval()


def _brute(model: nn.Module, ds, module: str):
    """Every sample's output of one module, by a plain forward with a hook (the oracle)."""
    acts = []
    mod = dict(model.named_modules())[module]
    h = mod.register_forward_hook(lambda m, i, o: acts.append(o.detach().clone()))
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    device = next(model.parameters()).device  # the probe moved it to its device
    with torch.no_grad():
        model(xs.to(device))
    h.remove()
    return acts[0].cpu()


def _topk(vals: np.ndarray, k: int) -> np.ndarray:
    ids = np.arange(len(vals))
    order = np.lexsort((ids, -vals))  # value descending, then id ascending
    return order[:k]


def _runs_equal(a: lurker.store.Run, b: lurker.store.Run) -> None:
    assert [la.name for la in a.layers] == [lb.name for lb in b.layers]
    for info in a.layers:
        for u in range(info.num_units):
            ua, ub = a.unit(info.name, u), b.unit(info.name, u)
            for which in ("max", "mean"):
                ta, tb = ua.top(which), ub.top(which)
                assert all(e.y is not None and e.x is not None for e in ta + tb), which
                assert [(e.sample_id, e.y, e.x) for e in ta] == [
                    (e.sample_id, e.y, e.x) for e in tb
                ]
                np.testing.assert_allclose([e.value for e in ta], [e.value for e in tb], rtol=1e-6)
            np.testing.assert_allclose(ua.class_mean_array(), ub.class_mean_array(), rtol=1e-5)
            np.testing.assert_allclose(ua.max, ub.max, rtol=1e-6)
            # histograms: the same edges and counts (a mean rounded differently by another
            # batch's kernels could only move across an edge it lies within an ulp of)
            (ca, ea), (cb, eb) = ua.histogram(), ub.histogram()
            assert np.array_equal(ea, eb) and np.array_equal(ca, cb), (info.name, u)


def test_topk_equals_brute_force(tmp_path: Path):
    model = _model()
    ds = digits(16, split="test")
    k = 5
    # on the CPU: GPU convolutions may round differently per batch size, which would
    # reorder near-ties between the probe's batches and the oracle's single batch
    run = probe(
        model,
        ds,
        out=tmp_path / "run",
        layers=LAYERS,
        k=k,
        batch_size=37,
        device="cpu",
        progress=False,
    )
    assert [layer.name for layer in run.layers] == LAYERS
    labels = np.array([ds[i][1] for i in range(len(ds))])
    for name in LAYERS:
        act = _brute(model, ds, name)
        flat = act.flatten(2) if act.dim() > 2 else act.unsqueeze(-1)
        means, maxs = flat.mean(2).numpy(), flat.amax(2).numpy()
        argmax = flat.argmax(2).numpy()
        width = act.shape[-1] if act.dim() == 4 else 1
        for u in range(act.shape[1]):
            unit = run.unit(name, u)
            top_mean = unit.top("mean")
            exp = _topk(means[:, u], k)
            assert [e.sample_id for e in top_mean] == exp.tolist(), (name, u)
            np.testing.assert_allclose([e.value for e in top_mean], means[exp, u], rtol=1e-5)
            top_max = unit.top("max")
            exp = _topk(maxs[:, u], k)
            assert [e.sample_id for e in top_max] == exp.tolist(), (name, u)
            np.testing.assert_allclose([e.value for e in top_max], maxs[exp, u], rtol=1e-5)
            if act.dim() == 4:
                assert [(e.y, e.x) for e in top_max] == [
                    (int(argmax[i, u]) // width, int(argmax[i, u]) % width) for i in exp
                ]
            # the mean list keeps where each of its samples peaked (first maximum, row-major)
            exp = _topk(means[:, u], k)
            assert [(e.y, e.x) for e in top_mean] == [
                (int(argmax[i, u]) // width, int(argmax[i, u]) % width) for i in exp
            ], (name, u)
            cm = unit.class_mean_array()
            for c in range(10):
                np.testing.assert_allclose(
                    cm[c], means[labels == c, u].mean(), rtol=1e-4, atol=1e-6
                )
            np.testing.assert_allclose(unit.mean, means[:, u].mean(), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(unit.max, maxs[:, u].max(), rtol=1e-6)
            counts, edges = unit.histogram()
            assert counts.sum() == len(ds) and len(edges) == len(counts) + 1
    # ReLU outputs tie at exactly 0 for many samples: ties resolved by sample id
    assert run.classes == [str(i) for i in range(10)]
    assert run.layer("features.0").rf["y"]["size"] == 3


def test_non_finite_activations_are_named(tmp_path: Path):
    """A NaN or infinite input pixel makes NaN and inf activations, which rank first in
    every top list and make the units' means NaN: the probe names the samples (a warning
    pointing at the caller's line, and the run's meta) instead of saying nothing."""
    import warnings

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(20, 1, 8, 8)
    x[3, 0, 2, 5] = float("nan")
    x[7, 0, 4, 4] = float("inf")
    data = torch.utils.data.TensorDataset(x, torch.arange(20) % 2)
    with pytest.warns(
        UserWarning,
        match=r"had NaN or infinite activations, on at least 2 samples \(in the top lists: 3, 7\)",
    ) as w:
        run = probe(m, data, out=tmp_path / "r", layers=["0"], k=3, progress=False)
    assert [r.filename for r in w if "NaN" in str(r.message)] == [__file__]
    assert run.meta["non_finite"] == {"0": [3, 7]}
    # how many samples (counted over all, not only the top lists), by brute force: those
    # whose spatial mean of some unit is NaN or +inf
    with torch.no_grad():
        means = m(x).mean((2, 3))
    bad = (means.isnan() | means.isposinf()).any(1)
    assert run.meta["non_finite_samples"] == {"0": int(bad.sum())} == {"0": 2}
    assert run.unit("0", 0).top("max")[0].sample_id in (3, 7)  # as the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keep = torch.utils.data.Subset(data, [i for i in range(20) if i not in (3, 7)])
        clean = probe(m, keep, out=tmp_path / "c", layers=["0"], k=3, progress=False)
    assert clean.meta["non_finite"] == {}


def test_default_layers_cover_any_architecture():
    for name in ("resnet18", "vgg11", "mobilenet_v3_small", "googlenet"):
        kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        model = torchvision.models.get_model(name, weights=None, **kw).eval()
        tr = lurker.trace(model, torch.randn(1, 3, 64, 64))
        layers = select_layers(tr)
        names = {layer.name for layer in layers}
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        assert set(convs) <= names, name
        assert len(layers) > len(convs)  # activations and linear layers too


def test_probe_resnet_small_dataset(tmp_path: Path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    xs = torch.randn(12, 3, 48, 48)
    ds = torch.utils.data.TensorDataset(xs, torch.arange(12) % 3)
    run = probe(
        model,
        ds,
        out=tmp_path / "r",
        layers=["layer2.*.conv1", "fc"],
        k=3,
        batch_size=5,
        progress=False,
    )
    assert [la.name for la in run.layers] == ["layer2.0.conv1", "layer2.1.conv1", "fc"]
    assert all(len(run.unit("fc", u).top("max")) == 3 for u in range(5))
    assert run.layer("fc").rf is None or run.layer("fc").rf.get("full")


def test_bad_inputs(tmp_path: Path):
    ds = digits(16, split="test")
    with pytest.raises(LurkerError, match=r"features\.0"):
        probe(_model(), ds, out=tmp_path / "a", layers=["nope.*"], progress=False)
    probe(_model(0), ds, out=tmp_path / "b", layers=["features.0"], k=2, progress=False)
    with pytest.raises(LurkerError, match="overwrite"):
        probe(_model(1), ds, out=tmp_path / "b", layers=["features.0"], k=2, progress=False)
    run = probe(
        _model(1),
        ds,
        out=tmp_path / "b",
        layers=["features.0"],
        k=2,
        overwrite=True,
        progress=False,
    )
    assert run.layers[0].name == "features.0"


def test_image_folder_with_corrupt_files(tmp_path: Path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            arr = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    (root / "dog" / "broken.jpg").write_bytes(b"not an image at all")
    ds = image_folder(root, 32)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    run = probe(model, ds, out=tmp_path / "run", k=3, batch_size=3, progress=False)
    assert run.classes == ["cat", "dog"]
    assert [Path(p).name for p, _ in run.skipped] == ["broken.jpg"]
    tops = run.unit("0", 0).top("max")
    assert all(e.path and Path(e.path).exists() for e in tops)


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from lurker.examples import DigitsNet
    from lurker.probe import probe
    from lurker.probe.data import digits

    torch.manual_seed(0)
    model = DigitsNet().eval()
    if sys.argv[2] == "slow":
        model.features[0].register_forward_hook(lambda *a: time.sleep(0.15))
    probe(model, digits(16, split="test"), out=sys.argv[1], k=4, batch_size=16,
          checkpoint_every=2, progress=False)
    """
)


def test_resume_after_sigkill_equals_uninterrupted(tmp_path: Path):
    script = tmp_path / "sweep.py"
    script.write_text(RESUME_SCRIPT)
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), "slow"])
    ckpt = run_dir / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = torch.load(ckpt, weights_only=True)["done"]
    assert 0 < done < 360
    with pytest.raises(LurkerError, match=r"incomplete|resume"):
        lurker.store.Run.open(run_dir)
    subprocess.run([sys.executable, str(script), str(run_dir), "fast"], check=True)
    subprocess.run([sys.executable, str(script), str(tmp_path / "whole"), "fast"], check=True)
    assert not ckpt.exists()
    _runs_equal(lurker.store.Run.open(run_dir), lurker.store.Run.open(tmp_path / "whole"))


def _dist_worker(rank: int, out: str) -> None:
    run = probe(
        _model(),
        digits(16, split="test"),
        out=out,
        layers=LAYERS,
        k=4,
        batch_size=32,
        progress=False,
    )
    # rank 0 writes the run and returns it; the other ranks return None
    if rank == 0:
        assert isinstance(run, lurker.store.Run), run
        assert Path(run.path).resolve() == Path(out).resolve()
    else:
        assert run is None, run


def test_distributed_equals_single_process(tmp_path: Path):
    out = tmp_path / "dist"
    dist_ranks.spawn(_dist_worker, str(out))
    single = probe(
        _model(),
        digits(16, split="test"),
        out=tmp_path / "single",
        layers=LAYERS,
        k=4,
        batch_size=32,
        progress=False,
    )
    _runs_equal(lurker.store.Run.open(out), single)
    assert not list(out.glob("checkpoint*"))


def test_lazy_images(tmp_path: Path):
    model = _model()
    ds = digits(16, split="test")
    run = probe(
        model, ds, out=tmp_path / "run", layers=["features.4", "classifier.1"], k=2, progress=False
    )
    imgs = UnitImages(run, model=model, dataset=ds)
    e = run.unit("features.4", 3).top("max")[0]
    inp = Image.open(imgs.get("input", "features.4", 3, 0, "max"))
    assert inp.size == (16, 16)
    y0, y1, x0, x1 = imgs.box("features.4", e.y, e.x)
    # features.4 is conv(3x3) after a 2x2 max pool after conv(3x3): RF 8x8 at stride 2
    assert 0 < y1 - y0 <= 8 and 0 < x1 - x0 <= 8 and y0 <= 2 * e.y + 1 < y1
    crop = Image.open(imgs.get("crop", "features.4", 3, 0, "max"))
    scale = crop.size[0] // (x1 - x0)
    assert crop.size == ((x1 - x0) * scale, (y1 - y0) * scale)
    grad = np.asarray(Image.open(imgs.get("grad", "features.4", 3, 0, "max")), dtype=float)
    support = np.argwhere(np.abs(grad - 127.5) > 1.5)  # render_gradient: 0 -> mid-grey
    if len(support):  # guided gradient of the peak lives inside the receptive field
        assert support[:, 0].min() >= y0 and support[:, 0].max() < y1
        assert support[:, 1].min() >= x0 and support[:, 1].max() < x1
    path = imgs.get("grad_crop", "features.4", 3, 0, "mean")
    assert path.exists()
    mtime = path.stat().st_mtime_ns
    assert imgs.get("grad_crop", "features.4", 3, 0, "mean").stat().st_mtime_ns == mtime
    with pytest.raises(LurkerError, match="out of range"):
        imgs.get("input", "features.4", 3, 5, "max")


def test_cli_probe_and_render(tmp_path: Path):
    from lurker.cli import main

    out = tmp_path / "run"
    r = CliRunner().invoke(
        main,
        [
            "probe",
            "lurker.examples:DigitsNet",
            "--data",
            "digits:test",
            "--out",
            str(out),
            "--image-size",
            "16",
            "--layers",
            "features.8",
            "--k",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "1 layers, 32 units" in r.output
    _render_digits_run(out)
    r = CliRunner().invoke(
        main,
        [
            "probe",
            "lurker.examples:DigitsNet",
            "--data",
            "digits",
            "--out",
            str(out),
            "--layers",
            "zzz",
            "--image-size",
            "16",
        ],
    )
    assert r.exit_code == 2 and "features.8" in r.output


def test_torchrun_cli_equals_single_process(tmp_path: Path):
    """The documented multi-process command: torchrun with 2 CPU (gloo) processes. Its
    progress (process 0's) used to read "probing: 180/180" on the 360 images, as if half
    of them were swept: it now says whose count it is."""
    torchrun = Path(sys.executable).parent / "torchrun"
    args = [
        "probe",
        "lurker.examples:DigitsNet",
        "--data",
        "digits:test",
        "--image-size",
        "16",
        "--layers",
        "features.4",
        "--k",
        "3",
        "--batch-size",
        "50",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "lurker.cli",
            *args,
            "--out",
            str(tmp_path / "dist"),
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    said = [line for line in job.stderr.splitlines() if line.startswith("probing")]
    assert said[-1].startswith("probing (process 0 of 2, its shard): 180/180 (100%)"), said
    from lurker.cli import main

    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "single")])
    assert r.exit_code == 0, r.output
    _runs_equal(
        lurker.store.Run.open(tmp_path / "dist"), lurker.store.Run.open(tmp_path / "single")
    )


def test_top_level_api(tmp_path: Path):
    run = lurker.probe(
        _model(),
        digits(16, split="test"),
        out=tmp_path / "r",
        layers="features.0",
        k=2,
        progress=False,
    )
    assert isinstance(run, lurker.Run)
    again = lurker.Run.open(tmp_path / "r")
    assert (
        again.unit("features.0", 1).top("max")[0].sample_id
        == run.unit("features.0", 1).top("max")[0].sample_id
    )


def test_cli_rerun_over_python_run_records_how_to_load(tmp_path: Path):
    """A CLI probe that resumes a run made from Python stores its own model spec and data,
    so `lurker render` can load them (the docs run the two in this order)."""
    from lurker.cli import main
    from lurker.probe.data import load_dataset

    model = _model()
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "run"
    probe(model, load_dataset("digits:test", 16), out=out, layers=["features.8"], k=2)
    assert "model_spec" not in lurker.Run.open(out).meta["config"]
    args = ["lurker.examples:DigitsNet", "--weights", str(weights), "--data", "digits:test"]
    args += ["--out", str(out), "--image-size", "16", "--layers", "features.8", "--k", "2"]
    r = CliRunner().invoke(main, ["probe", *args])
    assert r.exit_code == 0, r.output
    config = lurker.Run.open(out).meta["config"]
    assert config["model_spec"] == "lurker.examples:DigitsNet"
    assert config["data"] == "digits:test"
    _render_digits_run(out)


def _render_digits_run(out: Path) -> None:
    """`lurker render` of a k=2 run of DigitsNet's features.8: the default kinds, with
    each top sample stored once."""
    from lurker.cli import main

    r = CliRunner().invoke(main, ["render", str(out)])
    assert r.exit_code == 0, r.output
    grads = list((out / "cache" / "grad").rglob("*.png"))
    assert len(grads) == 32 * 2 * 2  # units x lists x k
    with lurker.Run.open(out) as run:
        ids = {
            e.sample_id for u in run.units("features.8") for w in ("max", "mean") for e in u.top(w)
        }
    samples = sorted(p.name for p in (out / "cache" / "samples").iterdir())
    assert samples == [f"{i:08d}.png" for i in sorted(ids)]  # each sample once
    assert sorted(p.name for p in (out / "cache").iterdir()) == [
        "grad",
        "model.json",
        "samples",
    ]  # (the stamp: its model made them)


def test_crash_before_results_never_leaves_complete_run_with_new_meta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A rerun that dies before its results are committed leaves the run exactly as it
    was (its results, config and sweep figures stored together in one transaction), never
    'complete' with the new config; rerunning finishes it."""
    from lurker.store.writer import RunWriter

    model, ds, out = _model(), digits(16, split="test"), tmp_path / "run"
    first = probe(model, ds, out=out, layers=["features.8"], k=2, batch_size=64)
    before = (dict(first.meta), first.unit("features.8", 0).to_dict())

    meta_set = RunWriter.meta_set

    def crash(self, key, value):  # dies as the sweep's figures are stored
        if key == "sweep":
            raise KeyboardInterrupt
        meta_set(self, key, value)

    monkeypatch.setattr(RunWriter, "meta_set", crash)
    with pytest.raises(KeyboardInterrupt):  # other bins: a sweep (the same would be none)
        probe(model, ds, out=out, layers=["features.8"], k=2, batch_size=32, hist_bins=32)
    run = lurker.Run.open(out, allow_incomplete=True)
    assert (dict(run.meta), run.unit("features.8", 0).to_dict()) == before
    assert run.complete and run.meta["config"]["batch_size"] == 64
    monkeypatch.undo()
    run = probe(model, ds, out=out, layers=["features.8"], k=2, batch_size=32, hist_bins=32)
    assert run.complete and run.meta["config"]["batch_size"] == 32


# ---------------------------------------------------------------- histograms: batch, order, ranks

HIST_LAYERS = ["conv1", "act", "conv2", "fc"]
HIST_N = 120  # 3 classes of 40, sorted by class


class ExactNet(nn.Module):
    """Integer weights on integer images: every sum is exact in float32 (and the spatial means,
    over 64 and 16 positions, too), so a sample's activations do not depend on the batch it is
    in or on how a kernel orders its sums; histograms can then be compared bit for bit."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 3, 2, stride=2)
        self.fc = nn.Linear(48, 5)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randint(-2, 3, p.shape, generator=g).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(self.act(self.conv1(x))).flatten(1))


def _class_sorted(order: torch.Tensor | None = None) -> torch.utils.data.TensorDataset:
    """An ImageFolder's order: class by class, each class's values larger than the last's,
    so the first batch holds a sliver of the final range."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(HIST_N) // 40
    xs = (
        torch.randint(0, 4, (HIST_N, 2, 8, 8), generator=g).float()
        + 6.0 * labels[:, None, None, None]
    )
    if order is not None:
        xs, labels = xs[order], labels[order]
    return torch.utils.data.TensorDataset(xs, labels)


def _hist_probe(out: Path, batch_size: int, order: torch.Tensor | None = None) -> lurker.Run:
    return probe(
        ExactNet().eval(),
        _class_sorted(order),
        out=out,
        layers=HIST_LAYERS,
        k=3,
        batch_size=batch_size,
        device="cpu",
        progress=False,
    )


def _hist_dist_worker(rank: int, out: str) -> None:
    _hist_probe(Path(out), 7)


def test_histograms_identical_for_any_batch_size_order_and_ranks(tmp_path: Path):
    """Batch sizes 1, 7 and 64, a permuted order and two gloo ranks give bit-identical
    histograms and edges, and each equals numpy.histogram of the brute-force spatial means
    (a forward hook) over the same edges: no value clamped although the data come sorted by
    class with growing values."""
    dist_ranks.spawn(_hist_dist_worker, str(tmp_path / "dist"))
    perm = torch.randperm(HIST_N, generator=torch.Generator().manual_seed(2))
    runs = {
        "b64": _hist_probe(tmp_path / "b64", 64),
        "b1": _hist_probe(tmp_path / "b1", 1),
        "b7": _hist_probe(tmp_path / "b7", 7),
        "perm": _hist_probe(tmp_path / "perm", 7, perm),
        "ranks": lurker.store.Run.open(tmp_path / "dist"),
    }
    model, ds = ExactNet().eval(), _class_sorted()
    for name in HIST_LAYERS:
        act = _brute(model, ds, name)
        means = (act.flatten(2).mean(2) if act.dim() > 2 else act).numpy()
        first = means[:64]  # the first batch of 64 misses an end of the layer's range
        assert first.min() > means.min() or first.max() < means.max(), name
        for u in range(means.shape[1]):
            counts, edges = runs["b64"].unit(name, u).histogram()
            assert edges[0] <= means[:, u].min() and means[:, u].max() < edges[-1]
            want, _ = np.histogram(means[:, u].astype(np.float64), bins=edges)
            np.testing.assert_array_equal(counts, want, err_msg=f"{name} {u}")
            assert counts.sum() == HIST_N
            for other, run in runs.items():
                c, e = run.unit(name, u).histogram()
                assert np.array_equal(c, counts) and np.array_equal(e, edges), (other, name, u)


def test_checkpoint_with_old_histograms_is_refused(tmp_path: Path):
    """A checkpoint of an older lurker (histograms over a clamped range) cannot be converted:
    the resumed sweep says so and what to do, rather than mixing two kinds of histograms."""
    _hist_probe(tmp_path / "r", 30)
    torch.save(
        {"done": 30, "world": 1, "layers": HIST_LAYERS, "skipped": [],
         "stats": {name: {"format": 1} for name in HIST_LAYERS}},
        tmp_path / "r" / "checkpoint.pt",
    )  # fmt: skip
    with pytest.raises(LurkerError, match=r"older lurker.*Delete it"):
        _hist_probe(tmp_path / "r", 30)


def test_checkpoint_without_mean_list_peaks_is_refused(tmp_path: Path):
    """A checkpoint of a lurker whose mean lists kept no peaks (state format 2): resuming it
    would leave the samples swept before without a peak, so the sweep refuses and says what
    to do; after deleting it the same command sweeps from the start."""
    _hist_probe(tmp_path / "r", 30)
    ckpt = tmp_path / "r" / "checkpoint.pt"
    torch.save(
        {"done": 30, "world": 1, "layers": HIST_LAYERS, "skipped": [],
         "stats": {name: {"format": 2} for name in HIST_LAYERS}},
        ckpt,
    )  # fmt: skip
    with pytest.raises(LurkerError, match=r"no peak positions for the mean lists.*Delete it"):
        _hist_probe(tmp_path / "r", 30)
    ckpt.unlink()
    run = _hist_probe(tmp_path / "r", 30)
    assert all(e.y is not None for e in run.unit(HIST_LAYERS[0], 0).top("mean"))


class _Interrupted(BaseException):
    """Raised by :class:`_Picked` after a few items: an interrupted sweep. Not an
    ``Exception``, which the sweep reports as the dataset's error (naming the item): these
    tests are about what a sweep stopped midway keeps, as after Ctrl-C."""


class _Picked(torch.utils.data.Dataset):
    """Samples ``idx`` of the digits test split. Its run meta is only its type's name, as
    for any in-memory dataset, so two of them (two random subsets) look alike to the store."""

    def __init__(self, idx: list[int], stop_at: int | None = None) -> None:
        self.base, self.idx, self.stop_at = digits(16, split="test"), idx, stop_at
        self.targets = [self.base.labels[i] for i in idx]

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int):
        self.reads = getattr(self, "reads", 0) + 1
        if self.stop_at is not None and i >= self.stop_at:
            raise _Interrupted
        image, label, _ = self.base[self.idx[i]]
        return image, label


def _brute_run_equal(run: lurker.store.Run, model: nn.Module, ds: _Picked, k: int) -> None:
    """The run's top lists of features.0 and its samples are those of ``ds`` (the oracle: a
    forward hook over ``ds``)."""
    act = _brute(model, ds, "features.0").flatten(2)
    means, maxs = act.mean(2).numpy(), act.amax(2).numpy()
    assert run.num_samples == len(ds)
    for u in range(act.shape[1]):
        unit = run.unit("features.0", u)
        assert [e.sample_id for e in unit.top("mean")] == _topk(means[:, u], k).tolist()
        assert [e.sample_id for e in unit.top("max")] == _topk(maxs[:, u], k).tolist()
        assert [e.label for e in unit.top("max")] == [ds.targets[e.sample_id] for e in unit.top()]


def test_another_dataset_of_the_same_type_does_not_continue_a_checkpoint(tmp_path: Path):
    """A probe interrupted on one random subset, then run into the same directory on
    another subset of the same type (same model, k and image size: the store cannot tell
    them apart) sweeps the new one from the start, and a rerun of a complete run over fewer
    samples leaves none of the old samples behind: the run is brute force on the data it
    names, never the old checkpoint's statistics with sample ids past the new dataset."""
    model, k, out = _model(), 3, tmp_path / "r"
    perm = torch.randperm(360, generator=torch.Generator().manual_seed(0)).tolist()
    first, second = perm[:60], perm[60:100]
    kw = dict(out=out, layers=["features.0"], k=k, batch_size=8, progress=False)
    with pytest.raises(_Interrupted):
        probe(model, _Picked(first, stop_at=40), checkpoint_every=1, **kw)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["done"] == 40
    _brute_run_equal(probe(model, _Picked(second), **kw), model, _Picked(second), k)
    probe(model, _Picked(first), **kw)
    _brute_run_equal(probe(model, _Picked(second), **kw), model, _Picked(second), k)


def test_the_same_probe_of_a_complete_run_sweeps_nothing_and_keeps_its_images(tmp_path: Path):
    """Running the same probe again on a run it finished reads no data beyond the plan's
    first image, says so, and keeps the run and the unit images made from it (a second
    sweep would redo hours of work and drop them for the same numbers); other layers, or
    overwrite=True, sweep again. A resumed sweep's figures say what it resumed from."""
    model, out, idx = _model(), tmp_path / "r", list(range(60))
    kw = dict(out=out, layers=["features.0"], k=3, batch_size=8, progress=False)
    with pytest.raises(_Interrupted):
        probe(model, _Picked(idx, stop_at=40), checkpoint_every=1, **kw)
    run = probe(model, _Picked(idx), **kw)
    assert run.meta["sweep"]["images"] == 20 and run.meta["sweep"]["resumed_from"] == 40
    before = (dict(run.meta), [run.unit("features.0", u).to_dict() for u in range(4)])
    UnitImages(out, model=model, dataset=_Picked(idx)).write_all(kinds=["input"], progress=False)
    images = sorted((out / "cache").rglob("*.png"))
    assert images
    again = _Picked(idx)
    with pytest.warns(UserWarning, match="nothing to sweep") as rec:
        run = probe(model, again, **kw)
    assert rec[0].filename == __file__
    assert again.reads <= 1  # the plan's first image; no sweep
    assert (dict(run.meta), [run.unit("features.0", u).to_dict() for u in range(4)]) == before
    assert sorted((out / "cache").rglob("*.png")) == images
    again = _Picked(idx)
    run = probe(model, again, **{**kw, "layers": ["features.0", "features.2"]})
    assert again.reads >= 60 and [x.name for x in run.layers] == ["features.0", "features.2"]
    assert run.meta["sweep"]["images"] == 60 and run.meta["sweep"]["resumed_from"] == 0
    again = _Picked(idx)
    probe(model, again, overwrite=True, **{**kw, "layers": ["features.0", "features.2"]})
    assert again.reads >= 60


def test_a_finished_run_swept_again_for_other_layers_is_said_before_its_images_go(
    tmp_path: Path,
):
    """Probing a finished run with other layers sweeps it again and, at the end, drops the
    unit images made from it: that used to happen without a word. It is said before the
    sweep (what differs, how many cached files go), and a sweep stopped then leaves the
    finished run and its images as they were."""
    model, out, idx = _model(), tmp_path / "r", list(range(30))
    kw = dict(out=out, layers=["features.0"], k=3, batch_size=8, progress=False)
    probe(model, _Picked(idx), **kw).close()
    UnitImages(out, model=model, dataset=_Picked(idx)).write_all(kinds=["input"], progress=False)
    files = sorted(p for p in (out / "cache").rglob("*") if p.is_file())
    assert files
    other = {**kw, "layers": ["features.0", "features.2"]}
    stopped = pytest.raises(_Interrupted)  # the user stops after the warning
    with pytest.warns(UserWarning, match="holds a finished probe") as rec, stopped:
        probe(model, _Picked(idx, stop_at=10), checkpoint_every=1, **other)
    said = str(rec[0].message)
    assert "other settings (layers)" in said and f"its {len(files)} cached" in said
    assert sorted(p for p in (out / "cache").rglob("*") if p.is_file()) == files
    with lurker.Run.open(out) as run:
        assert run.meta["status"] == "complete" and [x.name for x in run.layers] == ["features.0"]


def test_a_finished_run_that_recorded_no_settings_is_not_said_to_differ_in_all(tmp_path: Path):
    """A run from before lurker recorded what it was probed with: the warning says its
    settings are unknown, not that every one of them differs."""
    import sqlite3

    model, out, idx = _model(), tmp_path / "r", list(range(12))
    kw = dict(out=out, layers=["features.0"], k=3, batch_size=8, progress=False)
    probe(model, _Picked(idx), **kw).close()
    with sqlite3.connect(out / "run.db") as db:  # as an older lurker wrote it
        db.execute("DELETE FROM meta WHERE key = 'probed_with'")
    with pytest.warns(UserWarning, match="holds a finished probe") as rec:
        probe(model, _Picked(idx), **kw).close()
    said = str(rec[0].message)
    assert "settings it did not record" in said and "other settings" not in said


def _labelled_folder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for cls in ("ant", "bee", "cat"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            arr = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


def test_class_statistics_and_samples_use_the_labels_the_items_carry(tmp_path: Path):
    """A torchvision ImageFolder whose target_transform maps its folders to a model's
    classes (or permutes them): the samples' labels and the per-class means are both those
    of the items (the oracle: ds[i][1] and a forward hook), never the folders' raw targets
    for one and the items' labels for the other; labels past the folder names name the
    classes by id (with a warning) instead of failing deep inside the statistics. Labels
    that are not class indices (one-hot) make the run unlabelled, with a warning; targets
    that disagree with the items are refused with what to do."""
    from torchvision import transforms

    root = _labelled_folder(tmp_path / "imgs")
    tf = transforms.Compose([transforms.Resize(16), transforms.ToTensor()])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for remap, names in (({0: 2, 1: 0, 2: 1}, ["ant", "bee", "cat"]), ({0: 7, 1: 3, 2: 5}, None)):
        ds = torchvision.datasets.ImageFolder(str(root), tf, target_transform=remap.__getitem__)
        out = tmp_path / f"run{len(remap)}{names is None}"
        with contextlib.ExitStack() as stack:
            if names is None:
                stack.enter_context(pytest.warns(UserWarning, match="labels go up to 7"))
            run = probe(model, ds, out=out, layers=["1"], k=12, batch_size=5, progress=False)
        labels = np.array([ds[i][1] for i in range(len(ds))])
        assert run.classes == (names or [str(i) for i in range(8)])
        assert [s.label for s in run.samples(range(len(ds)))] == labels.tolist()
        means = _brute(model, ds, "1").flatten(2).mean(2).numpy()
        for u in range(4):
            cm = run.unit("1", u).class_mean_array()
            for c in range(len(run.classes)):
                want = means[labels == c, u].mean() if (labels == c).any() else np.nan
                np.testing.assert_allclose(cm[c], want, rtol=1e-5, err_msg=f"{u} {c}")
    onehot = torch.utils.data.TensorDataset(torch.randn(4, 3, 8, 8), torch.eye(2)[[0, 1, 0, 1]])
    with pytest.warns(UserWarning, match=r"item 0 has a label of shape \(2,\), not a class"):
        run = probe(model, onehot, out=tmp_path / "onehot", progress=False)
    assert run.classes == [] and run.meta["labels_ignored"]["item"] == 0

    class Disagree(torch.utils.data.Dataset):
        targets = [0, 1, 0, 1]

        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            return torch.ones(3, 8, 8) * i, 1 - self.targets[i]

    with pytest.raises(LurkerError, match=r"item 0 carries the label 1, but the dataset's targets"):
        probe(model, Disagree(), out=tmp_path / "disagree", progress=False)


def test_a_model_in_training_mode_is_swept_in_eval_and_given_back_training(tmp_path: Path):
    """Probing between training epochs: the sweep runs in eval mode (dropout off, BatchNorm
    on its running statistics: brute force in eval mode is the oracle), and every module
    is given back in the mode it came in (a BatchNorm frozen in eval stays so), also when
    the probe fails."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )  # fmt: skip
    with torch.no_grad():  # running statistics of their own, as after some training
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.train()
    model[1].eval()
    modes = [m.training for m in model.modules()]
    ds = torch.utils.data.TensorDataset(torch.randn(10, 3, 8, 8), torch.arange(10) % 2)
    run = probe(model, ds, out=tmp_path / "run", layers=["3"], k=3, batch_size=4, progress=False)
    assert [m.training for m in model.modules()] == modes
    act = _brute(copy.deepcopy(model).eval(), ds, "3").flatten(2).amax(2).numpy()
    for u in range(4):
        top = run.unit("3", u).top("max")
        assert [e.sample_id for e in top] == _topk(act[:, u], 3).tolist()
        np.testing.assert_allclose([e.value for e in top], act[_topk(act[:, u], 3), u], rtol=1e-6)
    with pytest.raises(LurkerError, match="No layer matches"):
        probe(model, ds, out=tmp_path / "bad", layers=["nope"], progress=False)
    assert [m.training for m in model.modules()] == modes


def test_an_unlabelled_dataset_has_no_class_means(tmp_path: Path):
    """Images without labels: the run has no classes, and its units no class means (not
    one for a class "0" the dataset never named), in the API and the unit document."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)).eval()
    ds = torch.utils.data.TensorDataset(torch.randn(6, 3, 8, 8))
    run = probe(model, ds, out=tmp_path / "r", k=2, progress=False)
    assert run.classes == []
    unit = run.unit("0", 1)
    assert unit.class_means() == {} and unit.class_mean_array().shape == (0,)
    assert unit.to_dict()["class_means"] == {}
    assert all(e.label is None and e.class_name is None for e in unit.top("max"))


class _FloatTargets(torch.utils.data.Dataset):
    """A regression dataset read item by item (no ``targets``): Python float labels."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, float]:
        return self.x[i], float(self.y[i])


@pytest.mark.parametrize("itemwise", [False, True])
def test_regression_targets_are_probed_unlabelled_not_truncated_into_classes(
    tmp_path: Path, itemwise: bool
):
    """Float targets with fractions (a regression model's) are not class indices: truncated
    they made classes '0'..'6' out of y = 3x and per-class means over them, silently. Read
    from targets before the sweep, or item by item by the sweep (0.0 .. 22.0 met as classes
    before item 23's 2.5), the run is unlabelled: one warning naming the first such item,
    the reason in the run's meta, no classes and no class means; the top samples and the
    units' means are as a forward hook gives them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    x = torch.randn(40, 10)
    y = torch.arange(40, dtype=torch.float32)
    y[23] = 2.5  # whole numbers up to item 23
    ds = _FloatTargets(x, y) if itemwise else torch.utils.data.TensorDataset(x, y)
    with pytest.warns(UserWarning, match=r"item 23 has the label 2\.5, not a class index") as rec:
        run = probe(model, ds, out=tmp_path / "r", k=3, batch_size=8, progress=False)
    said = [str(w.message) for w in rec if "not a class index" in str(w.message)]
    assert len(said) == 1 and "no per-class statistics" in said[0]
    assert run.classes == [] and run.meta["labels_ignored"]["item"] == 23
    assert [s.label for s in run.samples(range(40))] == [None] * 40
    with torch.no_grad():
        act = model[1](model[0](x)).numpy()
    for u in range(8):
        unit = run.unit("1", u)
        assert unit.class_means() == {} and unit.class_mean_array().shape == (0,)
        assert [e.sample_id for e in unit.top("max")] == _topk(act[:, u], 3).tolist()
        np.testing.assert_allclose(unit.mean, act[:, u].mean(), rtol=1e-5, atol=1e-7)


def test_whole_float_targets_are_class_indices(tmp_path: Path):
    """Binary targets as floats (0.0 / 1.0, as BCE takes them) keep per-class means by
    those two classes, equal to numpy's over the hooked activations."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    x = torch.randn(40, 10)
    y = (x[:, 0] > 0).float()
    run = probe(
        model, torch.utils.data.TensorDataset(x, y), out=tmp_path / "r", k=2, progress=False
    )
    with torch.no_grad():
        act = model[1](model[0](x)).numpy()
    assert run.classes == ["0", "1"]
    for u in range(8):
        means = run.unit("1", u).class_means()
        for c in (0, 1):
            np.testing.assert_allclose(means[str(c)], act[y.numpy() == c, u].mean(), rtol=1e-5)


def test_progress_is_plain_lines_on_stderr_when_not_a_terminal(tmp_path: Path, capsys):
    """In a log (stderr not a terminal) the sweep says how far it has come as it goes, in
    plain lines: the start, then at most every 10 seconds, and the end; stdout stays clean."""
    model = _model()
    probe(model, _Picked(list(range(24))), out=tmp_path / "r", layers=["features.0"], k=2,
          batch_size=8, progress=True)  # fmt: skip
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("probing:")]
    assert lines[0].startswith("probing: 0/24 (0%)") and lines[-1].startswith("probing: 24/24")
    assert all(line.endswith("images/s") for line in lines) and "probing" not in out


class _Cell:
    """A notebook output as IPython's display handle keeps it: what each redraw showed."""

    def __init__(self, obj: object):
        self.shown = [obj]

    def update(self, obj: object) -> None:
        self.shown.append(obj)


def test_progress_in_a_notebook_is_one_output_redrawn_to_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """In Jupyter (rich's own test for it says so) the sweep shows one output that it
    redraws, ending at the full count, with a bar in HTML; nothing on stderr and no warning.
    rich's bar needs ipywidgets there: without them it warned on every redraw (dozens of
    'install "ipywidgets"' outputs) and left an empty output."""
    import warnings

    import rich.console

    from lurker.probe import progress

    cells: list[_Cell] = []

    def display(obj: object) -> _Cell:
        cells.append(_Cell(obj))
        return cells[-1]

    monkeypatch.setattr(rich.console, "_is_jupyter", lambda: True)
    monkeypatch.setattr(progress, "_display", display, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe(_model(), _Picked(list(range(24))), out=tmp_path / "r", layers=["features.0"],
              k=2, batch_size=8, progress=True)  # fmt: skip
    assert [str(w.message) for w in caught] == []
    assert len(cells) == 1
    first, last = cells[0].shown[0], cells[0].shown[-1]
    assert repr(first).startswith("probing: 0/24 (0%)")
    assert repr(last).startswith("probing: 24/24 (100%)") and repr(last).endswith("images/s")
    assert '<progress value="24" max="24">' in last._repr_html_()
    assert "probing" not in capsys.readouterr().err


def test_a_rerun_over_other_images_with_the_same_labels_sweeps_them(tmp_path: Path):
    """Two in-memory datasets of one type, size and labels, other images: the finished run
    of the first is no answer for the second (the oracle: a run made fresh from it)."""
    from torch.utils.data import TensorDataset

    model, labels = _model(), torch.arange(40) % 10
    g = torch.Generator().manual_seed(3)
    a = TensorDataset(torch.rand(40, 1, 16, 16, generator=g), labels)
    b = TensorDataset(torch.rand(40, 1, 16, 16, generator=g), labels)
    kw = dict(layers=["features.0"], k=3, batch_size=8, progress=False)
    probe(model, a, out=tmp_path / "r", **kw)
    again = probe(model, b, out=tmp_path / "r", **kw)
    fresh = probe(model, b, out=tmp_path / "fresh", **kw)
    _runs_equal(again, fresh)


def test_the_probe_leaves_older_objects_out_of_full_collections_while_it_runs(
    tmp_path: Path,
) -> None:
    """While the probe runs, the objects alive before it (torch's, the model's) are frozen
    out of the cyclic GC's full collections, which walk all of them; afterwards they are
    tracked again, and a caller's own freeze is left alone."""
    import gc

    from torch.utils.data import TensorDataset

    seen: list[int] = []

    class Seeing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(gc.get_freeze_count())
            return self.conv(x)

    ds = TensorDataset(torch.randn(6, 3, 8, 8), torch.arange(6) % 2)
    before = gc.get_freeze_count()
    assert before == 0
    lurker.probe.probe(Seeing().eval(), ds, out=tmp_path / "a", batch_size=3, progress=False)
    assert seen and min(seen) > 0 and gc.get_freeze_count() == 0
    gc.freeze()  # the caller's own: kept as it is
    try:
        lurker.probe.probe(Seeing().eval(), ds, out=tmp_path / "b", batch_size=3, progress=False)
        assert gc.get_freeze_count() > 0  # (not unfrozen by the probe)
    finally:
        gc.unfreeze()
