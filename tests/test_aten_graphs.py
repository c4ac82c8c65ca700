"""Graphs of aten ops (``torch.export``'s ``.module()``, ``make_fx``): their operators are
named and bound as the eager calls they stand for, with the eager model as the oracle for
FLOPs and receptive fields."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lurker
from lurker.graph.receptive import receptive_fields
from lurker.ops import catalogue
from lurker.ops import torch_funcs as tf


class CNN(nn.Module):
    """Stride, padding, dilation and groups given positionally in aten's call, a
    transposed conv (aten's convolution with ``transposed``), a BatchNorm and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=2)
        self.up = nn.ConvTranspose2d(16, 4, 3, stride=2, padding=1, output_padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        x = self.pool(torch.relu(self.up(x)))
        return self.fc(x.mean((2, 3)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def _graph(model: nn.Module, x: torch.Tensor, form: str) -> nn.Module:
    if form == "make_fx":
        from torch.fx.experimental.proxy_tensor import make_fx

        return make_fx(model)(x)
    exported = torch.export.export(model, (x,))
    return (exported.run_decompositions() if form == "decomposed" else exported).module()


def _trace(model: nn.Module, x: torch.Tensor) -> lurker.Trace:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lurker.trace(model, x)


_FORMS = ["export", "decomposed", "make_fx"]


@pytest.mark.parametrize("form", _FORMS)
@pytest.mark.parametrize("which", ["cnn", "mlp"])
def test_aten_graph_counts_flops_and_fields_as_the_eager_model(which: str, form: str) -> None:
    """Every conv, transposed conv and Linear of the graph counts the eager op's FLOPs
    (aten's conv2d.default was 0 and not even counted unknown), the total is no lower
    bound, and the receptive field of each is the eager op's."""
    torch.manual_seed(0)
    model = (CNN() if which == "cnn" else _mlp()).eval()
    x = torch.randn(2, 3, 16, 16) if which == "cnn" else torch.randn(4, 5)
    eager, graph = _trace(model, x), _trace(_graph(model, x, form), x)
    want = [op for op in eager.compute_ops if op.flops]
    got = [op for op in graph.compute_ops if op.flops]
    assert [op.flops for op in got] == [op.flops for op in want]
    assert graph.flops == eager.flops > 0 and graph.flops_unknown == 0
    if which == "mlp":  # 2 FLOPs per multiply-add, by hand
        assert graph.flops == 2 * 4 * (5 * 7 + 7 * 3)
    else:  # the grouped, dilated conv2: 16 maps of 8x8, each of 8/2 channels x 3x3 taps
        assert got[1].flops == 2 * (2 * 16 * 8 * 8) * (4 * 3 * 3)
        mine, theirs = receptive_fields(graph), receptive_fields(eager)
        for g, w in zip(got, want):
            assert mine[g.index].to_dict() == theirs[w.index].to_dict(), (g.name, w.name)
        # by hand: conv1's 3 taps, 2 apart, then conv2's 3 taps dilated 2: 3 + 2 * 2 * 2
        assert mine[got[1].index].size == (11, 11) and mine[got[1].index].stride == (2, 2)
    if form == "export":  # the names users see are the eager model's
        assert [op.name for op in graph.compute_ops] == [op.name for op in eager.compute_ops]


def test_aten_overloads_bind_by_their_schema() -> None:
    """An aten overload named as a catalogue entry takes its parameters at the entry's
    positions, or has its own entry in VARIANTS: aten.softmax.int's third argument is its
    dtype (F.softmax's _stacklevel), aten.batch_norm's second its weight."""
    norm = {"input": "self", "train": "training"}
    for name, spec in catalogue.SPECS.items():
        packet = getattr(torch.ops.aten, name) if hasattr(torch.ops.aten, name) else None
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        ours = [norm.get(p.name, p.name) for p in spec.params if not p.kw_only]
        for overload in packet.overloads():
            func = getattr(packet, overload)
            assert tf.op_name(func) == name
            schema = func._schema
            if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
                continue  # out= forms, which graphs do not call
            if f"torch.ops.{func}" in catalogue.VARIANTS:
                assert tf.func_info(func).spec is catalogue.VARIANTS[f"torch.ops.{func}"]
                continue
            theirs = [norm.get(a.name, a.name) for a in schema.arguments if not a.kwarg_only]
            spread = bool(ours) and spec.params[len(ours) - 1].spread
            assert len(theirs) <= len(ours) or spread, (name, overload)
            for i, n in enumerate(theirs):
                assert n not in ours or ours.index(n) == i, (name, overload, n)
    softmax = catalogue.spec("softmax", "torch.ops.aten.softmax.int")
    assert softmax is not None and softmax.bind(("x", 1, "f16"))["dtype"] == "f16"
    target = "torch.ops.aten.batch_norm.default"
    bn = catalogue.bind("batch_norm", ("x", "w", "b", "m", "v"), None, target)
    assert bn["weight"] == "w" and bn["running_mean"] == "m"


def test_aten_tensordot_counts_its_flops() -> None:
    """aten's tensordot takes the axes of each operand apart (dims_self, dims_other)."""

    class M(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.ops.aten.tensordot.default(a, b, [2], [0])

    a, b = torch.randn(2, 3, 4), torch.randn(4, 5)
    tr = lurker.trace(M(), a, b)
    (op,) = tr.compute_ops
    assert op.name == "tensordot" and op.flops == 2 * 2 * 3 * 4 * 5
