"""The dataset map: per-sample features kept by the probe's sweep, their 2-D reduction,
the stored map and its API document."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dist_ranks
from lurker.errors import LurkerError
from lurker.examples import DigitsNet
from lurker.map import collect_embedding, make_map, reduce
from lurker.probe import probe
from lurker.probe.data import load_dataset
from lurker.store import MissingFromRunError, Run


@pytest.fixture(scope="module")
def model() -> DigitsNet:
    torch.manual_seed(0)
    return DigitsNet().eval()


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits:test", 16, channels=1)


def _all(data) -> tuple[torch.Tensor, torch.Tensor]:
    xs = torch.stack([data[i][0] for i in range(len(data))])
    return xs, torch.tensor([int(data[i][1]) for i in range(len(data))])


def _hooked(model: torch.nn.Module, module: str, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Brute force: the module's output by a plain forward hook, and the logits."""
    got: list[torch.Tensor] = []
    handle = model.get_submodule(module).register_forward_hook(
        lambda m, i, o: got.append(o.detach().clone())
    )
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    return got[0], logits


@pytest.mark.parametrize(
    ("embed", "module", "batch_size"),
    [
        (True, "classifier.2", 7),
        ("features.8", "features.8", 50),
        # a Flatten of a conv map: no unit axis, but one vector per sample all the same
        ("classifier.0", "classifier.0", 11),
    ],
)
def test_probe_keeps_every_samples_features(model, data, tmp_path, embed, module, batch_size):
    run = probe(
        model, data, out=tmp_path / "run", layers="classifier.1", batch_size=batch_size,
        progress=False, embed=embed,
    )  # fmt: skip
    e = run.embedding()
    x, _ = _all(data)
    feats, logits = _hooked(model, module, x)
    if feats.dim() == 4:  # positions are mean-pooled
        feats = feats.mean((2, 3))
    assert e.meta["layer"] == module
    assert e.features.dtype == np.float16
    np.testing.assert_array_equal(e.ids, np.arange(len(data)))
    np.testing.assert_allclose(e.features.astype(np.float32), feats.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(e.pred, logits.argmax(1).numpy())
    np.testing.assert_allclose(e.conf, torch.softmax(logits, 1).max(1).values.numpy(), rtol=1e-5)


def test_confidence_of_a_model_that_ends_in_a_softmax(model, data, tmp_path):
    """A model whose output is probabilities already (a final softmax): the stored
    confidence is its probability, not the softmax of it (0.9 was stored as 0.69); one
    ending in log_softmax gives the same as its logits. Oracle: the model's own output."""
    x, _ = _all(data)
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.classifier[3].weight.mul_(30)  # confident, as a trained head is
        probs = torch.softmax(sharp(x), 1)
    # what a second softmax would have said differs enough to be seen
    assert (torch.softmax(probs, 1).max(1).values - probs.max(1).values).abs().min() > 0.05
    for name, last in (("soft", torch.nn.Softmax(1)), ("log", torch.nn.LogSoftmax(1))):
        net = torch.nn.Sequential(sharp, last)
        run = probe(net, data, out=tmp_path / name, layers="0.classifier.1", progress=False,
                    embed=True)  # fmt: skip
        e = run.embedding()
        np.testing.assert_array_equal(e.pred, probs.argmax(1).numpy())
        np.testing.assert_allclose(e.conf, probs.max(1).values.numpy(), rtol=1e-5, atol=1e-6)


class _ToBFloat16(torch.nn.Module):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16)


def test_confidence_of_a_bfloat16_model_that_ends_in_a_softmax(model, data, tmp_path):
    """A bfloat16 softmax sums to 1 only within its rounding (a few 1e-3): its rows were
    taken for logits and softmaxed again, and one such row sent its whole batch there.
    Oracle: the model's own bfloat16 output."""
    x, _ = _all(data)
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.classifier[3].weight.mul_(30)
    net = torch.nn.Sequential(sharp, _ToBFloat16(), torch.nn.Softmax(1)).eval()
    with torch.no_grad():
        probs = net(x).float()
    assert ((probs.sum(1) - 1).abs() > 1e-3).any()  # what the fixed 1e-3 refused
    run = probe(net, data, out=tmp_path / "bf16", layers="0.classifier.1", progress=False,
                embed=True, batch_size=40)  # fmt: skip
    e = run.embedding()
    np.testing.assert_array_equal(e.pred, probs.argmax(1).numpy())
    np.testing.assert_allclose(e.conf, probs.max(1).values.numpy(), rtol=1e-5, atol=1e-6)


def test_features_do_not_depend_on_batch_size(model, data, tmp_path):
    a = probe(model, data, out=tmp_path / "a", layers="classifier.1", batch_size=13,
              progress=False, embed=True).embedding()  # fmt: skip
    (ids, feats, pred, _conf), settings = collect_embedding(model, data, True, batch_size=360)
    np.testing.assert_array_equal(a.ids, ids.numpy())
    np.testing.assert_allclose(a.features.astype(np.float32), feats.float().numpy(), atol=2e-3)
    np.testing.assert_array_equal(a.pred, pred.numpy())
    assert settings["layer"] == "classifier.2"


def test_bad_embed_layer_is_named(model, data, tmp_path):
    with pytest.raises(LurkerError, match=r"embed='no\.such'.*No layer matches"):
        probe(model, data, out=tmp_path / "r", progress=False, embed="no.such")
    with pytest.raises(LurkerError, match="names 3 layers"):
        probe(model, data, out=tmp_path / "r2", progress=False, embed="Conv2d")


def test_features_over_budget_are_refused(model, data, tmp_path):
    from lurker.capture import settled_trace
    from lurker.probe.sweep import check_embed_budget, embed_layer_of

    tr = settled_trace(model, data[0][0][None])
    layer = embed_layer_of(tr, "features.8")
    with pytest.raises(LurkerError, match=r"1,000,000 samples .* needs 0\.1 GiB.*narrower layer"):
        check_embed_budget(layer, 1_000_000, budget=1 << 20)


def test_pca_equals_numpy_svd():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20))
    got = reduce(x, "pca").xy
    c = x - x.mean(0)
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    want = c @ vt[:2].T
    sign = np.sign((got * want).sum(0))  # principal axes are defined up to sign
    np.testing.assert_allclose(got * sign, want, rtol=1e-3, atol=1e-3)


def test_tsne_is_seeded_and_separates_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (3, 64))
    labels = np.repeat(np.arange(3), 60)
    x = centres[labels] + rng.normal(size=(180, 64))
    a, b = reduce(x, "tsne", seed=3).xy, reduce(x, "tsne", seed=3).xy
    np.testing.assert_array_equal(a, b)
    # every point's nearest neighbour in the map is of its own cluster
    d = ((a[:, None] - a[None]) ** 2).sum(-1) + np.eye(len(a)) * 1e9
    assert (labels[d.argmin(1)] == labels).all()


def test_bad_method_and_missing_umap():
    with pytest.raises(LurkerError, match="one of tsne, umap, pca"):
        reduce(np.zeros((5, 3)), "mds")
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(LurkerError, match="umap-learn"):
            reduce(np.random.default_rng(0).normal(size=(50, 4)), "umap")


def test_features_a_map_cannot_place_are_refused_with_the_reason():
    """Every sample the same (a layer that never fires: t-SNE divided by zero and crashed
    the process), a single sample, and one feature (t-SNE's PCA start needs two)."""
    for method in ("tsne", "pca"):
        with pytest.raises(LurkerError, match="every sample has the same features"):
            reduce(np.zeros((30, 5)), method)
        with pytest.raises(LurkerError, match="there is 1: it needs 2"):
            reduce(np.ones((1, 5)), method)
    x = np.r_[np.zeros((15, 1)), np.ones((15, 1))] + np.random.default_rng(0).normal(
        scale=0.01, size=(30, 1)
    )
    xy = reduce(x, "tsne").xy
    assert xy.shape == (30, 2) and np.isfinite(xy).all()
    a, b = xy[:15].mean(0), xy[15:].mean(0)  # the two groups apart
    spread = max(
        np.linalg.norm(xy[:15] - a, axis=1).max(), np.linalg.norm(xy[15:] - b, axis=1).max()
    )
    assert np.linalg.norm(a - b) > spread


def test_make_map_stores_one_point_per_sample(model, data, tmp_path):
    run = probe(model, data, out=tmp_path / "run", layers="classifier.1", progress=False,
                embed=True)  # fmt: skip
    with pytest.raises(MissingFromRunError, match="lurker map"):
        run.map()
    e = run.embedding()
    done = make_map(run, method="pca").map()
    assert len(done) == len(data)
    np.testing.assert_array_equal(done.ids, e.ids)
    np.testing.assert_array_equal(done.pred, e.pred)
    np.testing.assert_array_equal(done.label, _all(data)[1].numpy())
    want = reduce(e.features, "pca").xy
    np.testing.assert_allclose(np.c_[done.x, done.y], want, rtol=1e-5, atol=1e-4)
    assert done.meta["method"] == "pca" and done.meta["layer"] == "classifier.2"


def test_map_of_a_flattened_conv_map(model, data, tmp_path):
    """``lurker map --layer`` on a Flatten of a conv map places the samples by the flat
    vector (its unit axis is unknown, and ``map`` has no ``--unit-dim`` to name one)."""
    run = probe(model, data, out=tmp_path / "run", layers="classifier.1", progress=False)
    done = make_map(run, layer="classifier.0", method="pca", model=model, dataset=data)
    e = done.embedding()
    feats, _ = _hooked(model, "classifier.0", _all(data)[0])
    assert e.meta["layer"] == "classifier.0" and e.features.shape == (len(data), 512)
    np.testing.assert_allclose(e.features.astype(np.float32), feats.numpy(), rtol=2e-3, atol=2e-3)
    want = reduce(feats.numpy(), "pca").xy
    m = done.map()
    np.testing.assert_allclose(np.c_[m.x, m.y], want, rtol=1e-2, atol=2e-2)


def test_map_without_features_or_model_says_what_to_do(model, data, tmp_path):
    run = probe(model, data, out=tmp_path / "run", layers="classifier.1", progress=False)
    assert not run.has_embedding
    with pytest.raises(LurkerError, match="embed=True"):
        make_map(run, method="pca")
    assert not Run.open(run.path).has_map
    # features of another layer held: the message says which, and what another needs
    run = probe(model, data, out=tmp_path / "r2", layers="classifier.1", progress=False,
                embed=True)  # fmt: skip
    with pytest.raises(LurkerError) as err:
        make_map(run, layer="features.8", method="pca")
    said = str(err.value)
    assert "holds per-sample features of 'classifier.2' only" in said, said
    assert "pass model= and dataset=" in said and "embed=True" not in said


class _Counted(torch.utils.data.Dataset):
    """The digits, counting the items read (a pass over the data is the cost to avoid)."""

    def __init__(self, data: Any) -> None:
        self.data, self.reads = data, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        self.reads += 1
        return self.data[i]


def test_map_by_umap_without_umap_learn_is_refused_before_the_pass(model, data, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    """A run without features needs a pass over its dataset (hours on ImageNet) before it
    can be reduced: a missing umap-learn is said before that pass, not after it."""
    counted = _Counted(data)
    run = probe(model, counted, out=tmp_path / "run", layers="classifier.1", progress=False)
    reads = counted.reads
    monkeypatch.setitem(sys.modules, "umap", None)  # umap-learn not installed
    with pytest.raises(LurkerError, match=r"needs umap-learn: pip install"):
        make_map(run, method="umap", model=model, dataset=counted)
    assert counted.reads == reads  # no item of the dataset was read for nothing
    # and with the method that is installed the same call makes the map
    assert len(make_map(run, method="pca", model=model, dataset=counted).map()) == len(data)


def _cli_probe(model: Any, tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    """``lurker probe`` of ``model``'s weights on the test digits (``classifier.1``) into
    ``tmp_path/run``, as a user runs it: the weights file and the run."""
    from lurker.cli import main

    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [
        "probe", "lurker.examples:DigitsNet", "-w", str(weights), "--data", "digits:test",
        "--image-size", "16", "--out", str(out), "-l", "classifier.1", "--device", "cpu",
        *extra,
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    return weights, out


def test_cli_map_collects_features_with_the_recorded_model(model, tmp_path):
    from lurker.cli import main

    weights, out = _cli_probe(model, tmp_path)
    # umap-learn missing: said before the model is even built, not after a load
    built = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "umap", None)
        mp.setattr("lurker.models.load_model", lambda *a, **k: built.append(a))
        res = CliRunner().invoke(
            main, ["map", str(out), "--method", "umap", "--model", "lurker.examples:DigitsNet"]
        )
    assert res.exit_code != 0 and "needs umap-learn" in res.output and not built, res.output
    res = CliRunner().invoke(main, ["map", str(out), "--method", "pca", "--layer", "features.8"])
    assert res.exit_code == 0, res.output
    assert "map of 360 samples from features.8 by pca" in res.output
    with Run.open(out) as r:
        assert r.embedding().features.shape == (360, 32)
        assert len(r.map()) == 360
    res = CliRunner().invoke(main, ["map", str(out), "--layer", "nope"])
    assert res.exit_code == 2 and "No layer matches ['nope']" in res.output
    # in the command's words, with the names it may have meant
    res = CliRunner().invoke(main, ["map", str(out), "--layer", "features.88"])
    assert res.exit_code == 2 and "--layer features.88: No layer matches" in res.output
    assert "Close names: features.8" in res.output and "embed=" not in res.output
    # the probe's own flag, in its words
    res = CliRunner().invoke(main, [
        "probe", "lurker.examples:DigitsNet", "-w", str(weights), "--data", "digits:test",
        "--image-size", "16", "--out", str(tmp_path / "r2"), "-l", "classifier.1",
        "--device", "cpu", "--embed-layer", "features.88",
    ])  # fmt: skip
    assert res.exit_code == 2 and "--embed-layer features.88: No layer matches" in res.output
    assert "embed=" not in res.output
    # --weights alone: the run's own model with those weights (they moved)
    moved = tmp_path / "moved.pt"
    weights.rename(moved)
    res = CliRunner().invoke(main, ["map", str(out), "--method", "pca", "-l", "features.4"])
    assert res.exit_code == 2 and "do not exist here: pass --weights" in res.output
    res = CliRunner().invoke(
        main, ["map", str(out), "--method", "pca", "-l", "features.4", "-w", str(moved)]
    )
    assert res.exit_code == 0 and "from features.4" in res.output, res.output
    # features stored for the layer asked: --data is not needed, and said so
    res = CliRunner().invoke(main, ["map", str(out), "--method", "pca", "-d", "digits:test"])
    assert res.exit_code == 0 and "--data are not needed" in res.output, res.output


def _folder(root: Path) -> Path:
    """An ImageFolder of 2 x 5 random images, a file that is no image (skipped up front,
    not a sample) and a truncated JPEG (a sample the probe cannot decode)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            pixels = (rng.random((16, 16)) * 255).astype("uint8")
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    (root / "a" / "bad.png").write_bytes(b"not an image")
    Image.fromarray((rng.random((64, 64)) * 255).astype("uint8")).save(root / "b" / "t.jpg")
    whole = (root / "b" / "t.jpg").read_bytes()
    (root / "b" / "t.jpg").write_bytes(whole[: len(whole) // 2])
    return root


def _cli_probe_folder(model, tmp_path: Path, folder: Path) -> Path:
    from lurker.cli import main

    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [
        "probe", "lurker.examples:DigitsNet", "-w", str(weights), "--data", str(folder),
        "--image-size", "16", "--out", str(out), "-l", "classifier.1", "--device", "cpu",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


def test_cli_map_of_a_folder_with_unreadable_images(model, tmp_path):
    """The run holds the readable images and the truncated one; the map holds the readable
    ones, with the features a plain forward gives, and names the others. Fixing the bad
    file afterwards (which shifts the folder's indices) still maps the run's samples."""
    from lurker.cli import main

    folder = _folder(tmp_path / "imgs")
    out = _cli_probe_folder(model, tmp_path, folder)
    with Run.open(out) as r:
        assert r.num_samples == 11 and len(r.skipped) == 2
        by_path = {s.path: s.id for s in r.samples(range(r.num_samples))}
    # the probe's skipped file becomes readable: the folder now has 12 images, in a new order
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), "uint8")).save(folder / "a" / "bad.png", format="PNG")
    res = CliRunner().invoke(main, ["map", str(out), "--method", "pca", "--layer", "features.8"])
    assert res.exit_code == 0, res.output
    assert "map of 10 samples from features.8" in res.output
    assert "1 of the run's 11 samples are not on the map" in res.output
    assert "t.jpg" in res.output and "could not read 2 file(s)" in res.output
    ds = load_dataset(str(folder), 16, channels=1)  # as `lurker probe` loaded it
    good = [p for p in ds.paths if not p.endswith(("t.jpg", "bad.png"))]
    with Run.open(out) as r:
        e = r.embedding()
        assert e.ids.tolist() == sorted(by_path[p] for p in good)
        for p in good:  # each run sample's own features: an independent forward hook
            x = ds[ds.paths.index(p)][0][None]
            want = _hooked(model, "features.8", x)[0].mean((2, 3))[0]
            got = e.features[e.ids.tolist().index(by_path[p])].astype(np.float32)
            np.testing.assert_allclose(got, want.numpy(), rtol=2e-3, atol=2e-3)


def test_cli_map_refuses_another_folder(model, tmp_path):
    from PIL import Image

    from lurker.cli import main

    out = _cli_probe_folder(model, tmp_path, _folder(tmp_path / "imgs"))
    other = tmp_path / "other"
    for c in ("a", "b"):
        (other / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.zeros((16, 16), "uint8")).save(other / c / f"x{i}.png")
    res = CliRunner().invoke(main, ["map", str(out), "--method", "pca", "--data", str(other)])
    assert res.exit_code != 0
    assert "is not the one the run was probed with" in res.output
    assert "which still exists" in res.output and str(tmp_path / "imgs") in res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(main, ["map", str(out), "--method", "pca", "--data", "digits:test"])
    assert res.exit_code != 0 and "the run was probed with" in res.output
    assert not Run.open(out).has_map


def test_cli_map_a_moved_folder_but_not_its_twin(model, tmp_path):
    """A second folder with the same layout and file names (val/ beside train/) matches
    every relative path: refused while the run's folder exists. Once the run's folder is
    moved, the new place is taken and gives the same features as the original."""
    import shutil

    from PIL import Image

    from lurker.cli import main

    folder = _folder(tmp_path / "train")
    out = _cli_probe_folder(model, tmp_path, folder)
    twin = tmp_path / "val"
    shutil.copytree(folder, twin)
    for f in twin.rglob("*.png"):  # same names, other pixels
        if f.name != "bad.png":
            Image.fromarray(np.full((16, 16), 200, "uint8")).save(f)
    args = ["map", str(out), "--method", "pca", "--layer", "features.8", "--data"]
    res = CliRunner().invoke(main, [*args, str(twin)])
    assert res.exit_code != 0 and "which still exists" in res.output, res.output
    assert not Run.open(out).has_map
    res = CliRunner().invoke(main, [*args, str(folder)])
    assert res.exit_code == 0, res.output
    with Run.open(out) as r:
        want = r.embedding()
    shutil.rmtree(twin)
    moved = tmp_path / "moved"
    folder.rename(moved)
    ds = load_dataset(str(moved), 16, channels=1)
    other = make_map(out, layer="features.4", method="pca", model=model, dataset=ds)
    assert other.embedding().meta["layer"] == "features.4"  # collected from the moved folder
    other.close()
    again = make_map(out, layer="features.8", method="pca", model=model, dataset=ds).embedding()
    np.testing.assert_array_equal(again.ids, want.ids)
    np.testing.assert_allclose(again.features, want.features, rtol=1e-5, atol=1e-6)


def test_cli_map_from_another_directory_tells_the_twin_from_the_run_folder(
    model, tmp_path, monkeypatch
):
    """A folder given relative to where `lurker probe` ran is recorded as an absolute path:
    from another directory the run's folder is still found and its twin still refused."""
    import shutil

    from lurker.cli import main

    _folder(tmp_path / "data" / "train")
    shutil.copytree(tmp_path / "data" / "train", tmp_path / "data" / "val")
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, [
        "probe", "lurker.examples:DigitsNet", "-w", str(weights), "--data", "data/train",
        "--image-size", "16", "--out", "run", "-l", "classifier.1", "--device", "cpu",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    with Run.open(tmp_path / "run") as r:
        assert r.meta["dataset"] == str(tmp_path / "data" / "train")
        assert r.meta["config"]["data"] == str(tmp_path / "data" / "train")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    args = ["map", "../run", "--method", "pca", "--layer", "features.8"]
    res = CliRunner().invoke(main, [*args, "--data", "../data/val"])
    assert res.exit_code != 0 and "which still exists" in res.output, res.output
    res = CliRunner().invoke(main, args)  # the recorded folder, found from here
    assert res.exit_code == 0, res.output


def test_wrapped_torchvision_folder_and_other_digits_are_refused(model, tmp_path):
    """A torchvision ImageFolder (wrapped, with file paths) is matched like lurker's own
    folders, so its same-layout twin is refused; digits at another size are another
    dataset, not the same one moved."""
    import shutil

    import torchvision

    folder = _folder(tmp_path / "train")
    (folder / "a" / "bad.png").unlink()
    (folder / "b" / "t.jpg").unlink()
    shutil.copytree(folder, tmp_path / "val")
    tf = torchvision.transforms.Compose(
        [torchvision.transforms.Grayscale(), torchvision.transforms.ToTensor()]
    )
    train = torchvision.datasets.ImageFolder(str(folder), transform=tf)
    probe(model, train, out=tmp_path / "run", layers="classifier.1", progress=False).close()
    val = torchvision.datasets.ImageFolder(str(tmp_path / "val"), transform=tf)
    with pytest.raises(LurkerError, match="which still exists"):
        make_map(tmp_path / "run", method="pca", model=model, dataset=val)
    assert make_map(tmp_path / "run", method="pca", model=model, dataset=train).has_map
    digits = probe(model, load_dataset("digits:test", 16, channels=1), out=tmp_path / "d",
                   layers="classifier.1", progress=False)  # fmt: skip
    digits.close()
    with pytest.raises(LurkerError, match="the run was probed with digits:test"):
        make_map(tmp_path / "d", method="pca", model=model,
                 dataset=load_dataset("digits:test", 32, channels=1))  # fmt: skip


def test_map_of_a_moved_dataset_warns_and_another_kind_is_refused(model, tmp_path):
    """Datasets without files match by description: the same kind and length read from
    another place is taken with a warning once the recorded place is gone; while it
    exists, or with another kind or length, it is refused."""

    class Pts(torch.utils.data.Dataset):
        def __init__(self, root, n=12):
            g = torch.Generator().manual_seed(0)
            self.x = torch.rand(n, 1, 16, 16, generator=g)
            self.root = root

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], i % 10

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    run = probe(model, Pts(str(old)), out=tmp_path / "run", layers="classifier.1",
                progress=False)  # fmt: skip
    recorded = run.meta["dataset"]
    run.close()
    assert str(old) in recorded
    # the recorded place still exists: another place is another dataset
    with pytest.raises(LurkerError, match="the run was probed with Pts"):
        make_map(tmp_path / "run", method="pca", model=model, dataset=Pts(str(new)))
    old.rmdir()
    with pytest.warns(UserWarning, match="taken as the same data moved") as rec:
        m = make_map(tmp_path / "run", method="pca", model=model, dataset=Pts(str(new)))
    assert rec[0].filename == __file__  # the user's line, not lurker's
    assert len(m.map().x) == 12
    with pytest.raises(LurkerError, match="with 8 samples, the run was probed with"):
        make_map(tmp_path / "run", layer="features.4", method="pca", model=model,
                 dataset=Pts(str(new), 8))  # fmt: skip


def test_api_map_document(model, data, tmp_path):
    from fastapi.testclient import TestClient

    from lurker.server.app import create_app

    run = probe(model, data, out=tmp_path / "run", layers="classifier.1", progress=False,
                embed=True)  # fmt: skip
    client = TestClient(create_app(str(run.path)))
    rid = Path(run.path).name
    r = client.get(f"/api/runs/{rid}/map")
    assert r.status_code == 404 and "lurker map" in r.json()["detail"]
    assert client.get(f"/api/runs/{rid}").json()["holds"]["map"] is False
    m = make_map(run, method="pca").map()
    client = TestClient(create_app(str(run.path)))
    doc = client.get(f"/api/runs/{rid}/map").json()
    assert client.get(f"/api/runs/{rid}").json()["holds"]["map"] is True
    assert doc["count"] == len(data) == len(doc["x"]) == len(doc["ids"]) == len(doc["conf"])
    assert doc["classes"] == [str(i) for i in range(10)]
    np.testing.assert_allclose(doc["x"], m.x, atol=1e-3)
    assert doc["pred"] == m.pred.tolist() and doc["label"] == m.label.tolist()
    assert doc["extent"] == pytest.approx([m.x.min(), m.x.max(), m.y.min(), m.y.max()])


def test_predictions_of_a_head_that_is_not_the_datasets_classes(data, tmp_path):
    """A 12-output head over the 10 digit classes, with logits so small that float32's
    softmax is uniform: each prediction is still the logits' argmax (not class 0 for all),
    and the map document says that predictions are not the dataset's labels."""
    from fastapi.testclient import TestClient

    from lurker.server.app import create_app

    torch.manual_seed(1)
    net = DigitsNet().eval()
    net.classifier[3] = torch.nn.Linear(64, 12)
    with torch.no_grad():
        net.classifier[3].weight.mul_(1e-7)
        net.classifier[3].bias.zero_()
    xs, _ = _all(data)
    with torch.no_grad():
        logits = net(xs)
    assert (torch.softmax(logits, 1).max(1).values == torch.softmax(logits, 1)[:, 0]).all()
    run = probe(net, data, out=tmp_path / "run", layers="classifier.1", progress=False,
                embed=True)  # fmt: skip
    m = make_map(run, method="pca").map()
    assert (m.pred == logits.argmax(1).numpy()[m.ids]).all()
    assert len(set(m.pred.tolist())) > 1
    client = TestClient(create_app(str(run.path)))
    doc = client.get("/api/runs/run/map").json()
    assert doc["outputs"] == 12 and doc["comparable"] is False
    # a sample's page gives the recorded output, never a dataset class's name for it
    sid = int(m.ids[np.argmax(m.pred)])
    stored = client.get(f"/api/runs/run/samples/{sid}").json()["stored_prediction"]
    assert stored["class"] == int(logits[sid].argmax()) and stored["name"] is None


def test_map_document_says_predictions_are_the_classes(model, data, tmp_path):
    from fastapi.testclient import TestClient

    from lurker.server.app import create_app

    run = probe(model, data, out=tmp_path / "run", layers="classifier.1", progress=False,
                embed=True)  # fmt: skip
    make_map(run, method="pca").close()
    doc = TestClient(create_app(str(run.path))).get("/api/runs/run/map").json()
    assert doc["outputs"] == 10 and doc["comparable"] is True


def test_sample_document_carries_the_recorded_prediction(model, data, tmp_path):
    """With no model attached (a run made from Python; a static export), a sample's page
    still has the model's top class and probability that the probe recorded (oracle: the
    model's own softmax), the map's once there is a map, and none in a run without."""
    from fastapi.testclient import TestClient

    from lurker.server.app import create_app

    xs, labels = _all(data)
    with torch.no_grad():
        probs = torch.softmax(model(xs), 1)
    run = probe(model, data, out=tmp_path / "run", layers="classifier.1", progress=False,
                embed=True)  # fmt: skip
    ids = [0, int(torch.nonzero(probs.argmax(1) != labels)[0]), len(data) - 1]
    for mapped in (False, True):
        if mapped:
            make_map(run, method="pca").close()
        client = TestClient(create_app(str(run.path)))
        for sid in ids:
            doc = client.get(f"/api/runs/run/samples/{sid}").json()
            assert doc["prediction"] is None  # no model: only what the run recorded
            want = int(probs[sid].argmax())
            assert doc["stored_prediction"]["class"] == want
            assert doc["stored_prediction"]["name"] == str(want)  # digits' classes: "0".."9"
            assert doc["stored_prediction"]["prob"] == pytest.approx(
                float(probs[sid, want]), abs=1e-5
            )
    plain = probe(model, data, out=tmp_path / "plain", layers="classifier.1", progress=False)
    doc = TestClient(create_app(str(plain.path))).get("/api/runs/plain/samples/0").json()
    assert doc["stored_prediction"] is None


@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[1] / "src/lurker/server/static/index.html").exists(),
    reason="the export needs the built front end (make web)",
)
def test_export_writes_the_map_document(model, data, tmp_path):
    import json

    from fastapi.testclient import TestClient

    from lurker.server.app import create_app
    from lurker.server.export import export_site

    run = probe(model, data, out=tmp_path / "run", layers="classifier.1", progress=False,
                embed=True)  # fmt: skip
    make_map(run, method="pca").close()
    site = export_site(run.path, tmp_path / "site", make_images=False, progress=False)
    written = json.loads((site / "data" / "runs" / "run" / "map.json").read_text())
    served = TestClient(create_app(str(run.path))).get("/api/runs/run/map").json()
    assert written == served and written["count"] == len(data)


def _crashed() -> Any:
    """What a probe says when :class:`_FailsOnce` raises: the dataset's error, named with
    its items, as the cause of lurker's paragraph (the batches before it checkpointed)."""
    return pytest.raises(LurkerError, match=r"raised RuntimeError: crash")


class _FailsOnce(torch.utils.data.Dataset):
    """The test digits, raising once at sample ``at`` (a crash in the middle of the sweep)."""

    def __init__(self, data: Any, at: int = 120) -> None:
        self.data, self.armed, self.at = data, True, at
        self.targets = [int(data[i][1]) for i in range(len(data))]  # no read in planning

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        if i == self.at and self.armed:
            self.armed = False
            raise RuntimeError("crash")
        return self.data[i]


def test_resumed_probe_keeps_the_features_of_both_parts(model, data, tmp_path):
    flaky = _FailsOnce(data)
    kw = {"layers": "classifier.1", "batch_size": 50, "progress": False, "embed": True,
          "relevance": True}  # fmt: skip
    with _crashed():
        probe(model, flaky, out=tmp_path / "r", checkpoint_every=1, **kw)
    done = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["done"]
    assert 0 < done < len(data)
    run = probe(model, flaky, out=tmp_path / "r", **kw)
    assert run.meta["sweep"]["images"] == len(data) - done  # it did resume
    resumed = run.embedding()
    whole = probe(model, data, out=tmp_path / "w", **kw).embedding()
    np.testing.assert_array_equal(resumed.ids, whole.ids)
    np.testing.assert_array_equal(resumed.features, whole.features)
    np.testing.assert_array_equal(resumed.pred, whole.pred)
    # the relevance lists are checkpointed and resumed as well
    other = Run.open(tmp_path / "w")
    for u in range(run.layers[0].num_units):
        got = [(e.sample_id, e.value) for e in run.unit("classifier.1", u).top("relevance")]
        assert got == [
            (e.sample_id, e.value) for e in other.unit("classifier.1", u).top("relevance")
        ]


@pytest.mark.parametrize("crash", ["dataset", "between_rows_and_checkpoint"])
def test_features_resume_bit_exactly_after_a_crash(model, data, tmp_path, monkeypatch, crash):
    """Killed after a checkpoint (a dataset error) or between a checkpoint's rows write and
    its checkpoint file: the resumed run's features equal an uninterrupted run's, no row
    lost or repeated."""
    import lurker.probe.sweep as sweep

    kw = {"layers": "classifier.1", "batch_size": 20, "progress": False, "embed": "features.8"}
    out, ds = tmp_path / "r", _FailsOnce(data, at=130)  # raises once, then reads as data
    if crash == "dataset":
        with _crashed():
            probe(model, ds, out=out, checkpoint_every=2, **kw)
    else:
        real, calls = sweep.atomic_write_bytes, []

        def dies_on_the_third(path: Any, payload: bytes, **kwargs: Any) -> Any:
            calls.append(path)
            if len(calls) == 3:
                raise RuntimeError("crash")
            return real(path, payload, **kwargs)

        monkeypatch.setattr(sweep, "atomic_write_bytes", dies_on_the_third)
        ds.armed = False
        with pytest.raises(RuntimeError, match="crash"):
            probe(model, ds, out=out, checkpoint_every=1, **kw)
        monkeypatch.setattr(sweep, "atomic_write_bytes", real)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    done, committed = state["done"], state["embedding"]["rows"]
    assert committed == done and 0 < done < len(data)
    written = (out / "checkpoint-embedding.rows").stat().st_size // state["embedding"]["row_bytes"]
    # the second crash leaves a batch of rows that no checkpoint committed
    assert written == (done + 20 if crash != "dataset" else done)
    run = probe(model, ds, out=out, **kw)
    assert run.meta["sweep"]["images"] == len(data) - done  # it did resume
    assert not list(out.glob("checkpoint*"))  # checkpoint and rows file gone with the results
    resumed, whole = run.embedding(), probe(model, data, out=tmp_path / "w", **kw).embedding()
    np.testing.assert_array_equal(resumed.ids, np.arange(len(data)))
    np.testing.assert_array_equal(resumed.features, whole.features)
    np.testing.assert_array_equal(resumed.pred, whole.pred)
    np.testing.assert_array_equal(resumed.conf, whole.conf)


def test_resume_without_embed_leaves_no_rows_file(model, data, tmp_path):
    """A sweep killed while keeping features, resumed without asking for them: the run
    completes and the row file the first call wrote goes with its checkpoint."""
    kw = {"layers": "classifier.1", "batch_size": 20, "progress": False}
    out = tmp_path / "r"
    flaky = _FailsOnce(data, at=130)
    with _crashed():
        probe(model, flaky, out=out, checkpoint_every=1, embed=True, **kw)
    assert (out / "checkpoint-embedding.rows").stat().st_size > 0
    run = probe(model, flaky, out=out, **kw)
    assert run.meta["sweep"]["images"] < len(data)  # it did resume
    assert not list(out.glob("checkpoint*"))
    assert not run.has_embedding


def test_checkpoint_size_does_not_grow_with_the_saved_features(model, data, tmp_path):
    """A checkpoint after 2k batches is as large as one after k: the features go to the
    rows file beside it, once each, instead of into every checkpoint."""
    kw = {"layers": "classifier.1", "batch_size": 20, "progress": False, "embed": "features.8",
          "checkpoint_every": 1}  # fmt: skip
    sizes = {}
    for at in (80, 160):  # crash in batch 5 and batch 9: 4 and 8 batches checkpointed
        out = tmp_path / str(at)
        with _crashed():
            probe(model, _FailsOnce(data, at=at), out=out, **kw)
        rows = torch.load(out / "checkpoint.pt", weights_only=True)["embedding"]
        assert rows["rows"] == at
        sizes[at] = (out / "checkpoint.pt").stat().st_size, (out / "checkpoint-embedding.rows")
    (ckpt_k, rows_k), (ckpt_2k, rows_2k) = sizes[80], sizes[160]
    row_bytes = torch.load(tmp_path / "80" / "checkpoint.pt", weights_only=True)["embedding"][
        "row_bytes"
    ]
    assert row_bytes == 8 + 8 + 4 + 2 * 32  # id, prediction, confidence, 32 float16 features
    assert abs(ckpt_2k - ckpt_k) < row_bytes  # not even one row's worth more
    assert rows_k.stat().st_size == 80 * row_bytes
    assert rows_2k.stat().st_size == 160 * row_bytes


def _dist_worker(rank: int, out: str) -> None:
    torch.manual_seed(0)
    probe(DigitsNet().eval(), load_dataset("digits:test", 16, channels=1), out=out,
          layers="classifier.1", batch_size=32, progress=False, device="cpu",
          embed="features.8", relevance=True)  # fmt: skip


def test_two_ranks_gather_every_samples_features(model, data, tmp_path):
    dist_ranks.spawn(_dist_worker, str(tmp_path / "dist"))
    got = Run.open(tmp_path / "dist").embedding()
    one = probe(model, data, out=tmp_path / "one", layers="classifier.1", progress=False,
                embed="features.8", relevance=True)  # fmt: skip
    want = one.embedding()
    # relevance lists merged across the ranks: the same values as one process's
    dist = Run.open(tmp_path / "dist")
    for u in range(one.layers[0].num_units):
        a = [e.value for e in dist.unit("classifier.1", u).top("relevance")]
        b = [e.value for e in one.unit("classifier.1", u).top("relevance")]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(got.ids, np.arange(len(data)))
    np.testing.assert_allclose(got.features.astype(np.float32), want.features.astype(np.float32),
                               atol=2e-3)  # fmt: skip
    np.testing.assert_array_equal(got.pred, want.pred)


def test_map_refuses_another_model(model, data, tmp_path):
    """Features and predictions of a model other than the run's would be stored as the
    run's: refused before anything is written."""
    import copy

    run = probe(model, data, out=tmp_path / "run", layers="classifier.1", progress=False)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(LurkerError, match="not the one run"):
        make_map(run, method="pca", model=other, dataset=data)
    assert not Run.open(run.path).has_embedding
    assert make_map(run, method="pca", model=model, dataset=data).has_map


def _sklearn_pca_of_hooked(model, data, module: str) -> np.ndarray:
    """Oracle: the module's output by a forward hook, mean-pooled per channel, as float16
    (as stored), placed by scikit-learn's PCA."""
    from sklearn.decomposition import PCA

    out, _ = _hooked(model, module, _all(data)[0])
    feats = out.flatten(2).mean(2).to(torch.float16).float().numpy()
    return PCA(n_components=2).fit_transform(feats.astype(np.float64))


def _same_up_to_sign(got: np.ndarray, want: np.ndarray) -> None:
    signs = np.sign((got * want).sum(0))  # PCA axes are defined up to their sign
    np.testing.assert_allclose(got * signs, want, rtol=1e-4, atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize("alias", ["features.9", "relu_3", "features"])
def test_map_of_another_name_of_the_held_layer_uses_the_held_features(model, data, tmp_path,
                                                                       alias):  # fmt: skip
    """`features` (the Sequential) outputs the very tensor `features.9` (its last ReLU,
    op relu_3) does: asking for it by any of these names maps the features the run holds,
    without a second pass over the dataset, and the map is the PCA of that layer."""
    counted = _Counted(data)
    run = probe(model, counted, out=tmp_path / "run", layers="classifier.1", progress=False,
                embed="features.9")  # fmt: skip
    before = run.embedding()
    reads = counted.reads
    done = make_map(run, layer=alias, method="pca", model=model, dataset=counted)
    assert counted.reads - reads <= 1  # the first image, to trace the model: no sweep
    after, m = done.embedding(), done.map()
    assert after.meta["layer"] == m.meta["layer"] == "features.9"
    np.testing.assert_array_equal(after.features, before.features)
    want = _sklearn_pca_of_hooked(model, data, "features.9")
    _same_up_to_sign(np.c_[m.x, m.y].astype(np.float64), want)


def test_cli_map_of_an_alias_of_the_held_layer_does_not_sweep(model, tmp_path, monkeypatch):
    from lurker.cli import main

    _, out = _cli_probe(model, tmp_path, "--embed-layer", "features.9")
    with Run.open(out) as r:
        held = r.embedding().features
    swept: list[int] = []
    real = load_dataset
    monkeypatch.setattr(
        "torch.utils.data.DataLoader.__iter__",
        lambda self: swept.append(1) or iter(()),
    )
    for alias in ("features", "relu_3"):
        res = CliRunner().invoke(main, ["map", str(out), "--method", "pca", "--layer", alias])
        assert res.exit_code == 0, res.output
        assert "map of 360 samples from features.9 by pca" in res.output, res.output
    assert not swept  # no pass over the dataset
    with Run.open(out) as r:
        np.testing.assert_array_equal(r.embedding().features, held)
        m = r.map()
    want = _sklearn_pca_of_hooked(model, real("digits:test", 16, channels=1), "features.9")
    _same_up_to_sign(np.c_[m.x, m.y].astype(np.float64), want)


@pytest.mark.parametrize("top", [None, 0.99949])
def test_map_document_confidences_are_the_models_softmax(data, tmp_path, top):
    """Oracle: the model run by hand on every sample. Each point's confidence is the softmax
    probability of its predicted class (to float32's precision: rounded to 4 decimals,
    0.99949 was sent as 0.9995, which the page's 3 digits show as 100%), and the
    misclassified samples are those whose logits' argmax is not the label."""
    from fastapi.testclient import TestClient

    from lurker.server.app import create_app

    torch.manual_seed(3)
    net = DigitsNet().eval()
    if top is not None:  # every sample: class 0 at exactly `top`, the rest shared alike
        with torch.no_grad():
            net.classifier[3].weight.zero_()
            net.classifier[3].bias.copy_(torch.log(torch.tensor([top] + [(1 - top) / 9] * 9)))
    xs, ys = _all(data)
    with torch.no_grad():
        logits = net(xs).double()
    want_conf = torch.softmax(logits, 1).max(1).values.numpy()
    want_wrong = int((logits.argmax(1) != ys).sum())
    run = probe(net, data, out=tmp_path / "run", layers="classifier.1", progress=False,
                embed=True)  # fmt: skip
    make_map(run, method="pca").close()
    doc = TestClient(create_app(str(run.path))).get("/api/runs/run/map").json()
    ids, conf = np.array(doc["ids"]), np.array(doc["conf"], dtype=np.float64)
    np.testing.assert_allclose(conf, want_conf[ids], rtol=0, atol=1e-6)
    pred, label = np.array(doc["pred"]), np.array(doc["label"])
    assert doc["comparable"] and int((pred != label).sum()) == want_wrong
    if top is not None:  # as the page writes it: 3 significant digits of the percentage
        assert {f"{100 * c:.3g}" for c in conf} == {"99.9"}


class _ReshapedCNN(torch.nn.Module):
    """A conv map flattened with ``reshape`` (not ``flatten(1)``): its batch axes are found
    by replaying the model, and the reshaped layer's units are unknown."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.reshape(h.shape[0], -1))


def test_map_layer_of_a_flat_output_reuses_the_batch_axes_found_with_the_layouts():
    """Naming a flattened layer for the map reads its batch axis from the layouts already
    found (the model was replayed once for them), without replaying the model again."""
    import lurker
    from lurker.probe.layout import infer_layouts
    from lurker.probe.sweep import embed_layer_of

    model = _ReshapedCNN().eval()
    tr = lurker.trace(model, torch.randn(1, 1, 8, 8))
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        layouts = infer_layouts(tr)
        assert len(calls) == 2  # the replay at 2x and 3x the batch: this model needs it
        calls.clear()
        layer = embed_layer_of(tr, "reshape_1", layouts=layouts)
    finally:
        hook.remove()
    assert calls == []
    assert (layer.name, layer.layout.batch, layer.layout.unit) == ("reshape_1", 0, 1)
    assert layer.layout.positions == ()


def test_features_beyond_float16_are_warned_and_recorded(model, data, tmp_path):
    """A layer reaching past float16's 65,504 was stored as inf with no word until the
    map refused it. Oracle: the float32 features by a forward hook."""
    big = copy.deepcopy(model)
    with torch.no_grad():
        big.classifier[1].weight.mul_(1e6)
    x, _ = _all(data)
    ref, _ = _hooked(big, "classifier.2", x)
    over = ref.abs() > 65504
    assert 0 < int(over.sum()) < ref.numel()
    with pytest.warns(UserWarning, match=r"'classifier\.2'.*exceed float16") as w:
        run = probe(big, data, out=tmp_path / "r", layers="classifier.1", progress=False,
                    embed=True, batch_size=50)  # fmt: skip
    said = next(str(m.message) for m in w if "float16" in str(m.message))
    assert f"{int(over.sum()):,} feature values" in said
    assert f"{float(ref.abs().max()):.4g}" in said and "docs/tracing.md" in said
    e = run.embedding()
    np.testing.assert_array_equal(np.isinf(e.features), over.numpy())
    assert e.meta["overflow"]["values"] == int(over.sum())
    assert e.meta["overflow"]["max_abs"] == pytest.approx(float(ref.abs().max()), rel=1e-6)
    with pytest.raises(LurkerError, match=rf"{int(over.sum()):,} values beyond float16"):
        make_map(run, method="pca")


class _LastStep(torch.nn.Module):
    """An LSTM's last step feeds the head: ``out[:, -1]``, time on axis 1."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(3, 8, batch_first=True)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0][:, -1])


class _OneChannel(torch.nn.Module):
    """A conv's channel 0 over time feeds the head: ``h[:, 0]`` of ``(B, C, L)``, whose
    axis 1 is channels, no place in the signal."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(3, 8, 5, padding=2)
        self.fc = torch.nn.Linear(40, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x)[:, 0])


@pytest.mark.parametrize(
    ("make", "shape", "said", "picked"),
    [
        (_LastStep, (40, 3), "time step 39 of 40 (the last) of the output of lstm", (1, -1)),
        (_OneChannel, (3, 40), "entry 0 of axis 1 (8 long) of the output of conv", (1, 0)),
    ],
    ids=["time-step", "channel"],
)
def test_map_title_names_a_signal_layers_entry_by_its_axis(make, shape, said, picked, tmp_path):
    """The map's ``layer_said`` called any entry picked off axis 1 a token: an LSTM's
    last step on a signal run was "token 39 of 40", and a conv's channel 0 "token 0 of
    8". Now a time step where the signal's time runs along the axis (its receptive
    field), else the entry by its axis. Oracle: the stored features are that entry of the
    module's output, by a forward hook."""
    from fastapi.testclient import TestClient

    from lurker.server.app import create_app

    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(32, *shape)
    ds = torch.utils.data.TensorDataset(x, torch.randint(0, 4, (32,)))
    run = probe(model, ds, out=tmp_path / "run", k=2, progress=False, device="cpu", embed=True)
    seen: list[torch.Tensor] = []
    module = model.lstm if make is _LastStep else model.conv
    hook = module.register_forward_hook(
        lambda m, i, o: seen.append(o[0] if make is _LastStep else o)
    )
    with torch.no_grad():
        model(x)
    hook.remove()
    out = seen[0]
    got = torch.tensor(np.asarray(run.embedding().features, dtype=np.float32))
    torch.testing.assert_close(got, out.select(*picked), atol=2e-3, rtol=2e-3)
    make_map(run, method="pca")
    client = TestClient(create_app(str(run.path)))
    doc = client.get(f"/api/runs/{Path(run.path).name}/map").json()
    assert doc["layer_said"].startswith(said + " (op ")
