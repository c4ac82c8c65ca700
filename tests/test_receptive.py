"""Receptive fields against an independent oracle: the support of autograd gradients.

For an output position, the bounding box of the input pixels with a non-zero gradient of
that position's activation must lie inside the computed box, and equal it where nothing
can zero a gradient by chance: positive weights, position-wise ops without dead zones
(identity / LeakyReLU), and max pools swapped for a geometry twin (a depthwise all-ones
conv with the same kernel, stride, padding and dilation) in the oracle model.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

import lurker
from lurker.errors import LurkerError
from lurker.graph.nodes import ParamRef
from lurker.graph.receptive import RF, receptive_fields
from rf_twin import twin

Box = tuple[int, int, int, int]
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


# --------------------------------------------------------------------------- oracle helpers
def grad_boxes(
    fn: Callable[[Tensor], Tensor], x: Tensor, positions: list[tuple[int, int]]
) -> list[Box | None]:
    """Bounding box of nonzero d act[b, :, y, x].sum() / d input, one batch row per position.

    ``fn`` maps (B, C, H, W) -> (B, C', H', W') (or (B, C', L) for 1-D inputs).
    """
    inp = x.expand(len(positions), *x.shape[1:]).clone().requires_grad_(True)
    act = fn(inp)
    if act.dim() == 3:
        act = act.unsqueeze(2)
    pick = torch.zeros(len(positions), 1, *act.shape[2:])
    ys, xs = (torch.tensor(v) for v in zip(*positions))
    pick[torch.arange(len(positions)), 0, ys, xs] = 1.0
    (g,) = torch.autograd.grad((act * pick).sum(), inp)
    hit = (g.abs().sum(1) != 0).reshape(len(positions), -1, x.shape[-1])  # (B, H or 1, W)
    out: list[Box | None] = []
    for rows, cols in zip(hit.any(2).tolist(), hit.any(1).tolist()):
        r = [i for i, v in enumerate(rows) if v]
        c = [i for i, v in enumerate(cols) if v]
        out.append((r[0], r[-1] + 1, c[0], c[-1] + 1) if r else None)
    return out


def inside(inner: Box | None, outer: Box) -> bool:
    if inner is None:
        return True
    return (
        outer[0] <= inner[0]
        and inner[1] <= outer[1]
        and outer[2] <= inner[2]
        and inner[3] <= outer[3]
    )


def all_positions(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    if len(shape) == 3:
        return [(0, i) for i in range(shape[2])]
    return [(i, j) for i in range(shape[2]) for j in range(shape[3])]


def positive(model: nn.Module, seed: int = 0) -> nn.Module:
    """Strictly positive conv/linear weights: no gradient cancels or vanishes by chance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.1)
    return model.eval()


def hooked(model: nn.Module, module: str) -> Callable[[Tensor], Tensor]:
    """fn(x) -> the output of ``model.<module>`` (the whole model runs)."""

    def fn(x: Tensor) -> Tensor:
        got: list[Tensor] = []
        h = model.get_submodule(module).register_forward_hook(lambda m, i, o: got.append(o))
        try:
            model(x)
        finally:
            h.remove()
        return got[0]

    return fn


def check(
    rf: RF,
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    positions: Iterable[tuple[int, int]],
    tight: bool,
) -> None:
    positions = list(positions)
    for (y, xx), g in zip(positions, grad_boxes(fn, x, positions)):
        box = rf.box(y, xx)
        assert inside(g, box), f"gradient {g} outside box {box} at {(y, xx)}"
        if tight:
            assert g == (None if box == (0, 0, 0, 0) else box), f"not tight at {(y, xx)}"


def rf_of(model: nn.Module, x: Tensor, key: str | int | None = None) -> tuple[RF, tuple]:
    t = lurker.trace(model, x)
    op = t[key] if key is not None else t.outputs[0]
    return receptive_fields(t)[op.index], tuple(op.shape)


# --------------------------------------------------------------------------- conv/pool chains
class Chain(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


CHAINS: dict[str, Callable[[], list[nn.Module]]] = {  # fresh modules per test
    "stride_pad_nonsquare": lambda: [
        nn.Conv2d(2, 3, (3, 5), stride=(2, 1), padding=(1, 2)),
        nn.Conv2d(3, 3, (1, 3), stride=(1, 3)),
        nn.Conv2d(3, 2, 3, padding=2, dilation=2),
    ],
    "dilation_groups_same": lambda: [
        nn.Conv2d(2, 4, 3, padding="same", dilation=(2, 3), groups=2),
        nn.Conv2d(4, 4, (4, 2), padding="same"),
        nn.Conv2d(4, 2, 5, stride=3, padding=4),
    ],
    "pools": lambda: [
        nn.Conv2d(2, 3, 3, padding=1),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.AvgPool2d((2, 3), stride=(2, 1)),
        nn.Conv2d(3, 2, 3),
        nn.MaxPool2d(3, stride=2, dilation=2, padding=1),
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True),
    ],
    "padding_modes": lambda: [
        nn.Conv2d(2, 3, 3, padding=2, padding_mode="reflect"),
        nn.Conv2d(3, 3, (5, 3), stride=2, padding=(2, 1), padding_mode="replicate"),
        nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular"),
    ],
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_chains_are_tight_everywhere(name: str) -> None:
    torch.manual_seed(0)
    model = positive(Chain(CHAINS[name]()))
    x = torch.randn(1, 2, 37, 50)
    rf, shape = rf_of(model, x)
    check(rf, twin(model), x, all_positions(shape), tight=True)
    if name != "padding_modes":  # border reflection is not affine: only the exact box folds
        for y, xx in all_positions(shape):
            aff = rf.affine_box(y, xx)
            assert inside(rf.box(y, xx), aff)
            if aff[0] >= 0 and aff[1] <= 37 and aff[2] >= 0 and aff[3] <= 50:
                assert rf.box(y, xx) == aff  # away from the borders they agree


def test_classic_numbers_and_affine_formula() -> None:
    model = Chain([nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.Conv2d(1, 1, 5, dilation=2)])
    rf, _ = rf_of(model, torch.randn(1, 1, 40, 40))
    # k_eff = 9: size = 3 + 8*2, stride 2, start = -1
    assert (rf.size, rf.stride, rf.start) == ((19, 19), (2, 2), (-1, -1))
    assert rf.affine_box(3, 4) == (5, 24, 7, 26)
    assert rf.box(0, 0) == (0, 18, 0, 18)


def test_real_max_pool_and_relu_stay_inside() -> None:
    torch.manual_seed(1)
    model = Chain([*CHAINS["pools"]()[:1], nn.ReLU(), *CHAINS["pools"]()[1:]]).eval()
    x = torch.randn(1, 2, 37, 50)
    rf, shape = rf_of(model, x)
    check(rf, model, x, all_positions(shape), tight=False)


def test_reflect_pad_folds_back_into_the_image() -> None:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, (1, 2))

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(F.pad(x, (3, 1, 2, 0), mode="reflect"))

    model = positive(M())
    x = torch.randn(1, 2, 9, 11)
    rf, shape = rf_of(model, x)
    check(rf, model, x, all_positions(shape), tight=True)
    assert rf.box(0, 0) == (2, 3, 2, 4)  # reads input row 2, columns 3 and 2


def test_zero_padding_region_sees_nothing() -> None:
    model = positive(Chain([nn.ZeroPad2d((4, 0, 0, 0)), nn.Conv2d(1, 1, 1)]))
    x = torch.randn(1, 1, 5, 6)
    rf, shape = rf_of(model, x)
    assert rf.box(2, 1) == (0, 0, 0, 0)
    assert rf.box(2, 5) == (2, 3, 1, 2)
    check(rf, model, x, all_positions(shape), tight=True)


def test_conv1d() -> None:
    model = positive(
        Chain([nn.Conv1d(2, 3, 5, stride=2, padding=3), nn.MaxPool1d(2), nn.Conv1d(3, 1, 3)])
    )
    x = torch.randn(1, 2, 40)
    rf, shape = rf_of(model, x)
    assert rf.input_size == (1, 40)
    assert rf.box(0, 0)[:2] == (0, 1)
    check(rf, model, x, all_positions(shape), tight=False)
    avg = copy.deepcopy(model)
    avg.layers[1] = nn.AvgPool1d(2)
    check(rf, avg, x, all_positions(shape), tight=True)


# --------------------------------------------------------------------------- branches, resampling
class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.short = nn.Conv2d(2, 3, 1, stride=2)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.b(self.act(self.a(x))) + self.short(x))


def test_skip_connection_is_the_union() -> None:
    model = positive(Skip())
    x = torch.randn(1, 2, 23, 30)
    t = lurker.trace(model, x)
    rfs = receptive_fields(t)
    out = rfs[t.outputs[0].index]
    shape = t.outputs[0].shape
    check(out, model, x, all_positions(shape), tight=True)
    conv, short = rfs[t["b"].index], rfs[t["short"].index]
    assert out.box(4, 5) == tuple(
        f(a, b) for f, a, b in zip((min, max, min, max), conv.box(4, 5), short.box(4, 5))
    )
    assert (out.size, out.stride) == ((7, 7), (2, 2))


def test_union_of_different_strides() -> None:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Conv2d(2, 1, 1)

        def forward(self, x: Tensor) -> Tensor:
            h, w = x.shape[2] // 2, x.shape[3] // 2
            return self.mix(torch.cat([x[:, :1, :h, :w], x[:, 1:, ::2, ::2]], 1))

    model = positive(M())
    x = torch.randn(1, 2, 20, 26)
    rf, shape = rf_of(model, x)
    check(rf, model, x, all_positions(shape), tight=True)
    assert rf.box(3, 4) == (3, 7, 4, 9)
    for y, xx in all_positions(shape):  # the affine bound (stride 1 or 2) still holds
        assert inside(rf.box(y, xx), rf.affine_box(y, xx))


class Resample(nn.Module):
    def __init__(self, **up: object):
        super().__init__()
        self.down = nn.Conv2d(2, 2, 3, stride=2, padding=1)
        self.up = up
        self.mix = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        y = F.interpolate(self.down(x), size=x.shape[-2:], **self.up)  # type: ignore[arg-type]
        return self.mix(y + x)  # union of stride 1 and stride 1/2 * 2 paths


@pytest.mark.parametrize(
    "up,tight",
    [
        ({"mode": "nearest"}, True),
        ({"mode": "nearest-exact"}, True),
        ({"mode": "area"}, True),
        ({"mode": "bilinear", "align_corners": False}, False),
        ({"mode": "bilinear", "align_corners": True}, False),
        ({"mode": "bicubic", "align_corners": False}, False),
    ],
)
def test_interpolate(up: dict, tight: bool) -> None:
    model = positive(Resample(**up))
    x = torch.randn(1, 2, 19, 26)
    rf, shape = rf_of(model, x)
    check(rf, model, x, all_positions(shape), tight=tight)
    for y, xx in all_positions(shape):  # the affine map bounds the exact boxes
        assert inside(rf.box(y, xx), rf.affine_box(y, xx))


def test_scale_factor_and_antialias() -> None:
    class M(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            y = F.interpolate(x, scale_factor=(1.7, 2.3), mode="nearest")
            return F.interpolate(y, size=(9, 14), mode="bilinear", antialias=True)

    x = torch.randn(1, 1, 20, 24)
    rf, shape = rf_of(M(), x)
    check(rf, M(), x, all_positions(shape), tight=False)


@pytest.mark.parametrize(
    "size, kw",
    [
        ((32, 32), dict(scale_factor=0.5, mode="bilinear")),
        ((20, 24), dict(scale_factor=0.5, mode="bicubic")),
        ((13, 31), dict(scale_factor=0.37, mode="bilinear")),
        ((20, 24), dict(size=(9, 14), mode="bilinear", align_corners=True)),
        ((7, 5), dict(scale_factor=2.0, mode="bicubic")),
    ],
)
def test_an_antialiased_resize_gives_exact_boxes(size: tuple[int, int], kw: dict) -> None:
    # the field is called exact, but each box took torch's whole antialiasing window,
    # whose end taps the filter weighs 0: up to two pixels too wide on each side (a
    # model shrinking its input with antialias=True had every crop padded with pixels
    # its units never see)
    class M(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return F.interpolate(x, antialias=True, **kw)

    x = torch.randn(1, 1, *size)
    rf, shape = rf_of(M(), x)
    assert rf.exact
    check(rf, M(), x, all_positions(shape), tight=True)
    check(rf, M(), x.double(), all_positions(shape), tight=True)


def test_a_conv_after_an_antialiased_halving_sees_eight_pixels() -> None:
    # by hand: halving with antialias weighs 4 pixels per output (a triangle 2 px wide on
    # each side, its ends weighed 0); a 3x3 conv's 3 outputs step 2: 4 + 2 * 2 = 8 px.
    # The layer page said 12x12 px
    conv = nn.Conv2d(1, 2, 3)

    def model(t: Tensor) -> Tensor:
        return conv(F.interpolate(t, scale_factor=0.5, mode="bilinear", antialias=True))

    x = torch.randn(1, 1, 32, 32)
    rf, shape = rf_of(_Wrap(model), x)
    assert rf.size == (8, 8) and rf.stride == (2, 2)
    check(rf, model, x, all_positions(shape), tight=True)


def test_conv_transpose_and_pixel_shuffle() -> None:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(2, 8, 3, stride=2, padding=1, output_padding=1)
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(F.pixel_shuffle(self.up(x), 2))

    model = positive(M())
    x = torch.randn(1, 2, 7, 9)
    rf, shape = rf_of(model, x)
    assert shape[2:] == (28, 36)
    check(rf, model, x, all_positions(shape), tight=True)


def test_slicing_cat_split_flip_and_nhwc() -> None:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, stride=(1, 2))
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x[:, :, 2:31:3, ::2])
            a, b = y.split([3, y.shape[2] - 3], dim=2)
            y = torch.cat([b, a], dim=2).flip(3)
            z = F.leaky_relu(self.fc(y.permute(0, 2, 3, 1)), 0.1).permute(0, 3, 1, 2)
            return torch.cat([y.roll(2, 3), z], dim=3)

    model = positive(M())
    x = torch.randn(1, 2, 33, 40)
    rf, shape = rf_of(model, x)
    assert rf.exact
    check(rf, model, x, all_positions(shape), tight=True)


def test_narrow_select_unbind_against_autograd() -> None:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.mix = nn.Conv2d(2, 2, 1)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x).narrow(2, -20, 12)  # rows 10..21 of 30
            rows = y.unbind(3)  # one map per column
            col = torch.stack([rows[4], rows[-3]], dim=3)  # columns 4 and 27
            chans = torch.stack([y.select(1, 0), y.select(1, -1)], 1)
            return self.mix(chans) + col[:, :2].sum(3, keepdim=True)

    model = positive(M())
    x = torch.randn(1, 2, 32, 32)
    rf, shape = rf_of(model, x)
    check(rf, model, x, all_positions(shape), tight=False)


# --------------------------------------------------------------------------- real networks
def test_resnet18_inside_and_tight() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    t = lurker.trace(model, x)
    rfs = receptive_fields(t)
    oracle = twin(positive(copy.deepcopy(model)))
    for name, pos in [
        ("maxpool", [(0, 0), (5, 9), (15, 15)]),
        ("layer1", [(0, 0), (7, 3), (15, 15)]),
        ("layer2.0", [(0, 0), (3, 4), (7, 7)]),
        ("layer3", [(0, 0), (1, 2)]),
    ]:
        rf = rfs[t[name].index]
        assert rf.exact
        check(rf, hooked(model, name), x, pos, tight=False)
        check(rf, hooked(oracle, name), x, pos, tight=True)
    assert (rfs[t["layer4"].index].size, rfs[t["layer4"].index].stride) == ((435, 435), (32, 32))


def test_vgg11_features_tight() -> None:
    torch.manual_seed(0)
    features = positive(torchvision.models.vgg11().features)
    x = torch.randn(1, 3, 48, 48)
    t = lurker.trace(features, x)
    rfs = receptive_fields(t)
    oracle = twin(features)
    for idx, pos in [
        (2, [(0, 0), (11, 17), (23, 23)]),
        (7, [(0, 0), (5, 6), (11, 11)]),
        (15, [(0, 0), (2, 1)]),
    ]:
        op = t[str(idx)]
        check(rfs[op.index], oracle[: idx + 1], x, pos, tight=True)
        check(rfs[op.index], features[: idx + 1], x, pos, tight=False)


# --------------------------------------------------------------------------- global / unknown
def test_global_ops_are_full() -> None:
    t = lurker.trace(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
    rfs = receptive_fields(t)
    for key in ("avgpool", "fc", "output"):
        rf = rfs[t[key].index]
        assert rf.full and rf.box() == (0, 64, 0, 64)
    assert not rfs[t["layer1"].index].full


def test_squeeze_excitation_broadcast_is_full() -> None:
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            return y * torch.sigmoid(y.mean((2, 3), keepdim=True)) + y.amax(3, keepdim=True)

    rf, _ = rf_of(SE(), torch.randn(1, 2, 10, 12))
    assert rf.full


def test_global_context_can_be_left_out() -> None:
    class M(nn.Module):
        def __init__(self, gate: bool):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.gate = gate

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            if self.gate:  # squeeze-excitation and an image-pooling branch
                pooled = F.interpolate(F.adaptive_avg_pool2d(y, 1), size=y.shape[-2:])
                y = torch.cat([y * torch.sigmoid(y.mean((2, 3), keepdim=True)), pooled], 1)
            return F.max_pool2d(y, 2)

    x = torch.randn(1, 2, 12, 16)
    strict, _ = rf_of(M(True), x)
    assert strict.full
    t = lurker.trace(M(True), x)
    local = receptive_fields(t, global_context=False)[t.outputs[0].index]
    plain, _ = rf_of(M(False), x)
    assert local == plain and local.exact


def test_unknown_ops() -> None:
    class M(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            a = torch.rot90(x, 1, (2, 3)) + 1  # unknown, keeps the spatial sizes
            b = x.unfold(2, 3, 1).mean(-1)  # unknown, changes them
            return a, F.conv2d(b, torch.ones(1, 1, 1, 1))  # type: ignore[return-value]

    t = lurker.trace(M(), torch.randn(1, 1, 8, 8))
    rfs = receptive_fields(t)
    assert not rfs[t.find("rot90")[0].index].exact
    assert not rfs[t.find("add")[0].index].exact
    for name in ("unfold", "mean", "conv2d"):
        assert t.find(name)[0].index not in rfs


def test_a_graph_read_from_json_gives_the_trace_fields() -> None:
    """Receptive fields are a graph analysis: a run's stored graph, with no model and no
    tensors, gives what the live trace gives."""
    from lurker.graph import Graph

    t = lurker.trace(torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 64, 64))
    fields = receptive_fields(t)
    assert len(fields) > 50 and receptive_fields(Graph.from_json(t.to_json())) == fields


def test_json_round_trip_and_input_choice() -> None:
    class Two(nn.Module):
        def forward(self, a: Tensor, b: Tensor) -> Tensor:
            return F.avg_pool2d(a, 2) + F.avg_pool2d(b, 4)

    a, b = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 16, 16)
    t = lurker.trace(Two(), a, b)
    out = t.outputs[0].index
    ra, rb = receptive_fields(t)[out], receptive_fields(t, "b")[out]
    assert (ra.size, rb.size) == ((2, 2), (4, 4))
    assert RF.from_dict(json.loads(json.dumps(ra.to_dict()))) == ra
    with pytest.raises(LurkerError):
        receptive_fields(t, t.outputs[0].label)


# --------------------------------------------------------------------------- graph data only
def test_module_loads_without_torch() -> None:
    """Receptive fields are a graph analysis: the module loads with torch blocked (the
    package roots are bypassed here, so only graph/receptive.py's own imports count)."""
    src = Path(lurker.__file__).parent
    code = textwrap.dedent(
        f"""
        import sys, types
        sys.modules["torch"] = None  # any import of torch now raises ImportError
        for name, path in (("lurker", {str(src)!r}), ("lurker.graph", {str(src / "graph")!r})):
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            sys.modules[name] = pkg
        from lurker.graph.receptive import RF, follow_axes, receptive_fields
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_tensor_arguments_are_read_by_shape_only() -> None:
    """Arguments that only carry a shape (what a stored graph keeps of a tensor: a
    ParamRef) give the same fields as the live tensors (conv weight, cat, max(a, b))."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            y = torch.cat([y, F.max_pool2d(y, 3, 1, 1)], dim=1)
            return torch.max(y, torch.relu(y))

    t = lurker.trace(M(), torch.randn(1, 2, 20, 24))
    live = receptive_fields(t)

    def strip(v: object) -> object:
        if isinstance(v, Tensor):
            return ParamRef("stand-in", tuple(v.shape))
        if isinstance(v, (list, tuple)):
            return type(v)(strip(e) for e in v)
        return v

    for op in t.ops:
        if op._skel_args is not None:
            op._skel_args = strip(op._skel_args)
            op._skel_kwargs = {k: strip(v) for k, v in (op._skel_kwargs or {}).items()}
    assert receptive_fields(t) == live
    assert all(rf.exact for rf in live.values()) and t.outputs[0].index in live


@pytest.mark.parametrize("name", ["vgg11", "resnet18", "swin_t"])
def test_a_trace_without_saved_activations_gives_the_same_fields_and_layouts(name: str) -> None:
    """``save='none'`` keeps each op's public call (tensors as OpRefs), not the raw one:
    receptive fields and the probe's unit axes read shapes through the graph and come
    out as from a trace that saved everything (explain's traces save nothing)."""
    from lurker.probe.layout import infer_layouts

    model = getattr(torchvision.models, name)(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        bare, full = lurker.trace(model, x, save="none"), lurker.trace(model, x)
    assert all(op.activation is None for op in bare.ops if op.kind == "op")
    fields = receptive_fields(full)
    assert len(fields) > 25 and receptive_fields(bare) == fields
    layouts = infer_layouts(full)
    assert infer_layouts(bare) == layouts
    pool = next(op for op in full.ops if op.name in ("max_pool2d", "adaptive_avg_pool2d"))
    assert layouts[pool.index].unit == 1  # a pool keeps the channels where they are


def test_a_flipped_input_is_stored_with_its_negative_stride() -> None:
    # a flip makes the affine map's stride negative (positions run backwards); the run's
    # record refused it, so probing any model that flips its input stopped with
    # "rf x.stride must be >= 0"; its exact bounds are the gradients' support
    from lurker.store.schema import rf_record

    model = Chain([nn.Conv2d(2, 3, 3, stride=2)])
    x = torch.randn(1, 2, 9, 11)

    def flipped(t: Tensor) -> Tensor:
        return model(t.flip(3))

    rf, shape = rf_of(_Wrap(flipped), x)
    check(rf, flipped, x, all_positions(shape), tight=True)
    record = rf_record(rf)
    assert record["x"]["stride"] == -2 and record["y"]["stride"] == 2
    assert record["x"]["lo"] == rf.to_dict()["x"]["lo"]


class _Wrap(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)
