"""lurker.explain: every method against an independent oracle (Captum, autograd, axioms),
targets, batches, the model left untouched, bad input, the CLI."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import lurker
from lurker.errors import LurkerError
from models_zoo import digits_net_float64

captum_attr = pytest.importorskip("captum.attr")


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """max |a - b| < rel * max |b| (relative to the oracle's scale)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.detach(), b.detach()
    scale = float(b.abs().max())
    err = float((a - b).abs().max())
    assert err <= rel * max(scale, 1e-12), f"max abs diff {err:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def digits() -> nn.Module:
    return digits_net_float64()


@pytest.fixture(scope="module")
def xd() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(3, 1, 16, 16, dtype=torch.float64)


def test_callable_from_package_root(digits, xd) -> None:
    e = lurker.explain(digits, xd, target=3)
    assert e.attribution.shape == xd.shape and e.method == "saliency"
    assert e.target == [3, 3, 3]
    assert "saliency" in lurker.explain.METHODS


def test_saliency_equals_captum(digits, xd) -> None:
    e = lurker.explain(digits, xd, target=[1, 4, 7], method="saliency")
    ref = captum_attr.Saliency(digits).attribute(xd, target=[1, 4, 7])
    close(e.attribution, ref)
    assert (e.attribution >= 0).all()


# ---------------------------------------------------------------------- helpers
def no_inplace(model: nn.Module) -> nn.Module:
    """A copy whose ReLUs are not in place: Captum's module backward hooks refuse
    in-place modules; the math is the same."""
    import copy

    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.ReLU):
            mod.inplace = False
    return m


def snapshot(model: nn.Module) -> tuple:
    from lurker.capture._hooks import model_hooks

    return (
        model_hooks(dict(model.named_modules())),
        [p.requires_grad for p in model.parameters()],
        [p.grad for p in model.parameters()],
        [m.training for m in model.modules()],
    )


ALL = [
    "saliency",
    "input_x_gradient",
    "guided_backprop",
    "deconvnet",
    "integrated_gradients",
    "smoothgrad",
    "gradcam",
    "gradcam_plus_plus",
    "occlusion",
    "lrp",
]
OPTS: dict[str, dict] = {
    "integrated_gradients": {"n_steps": 8},
    "smoothgrad": {"n_samples": 4, "seed": 0},
    "gradcam": {"layer": "features.8"},
    "gradcam_plus_plus": {"layer": "features.8"},
    "occlusion": {"window": 4, "strides": 4},
}


# ---------------------------------------------------------------------- Captum equality
def test_input_x_gradient_equals_captum(digits, xd) -> None:
    e = lurker.explain(digits, xd, target=2, method="input_x_gradient")
    close(e.attribution, captum_attr.InputXGradient(digits).attribute(xd, target=2))


@pytest.mark.parametrize(
    ("method", "oracle"), [("guided_backprop", "GuidedBackprop"), ("deconvnet", "Deconvolution")]
)
def test_modified_relu_methods_equal_captum(digits, xd, method, oracle) -> None:
    e = lurker.explain(digits, xd, target=[0, 5, 9], method=method)  # in-place ReLUs here
    ref = getattr(captum_attr, oracle)(no_inplace(digits)).attribute(xd, target=[0, 5, 9])
    close(e.attribution, ref)
    assert not torch.equal(e.attribution, lurker.explain(digits, xd, target=[0, 5, 9]).attribution)


def test_deconvnet_ignores_the_forward_input() -> None:
    """Through one ReLU the deconvnet passes relu(grad) even where the input was negative."""

    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (torch.relu(x) * torch.tensor([[1.0, -1.0, 2.0]])).sum(1, keepdim=True)

    x = torch.tensor([[-1.0, 2.0, 3.0]])
    d = lurker.explain(M(), x, target=0, method="deconvnet").attribution
    g = lurker.explain(M(), x, target=0, method="guided_backprop").attribution
    assert d.tolist() == [[1.0, 0.0, 2.0]]
    assert g.tolist() == [[0.0, 0.0, 2.0]]


@pytest.mark.parametrize("integration", ["gausslegendre", "riemann_left", "riemann_middle"])
def test_integrated_gradients_equals_captum(digits, xd, integration) -> None:
    base = torch.full_like(xd, 0.1)
    e = lurker.explain(
        digits,
        xd,
        target=[3, 1, 4],
        method="integrated_gradients",
        baseline=base,
        n_steps=20,
        integration=integration,
        internal_batch_size=7,  # chunks that split a step's rows
    )
    ref, delta = captum_attr.IntegratedGradients(digits).attribute(
        xd,
        baselines=base,
        target=[3, 1, 4],
        n_steps=20,
        method=integration,
        return_convergence_delta=True,
    )
    close(e.attribution, ref)
    close(e.delta, delta, rel=1e-4)


def test_integrated_gradients_trapezoid_is_the_trapezoid_rule(digits, xd) -> None:
    """``riemann_trapezoid`` is the trapezoid rule over autograd's gradients at its nodes
    (numpy's ``trapezoid``), not Captum's, whose weights sum to (n - 1) / n: on a linear
    model Captum's misses 1/n of f(x) - f(x0), lurker's is complete; on the digits CNN
    lurker's is Captum's times n / (n - 1), exactly the weights' fault."""
    n = 12
    base = torch.full_like(xd, 0.1)
    alphas = np.linspace(0, 1, n)
    grads = []
    for a in alphas:
        xa = (base + float(a) * (xd - base)).requires_grad_(True)
        (g,) = torch.autograd.grad(digits(xa)[range(3), [3, 1, 4]].sum(), xa)
        grads.append(g.double().numpy())
    want = np.trapezoid(np.stack(grads), alphas, axis=0) * (xd - base).double().numpy()
    e = lurker.explain(
        digits, xd, target=[3, 1, 4], method="integrated_gradients", baseline=base,
        n_steps=n, integration="riemann_trapezoid",
    )  # fmt: skip
    close(e.attribution, torch.from_numpy(want).float())
    ref = captum_attr.IntegratedGradients(digits).attribute(
        xd, baselines=base, target=[3, 1, 4], n_steps=n, method="riemann_trapezoid"
    )
    close(e.attribution, ref * n / (n - 1))

    torch.manual_seed(0)
    lin = nn.Linear(20, 3).eval()
    x = torch.randn(4, 20)
    e = lurker.explain(lin, x, target=2, method="integrated_gradients", n_steps=n,
                       integration="riemann_trapezoid")  # fmt: skip
    exact = x * lin.weight[2].detach()  # (x - 0) * the constant gradient
    close(e.attribution, exact)
    assert e.delta.abs().max() < 1e-5
    ref = captum_attr.IntegratedGradients(lin).attribute(
        x, target=2, n_steps=n, method="riemann_trapezoid"
    )
    close(ref, exact * (n - 1) / n)  # Captum's (the oracle that was wrong)


def test_integrated_gradients_completeness(digits, xd) -> None:
    e = lurker.explain(digits, xd, target=7, method="integrated_gradients", n_steps=256)
    with torch.no_grad():
        gap = digits(xd)[:, 7] - digits(torch.zeros_like(xd))[:, 7]
    total = e.attribution.sum((1, 2, 3))
    assert torch.allclose(total - gap, e.delta, atol=1e-9)
    assert (e.delta.abs() <= 0.02 * gap.abs()).all()  # within 2% at 256 nodes (ReLU kinks)
    coarse = lurker.explain(digits, xd, target=7, method="integrated_gradients", n_steps=8)
    assert e.delta.abs().sum() < coarse.delta.abs().sum()  # the quadrature converges
    close(e.output, digits(xd).detach())


def test_integrated_gradients_float16_delta_is_not_rounded() -> None:
    """A float16 model: the convergence delta, sum(attribution) - (f(x) - f(baseline)),
    equals its float64 computation from the same attribution and scores (it was summed
    in float16, reading 0 for a row 2e-5 off), and the attribution sums to the float64
    model's within 1e-3 of the gap (its steps were summed in float16: 3e-3 off)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 4)).eval()
    x = torch.randn(3, 64) * 2
    e64 = lurker.explain(m.double(), x.double(), target=1, method="integrated_gradients")
    m16, x16 = m.half(), x.half()
    e = lurker.explain(m16, x16, target=1, method="integrated_gradients")
    with torch.no_grad():
        gap = m16(x16)[:, 1].double() - m16(torch.zeros_like(x16))[:, 1].double()
    oracle = e.attribution.double().sum(1) - gap
    assert torch.allclose(e.delta.double(), oracle, rtol=1e-6, atol=1e-9)
    assert e.delta.dtype == torch.float32
    off = (e.attribution.double().sum(1) - e64.attribution.sum(1)).abs() / gap.abs()
    assert (off < 1e-3).all()


@pytest.mark.parametrize("abs_", [True, False])
def test_smoothgrad_equals_captum_noise_tunnel(digits, xd, abs_) -> None:
    n, stdev = 6, 0.2
    torch.manual_seed(123)
    ref = captum_attr.NoiseTunnel(captum_attr.Saliency(digits)).attribute(
        xd, nt_type="smoothgrad", nt_samples=n, stdevs=stdev, target=[2, 3, 4], abs=abs_
    )
    # Captum's draw: one torch.normal over (B * n, ...) rows, row b's samples together
    torch.manual_seed(123)
    noise = torch.normal(0, torch.tensor(stdev).repeat((xd.shape[0] * n, *xd.shape[1:])))
    noise = noise.reshape(xd.shape[0], n, *xd.shape[1:]).transpose(0, 1)
    e = lurker.explain(digits, xd, target=[2, 3, 4], method="smoothgrad", noise=noise, abs=abs_)
    close(e.attribution, ref)
    assert e.signed is not abs_


def test_smoothgrad_seed_reproducible_and_noise_matters(digits, xd) -> None:
    a = lurker.explain(digits, xd, method="smoothgrad", n_samples=3, seed=5).attribution
    b = lurker.explain(digits, xd, method="smoothgrad", n_samples=3, seed=5).attribution
    c = lurker.explain(digits, xd, method="smoothgrad", n_samples=3, seed=6).attribution
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("layer", ["features.8", "conv2d_3", "features.6"])
def test_gradcam_equals_captum(digits, xd, layer) -> None:
    """At a module path, at a trace label (the same conv by its op), and at an in-place
    ReLU module, at the layer's resolution and upsampled."""
    from captum.attr import LayerAttribution, LayerGradCam

    module = {"conv2d_3": "features.8"}.get(layer, layer)
    e = lurker.explain(digits, xd, target=[1, 2, 3], method="gradcam", layer=layer)
    m = no_inplace(digits)
    ref = LayerGradCam(m, m.get_submodule(module)).attribute(
        xd, target=[1, 2, 3], relu_attributions=True
    )
    close(e.layer_attribution, ref)
    up = LayerAttribution.interpolate(ref, xd.shape[2:], interpolate_mode="bilinear")
    close(e.attribution, up.expand_as(xd))
    assert e.attribution.shape == xd.shape and e.options["layer"] == layer


def test_gradcam_at_a_functional_op_equals_autograd() -> None:
    """The sum of two branches, a functional add that no module hook reaches."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3, padding=1)
            self.b = nn.Conv2d(3, 6, 5, padding=2)
            self.head = nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = self.a(x) + self.b(x)
            return self.head(torch.relu(s).mean((2, 3)))

    torch.manual_seed(0)
    m, x = Two().eval(), torch.randn(2, 3, 8, 8)
    e = lurker.explain(m, x, target=[1, 3], method="gradcam", layer="add_1")
    s = (m.a(x) + m.b(x)).detach().requires_grad_(True)
    score = m.head(torch.relu(s).mean((2, 3)))[[0, 1], [1, 3]].sum()
    (g,) = torch.autograd.grad(score, s)
    cam = (g.mean((2, 3), keepdim=True) * s).sum(1, keepdim=True).clamp(min=0)
    close(e.layer_attribution, cam.detach())


def _hooked_grad(model: nn.Module, x: torch.Tensor, module: str, cls: int) -> tuple:
    """A module's output and the gradient of class ``cls``'s logit with respect to it."""
    seen: list[torch.Tensor] = []
    h = dict(model.named_modules())[module].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        out = model(x)
    finally:
        h.remove()
    (g,) = torch.autograd.grad(out[:, cls].sum(), seen[0])
    return seen[0].detach(), g


def _cam(A: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM on (B, C, H, W) maps, by its definition."""
    return (g.mean((2, 3), keepdim=True) * A).sum(1, keepdim=True).clamp(min=0)


def test_gradcam_on_tokens_and_channels_last_maps() -> None:
    """A ViT's tokens placed on their patch grid (the class token left out) and a
    channels-last (B, H, W, C) map with its channels as units: Grad-CAM equals its
    definition on the layer's output rearranged by hand, as pytorch-grad-cam's reshape
    transforms do. By default a ViT whose head reads the class token is explained at the
    last map the target reaches (before the last attention): after it the map is zero."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(16, 4, 2, 2, 16, 32, num_classes=10).eval()
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts it at zero: no gradient
    x = torch.randn(2, 3, 16, 16)
    grid = lambda t: t[:, 1:].reshape(2, 4, 4, 16).permute(0, 3, 1, 2)  # noqa: E731
    for module in ("encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1.ln_1"):
        e = lurker.explain(vit, x, target=[3, 7], method="gradcam", layer=module, relu=False)
        A, g = (torch.cat(t) for t in zip(*(_hooked_grad(vit, x[i : i + 1], module, c)
                                               for i, c in enumerate([3, 7]))))  # fmt: skip
        want = (g_ := grid(g)).mean((2, 3), keepdim=True).mul(grid(A)).sum(1, keepdim=True)
        assert want.abs().amax() > 1e-3 and g_.abs().amax() > 0  # a map that can be wrong
        assert torch.allclose(e.layer_attribution, want, atol=1e-6)
        assert e.attribution.shape == x.shape
    e = lurker.explain(vit, x, target=[3, 7], method="gradcam")
    assert e.layer_attribution.abs().amax() > 0
    later = lurker.explain(vit, x, target=[3, 7], method="gradcam", layer="encoder.ln")
    assert later.layer_attribution.abs().amax() == 0  # why the default is not the last map

    class ChannelsLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.mix = nn.Linear(8, 6)
            self.head = nn.Linear(6, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.mix(self.stem(x).permute(0, 2, 3, 1))).mean((1, 2)))

    m = ChannelsLast().eval()
    x = torch.randn(1, 3, 8, 8)
    e = lurker.explain(m, x, target=2, method="gradcam", layer="mix")
    A, g = _hooked_grad(m, x, "mix", 2)  # (1, 8, 8, 6): units last
    assert torch.allclose(
        e.layer_attribution, _cam(A.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)), atol=1e-6
    )


def test_gradcam_plus_plus_equals_brute_force(digits, xd) -> None:
    e = lurker.explain(digits, xd, target=[4, 4, 6], method="gradcam_plus_plus", layer="features.8")
    acts: dict = {}
    m = no_inplace(digits)
    h = m.features[8].register_forward_hook(lambda mod, i, o: acts.update(A=o))
    out = m(xd)
    h.remove()
    A = acts["A"]
    (G,) = torch.autograd.grad(out[[0, 1, 2], [4, 4, 6]].sum(), A)
    B, K, H, W = A.shape
    cam = torch.zeros(B, 1, H, W, dtype=A.dtype)
    for b in range(B):
        for k in range(K):
            total = float(A[b, k].sum())
            w = 0.0
            for i in range(H):
                for j in range(W):
                    g = float(G[b, k, i, j])
                    den = 2 * g**2 + total * g**3
                    alpha = g**2 / den if den != 0 else 0.0
                    w += alpha * max(g, 0.0)
            cam[b, 0] += w * A[b, k].detach()
    close(e.layer_attribution, cam.clamp(min=0))


class _SmallCNN(nn.Module):
    """Conv, ReLU, max pool, conv, ReLU, linear: ReLUs and pools only after ``c2``, so
    the score is piecewise linear in ``c2``'s map, as Grad-CAM++'s closed form assumes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 7)

    def head(self, a: torch.Tensor) -> torch.Tensor:  # the network after c2
        return self.fc(torch.relu(a).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c2(nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)))


def test_gradcam_plus_plus_equals_the_papers_closed_form_by_autograd() -> None:
    """Grad-CAM++ as Chattopadhay et al. (2018) derive it: Y = exp(S), alpha = d2Y /
    (2 d2Y + sum_ab A_ab d3Y), w_k = sum_ij alpha relu(dY/dA), map relu(sum_k w_k A_k),
    each derivative of Y taken by autograd (element by element, nested), not from the
    gradient's powers. lurker drops the paper's exp(S) factor of dY/dA (as pytorch-grad-cam
    does): its map is the paper's divided by exp(S) of its row, a positive number, so
    the shape of the map is the paper's. A batch, each row its own class."""
    torch.manual_seed(0)
    m = _SmallCNN().double().eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    targets = [0, 3, 6, 2]
    e = lurker.explain(m, x, target=targets, method="gradcam_plus_plus", layer="c2")
    with torch.no_grad():
        A = m.c2(nn.functional.max_pool2d(torch.relu(m.c1(x)), 2))
    _, K, H, W = A.shape
    for b, c in enumerate(targets):
        a = A[b : b + 1].clone().requires_grad_(True)
        score = m.head(a)[0, c]
        (d1,) = torch.autograd.grad(torch.exp(score), a, create_graph=True)
        d2, d3 = torch.zeros_like(A[b]), torch.zeros_like(A[b])
        for k in range(K):
            for i in range(H):
                for j in range(W):
                    (g2,) = torch.autograd.grad(d1[0, k, i, j], a, create_graph=True)
                    (g3,) = torch.autograd.grad(g2[0, k, i, j], a, retain_graph=True)
                    d2[k, i, j], d3[k, i, j] = g2[0, k, i, j], g3[0, k, i, j]
        den = 2 * d2 + A[b].sum((1, 2), keepdim=True) * d3
        alpha = torch.where(den != 0, d2 / torch.where(den != 0, den, 1.0), 0.0)
        w = (alpha * d1.detach()[0].clamp(min=0)).sum((1, 2), keepdim=True)
        paper = (w * A[b]).sum(0).clamp(min=0)
        assert paper.abs().max() > 0  # (else this row tests nothing)
        close(e.layer_attribution[b, 0] * torch.exp(score.detach()), paper, 1e-10)


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float16, 1e-3), (torch.float32, 1e-22)])
def test_gradcam_plus_plus_of_small_gradients_is_not_rounded_away(dtype, scale) -> None:
    """Grad-CAM++'s alpha, g^2 / (2 g^2 + sum A g^3), taken as written underflows where the
    gradient is small: a float16 gradient under 2.4e-4 (the usual size at the last map of
    a float16 ImageNet model) has g^2 = 0, and the map was 0 with a warning that the
    layer's units do not fire. The same model in float64 is the oracle: its map is the
    float16 model's up to float16's rounding."""
    import copy

    torch.manual_seed(0)
    m = _SmallCNN().double().eval()
    with torch.no_grad():
        m.fc.weight.mul_(scale)  # the gradient at c2 is about scale / 10
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    want = lurker.explain(m, x, target=[0, 3, 6], method="gradcam_plus_plus", layer="c2")
    low = copy.deepcopy(m).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no warning that the map is 0)
        e = lurker.explain(low, x.to(dtype), [0, 3, 6], "gradcam_plus_plus", layer="c2")
    assert e.layer_attribution.dtype == dtype
    assert want.layer_attribution.abs().amax((1, 2, 3)).min() > 0
    close(e.layer_attribution.double(), want.layer_attribution, 2e-2)


def test_occlusion_equals_captum(digits, xd) -> None:
    """A 5x5 window at stride 4 on 16x16: Captum's last window sticks out and is clipped."""
    base = torch.full_like(xd, 0.3)
    e = lurker.explain(
        digits,
        xd,
        target=[7, 8, 9],
        method="occlusion",
        window=5,
        strides=4,
        baseline=base,
        internal_batch_size=5,
    )
    ref = captum_attr.Occlusion(digits).attribute(
        xd, sliding_window_shapes=(1, 5, 5), strides=(1, 4, 4), baselines=base, target=[7, 8, 9]
    )
    close(e.attribution, ref)


# ---------------------------------------------------------------------- torchvision
@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def test_resnet18_gradients_and_gradcam_equal_captum(resnet) -> None:
    from captum.attr import LayerGradCam

    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 64)
    e = lurker.explain(resnet, x, target=[3, 5], method="input_x_gradient")
    close(e.attribution, captum_attr.InputXGradient(resnet).attribute(x, target=[3, 5]), 1e-4)
    e = lurker.explain(resnet, x, target=[3, 5], method="gradcam", layer="layer3")
    ref = LayerGradCam(resnet, resnet.layer3).attribute(x, target=[3, 5], relu_attributions=True)
    close(e.layer_attribution, ref, 1e-4)
    # the residual sum inside the last block (out += identity), a functional op
    add = [op.label for op in lurker.trace(resnet, x[:1]).ops if op.module == "layer4.1"]
    e = lurker.explain(resnet, x, method="gradcam", layer=[a for a in add if "add" in a][-1])
    assert e.attribution.shape == x.shape and torch.isfinite(e.attribution).all()


def test_resnet18_batch_of_targets_equals_captum(resnet) -> None:
    """float32 ResNet18, each row its own class: saliency, integrated gradients (each row
    its own baseline, Captum's quadrature and chunks) with its convergence delta, and
    Grad-CAM upsampled to the input, each equal to Captum's."""
    from captum.attr import LayerAttribution, LayerGradCam

    torch.manual_seed(3)
    x = torch.randn(3, 3, 64, 64)
    base = 0.1 * torch.randn(3, 3, 64, 64)
    targets = [1, 5, 9]
    e = lurker.explain(resnet, x, target=targets, method="saliency")
    close(e.attribution, captum_attr.Saliency(resnet).attribute(x, target=targets), 1e-6)
    kw = {"n_steps": 16, "internal_batch_size": 10}
    for integration in ("gausslegendre", "riemann_middle"):
        e = lurker.explain(
            resnet, x, targets, "integrated_gradients", baseline=base, integration=integration, **kw
        )
        ref, delta = captum_attr.IntegratedGradients(resnet).attribute(
            x, base, target=targets, method=integration, return_convergence_delta=True, **kw
        )
        close(e.attribution, ref, 1e-5)
        close(e.delta, delta, 1e-4)
        with torch.no_grad():
            gap = resnet(x)[range(3), targets] - resnet(base)[range(3), targets]
        assert torch.allclose(e.delta, e.attribution.sum((1, 2, 3)) - gap, atol=1e-5)
    e = lurker.explain(resnet, x, target=targets, method="gradcam", layer="layer4")
    ref = LayerGradCam(resnet, resnet.layer4).attribute(x, target=targets, relu_attributions=True)
    assert ref.abs().max() > 0
    up = LayerAttribution.interpolate(ref, x.shape[2:], interpolate_mode="bilinear")
    close(e.attribution, up.expand_as(x), 1e-5)


# ---------------------------------------------------------------------- targets
def _unit(model: nn.Module, x: torch.Tensor, upto: int, c: int, y=None, x_=None) -> torch.Tensor:
    """The unit by hand: the first layers of ``features`` run as plain modules."""
    a = no_inplace(model).features[: upto + 1](x)[:, c]
    return a.mean((1, 2)) if y is None else a[:, y, x_]


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient"])
@pytest.mark.parametrize("pos", [(None, None), (2, 1)])
def test_unit_target_equals_autograd(digits, xd, method, pos) -> None:
    target = ("features.8", 5) if pos[0] is None else ("features.8", 5, *pos)
    e = lurker.explain(digits, xd, target=target, method=method)
    xi = xd.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_unit(digits, xi, 8, 5, *pos).sum(), xi)
    close(e.attribution, g.abs() if method == "saliency" else xd * g)
    assert e.target == lurker.explain.UnitTarget("features.8", 5, *pos)
    assert e.output is None  # the forward stopped at the unit


def test_unit_target_by_trace_label_and_integrated_gradients(digits, xd) -> None:
    """A unit named by its op's trace label; integrated gradients of a unit is complete."""
    tr = lurker.trace(digits, xd[:1])
    label = tr["features.9"].label  # the in-place relu after the last conv
    e = lurker.explain(digits, xd, target=(label, 3), method="integrated_gradients", n_steps=64)
    with torch.no_grad():
        gap = _unit(digits, xd, 9, 3) - _unit(digits, torch.zeros_like(xd), 9, 3)
    assert torch.allclose(e.attribution.sum((1, 2, 3)) - gap, e.delta, atol=1e-9)
    xi = xd.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_unit(digits, xi, 9, 3).sum(), xi)
    s = lurker.explain(digits, xd, target=(label, 3), method="saliency")
    close(s.attribution, g.abs())


def test_top_and_per_row_targets(digits, xd) -> None:
    top = digits(xd).argmax(1).tolist()
    for method in ("saliency", "integrated_gradients", "occlusion"):
        opts = OPTS.get(method, {})
        a = lurker.explain(digits, xd, method=method, **opts)
        b = lurker.explain(digits, xd, target="top", method=method, **opts)
        c = lurker.explain(digits, xd, target=top, method=method, **opts)
        assert a.target == b.target == c.target == top
        close(a.attribution, c.attribution)
        close(b.attribution, c.attribution)


@pytest.mark.parametrize("method", ALL)
def test_batch_rows_equal_single_rows(digits, xd, method) -> None:
    opts = dict(OPTS.get(method, {}))
    if method == "smoothgrad":
        opts = {
            "noise": 0.2
            * torch.randn(4, *xd.shape, generator=torch.Generator().manual_seed(0), dtype=xd.dtype)
        }
    e = lurker.explain(digits, xd, target=[1, 2, 3], method=method, **opts)
    for i in range(xd.shape[0]):
        o = dict(opts)
        if method == "smoothgrad":
            o["noise"] = opts["noise"][:, i : i + 1]
        one = lurker.explain(digits, xd[i : i + 1], target=[1 + i], method=method, **o)
        close(one.attribution[0], e.attribution[i], 1e-9)


@pytest.mark.parametrize("method", ALL)
def test_inside_inference_mode_gives_the_same_attribution(digits, xd, method) -> None:
    """Evaluation code often runs under torch.inference_mode, where autograd records
    nothing: the gradient methods gave all-zero maps there without a word."""
    opts = OPTS.get(method, {})
    e = lurker.explain(digits, xd, target=[1, 2, 3], method=method, **opts)
    with torch.inference_mode():
        x = xd.clone()  # an inference tensor, as a loader run in that mode makes
        inner = lurker.explain(digits, x, target=[1, 2, 3], method=method, **opts)
    assert inner.attribution.abs().sum() > 0
    close(inner.attribution, e.attribution, 1e-9)


def test_concepts_and_evaluate_inside_inference_mode(digits, xd) -> None:
    c = lurker.explain.concepts(digits, xd, 3, layer="features.8", top=3)
    ev = lurker.explain.evaluate(digits, xd, 3, "saliency", layers=["classifier.3"])
    with torch.inference_mode():
        ci = lurker.explain.concepts(digits, xd, 3, layer="features.8", top=3)
        evi = lurker.explain.evaluate(digits, xd, 3, "saliency", layers=["classifier.3"])
    close(ci.relevance, c.relevance, 1e-9)
    close(ci.heatmaps, c.heatmaps, 1e-9)
    close(evi.deletion.scores, ev.deletion.scores, 1e-9)
    close(evi.randomization.similarity, ev.randomization.similarity, 1e-9)


# ---------------------------------------------------------------------- model untouched
@pytest.mark.parametrize("method", ALL)
def test_model_left_untouched_also_when_raising(digits, xd, method) -> None:
    m = no_inplace(digits)
    m.features[0].weight.requires_grad_(False)
    keep = m.features[4].register_forward_hook(lambda *a: None)  # the user's own
    before = snapshot(m)
    lurker.explain(m, xd, target=1, method=method, **OPTS.get(method, {}))
    assert snapshot(m) == before
    with pytest.raises(LurkerError, match="out of range"):
        lurker.explain(m, xd, target=10, method=method, **OPTS.get(method, {}))
    assert snapshot(m) == before

    class Boom(RuntimeError):
        pass

    def boom(*a):
        raise Boom("inside the forward")

    h = m.classifier[1].register_forward_hook(boom)
    mid = snapshot(m)
    with pytest.raises(Boom):
        lurker.explain(m, xd, target=1, method=method, **OPTS.get(method, {}))
    assert snapshot(m) == mid
    h.remove()
    keep.remove()
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("method", ALL)
def test_model_in_train_mode_keeps_its_buffers(digits, xd, method) -> None:
    """A model explained in train mode runs its BatchNorms on batch statistics, which
    updates their running statistics on every forward a method makes: they are put back
    (the model is left as it was found), and so is a buffer the model reassigns."""

    class Counting(nn.Module):  # reassigns its buffer in forward
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls = self.calls + 1
            return self.net(x)

    m = Counting(no_inplace(digits)).train()
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "tracked" in k}
    assert len(before) == 3 * 2  # running mean, var and batch count of each BatchNorm
    calls = m.calls
    opts = {k: f"net.{v}" if k == "layer" else v for k, v in OPTS.get(method, {}).items()}
    with pytest.warns(UserWarning, match="training mode"):
        lurker.explain(m, xd, target=1, method=method, **opts)
    after = m.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, changed
    assert m.calls is calls and int(m.calls) == 0 and m.training


@pytest.mark.parametrize("method", ALL)
def test_a_model_in_train_mode_is_said_to_be_explained_as_it_trains(digits, xd, method) -> None:
    """In training mode BatchNorm normalises by the batch's statistics, so a row's
    attribution depends on the other rows (and, for integrated gradients and SmoothGrad,
    on the copies run with it): not the model's prediction. Lurker leaves the mode as it
    is, so it says so, naming the layers; in eval mode, or with no layer that trains
    differently, it says nothing."""
    m = no_inplace(digits).train()
    opts = OPTS.get(method, {})
    with pytest.warns(UserWarning, match=r"training mode.*features\.1 \(BatchNorm2d\).*eval\(\)"):
        e = lurker.explain(m, xd, target=1, method=method, **opts)
    if method not in ("gradcam", "gradcam_plus_plus"):  # (their map may be 0 either way)
        # what the warning is about: row 0 explained alone is another number
        with pytest.warns(UserWarning, match="training mode"):
            one = lurker.explain(m, xd[:1], target=1, method=method, **opts)
        assert not torch.allclose(one.attribution[0], e.attribution[0])
    quiet = [(no_inplace(digits).eval(), xd, opts)]
    if method not in ("gradcam", "gradcam_plus_plus"):  # (an MLP has no map for them)
        # a new module is in training mode, but nothing in this one computes otherwise
        quiet.append((nn.Sequential(nn.Flatten(), nn.Linear(256, 10)), xd.float(), {}))
    for model, x, o in quiet:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            lurker.explain(model, x, target=1, method=method, **o)
        assert not [r for r in w if "training mode" in str(r.message)]


def test_stochastic_depth_in_train_mode_is_said_and_evaluate_says_it_once(digits, xd) -> None:
    """Stochastic depth (torchvision's StochasticDepth, timm's DropPath) drops whole
    residual branches at random in training mode: two attributions of one input differ,
    so it is said as dropout is. evaluate explains the model once per randomized layer:
    it says it once, not once per layer."""
    from torchvision.ops import StochasticDepth

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(256, 256)
            self.drop = StochasticDepth(0.5, "row")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.drop(self.fc(x))

    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), Block(), nn.Linear(256, 10)).train()
    x = xd.float()
    with pytest.warns(UserWarning, match=r"training mode.*1\.drop \(StochasticDepth\)"):
        a = lurker.explain(m, x, target=1).attribution
    with pytest.warns(UserWarning, match="training mode"):
        b = lurker.explain(m, x, target=1).attribution
    assert not torch.equal(a, b)  # what the warning is about
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lurker.explain(m.eval(), x, target=1)
    assert not [r for r in w if "training mode" in str(r.message)]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lurker.explain.evaluate(digits.train(), xd, target=1, metrics=["randomization"])
    assert len([r for r in w if "training mode" in str(r.message)]) == 1
    digits.eval()


# ---------------------------------------------------------------------- bad input
def test_bad_input_errors(digits, xd) -> None:
    with pytest.raises(
        LurkerError, match=r"unknown explanation method 'lime'.*saliency.*occlusion"
    ):
        lurker.explain(digits, xd, method="lime")
    with pytest.raises(LurkerError, match=r"target class 12 is out of range.*10 outputs"):
        lurker.explain(digits, xd, target=12)
    with pytest.raises(LurkerError, match=r"one class per row.*3 rows, 2 targets"):
        lurker.explain(digits, xd, target=[1, 2])
    with pytest.raises(LurkerError, match=r"not in the model.*features.8"):
        lurker.explain(digits, xd, method="gradcam", layer="features.88")
    with pytest.raises(LurkerError, match=r"not in the model.*conv2d_3"):
        lurker.explain(digits, xd, target=("conv2d_33", 1))
    with pytest.raises(LurkerError, match=r"channel 40 is out of range.*32 channels"):
        lurker.explain(digits, xd, target=("features.8", 40))
    with pytest.raises(LurkerError, match=r"no option 'steps'.*n_steps"):
        lurker.explain(digits, xd, method="integrated_gradients", steps=3)
    with pytest.raises(LurkerError, match=r"floating point"):
        lurker.explain(digits, xd.long())
    with pytest.raises(LurkerError, match=r"unknown integration method.*gausslegendre"):
        lurker.explain(digits, xd, method="integrated_gradients", integration="simpson")
    with pytest.raises(LurkerError, match=r"target 1.5 is not supported"):
        lurker.explain(digits, xd, target=1.5)


@pytest.mark.parametrize("method", ALL)
def test_an_empty_batch_is_one_clear_error(digits, xd, method) -> None:
    """x[labels == 7] that kept no rows: most methods failed deep in torch (an empty
    amax, a reshape, internal_batch_size 'None'), saliency returned an empty map."""
    empty = xd[:0]
    for target in (None, 3, ("features.8", 1)):
        with pytest.raises(LurkerError, match=r"empty batch: x has shape \(0, 1, 16, 16\)"):
            lurker.explain(digits, empty, target, method=method, **OPTS.get(method, {}))
    with pytest.raises(LurkerError, match=r"concepts got an empty batch"):
        lurker.explain.concepts(digits, empty, 3, layer="features.8")
    with pytest.raises(LurkerError, match=r"evaluate got an empty batch"):
        lurker.explain.evaluate(digits, empty, 3)


@pytest.mark.parametrize("method", ALL)
def test_a_row_with_nan_or_inf_is_refused_naming_it(digits, xd, method) -> None:
    """A NaN pixel in row 1 made its output NaN, its "top class" argmax(NaN) = 0 and its
    map NaN or a gradient of nothing decided, silently: now an error names the rows."""
    x = xd.clone()
    x[1, 0, 3, 4] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    assert int(digits(x[1:2]).argmax()) == 0  # the silent class, before the fix
    with pytest.raises(LurkerError, match=r"NaN or inf values in rows 1, 2 \(of 3\).*nan_to_num"):
        lurker.explain(digits, x, method=method, **OPTS.get(method, {}))
    with pytest.raises(LurkerError, match=r"concepts: x holds NaN or inf values in row 1 "):
        lurker.explain.concepts(digits, x[:2], 3, layer="features.8")
    ok = lurker.explain(digits, xd[:1], method=method, **OPTS.get(method, {}))
    assert bool(torch.isfinite(ok.attribution).all())  # finite rows are explained as before


@pytest.mark.parametrize(
    ("method", "options", "said"),
    [
        (
            "smoothgrad",
            {"stdev": -0.1},
            r"smoothgrad: stdev must be a finite number >= 0, got -0.1",
        ),
        ("smoothgrad", {"stdev": float("nan")}, r"stdev must be a finite number >= 0, got nan"),
        ("smoothgrad", {"n_samples": 2.5}, r"n_samples must be an integer >= 1, got 2.5"),
        ("smoothgrad", {"n_samples": -3}, r"n_samples must be an integer >= 1, got -3"),
        ("smoothgrad", {"internal_batch_size": 0.5}, r"internal_batch_size must be an integer"),
        ("smoothgrad", {"noise": torch.full((2, 3, 1, 16, 16), float("nan"))}, r"noise holds NaN"),
        (
            "smoothgrad",
            {"seed": 1.5},
            r"smoothgrad: seed must be an integer from 0 to 2\*\*64 - 1, got 1.5; pass seed=0",
        ),
        ("smoothgrad", {"seed": "3"}, r"seed must be an integer from 0 .* got '3'; pass seed=0"),
        ("smoothgrad", {"seed": -1}, r"seed must be an integer from 0 .* got -1; pass seed=0"),
        ("smoothgrad", {"seed": 2**64}, r"seed must be an integer from 0 .*, or seed=None"),
        ("smoothgrad", {"seed": True}, r"seed must be an integer from 0 .* got True"),
        ("smoothgrad", {"seed": torch.tensor(3.0)}, r"seed must be an integer from 0"),
        ("integrated_gradients", {"n_steps": float("nan")}, r"n_steps must be an integer >= 1"),
        ("integrated_gradients", {"n_steps": 0}, r"n_steps must be an integer >= 1, got 0"),
        ("integrated_gradients", {"baseline": float("nan")}, r"baseline holds NaN or inf"),
        ("occlusion", {"baseline": float("inf")}, r"baseline holds NaN or inf"),
        ("occlusion", {"internal_batch_size": -1}, r"internal_batch_size must be an integer >= 1"),
        ("lrp", {"epsilon": -1.0}, r"LRP: epsilon must be a finite number >= 0, got -1.0"),
        ("lrp", {"gamma": float("nan")}, r"LRP: gamma must be a finite number >= 0, got nan"),
        ("lrp", {"stabilizer": -1e-6}, r"LRP: stabilizer must be a finite number >= 0"),
        ("lrp", {"tolerance": -1}, r"LRP: tolerance must be a finite number >= 0, got -1"),
    ],
)
def test_numeric_options_out_of_range_are_refused_by_name(
    digits, xd, method: str, options: dict[str, Any], said: str
) -> None:
    """stdev=-1 or NaN, a NaN baseline, a negative LRP epsilon ran and gave a map (NaN, or
    of noise nobody meant); n_steps=NaN or n_samples=2.5 failed inside numpy or torch."""
    with pytest.raises(LurkerError, match=said):
        lurker.explain(digits, xd, method=method, **options)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (
            {"window": 0},
            r"occlusion: window=0 makes windows .* pass one from 1 to 16 for this axis \(window=8",
        ),
        ({"window": 40}, r"window=40 makes windows .* pass one from 1 to 16"),
        ({"window": 2.5}, r"window must be an int .* got 2.5; pass window=8"),
        ({"window": True}, r"window must be an int .* got True; pass window=8"),
        ({"window": (8, 8, 8, 8)}, r"window=\(8, 8, 8, 8\) has 4 values.* at most 3 values"),
        (
            {"strides": 0},
            r"occlusion: strides=0 makes steps .* pass strides=4 \(half the smallest window",
        ),
        ({"strides": 9}, r"strides=9 makes steps .* pass strides=4"),
        ({"strides": "4"}, r"strides must be an int .* got '4'; pass strides=4"),
        (
            {"baseline": torch.zeros(2, 1, 16, 16)},
            r"baseline of shape \(2, 1, 16, 16\) does not broadcast .* pass one shaped like "
            r"a row of it \(1, 16, 16\)",
        ),
        ({"baseline": "black"}, r"got str: pass None \(zeros\), a number"),
    ],
)
def test_occlusion_argument_errors_say_what_to_pass(
    digits, xd, options: dict[str, Any], said: str
) -> None:
    """window=0 was refused with the windows it made and no word of what to give."""
    with pytest.raises(LurkerError, match=said):
        lurker.explain(digits, xd, 3, method="occlusion", **options)


def test_options_at_their_limits_are_taken(digits, xd) -> None:
    """stdev=0 is plain saliency's signed gradient on every copy: equal to autograd's."""
    e = lurker.explain(digits, xd, 3, method="smoothgrad", stdev=0.0, n_samples=2)
    x = xd.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(digits(x)[:, 3].sum(), x)
    close(e.attribution, g)


def test_seeds_at_their_limits_draw_as_torch_does(digits, xd) -> None:
    """seed 0, 2**64 - 1 and a 0-d integer tensor are taken: the same map as noise drawn
    from torch's own generator so seeded (the noise smoothgrad draws with a seed)."""
    for seed in (0, 2**64 - 1, torch.tensor(7)):
        gen = torch.Generator().manual_seed(int(seed))
        noise = 0.15 * torch.randn((2, *xd.shape), generator=gen, dtype=xd.dtype)
        want = lurker.explain(digits, xd, 3, method="smoothgrad", noise=noise)
        got = lurker.explain(digits, xd, 3, method="smoothgrad", n_samples=2, seed=seed)
        close(got.attribution, want.attribution)
        assert got.options["seed"] == int(seed)


def test_tensor_options_are_taken_as_before(digits, xd) -> None:
    """stdev as a 0-d tensor (0.15 * (x.max() - x.min()), Captum's advice) or a scale per
    channel, and n_samples as a 0-d integer tensor, ran before the numeric checks: taken,
    with the same map as the plain numbers give (an out-of-range one still refused)."""
    scale = 0.15 * (xd.max() - xd.min())
    want = lurker.explain(digits, xd, 3, method="smoothgrad", stdev=float(scale), seed=0)
    got = lurker.explain(digits, xd, 3, method="smoothgrad", stdev=scale, seed=0)
    close(got.attribution, want.attribution)
    per_channel = torch.full((xd.shape[1], 1, 1), float(scale))
    got = lurker.explain(digits, xd, 3, method="smoothgrad", stdev=per_channel, seed=0)
    close(got.attribution, want.attribution)
    got = lurker.explain(
        digits, xd, 3, method="smoothgrad", stdev=float(scale), seed=0, n_samples=torch.tensor(25)
    )
    close(got.attribution, want.attribution)
    with pytest.raises(LurkerError, match="stdev must be a finite number >= 0"):
        lurker.explain(digits, xd, method="smoothgrad", stdev=torch.tensor(-1.0))
    with pytest.raises(LurkerError, match="stdev must be finite numbers >= 0"):
        lurker.explain(digits, xd, method="smoothgrad", stdev=-per_channel)


def test_overlay_is_an_image(digits, xd) -> None:
    e = lurker.explain(digits, xd, method="input_x_gradient")
    img = e.overlay(1, image=xd[1].float())
    assert img.size == (16, 16) and img.mode == "RGB"
    # signed: zero is white under the diverging map at full opacity
    from lurker.explain.overlay import colorize

    rgb, alpha = colorize(torch.tensor([[0.0, 1.0, -1.0]]), signed=True)
    assert rgb[:, 0, 0].tolist() == [1, 1, 1] and alpha[0, 0] == 0
    assert rgb[:, 0, 1].tolist() == [1, 0, 0] and rgb[:, 0, 2].tolist() == [0, 0, 1]


def test_heatmap_of_a_map_repeated_over_channels_is_the_map() -> None:
    """Grad-CAM's attribution repeats its map over the input's channels, and occlusion by
    windows across every channel credits each channel with the window's whole drop: the
    heatmap is that one value (the sum over 3 channels was 3 times it). Occlusion by
    per-channel windows gives each channel its own drop: summed. Oracle: the layer map
    upsampled, and the score drop of each occluded block computed by hand."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()  # fmt: skip
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    m = m.double()
    g = lurker.explain(m, x, 1, "gradcam", layer="1")
    up = nn.functional.interpolate(g.layer_attribution, size=(8, 8), mode="bilinear")
    assert g.repeated and torch.allclose(g.heatmap(0), up[0, 0].float())
    with torch.no_grad():
        f = m(x)[0, 1]
        want = torch.zeros(8, 8, dtype=torch.float64)
        per = torch.zeros(3, 8, 8, dtype=torch.float64)
        for i in range(0, 8, 2):
            for j in range(0, 8, 2):
                z = x.clone()
                z[0, :, i : i + 2, j : j + 2] = 0
                want[i : i + 2, j : j + 2] = f - m(z)[0, 1]
                for c in range(3):
                    z = x.clone()
                    z[0, c, i : i + 2, j : j + 2] = 0
                    per[c, i : i + 2, j : j + 2] = f - m(z)[0, 1]
    o = lurker.explain(m, x, 1, "occlusion", window=2, strides=2)
    assert o.repeated and torch.allclose(o.heatmap(0), want.float(), atol=1e-6)
    o = lurker.explain(m, x, 1, "occlusion", window=(1, 2, 2), strides=(1, 2, 2))
    assert not o.repeated and torch.allclose(o.heatmap(0), per.sum(0).float(), atol=1e-6)


def test_smoothgrad_with_given_noise_records_what_it_used(digits, xd) -> None:
    """Given draws are added as given: the options do not claim a stdev or seed."""
    noise = torch.randn(3, *xd.shape, generator=torch.Generator().manual_seed(0), dtype=xd.dtype)
    e = lurker.explain(digits, xd, 1, "smoothgrad", noise=noise, stdev=0.5)
    assert e.options["stdev"] is None and e.options["seed"] is None
    assert e.options["noise"] == "given" and e.options["n_samples"] == 3
    xi = (xd[None] + noise).reshape(-1, *xd.shape[1:]).requires_grad_(True)
    (g,) = torch.autograd.grad(digits(xi)[:, 1].sum(), xi)
    close(e.attribution, g.reshape(3, *xd.shape).mean(0))


# ---------------------------------------------------------------------- CLI
def test_cli_explain_writes_the_overlay(tmp_path) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from lurker.cli import main
    from lurker.explain.cli import load_image
    from lurker.models import load_model

    img = tmp_path / "seven.png"
    Image.fromarray((torch.rand(20, 20) * 255).byte().numpy(), "L").save(img)
    out = tmp_path / "heat.png"
    args = ["explain", "lurker.examples:DigitsNet", "--image", str(img), "--image-size", "16"]
    r = CliRunner().invoke(
        main,
        [
            *args,
            "--method",
            "integrated_gradients",
            "-t",
            "3",
            "--option",
            "n_steps=8",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "integrated_gradients of class 3, convergence delta" in r.output
    # the same picture as the Python API's overlay of the same input, at its default
    # opacity (the command's was 0.6 to overlay's 0.5: one explanation, two looks)
    x, shown = load_image(img, 16, 1)
    e = lurker.explain(
        load_model("lurker.examples:DigitsNet"), x, 3, "integrated_gradients", n_steps=8
    )
    assert Image.open(out).tobytes() == e.overlay(0, image=shown).tobytes()

    r = CliRunner().invoke(
        main, [*args, "--method", "gradcam", "--layer", "features.8", "-o", str(out)]
    )
    assert r.exit_code == 0 and "gradcam of class" in r.output, r.output
    r = CliRunner().invoke(main, [*args, "-t", "features.8:5:1:2", "-o", str(out)])
    assert r.exit_code == 0 and "unit features.8:5:1:2" in r.output, r.output

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    for extra, message in [
        (["--method", "lime"], "unknown explanation method 'lime'; supported: saliency"),
        (["-t", "12"], "target class 12 is out of range"),
        (["-t", "features.88:1"], "layer 'features.88' is not in the model"),
        (["--alpha", "1.5"], "1.5 is not in the range 0<=x<=1"),
    ]:
        r = CliRunner().invoke(main, [*args, *extra, "-o", str(out)])
        assert r.exit_code == 2 and message in r.output, r.output
    r = CliRunner().invoke(main, [*args[:3], str(bad), "-o", str(out)])
    assert r.exit_code == 2 and "cannot read image" in r.output, r.output
    # a unit's position with y and no x reads as a layer named 'features.8:5': said so
    r = CliRunner().invoke(main, [*args, "-t", "features.8:5:1", "-o", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "reads as layer 'features.8:5', channel 1" in r.output
    assert "LAYER:CHANNEL:Y:X with both Y and X" in r.output
    # --out in a folder that does not exist yet: made, not a traceback after the work
    deep = tmp_path / "new" / "dir" / "heat.png"
    r = CliRunner().invoke(main, [*args, "-o", str(deep)])
    assert r.exit_code == 0 and deep.is_file(), r.output
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    r = CliRunner().invoke(main, [*args, "-o", str(blocked / "heat.png")])
    assert r.exit_code == 2 and "cannot create its folder" in r.output, r.output


def test_cli_unit_dim(tmp_path) -> None:
    """`--unit-dim` names the unit axis of a unit target's layer: a ViT block's tokens,
    as the Python API's UnitTarget(..., unit_dim=1) reads them; a layer lurker cannot read
    is refused with a message that names the option."""
    from click.testing import CliRunner
    from PIL import Image

    from lurker.cli import main
    from lurker.explain.cli import load_image

    spec = tmp_path / "vit.py"
    spec.write_text(
        "import torch\nfrom torchvision.models import VisionTransformer\n\n\n"
        "def build():\n    torch.manual_seed(0)\n    return VisionTransformer(16, 4, 1, 2, 16, "
        "32, num_classes=10)\n"
    )
    img = tmp_path / "x.png"
    Image.fromarray((torch.rand(20, 20, 3) * 255).byte().numpy(), "RGB").save(img)
    out = tmp_path / "heat.png"
    args = ["explain", f"{spec}:build", "--image", str(img), "--image-size", "16", "-o", str(out)]
    block = "encoder.layers.encoder_layer_0"
    r = CliRunner().invoke(main, [*args, "-t", f"{block}:1", "--unit-dim", "1"])
    assert r.exit_code == 0, r.output
    import importlib.util

    mod = importlib.util.spec_from_file_location("vit_spec", spec)
    assert mod is not None and mod.loader is not None
    vit_mod = importlib.util.module_from_spec(mod)
    mod.loader.exec_module(vit_mod)
    x, shown = load_image(img, 16, 3)
    e = lurker.explain(
        vit_mod.build().eval(), x, lurker.explain.UnitTarget(block, 1, unit_dim=1), "saliency"
    )
    assert Image.open(out).tobytes() == e.overlay(0, image=shown).tobytes()
    r = CliRunner().invoke(main, [*args, "-t", "3", "--unit-dim", "1"])
    assert r.exit_code == 2 and "needs a unit --target" in r.output, r.output
    r = CliRunner().invoke(main, [*args, "-t", "scaled_dot_product_attention_1:0"])
    assert r.exit_code == 2 and "cannot tell which axis" in r.output, r.output
    assert "--unit-dim" in r.output
    # a ViT built for 16 px, given 20: the model's own complaint and the option to change,
    # for every method (not a traceback from inside the explanation)
    for method in ("saliency", "lrp"):
        wrong = [*args[:5], "20", *args[6:], "--method", method]
        r = CliRunner().invoke(main, wrong)
        assert r.exit_code == 2, r.output
        assert r.output.startswith("error: VisionTransformer fails on the image as loaded"), (
            r.output
        )
        assert "(1, 3, 20, 20)" in r.output and "Expected 16 but got 20" in r.output
        assert "pass it with --image-size" in r.output and "err.partial" not in r.output
    # close names are each named once (a module path is also a trace key)
    r = CliRunner().invoke(main, [*args, "-t", "encoder.layers.encoder_layer_9:0"])
    assert r.exit_code == 2 and "Close names: encoder.layers.encoder_layer_0," in r.output
    close = r.output.split("Close names: ")[1].strip().rstrip(".").split(", ")
    assert len(close) == len(set(close)) == 5, close


def test_numpy_and_tensor_targets(digits, xd) -> None:
    """numpy's integers and integer arrays are class targets as ints and lists are;
    floats and booleans are refused, not truncated into a class."""

    want = lurker.explain(digits, xd, target=[2, 0, 1]).attribution
    for t in (np.array([2, 0, 1]), [np.int64(2), np.int32(0), 1], torch.tensor([2, 0, 1])):
        assert torch.equal(lurker.explain(digits, xd, target=t).attribution, want)
    assert lurker.explain(digits, xd, target=np.int64(4)).target == [4, 4, 4]
    for bad in (torch.tensor(2.7), np.array([0.5, 1.0, 2.0]), torch.tensor(True), [True, 1, 2]):
        with pytest.raises(LurkerError, match="is not supported: give a class index"):
            lurker.explain(digits, xd, target=bad)


def test_a_model_returning_several_tensors_is_told_how_to_target_a_class() -> None:
    """A class target needs one (batch, classes) output: a model returning a tuple or a
    dict hears what it returns and how to name the class instead, as a unit of the layer
    that scores it, which gives the class's explanation (oracle: the same model returning
    its logits alone)."""

    class Two(nn.Module):
        def __init__(self, as_dict: bool) -> None:
            super().__init__()
            self.body, self.head, self.aux = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 5)
            self.as_dict = as_dict

        def forward(self, x: torch.Tensor) -> Any:
            h = torch.relu(self.body(x))
            logits, aux = self.head(h), self.aux(h)
            return {"logits": logits, "aux": aux} if self.as_dict else (logits, aux)

    torch.manual_seed(0)
    x = torch.randn(2, 6, dtype=torch.float64)
    for as_dict, said in ((False, "a tuple (0: (2, 3), 1: (2, 5))"), (True, "logits: (2, 3)")):
        m = Two(as_dict).double().eval()
        for method in ("saliency", "lrp"):
            with pytest.raises(LurkerError, match="a class target needs the model") as err:
                lurker.explain(m, x, 1, method)
            assert said in str(err.value) and "('fc', 3)" in str(err.value)
        e = lurker.explain(m, x, ("head", 1), "saliency")
        logits_only = nn.Sequential(m.body, nn.ReLU(), m.head)
        close(e.attribution, lurker.explain(logits_only, x, 1, "saliency").attribution)


def test_signed_follows_the_options(digits, xd) -> None:
    """Saliency's raw gradient (abs=False) has a sign: it is marked signed, so the overlay
    shows its negative pixels in blue (with abs=True it is >= 0 and unsigned)."""
    raw = lurker.explain(digits, xd, target=1, method="saliency", abs=False)
    assert raw.signed and (raw.attribution < 0).any()
    assert not lurker.explain(digits, xd, target=1, method="saliency").signed
    heat = raw.heatmap(0)
    img = np.asarray(raw.overlay(0, alpha=1.0)).astype(int)
    neg = (heat < -0.2 * heat.abs().max()).numpy()
    assert neg.any() and (img[neg][:, 2] > img[neg][:, 0]).all()  # blue over red


def test_cli_target_parsing() -> None:
    from lurker.explain.cli import parse_target

    U = lurker.explain.UnitTarget
    assert parse_target("7") == 7 and parse_target("top") == "top"
    assert parse_target("features.8:5") == U("features.8", 5)
    assert parse_target("features.8:5:1:2") == U("features.8", 5, 1, 2)
    assert parse_target("cell:2:5") == U("cell:2", 5)
    with pytest.raises(LurkerError, match="class index"):
        parse_target("features.8")


@pytest.mark.parametrize("layer", ["features.8", "conv2d_3"])
def test_guided_backprop_of_a_unit_equals_the_probes_unit_images(digits, xd, layer) -> None:
    """The probe's unit gradient images and explain's unit targets: one rule, one answer."""
    from lurker.probe.images import unit_gradients

    tr = lurker.trace(digits, xd[:1], save="none")
    op = tr["features.8"].index
    mean = unit_gradients(tr, op, xd, [5] * 3, "mean")
    e = lurker.explain(digits, xd, target=(layer, 5), method="guided_backprop")
    close(e.attribution, mean, 1e-9)
    peak = unit_gradients(tr, op, xd, [5] * 3, "max", [(1, 2)] * 3)
    e = lurker.explain(digits, xd, target=(layer, 5, 1, 2), method="guided_backprop")
    close(e.attribution, peak, 1e-9)


def test_unit_targets_on_sequence_first_and_fixed_batch_models() -> None:
    """unit_dim names the unit axis, and the batch axis is still found: an LSTM's
    sequence-first (T, B, H) output, unit u of row b is out[:, b, u]. A model that runs
    only at its traced batch size (a fixed reshape) keeps its conv units and Grad-CAM:
    the batch is taken as axis 0 where it cannot be found. Oracle: autograd by hand."""

    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 5)
            self.head = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 4)
            out, _ = self.lstm(x.transpose(0, 1))  # (T, B, 5)
            return self.head(out[-1])

    torch.manual_seed(0)
    m = SeqFirst().eval()
    x = torch.randn(2, 6, 4)
    label = next(o.label for o in lurker.trace(m, x).ops if o.name == "lstm")
    target = lurker.explain.UnitTarget(label, 2, unit_dim=2)
    got = lurker.explain(m, x, target=target, method="saliency").attribution
    xi = x.clone().requires_grad_(True)
    out, _ = m.lstm(xi.transpose(0, 1))
    for b in range(2):
        (g,) = torch.autograd.grad(out[:, b, 2].mean(), xi, retain_graph=True)
        assert torch.allclose(got[b], g[b].abs(), atol=1e-7)

    class FixedBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.conv(x)).view(1, -1))  # batch 1 only

    net = FixedBatch().eval()
    x = torch.randn(1, 3, 8, 8)
    got = lurker.explain(net, x, target=("conv", 1), method="saliency").attribution
    xi = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net.conv(xi)[:, 1].mean(), xi)
    assert torch.allclose(got, g.abs(), atol=1e-7)
    e = lurker.explain(net, x, target=2, method="gradcam")  # default layer: the conv's relu
    with torch.no_grad():
        R = torch.relu(net.conv(x))
    R.requires_grad_(True)
    (g,) = torch.autograd.grad(net.head(R.view(1, -1))[0, 2], R)
    assert torch.allclose(e.layer_attribution, _cam(R.detach(), g), atol=1e-6)


def test_unit_target_at_a_token_is_the_probes_peak(tmp_path) -> None:
    """A ViT's peak is stored as (0, token) (docs/probe.md); explaining the unit at that
    stored peak reads that token (class token included) and LRP starts there too, as
    autograd by hand does; a token past the layer's is refused naming the form."""
    from torch.utils.data import TensorDataset
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(16, 4, 1, 2, 16, 32, num_classes=3).eval()
    x = torch.randn(6, 3, 16, 16)
    layer = "encoder.layers.encoder_layer_0"
    run = lurker.probe(
        vit, TensorDataset(x, torch.zeros(6, dtype=torch.long)), out=tmp_path / "r",
        layers=[layer], k=2, progress=False,
    )  # fmt: skip
    top = run.unit(layer, 3).top("max")[0]
    acts: dict[str, torch.Tensor] = {}
    hook = vit.encoder.layers.encoder_layer_0.register_forward_hook(
        lambda m, i, o: acts.__setitem__("a", o)
    )
    xi = x.clone().requires_grad_(True)
    vit(xi)
    hook.remove()
    for token in (top.x, 0, 16):
        (g,) = torch.autograd.grad(acts["a"][:, token, 3].sum(), xi, retain_graph=True)
        e = lurker.explain(vit, x, target=(layer, 3, 0, token), method="saliency")
        close(e.attribution, g.abs())
    assert top.y == 0
    e = lurker.explain(vit, x, target=(layer, 3, top.y, top.x), method="lrp")
    assert e.attribution.abs().sum() > 0
    with pytest.raises(LurkerError, match=r"outside the 1x17 map.*\(0, token\)"):
        lurker.explain(vit, x, target=(layer, 3, 0, 17), method="saliency")
    with pytest.raises(LurkerError, match=r"outside the 1x17 map"):
        lurker.explain(vit, x, target=(layer, 3, 1, 2), method="lrp")


# ---------------------------------------------------------------------- transformers
def _small_vit() -> nn.Module:
    """A torchvision ViT for 32x32 images whose head is not zero (torchvision starts it
    at zero: no gradient at all)."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10).eval()
    nn.init.normal_(vit.heads.head.weight)
    return vit


@pytest.mark.parametrize(
    "method,target",
    [("saliency", 3), ("integrated_gradients", 3), ("gradcam", 3), ("lrp", 3),
     ("occlusion", 3), ("saliency", ("conv_proj", 1))],
)  # fmt: skip
def test_an_input_the_model_does_not_run_on_is_one_clear_error(method, target) -> None:
    """A ViT built for 32x32 images given 48x48 ones, one channel, no batch axis or a
    float64 input: a LurkerError naming the input's shape and dtype and the fix, not the
    AssertionError or RuntimeError from inside the model (each method runs the model its
    own way: directly, through the trace, or the LRP engine)."""
    vit = _small_vit()
    x = torch.randn(2, 3, 32, 32)
    cases = [
        (torch.randn(2, 3, 48, 48), r"shape \(2, 3, 48, 48\).*Wrong image height.*image size"),
        (torch.randn(2, 1, 32, 32), r"shape \(2, 1, 32, 32\).*3 channels.*channels"),
        (torch.randn(3, 32, 32), r"shape \(3, 32, 32\).*x\[None\] adds a batch axis"),
        (x.double(), r"float64 tensor.*parameters are float32: pass x.to\(torch.float32\)"),
    ]
    for bad, says in cases:
        with pytest.raises(
            LurkerError, match=rf"VisionTransformer does not run on the input.*{says}"
        ):
            lurker.explain(vit, bad, target, method=method)
    assert lurker.explain(vit, x, target, method=method).attribution.shape == x.shape
    if method == "lrp":  # concept relevance runs the LRP engine on its own
        with pytest.raises(LurkerError, match=r"does not run on the input.*48, 48"):
            lurker.explain.concepts(
                vit, cases[0][0], target, layer="encoder.layers.encoder_layer_0"
            )


def test_a_failure_that_is_not_the_inputs_keeps_its_own_error() -> None:
    """Where the model runs on x but fails inside a method, the model's own error goes
    through: blaming the input would send the user the wrong way."""

    class GradOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.requires_grad:
                raise ValueError("no gradients here")
            return self.fc(x)

    with pytest.raises(ValueError, match="no gradients here"):
        lurker.explain(GradOnly().eval(), torch.randn(2, 4), 1)


def test_gradcam_warns_where_the_target_does_not_reach_the_map() -> None:
    """After a ViT's last attention its class-token head no longer reads the patch
    tokens: Grad-CAM there is 0 everywhere (autograd by hand: the gradient at the patch
    tokens is 0), which an overlay shows as nothing. Said in a warning; the default layer
    (before the last attention) and a CNN's layer have none."""
    import warnings

    vit = _small_vit()
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(
        UserWarning, match=r"Grad-CAM at 'encoder.ln' is 0 everywhere: the target does not"
    ):
        e = lurker.explain(vit, x, [3, 7], method="gradcam", layer="encoder.ln")
    _, g = _hooked_grad(vit, x[:1], "encoder.ln", 3)
    assert g[:, 1:].abs().amax() == 0 and g[:, 0].abs().amax() > 0  # only the class token
    assert e.layer_attribution.abs().amax() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = lurker.explain(vit, x, [3, 7], method="gradcam")
        assert d.layer_attribution.abs().amax() > 0
        lurker.explain(digits_net_float64(), x[:, :1, :16, :16].double(), 3, method="gradcam")


def test_guided_rules_on_a_network_without_relu_warn_that_they_are_the_gradient() -> None:
    """A ViT (GELU) runs no ReLU: guided backprop and deconvnet are then the plain
    gradient (Captum's GuidedBackprop too, and autograd), which the explorer showed as
    two methods of their own with the same map. Said in a warning; a ReLU network has
    none."""
    import warnings

    vit = _small_vit()
    x = torch.randn(2, 3, 32, 32)
    xi = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(vit(xi)[:, 5].sum(), xi)
    for method in ("guided_backprop", "deconvnet"):
        with pytest.warns(
            UserWarning, match=rf"runs no ReLU, so {method.replace('_', ' ')}.*plain gradient"
        ):
            e = lurker.explain(vit, x, 5, method=method)
        close(e.attribution, grad)
    close(e.attribution, captum_attr.GuidedBackprop(vit).attribute(x, target=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("guided_backprop", "deconvnet"):
            lurker.explain(
                digits_net_float64(), torch.rand(2, 1, 16, 16).double(), 5, method=method
            )


@pytest.mark.parametrize("family", ["torchvision", "timm"])
def test_gradcam_default_layer_of_a_vit_is_the_last_blocks_first_norm(family: str) -> None:
    """A ViT's default Grad-CAM layer is pytorch-grad-cam's recipe: the last block's
    first norm, its tokens on the patch grid with the class token dropped and the
    embedding as channels. It used to be the last attention's query-key-value projection
    (the last map the class-token head reaches), whose bias shifts each image's map by a
    constant that the ReLU then keeps or clips. Oracle: the recipe by hand with autograd,
    three rows with three classes (a batch read on the wrong axis would mix them), the
    projection's bias made large so that the two layers differ."""
    torch.manual_seed(0)
    if family == "torchvision":
        vit = _small_vit()
        norm = vit.encoder.layers.encoder_layer_1.ln_1
        qkv_bias = vit.encoder.layers.encoder_layer_1.self_attention.in_proj_bias
    else:
        timm = pytest.importorskip("timm")
        vit = timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10
        ).eval()
        norm, qkv_bias = vit.blocks[1].norm1, vit.blocks[1].attn.qkv.bias
        nn.init.normal_(vit.head.weight)  # timm starts it small: a map of ~1e-3
    with torch.no_grad():
        qkv_bias.normal_(0, 3)
    x, classes = torch.randn(3, 3, 32, 32), [1, 4, 7]
    e = lurker.explain(vit, x, classes, method="gradcam", relu=False)
    seen: list = []
    h = norm.register_forward_hook(lambda m, i, o: seen.append(o))
    out = vit(x)
    h.remove()
    (g,) = torch.autograd.grad(out[[0, 1, 2], classes].sum(), seen[0])
    grid = lambda t: t[:, 1:].reshape(3, 4, 4, -1).permute(0, 3, 1, 2)  # noqa: E731
    A = seen[0].detach()
    want = (grid(g).mean((2, 3), keepdim=True) * grid(A)).sum(1, keepdim=True)
    assert want.abs().amax() > 1e-2
    assert torch.allclose(e.layer_attribution, want, atol=1e-5), e.options["layer"]
    # the same map, rectified, on the input: bilinear as pytorch-grad-cam's resize
    r = lurker.explain(vit, x, classes, method="gradcam", layer=e.options["layer"])
    up = torch.nn.functional.interpolate(want.clamp(min=0), size=(32, 32), mode="bilinear")
    assert torch.allclose(r.attribution, up.expand_as(x), atol=1e-5)


def test_gradcam_says_when_its_relu_leaves_nothing() -> None:
    """A row whose weighted map is negative at every position is 0 everywhere once
    rectified (often on a ViT's tokens: benchmarks/vit_localization.py): the overlay shows
    nothing although the target depends on the layer. Said in a warning naming the rows
    and relu=False. A hand-made model: positive activations read by a class whose weights
    are all negative, so its map is -(A_0 + A_1) / (H W) by hand."""
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2, 2, bias=False),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[0].weight.fill_(0.1)
        model[0].bias.fill_(0.5)
        model[4].weight.copy_(torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    x = torch.rand(2, 1, 6, 6)
    A = model[1](model[0](x))
    signed = lurker.explain(model, x, [0, 1], method="gradcam", layer="1", relu=False)
    sign = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1)
    assert torch.allclose(signed.layer_attribution, sign * A.sum(1, keepdim=True) / 36)
    with pytest.warns(
        UserWarning, match=r"'1' is 0 everywhere after its ReLU \(rows \[0\]\).*relu=False"
    ):
        e = lurker.explain(model, x, [0, 1], method="gradcam", layer="1")
    assert e.layer_attribution[0].abs().amax() == 0 and e.layer_attribution[1].amin() > 0
    # a row on which the layer's units do not fire: its map is 0 signed too, so the
    # warning says that, not "negative" and relu=False (which would show the same 0)
    with torch.no_grad():
        model[0].bias.fill_(0.0)
        model[4].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    x = torch.cat([-torch.rand(1, 1, 6, 6), torch.rand(1, 1, 6, 6)])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        e = lurker.explain(model, x, [0, 1], method="gradcam", layer="1")
    said = [str(w.message) for w in seen]
    assert any("'1' is 0 everywhere (rows [0]): the layer's map weighted" in m for m in said)
    assert not any("after its ReLU" in m for m in said), said
    assert e.layer_attribution[0].abs().amax() == 0 and e.layer_attribution[1].amin() > 0


def test_gradcam_default_for_a_unit_target_is_the_units_own_layer() -> None:
    """A unit of a Linear layer over a channels-last map (ConvNeXt's pwconv1) is explained
    at its own layer by default, not at the norm the Linear reads (that map differs from
    the unit's by the Linear's bias: one constant per image, which the ReLU would clip)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=3)
    model.eval()
    with torch.no_grad():
        model.features[3][0].block[3].bias.normal_(0, 3)
    x = torch.rand(2, 3, 32, 32)
    tr = lurker.trace(model, x[:1])
    e = lurker.explain(model, x, ("features.3.0.block.3", 5), method="gradcam", relu=False)
    assert tr[e.options["layer"]].module == "features.3.0.block.3"


def test_gradcam_at_a_vits_sequence_first_projection_equals_a_forward_by_hand() -> None:
    """Grad-CAM at the query-key-value projection of a torchvision ViT's last attention
    (the last map its class-token head reads the patch tokens through; it used to be the
    default), a functional op inside nn.MultiheadAttention whose output is sequence-first
    (L, B, 3E). Oracle: that attention and the rest of the model written
    out by hand with autograd, three rows with three classes (a batch read on the wrong
    axis would mix them)."""
    import torch.nn.functional as F

    vit, x, classes = _small_vit(), torch.randn(3, 3, 32, 32), [1, 4, 7]
    e = lurker.explain(vit, x, classes, method="gradcam", relu=False, layer="linear_5")
    layer = vit.encoder.layers.encoder_layer_1
    seen: list = []
    h = layer.ln_1.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    vit(x)
    h.remove()
    before, normed = (t.detach() for t in seen[0])
    att = layer.self_attention
    qkv = F.linear(normed, att.in_proj_weight, att.in_proj_bias).requires_grad_(True)
    heads = lambda t: t.reshape(3, 17, 2, 16).transpose(1, 2)  # noqa: E731
    q, k, v = (heads(t) for t in qkv.split(32, -1))
    y = before + att.out_proj(
        F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 17, 32)
    )
    y = y + layer.mlp(layer.ln_2(y))
    score = vit.heads(vit.encoder.ln(y)[:, 0])[[0, 1, 2], classes].sum()
    (g,) = torch.autograd.grad(score, qkv)
    grid = lambda t: t[:, 1:].reshape(3, 4, 4, 96).permute(0, 3, 1, 2)  # noqa: E731
    want = (grid(g).mean((2, 3), keepdim=True) * grid(qkv.detach())).sum(1, keepdim=True)
    assert want.abs().amax() > 1e-2
    assert torch.allclose(e.layer_attribution, want, atol=1e-5), e.options["layer"]


def test_a_position_on_a_token_layer_says_what_to_target_instead() -> None:
    """A ViT block's tokens have one position axis, not a map: (layer, c, y, x) is
    refused with the two targets that work, and the first of them is the mean over the
    tokens (autograd by hand)."""
    vit, x = _small_vit(), torch.randn(2, 3, 32, 32)
    layer = "encoder.layers.encoder_layer_1.ln_1"
    with pytest.raises(LurkerError, match=rf"\('{layer}', 5\) without a position"):
        lurker.explain(vit, x, (layer, 5, 1, 2))
    got = lurker.explain(vit, x, (layer, 5), method="saliency", abs=False).attribution
    seen: list = []
    xi = x.clone().requires_grad_(True)
    h = vit.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o))
    vit(xi)
    h.remove()
    (g,) = torch.autograd.grad(seen[0][..., 5].mean(1).sum(), xi)
    close(got, g)


def test_repr_is_one_line_a_notebook_can_show(digits, xd) -> None:
    """Ending a notebook cell with an explanation shows one line saying what it is, not
    the dataclass's repr of every tensor (a page of numbers per field)."""
    e = lurker.explain(digits, xd, target="top", method="integrated_gradients", n_steps=8)
    top = digits(xd).argmax(1).tolist()
    text = repr(e)
    assert "\n" not in text and "tensor(" not in text and len(text) < 200
    assert text.startswith("<Explanation integrated_gradients: attribution (3, 1, 16, 16)")
    assert f"target {top}" in text
    assert f"max |delta| {e.delta.abs().max():.3g}" in text
    many = lurker.explain(digits, xd.repeat(6, 1, 1, 1), target=(list(range(10)) * 2)[:18])
    assert "[0, 1, 2, 3, 4, 5, 6, 7, ... (18 rows)]" in repr(many) and len(repr(many)) < 200
    unit = lurker.explain(digits, xd, target=("features.8", 5), method="guided_backprop")
    assert "target features.8:5>" in repr(unit)


@pytest.mark.parametrize(
    ("shape", "options"),
    [
        ((3, 32, 5), {"window": (40, 3)}),  # said window=8, which the 5 axis refuses
        ((3, 32, 5), {"window": 10}),
        ((3, 32, 16), {"window": (2, 8), "strides": (1, 20)}),  # said strides=4 > 2
        ((3, 32, 16), {"window": (2, 8), "strides": 9}),
    ],
)
def test_occlusion_sizes_its_errors_suggest_are_taken(shape, options: dict[str, Any]) -> None:
    """The window or strides an occlusion error suggests, passed instead of the one it
    refused, runs: window=(40, 3) on a (3, 32, 5) sample suggested window=8, which does not
    fit its 5 columns, and strides=(1, 20) over windows (2, 8) strides=4, longer than 2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 3))
    x = torch.randn(1, *shape)
    with pytest.raises(LurkerError) as err:
        lurker.explain(model, x, 0, method="occlusion", **options)
    said = re.search(r"(window|strides)=(\d+)(?:, say| \(half|$)", str(err.value))
    if said is None:  # (a tuple's error names the sizes, not one int for every axis)
        assert "one size per axis" in str(err.value)
        return
    options = {**options, said.group(1): int(said.group(2))}
    lurker.explain(model, x, 0, method="occlusion", **options)


def test_occlusion_strides_left_out_follow_a_small_window(digits, xd) -> None:
    """strides left out are 4, or a window's size where it is smaller: window=3 alone was
    refused by the fixed default stride 4 ("each step must be from 1 to its window's size").
    Captum's Occlusion with those strides is the oracle; window=8 alone is as before."""
    e = lurker.explain(digits, xd, target=[7, 8, 9], method="occlusion", window=3)
    ref = captum_attr.Occlusion(digits).attribute(
        xd, sliding_window_shapes=(1, 3, 3), strides=(1, 3, 3), baselines=0.0, target=[7, 8, 9]
    )
    close(e.attribution, ref)
    assert e.options["strides"] == (1, 3, 3)
    big = lurker.explain(digits, xd, target=[7, 8, 9], method="occlusion")
    assert big.options["strides"] == (1, 4, 4) and big.options["window"] == (1, 8, 8)
    ref = captum_attr.Occlusion(digits).attribute(
        xd, sliding_window_shapes=(1, 8, 8), strides=(1, 4, 4), baselines=0.0, target=[7, 8, 9]
    )
    close(big.attribution, ref)
    # a stride error whose only fit is 1 says so once (it said "strides=1 (half ...) or strides=1")
    with pytest.raises(LurkerError, match=r"pass strides=1$"):
        lurker.explain(digits, xd, 0, method="occlusion", window=(1, 3, 3), strides=0)


def test_occlusion_strides_left_out_are_4_where_the_channels_are_unknown() -> None:
    """A channels-last input lurker cannot read (a Flatten first) takes a window of every
    axis, (8, 8, 3); strides left out were (1, 4, 3): 1 on the rows, not the documented 4
    (as channel_dim=3 gives). Captum with strides (4, 4, 1) is the oracle."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16 * 3, 4)).eval()
    x = torch.randn(2, 16, 16, 3)
    e = lurker.explain(model, x, target=[1, 2], method="occlusion", window=(8, 8, 3))
    named = lurker.explain(
        model, x, target=[1, 2], method="occlusion", window=(8, 8, 3), channel_dim=3
    )
    assert e.options["strides"] == named.options["strides"] == (4, 4, 1)
    ref = captum_attr.Occlusion(model).attribute(
        x, sliding_window_shapes=(8, 8, 3), strides=(4, 4, 1), baselines=0.0, target=[1, 2]
    )
    close(e.attribution, ref)


class _ClassesFirst(nn.Module):
    """Returns (classes, batch): a time-major head's last step, transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).t()


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "lrp", "occlusion"])
def test_class_target_refuses_an_output_whose_batch_is_not_axis_0(method: str) -> None:
    """A (classes, batch) output was read as (batch, classes): saliency silently scored
    each row by another's values, integrated gradients failed in ``gather``. One
    paragraph now names the shape, the batch and the fix."""
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    options = {"window": 2} if method == "occlusion" else {}
    with pytest.raises(
        LurkerError, match=r"shape \(3, 5\), whose first axis is not the batch of 5 rows.*transpose"
    ):
        lurker.explain(_ClassesFirst().eval(), x, method=method, **options)


class _TimeMajor(nn.Module):
    """Reads (steps, batch, features), as nn.GRU does by default; returns (batch, classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0][-1])


class _BatchFirst(nn.Module):
    """The fix the refusal names: the batch first, moved back inside the forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.movedim(0, 1))


def test_class_target_names_an_input_whose_batch_is_not_axis_0() -> None:
    """A time-major input (steps, batch, features) gives a (batch, classes) output, whose
    first axis is not the input's: the refusal told to transpose the output, which is
    already right. It names the input's axis that holds the batch and the fix, and that
    fix explains the model: saliency equal to autograd's on the time-major model."""
    torch.manual_seed(0)
    model = _TimeMajor().eval()
    x = torch.randn(5, 2, 4)  # 5 steps of a batch of 2
    with pytest.raises(LurkerError, match=r"axis 1 of the input \(5, 2, 4\).*x\.movedim\(1, 0\)"):
        lurker.explain(model, x, method="saliency")
    e = lurker.explain(_BatchFirst(model).eval(), x.movedim(1, 0), method="saliency")
    xg = x.clone().requires_grad_(True)
    out = model(xg)
    out.gather(1, out.argmax(1, keepdim=True)).sum().backward()
    close(e.attribution, xg.grad.abs().movedim(1, 0))
