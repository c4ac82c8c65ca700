"""``max_memory=``: a trace stops with a clear error before its saved activations pass a
budget, instead of the kernel killing the process."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import lurker
from lurker.capture import _memory


class Net(nn.Module):
    """Fresh outputs, an in-place op (the trace keeps a copy of what it overwrites), views
    (no new memory), a reshape that copies, a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 5)
        self.seen: weakref.ref | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        self.seen = weakref.ref(y)
        y = torch.relu_(y)  # in place: the same storage
        z = self.conv2(y).sigmoid()
        z = z.transpose(2, 3)  # a view
        return self.fc(z.flatten(1))


def _new_storage_bytes(tr: lurker.Trace, x: torch.Tensor, model: nn.Module) -> int:
    """Oracle: bytes of the distinct storages the saved activations hold, less the input's
    and the parameters' (which the trace does not allocate)."""
    known = {x.untyped_storage().data_ptr()}
    known |= {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    for op in tr.compute_ops:
        a = op.activation
        for t in () if a is None else a if isinstance(a, tuple) else (a,):
            s = t.untyped_storage()
            if s.data_ptr() not in known:
                seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _nothing_installed() -> None:
    assert torch.overrides._get_current_function_mode_stack() == []
    assert gc.isenabled()


def test_budget_counts_new_storage_exactly_and_stops_with_a_clear_error():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    full = lurker.trace(model, x, max_memory=None)
    total = _new_storage_bytes(full, x, model)
    assert total > 0
    # exactly the total fits ...
    tr = lurker.trace(model, x, max_memory=total)
    assert tr.complete
    torch.testing.assert_close(tr.output, full.output)
    # ... one byte less does not
    with pytest.raises(lurker.MemoryLimitError) as info:
        lurker.trace(model, x, max_memory=total - 1)
    err = info.value
    _nothing_installed()
    assert isinstance(err, lurker.TraceError)
    assert err.saved_bytes == total and err.limit == total - 1
    last = err.failed_op
    assert last == "linear_1"  # the last op that allocates
    text = str(err)
    for part in (last, "module 'fc'", "max_memory=", "save=", "transform=", "max_memory=None"):
        assert part in text, part
    assert f"{total / 1024:.1f} KiB" in text
    # the partial graph is there, its activations are freed (nothing holds them)
    assert [op.label for op in err.partial.compute_ops][-1] == last
    assert all(op.activation is None for op in err.partial.ops)
    assert model.seen is not None and model.seen() is None


def test_error_at_the_first_op_past_the_budget():
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    conv_bytes = 2 * 4 * 16 * 16 * 4
    with pytest.raises(lurker.MemoryLimitError) as info:
        lurker.trace(model, x, max_memory=conv_bytes + 1)
    # conv2d_1 fits; relu_ overwrites it, so the trace keeps a copy: past the budget
    assert info.value.failed_op == "relu__1"
    assert info.value.saved_bytes == 2 * conv_bytes
    assert "after 2 ops" in str(info.value)
    _nothing_installed()


def test_what_is_saved_is_what_counts():
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    budget = 2 * 4 * 16 * 16 * 4  # one conv output
    # transform=: the reduced copies are counted, not the outputs
    tr = lurker.trace(model, x, transform=lambda t: t.flatten(1).mean(1), max_memory=budget)
    assert tr.complete
    # save=: only the selected ops
    tr = lurker.trace(model, x, save=["conv"], max_memory=budget)
    assert tr["conv"].activation is not None
    with pytest.raises(lurker.MemoryLimitError):
        lurker.trace(model, x, save=["conv", "conv2"], max_memory=budget)
    # nothing saved: no limit applies
    assert lurker.trace(model, x, save="none", max_memory=1).complete


def test_a_model_that_swallows_exceptions_is_still_stopped():
    class Swallows(nn.Module):
        def forward(self, x):
            try:
                return torch.relu(x * 2)
            except Exception:
                return x

    with pytest.raises(lurker.MemoryLimitError):
        lurker.trace(Swallows(), torch.randn(100), max_memory=10)
    _nothing_installed()


def test_auto_budget_is_a_fraction_of_available_memory(monkeypatch):
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    monkeypatch.setattr(_memory, "AUTO_FIRST_CHECK", 1000)
    calls = []
    monkeypatch.setattr(_memory, "available_bytes", lambda device: calls.append(device) or 10_000)
    # the first conv output (8 KiB) passes the first check: the budget is then measured,
    # once, as 80% of (available now + saved so far); relu_'s copy passes it
    with pytest.raises(lurker.MemoryLimitError) as info:
        lurker.trace(model, x)
    assert calls == [torch.device("cpu")]
    assert "80% of the" in str(info.value) and "available on cpu" in str(info.value)
    assert info.value.failed_op == "relu__1"
    assert info.value.limit == int(0.8 * (10_000 + 8192))
    # where the available memory cannot be told, no guard rather than a wrong one
    monkeypatch.setattr(_memory, "available_bytes", lambda device: None)
    assert lurker.trace(model, x).complete


def test_a_fraction_asked_for_is_enforced_however_small(monkeypatch):
    """max_memory=0.1 of 10 kB available is 1 kB: checked from the first saved tensor (it
    waited for 256 MiB saved, the default's first check, and never stopped a small trace);
    the default still reads nothing for a small trace."""
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    calls = []
    monkeypatch.setattr(_memory, "available_bytes", lambda device: calls.append(device) or 10_000)
    with pytest.raises(lurker.MemoryLimitError) as info:
        lurker.trace(model, x, max_memory=0.1)
    assert calls == [torch.device("cpu")] and info.value.failed_op == "conv2d_1"
    assert "10% of the" in str(info.value)
    calls.clear()
    assert lurker.trace(model, x).complete and calls == []  # "auto": under its first check


def test_available_bytes_on_cpu_is_plausible():
    n = _memory.available_bytes(torch.device("cpu"))
    assert n is not None and 0 < n < 2**50


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2GB", (2 * 10**9, None)),
        ("512MiB", (512 * 2**20, None)),
        (1000, (1000, None)),
        ("1000", (1000, None)),
        (np.int64(1000), (1000, None)),
        ("1.5kB", (1500, None)),
        (0.5, (None, 0.5)),
        ("auto", (None, _memory.AUTO_FRACTION)),
        (None, (None, None)),
        ("off", (None, None)),
    ],
)
def test_max_memory_values(value, expected):
    assert _memory.parse_max_memory(value) == expected


@pytest.mark.parametrize("value", [0, -5, "lots", True, 1.5, "3 parsecs", "0.5", "0B", [1]])
def test_bad_max_memory_is_a_clear_error(value):
    with pytest.raises(lurker.LurkerError, match=r"max_memory=.*not understood.*'2GB'"):
        lurker.trace(nn.ReLU(), torch.randn(3), max_memory=value)
    _nothing_installed()


def test_dropped_provisional_saves_leave_the_budget():
    """save=[module] keeps every op inside it provisionally, and drops the ones that turn
    out not to be its output as their calls end: their bytes must leave the total too, or
    a big batch is refused although what is held fits."""
    torch.manual_seed(0)
    n = 6
    blocks = [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(n)]
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(*blocks), nn.Flatten())
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    one = 2 * 4 * 8 * 8 * 4  # bytes of one conv or relu output
    with torch.no_grad():
        expected = model[1](model[0](x))
    alive: list[weakref.ref] = []
    for b in blocks:  # the convs' outputs: each block's relu reads it, then it is dropped
        b[0].register_forward_hook(lambda m, i, o: alive.append(weakref.ref(o)))
    held: list[int] = []
    # in the last block's relu: are the earlier convs' outputs really freed? (an oracle
    # independent of the count: nothing else holds them)
    blocks[-1][1].register_forward_hook(
        lambda m, i, o: held.append(sum(r() is not None for r in alive))
    )
    with torch.no_grad():
        full = lurker.trace(model, x, save=["1"], max_memory=None)
    assert _new_storage_bytes(full, x, model) == one  # kept at the end: the output
    torch.testing.assert_close(full["1"].activation, expected)
    assert held == [1]  # only the last conv's output is alive there
    # at that peak the trace holds the n block outputs so far (kept until the saved call
    # ends) and the last conv's: n + 1 outputs. The guard counted every op inside
    # (2n outputs) before it took dropped saves off.
    with torch.no_grad():
        tr = lurker.trace(model, x, save=["1"], max_memory=(n + 1) * one)
    assert tr.complete
    torch.testing.assert_close(tr["1"].activation, full["1"].activation)
    with pytest.raises(lurker.MemoryLimitError) as info, torch.no_grad():
        lurker.trace(model, x, save=["1"], max_memory=(n + 1) * one - 1)
    assert info.value.saved_bytes == (n + 1) * one
    assert "save= names module '1', and until its call returns" in str(info.value)
    _nothing_installed()


def test_detach_and_data_share_their_input_storage_and_add_nothing():
    """``y.detach()``, ``y.data`` and ``aten.alias`` are new tensors on ``y``'s storage (not
    views: no ``_base``): counting them as new memory refused traces that fit."""

    class Detaching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            target = y.detach()  # a stop-gradient target, as in self-distillation
            z = y.data
            w = torch.ops.aten.alias(y)
            return (y - target) + z * w

    torch.manual_seed(0)
    model, x = Detaching().eval(), torch.randn(2, 3, 16, 16)
    full = lurker.trace(model, x, max_memory=None)
    total = _new_storage_bytes(full, x, model)  # conv, sub, mul, add: 4 outputs
    assert total == 4 * 2 * 4 * 16 * 16 * 4
    tr = lurker.trace(model, x, max_memory=total)
    assert tr.complete
    torch.testing.assert_close(tr.output, full.output)
    with pytest.raises(lurker.MemoryLimitError) as info:
        lurker.trace(model, x, max_memory=total - 1)
    assert info.value.saved_bytes == total and info.value.failed_op == "add_1"


# ------------------------------------------------------------------ Trace.run


def _fresh_model() -> nn.Sequential:
    """Every op makes a new tensor (no views, nothing in place): the bytes a run keeps
    are the sum of its ops' outputs, which forward hooks see independently."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(8, 4, 3, padding=1),
        nn.Tanh(),
    ).eval()


def _cumulative_output_bytes(model: nn.Module, x: torch.Tensor) -> list[tuple[str, int]]:
    """Oracle: (module path, bytes of every output so far) from a plain forward."""
    seen: list[tuple[str, int]] = []
    handles = [
        m.register_forward_hook(lambda m, i, o, name=name: seen.append((name, o.nbytes)))
        for name, m in model.named_children()
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    total, out = 0, []
    for name, n in seen:
        total += n
        out.append((name, total))
    return out


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("hooked", [False, True])
def test_run_stops_past_max_memory_and_the_trace_stays_usable(hooked):
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    made: list[weakref.ref] = []  # the conv's output's memory, run by run
    model.conv.register_forward_hook(lambda m, i, o: made.append(weakref.ref(o.untyped_storage())))
    tr = lurker.trace(model, x)
    seen = model.seen
    before = _state(model)
    conv_bytes = 8 * 4 * 16 * 16 * 4  # conv2d_1's output at batch 8
    big = torch.randn(8, 3, 16, 16)
    # a hook that changes nothing: with hooks, every kept value is a copy (counted too)
    hooks = {"conv2d_2": lambda op, o: None} if hooked else None
    with pytest.raises(lurker.MemoryLimitError) as info:
        tr.run(big, save="all", hooks=hooks, max_memory=conv_bytes + 1)
    err = info.value
    _nothing_installed()
    assert isinstance(err, lurker.TraceError)
    if hooked:  # every value is a copy, the input's too (24 KiB): conv2d_1 passes
        op, saved, said = (
            "conv2d_1",
            big.nbytes + conv_bytes,
            "op conv2d_1 (conv2d) in module 'conv'",
        )
    else:  # conv2d_1 fits; relu_ overwrites it in place, so the run keeps a copy: past it
        op, saved, said = "relu__1", 2 * conv_bytes, "op relu__1 (relu_)"
    assert err.failed_op == op
    assert (err.saved_bytes, err.limit) == (saved, conv_bytes + 1)
    text = str(err)
    for part in (
        "Trace.run of Net",
        said,
        f"{saved / 1024:.1f} KiB",  # saved so far ...
        "past the limit of 32.0 KiB (max_memory=32,769 bytes)",  # ... vs the limit, basis
        "smaller batch",
        "save=",
        "transform=",
        "max_memory=None",
    ):
        assert part in text, part
    # the values kept so far are freed: nothing holds the run's first conv output
    # (with hooks the run stops inside that conv's call, before its module hook)
    assert len(made) == (1 if hooked else 2)  # the trace's own, then the run's
    assert all(r() is None for r in made[1:])
    # the model is as it was: its tensors, and the attribute its forward reassigns
    assert _same_state(before, _state(model)) and model.seen is seen
    # the trace is usable: a smaller batch, or fewer ops saved, runs
    with torch.no_grad():
        expected = model(big)
    small = tr.run(big[:1], save="all", hooks=hooks, max_memory=conv_bytes + 1)
    torch.testing.assert_close(small.output, expected[:1])
    fewer = tr.run(big, save=["fc"], hooks=hooks, max_memory=conv_bytes + 1)
    torch.testing.assert_close(fewer["fc"], expected)
    torch.testing.assert_close(tr.run(big).output, expected)  # the trace's "auto"


def test_a_stopped_run_puts_back_the_running_statistics_it_updated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    tr = lurker.trace(model, x)  # in training mode: the batch norm counts batches too
    before = _state(model)
    big = torch.randn(8, 3, 8, 8)
    one = 8 * 8 * 8 * 8 * 4  # one op's output at batch 8
    # conv, the batch count (a copy of an 8-byte buffer) and batch norm fit (it updated
    # its statistics); relu does not
    with (
        pytest.warns(UserWarning, match="training mode"),
        pytest.raises(lurker.MemoryLimitError) as info,
    ):
        tr.run(big, max_memory=2 * one + 8)
    assert info.value.failed_op == "relu_1"
    assert _same_state(before, _state(model))
    with pytest.warns(UserWarning, match="training mode"):
        tr.run(big, max_memory=3 * one + 8)  # fits: the statistics move, as a forward's do
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    assert model[1].num_batches_tracked.item() == 2  # the trace's forward, then this


def test_auto_run_budget_is_measured_once_and_stops_at_the_right_op(monkeypatch):
    model, x = _fresh_model(), torch.randn(2, 3, 12, 12)
    tr = lurker.trace(model, x, max_memory=None)
    big = torch.randn(6, 3, 12, 12)
    cumulative = _cumulative_output_bytes(model, big)
    first_check, available = 1000, 30_000
    monkeypatch.setattr(_memory, "AUTO_FIRST_CHECK", first_check)
    calls: list[torch.device] = []
    monkeypatch.setattr(
        _memory, "available_bytes", lambda device: calls.append(device) or available
    )
    # the oracle: measured when the total first passes the first check, as 80% of what
    # is available then plus what the run kept; the run stops at the first op past it
    measured_at = next(total for _, total in cumulative if total > first_check)
    limit = int(0.8 * (available + measured_at))
    stop, saved = next((name, total) for name, total in cumulative if total > limit)
    assert stop not in (cumulative[0][0], cumulative[-1][0])  # a mid-model stop
    kept: list[weakref.ref] = []  # the memory of the first op's output
    model[0].register_forward_hook(lambda m, i, o: kept.append(weakref.ref(o.untyped_storage())))
    with pytest.raises(lurker.MemoryLimitError) as info:
        tr.run(big, save="all", max_memory="auto")
    err = info.value
    assert len(kept) == 1 and kept[0]() is None  # kept by the run as is, then freed
    assert calls == [torch.device("cpu")]
    assert err.failed_op == tr[stop].label
    assert (err.saved_bytes, err.limit) == (saved, limit)
    assert "80% of the" in str(err) and "available on cpu when the run started" in str(err)
    # where available memory cannot be told: no guard rather than a wrong one
    monkeypatch.setattr(_memory, "available_bytes", lambda device: None)
    assert tr.run(big, save="all", max_memory="auto").output.shape == (6, 4, 12, 12)


def test_runs_default_to_the_max_memory_the_trace_was_made_with(monkeypatch):
    model, x = _fresh_model(), torch.randn(2, 3, 12, 12)
    big = torch.randn(6, 3, 12, 12)
    total = _cumulative_output_bytes(model, big)[-1][1]
    monkeypatch.setattr(_memory, "AUTO_FIRST_CHECK", 0)
    calls: list[torch.device] = []
    monkeypatch.setattr(_memory, "available_bytes", lambda device: calls.append(device) or 1)
    # traced with max_memory=None: its runs are not stopped, nor is memory read
    unguarded = lurker.trace(model, x, max_memory=None)
    assert unguarded.run(big, save="all").output.shape == (6, 4, 12, 12)
    assert calls == []
    with pytest.raises(lurker.MemoryLimitError):  # the same run, asking for "auto"
        unguarded.run(big, save="all", max_memory="auto")
    # traced with a size: a run of a batch whose values pass it stops by default
    sized = lurker.trace(model, x, max_memory=total - 1)  # batch 2 fits
    with pytest.raises(lurker.MemoryLimitError) as info:
        sized.run(big, save="all")
    assert info.value.limit == total - 1
    assert sized.run(big, save="all", max_memory=total).output.shape == (6, 4, 12, 12)


def test_runs_that_keep_nothing_are_never_stopped():
    """The probe's sweep, unit images and the explorer's live view run save="none" with
    hooks that keep what they need (and bound it themselves): the guard counts nothing."""
    model, x = _fresh_model(), torch.randn(2, 3, 12, 12)
    tr = lurker.trace(model, x, save=["5"], max_memory=5000)  # its output: 4,608 bytes
    big = torch.randn(6, 3, 12, 12)
    got: list[torch.Tensor] = []
    out = tr.run(big, save="none", hooks={"2": lambda op, o: got.append(o)})
    assert out.output.shape == (6, 4, 12, 12) and got[0].shape == (6, 8, 12, 12)
    with pytest.raises(lurker.MemoryLimitError):  # what the trace saves, it counts
        tr.run(big)


def test_a_model_that_swallows_the_signal_is_still_stopped_in_a_run():
    class Swallows(nn.Module):
        def forward(self, x):
            try:
                return torch.relu(x * 2)
            except Exception:
                return x

    tr = lurker.trace(Swallows(), torch.randn(10))
    with pytest.raises(lurker.MemoryLimitError) as info:
        tr.run(torch.randn(100), max_memory=10)
    assert info.value.failed_op == "mul_1"
    _nothing_installed()


@pytest.mark.parametrize("value", [0, -5, "lots", True, 1.5, "3 parsecs", "0.5", "0B", [1]])
def test_bad_max_memory_in_a_run_is_the_same_clear_error(value):
    model, x = _fresh_model(), torch.randn(2, 3, 12, 12)
    tr = lurker.trace(model, x)
    with pytest.raises(lurker.LurkerError, match=r"max_memory=.*not understood.*'2GB'"):
        tr.run(x, max_memory=value)
    _nothing_installed()
    assert tr.run(x).output.shape == (2, 4, 12, 12)


class _Detached(nn.Module):
    """A conv's output kept twice over: as it is, and through ``detach()`` (no ``_base``,
    the same storage), then written in place (the run keeps a copy of what it overwrites)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        d = torch.relu(y.detach())
        d.add_(1)
        return y[:, :2].sum() + d.mean()


def test_a_run_counts_each_storage_it_keeps_once_so_a_run_that_fits_runs():
    """Oracle: the distinct storages a finished run's values hold (not the input's or
    the parameters'). That many bytes fit; one fewer stops the run. A ``detach()`` shares
    its storage with no ``_base`` to say so: counted again, a run that fits was stopped."""
    torch.manual_seed(0)
    model, x = _Detached().eval(), torch.randn(2, 3, 8, 8)
    tr = lurker.trace(model, x[:1], max_memory=None)
    acts = tr.run(x, save="all", max_memory=None)
    known = {x.untyped_storage().data_ptr()}
    known |= {p.untyped_storage().data_ptr() for p in model.parameters()}
    held: dict[int, int] = {}
    for i, v in acts._values.items():
        if tr.ops[i].kind == "output":  # the output is the caller's, kept or not
            continue
        for t in v if isinstance(v, tuple) else (v,):
            s = t.untyped_storage()
            if s.data_ptr() not in known:
                held[s.data_ptr()] = s.nbytes()
    total = sum(held.values())
    assert total >= 2 * 8 * 8 * 8 * 4 * 2  # the conv's output and the relu's copy at least
    got = tr.run(x, save="all", max_memory=total)
    torch.testing.assert_close(got["detach_1"], acts["detach_1"])
    with pytest.raises(lurker.MemoryLimitError):
        tr.run(x, save="all", max_memory=total - 1)
