"""``lurker.explain`` on a 1-D signal ``(1, C, T)`` read by a ``Conv1d`` stack (an EEG or
audio classifier): every method gives the attribution along time per channel, checked
against Captum, IG's completeness and a Grad-CAM computed by hand on the Conv1d layer.

Before, Grad-CAM refused a signal ("needs an image input") and occlusion's windows across
all channels credited each channel with the whole drop without saying so
(``repeated=False``), so summing over the channels counted it C times.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lurker
from lurker.errors import LurkerError

C, T = 3, 96


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(C, 4, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(4, 5, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(5, 2),
    ).eval()


def _x() -> torch.Tensor:
    return torch.randn(1, C, T, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    ("method", "captum_name", "kwargs"),
    [
        ("saliency", "Saliency", {}),
        ("input_x_gradient", "InputXGradient", {}),
        ("integrated_gradients", "IntegratedGradients", {"n_steps": 64}),
    ],
)
def test_gradient_methods_match_captum_on_a_signal(method: str, captum_name: str, kwargs: dict):
    captum_attr = pytest.importorskip("captum.attr")
    model, x = _model(), _x()
    target = int(model(x).argmax())
    ex = lurker.explain(model, x, target=target, method=method, **kwargs)
    ref = getattr(captum_attr, captum_name)(model).attribute(x, target=target, **kwargs)
    assert ex.attribution.shape == (1, C, T)
    torch.testing.assert_close(ex.attribution, ref.detach(), atol=1e-5, rtol=1e-5)
    assert ex.signal(0).shape == (C, T)
    torch.testing.assert_close(ex.signal(0), ref[0].detach(), atol=1e-5, rtol=1e-5)


def test_integrated_gradients_are_complete_on_a_signal():
    model, x = _model(), _x()
    ex = lurker.explain(model, x, method="integrated_gradients", n_steps=128)
    cls = ex.target[0]
    with torch.no_grad():
        gap = float(model(x)[0, cls] - model(torch.zeros_like(x))[0, cls])
    assert float(ex.signal(0).double().sum()) == pytest.approx(gap, abs=1e-4)


def _hand_gradcam(model: nn.Sequential, x: torch.Tensor, cls: int, at: int) -> torch.Tensor:
    """Grad-CAM at model[at] (the last Conv1d, or its ReLU) by autograd: channel weights the mean
    gradient over time, relu of the weighted sum, linearly upsampled to T."""
    keep: dict[str, torch.Tensor] = {}
    hook = model[at].register_forward_hook(lambda m, a, o: keep.__setitem__("A", o))
    out = model(x)
    hook.remove()
    A = keep["A"]
    (g,) = torch.autograd.grad(out[0, cls], A)
    cam = F.relu((g.mean(2, keepdim=True) * A).sum(1, keepdim=True))  # (1, 1, L)
    return F.interpolate(cam, size=T, mode="linear", align_corners=False)[0, 0].detach()


@pytest.mark.parametrize(("layer", "at"), [("3", 3), (None, 4)])
def test_gradcam_on_the_conv1d_layer_is_a_map_along_time(layer: str | None, at: int):
    model, x = _model(), _x()
    ex = lurker.explain(model, x, method="gradcam", layer=layer)
    # by default the last map along time, as on images: the last Conv1d's ReLU
    assert ex.options["layer"] == (layer or "relu_2")
    cam = _hand_gradcam(model, x, ex.target[0], at)
    assert ex.signal(0).shape == (T,) and ex.repeated
    torch.testing.assert_close(ex.signal(0), cam, atol=1e-6, rtol=1e-5)
    assert ex.layer_attribution is not None and ex.layer_attribution.shape == (1, 1, 24)
    for c in range(C):  # every channel holds the position's value: (1, C, T) as the input
        torch.testing.assert_close(ex.attribution[0, c], cam, atol=1e-6, rtol=1e-5)


def test_occlusion_across_the_channels_is_one_drop_per_position():
    model, x = _model(), _x()
    ex = lurker.explain(model, x, method="occlusion", window=(C, 8), strides=(C, 8))
    cls = ex.target[0]
    with torch.no_grad():
        f = model(x)[0, cls]
        drops = []
        for k in range(T // 8):  # brute force: each window of time zeroed in every channel
            xo = x.clone()
            xo[..., 8 * k : 8 * k + 8] = 0
            drops.append(float(f - model(xo)[0, cls]))
    want = torch.tensor(drops).repeat_interleave(8)
    assert ex.repeated and ex.signal(0).shape == (T,)
    torch.testing.assert_close(ex.signal(0), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "method", ["smoothgrad", "guided_backprop", "deconvnet", "lrp", "gradcam_plus_plus"]
)
def test_every_method_gives_a_signal_attribution(method: str):
    model, x = _model(), _x()
    ex = lurker.explain(model, x, method=method)
    s = ex.signal(0)
    assert s.shape == ((T,) if ex.repeated else (C, T)) and bool(s.isfinite().all())
    assert float(s.abs().sum()) > 0


def test_a_heatmap_of_a_signal_points_to_signal():
    ex = lurker.explain(_model(), _x(), method="saliency")
    with pytest.raises(LurkerError, match=r"\.signal\(index\)"):
        ex.heatmap(0)


def test_signal_of_an_image_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.LazyLinear(2)).eval()
    x = torch.randn(1, 3, 8, 8)
    model(x)
    ex = lurker.explain(model, x, method="saliency")
    with pytest.raises(LurkerError, match="signal input"):
        ex.signal(0)
