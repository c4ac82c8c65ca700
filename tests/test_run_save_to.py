"""``Trace.run`` keeps its values where the trace's ``save_to=`` says, as the trace does,
and its memory guard counts them against that device's memory.

No GPU here: a model on the ``meta`` device stands for one on a GPU (its tensors live
elsewhere than the CPU), and :func:`_replay.to_device` is patched to "move" a meta tensor
to the CPU (a zero tensor of its shape there), recording what it is asked to move and
where. The tests marked ``cuda`` run the same on a real GPU where there is one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lurker
from lurker.capture import _memory, _replay

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Net(nn.Module):
    """A fresh output, an in-place op over it (a value kept as made must be copied before
    it), a view, a two-output op (``chunk``) and a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(2 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu_(self.conv(x))
        a, _ = y.chunk(2, dim=1)
        return self.fc(a.transpose(2, 3).flatten(1))


def _tensors(value: object) -> list[torch.Tensor]:
    return list(value) if isinstance(value, tuple) else [value]  # type: ignore[list-item]


@pytest.fixture
def moves(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, ...], str, str]]:
    """Every call of ``to_device``: (shape, from, to). A meta tensor "moves" to a new
    zero tensor on the CPU; any other is moved as the real function moves it."""
    calls: list[tuple[tuple[int, ...], str, str]] = []
    real = _replay.to_device

    def fake(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        calls.append((tuple(t.shape), str(t.device), str(device)))
        if t.device.type == "meta" and device.type != "meta":
            return torch.zeros(t.shape, dtype=t.dtype, device=device)
        return real(t, device)

    monkeypatch.setattr(_replay, "to_device", fake)
    return calls


def _meta_trace(**kw: object) -> tuple[Net, lurker.Trace]:
    model = Net().to("meta").eval()
    # save="none": the trace itself keeps nothing (a meta value has no data to copy)
    return model, lurker.trace(model, torch.randn(2, 3, 8, 8, device="meta"), save="none", **kw)


@pytest.mark.parametrize("hooked", [False, True])
def test_a_run_keeps_every_value_on_save_to_and_the_output_where_it_was_made(moves, hooked):
    _, tr = _meta_trace(save_to="cpu")
    x = torch.randn(4, 3, 8, 8, device="meta")
    seen: list[torch.Tensor] = []
    hooks = {"linear_1": lambda op, o: seen.append(o)} if hooked else None
    acts = tr.run(x, save="all", hooks=hooks)
    kept = [t for v in acts.values() for t in _tensors(v)]
    # inputs, every op's output (both of chunk's), the output node: all on the CPU
    assert set(acts) == {op.label for op in tr.ops if op.kind in ("input", "op", "output")}
    assert {str(t.device) for t in kept} == {"cpu"}
    assert [t.shape for t in _tensors(acts["chunk_1"])] == [(4, 2, 8, 8)] * 2
    # each passed to_device once, asked for the CPU, from the meta device it was made on
    assert len(moves) == len(kept)
    assert {(frm, to) for _, frm, to in moves} == {("meta", "cpu")}
    # the model's return value is its own: where the model made it (not a saved value)
    assert acts.output.device.type == "meta" and acts.output.shape == (4, 5)
    if hooked:  # the caller's hook saw the live value, on the model's device
        assert seen[0].device.type == "meta"


def test_transform_runs_first_and_its_result_is_what_moves(moves):
    _, tr = _meta_trace(save_to="cpu", transform=lambda t: t.flatten(1).sum(1))
    acts = tr.run(torch.randn(4, 3, 8, 8, device="meta"), save=["conv", "fc"])
    assert acts["conv"].shape == (4,) and acts["conv"].device.type == "cpu"
    # (the output node's value is the model's output, untransformed, as without save_to=)
    assert sorted(moves) == sorted(
        [((4,), "meta", "cpu"), ((4,), "meta", "cpu"), ((4, 5), "meta", "cpu")]
    )


def test_without_save_to_nothing_moves(moves):
    _, tr = _meta_trace()
    acts = tr.run(torch.randn(4, 3, 8, 8, device="meta"), save="all")
    assert moves == []
    assert {t.device.type for v in acts.values() for t in _tensors(v)} == {"meta"}


def test_values_already_on_save_to_are_not_copied_and_stay_right():
    """``save_to="cpu"`` of a CPU model: each value is the tensor the model made (its
    storage, as a forward hook sees it), copied only where the model then overwrites it,
    exactly as a run of a trace made without ``save_to=``."""
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    made: dict[str, torch.Tensor] = {}  # (the model's hooks: traced, and run, with it)
    model.fc.register_forward_hook(lambda m, i, o: made.update(fc=o))
    model.conv.register_forward_hook(lambda m, i, o: made.update(conv=o.clone()))
    tr = lurker.trace(model, x, save_to="cpu")
    plain = lurker.trace(model, x)
    big = torch.randn(5, 3, 8, 8)
    acts = tr.run(big, save="all")
    # the fc output is the model's own tensor: the same storage, no copy
    assert acts["fc"].untyped_storage().data_ptr() == made["fc"].untyped_storage().data_ptr()
    assert acts["input_1"].untyped_storage().data_ptr() == big.untyped_storage().data_ptr()
    # the conv's output, which relu_ then overwrote, was copied before: its own values
    torch.testing.assert_close(acts["conv"], made["conv"], rtol=0, atol=0)
    assert (acts["conv"] < 0).any()
    other = plain.run(big, save="all")
    assert set(acts) == set(other)
    for k in acts:
        for a, b in zip(_tensors(acts[k]), _tensors(other[k])):
            assert torch.equal(a, b), k


def _asked(monkeypatch: pytest.MonkeyPatch, free: dict[str, int]) -> list[str]:
    """``available_bytes`` answering per device type; the devices it is asked about."""
    asked: list[str] = []

    def available(device: torch.device) -> int | None:
        asked.append(str(device))
        return free[device.type]

    monkeypatch.setattr(_memory, "available_bytes", available)
    monkeypatch.setattr(_memory, "AUTO_FIRST_CHECK", 0)  # measured at the first value
    return asked


def test_the_guard_counts_against_the_device_values_are_kept_on(moves, monkeypatch):
    x = torch.randn(4, 3, 8, 8, device="meta")
    conv = 4 * 4 * 8 * 8 * 4  # bytes of the conv's output at batch 4
    # plenty of memory on the model's device, little on the CPU: the CPU is what fills
    asked = _asked(monkeypatch, {"meta": 10**12, "cpu": conv})
    _, tr = _meta_trace(save_to="cpu")
    with pytest.raises(lurker.MemoryLimitError) as info:
        tr.run(x, save=["conv", "relu__1", "fc"], max_memory="auto")
    assert asked == ["cpu"]
    err = info.value
    # measured at the conv's value: 80% of (the CPU's free memory + that value) fits
    # it, not relu_'s too (a value of its own, moved from where relu_ overwrote the conv's)
    assert err.failed_op == "relu__1" and err.saved_bytes == 2 * conv
    assert err.limit == int(0.8 * 2 * conv)
    assert "available on cpu when the run started" in str(err)
    assert "save_to=" not in str(err)  # the values are kept in the machine's memory already
    # the same trace without save_to=: the values stay where they are made, and that
    # device's memory is what counts; the error says how to move them off it
    asked.clear()
    _, tr = _meta_trace()
    with pytest.raises(lurker.MemoryLimitError) as info:
        tr.run(x, save="all", max_memory=conv)
    assert asked == []  # a fixed limit measures nothing
    assert "save_to='cpu'" in str(info.value) and "off meta" in str(info.value)
    tr.run(x, save="all", max_memory=0.5)  # half of a terabyte: fits
    assert asked == ["meta"]


class FunctionalNorm(nn.Module):
    """A batch norm written with ``F.batch_norm`` and no batch counter (as many codebases
    write theirs): switching it to ``train()`` after the trace changes no op, only what
    the op writes (its running statistics)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, None, None, self.training)


def test_a_stopped_run_puts_back_what_a_submodule_in_training_mode_wrote():
    """A model in eval() with one norm switched back to train() (test-time adaptation
    does this): the root is not in training mode, the trace saw no write, yet the run
    writes running statistics, which a run stopped by max_memory= must put back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), FunctionalNorm(8), nn.ReLU()).eval()
    tr = lurker.trace(model, torch.randn(2, 3, 8, 8))
    model[1].train()
    assert not model.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    big = torch.randn(8, 3, 8, 8)
    one = 8 * 8 * 8 * 8 * 4  # one op's output at batch 8
    with pytest.raises(lurker.MemoryLimitError) as info:  # conv and the norm fit: not relu
        tr.run(big, max_memory=2 * one)
    assert info.value.failed_op == "relu_1"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    tr.run(big, max_memory=3 * one)  # a run that fits moves them, as a forward's do
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


@cuda
@pytest.mark.parametrize("hooked", [False, True])
def test_on_a_gpu_a_run_with_save_to_cpu_keeps_its_values_off_it(hooked):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(32, 32, 3, padding=1)
    )
    model = model.cuda().eval()
    x = torch.randn(1, 3, 32, 32, device="cuda")
    tr = lurker.trace(model, x, save_to="cpu")
    # the trace's own values, its output node's too, are on the CPU as the runs' are
    kept = [t for op in tr.ops if op.activation is not None for t in _tensors(op.activation)]
    assert {t.device.type for t in kept} == {"cpu"}
    plain = lurker.trace(model, x)
    big = torch.randn(16, 3, 32, 32, device="cuda")
    hooks = {"0": lambda op, o: None} if hooked else None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        acts = tr.run(big, save="all", hooks=hooks)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base
        other = plain.run(big, save="all", hooks=hooks)
    kept = [t for v in acts.values() for t in _tensors(v)]
    assert {t.device.type for t in kept} == {"cpu"}
    assert acts.output.device.type == "cuda"  # the model's own output
    # the GPU holds the run's output, not the 3 values of 16x32x32x32 floats it kept
    assert held <= acts.output.nbytes + 4096 < sum(t.nbytes for t in kept) / 2
    for k in acts:
        for a, b in zip(_tensors(acts[k]), _tensors(other[k])):
            assert torch.equal(a, b.cpu()), k


@cuda
def test_on_a_gpu_the_guard_reads_the_cpus_memory_with_save_to_cpu(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).cuda().eval()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    asked = _asked(monkeypatch, {"cuda": 10**12, "cpu": 10})
    tr = lurker.trace(model, x[:1], save_to="cpu", max_memory=None)
    with pytest.raises(lurker.MemoryLimitError) as info:
        tr.run(x, save="all", max_memory="auto")
    assert asked == ["cpu"] and "save_to=" not in str(info.value)
    asked.clear()
    on_gpu = lurker.trace(model, x[:1], max_memory=None)
    on_gpu.run(x, save="all", max_memory="auto")  # a terabyte free on the GPU: fits
    assert [a.split(":")[0] for a in asked] == ["cuda"]
    with pytest.raises(lurker.MemoryLimitError) as info:
        on_gpu.run(x, save="all", max_memory=100)
    assert "save_to='cpu'" in str(info.value)
