"""Receptive fields of video (3-D) models against autograd: the (t, y, x) bounding box of
the input positions with a non-zero gradient of one output position must equal the
computed ``RF.volume`` (positive weights, ReLU -> identity and max pool -> an all-ones
depthwise conv of the same geometry in the oracle model, so no gradient cancels or
vanishes by chance)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import Tensor, nn

import lurker
from lurker.graph.receptive import RF, receptive_fields
from rf_twin import twin

Vol = tuple[int, int, int, int, int, int]


def grad_volumes(
    fn: Callable[[Tensor], Tensor], x: Tensor, positions: list[tuple[int, int, int]]
) -> list[Vol]:
    """(t0, t1, y0, y1, x0, x1) of the non-zero gradient of act[b, :, t, y, x].sum() with
    respect to the (B, C, D, H, W) input, one batch row per position (all zeros: none)."""
    inp = x.expand(len(positions), *x.shape[1:]).clone().requires_grad_(True)
    act = fn(inp)
    pick = torch.zeros(len(positions), 1, *act.shape[2:])
    for b, (t, y, xx) in enumerate(positions):
        pick[b, 0, t, y, xx] = 1.0
    (g,) = torch.autograd.grad((act * pick).sum(), inp)
    hit = g.abs().sum(1) != 0  # (B, D, H, W)
    out: list[Vol] = []
    for h in hit:
        if not h.any():
            out.append((0, 0, 0, 0, 0, 0))
            continue
        box: list[int] = []
        for keep in ((1, 2), (0, 2), (0, 1)):
            idx = h.any(keep[1]).any(keep[0]).nonzero().flatten().tolist()
            box += [idx[0], idx[-1] + 1]
        out.append(tuple(box))  # type: ignore[arg-type]
    return out


def positive(model: nn.Module, seed: int = 0) -> nn.Module:
    """Strictly positive conv weights: no gradient cancels or vanishes by chance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv3d, nn.Linear)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.1)
    return model.eval()


def fields(model: nn.Module, x: Tensor) -> tuple[lurker.Trace, dict[int, RF]]:
    t = lurker.trace(model, x)
    return t, receptive_fields(t)


def edges(n: int) -> list[int]:
    """Positions of one axis where padding, strides and the clip's ends differ: both ends,
    their neighbours and the middle."""
    return sorted({0, 1, n // 2, n - 2, n - 1} & set(range(n)))


def check_tight(rf: RF, fn: Callable[[Tensor], Tensor], x: Tensor, shape: tuple[int, ...]) -> int:
    """Each output position's volume (both ends of every axis, their neighbours and the
    middle) equals the gradient's; returns how many saw nothing."""
    assert rf.t is not None and rf.exact
    positions = list(itertools.product(*(edges(n) for n in shape[2:])))
    empty = 0
    for start in range(0, len(positions), 64):
        part = positions[start : start + 64]
        for (t, y, xx), g in zip(part, grad_volumes(fn, x, part)):
            want = rf.volume(t, y, xx)
            assert want == g, f"position {(t, y, xx)}: field {want}, gradient {g}"
            empty += g == (0, 0, 0, 0, 0, 0)
    return empty


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18"])
def test_video_resnets_are_tight_at_every_position(name: str) -> None:
    torch.manual_seed(0)
    model = positive(getattr(torchvision.models.video, name)(weights=None))
    x = torch.randn(1, 3, 8, 32, 32)
    trace, rfs = fields(model, x)
    oracle = twin(model)
    parts = ["stem", "layer1", "layer2", "layer3", "layer4"]
    seen_frames = set()
    for i, part in enumerate(parts):  # each block's output (after its add and ReLU)
        op = trace.ops[max(o.index for o in trace.ops if o.module and o.module.startswith(part))]
        rf = rfs[op.index]
        upto = nn.Sequential(*(oracle.get_submodule(q) for q in parts[: i + 1]))
        check_tight(rf, upto, x, tuple(op.shape))
        seen_frames.add(rf.frames(0))
    # time is analysed, not taken whole: the stem's first frame sees frames 0..1 only
    assert (0, 2) in seen_frames and len(seen_frames) > 1


def test_rf_has_frames_and_the_affine_map_in_time() -> None:
    model = positive(torchvision.models.video.r3d_18(weights=None))
    trace, rfs = fields(model, torch.randn(1, 3, 8, 32, 32))
    stem = rfs[trace["stem.0"].index]  # Conv3d((3, 7, 7), stride (1, 2, 2), padding (1, 3, 3))
    assert stem.t is not None and stem.input_size == (8, 32, 32)
    assert (stem.t.size, stem.t.stride, stem.t.start, stem.t.dim) == (3, 1, -1, 2)
    assert (stem.y.size, stem.y.stride, stem.y.start, stem.y.dim) == (7, 2, -3, 3)
    assert stem.x.dim == 4
    assert [stem.frames(t) for t in range(8)] == [(0, 2)] + [
        (t - 1, t + 2) for t in range(1, 7)
    ] + [(6, 8)]
    assert stem.volume(3, 0, 5) == (2, 5, 0, 4, 7, 14)
    assert RF.from_dict(stem.to_dict()) == stem


class Stack(nn.Module):
    """Conv3d/pool stack with strides, dilations and padding in time, and a skip."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(2, 3, (3, 3, 3), stride=(2, 1, 1), padding=(1, 1, 1))
        self.bn = nn.BatchNorm3d(3)
        self.b = nn.Conv3d(3, 3, (3, 1, 3), padding=(2, 0, 1), dilation=(2, 1, 1))
        self.pool = nn.MaxPool3d((2, 3, 3), stride=(1, 2, 2), padding=(1, 1, 1))
        self.c = nn.Conv3d(3, 3, (1, 3, 3), padding=(3, 1, 1))  # time padding with k=1
        self.avg = nn.AvgPool3d((3, 2, 2), stride=(2, 1, 1), padding=(1, 0, 0))
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.bn(self.a(x)))
        h = h + self.relu(self.b(h))
        h = self.c(self.pool(h))
        return self.avg(h)


def test_hand_built_conv3d_stack_is_tight_including_padding_in_time() -> None:
    torch.manual_seed(0)
    model = positive(Stack())
    x = torch.randn(1, 2, 11, 13, 12)
    trace, rfs = fields(model, x)
    out = trace.outputs[0]
    oracle = twin(model)
    for module in ("a", "b", "pool", "c", "avg"):
        op = trace[module] if module != "avg" else out
        rf = rfs[op.index]

        def upto(inp: Tensor, module: str = module) -> Tensor:
            got: list[Tensor] = []
            hook = oracle.get_submodule(module).register_forward_hook(lambda m, i, o: got.append(o))
            try:
                oracle(inp)
            finally:
                hook.remove()
            return got[0]

        empty = check_tight(rf, upto, x, tuple(op.shape))
        if module == "c":
            assert empty > 0  # frames in c's time padding see nothing, and say so


@pytest.mark.parametrize("dims", [2, 3])
def test_twin_keeps_the_pool_geometry_and_passes_every_tap(dims: int) -> None:
    """The shared oracle: a max pool's twin has its output shape, and every input the
    window covers gets a gradient (the max pool's goes to its argmax alone)."""
    pool = (nn.MaxPool3d if dims == 3 else nn.MaxPool2d)(3, stride=2, padding=1)
    model = twin(nn.Sequential(pool, nn.ReLU()))
    x = torch.rand(1, 2, *(7,) * dims, requires_grad=True)
    out = model(x)
    assert out.shape == pool(x).shape and not any(isinstance(m, nn.ReLU) for m in model)
    out.flatten()[0].backward()
    assert int((x.grad[0, 0] != 0).sum()) == 2**dims  # the window at 0 holds 2 taps per axis
