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
from models_zoo import ConvLSTM

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


def _biasless() -> nn.Sequential:
    """A Conv1d stack with no biases: LRP-0 (epsilon -> 0) conserves through every layer."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv1d(C, 4, 5, padding=2, bias=False),
        nn.ReLU(),
        nn.Conv1d(4, 6, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(6, 2, bias=False),
    ).eval()


@pytest.mark.parametrize("layer", ["0", "2"])
def test_concepts_on_a_signal_conserve_and_equal_hand_lrp(layer: str):
    """Each unit's conditional heatmap along time: ``(C, T)`` per input channel, summing
    to the unit's relevance, the units' relevances to the logit; and (LRP-0 on a biasless
    ReLU net) equal to a hand one: ``x * d/dx sum_t A_c(t) g_c(t)``, ``g`` held fixed."""
    model, x = _biasless(), torch.randn(2, C, T)
    c = lurker.explain.concepts(model, x, layer=layer, composite="epsilon", epsilon=1e-12, top=3)
    assert c.heatmaps.shape == (2, 3, C, T)
    torch.testing.assert_close(c.heatmap_sums, c.unit_relevance, atol=1e-5, rtol=1e-4)
    logit = model(x).gather(1, model(x).argmax(1, keepdim=True))[:, 0].detach()
    torch.testing.assert_close(c.relevance.sum(1), logit, atol=1e-5, rtol=1e-4)
    for b in range(2):  # the hand oracle, by autograd
        xi = x[b : b + 1].clone().requires_grad_(True)
        acts: list[torch.Tensor] = []
        hook = model[int(layer)].register_forward_hook(lambda m, a, o, acts=acts: acts.append(o))
        out = model(xi)
        hook.remove()
        (g,) = torch.autograd.grad(out[0, int(out.argmax())], acts[0], retain_graph=True)
        rel = (acts[0] * g)[0].detach()  # (units, L)
        torch.testing.assert_close(c.relevance[b], rel.sum(1), atol=1e-5, rtol=1e-4)
        for i, u in enumerate(c.units[b].tolist()):
            (gx,) = torch.autograd.grad((acts[0][0, u] * g[0, u]).sum(), xi, retain_graph=True)
            torch.testing.assert_close(
                c.heatmaps[b, i], (xi * gx)[0].detach(), atol=1e-5, rtol=1e-4
            )


@pytest.mark.parametrize("layer", ["lstm", "lstm_1"])
def test_gradcam_at_an_lstm_says_what_it_outputs_and_which_layers_qualify(layer: str):
    """Before: "a hook on lstm_1 returned Tensor; lstm_1 has 3 output tensors, so return a
    tuple ..." (the trace label), or "returns tuple, not a tensor; name the op inside it"
    (the module path, whose op is that same LSTM)."""
    torch.manual_seed(0)
    model, x = ConvLSTM(C).eval(), torch.randn(1, C, T)
    with pytest.raises(LurkerError) as e:
        lurker.explain(model, x, method="gradcam", layer=layer)
    said = str(e.value)
    assert "'lstm'" in said or "'lstm_1'" in said
    assert "LSTM" in said and "3 tensors" in said and "Conv1d" in said
    assert "qualify: conv1d_1, relu_1" in said and "hook" not in said
    assert lurker.explain(model, x, method="gradcam").signal(0).shape == (T,)  # the default


def test_concepts_through_an_lstm_name_it_and_what_to_use_instead():
    torch.manual_seed(0)
    model, x = ConvLSTM(C).eval(), torch.randn(1, C, T)
    with pytest.raises(LurkerError) as e:
        lurker.explain.concepts(model, x, layer="conv")
    said = str(e.value)
    assert said.startswith("concept relevance is LRP") and "lstm_1" in said and "LSTM" in said
    assert "method='integrated_gradients'" in said and "method='gradcam'" in said
