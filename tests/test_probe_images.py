"""Explorer images: guided backprop against an independent oracle, crops, the PNG cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import lurker
from lurker.errors import LurkerError
from lurker.probe.images import (
    GuidedReLUMode,
    ImageCache,
    crop,
    gradient_image,
    gradient_pixels,
    guided_backprop,
    unit_gradient,
    unit_gradients,
)
from lurker.store import RunWriter


def tiny(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1))


def oracle(model: nn.Module, x: torch.Tensor, select: Any) -> torch.Tensor:
    """Guided backprop the classic way: a backward hook on every ReLU module."""

    def clamp(_m: nn.Module, grad_in: tuple, _grad_out: tuple) -> tuple:
        return (grad_in[0].clamp(min=0),)

    handles = [
        m.register_full_backward_hook(clamp) for m in model.modules() if isinstance(m, nn.ReLU)
    ]
    try:
        x_in = x.clone().requires_grad_(True)
        select(model(x_in)).backward()
        assert x_in.grad is not None
        return x_in.grad
    finally:
        for h in handles:
            h.remove()


def plain(model: nn.Module, x: torch.Tensor, select: Any) -> torch.Tensor:
    x_in = x.clone().requires_grad_(True)
    select(model(x_in)).backward()
    assert x_in.grad is not None
    return x_in.grad


SELECTS = [
    lambda out: out[0, 2, 3, 4],
    lambda out: out[0, 1].mean(),
    lambda out: out.sum(),
]


@pytest.mark.parametrize("select", SELECTS)
def test_guided_matches_hook_oracle_and_differs_from_plain(select: Any) -> None:
    model = tiny()
    x = torch.randn(1, 3, 8, 8)
    got = guided_backprop(model, x, select)
    assert all(p.grad is None for p in model.parameters())  # guided_backprop leaves no .grad
    want = oracle(model, x, select)
    assert got.shape == x.shape
    assert torch.allclose(got, want, atol=1e-6)
    vanilla = plain(model, x, select)
    assert not torch.allclose(got, vanilla, atol=1e-4)  # negative gradients were cut


class Functional(nn.Module):
    """The same net as :func:`tiny`, with its relu written in one of the functional forms."""

    def __init__(self, net: nn.Sequential, form: str):
        super().__init__()
        self.c1, self.c2, self.form = net[0], net[2], form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x)
        if self.form == "F.relu":
            h = F.relu(h)
        elif self.form == "F.relu(inplace)":
            F.relu(h, inplace=True)
        elif self.form == "F.relu(h, True)":
            h = F.relu(h, True)
        elif self.form == "torch.relu":
            h = torch.relu(h)
        elif self.form == "torch.relu_":
            torch.relu_(h)
        elif self.form == "Tensor.relu":
            h = h.relu()
        elif self.form == "Tensor.relu_":
            h.relu_()
        return self.c2(h)


FORMS = [
    "F.relu",
    "F.relu(inplace)",
    "F.relu(h, True)",
    "torch.relu",
    "torch.relu_",
    "Tensor.relu",
    "Tensor.relu_",
]


@pytest.mark.parametrize("form", FORMS)
def test_functional_relus_are_guided(form: str) -> None:
    net = tiny(1)
    model = Functional(net, form)
    x = torch.randn(1, 3, 8, 8)
    select = SELECTS[0]
    assert torch.equal(model(x), net(x))
    got = guided_backprop(model, x, select)
    assert torch.allclose(got, oracle(net, x, select), atol=1e-6)
    assert not torch.allclose(got, plain(model, x, select), atol=1e-4)


def test_inplace_module_relu_and_mode_cleanup() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 3))
    ref = nn.Sequential(model[0], nn.ReLU(), model[2])
    x = torch.randn(1, 3, 9, 9)
    got = guided_backprop(model, x, SELECTS[2])
    assert torch.allclose(got, oracle(ref, x, SELECTS[2]), atol=1e-6)
    with pytest.raises(RuntimeError), GuidedReLUMode():
        raise RuntimeError("boom")
    y = torch.randn(4, requires_grad=True)  # the mode is gone: relu is the plain one again
    assert torch.relu(y).grad_fn is not None and "Relu" in type(torch.relu(y).grad_fn).__name__


def rf_model() -> nn.Sequential:
    """conv k3 s2 p1 -> ReLU -> conv k3 s1 p1: output (y, x) sees input rows 2y-3 .. 2y+3."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)
    )
    with torch.no_grad():
        model[2].weight.abs_()  # every path through a positive relu then reaches the input
    return model


@pytest.mark.parametrize("peak", [(4, 5), (0, 0), (9, 2), None])
def test_unit_gradient_max_support_within_receptive_field(peak: tuple[int, int] | None) -> None:
    model = rf_model()
    x = torch.randn(3, 20, 20)
    tr = lurker.trace(model, x[None])
    op = tr["2"]
    grad = unit_gradient(tr, op.index, x, 1, "max", peak)
    assert grad.shape == (3, 20, 20)
    if peak is None:
        act = model(x[None])[0, 1]
        flat = int(act.argmax())
        peak = (flat // act.shape[1], flat % act.shape[1])
    y, xx = peak
    y0, y1, x0, x1 = max(2 * y - 3, 0), min(2 * y + 4, 20), max(2 * xx - 3, 0), min(2 * xx + 4, 20)
    support = grad.abs().sum(0) > 0
    inside = torch.zeros_like(support)
    inside[y0:y1, x0:x1] = True
    assert support.any()
    assert not (support & ~inside).any()
    want = guided_backprop(model, x[None], lambda out: out[0, 1, y, xx])[0]
    assert torch.allclose(grad, want, atol=1e-6)


def test_unit_gradient_mean_linear_batched_and_relu_op() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 5), nn.ReLU()
    )
    x = torch.randn(1, 8, 8)  # one grayscale sample: (C, H, W) with C = 1
    tr = lurker.trace(model, torch.randn(4, 1, 8, 8))
    conv, relu, linear = tr["0"], tr["1"], tr["3"]
    mean = unit_gradient(tr, conv.index, x, 2, "mean")
    assert mean.shape == (1, 8, 8)
    assert torch.allclose(mean, guided_backprop(model[0], x[None], lambda o: o[0, 2].mean())[0])
    got = unit_gradient(tr, relu.index, x, 0, "mean")
    want = guided_backprop(model[:2], x[None], lambda o: o[0, 0].mean())[0]
    assert torch.allclose(got, want, atol=1e-6)
    lin = unit_gradient(tr, linear.index, x[None], 3)  # batch of one accepted, same result
    assert lin.shape == (1, 8, 8)
    assert torch.allclose(lin, guided_backprop(model[:4], x[None], lambda o: o[0, 3])[0], atol=1e-6)
    assert torch.allclose(lin, unit_gradient(tr, linear.index, x, 3, "mean"), atol=1e-6)
    with pytest.raises(LurkerError, match="unit 9"):
        unit_gradient(tr, conv.index, x, 9)
    with pytest.raises(LurkerError, match="peak"):
        unit_gradient(tr, conv.index, x, 0, "max", (6, 0))
    with pytest.raises(LurkerError, match="mode"):
        unit_gradient(tr, conv.index, x, 0, "median")  # type: ignore[arg-type]
    with pytest.raises(LurkerError, match="one sample"):
        unit_gradient(tr, conv.index, torch.randn(2, 1, 8, 8), 0)
    with pytest.raises(LurkerError, match="input"):
        unit_gradient(tr, tr.inputs[0].index, x, 0)


def test_gradient_image() -> None:
    g = torch.zeros(3, 4, 5)
    g[0, 1, 2], g[2, 0, 0] = 2.0, -1.0
    img = gradient_image(g)
    arr = np.asarray(img)
    assert img.mode == "RGB" and img.size == (5, 4) and arr.dtype == np.uint8
    assert arr[1, 2, 0] == 255 and arr[0, 0, 2] == 64 and arr[3, 3, 1] == 128
    assert (np.asarray(gradient_image(torch.zeros(1, 3, 3))) == 128).all()
    one = np.asarray(gradient_image(torch.randn(1, 6, 6)))
    assert one.shape == (6, 6, 3) and (one[..., 0] == one[..., 2]).all()


def test_crop_sizes() -> None:
    img = Image.fromarray(np.arange(32 * 40, dtype=np.uint8).reshape(32, 40) % 251)
    exact = crop(img, (2, 5, 3, 9), min_size=0)
    assert exact.size == (6, 3)
    assert np.array_equal(np.asarray(exact), np.asarray(img)[2:5, 3:9])
    big = crop(img, (2, 5, 3, 9))  # longest side 6 < 64: x11 nearest
    assert big.size == (66, 33)
    assert np.array_equal(np.asarray(big)[::11, ::11], np.asarray(exact))
    assert crop(img, (-5, 40, -2, 50), min_size=16).size == (40, 32)  # clipped, not enlarged
    assert crop(img, (0, 32, 0, 3), min_size=64).size == (6, 64)
    with pytest.raises(LurkerError, match="overlap"):
        crop(img, (40, 50, 0, 4))


def test_image_cache_writes_once(tmp_path: Path) -> None:
    calls: list[int] = []

    def produce() -> Image.Image:
        calls.append(1)
        return Image.new("RGB", (7, 5), (10, 20, 30))

    cache = ImageCache()
    with RunWriter.create(tmp_path / "run", meta={"model": "m", "model_fingerprint": "f"}) as w:
        p1 = cache.get(w, "grad", "features.0", 3, 0, "max", produce)
        p2 = cache.get(w, "grad", "features.0", 3, 0, "max", produce)
        assert p1 == p2 and calls == [1]
        assert p1 == w.cache_path("grad", "features.0", 3, 0, "max", "png")
    p3 = cache.get(tmp_path / "run", "grad", "features.0", 3, 0, "max", produce)  # by path
    assert p3 == p1 and calls == [1]
    with Image.open(p1) as im:
        im.verify()
    with Image.open(p1) as im:
        assert im.format == "PNG" and im.size == (7, 5) and im.getpixel((0, 0)) == (10, 20, 30)
    p4 = cache.get(tmp_path / "run", "crop", "features.0", 3, 0, "max", produce)
    assert p4 != p1 and calls == [1, 1]
    sample = cache.sample_path(tmp_path / "run", 12)  # one file per sample, not per unit
    assert sample == tmp_path / "run" / "cache" / "samples" / "00000012.png"
    assert not [f for f in p1.parent.iterdir() if f.name.startswith(".lurker-tmp")]
    with pytest.raises(LurkerError, match="kind"):
        cache.get(tmp_path / "run", "thumbnail", "x", 0, 0, "max", produce)
    with pytest.raises(LurkerError, match="kind"):  # the input is per sample, not per unit
        cache.get(tmp_path / "run", "input", "x", 0, 0, "max", produce)


def test_image_cache_concurrent_requests_make_it_once(tmp_path: Path) -> None:
    calls: list[int] = []
    gate = threading.Event()

    def produce() -> Image.Image:
        calls.append(1)
        gate.wait(1.0)
        return Image.new("L", (3, 3), 7)

    cache = ImageCache()
    paths: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: paths.append(cache.get(tmp_path, "crop", "l", 0, 1, "mean", produce))
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and len(calls) == 1


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_unit_gradient_of_output_later_changed_in_place(mode: str) -> None:
    """A conv output that an inplace ReLU then overwrites: its own value is differentiated."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(inplace=True), nn.Conv2d(3, 2, 3))
    x = torch.randn(2, 9, 9)
    tr = lurker.trace(model, x[None])
    pre = model[0](x[None])[0, 1]
    peak = divmod(int(pre.argmin()), pre.shape[1])  # negative: the inplace relu zeroes it
    assert pre[peak] < 0
    got = unit_gradient(tr, tr["0"].index, x, 1, mode, peak)  # type: ignore[arg-type]
    if mode == "max":
        want = guided_backprop(model[0], x[None], lambda o: o[0, 1, peak[0], peak[1]])[0]
    else:
        want = guided_backprop(model[0], x[None], lambda o: o[0, 1].mean())[0]
    assert got.abs().sum() > 0
    assert torch.allclose(got, want, atol=1e-6)
    relu = unit_gradient(tr, tr["1"].index, x, 1, "max", peak)  # after the relu: cut off
    assert relu.abs().sum() == 0


# --------------------------------------------------------------------------- at scale


def batch_model() -> nn.Sequential:
    """conv -> relu -> conv (RF 5x5) -> relu -> conv: three layers, 6x6 to 12x12 maps."""
    torch.manual_seed(6)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(5, 3, 3, padding=1),
    )


def test_batched_gradients_equal_one_at_a_time() -> None:
    model = batch_model()
    x = torch.randn(7, 3, 12, 12)
    tr = lurker.trace(model, x[:1])
    units = [0, 4, 4, 1, 2, 3, 4]
    modes = ["max", "mean", "max", "max", "mean", "max", "mean"]
    peaks = [(1, 2), None, None, (5, 5), (0, 3), (3, 0), None]
    for op in (tr["2"], tr["3"]):
        got = unit_gradients(tr, op.index, x, units, modes, peaks)  # type: ignore[arg-type]
        assert got.shape == x.shape
        for i in range(len(x)):
            one = unit_gradient(tr, op.index, x[i], units[i], modes[i], peaks[i])  # type: ignore[arg-type]
            assert torch.allclose(got[i], one, atol=1e-6), i
            part = model[: op.index]  # ops 1..n are the model's children 0..n-1
            out = part(x[i : i + 1])[0, units[i]]
            peak = peaks[i] or divmod(int(out.argmax()), out.shape[1])

            def select(o: torch.Tensor, i: int = i, peak: Any = peak) -> torch.Tensor:
                m = o[0, units[i]]
                return m.mean() if modes[i] == "mean" else m[peak]

            assert torch.allclose(got[i], guided_backprop(part, x[i : i + 1], select)[0], atol=1e-6)


def test_batched_gradients_equal_autograd_without_relus() -> None:
    """No relu, so guided backprop is the plain gradient: autograd per sample is the oracle."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Conv2d(4, 3, 3, stride=2))
    x = torch.randn(5, 2, 11, 11)
    tr = lurker.trace(model, x[:1])
    units, modes, peaks = [2, 0, 1, 2, 0], ["max", "mean", "max", "mean", "max"], [None] * 5
    got = unit_gradients(tr, tr["2"].index, x, units, modes, peaks)  # type: ignore[arg-type]
    for i in range(5):
        xi = x[i : i + 1].clone().requires_grad_(True)
        m = model(xi)[0, units[i]]
        target = m.mean() if modes[i] == "mean" else m.flatten().max()
        (want,) = torch.autograd.grad(target, xi)
        assert torch.allclose(got[i], want[0], atol=1e-6)


def test_batched_gradients_channels_last_sequence() -> None:
    """(B, L, C) linear outputs: the unit is the last axis, the peak a token (x)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    x = torch.randn(3, 7, 6)
    tr = lurker.trace(model, x[:1])
    op = tr["2"]
    got = unit_gradients(
        tr,
        op.index,
        x,
        [3, 0, 1],
        ["max", "mean", "max"],
        [(0, 5), None, None],
        layout={"batch": 0, "unit": 2, "positions": [1]},
    )
    for i, (u, mode, tok) in enumerate([(3, "max", 5), (0, "mean", None), (1, "max", None)]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        m = model(xi)[0, :, u]
        target = m.mean() if mode == "mean" else (m[tok] if tok is not None else m.max())
        (want,) = torch.autograd.grad(target, xi)
        assert torch.allclose(got[i], want[0], atol=1e-6)


def test_gradient_pixels_match_gradient_image() -> None:
    g = torch.randn(4, 3, 5, 6)
    g[2] = 0
    pixels = gradient_pixels(g).numpy()
    for i in range(4):
        assert np.array_equal(pixels[i], np.asarray(gradient_image(g[i])))


class Data(torch.utils.data.Dataset):
    """40 synthetic 3x12x12 images in 4 classes, with a bright square in class-dependent places."""

    def __init__(self, n: int = 40):
        g = torch.Generator().manual_seed(9)
        self.x = torch.randn(n, 3, 12, 12, generator=g) * 0.3
        self.y = torch.arange(n) % 4
        for i in range(n):
            c = int(self.y[i]) * 2
            self.x[i, :, c : c + 4, c : c + 4] += 1.5
        self.classes = ["a", "b", "c", "d"]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


LAYERS = ["1", "3", "4"]


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module, Data]:
    model, ds = batch_model(), Data()
    out = tmp_path_factory.mktemp("units") / "run"
    lurker.probe(model, ds, out=out, layers=LAYERS, k=3, batch_size=16, progress=False)
    return out, model, ds


def fresh(probed: Any, tmp_path: Path, **kw: Any) -> Any:
    """A copy of the probed run with an empty cache, and its UnitImages."""
    import shutil

    from lurker.probe import UnitImages

    out, model, ds = probed
    run = tmp_path / "run"
    shutil.copytree(out, run)
    shutil.rmtree(run / "cache", ignore_errors=True)
    return run, UnitImages(run, model=model, dataset=ds, **kw)


def entries(run_dir: Path, layers: list[str] = LAYERS) -> list[tuple[str, int, str, Any]]:
    with lurker.Run.open(run_dir) as run:
        return [
            (layer, u.index, w, e)
            for layer in layers
            for u in run.units(layer, order_by="index")
            for w in ("max", "mean")
            for e in u.top(w)  # type: ignore[arg-type]
        ]


def test_sample_image_stored_once(probed: Any, tmp_path: Path) -> None:
    run, images = fresh(probed, tmp_path)
    result = images.write_all(kinds=["input"], progress=False)
    ids = {e.sample_id for *_, e in entries(run)}
    files = sorted(p.name for p in (run / "cache").rglob("*.png"))
    assert files == [f"{i:08d}.png" for i in sorted(ids)]  # each distinct sample once
    assert result.total == result.made == len(ids) < len(entries(run))
    shared = [(layer, u, w, e) for layer, u, w, e in entries(run) if e.sample_id == min(ids)]
    assert len(shared) > 1  # several units rank it ...
    paths = {images.get("input", layer, u, e.rank, w) for layer, u, w, e in shared}
    assert paths == {images.sample_image(min(ids))}  # ... and all get the same file
    ds = probed[2]
    want = np.asarray(lurker.probe.data.to_pil(ds[min(ids)][0]))  # mean 0, std 1
    assert np.array_equal(np.asarray(Image.open(paths.pop())), want)


def test_crop_boxes_are_the_stored_receptive_fields(probed: Any, tmp_path: Path) -> None:
    from lurker.graph.receptive import RF

    run, images = fresh(probed, tmp_path)
    model, ds = probed[1], probed[2]
    r = lurker.Run.open(run)
    for layer, u, w, e in entries(run, ["3"]):
        rf = RF.from_dict(r.layer(layer).rf)
        if w == "max":
            y, x = e.y, e.x
        else:  # brute force: the unit's first maximum on that sample
            fmap = model[:3](ds[e.sample_id][0][None])[0, u]
            y, x = divmod(int(fmap.argmax()), fmap.shape[1])
        want = rf.box(y, x, clip_to=(12, 12))
        assert images.crop_box(layer, u, w, e.rank) == want
        assert 0 < want[1] - want[0] <= 5 and want[0] <= 2 * y < want[1]
    layer, u, w, e = entries(run, ["3"])[1]
    box = images.crop_box(layer, u, w, e.rank)
    cut = crop(Image.open(images.sample_image(e.sample_id)), box)
    assert np.array_equal(
        np.asarray(Image.open(images.get("crop", layer, u, e.rank, w))), np.asarray(cut)
    )


def test_written_gradients_equal_lazy_single_ones(probed: Any, tmp_path: Path) -> None:
    run, images = fresh(probed, tmp_path, batch_size=7)
    result = images.write_all(progress=False)  # input and grad, batched across units
    n = len(entries(run))
    grads = list((run / "cache" / "grad").rglob("*.png"))
    assert len(grads) == n and result.total == n + len(list((run / "cache" / "samples").iterdir()))
    assert not (run / "cache" / "crop").exists() and not (run / "cache" / "grad_crop").exists()
    tr = images.trace
    for layer, u, w, e in entries(run)[::5]:
        one = unit_gradient(
            tr, tr[layer].index, probed[2][e.sample_id][0], u, w, (e.y, e.x) if w == "max" else None
        )
        want = np.asarray(gradient_image(one)).astype(int)
        got = np.asarray(Image.open(images.get("grad", layer, u, e.rank, w))).astype(int)
        assert np.abs(got - want).max() <= 1  # the same up to float rounding
    paths = images.gradients("3", 2, "mean")
    assert [p.name for p in paths] == [f"00002-mean-{r:03d}.png" for r in range(3)]


def test_write_all_layers_and_kinds(probed: Any, tmp_path: Path) -> None:
    run, images = fresh(probed, tmp_path)
    result = images.write_all(
        layers=["3"], kinds=["grad", "grad_crop"], which=["max"], progress=False
    )
    # the stamp names the model that made them (the run's)
    assert sorted(p.name for p in (run / "cache").iterdir()) == ["grad", "grad_crop", "model.json"]
    assert [p.name for p in (run / "cache" / "grad").iterdir()] == ["3"]
    assert len(list((run / "cache" / "grad_crop" / "3").iterdir())) == 5 * 3 == result.made / 2
    with pytest.raises(LurkerError, match=r"zzz.*This run's layers: 1, 3, 4"):
        images.write_all(layers=["zzz"], progress=False)
    with pytest.raises(LurkerError, match="kinds must be some of"):
        images.write_all(kinds=["inputs"], progress=False)


def test_write_all_progress_lines_when_not_a_terminal(
    probed: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, images = fresh(probed, tmp_path, batch_size=8)
    result = images.write_all(layers=["1"], progress=True, progress_every=0.0)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) > 3 and all(line.startswith("images: ") for line in lines)
    assert lines[0].startswith(f"images: 0/{result.total} (")
    assert lines[-1].startswith(f"images: {result.total}/{result.total} (100%)")
    assert all("images/s" in line for line in lines)


class Killed(Exception):
    pass


def test_killed_write_all_resumes_without_redoing(
    probed: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lurker.probe import views

    run, images = fresh(probed, tmp_path, batch_size=5)
    write, calls = views._write, []

    def dies(target: Path, image: Image.Image) -> None:
        calls.append(1)
        if len(calls) > 30:
            raise Killed
        write(target, image)

    monkeypatch.setattr(views, "_write", dies)
    with pytest.raises(Killed):
        images.write_all(kinds=views.KINDS, progress=False)
    monkeypatch.setattr(views, "_write", write)
    before = {
        p: p.stat().st_mtime_ns
        for p in (run / "cache").rglob("*")
        if p.is_file() and p.name != "model.json"  # the stamp of the model that made them
    }
    assert 0 < len(before) <= 30
    assert not [p for p in before if p.name.startswith(".lurker-tmp")]
    for p in before:
        with Image.open(p) as im:
            im.verify()  # every file there is whole
    again = views.UnitImages(run, model=probed[1], dataset=probed[2], batch_size=5)
    result = again.write_all(kinds=views.KINDS, progress=False)
    assert result.existing == len(before) and result.made == result.total - len(before)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # not redone
    files = [p for p in (run / "cache").rglob("*.png")]
    assert len(files) == result.total
    assert again.write_all(kinds=views.KINDS, progress=False).made == 0


class BatchMean(nn.Module):
    """Subtracts the batch mean: the rows of a batch change each other."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


def test_rows_that_interact_fall_back_to_one_per_pass(tmp_path: Path) -> None:
    from lurker.probe import UnitImages

    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchMean(), nn.ReLU(), nn.Conv2d(4, 2, 3))
    ds = Data(12)
    lurker.probe(model, ds, out=tmp_path / "run", layers=["3"], k=3, progress=False)
    images = UnitImages(tmp_path / "run", model=model, dataset=ds, batch_size=6)
    with pytest.warns(RuntimeWarning, match="one image per pass"):
        paths = images.gradients("3", 1, "max")
    tr = images.trace
    for e, p in zip(images.run.unit("3", 1).top("max"), paths):
        one = unit_gradient(tr, tr["3"].index, ds[e.sample_id][0], 1, "max", (e.y, e.x))
        got = np.asarray(Image.open(p)).astype(int)
        assert np.abs(got - np.asarray(gradient_image(one)).astype(int)).max() <= 1


def test_cli_images(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lurker.cli import main

    out = tmp_path / "run"
    probe_args = ["probe", "lurker.examples:DigitsNet", "--data", "digits:test", "--out", str(out)]
    probe_args += ["--image-size", "16", "--layers", "features.4", "--layers", "features.8"]
    r = CliRunner().invoke(main, [*probe_args, "--k", "2"])
    assert r.exit_code == 0, r.output
    args = ["images", str(out), "--layers", "features.8", "--kinds", "input,grad,crop"]
    r = CliRunner().invoke(main, [*args, "--which", "max", "-b", "5"])
    assert r.exit_code == 0, r.output
    cache = out / "cache"
    assert sorted(p.name for p in cache.iterdir()) == ["crop", "grad", "model.json", "samples"]
    assert len(list((cache / "grad" / "features.8").iterdir())) == 32 * 2  # units x k, max only
    assert len(list((cache / "crop" / "features.8").iterdir())) == 32 * 2
    n = len(list((cache / "samples").iterdir()))
    assert f"images: 0/{128 + n} (" in r.output  # not a terminal: plain progress lines
    assert f"{128 + n} images made (0 already there)" in r.output and "images/s" in r.output
    r = CliRunner().invoke(main, [*args, "--which", "max"])  # resumes: nothing left to do
    assert r.exit_code == 0 and f"0 images made ({128 + n} already there)" in r.output
    # the deprecated name still works, and says which name to use
    r = CliRunner().invoke(main, ["render", *args[1:], "--which", "max"])
    assert r.exit_code == 0 and f"0 images made ({128 + n} already there)" in r.output
    assert r.output.startswith("`lurker render` is deprecated: use `lurker images`")
    r = CliRunner().invoke(main, ["images", str(out), "--kinds", "grad,thumbs"])
    assert r.exit_code == 2 and "kinds must be some of input, grad, crop, grad_crop" in r.output
    r = CliRunner().invoke(main, ["images", str(out), "--layers", "features.9*"])
    assert r.exit_code == 2 and "features.4, features.8" in r.output
    assert not (cache / "grad" / "features.4").exists()
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, ["images", str(out), "--device", "cuda"])
        assert r.exit_code == 2 and "no CUDA GPU" in r.output


def test_cli_images_of_a_python_run(probed: Any) -> None:
    from click.testing import CliRunner

    from lurker.cli import main

    r = CliRunner().invoke(main, ["images", str(probed[0])])
    assert r.exit_code == 2 and "made from Python" in r.output and "write_all" in r.output


def test_deprecated_render_names_still_answer(probed: Any, tmp_path: Path) -> None:
    """The word "render" means drawing the graph: the old names of the image API warn, work."""
    from lurker.probe import images as pimages
    from lurker.probe import views

    g = torch.randn(3, 4, 5)
    with pytest.warns(DeprecationWarning, match="gradient_image"):
        old = pimages.render_gradient(g)
    assert np.array_equal(np.asarray(old), np.asarray(gradient_image(g)))
    with pytest.warns(DeprecationWarning, match="ImagesResult"):
        assert views.RenderResult is views.ImagesResult
    run, images = fresh(probed, tmp_path)
    with pytest.warns(DeprecationWarning, match="write_all"):
        result = images.render_all(layers=["3"], kinds=["grad"], which=["max"], progress=False)
    assert isinstance(result, views.ImagesResult) and result.made == 5 * 3
    assert len(list((run / "cache" / "grad" / "3").iterdir())) == 5 * 3


def test_gradients_one_backward_per_unit_and_many_units_per_pass(
    probed: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lurker.probe import views

    _, images = fresh(probed, tmp_path)
    rows: list[list[int]] = []
    real = views._gradients

    def counted(tr: Any, op: int, x: torch.Tensor, units: list[int], *a: Any) -> Any:
        rows.append(list(units))
        return real(tr, op, x, units, *a)

    monkeypatch.setattr(views, "_gradients", counted)
    paths = images.gradients("3", 1, "max")
    assert len(paths) == 3 and rows == [[1, 1, 1], [1]]  # one pass, then the one-row check
    rows.clear()
    images.gradients("3", 2, "max")
    assert rows == [[2, 2, 2]]  # checked once per layer
    rows.clear()
    result = images.write_all(layers=["3"], kinds=["grad"], which=["max"], progress=False)
    assert result.made == 3 * 3 and len(rows) == 1  # the three other units in one pass
    assert sorted(rows[0]) == [0, 0, 0, 3, 3, 3, 4, 4, 4]


def test_a_model_in_training_mode_is_run_in_eval_and_given_back_training(
    tmp_path: Path,
) -> None:
    """UnitImages runs the model in eval mode (dropout off: the images are those of an eval
    copy) and leaves each module's training flag as it came in, as the probe does."""
    import copy

    from lurker.probe import UnitImages

    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 2, 3)
    )
    ds = Data(12)
    lurker.probe(model.eval(), ds, out=tmp_path / "run", layers=["4"], k=3, progress=False)
    ref = copy.deepcopy(model).eval()
    model.train()
    model[3].eval()  # a mixed state comes back as it was, module by module
    got = UnitImages(tmp_path / "run", model=model, dataset=ds).gradients("4", 1, "max")
    assert model.training and model[1].training and not model[3].training
    (tmp_path / "ref").mkdir()
    import shutil

    shutil.copytree(
        tmp_path / "run", tmp_path / "ref" / "run", ignore=shutil.ignore_patterns("cache")
    )
    want = UnitImages(tmp_path / "ref" / "run", model=ref, dataset=ds).gradients("4", 1, "max")
    for p, q in zip(got, want, strict=True):
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(q)))


KILLED_MID_WRITE = """
import os, signal, sys
from lurker.store import files

os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # dies between write and rename
files.atomic_write_bytes(sys.argv[1], b"half an image")
"""


def test_write_all_removes_the_temp_files_of_killed_writers_only(
    probed: Any, tmp_path: Path
) -> None:
    """`lurker images` killed by SIGKILL mid-write left ``.lurker-tmp-*`` files in the
    cache that reruns never removed (they piled up). A rerun removes those whose writer
    is gone, and keeps one a running process (a `lurker serve`) is writing now."""
    from lurker.store import files

    run, images = fresh(probed, tmp_path)
    folder = run / "cache" / "grad" / "3"
    folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", KILLED_MID_WRITE, str(folder / "00000-max-000.png")],
        env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL
    (killed,) = folder.glob(".lurker-tmp-*")
    live = folder / f"{files._tmp_tag()}00001-max-000.png.abcd1234"  # this process: running
    live.write_bytes(b"being written")
    old = folder / ".lurker-tmp-00002-max-000.png.wxyz9876"  # no writer named, 2 hours old
    old.write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    images.write_all(kinds=["grad"], progress=False)
    assert not killed.exists() and not old.exists()
    assert live.read_bytes() == b"being written"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [live.name, *(p.name for p in folder.glob("*.png"))]
    )
