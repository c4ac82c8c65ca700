"""Feature visualization: the optimized images excite their units (brute-force oracles over
the digits), a layer batched equals each unit alone, the parametrization equals a numpy
computation, results round-trip through the run, and bad input gets a clear error."""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lurker
from lurker.cli import main
from lurker.errors import LurkerError
from lurker.featviz import FourierImage, MacoImage, Transforms, color_matrix, spectrum_scale
from lurker.featviz.core import _diversity
from lurker.store import MissingFromRunError, Run, UnknownLayerError


@pytest.fixture(scope="module")
def digits():
    from lurker.examples import digits_tensors, train_digits

    torch.manual_seed(0)
    model, _ = train_digits(2, log=lambda *_: None)
    x, _ = digits_tensors(16, "all")
    return model.eval(), x


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from explorer_fixtures import build_run

    return build_run(tmp_path_factory.mktemp("fv")).path


def _channel_means(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """Each unit's spatial-mean activation for every image of ``x``: (N, C)."""
    got = {}
    h = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, o: got.__setitem__("a", o.detach().clone())
    )
    with torch.no_grad():
        model(x)
    h.remove()
    a = got["a"]
    return a.reshape(a.shape[0], a.shape[1], -1).mean(2)


def test_images_excite_their_units_beyond_random_and_dataset_images(digits):
    model, x = digits
    fv = lurker.featviz(model, "features.8", steps=96, size=16)
    assert fv.images.shape == (32, 1, 16, 16)
    assert fv.images.min() >= 0 and fv.images.max() <= 1
    # the activations it reports are those of its images (an independent forward)
    again = _channel_means(model, "features.8", fv.images)
    assert torch.allclose(again.diagonal(), fv.activations, rtol=1e-4, atol=1e-5)
    best_dataset = _channel_means(model, "features.8", x).max(0).values
    torch.manual_seed(1)
    noise = _channel_means(model, "features.8", torch.rand(256, 1, 16, 16))
    beats_data = (fv.activations > best_dataset).float().mean().item()
    assert beats_data >= 0.75, f"only {beats_data:.0%} of units beat their best digit"
    # far beyond what random images reach: more than 4 deviations above their mean
    z = (fv.activations - noise.mean(0)) / noise.std(0)
    print(f"beats best digit: {beats_data:.0%}; z over noise: {z.median():.1f}")
    assert (z > 4).float().mean() >= 0.9, z
    assert (fv.activations > fv.start).all()


def test_a_unit_alone_equals_the_unit_in_its_layers_batch(digits):
    model = type(digits[0])()
    model.load_state_dict(digits[0].state_dict())
    model = model.double().eval()  # float64: a batch changes no rounding that matters
    kw = dict(steps=12, size=16, seed=3)
    batch = lurker.featviz(model, "features.4", units=[0, 5, 9, 30], batch_size=4, **kw)
    alone = lurker.featviz(model, "features.4", units=[9], **kw)
    chunked = lurker.featviz(model, "features.4", units=[0, 5, 9, 30], batch_size=1, **kw)
    assert torch.allclose(batch.images[2], alone.images[0], atol=1e-9)
    assert torch.allclose(batch.activations[2], alone.activations[0], rtol=1e-9)
    assert torch.allclose(batch.images, chunked.images, atol=1e-9)
    # another seed is another image
    other = lurker.featviz(model, "features.4", units=[9], steps=12, size=16, seed=4)
    assert not torch.allclose(other.images, alone.images, atol=1e-3)


def test_trace_label_and_functional_op_targets(digits):
    model, _ = digits
    tr = lurker.trace(model, torch.zeros(1, 1, 16, 16), save="none")
    label = tr["features.8"].label  # the ReLU module's op, named by its trace label
    kw = dict(units=[1, 2], steps=6, size=16)
    by_path = lurker.featviz(model, "features.8", **kw)
    by_label = lurker.featviz(model, label, **kw)
    assert torch.allclose(by_path.images, by_label.images, atol=1e-5)

    class Functional(nn.Module):  # a functional op that no module hook reaches
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.relu(self.conv(x)) * 2

    net = Functional().eval()
    names = [op.label for op in lurker.trace(net, torch.zeros(1, 3, 8, 8), save="none").ops]
    assert "mul_1" in names
    fv = lurker.featviz(net, "mul_1", steps=4, size=12)
    assert fv.images.shape == (4, 3, 12, 12)
    # its activation is the op's own: 2 * relu(conv(image)), spatially averaged
    with torch.no_grad():
        x = (fv.images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]
        ).view(1, 3, 1, 1)
        want = (2 * torch.relu(net.conv(x))).mean((2, 3)).diagonal()
    assert torch.allclose(fv.activations, want, rtol=1e-4, atol=1e-6)


def test_a_module_that_runs_twice_is_refused_and_each_call_is_its_own_layer():
    """ResNet's shared ``relu`` runs twice per block: ``layer1.0.relu`` used to be read at
    its first call, silently (Lucent reads the last; the probe names each call), so a
    researcher visualizing the block's output got another unit's image."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.conv2(self.act(self.conv1(x))) - 0.5)

    torch.manual_seed(0)
    net = Shared().eval()
    kw = dict(units=[0, 2], steps=8, size=12, channels=1)
    with pytest.raises(LurkerError, match=r"'act' runs 2 times.*act:1, act:2"):
        lurker.featviz(net, "act", **kw)

    def calls(images: torch.Tensor) -> list[torch.Tensor]:
        seen = []  # the oracle: the module's output at each call, by a forward hook
        h = net.act.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
        with torch.no_grad():
            net(images)
        h.remove()
        return seen

    for call, layer in ((0, "act:1"), (1, "act:2")):
        fv = lurker.featviz(net, layer, **kw)
        want = calls(fv.images)[call].mean((2, 3))[[0, 1], [0, 2]]
        assert torch.allclose(fv.activations, want, rtol=1e-4, atol=1e-6), (layer, want)


def test_units_of_a_token_layer_without_a_run():
    """Without a run, a ViT block's units are its last axis (as the probe reads them), not
    its tokens: each image's activation is its unit's mean over the tokens, by a forward
    hook; unit_dim names another axis (here the tokens)."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(16, 4, 1, 2, 16, 32, num_classes=10).eval()
    block = "encoder.layers.encoder_layer_0"
    block_out = _hooked_output(vit, block)

    units = [3, 15]
    fv = lurker.featviz(vit, block, units=units, steps=4, size=16, transforms=False)
    out = block_out(fv.images)  # (2, 17, 16): tokens, then units
    want = torch.stack([out[i, :, u].mean() for i, u in enumerate(units)])
    assert torch.allclose(fv.activations, want, rtol=1e-4, atol=1e-6)
    fv = lurker.featviz(vit, block, units=[1], steps=2, size=16, transforms=False, unit_dim=1)
    assert torch.allclose(fv.activations, block_out(fv.images)[0, 1].mean(), rtol=1e-4, atol=1e-6)


def test_direction_and_neuron_objectives(digits):
    model, _ = digits
    kw = dict(steps=8, size=16, seed=1)
    channel = lurker.featviz(model, "features.8", units=[7], **kw)
    onehot = torch.eye(32, dtype=torch.float64)[:8]  # direction 7 is channel 7
    direction = lurker.featviz(
        model, "features.8", [7], objective="direction", directions=onehot, **kw
    )
    assert direction.units == [7]
    # a one-hot direction is that channel: the same optimization, the same image
    assert torch.allclose(direction.images, channel.images, atol=1e-5)
    neuron = lurker.featviz(model, "features.8", units=[7], objective="neuron", **kw)
    assert neuron.settings["position"] == [2, 2]  # the centre of the 4x4 map
    got = {}
    h = model.features[8].register_forward_hook(lambda m, i, o: got.__setitem__("a", o.clone()))
    with torch.no_grad():
        model(neuron.images)
    h.remove()
    assert torch.allclose(got["a"][0, 7, 2, 2], neuron.activations[0], rtol=1e-4)


def test_several_images_per_unit_and_the_diversity_term(digits):
    model, _ = digits
    fv = lurker.featviz(model, "features.8", units=[0, 1], images_per_unit=3, steps=4, size=16)
    assert fv.images.shape == (2, 3, 1, 16, 16) and fv.activations.shape == (2, 3)
    # the term against a loop over pairs (Lucid's definition, per image)
    act = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    a = act.reshape(6, 4, -1).numpy()
    grams = [g.ravel() / np.linalg.norm(g) for g in (a @ a.transpose(0, 2, 1))]
    want = [
        np.mean([grams[i] @ grams[j] for j in range(3 * (i // 3), 3 * (i // 3) + 3) if j != i])
        for i in range(6)
    ]
    assert np.allclose(_diversity(act, 3).numpy(), want)


def test_fourier_image_equals_numpy():
    rng = np.random.default_rng(0)
    n, c, h, w = 2, 3, 10, 13
    spec = rng.standard_normal((n, c, h, w // 2 + 1, 2))
    got = FourierImage(torch.as_tensor(spec), h, w)().detach().numpy()
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.maximum(np.hypot(fy, fx), 1 / max(h, w))
    spatial = np.fft.irfft2((spec[..., 0] + 1j * spec[..., 1]) / f, s=(h, w), norm="ortho") / 4
    lucid = np.array([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    lucid = lucid / max(np.linalg.norm(lucid[:, k]) for k in range(3))
    rgb = np.einsum("dc,nchw->ndhw", lucid, spatial)
    assert np.allclose(got, 1 / (1 + np.exp(-rgb)), atol=1e-12)
    assert np.allclose(color_matrix(1), np.eye(1)) and np.allclose(color_matrix(4), np.eye(4))
    one = FourierImage(torch.as_tensor(spec[:, :1]), h, w)().detach().numpy()
    assert np.allclose(one, 1 / (1 + np.exp(-spatial[:, :1])), atol=1e-12)


def test_the_random_start_has_a_one_over_f_spectrum():
    """White noise through the parametrization: power falls as 1/f^2, like natural images."""
    h = w = 64
    rng = np.random.default_rng(1)
    spec = torch.as_tensor(rng.standard_normal((64, 1, h, w // 2 + 1, 2)))
    img = FourierImage(spec, h, w)().detach().numpy()[:, 0]
    logits = np.log(img / (1 - img))  # undo the sigmoid
    power = (np.abs(np.fft.fft2(logits)) ** 2).mean(0)
    f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    keep = (f > 2 / h) & (f < 0.4)
    slope = np.polyfit(np.log(f[keep]), np.log(power[keep]), 1)[0]
    assert -2.2 < slope < -1.8


def test_maco_keeps_the_magnitude_and_changes_the_phase():
    h, w = 12, 12
    rng = np.random.default_rng(2)
    phase = torch.as_tensor(rng.uniform(-np.pi, np.pi, (1, 1, h, w // 2 + 1)))
    img = MacoImage(phase, h, w)().detach().numpy()[0, 0]
    spatial = np.log(img / (1 - img))
    assert abs(spatial.mean()) < 1e-9 and abs(spatial.std(ddof=1) - 1) < 1e-3
    mag = np.abs(np.fft.rfft2(spatial))[:, 1 : w // 2]  # columns where rfft2 is one-to-one
    ratio = mag / spectrum_scale(h, w)[:, 1 : w // 2]
    assert np.allclose(ratio, ratio.mean(), rtol=1e-6)


def test_maco_option_optimizes(digits):
    model, _ = digits
    fv = lurker.featviz(model, "features.8", units=[0, 1, 2], param="maco", steps=16, size=16)
    assert (fv.activations > fv.start).all()


def test_a_model_of_one_image_size_gets_its_size_with_transforms(digits):
    """A ViT takes its image size only (torchvision asserts it): with the transforms on,
    the padding is cut off after the warp, so every step's image is the size it takes and
    the images excite their units beyond the random start; a CNN keeps Lucid's padding."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(16, 4, 1, 2, 16, 32, num_classes=10).eval()
    sizes = []
    h = vit.conv_proj.register_forward_pre_hook(lambda m, i: sizes.append(i[0].shape[-2:]))
    try:
        fv = lurker.featviz(vit, "encoder.layers.encoder_layer_0", units=[3, 15], steps=8, size=16)
    finally:
        h.remove()
    assert fv.settings["transforms"] == "cropped" and fv.images.shape == (2, 3, 16, 16)
    assert "Wrong image height" in fv.settings["cropped_because"]  # torchvision's check
    assert sizes and all(tuple(s) == (16, 16) for s in sizes)
    assert (fv.activations > fv.start).all()
    assert (
        lurker.featviz(digits[0], "features.8", units=[0], steps=2).settings["transforms"] is True
    )
    t = Transforms.standard(16)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    ident = (0.0, 0.0, 1.0, 0.0, 0.0, 0.0)
    out = replace(t, crop=True).apply(x, [ident, ident])
    assert torch.allclose(out, x, atol=1e-12)  # padded, not warped, cut: the image itself


def test_transforms_draw_each_image_its_own_warp():
    t = Transforms.standard(128)
    assert (t.pad, t.jitter, t.jitter2) == (12, 8, 4)
    assert Transforms.standard(16).pad == 2
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    ident = (0.0, 0.0, 1.0, 0.0, 0.0, 0.0)
    out = t.apply(x, [ident, (0.0, 3.0, 1.0, 0.0, 0.0, 0.0)])
    padded = torch.nn.functional.pad(x, [12] * 4, value=0.5)
    assert torch.allclose(out[0], padded[0], atol=1e-12)  # no warp: the padded image
    # a shift by 3 whole pixels moves the content by 3 columns
    assert torch.allclose(out[1, :, :, 3:], padded[1, :, :, :-3], atol=1e-12)


def test_stored_in_the_run_by_the_command_and_read_back(run_dir):
    result = CliRunner().invoke(
        main, ["featviz", str(run_dir), "--layer", "features.8", "--units", "0-2,5", "--steps", "6"]
    )
    assert result.exit_code == 0, result.output
    assert "4 units of features.8" in result.output
    with Run.open(run_dir) as run:
        # features.4: the fixture's neuron images (explorer_fixtures.build_run)
        assert run.featviz_layers() == ["features.4", "features.8"]
        stored = run.featviz("features.8")
        settings = stored.settings
    assert stored.units == [0, 1, 2, 5] and stored.copies == 1
    assert settings["size"] == [16, 16] and settings["steps"] == 6
    # the same call from Python, with the run's model: the same images and activations
    fv = lurker.featviz(_run_model(run_dir), "features.8", [0, 1, 2, 5], steps=6, run=run_dir)
    assert np.allclose(stored.images()[:, 0], fv.images.numpy(), atol=0.5 / 255 + 1e-6)
    assert np.allclose(stored.activations[:, 0], fv.activations.numpy(), rtol=1e-4)
    assert stored.png(5).startswith(b"\x89PNG")
    with Run.open(run_dir) as run:
        bare = next(i.name for i in run.layers if i.name not in run.featviz_layers())
        with pytest.raises(MissingFromRunError, match="lurker featviz"):
            run.featviz(bare)


def test_bad_input_is_named_with_its_fix(digits, run_dir, tmp_path):
    model, _ = digits
    with pytest.raises(LurkerError, match=r"'features\.80' is not in DigitsNet.*features\.8"):
        lurker.featviz(model, "features.80", steps=1, size=16)
    with pytest.raises(LurkerError, match=r"unit 40 is out of range.*32 units \(0\.\.31\)"):
        lurker.featviz(model, "features.8", units=[1, 40], steps=1, size=16)
    with pytest.raises(LurkerError, match="objective 'max' is not one of"):
        lurker.featviz(model, "features.8", objective="max")
    with pytest.raises(LurkerError, match=r"directions have 3 values each.*32 units"):
        lurker.featviz(model, "features.8", objective="direction", directions=[[1, 0, 0]])
    with pytest.raises(LurkerError, match=r"input channels.*pass channels="):
        lurker.featviz(nn.Sequential(nn.Linear(4, 4)), "0")
    probed = _run_model(run_dir)  # the model the run was probed with (its fingerprint)
    with pytest.raises(UnknownLayerError, match="Valid layers"):
        lurker.featviz(probed, "nope", run=run_dir)
    # a run that does not record the model's input shape
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    with sqlite3.connect(old / "run.db") as conn:
        cfg = json.loads(conn.execute("SELECT value FROM meta WHERE key='config'").fetchone()[0])
        del cfg["input_shape"]
        conn.execute("UPDATE meta SET value=? WHERE key='config'", (json.dumps(cfg),))
    with pytest.raises(LurkerError, match=r"does not record its model's input shape.*channels="):
        lurker.featviz(probed, "features.8", run=old)
    assert lurker.featviz(probed, "features.8", [0], steps=1, run=old, channels=1, size=16)
    # another model than the run's is refused before anything is computed
    with pytest.raises(LurkerError, match=r"is not the one run .* was probed with"):
        lurker.featviz(model, "features.8", [0], steps=1, run=run_dir)
    r = CliRunner().invoke(main, ["featviz", str(old), "--layer", "features.8", "--steps", "1"])
    assert r.exit_code == 2 and "--channels C and --image-size H" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(
        main, ["featviz", str(run_dir), "--layer", "features.8", "--units", "33"]
    )
    assert r.exit_code == 2 and "unit 33 is out of range" in r.output and "--units" in r.output
    r = CliRunner().invoke(main, ["featviz", str(run_dir), "--layer", "features.8", "-u", "a"])
    assert r.exit_code == 2 and "0,3,8-15" in r.output
    # a model that cannot run at the size asked: its error, and the fix in each one's words
    with pytest.raises(
        LurkerError, match=r"does not run on a \(1, 2, 2\) image.*\(channels=, size=\)"
    ):
        lurker.featviz(model, "features.8", steps=1, size=2, channels=1)
    spec = ["featviz", "lurker.examples:DigitsNet", "--layer", "features.8", "--steps", "1"]
    r = CliRunner().invoke(
        main, [*spec, "--image-size", "2", "--channels", "1", "-o", str(tmp_path)]
    )
    assert r.exit_code == 2 and "does not run on a (1, 2, 2) image" in r.output, r.output
    assert "(--channels, --image-size)" in r.output and "err.partial" not in r.output
    r = CliRunner().invoke(main, [*spec[:3], "features.80", "-o", str(tmp_path)])
    assert r.exit_code == 2, r.output
    assert "Close names: features.8" in r.output and "hook key" not in r.output


def _fresh_run(run_dir, tmp_path):
    """A copy of the run without the feature visualizations other tests stored in it."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    with sqlite3.connect(run / "run.db") as conn:
        conn.execute("DROP TABLE IF EXISTS featviz")
    return run


def _run_model(run_dir):
    from lurker.examples import DigitsNet

    model = DigitsNet()
    weights = json.loads(
        sqlite3.connect(run_dir / "run.db")
        .execute("SELECT value FROM meta WHERE key='config'")
        .fetchone()[0]
    )["weights"]
    model.load_state_dict(torch.load(weights))
    return model.eval()


def test_a_layer_made_in_pieces_with_other_settings_reads_back_per_unit(run_dir, tmp_path):
    """docs/featviz.md's own sequence: the layer with 1 image per unit, then some units with
    3; then the layer again with 1. Each unit keeps the images (and settings) of its last
    write only, never copies left over from an earlier one."""
    run = _fresh_run(run_dir, tmp_path)
    cli = ["featviz", str(run), "--layer", "features.8", "--steps", "2"]
    r = CliRunner().invoke(main, [*cli, "--units", "0-3"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*cli, "--units", "0-1", "--images-per-unit", "3"])
    assert r.exit_code == 0, r.output
    with Run.open(run) as opened:
        stored = opened.featviz("features.8")  # refused before: "lack copies"
    assert stored.units == [0, 1, 2, 3] and stored.copies == 3
    assert np.isfinite(stored.activations[:2]).all()
    assert (
        np.isfinite(stored.activations[2:, 0]).all() and np.isnan(stored.activations[2:, 1:]).all()
    )
    images = stored.images()
    assert np.isnan(images[2:, 1:]).all() and np.isfinite(images[:, 0]).all()
    assert stored.unit_settings(0)["images_per_unit"] == 3
    assert stored.unit_settings(2)["images_per_unit"] == 1
    # unit 2's single image is the one a fresh optimization of it gives (an oracle run)
    fv = lurker.featviz(_run_model(run), "features.8", [2], steps=2, run=run)
    assert np.allclose(images[2, 0], fv.images[0].numpy(), atol=0.5 / 255 + 1e-6)
    r = CliRunner().invoke(main, [*cli, "--units", "0-3", "--steps", "3"])
    assert r.exit_code == 0, r.output
    with Run.open(run) as opened:
        stored = opened.featviz("features.8")
        from lurker.store.featviz import unit_featviz

        unit0 = unit_featviz(opened, "features.8", 0)
    assert stored.copies == 1 and stored.settings["steps"] == 3
    assert unit0 is not None and len(unit0.activations) == 1  # not 1 new + 2 stale copies
    assert unit0.settings["images_per_unit"] == 1 and unit0.settings["steps"] == 3
    fv = lurker.featviz(_run_model(run), "features.8", [0, 1], steps=3, run=run)
    assert np.allclose(stored.activations[:2, 0], fv.activations.numpy(), rtol=1e-4)


def test_an_interrupted_command_keeps_the_units_it_finished(run_dir, tmp_path, monkeypatch):
    import lurker.cli as cli_module

    run = _fresh_run(run_dir, tmp_path)
    calls = []

    def interrupt(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 2:  # Ctrl-C during the third chunk's optimization
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_progress", interrupt)
    r = CliRunner().invoke(
        main,
        ["featviz", str(run), "--layer", "features.8", "-u", "0-5", "-n", "3", "-b", "2"],
    )
    assert r.exit_code == 130, r.output
    assert "units 0-3 stored in" in r.output and "Traceback" not in r.output
    with Run.open(run) as opened:
        stored = opened.featviz("features.8")
    assert stored.units == [0, 1, 2, 3]
    # what was kept is what an uninterrupted run makes
    fv = lurker.featviz(_run_model(run), "features.8", [0, 1, 2, 3], steps=3, run=run)
    assert np.allclose(stored.images()[:, 0], fv.images.numpy(), atol=0.5 / 255 + 1e-6)
    assert np.allclose(stored.activations[:, 0], fv.activations.numpy(), rtol=1e-4)
    # a model spec's --out folder keeps its finished PNGs and activations.json too
    calls.clear()
    out = tmp_path / "fv"
    spec = ["featviz", "lurker.examples:DigitsNet", "--layer", "features.8", "--image-size", "16"]
    r = CliRunner().invoke(main, [*spec, "-u", "0-5", "-n", "1", "-b", "2", "-o", str(out)])
    assert r.exit_code == 130, r.output
    assert sorted(p.name for p in out.glob("*.png")) == [
        f"features.8-{u:04d}.png" for u in range(4)
    ]
    assert json.loads((out / "activations.json").read_text())["units"] == [0, 1, 2, 3]


def test_the_diversity_weight_is_an_option_of_the_command(run_dir, tmp_path):
    """--diversity is stored and gives Python's images; the closing line of one unit says
    "1 unit of", not "1 units of"."""
    run = _fresh_run(run_dir, tmp_path)
    r = CliRunner().invoke(
        main,
        ["featviz", str(run), "--layer", "features.8", "-u", "0", "-n", "2",
         "--images-per-unit", "2", "--diversity", "5"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "1 unit of features.8: activation" in r.output, r.output
    with Run.open(run) as opened:
        stored = opened.featviz("features.8")
    assert stored.settings["diversity"] == 5.0
    fv = lurker.featviz(_run_model(run), "features.8", [0], steps=2, run=run, images_per_unit=2,
                        diversity=5.0)  # fmt: skip
    assert np.allclose(stored.activations[0], fv.activations[0].numpy(), rtol=1e-4)


def test_unit_page_says_when_images_were_pushed_apart(run_dir, tmp_path, browser):
    """With several images per unit, the diversity term trades activation for variety
    (docs/featviz.md): the unit page says so beside the values, and shows the stored ones."""
    from explorer_fixtures import STATIC

    if not (STATIC / "index.html").exists():
        pytest.skip("the explorer's front end is not built: run `make web`")
    pytest.importorskip("uvicorn")
    from lurker.server import create_app
    from lurker.server.serve import background

    run = _fresh_run(run_dir, tmp_path)
    model = _run_model(run)
    lurker.featviz(model, "features.8", [4], steps=2, run=run, images_per_unit=2).save(run)
    lurker.featviz(model, "features.8", [5], steps=2, run=run).save(run)
    with background(create_app(run)) as url, Run.open(run) as opened:
        stored = opened.featviz("features.8")
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        try:
            page.goto(f"{url}#/r/{run.name}/unit/features.8/4?tab=featviz")
            page.wait_for_selector("figure.featviz")
            caption = page.inner_text(".toolbar")
            assert "2 images pushed apart by a diversity term of weight 100" in caption
            values = [float(v) for v in page.locator("figure.featviz").evaluate_all(
                "es => es.map(e => e.dataset.value)")]  # fmt: skip
            assert values == pytest.approx(stored.activations[0].tolist())
            page.goto(f"{url}#/r/{run.name}/unit/features.8/5?tab=featviz")
            page.wait_for_selector("figure.featviz")
            assert "pushed apart" not in page.inner_text(".toolbar")  # one image: no term
        finally:
            page.close()


def test_units_made_at_different_sizes_are_refused_as_one_array_with_the_fix(run_dir, tmp_path):
    from lurker.store import StoreError

    run = _fresh_run(run_dir, tmp_path)
    model = _run_model(run)
    lurker.featviz(model, "features.8", [0], steps=1, run=run).save(run)
    lurker.featviz(model, "features.8", [1], steps=1, run=run, size=20).save(run)
    with Run.open(run) as opened:
        stored = opened.featviz("features.8")
    with pytest.raises(StoreError, match=r"different sizes \(1x16x16, 1x20x20\).*png\(unit\)"):
        stored.images()  # was numpy's "inhomogeneous shape"
    assert stored.png(1).startswith(b"\x89PNG") and stored.unit_settings(1)["size"] == [20, 20]


def _pngs(run, layer="features.8", objective="channel"):
    """Every stored image of the layer's objective as {(unit, copy): PNG bytes}."""
    with Run.open(run) as opened:
        stored = opened.featviz(layer, objective)
        return {
            (u, k): stored.png(u, k)
            for u in stored.units
            for k in range(stored.copies)
            if np.isfinite(stored.activations[stored.units.index(u), k])
        }, {u: stored.unit_settings(u) for u in stored.units}


def test_rerunning_an_interrupted_command_makes_only_the_rest(run_dir, tmp_path, monkeypatch):
    """Ctrl-C after two chunks, then the same command: it says what it skips, optimizes only
    units 4-5, and the run ends up byte for byte as an uninterrupted run's."""
    import lurker.cli as cli_module

    calls: list[tuple[int, int]] = []
    stop = {"after": 2}

    def progress(done: int, total: int) -> None:
        calls.append((done, total))
        if len(calls) == stop["after"]:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_progress", progress)
    cmd = ["--layer", "features.8", "-u", "0-5", "-n", "3", "-b", "2"]
    whole = _fresh_run(run_dir, tmp_path / "whole")
    stop["after"] = -1
    r = CliRunner().invoke(main, ["featviz", str(whole), *cmd])
    assert r.exit_code == 0, r.output
    run = _fresh_run(run_dir, tmp_path / "resumed")
    stop["after"], calls[:] = 2, []
    r = CliRunner().invoke(main, ["featviz", str(run), *cmd])
    assert r.exit_code == 130 and "Run the same command again" in r.output, r.output
    stop["after"], calls[:] = -1, []
    r = CliRunner().invoke(main, ["featviz", str(run), *cmd])
    assert r.exit_code == 0, r.output
    assert "units 0-3 already made with these settings; making 4-5" in r.output
    assert calls == [(2, 2)]  # one chunk optimized: units 4-5 only
    images, settings = _pngs(run)
    expected, expected_settings = _pngs(whole)
    assert sorted(images) == [(u, 0) for u in range(6)]
    assert images == expected  # byte for byte: per-unit seeds, the same chunks
    assert settings == expected_settings
    # once more: nothing left to make, nothing optimized, nothing changed
    calls.clear()
    r = CliRunner().invoke(main, ["featviz", str(run), *cmd])
    assert r.exit_code == 0 and calls == [], r.output
    assert "units 0-5 already made with these settings; nothing to make" in r.output
    assert _pngs(run)[0] == expected


def test_a_rerun_remakes_units_made_with_other_settings_whole(run_dir, tmp_path, monkeypatch):
    import lurker.cli as cli_module

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(cli_module, "_progress", lambda d, t: calls.append((d, t)))
    run = _fresh_run(run_dir, tmp_path)
    cmd = ["featviz", str(run), "--layer", "features.8", "-n", "2", "-b", "2"]
    assert CliRunner().invoke(main, [*cmd, "-u", "0-3"]).exit_code == 0
    # unit 1 made again with 3 images of other settings, unit 5 with another seed
    r = CliRunner().invoke(main, [*cmd, "-u", "1", "--images-per-unit", "3", "-b", "3"])
    assert r.exit_code == 0 and "already made" not in r.output, r.output
    assert CliRunner().invoke(main, [*cmd, "-u", "5", "--seed", "1"]).exit_code == 0
    calls.clear()
    r = CliRunner().invoke(main, [*cmd, "-u", "0-5"])
    assert r.exit_code == 0, r.output
    assert "units 0,2-3 already made with these settings; making 1,4-5" in r.output
    assert calls[-1][1] == 3
    images, settings = _pngs(run)
    assert sorted(images) == [(u, 0) for u in range(6)]  # unit 1's 3 copies all replaced
    assert all(s["seed"] == 0 and s["images_per_unit"] == 1 for s in settings.values())
    # the oracle: a fresh optimization of units 1 and 5 with these settings
    fv = lurker.featviz(_run_model(run), "features.8", [1, 5], steps=2, run=run)
    with Run.open(run) as opened:
        got = opened.featviz("features.8").images()[[1, 5], 0]
    assert np.allclose(got, fv.images.numpy(), atol=0.5 / 255 + 1e-6)
    # --overwrite makes every unit again
    calls.clear()
    r = CliRunner().invoke(main, [*cmd, "-u", "0-5", "--overwrite"])
    assert r.exit_code == 0 and "already made" not in r.output, r.output
    assert calls[-1] == (6, 6)
    r = CliRunner().invoke(
        main, ["featviz", "lurker.examples:DigitsNet", "--layer", "features.8", "--overwrite"]
    )
    assert r.exit_code == 2 and "--overwrite is for a run" in r.output, r.output


def test_resume_from_python_skips_only_units_of_this_model_and_settings(run_dir, tmp_path):
    run = _fresh_run(run_dir, tmp_path)
    model = _run_model(run)
    first = lurker.featviz(model, "features.8", [0, 1], steps=2, run=run)
    first.save(run)
    said: list[str] = []
    fv = lurker.featviz(
        model, "features.8", [0, 1, 2], steps=2, run=run, resume=True, log=said.append
    )
    assert fv.units == [2] and fv.skipped == [0, 1] and fv.images.shape == (1, 1, 16, 16)
    assert said == ["units 0-1 already made with these settings; making 2"]
    fv = lurker.featviz(model, "features.8", [0, 1], steps=3, run=run, resume=True)
    assert fv.units == [0, 1] and fv.skipped == []  # other steps
    # another model is refused (never given this one's images, nor computing for the run)
    other = _run_model(run)
    with torch.no_grad():
        other.features[0].weight.mul_(1.01)
    with pytest.raises(LurkerError, match=r"is not the one run .* was probed with"):
        lurker.featviz(other, "features.8", [0, 1], steps=2, run=run, resume=True)
    # everything skipped: an empty result, not an error
    fv = lurker.featviz(model, "features.8", [0, 1], steps=2, run=run, resume=True)
    assert fv.units == [] and fv.skipped == [0, 1] and fv.images.shape == (0, 1, 16, 16)
    with pytest.raises(LurkerError, match="pass run="):
        lurker.featviz(model, "features.8", [0], steps=2, resume=True)


def test_a_notebook_shows_the_images_as_a_grid(digits):
    """``fv`` at the end of a notebook cell shows the images (IPython calls
    ``_repr_png_``): each tile is ``fv.image(i, c)`` scaled up by nearest neighbour, a row
    per unit when a unit has several images, else 8 units a row."""
    import io

    from PIL import Image

    model, _ = digits
    for fv, cols in [
        (lurker.featviz(model, "features.8", units=[0, 1], images_per_unit=3, steps=2, size=16), 3),
        (lurker.featviz(model, "features.8", units=list(range(10)), steps=2, size=16), 8),
    ]:
        grid = Image.open(io.BytesIO(fv._repr_png_()))
        copies = fv.images.shape[1] if fv.images.dim() == 5 else 1
        tiles = [fv.image(i, c) for i in range(len(fv.units)) for c in range(copies)]
        assert grid.size == (cols * 66 - 2, -(-len(tiles) // cols) * 66 - 2)
        for k, tile in enumerate(tiles):
            x, y = (k % cols) * 66, (k // cols) * 66
            want = np.asarray(tile.convert("RGB").resize((64, 64), Image.Resampling.NEAREST))
            assert np.array_equal(np.asarray(grid.convert("RGB"))[y : y + 64, x : x + 64], want)


def test_a_model_specs_normalisation_is_an_option_of_the_command(run_dir, tmp_path):
    """`lurker featviz MODEL --normalize MEAN/STD` optimises under the statistics the
    model was trained with (it used to be ImageNet's for 3 channels, 0/1 otherwise, with
    no way to say): the same activations as lurker.featviz(mean=, std=) from Python; a run
    refuses the option (its probe's normalisation is recorded)."""
    from lurker.examples import DigitsNet

    model = DigitsNet().eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "fv"
    spec = ["featviz", "lurker.examples:DigitsNet", "--layer", "features.8", "--image-size", "16",
            "-w", str(tmp_path / "w.pt")]  # fmt: skip
    args = [*spec, "-u", "0-1", "-n", "2", "-o", str(out), "--normalize", "0.5/0.25"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    got = json.loads((out / "activations.json").read_text())["activations"]
    fv = lurker.featviz(model, "features.8", [0, 1], steps=2, size=16, mean=(0.5,), std=(0.25,))
    assert np.allclose(got, fv.activations.numpy(), rtol=1e-4)
    plain = lurker.featviz(model, "features.8", [0, 1], steps=2, size=16)
    assert not np.allclose(got, plain.activations.numpy(), rtol=1e-4)
    bad = CliRunner().invoke(main, [*spec, "-o", str(out), "--normalize", "0.5/0"])
    assert bad.exit_code == 2 and "--normalize" in bad.output and "Traceback" not in bad.output
    r = CliRunner().invoke(main, ["featviz", str(run_dir), "--layer", "features.8",
                                  "--normalize", "none"])  # fmt: skip
    assert r.exit_code == 2 and "--normalize is for a model spec" in r.output


def test_neuron_objective_on_a_token_layer_is_its_central_patch_token():
    """On a ViT block (tokens, no map) the neuron objective is the unit at the patch token
    in the middle of the patch grid (the class token is not a patch): read back by hand
    with a forward hook on the optimized images, it is the value each image reached, and
    the images raised it from their start. A position names another patch."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10).eval()
    block = "encoder.layers.encoder_layer_0"
    block_out = _hooked_output(vit, block)  # (B, 1 + 16 tokens, 32 units): class token, 4x4

    units = [3, 20]
    fv = lurker.featviz(vit, block, units=units, objective="neuron", steps=8, size=32)
    # the 4x4 grid's centre, as a conv neuron's (h // 2, w // 2): row 2, column 2
    assert fv.settings["position"] == [2, 2] and fv.settings["token"] == 1 + 2 * 4 + 2
    out = block_out(fv.images)
    want = torch.stack([out[i, 1 + 2 * 4 + 2, u] for i, u in enumerate(units)])
    assert torch.allclose(fv.activations, want, rtol=1e-4, atol=1e-5)
    assert (fv.activations > fv.start).all()
    corner = lurker.featviz(
        vit, block, units=[3], objective="neuron", position=(0, 3), steps=2, size=32
    )
    assert corner.settings["token"] == 1 + 0 * 4 + 3
    assert torch.allclose(
        corner.activations[0], block_out(corner.images)[0, 4, 3], rtol=1e-4, atol=1e-5
    )
    with pytest.raises(LurkerError, match="outside the 4x4 patch grid"):
        lurker.featviz(vit, block, units=[3], objective="neuron", position=(4, 0), steps=1, size=32)


def _hooked_output(model: torch.nn.Module, path: str):
    """The output of module ``path`` on images fed as featviz feeds a 3-channel model
    (ImageNet's normalisation), read by a forward hook: the oracle of the token tests."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def out(images: torch.Tensor) -> torch.Tensor:
        seen = []
        h = dict(model.named_modules())[path].register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            with torch.no_grad():
                model((images - mean) / std)
        finally:
            h.remove()
        return seen[0]

    return out


def test_a_call_suffixed_layers_files_have_safe_names(tmp_path):
    """`lurker featviz MODEL --layer act:2 --out DIR` named its PNGs `act:2-0000.png`: a
    colon, which Windows refuses in a file name (and macOS shows as a slash). The name is
    now `store.files.safe_component`'s (a plain layer's, `features.8-0000.png`, as
    before), and activations.json says which prefix its PNGs carry."""
    from PIL import Image

    from lurker.store.files import safe_component

    (tmp_path / "shared.py").write_text(
        "import torch\n"
        "from torch import nn\n\n"
        "class Shared(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)\n"
        "        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)\n"
        "        self.act = nn.ReLU()\n\n"
        "    def forward(self, x):\n"
        "        return self.act(self.conv2(self.act(self.conv1(x))) - 0.5)\n"
    )
    out = tmp_path / "fv"
    r = CliRunner().invoke(main, ["featviz", f"{tmp_path / 'shared.py'}:Shared", "--layer",
                                  "act:2", "-u", "0,2", "-n", "2", "--image-size", "12",
                                  "--channels", "1", "-o", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "activations.json").read_text())
    names = sorted(p.name for p in out.glob("*.png"))
    prefix = safe_component("act:2")
    assert not any(set(n) & set('<>:"/\\|?*') for n in names), names
    assert names == [f"{prefix}-0000.png", f"{prefix}-0002.png"]
    assert meta["layer"] == "act:2" and meta["file_prefix"] == prefix
    assert Image.open(out / names[0]).size == (12, 12)
    assert safe_component("features.8") == "features.8"  # plain layers keep their names


@pytest.mark.parametrize(
    ("model_of", "shape", "said"),
    [
        # a one-channel image the model unsqueezes: no signal, which the explorer agrees
        ("Image", (12, 12), r"two axes per sample \(12, 12\).*one-channel image"),
    ],
)
def test_a_two_axis_run_is_named_as_its_graph_reads_it(tmp_path, model_of, shape, said):
    """featviz tells a run's two-axis samples apart as the explorer does, from the graph:
    it called every one 'signals' of shape[0] channels (the image 12 channels x 12
    samples); signals are optimized as such (tests/test_featviz_signals.py)."""
    from torch.utils.data import TensorDataset

    from test_signal_layouts import Image

    torch.manual_seed(0)
    model = {"Image": Image}[model_of]().eval()
    data = TensorDataset(torch.randn(12, *shape), torch.arange(12) % 2)
    lurker.probe(model, data, out=tmp_path / "run", k=3, progress=False)
    layer = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d))
    with pytest.raises(LurkerError, match=said):
        lurker.featviz(model, layer, [0], steps=1, run=tmp_path / "run")


def test_a_token_layers_channel_images_are_said_to_maximize_its_mean_over_tokens(tmp_path):
    """The unit document's meaning of the channel objective said "mean over its map" on a
    ViT block, whose units have no map: their per-sample mean (the value featviz raises,
    and the probe ranks by) is over the block's tokens, the class token among them. It
    says so now, with the token count the model's block gives."""
    from fastapi.testclient import TestClient
    from torch.utils.data import Subset

    from lurker.probe.data import load_dataset
    from lurker.server import create_app
    from models_zoo import DigitsViT

    torch.manual_seed(0)
    model = DigitsViT().eval()
    data = Subset(load_dataset("digits:test", 16, channels=1), range(8))
    block = "vit.encoder.layers.encoder_layer_1"
    run = lurker.probe(model, data, out=tmp_path / "vit", k=2, progress=False, layers=[block])
    run.close()
    fv = lurker.featviz(model, block, units=[3], steps=1, run=tmp_path / "vit")
    fv.save(tmp_path / "vit")
    seen: list[torch.Tensor] = []
    hook = model.get_submodule(block).register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(data[0][0][None])
    hook.remove()
    tokens = seen[0].shape[1]  # (1, tokens, units): the class token and the patches
    assert tokens == 17
    with TestClient(create_app(tmp_path / "vit")) as client:
        doc = client.get(f"/api/runs/vit/layers/{block}/units/3").json()
    (view,) = doc["featviz"]["views"]
    assert view["objective"] == "channel"
    assert (
        view["meaning"]
        == f"the unit's mean over its {tokens} tokens (the value the probe ranks by)"
    )
