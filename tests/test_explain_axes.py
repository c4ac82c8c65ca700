"""lurker.explain on inputs that are not (B, C, H, W): the channel axis is found from the
model's graph (or named with channel_dim=), and every method's heatmap, Grad-CAM's
upsampling, occlusion's default window and the overlay use it. Oracle: the same model
written both ways (a (B, C, H, W) model and a wrapper that takes (B, H, W, C) and
permutes), and Captum on the (B, C, H, W) one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lurker
from lurker.errors import LurkerError
from lurker.explain.axes import input_axes

captum_attr = pytest.importorskip("captum.attr")

METHODS = [
    ("saliency", {}),
    ("input_x_gradient", {}),
    ("guided_backprop", {}),
    ("deconvnet", {}),
    ("integrated_gradients", {"n_steps": 8}),
    ("smoothgrad", {"n_samples": 4}),
    ("gradcam", {}),
    ("gradcam_plus_plus", {}),
    ("occlusion", {}),
    ("lrp", {}),
]


def axes(model: nn.Module, x: torch.Tensor) -> tuple:
    ax = input_axes(model, x)
    return ax.channel, ax.image, ax.found


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = float(b.detach().abs().max())
    err = float((a.detach() - b.detach()).abs().max())
    assert err <= rel * max(scale, 1e-12), f"max abs diff {err:.3g} vs scale {scale:.3g}"


class Net(nn.Module):
    """A (B, C, H, W) CNN."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1, stride=2),
            nn.ReLU(),
        )
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class ChannelsLast(nn.Module):
    """Takes (B, H, W, C) and permutes inside forward, as TF ports and NHWC wrappers do."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2))


class Gray(nn.Module):
    """Takes a one-channel (B, H, W) image and adds the channel axis itself."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.unsqueeze(1))


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = Net().double().eval()
    x = torch.rand(2, 3, 14, 12, dtype=torch.float64)  # H != W: a swap would show
    return net, ChannelsLast(net).eval(), x, x.permute(0, 2, 3, 1).contiguous()


def test_the_channel_axis_is_found_from_the_graph(pair) -> None:
    net, nhwc, x, xl = pair
    assert axes(net, x) == (1, (2, 3), "graph")
    assert axes(nhwc, xl) == (3, (1, 2), "graph")


@pytest.mark.parametrize("method,opts", METHODS, ids=[m for m, _ in METHODS])
def test_every_method_is_the_same_on_the_model_written_channels_last(pair, method, opts) -> None:
    """Same numbers (after the permute), same heatmap, same overlay: a channels-last
    heatmap used to be summed over the rows, Grad-CAM scaled to (W, C)."""
    net, nhwc, x, xl = pair
    opts_l = dict(opts)
    if method == "smoothgrad":  # the same draws, laid out as each input
        noise = torch.randn(4, *x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
        opts, opts_l = {"noise": noise}, {"noise": noise.permute(0, 1, 3, 4, 2)}
    a = lurker.explain(net, x, [1, 4], method=method, **opts)
    b = lurker.explain(nhwc, xl, [1, 4], method=method, **opts_l)
    assert b.attribution.shape == xl.shape
    close(b.attribution, a.attribution.permute(0, 2, 3, 1))
    for i in range(2):
        assert b.heatmap(i).shape == (14, 12)
        close(b.heatmap(i), a.heatmap(i))
    # the overlay draws on the row as the model takes it (H, W, C), as the other on (C, H, W)
    pa = np.asarray(a.overlay(1, image=x[1]))
    pb = np.asarray(b.overlay(1, image=xl[1]))
    assert pa.shape == (14, 12, 3)
    assert np.abs(pa.astype(int) - pb.astype(int)).max() <= 1


def test_channels_last_heatmaps_equal_captum_on_the_nchw_model(pair) -> None:
    net, nhwc, x, xl = pair
    sal = captum_attr.Saliency(net).attribute(x, target=[1, 4]).sum(1)
    e = lurker.explain(nhwc, xl, [1, 4], method="saliency")
    close(torch.stack([e.heatmap(0), e.heatmap(1)]), sal)
    ref = captum_attr.LayerGradCam(net, net.features[2]).attribute(
        x, target=[1, 4], relu_attributions=True
    )
    up = captum_attr.LayerAttribution.interpolate(ref, x.shape[2:], interpolate_mode="bilinear")
    cam = lurker.explain(nhwc, xl, [1, 4], method="gradcam", layer="net.features.2")
    close(cam.heatmap(1), up[1, 0])
    occ = captum_attr.Occlusion(net).attribute(
        x, sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4), target=[1, 4]
    )
    o = lurker.explain(nhwc, xl, [1, 4], method="occlusion")
    assert o.options["window"] == (8, 8, 3) and o.options["strides"] == (4, 4, 1)
    close(o.attribution, occ.permute(0, 2, 3, 1))


def test_a_one_channel_image_without_a_channel_axis(pair) -> None:
    """(B, H, W) into a model that unsqueezes: its heatmap is the row itself and the
    default occlusion window covers both axes (it used to read H as channels)."""
    torch.manual_seed(1)
    net = Net(channels=1).double().eval()
    gray = Gray(net).eval()
    x = torch.rand(2, 1, 14, 12, dtype=torch.float64)
    assert axes(gray, x[:, 0]) == (None, (1, 2), "graph")
    for method, opts in METHODS:
        if method == "smoothgrad":
            opts = {"noise": 0.1 * torch.randn(4, *x.shape, dtype=x.dtype)}
        opts_g = {"noise": opts["noise"][:, :, 0]} if method == "smoothgrad" else opts
        if method == "occlusion":
            opts = {"window": (1, 8, 8), "strides": (1, 4, 4)}
        a = lurker.explain(net, x, 2, method=method, **opts)
        b = lurker.explain(gray, x[:, 0], 2, method=method, **opts_g)
        close(b.attribution, a.attribution[:, 0])
        close(b.heatmap(1), a.heatmap(1))
    o = lurker.explain(gray, x[:, 0], 2, method="occlusion")
    assert o.options["window"] == (8, 8)


class Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(2))


def test_a_sequence_is_refused_as_an_image_but_explained() -> None:
    """(B, C, L) into a Conv1d: attributions as usual, a heatmap refused with the reason
    (it used to draw the (C, L) array as an image), Grad-CAM a map along time (see
    test_explain_signals.py)."""
    torch.manual_seed(2)
    m = Seq().eval()
    x = torch.randn(2, 3, 20)
    e = lurker.explain(m, x, 1, method="saliency")
    close(e.attribution, captum_attr.Saliency(m).attribute(x, target=1))
    with pytest.raises(LurkerError, match=r"batch of signals .* \.signal\(index\)"):
        e.heatmap(0)
    assert lurker.explain(m, x, 1, method="gradcam", layer="conv").signal(1).shape == (20,)
    o = lurker.explain(m, x, 1, method="occlusion", window=4, strides=2)
    assert o.options["window"] == (3, 4)  # the channels whole, the sequence windowed
    assert o.repeated and o.signal(0).shape == (20,)


class FlatMLP(nn.Module):
    """An MLP on the flattened image: no op says where the channels are."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(14 * 12 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_where_the_graph_does_not_say_channel_dim_names_it() -> None:
    torch.manual_seed(3)
    m = FlatMLP().double().eval()
    xl = torch.rand(2, 14, 12, 3, dtype=torch.float64)
    e = lurker.explain(m, xl, 0, method="saliency")
    with pytest.raises(LurkerError, match=r"cannot tell .* pass channel_dim="):
        e.heatmap(0)
    with pytest.raises(LurkerError, match=r"occlusion .* pass channel_dim="):
        lurker.explain(m, xl, 0, method="occlusion")
    named = lurker.explain(m, xl, 0, method="saliency", channel_dim=-1)
    close(named.heatmap(1), e.attribution[1].sum(-1))
    o = lurker.explain(m, xl, 0, method="occlusion", channel_dim=3)
    assert o.options["window"] == (8, 8, 3) and o.repeated
    # a (B, C, H, W)-looking input keeps the convention
    x = xl.permute(0, 3, 1, 2).contiguous()
    m2 = nn.Sequential(nn.Flatten(), nn.Linear(3 * 14 * 12, 5)).double().eval()
    assert axes(m2, x) == (1, (2, 3), "assumed")
    for bad in (0, 4, -5, 1.0, True):
        with pytest.raises(LurkerError, match="channel_dim"):
            lurker.explain(m, xl, 0, channel_dim=bad)


def test_a_patch_embedding_over_the_last_axis() -> None:
    """A Linear over the last axis of (B, H, W, C) reads C as channels."""

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(3, 8)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.embed(x)).mean((1, 2)))

    torch.manual_seed(4)
    m = Embed().eval()
    xl = torch.rand(1, 6, 5, 3)
    assert axes(m, xl) == (3, (1, 2), "graph")
    e = lurker.explain(m, xl, 2, method="gradcam", layer="norm")
    assert e.heatmap(0).shape == (6, 5)
    close(e.heatmap(0), e.attribution[0, :, :, 0])


def test_overlay_takes_a_channels_last_image() -> None:
    from lurker.explain.overlay import overlay

    heat = torch.rand(6, 5)
    img = torch.rand(3, 6, 5)
    a = np.asarray(overlay(heat, img, signed=False))
    b = np.asarray(overlay(heat, img.permute(1, 2, 0), signed=False, channel_dim=-1))
    assert np.array_equal(a, b)
    with pytest.raises(LurkerError, match="channel_dim=-1 for"):
        overlay(heat, img.permute(1, 2, 0), signed=False)


def test_evaluate_changes_whole_pixels_of_a_channels_last_input(pair) -> None:
    """Deletion and insertion change a pixel's channels together, and SSIM compares
    heatmaps: on the channels-last model every figure equals the (B, C, H, W) model's (it
    used to take (W, C) slices of the channels-last input as its pixels)."""
    net, nhwc, x, xl = pair
    kw = {"patch": 2, "layers": ["features.2"], "ssim": True, "deletion_baseline": "mean"}
    a = lurker.explain.evaluate(net, x, [1, 4], "saliency", **kw)
    b = lurker.explain.evaluate(
        nhwc, xl, [1, 4], "saliency", **{**kw, "layers": ["net.features.2"]}
    )
    for kind in ("deletion", "insertion"):
        close(getattr(b, kind).scores, getattr(a, kind).scores)
    close(b.randomization.similarity, a.randomization.similarity)
    close(b.randomization.ssim, a.randomization.ssim)
    m = FlatMLP().double().eval()
    with pytest.raises(LurkerError, match=r"deletion, insertion and SSIM .* pass channel_dim="):
        lurker.explain.evaluate(m, torch.rand(2, 14, 12, 3, dtype=torch.float64), 0, "saliency")


def test_cli_channel_dim_feeds_and_reads_a_channels_last_model(tmp_path) -> None:
    """`lurker explain --channel-dim -1`: the image goes to the model as (1, H, W, C) and
    the overlay equals the (B, C, H, W) model's; without it, the failure names the option."""
    from click.testing import CliRunner
    from PIL import Image

    from lurker.cli import main

    spec = tmp_path / "nets.py"
    spec.write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "def cnn():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),"
        " nn.Flatten(), nn.Linear(4, 5))\n\n\n"
        "class NHWC(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.net = cnn()\n\n    def forward(self, x):\n"
        "        return self.net(x.permute(0, 3, 1, 2))\n"
    )
    img = tmp_path / "x.png"
    Image.fromarray((torch.rand(20, 20, 3) * 255).byte().numpy(), "RGB").save(img)
    outs = {k: tmp_path / f"{k}.png" for k in ("nchw", "nhwc")}
    base = ["explain", "--image", str(img), "--image-size", "16", "-t", "2"]
    r = CliRunner().invoke(main, [*base, f"{spec}:cnn", "-o", str(outs["nchw"])])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        main, [*base, f"{spec}:NHWC", "--channel-dim", "-1", "-o", str(outs["nhwc"])]
    )
    assert r.exit_code == 0, r.output
    a, b = (np.asarray(Image.open(outs[k])).astype(int) for k in ("nchw", "nhwc"))
    assert a.shape == b.shape == (16, 16, 3) and np.abs(a - b).max() <= 1
    r = CliRunner().invoke(main, [*base, f"{spec}:NHWC", "-o", str(outs["nhwc"])])
    assert r.exit_code == 2 and "--channel-dim -1" in r.output, r.output
    r = CliRunner().invoke(main, [*base, f"{spec}:NHWC", "--channel-dim", "4"])
    assert r.exit_code == 2 and "'--channel-dim'" in r.output, r.output


def test_the_graph_is_read_once_per_model_and_input_shape(monkeypatch):
    """Finding the channel axis traces the model; the explorer's explain page runs every
    method on one image, so the answer is remembered per model and input shape (not per
    call), and a new shape or dtype is asked again."""
    from lurker.explain import axes as ax_mod

    calls: list[tuple] = []
    real = ax_mod._traced

    def counting(model, x):
        calls.append(tuple(x.shape))
        return real(model, x)

    monkeypatch.setattr(ax_mod, "_traced", counting)
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 12, 10)
    for method in ("saliency", "gradcam", "occlusion"):
        lurker.explain(model, x, 1, method=method)
    lurker.explain(model, x[:1], 1, method="saliency")  # another batch size: same answer
    assert len(calls) == 1
    assert lurker.explain(model, torch.randn(1, 3, 8, 8), 1).axes.channel == 1
    assert len(calls) == 2


class PixelTokens(nn.Module):
    """A (B, C, H, W) image read as one token per pixel: its first op that reads channels,
    a Linear, sees the rows and columns flattened into one axis."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x.flatten(2).transpose(1, 2)).mean(1))


class PooledFirst(nn.Module):
    """A (B, C, H, W) image pooled before its first op that reads channels."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("cls", [PixelTokens, PooledFirst])
def test_an_image_read_flattened_or_pooled_is_still_an_image(cls) -> None:
    """The input's own axes say whether it is an image: a (B, C, H, W) input whose
    channels the graph finds on axis 1 has rows and columns on 2 and 3, whatever the op
    that reads the channels sees of them (its heatmap was refused as "a sequence")."""
    torch.manual_seed(5)
    m = cls().eval()
    x = torch.rand(2, 3, 6, 5)
    assert axes(m, x) == (1, (2, 3), "graph")
    e = lurker.explain(m, x, 1, method="saliency")
    close(e.heatmap(1), e.attribution[1].sum(0))


def test_the_remembered_axes_follow_a_replaced_layer() -> None:
    """The answer is remembered per model; a model whose layers were replaced since (a
    channels-last stem put in front) is asked again. Oracle: a fresh copy of the model."""
    import copy

    class Permute(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.permute(0, 3, 1, 2)

    torch.manual_seed(6)
    m = nn.Sequential(nn.Conv2d(8, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = torch.rand(1, 8, 8, 8)  # C == H == W: the shape cannot tell
    assert axes(m, x) == (1, (2, 3), "graph")
    m[0] = nn.Sequential(Permute(), nn.Conv2d(8, 4, 3))
    assert axes(copy.deepcopy(m), x) == (3, (1, 2), "graph")
    assert axes(m, x) == (3, (1, 2), "graph")


class RowLinear(nn.Module):
    """A Linear applied along the rows of a (B, C, H, W) image: in the graph it looks like
    a channels-last patch embedding (a Linear over the last axis)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x).mean((1, 2)))


def test_a_linear_along_the_rows_of_an_nchw_image_is_not_taken_for_channels():
    """The graph reads the last axis as channels, but the input looks like (B, 3, H, W):
    the heatmap would have been summed over the columns, a (3, 12) map with no error.
    Now it is refused, naming channel_dim=, and channel_dim=1 gives the image's map."""
    torch.manual_seed(0)
    model = RowLinear().eval()
    x = torch.randn(2, 3, 12, 12)
    assert axes(model, x) == (None, None, "unknown")
    e = lurker.explain(model, x, 1)
    with pytest.raises(LurkerError, match="channel_dim"):
        e.heatmap()
    e1 = lurker.explain(model, x, 1, channel_dim=1)
    close(e1.heatmap(), e1.attribution[0].sum(0))
