"""Explorer images: guided backprop against an independent oracle, crops, the PNG cache."""

from __future__ import annotations

import threading
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
    guided_backprop,
    render_gradient,
    unit_gradient,
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


def test_render_gradient() -> None:
    g = torch.zeros(3, 4, 5)
    g[0, 1, 2], g[2, 0, 0] = 2.0, -1.0
    img = render_gradient(g)
    arr = np.asarray(img)
    assert img.mode == "RGB" and img.size == (5, 4) and arr.dtype == np.uint8
    assert arr[1, 2, 0] == 255 and arr[0, 0, 2] == 64 and arr[3, 3, 1] == 128
    assert (np.asarray(render_gradient(torch.zeros(1, 3, 3))) == 128).all()
    one = np.asarray(render_gradient(torch.randn(1, 6, 6)))
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
    p4 = cache.get(tmp_path / "run", "input", "features.0", 3, 0, "max", produce)
    assert p4 != p1 and calls == [1, 1]
    assert not [f for f in p1.parent.iterdir() if f.name.startswith(".lurker-tmp")]
    with pytest.raises(LurkerError, match="kind"):
        cache.get(tmp_path / "run", "thumbnail", "x", 0, 0, "max", produce)


def test_image_cache_concurrent_requests_render_once(tmp_path: Path) -> None:
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
