"""Receptive fields through recurrent ops and ops lurker does not know, against autograd.

The oracle: for a position of an op's output, the input pixels with a non-zero gradient
of that position's activations (summed over its units) on a model with random weights;
their bounding box must lie inside the reported box, and equal it where the field is a
recurrence's prefix (step ``t`` sees steps ``0..t``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import lurker
from lurker.graph import Graph
from lurker.graph.receptive import receptive_fields
from test_receptive import hooked

Box = tuple[int, int, int, int]
H, W = 6, 10


class ConvRNN(nn.Module):
    """A conv stem on an image, read as a sequence over its columns by an RNN; ``fc``
    reads the last step (a CRNN-style text or sequence model)."""

    def __init__(
        self,
        kind: str = "LSTM",
        *,
        bidirectional: bool = False,
        batch_first: bool = True,
        layers: int = 1,
        head: str = "last",
        **rnn_kw: object,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        rnn = getattr(nn, kind)
        self.lstm = rnn(
            4 * H, 8, num_layers=layers, batch_first=batch_first, bidirectional=bidirectional,
            **rnn_kw,
        )  # fmt: skip
        self.fc = nn.Linear(8 * (2 if bidirectional else 1), 5)
        self.batch_first = batch_first
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv(x))  # (N, 4, H, W): no dead zones
        seq = h.flatten(1, 2).permute(0, 2, 1)  # (N, W, 4*H): one step per image column
        if not self.batch_first:
            seq = seq.transpose(0, 1)
        out, state = self.lstm(seq)
        if self.head == "state":  # the final hidden state (output 1 of the op)
            return self.fc((state[0] if isinstance(state, tuple) else state)[-1])
        return self.fc(out[:, -1] if self.batch_first else out[-1])


def support(fn: Callable[[Tensor], Tensor], x: Tensor, index: Callable[[Tensor], Tensor]) -> Box:
    """Bounding box (y0, y1, x0, x1) of the input pixels whose gradient of
    ``index(fn(x)).sum()`` is non-zero."""
    inp = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(index(fn(inp)).sum(), inp)
    hit = g.abs().sum((0, 1)) != 0  # (H, W)
    rows = hit.any(1).nonzero().flatten().tolist()
    cols = hit.any(0).nonzero().flatten().tolist()
    assert rows and cols, "no gradient at all"
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def inside(inner: Box, outer: Box) -> bool:
    return (
        outer[0] <= inner[0]
        and inner[1] <= outer[1]
        and outer[2] <= inner[2]
        and (inner[3] <= outer[3])
    )


def rnn_output(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """fn(x) -> the RNN's output sequence (its first output)."""
    out = hooked(model, "lstm")
    return lambda x: out(x)[0]


CASES = [
    ("LSTM", {}),
    ("GRU", {}),
    ("RNN", {}),
    ("RNN", {"nonlinearity": "relu"}),
    ("LSTM", {"batch_first": False}),
    ("GRU", {"layers": 2}),
    ("LSTM", {"bidirectional": True}),
    ("GRU", {"bidirectional": True, "batch_first": False}),
    ("LSTM", {"proj_size": 3, "layers": 2}),
]


@pytest.mark.parametrize(("kind", "kw"), CASES, ids=[f"{k}-{kw}" for k, kw in CASES])
def test_rnn_steps_see_the_steps_before_them(kind: str, kw: dict) -> None:
    torch.manual_seed(0)
    kw = dict(kw)
    proj = kw.pop("proj_size", None)
    model = ConvRNN(kind, **kw, **({"proj_size": proj} if proj else {})).eval()
    if proj:
        model.fc = nn.Linear(proj, 5)
    x = torch.randn(1, 3, H, W)
    t = lurker.trace(model, x)
    rfs = receptive_fields(t)
    op = t["lstm"]
    rf = rfs[op.index]
    assert rf.exact
    bidirectional = kw.get("bidirectional", False)
    time_dim = 1 if kw.get("batch_first", True) else 0
    assert rf.x.dim == time_dim and rf.y.dim is None  # the columns are the sequence
    fn = rnn_output(model)
    for step in range(W):
        want = support(fn, x, lambda o, s=step: o.select(time_dim, s))
        box = rf.box(0, step)
        assert inside(want, box), f"step {step}: gradient {want} outside {box}"
        # the conv adds a column each side; step t reads columns 0..t (all: bidirectional)
        end = W if bidirectional else min(step + 2, W)
        assert box == (0, H, 0, end)
        if kind != "RNN" or kw.get("nonlinearity") != "relu":  # relu may zero a gradient
            assert want == box, f"step {step}: not tight, gradient {want}, box {box}"
    for key in ("fc", "output"):  # the last step depends on every column
        assert rfs[t[key].index].full and rfs[t[key].index].exact


def test_the_user_report_fc_after_the_last_step_sees_the_whole_image() -> None:
    """conv stem -> a sequence over the image's columns -> nn.LSTM -> fc(out[:, -1]):
    ``fc``'s field was a 3-column strip at the right edge (the LSTM taken position-wise)."""
    torch.manual_seed(1)
    model = ConvRNN().eval()
    x = torch.randn(1, 3, H, W)
    t = lurker.trace(model, x)
    rf = receptive_fields(t)[t["fc"].index]
    assert rf.full and rf.box() == (0, H, 0, W)
    want = support(model, x, lambda o: o)
    assert want == (0, H, 0, W) and inside(want, rf.box())


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_the_final_state_sees_every_step(kind: str) -> None:
    torch.manual_seed(2)
    model = ConvRNN(kind, head="state", batch_first=False).eval()
    x = torch.randn(1, 3, H, W)
    t = lurker.trace(model, x)
    rf = receptive_fields(t)[t["fc"].index]
    assert rf.full and rf.exact and support(model, x, lambda o: o) == (0, H, 0, W)


def test_rnn_fields_from_a_stored_graph_and_a_trace_without_activations() -> None:
    """The handler reads the recorded call (bidirectional, batch_first) from what the
    trace keeps: a graph read back from JSON and ``save='none'`` give the same fields."""
    model = ConvRNN("GRU", bidirectional=False, batch_first=False).eval()
    x = torch.randn(1, 3, H, W)
    full = lurker.trace(model, x)
    fields = receptive_fields(full)
    with torch.no_grad():
        bare = lurker.trace(model, x, save="none")
    assert receptive_fields(bare) == fields
    assert receptive_fields(Graph.from_json(full.to_json())) == fields
    assert fields[full["lstm"].index].box(0, 3) == (0, H, 0, 5)


class Cell(nn.Module):
    """An RNN cell fed one vector per sample whose features are the image's columns."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.cell = nn.RNNCell(W, W)

    def forward(self, x: Tensor) -> Tensor:
        cols = self.conv(x).mean((1, 2))  # (N, W): feature i is column i
        h = self.cell(cols)
        return self.cell(cols, h)


def test_an_rnn_cell_mixes_its_features() -> None:
    """Each of the cell's hidden units reads every feature: every image column (it was
    taken position-wise: unit i saw column i)."""
    torch.manual_seed(0)
    model = Cell().eval()
    x = torch.randn(1, 3, H, W)
    t = lurker.trace(model, x)
    rf = receptive_fields(t)[t.outputs[0].index]
    assert rf.full and rf.exact
    for i in range(W):
        want = support(model, x, lambda o, i=i: o[:, i])
        assert want == (0, H, 0, W) and inside(want, rf.box(0, i))


class Unknown(nn.Module):
    """Ops lurker has no rule for, that keep the spatial sizes but move positions."""

    def __init__(self, which: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.which = which
        self.register_buffer("perm", torch.arange(W).flip(0).roll(3))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv(x))
        if self.which == "rot90":
            h = torch.rot90(h, 1, (2, 3))  # (N, C, W, H) on a square map
        else:
            h = h[:, :, :, self.perm]  # advanced indexing: a permutation of the columns
        return h * 2


@pytest.mark.parametrize("which", ["rot90", "gather"])
def test_an_unknown_op_never_gives_a_field_too_small(which: str) -> None:
    """An op lurker does not know is not assumed position-wise: each output position
    sees the whole of each spatial axis it keeps (a bound, not exact), so the autograd
    support is inside every box."""
    size = (W, W) if which == "rot90" else (H, W)
    torch.manual_seed(0)
    model = Unknown(which).eval()
    x = torch.randn(1, 3, *size)
    t = lurker.trace(model, x)
    rf = receptive_fields(t)[t.outputs[0].index]
    assert not rf.exact
    out = model(x)
    for y in range(out.shape[2]):
        for xx in range(out.shape[3]):
            want = support(model, x, lambda o, y=y, xx=xx: o[:, :, y, xx])
            box = rf.box(y, xx)
            assert inside(want, box), f"{(y, xx)}: gradient {want} outside {box}"


@pytest.mark.parametrize("unit_dim", [None, {"lstm": -1}])
def test_probing_the_rnn_stores_its_steps_fields(tmp_path: Path, unit_dim: dict | None) -> None:
    """``probe(layers=['lstm'])``: the hidden units are on the last axis (as a linear
    layer's; naming it changes nothing), the steps are the positions, and each step's
    stored box is a prefix (it was a 3-column strip)."""
    torch.manual_seed(0)
    model = ConvRNN().eval()
    ds = torch.utils.data.TensorDataset(torch.randn(6, 3, H, W), torch.arange(6) % 2)
    run = lurker.probe(
        model, ds, out=tmp_path / "run", layers=["lstm", "fc"], k=2, batch_size=3,
        device="cpu", progress=False, unit_dim=unit_dim,
    )  # fmt: skip
    info = run.layer("lstm")
    assert info.num_units == 8 and info.layout["unit"] == 2 and info.layout["positions"] == [1]
    assert info.rf is not None
    assert [(info.rf["x"]["lo"][s], info.rf["x"]["hi"][s]) for s in (0, 4, W - 1)] == [
        (0, 2),
        (0, 6),
        (0, W),
    ]
    fc = run.layer("fc").rf
    assert fc is not None and fc["full"] and fc["x"]["lo"] == [0] and fc["x"]["hi"] == [W]
