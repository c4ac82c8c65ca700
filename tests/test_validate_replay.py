"""Validation and replay on models that use tensor properties, random ops, autocast,
autograd.grad, or change their own state in forward (issue #10, point 8).

Each model here is small and shows one defect class. The oracle is always the untraced
model: a deep copy taken before the call, run under the same RNG seed, gives the outputs
that trace, validate and ``Trace.run`` (on the traced input and on another) must give.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lurker
from lurker.capture._tree import paths
from lurker.errors import GraphChangedError, LurkerError, ValidationError
from lurker.ops import torch_funcs as _funcs


def _same(a, b, atol=1e-6) -> None:
    pa, pb = dict(paths(a, "out", [])), dict(paths(b, "out", []))
    assert pa.keys() == pb.keys()
    for k, t in pa.items():
        u = pb[k]
        assert t.dtype == u.dtype and t.shape == u.shape, k
        torch.testing.assert_close(t.detach(), u.detach(), rtol=1e-5, atol=atol)


def _untraced(model: nn.Module, x, seed: int):
    """The output an untraced forward gives from the model's current state."""
    twin = copy.deepcopy(model)
    torch.manual_seed(seed)
    return twin(x)


def _check(model: nn.Module, x, x2, seed: int = 0, atol: float = 1e-6):
    """Trace, validate and replay (traced input and another) match untraced forwards from
    the same starting state; return the trace and the validation report."""
    want = _untraced(model, x, seed)
    torch.manual_seed(seed)
    tr = lurker.trace(model, x)
    _same(tr.output, want, atol)
    report = tr.validate()
    assert report.output_checked
    for i, inp in enumerate((x, x2)):
        want = _untraced(model, inp, seed + 1 + i)
        torch.manual_seed(seed + 1 + i)
        _same(tr.run(inp).output, want, atol)
    return tr, report


# ---------------------------------------------------------------- tensor properties
class Properties(nn.Module):
    """``self.A.T`` in a loop, ``z1.T @ z2``, ``fft(x).real/.imag``, ``.mT``, ``.H``."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = torch.tanh(x @ self.A.T)
        z1 = F.normalize(x, dim=0)
        z2 = F.normalize(x + 1, dim=0)
        sim = z1.T @ z2
        f = torch.fft.fft(x)
        spec = f.real + f.imag + (f.H @ f).real.sum() + x.mT.sum()
        return sim.sum() + spec


def test_tensor_properties_record_and_replay():
    torch.manual_seed(0)
    model = Properties()
    x = torch.randn(3, 4)
    tr, report = _check(model, x, torch.randn(3, 4))
    names = [op.name for op in tr.compute_ops]
    assert names.count("T") == 4 and {"real", "imag", "H", "mT"} <= set(names)
    assert report.checked == len(tr.compute_ops) and not report.skipped
    # the properties' saved values are what the model computed
    f = torch.fft.fft(tr["tanh_1:3"].activation)
    torch.testing.assert_close(tr.find("real")[0].activation, f.real)
    torch.testing.assert_close(tr.find("imag")[0].activation, f.imag)
    # and replay hands them over for a new input
    x2 = torch.randn(3, 4)
    got = tr.run(x2, save=[tr.find("imag")[0].label])
    h = x2
    for _ in range(3):
        h = torch.tanh(h @ model.A.T)
    torch.testing.assert_close(got[tr.find("imag")[0].label], torch.fft.fft(h).imag.detach())


def test_same_callable_for_property_getters():
    a, b = torch.Tensor.T.__get__, torch.Tensor.T.__get__
    assert a is not b and _funcs.same_callable(a, b)
    assert not _funcs.same_callable(a, torch.Tensor.mT.__get__)


# ---------------------------------------------------------------- random ops in training
class Attention(nn.Module):
    """Explicit scaled_dot_product_attention with dropout_p while training."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        p = 0.4 if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return F.dropout(y.transpose(1, 2).flatten(2), 0.3, self.training) + torch.rand_like(x)


@pytest.mark.parametrize("which", ["encoder", "decoder", "sdpa"])
def test_random_ops_in_training_mode_validate(which):
    torch.manual_seed(0)
    if which == "encoder":
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.5, batch_first=True)
        model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    elif which == "decoder":
        layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.5, batch_first=True)
        dec = nn.TransformerDecoder(layer, 1)
        memory = torch.randn(2, 3, 8)
        model = _WithMemory(dec, memory)
    else:
        model = Attention()
    model.train()
    tr, report = _check(model, torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    random = [op for op in tr.compute_ops if op.random]
    assert random and not report.skipped  # every random op re-executed and compared
    if which == "sdpa":
        sdpa = tr.find("scaled_dot_product_attention")[0]
        assert sdpa.random
        # a wrong saved value of a random op is caught, not excused as "random"
        sdpa.activation.add_(0.5)
        with pytest.raises(ValidationError, match="scaled_dot_product_attention"):
            tr.validate()
    # in eval mode, dropout_p=0 and training=False: nothing random
    model.eval()
    tr = lurker.trace(model, torch.randn(2, 5, 8))
    assert not any(op.random for op in tr.compute_ops if op.name != "rand_like")


class _WithMemory(nn.Module):
    def __init__(self, dec: nn.Module, memory: torch.Tensor) -> None:
        super().__init__()
        self.dec = dec
        self.register_buffer("memory", memory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(x, self.memory.expand(x.shape[0], -1, -1))


class _Packed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, 2, dropout=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3]))
        return self.lstm(packed)[0].data


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.LSTM(3, 4, 3, dropout=0.5),
        lambda: nn.GRU(3, 4, 2, dropout=0.5, bidirectional=True),
        lambda: nn.RNN(3, 4, 2, nonlinearity="relu", dropout=0.3, batch_first=True),
        _Packed,
    ],
    ids=["lstm", "gru", "rnn", "packed"],
)
def test_recurrent_layers_dropping_out_between_layers_validate(make):
    """nn.LSTM/GRU/RNN with dropout= draw random numbers between layers while training:
    the op is random (its RNG state kept), not a mismatch; in eval mode, or with one
    layer, it draws none."""
    torch.manual_seed(0)
    model = make().train()
    tr, report = _check(model, torch.randn(5, 2, 3), torch.randn(5, 2, 3))
    rnn = [op for op in tr.compute_ops if op.name in ("lstm", "gru", "rnn_relu")]
    assert len(rnn) == 1 and rnn[0].random and not report.skipped
    # a wrong saved value is still caught, and named by its output, not printed whole
    rnn[0].activation[1].add_(1)
    with pytest.raises(
        ValidationError, match=r"re-execution .*: output 1: max abs difference 1\. It reads"
    ):
        tr.validate()
    model.eval()
    assert not any(op.random for op in lurker.trace(model, torch.randn(5, 2, 3)))
    one = nn.LSTM(3, 4, 1).train()
    assert not any(op.random for op in lurker.trace(one, torch.randn(5, 2, 3)))


def test_weights_changed_since_the_trace_are_named_as_a_cause():
    """Validation re-executes ops with the model's parameters as they are now: after a
    training step, the mismatch says so instead of only blaming the saved value."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    tr = lurker.trace(model, torch.randn(3, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    with pytest.raises(
        ValidationError,
        match=r"linear_1 .*parameters as they are now "
        r"\(0\.weight, 0\.bias\): if they changed since the trace",
    ):
        tr.validate()


def test_random_call_decided_by_arguments():
    info = _funcs.func_info(F.dropout)
    x = torch.ones(2)
    assert _funcs.is_random_call(info, (x,), {})
    assert not _funcs.is_random_call(info, (x, 0.5, False), {})
    assert not _funcs.is_random_call(info, (x,), {"p": 0.0})
    sdpa = _funcs.func_info(F.scaled_dot_product_attention)
    assert not _funcs.is_random_call(sdpa, (x, x, x), {})
    assert _funcs.is_random_call(sdpa, (x, x, x, None, 0.1), {})
    assert _funcs.is_random_call(sdpa, (x, x, x), {"dropout_p": 0.1})


def test_uninitialised_memory_is_skipped_with_its_reason():
    class Empty(nn.Module):
        def forward(self, x):
            return x + torch.empty(x.shape).zero_()

    tr = lurker.trace(Empty(), torch.randn(3))
    report = tr.validate()
    assert report.skipped == {tr.find("empty")[0].label: "uninitialised memory"}


# ---------------------------------------------------------------- autocast in forward
class Autocast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x).relu()
        with torch.amp.autocast("cpu", dtype=torch.bfloat16):
            x = self.fc2(x)
        with torch.no_grad():
            x = x + 1
        return x.float().softmax(-1)


def test_autocast_and_grad_mode_inside_forward():
    torch.manual_seed(0)
    model = Autocast()
    tr, report = _check(model, torch.randn(4, 8), torch.randn(4, 8))
    assert tr["fc2"].dtype == "bfloat16"  # it ran under autocast
    assert report.checked == len(tr.compute_ops) and not report.skipped
    # validation re-executed fc2 under autocast: a bf16 re-execution without it would not
    # even run (fp32 weights); a corrupted saved value is caught
    tr["fc2"].activation.add_(1)
    with pytest.raises(ValidationError, match="autocast"):
        tr.validate()


def test_trace_under_outer_autocast_validates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    x = torch.randn(3, 8)
    with torch.amp.autocast("cpu", dtype=torch.bfloat16):
        tr = lurker.trace(model, x)
        want = model(x)
    assert tr.output.dtype == torch.bfloat16
    _same(tr.output, want)
    report = tr.validate()  # called outside autocast: each op re-runs under its own
    assert report.checked == len(tr.compute_ops)


# ---------------------------------------------------------------- state changed in forward
class ReassignsBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("buffer1", torch.zeros(4))
        self.register_buffer("buffer2", torch.ones(4))
        self.register_buffer("count", torch.zeros(()))
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1  # in place
        y = self.fc(x) * self.buffer2 + self.buffer1 * self.count
        self.buffer1 = torch.rand(4)
        self.buffer2 = x[0].detach() ** 2
        return y


def test_model_that_changes_its_own_state():
    torch.manual_seed(0)
    model = ReassignsBuffers()
    x = torch.randn(2, 4)
    tr, report = _check(model, x, torch.randn(2, 4))
    text = " ".join(report.state_changes)
    assert "buffer buffer1 reassigned" in text and "buffer buffer2 reassigned" in text
    assert "buffer count updated in place" in text
    assert "buffer1" in str(report)
    # validation left the model in the state the forwards left it in, as the user has it
    before = {n: b.clone() for n, b in model.named_buffers()}
    b1 = model.buffer1
    tr.validate()
    assert model.buffer1 is b1
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, before[n])


def test_validation_leaves_the_saved_running_statistics_as_the_forward_read_them():
    """Batch norm in training mode, re-executed, updates the running statistics it is
    given in place: the buffer nodes' saved activations, which must stay the values the
    traced forward read (and from which the untraced forward starts)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    tr = lurker.trace(model, torch.randn(2, 3, 8, 8))
    saved = {op.label: op.activation.clone() for op in tr if op.activation is not None}
    stats = [op for op in tr if op.kind == "buffer" and "running" in op.name]
    assert len(stats) == 2 and all(torch.equal(op.activation, saved[op.label]) for op in stats)
    assert torch.equal(tr["buffer_2"].activation, torch.zeros(4))  # the mean going in
    for _ in range(2):
        report = tr.validate()
        for op in tr:
            if op.activation is not None:
                assert torch.equal(op.activation, saved[op.label]), op.label
        assert sorted(report.state_changes) == [
            f"buffer 1.{n} updated in place"
            for n in ("num_batches_tracked", "running_mean", "running_var")
        ]


class FusedFakeQuant(nn.Module):
    """Quantisation-aware training's fused observer and fake quantisation (what
    ``torch.ao.quantization``'s default QAT qconfig puts after each layer; found on a
    QAT-prepared torchvision ``mobilenet_v2``): one op, named without a trailing
    underscore, that updates the running range, scale and zero point in place while the
    observer is on, and quantises with the updated scale."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("observer_on", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("fake_quant_on", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.tensor([1.0]))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.fused_moving_avg_obs_fake_quant(
            self.fc(x), self.observer_on, self.fake_quant_on, self.lo, self.hi,
            self.scale, self.zero_point, 0.5, 0, 255, -1,
        )  # fmt: skip
        return q * 2


@pytest.mark.parametrize("observer", [True, False])
def test_fused_fake_quant_updates_are_state_changes_and_validate(observer: bool):
    """The op writes four buffers in place: the trace must keep the values it read (not
    the updated ones), list the writes in state_changes, validate, and replay to the
    untraced forward's output from the same state."""
    torch.manual_seed(0)
    model = FusedFakeQuant()
    with torch.no_grad():
        model(torch.randn(8, 4) * 3)  # the observer has seen a batch: its range moves next
    model.observer_on.fill_(int(observer))
    x = torch.randn(8, 4)
    start = copy.deepcopy(model.state_dict())
    oracle = copy.deepcopy(model)
    want = oracle(x)

    tr = lurker.trace(model, x)
    _same(tr.output, want)
    written = sorted(n for n, b in model.state_dict().items() if not torch.equal(b, start[n]))
    assert written == (sorted(["lo", "hi", "scale", "zero_point"]) if observer else [])
    assert sorted(tr.state_changes) == sorted(f"buffer {n} updated in place" for n in written)
    for op in tr:  # the buffer nodes hold what the op read
        if op.kind == "buffer":
            assert torch.equal(op.activation, start[op.name]), op.name
    report = tr.validate()
    assert report.output_checked and report.checked == 3
    model.load_state_dict(start)
    _same(tr.run(x).output, want)


@torch.library.custom_op("lurker_test::ema", mutates_args=("avg",))
def _ema(avg: torch.Tensor, x: torch.Tensor) -> None:
    avg.mul_(0.5).add_(x.mean(0) * 0.5)


@torch.library.custom_op("lurker_test::ema_second", mutates_args=("avg",))
def _ema_second(x: torch.Tensor, avg: torch.Tensor) -> None:
    avg.mul_(0.5).add_(x.mean(0) * 0.5)


@torch.library.custom_op("lurker_test::ema_centred", mutates_args=("avg",))
def _ema_centred(avg: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    avg.mul_(0.5).add_(x.mean(0) * 0.5)
    return x - avg


class CustomOpEMA(nn.Module):
    """A buffer updated by a custom operator (``torch.library``, as a model's own CUDA
    kernel is), whose schema declares the write but whose name does not end in ``_``;
    the buffer is read before and after the update."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("avg", torch.zeros(4))
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        before = h * self.avg
        if self.kind == "returns":
            z = _ema_centred(self.avg, h)
        elif self.kind == "none, written second":
            _ema_second(h, self.avg)
            z = h
        else:
            _ema(self.avg, h)
            z = h
        return before + z + self.avg


@pytest.mark.parametrize("kind", ["none", "returns", "none, written second"])
def test_custom_op_writing_a_buffer_is_a_state_change_and_validates(kind: str):
    """The recorder copies what the op's schema says it writes before the call: the
    buffer node keeps the value the model read, the write is listed, validation passes
    (and still catches a corrupted activation), and a replay equals the untraced model.
    An op returning nothing is saved as the argument it wrote, first or not, and its
    re-execution is compared with that argument's copy."""
    torch.manual_seed(0)
    model = CustomOpEMA(kind)
    with torch.no_grad():
        model(torch.randn(3, 4))  # a nonzero average going in
    x = torch.randn(3, 4)
    start = copy.deepcopy(model.state_dict())
    want = copy.deepcopy(model)(x)

    tr = lurker.trace(model, x)
    _same(tr.output, want)
    assert tr.state_changes == ["buffer avg updated in place"]
    (buf,) = [op for op in tr if op.kind == "buffer"]
    assert torch.equal(buf.activation, start["avg"])
    report = tr.validate()
    assert report.output_checked and not report.skipped
    model.load_state_dict(start)
    _same(tr.run(x).output, want)
    (ema,) = [op for op in tr if op.name.startswith("ema")]
    saved = ema.activation
    ema.activation = saved + 0.01
    with pytest.raises(ValidationError, match=ema.label):
        tr.validate()
    ema.activation = saved


@torch.library.custom_op("lurker_test::ema_undeclared", mutates_args=())
def _ema_undeclared(avg: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    avg.mul_(0.5).add_(x.mean(0) * 0.5)  # a write its schema does not declare
    return x * 2


_LIB = torch.library.Library("lurker_test", "FRAGMENT")  # as a C++ extension defines one
_LIB.define("ema_raw(Tensor avg, Tensor x) -> Tensor")  # no (a!): the write undeclared
_LIB.impl("ema_raw", lambda avg, x: (avg.mul_(0.5).add_(x.mean(0) * 0.5), x * 2)[1], "CPU")


class UndeclaredWrite(nn.Module):
    """An operator writes in place what its schema does not say it writes (a custom op's
    ``mutates_args`` left out, an extension's schema without ``(a!)``): a buffer, or an
    op's saved output, read by an op before the write and one after."""

    def __init__(self, op: str, target: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("avg", torch.ones(4))
        self.op, self.target = op, target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        t = self.avg if self.target == "buffer" else h.detach().mean(0) + 1
        before = h * t
        op = _ema_undeclared if self.op == "custom_op" else torch.ops.lurker_test.ema_raw
        z = op(t, h)
        return before + z + (h + t)


@pytest.mark.parametrize("target", ["buffer", "op output"])
@pytest.mark.parametrize("op", ["custom_op", "library"])
def test_an_undeclared_write_is_blamed_on_the_op_that_wrote(op: str, target: str) -> None:
    """The saved value holds what the write left, so the op that read it before cannot
    match: validation refuses, naming the operator that wrote and how to declare the
    write (it used to blame the op that read the value, which did nothing wrong)."""
    torch.manual_seed(0)
    model = UndeclaredWrite(op, target)
    x = torch.randn(3, 4)
    want = copy.deepcopy(model)(x)
    tr = lurker.trace(model, x)
    _same(tr.output, want)  # the traced forward computed what the model does
    (writer,) = [o for o in tr.compute_ops if o.name.startswith("ema")]
    with pytest.raises(ValidationError, match="mutates_args") as ei:
        tr.validate()
    assert ei.value.op == writer.label
    assert str(ei.value).startswith(f"{writer.label} ({writer.name}) wrote in place")


class EMACodebook(nn.Module):
    """A VQ-VAE quantiser whose codebook (a parameter) is updated by EMA inside forward,
    under ``no_grad``, in place: through ``.data`` or on the parameter itself. An op that
    reads the codebook after the update (``spread``) reads the new value."""

    def __init__(self, via_data: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.embed = nn.Parameter(torch.randn(8, 4))
        self.via_data = via_data
        self.decay = 0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.proj(x)
        idx = torch.cdist(z, self.embed).argmin(1)
        q = self.embed[idx]
        with torch.no_grad():
            onehot = F.one_hot(idx, self.embed.shape[0]).float()
            mean = onehot.t() @ z / onehot.sum(0).clamp(min=1).unsqueeze(1)
            target = self.embed.data if self.via_data else self.embed
            target.mul_(self.decay).add_(mean * (1 - self.decay))
        spread = (self.embed**2).sum()
        return z + (q - z).detach(), spread


@pytest.mark.parametrize("via_data", [True, False])
def test_a_parameter_written_in_place_in_forward_validates(via_data: bool) -> None:
    """Validation re-runs the ops that read the codebook with the value they read (before
    the EMA update, or after it), the untraced forward starts from the codebook going in,
    the report names the update, and the model keeps the codebook the traced forward left."""
    torch.manual_seed(0)
    model = EMACodebook(via_data)
    x = torch.randn(6, 3)
    twin = copy.deepcopy(model)
    want = twin(x)  # the oracle: the untraced model from the same starting state
    before = model.embed.detach().clone()
    tr = lurker.trace(model, x)
    _same(tr.output, want)
    torch.testing.assert_close(model.embed.detach(), twin.embed.detach())
    cdist = next(op for op in tr if op.name == "cdist")
    torch.testing.assert_close(cdist.activation, torch.cdist(model.proj(x), before).detach())
    for _ in range(2):
        report = tr.validate()
        assert report.checked == len(tr.compute_ops)
        assert report.state_changes == ["parameter embed updated in place"]
        # validation left the codebook as the traced forward left it (one update, not two)
        torch.testing.assert_close(model.embed.detach(), twin.embed.detach(), rtol=0, atol=0)
    # a real mismatch is still caught: a corrupted activation of an op that read the codebook
    cdist.activation.add_(1)
    with pytest.raises(ValidationError, match=cdist.label):
        tr.validate()


@pytest.mark.parametrize("via_data", [True, False])
def test_state_changes_lists_a_parameter_written_in_place(via_data: bool) -> None:
    """tr.state_changes names the EMA codebook update (the oracle: the parameters whose
    values an untraced forward changes), as the validation report does."""
    torch.manual_seed(0)
    model = EMACodebook(via_data)
    x = torch.randn(6, 3)
    twin = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in twin.named_parameters()}
    twin(x)
    changed = [n for n, p in twin.named_parameters() if not torch.equal(p, before[n])]
    tr = lurker.trace(model, x)
    assert tr.state_changes == [f"parameter {n} updated in place" for n in changed]
    assert tr.validate().state_changes == tr.state_changes


class ReplacesWeight(nn.Module):
    """Replaces a parameter's storage in forward, without an op (``p.data = ...``), before
    or after the ops that read it."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.where = where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.where == "start":
            self.fc.weight.data = self.fc.weight.detach() * 0.5
        y = self.fc(x).relu() @ self.fc.weight
        if self.where == "end":
            self.fc.weight.data = self.fc.weight.detach() * 0.5
        return y


@pytest.mark.parametrize("where", ["start", "end"])
def test_a_parameter_replaced_in_forward_is_reported_and_validates(where: str) -> None:
    """``p.data = new`` is named in state_changes; validation re-runs the ops that read the
    parameter on the value they read (going in, or after the replacement), runs the
    untraced forward from the value going in, and leaves the model as the traced forward
    left it (the oracle: an untraced twin, one forward)."""
    torch.manual_seed(0)
    model = ReplacesWeight(where)
    x = torch.randn(2, 3)
    twin = copy.deepcopy(model)
    want = twin(x)
    tr = lurker.trace(model, x)
    _same(tr.output, want)
    assert tr.state_changes == ["parameter fc.weight replaced (p.data = ...)"]
    for _ in range(2):
        report = tr.validate()
        assert report.output_checked and report.checked == len(tr.compute_ops)
        assert report.state_changes == tr.state_changes
        torch.testing.assert_close(model.fc.weight.detach(), twin.fc.weight, rtol=0, atol=0)
    # a real mismatch is still caught, and the message names the replacement
    linear = next(op for op in tr if op.name == "linear")
    linear.activation.add_(1)
    with pytest.raises(ValidationError, match="replaced"):
        tr.validate()


class WritesItsState(nn.Module):
    """Updates a buffer (or a plain tensor attribute) in forward, in one of the ways models
    do it, between an op that reads the value going in and one that reads the new value."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("avg", torch.linspace(-1, 1, 4))
        self.mem = torch.linspace(1, 2, 4)  # state kept outside buffers
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        how = self.how
        state = self.mem if how.startswith("attribute") else self.avg
        y = self.lin(x)
        out = y * state  # reads the value going in
        new = y.mean(0).detach()
        if how in ("data", "attribute data"):
            state.data.mul_(0.5).add_(new)
        elif how == "data[...] =":
            state.data[...] = new
        elif how == "copy_":
            state.copy_(new)
        elif how == "view":
            state[:2].add_(new[:2])
        elif how == "replaced":
            state.data = state * 0.5 + new
        elif how == "twice":
            state.data.add_(new)
            out = out + y * state
            state.data.mul_(2)
        elif how == "attribute":
            state.mul_(0.5).add_(new)
        return out + y * state  # reads the new value


def _by_hand(how: str, model: WritesItsState, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The oracle: the forward of WritesItsState computed by hand from the state going in
    (the output, and the state it leaves)."""
    with torch.no_grad():
        s = (model.mem if how.startswith("attribute") else model.avg).clone()
        y = x @ model.lin.weight.t() + model.lin.bias
        out, new = y * s, y.mean(0)
        if how in ("data", "attribute data", "attribute", "replaced"):
            s = s * 0.5 + new
        elif how in ("data[...] =", "copy_"):
            s = new.clone()
        elif how == "view":
            s[:2] += new[:2]
        elif how == "twice":
            s = s + new
            out = out + y * s
            s = s * 2
        return out + y * s, s


@pytest.mark.parametrize(
    "how",
    ["data", "data[...] =", "copy_", "view", "replaced", "twice", "attribute", "attribute data"],
)
def test_a_buffer_written_in_forward_is_listed_and_validates(how: str) -> None:
    """A buffer (or tensor attribute) written in forward through ``.data``, a view, itself,
    or given new storage: the ops that read it before re-run on the value going in, those
    after on the new value (validation used to re-run them on the value going in, a false
    mismatch, and not list the write); the untraced forward starts from the value going in;
    the model keeps the state one forward left; a replay on another input computes what a
    plain second forward does."""
    torch.manual_seed(0)
    model = WritesItsState(how)
    x, x2 = torch.randn(3, 4), torch.randn(3, 4)
    want, state_after = _by_hand(how, model, x)
    twin = copy.deepcopy(model)
    _same(twin(x), want)  # the hand computation is the model's
    tr = lurker.trace(model, x)
    _same(tr.output, want)
    kind, name = ("attribute", "mem") if how.startswith("attribute") else ("buffer", "avg")
    verb = "replaced (.data = ...)" if how == "replaced" else "updated in place"
    assert tr.state_changes == [f"{kind} {name} {verb}"]
    state = lambda: model.mem if kind == "attribute" else model.avg  # noqa: E731
    for _ in range(2):
        report = tr.validate()
        assert report.output_checked and report.checked == len(tr.compute_ops)
        assert report.state_changes == tr.state_changes
        torch.testing.assert_close(state(), state_after, rtol=0, atol=1e-6)
    _same(tr.run(x2).output, twin(x2))  # both a second forward, from the state one left
    # a real mismatch is still caught: the op that read the new value, corrupted
    last = [op for op in tr.compute_ops if op.name == "mul"][-1]
    last.activation.add_(1)
    with pytest.raises(ValidationError, match=last.label):
        tr.validate()


class UpdatesAndReplaces(nn.Module):
    """Writes a parameter in place and replaces its storage (``p.data = ...``) in one
    forward, in either order, with an op reading it in between."""

    def __init__(self, order: str) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        w = self.fc.weight
        if self.order == "in place first":
            w.data.mul_(0.5)
            between = x @ w.t()
            w.data = w.detach() + 1
        else:
            w.data = w.detach() + 1
            between = x @ w.t()
            w.data.mul_(0.5)
        return y + between + x @ w.t()


@pytest.mark.parametrize("order", ["in place first", "replaced first"])
def test_a_parameter_updated_in_place_and_replaced_validates(order: str) -> None:
    """Both changes are listed; each op re-runs on the value it read (the recorder sees
    ``p.data = ...`` when it happens); the untraced forward starts from the value going in
    (it used to start from the value after the replacement, a false output mismatch);
    the model keeps the weight one forward left; a corrupted activation still fails."""
    torch.manual_seed(0)
    model = UpdatesAndReplaces(order)
    x = torch.randn(2, 3)
    twin = copy.deepcopy(model)
    w0, b0 = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    w1 = w0 * 0.5 if order == "in place first" else w0 + 1
    w2 = w1 + 1 if order == "in place first" else w1 * 0.5
    want = x @ w0.t() + b0 + x @ w1.t() + x @ w2.t()  # the oracle, by hand
    _same(twin(x), want)
    tr = lurker.trace(model, x)
    _same(tr.output, want)
    assert tr.state_changes == [
        "parameter fc.weight updated in place",
        "parameter fc.weight replaced (p.data = ...)",
    ]
    for _ in range(2):
        report = tr.validate()
        assert report.output_checked and report.checked == len(tr.compute_ops)
        torch.testing.assert_close(model.fc.weight.detach(), w2, rtol=0, atol=0)
    between = next(op for op in tr.compute_ops if op.name == "matmul")
    between.activation.add_(1)
    with pytest.raises(ValidationError, match=between.label):
        tr.validate()


@pytest.mark.parametrize("how", ["y.data.add_(1)", "y.data = y + 1"])
def test_an_activation_changed_through_data_validates(how: str) -> None:
    """An op's output changed without its version counter moving (``.data`` has its own),
    read before and after: each read re-runs on the value it saw (the later one used to
    re-run on the value before, a false mismatch)."""

    class Bumps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                y = self.lin(x) * 2
            z = y + 1
            if how == "y.data.add_(1)":
                y.data.add_(1)
            else:
                y.data = y + 1
            return z * y

    torch.manual_seed(0)
    model = Bumps()
    x = torch.randn(2, 4)
    with torch.no_grad():
        y = (x @ model.lin.weight.t() + model.lin.bias) * 2
    want = (y + 1) * (y + 1)  # the oracle, by hand
    tr = lurker.trace(model, x)
    _same(tr.output, want)
    report = tr.validate()
    assert report.output_checked and report.checked == len(tr.compute_ops)
    last = tr.compute_ops[-1]
    last.activation.add_(1)
    with pytest.raises(ValidationError, match=last.label):
        tr.validate()


class ViewThenData(nn.Module):
    """Takes a view of a buffer, parameter or tensor attribute, then changes it through
    ``.data`` (which has its own version counter) and reads the view after: in place, the
    view sees the new values (it shares the storage); rebound (``t.data = new``), it keeps
    the old ones."""

    def __init__(self, owner: str, how: str) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.register_buffer("buf", torch.arange(6.0).view(2, 3))
        self.w = nn.Parameter(torch.arange(6.0).view(2, 3) - 2)
        self.mem = torch.arange(6.0).view(2, 3) + 1
        self.owner, self.how = owner, how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = getattr(self, self.owner)
        v = t.view(-1)  # made before the write
        with torch.no_grad():
            if self.how == "data.mul_":
                t.data.mul_(2)
            elif self.how == "data[0] =":
                t.data[0] = 7
            elif self.how == "out=data":
                torch.mul(t.data, 3, out=t.data)
            else:  # "data =": new storage, the view keeps the old
                t.data = t * 10
        return self.lin(x) + v + t.reshape(-1)


@pytest.mark.parametrize("how", ["data.mul_", "data[0] =", "out=data", "data ="])
@pytest.mark.parametrize("owner", ["buf", "w", "mem"])
def test_a_view_taken_before_a_data_write_validates(owner: str, how: str) -> None:
    """The view read after the write re-runs on what it read (it used to re-run on its
    value before an in-place write through ``.data``, a false mismatch); a replay equals
    a plain second forward; a corrupted activation is still caught."""
    torch.manual_seed(0)
    model = ViewThenData(owner, how)
    x, x2 = torch.randn(2, 6), torch.randn(2, 6)
    with torch.no_grad():  # the oracle, by hand: what the view and the owner hold after
        old = getattr(model, owner).detach().reshape(-1).clone()
        new = {"data.mul_": old * 2, "data[0] =": old, "out=data": old * 3, "data =": old * 10}
        new = new[how].clone()
        if how == "data[0] =":
            new[:3] = 7
        view = old if how == "data =" else new
        want = x @ model.lin.weight.t() + model.lin.bias + view + new
    twin = copy.deepcopy(model)
    _same(twin(x), want)  # the hand computation is the model's
    tr = lurker.trace(model, x)
    _same(tr.output, want)
    for _ in range(2):
        report = tr.validate()
        assert report.output_checked and report.checked == len(tr.compute_ops)
    _same(tr.run(x2).output, twin(x2))  # both a second forward, from the state one left
    add = next(op for op in tr.compute_ops if op.name == "add")  # lin(x) + v
    add.activation.add_(1)
    with pytest.raises(ValidationError, match=add.label):
        tr.validate()


def test_a_parameter_replaced_with_another_shape_is_reported() -> None:
    class Grows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(2, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x @ self.table.t()
            self.table.data = torch.cat([self.table.detach(), x[:1].detach()])
            return y

    model = Grows()
    tr = lurker.trace(model, torch.randn(1, 3))
    assert tr.state_changes == ["parameter table replaced (p.data = ..., (2, 3) -> (3, 3))"]
    assert tr.validate().output_checked
    assert model.table.shape == (3, 3)  # as the traced forward left it


@pytest.mark.parametrize("how", ["narrowed", "transposed"])
def test_a_parameter_replaced_by_a_view_of_its_own_storage_is_reported(how: str) -> None:
    """``p.data = p.data[:k]`` or ``p.data.t()`` keeps the data pointer (the view starts
    where the storage does); the shape or strides change. It is a replacement as any other:
    named with its shapes, and validation re-runs the ops before it on the value going in
    (it used to go unnoticed, and validation failed on a shape mismatch)."""

    class Views(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3 if how == "transposed" else 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x @ self.w.t()
            self.w.data = self.w.data[:2] if how == "narrowed" else self.w.data.t()
            return y[:, :2] + x @ self.w[:2].t()

    torch.manual_seed(0)
    model = Views()
    x = torch.randn(2, model.w.shape[1])
    twin = copy.deepcopy(model)
    want = twin(x)
    ptr = model.w.data_ptr()
    tr = lurker.trace(model, x)
    _same(tr.output, want)
    assert model.w.data_ptr() == ptr  # the case: a new tensor, the same data pointer
    shapes = "" if how == "transposed" else ", (3, 4) -> (2, 4)"
    assert tr.state_changes == [f"parameter w replaced (p.data = ...{shapes})"]
    report = tr.validate()
    assert report.output_checked and report.checked == len(tr.compute_ops)
    torch.testing.assert_close(model.w.detach(), twin.w.detach(), rtol=0, atol=0)


class TwoWays(nn.Module):
    """Both branches call a linear layer: the same callables, other parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return torch.relu(self.a(x))
        return torch.relu(self.b(x))


def test_a_branch_that_runs_the_same_calls_the_other_way_is_named():
    """An input that takes the other branch runs module b where the trace ran a: the
    replay must not hand b's output over as a's, nor let a hook on "a" change b."""
    torch.manual_seed(0)
    model = TwoWays()
    tr = lurker.trace(model, torch.ones(2, 4))
    same_way = torch.full((3, 4), 2.0)
    torch.testing.assert_close(tr.run(same_way)["a"], model.a(same_way).detach())
    for run in (
        lambda x: tr.run(x),
        lambda x: tr.run(x, hooks={"a": lambda op, out: out * 0}),
    ):
        with pytest.raises(GraphChangedError) as err:
            run(-torch.ones(2, 4))
        msg = str(err.value)
        assert "bool_1 (bool at " in msg and "read False where the trace read True" in msg
        assert "depends on the data" in msg

    # a readout that is a value, not a decision, may differ
    class Scale(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x.max().item()

    tr = lurker.trace(Scale(), torch.ones(2))
    torch.testing.assert_close(tr.run(torch.tensor([1.0, 3.0])).output, torch.tensor([3.0, 9.0]))


def test_a_branch_that_runs_no_ops_replays_whichever_way_it_goes():
    """A truth value read only to warn or print (HF's padding check, a NaN guard) may read
    otherwise on new data: the ops that follow are the traced ones with their parameters,
    so the replay goes on and equals the model; a branch into other ops is still named."""
    import warnings

    class Guarded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.abs().max() > 4:
                warnings.warn("large input", stacklevel=2)
            if torch.isnan(x).any():
                print("nan")
            return self.fc(x).relu()

    torch.manual_seed(0)
    model = Guarded()
    tr = lurker.trace(model, torch.ones(2, 4))
    big = torch.full((5, 4), 9.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(tr.run(big).output, model(big).detach())
        torch.testing.assert_close(tr.run(big)["fc"], model.fc(big).detach())

    class Other(nn.Module):  # the other branch runs another op after the same decision
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.relu() if x.sum() > 0 else x.sigmoid()

    tr = lurker.trace(Other(), torch.ones(2))
    with pytest.raises(GraphChangedError, match=r"bool_1 .* read False where the trace read "
                       r"True, then call #\d+ was sigmoid where the trace recorded relu_1"):  # fmt: skip
        tr.run(-torch.ones(2))


def test_a_path_that_changes_with_the_input_shape_names_the_shapes():
    class PerRow(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(x.shape[0]):
                x = x + 1
            return x

    tr = lurker.trace(PerRow(), torch.randn(2, 3))
    for n in (1, 3):
        with pytest.raises(GraphChangedError, match=rf"\({n}, 3\) where the trace had \(2, 3\)"):
            tr.run(torch.randn(n, 3))


def test_a_path_that_changes_with_a_count_argument_names_the_argument():
    """A forward looping over a count it is passed (``model(x, steps)``) takes another
    path when the count differs: the error names the argument and both values, instead of
    blaming the model's state because the tensors are the traced ones."""

    class Steps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, steps: int, mode: str = "a") -> torch.Tensor:
            for _ in range(steps):
                x = torch.tanh(self.block(x))
            return x

    model = Steps()
    x = torch.randn(2, 4)
    tr = lurker.trace(model, x, 3)
    x5 = torch.randn(5, 4)
    _same(tr.run(x5, steps=3).output, model(x5, 3))  # the same count replays
    for call in ((x, 5), (torch.randn(3, 4), 2)):
        with pytest.raises(GraphChangedError) as err:
            tr.run(*call)
        msg = str(err.value)
        assert f"argument 'steps' is {call[1]} where the trace was recorded with 3" in msg
        assert "model's state" not in msg and "'mode'" not in msg


def test_a_model_made_under_inference_mode_is_named_not_blamed():
    """Parameters made under inference_mode have no version counter: the trace cannot
    run, and says why (not as the model's own error at an op inside lurker)."""
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    for ctx in (contextlib.nullcontext(), torch.inference_mode()):
        with ctx, pytest.raises(LurkerError, match=r"0\.weight, 0\.bias were made under torch"):
            lurker.trace(model, torch.randn(1, 3))


def test_inference_mode_and_inference_tensors_trace_validate_and_replay():
    """Under torch.inference_mode, and with inputs made there (inference tensors have no
    version counter, by which in-place ops are told): the same graph and values as under
    no_grad, and replays equal the model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = lurker.trace(model, x)
    with torch.inference_mode():
        xi = x.clone()
        traces = [lurker.trace(model, xi)]
        assert traces[0].validate().output_checked
    traces.append(lurker.trace(model, xi))  # an inference tensor, outside inference mode
    x2 = torch.randn(3, 3, 6, 6)
    for tr in traces:
        assert [op.label for op in tr] == [op.label for op in ref]
        assert tr["relu_1"].inplace
        for op in ref:
            if op.activation is not None:
                assert torch.equal(tr[op.label].activation, op.activation), op.label
        with torch.inference_mode():
            out = tr.run(x2, hooks={"1": lambda op, h: h * 0 + 1}).output
            torch.testing.assert_close(tr.run(x2).output, model(x2))
        torch.testing.assert_close(out, torch.ones(3, 4, 4, 4))


# ---------------------------------------------------------------- autograd.grad in forward
class InnerLoop(nn.Module):
    """MAML-style: one gradient step on an inner loss, inside forward."""

    def __init__(self, own_grad_mode: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.own_grad_mode = own_grad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # without its own enable_grad, it needs the caller's grad mode (the trace's)
        with torch.enable_grad() if self.own_grad_mode else contextlib.nullcontext():
            w = self.w
            loss = (x @ w).pow(2).mean()
            (g,) = torch.autograd.grad(loss, w, create_graph=True)
            w = w - 0.1 * g
        return x @ w


@pytest.mark.parametrize("own_grad_mode", [True, False])
def test_autograd_grad_inside_forward_is_reported_not_a_mismatch(own_grad_mode):
    torch.manual_seed(0)
    model = InnerLoop(own_grad_mode)
    x = torch.randn(3, 4)
    tr, report = _check(model, x, torch.randn(3, 4), atol=1e-5)
    grad = tr.find("grad")[0]
    assert "autograd" in report.skipped[grad.label]
    assert report.checked == len(tr.compute_ops) - 1  # every other op compared
    # the gradient the trace saved is the one autograd gives
    w = model.w.detach().requires_grad_()
    (g,) = torch.autograd.grad((x @ w).pow(2).mean(), w)
    torch.testing.assert_close(grad.activation, g)


# ---------------------------------------------------------------- caches filled in forward
class CachedBias(nn.Module):
    """timm LeViT's pattern: in eval mode, the attention bias is indexed once and cached."""

    def __init__(self) -> None:
        super().__init__()
        self.biases = nn.Parameter(torch.randn(2, 5))
        self.register_buffer("idx", torch.tensor([[0, 1, 2], [3, 4, 0], [1, 2, 3]]))
        self.cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> CachedBias:
        super().train(mode)
        self.cache = {}
        return self

    def bias(self) -> torch.Tensor:
        if self.training:
            return self.biases[:, self.idx]
        if "cpu" not in self.cache:
            self.cache["cpu"] = self.biases[:, self.idx]
        return self.cache["cpu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(1) @ x.unsqueeze(1).transpose(-1, -2) + self.bias()).softmax(-1)


def test_graph_that_depends_on_the_models_state_says_so():
    torch.manual_seed(0)
    # no grad: the cached bias is then a leaf tensor, which the oracle's deepcopy needs
    model = nn.Sequential(nn.Linear(3, 3), CachedBias()).eval().requires_grad_(False)
    x = torch.randn(2, 3, 3)
    tr = lurker.trace(model, x)  # the first eval forward fills the cache
    report = tr.validate()
    assert report.state_changes == ["attribute 1.cache (dict) changed from 0 to 1 items"]
    assert len(model[1].cache) == 1  # validation's own forward did not leave another state
    for inp in (x, torch.randn(2, 3, 3)):
        with pytest.raises(GraphChangedError) as err:
            tr.run(inp)
        msg = str(err.value)
        assert "1.cache" in msg and "model's state, not on the data" in msg
        assert "Trace the model again" in msg
    # traced again, the graph is the one later forwards run
    _check(model, x, torch.randn(2, 3, 3))
    # state changed after the trace: the traced input itself takes another path
    tr = lurker.trace(model, x)
    model.train().eval()  # empties the cache
    with pytest.raises(GraphChangedError, match="input the trace was made with"):
        tr.run(x)


def test_timm_levit_replays_after_retrace():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("levit_128", pretrained=False, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    tr = lurker.trace(model, x)
    assert any("attention_bias_cache" in c for c in tr.validate().state_changes)
    with pytest.raises(GraphChangedError, match="model's state, not on the data"):
        tr.run(x)
    tr = lurker.trace(model, x)  # the caches are full now: this graph is stable
    x2 = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x2)
    _same(tr.run(x2).output, want, atol=1e-5)
