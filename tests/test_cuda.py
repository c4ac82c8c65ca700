"""The same numbers on a GPU as on the CPU: every explanation method, concept relevance,
feature visualization and the probe (skipped where no CUDA device exists; CI has none, a
machine with a GPU runs them)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lurker
from models_zoo import digits_net_float64

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

OPTS: dict[str, dict] = {
    "integrated_gradients": {"n_steps": 8},
    "smoothgrad": {"n_samples": 4, "seed": 0},
    "gradcam": {"layer": "features.4"},
    "gradcam_plus_plus": {"layer": "features.4"},
    "occlusion": {"window": 4, "strides": 4},
    "lrp": {"composite": "epsilon_plus_flat"},
}


def snapshot(model: nn.Module) -> list:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [(name, p.requires_grad, p.device.type) for name, p in model.named_parameters()] + [
        (name, *(len(getattr(m, h, {})) for h in hooks)) for name, m in model.named_modules()
    ]


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> None:
    a, b = a.detach().cpu(), b.detach().cpu()
    assert a.shape == b.shape
    err = float((a - b).abs().max())
    assert err <= rel * max(float(b.abs().max()), 1e-12), err


@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, nn.Module]:
    cpu = digits_net_float64()
    return cpu, copy.deepcopy(cpu).cuda()


@pytest.mark.parametrize("method", [*lurker.explain.METHODS])
def test_explanation_on_cuda_equals_cpu(models, method) -> None:
    cpu, gpu = models
    torch.manual_seed(1)
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    opts = OPTS.get(method, {})
    before = snapshot(gpu)
    e_gpu = lurker.explain(gpu, x.cuda(), target=[1, 4, 7], method=method, **opts)
    assert snapshot(gpu) == before
    assert e_gpu.attribution.device.type == "cuda"
    e_cpu = lurker.explain(cpu, x, target=[1, 4, 7], method=method, **opts)
    close(e_gpu.attribution, e_cpu.attribution)
    # a unit target takes the same path on the GPU
    unit = lurker.explain(gpu, x.cuda(), target=("features.8", 2), method=method, **opts)
    ref = lurker.explain(cpu, x, target=("features.8", 2), method=method, **opts)
    close(unit.attribution, ref.attribution)


def test_concepts_on_cuda_equal_cpu(models) -> None:
    cpu, gpu = models
    torch.manual_seed(2)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    c_gpu = lurker.explain.concepts(gpu, x.cuda(), target=3, layer="features.4", top=4)
    c_cpu = lurker.explain.concepts(cpu, x, target=3, layer="features.4", top=4)
    assert torch.equal(c_gpu.units.cpu(), c_cpu.units)
    close(c_gpu.relevance, c_cpu.relevance)
    close(c_gpu.heatmaps, c_cpu.heatmaps)


def test_featviz_on_cuda_raises_its_units(models, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the GPU (the model's parameters stay there and see the images), the optimized
    images raise their units, and reach about what the same seeded run reaches on the CPU
    (the kernels differ, so not bit for bit)."""
    cpu, gpu = models
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    seen: list[str] = []
    model = copy.deepcopy(gpu).float()
    handle = model.features[4].register_forward_hook(lambda m, i, o: seen.append(o.device.type))
    kw = dict(units=[0, 1, 2, 3], steps=32, size=16, seed=0)
    try:
        fv = lurker.featviz(model, "features.4", **kw)
    finally:
        handle.remove()
    assert seen and set(seen) == {"cuda"}
    assert fv.images.shape == (4, 1, 16, 16)
    assert bool(((fv.images >= 0) & (fv.images <= 1)).all())
    assert int((fv.activations > fv.start).sum()) >= 3
    ref = lurker.featviz(copy.deepcopy(cpu).float(), "features.4", **kw)
    np.testing.assert_allclose(fv.activations, ref.activations, rtol=0.1, atol=1e-3)


def test_probe_on_cuda_equals_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lurker.examples import DigitsNet

    # float32 on the GPU: TF32 convolutions (cuDNN's default) would round past these
    # tolerances; matmuls keep full float32 by default
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    from lurker.probe.data import load_dataset

    torch.manual_seed(0)
    model = DigitsNet().eval()
    ds = load_dataset("digits:test", 16)
    layers = ["features.0", "features.4", "features.8"]
    kw = dict(layers=layers, k=4, batch_size=32, progress=False)
    a = lurker.probe(model, ds, out=tmp_path / "cpu", device="cpu", **kw)
    b = lurker.probe(copy.deepcopy(model), ds, out=tmp_path / "gpu", device="cuda", **kw)
    for info in a.layers:
        for u in range(info.num_units):
            ua, ub = a.unit(info.name, u), b.unit(info.name, u)
            for which in ("max", "mean"):
                va = [e.value for e in ua.top(which)]
                vb = [e.value for e in ub.top(which)]
                np.testing.assert_allclose(vb, va, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(
                ub.class_mean_array(), ua.class_mean_array(), rtol=1e-4, atol=1e-5
            )
