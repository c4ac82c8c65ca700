"""Hooks on a trace's ops (``trace.hooks``, ``trace.run(hooks=...)``), and models that
carry hooks of their own.

Oracles are independent of the replay: a hand-modified copy of the model (weights of a
channel zeroed, an explicit module inserted, a forward written out with the change) run
by plain PyTorch, and autograd on that copy for gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lurker
from lurker.errors import GraphChangedError, LurkerError, OpKeyError

C = 2  # the channel the tests switch off


def _convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    ).eval()


def _zero_channel(_op: lurker.Op, out: Tensor) -> Tensor:
    mask = torch.ones(out.shape[1], device=out.device)
    mask[C] = 0
    return out * mask[:, None, None]


class _Mask(nn.Module):
    """An explicit module that zeroes channel C: the gradient oracle's inserted layer."""

    def forward(self, x: Tensor) -> Tensor:
        return _zero_channel(None, x)  # type: ignore[arg-type]


def _x(seed: int = 1, n: int = 2) -> Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, 3, 8, 8)


@pytest.mark.parametrize("key", ["0", "conv2d_1", 1])
def test_zeroing_a_channel_equals_a_model_with_that_channel_zeroed(key):
    model = _convnet()
    tr = lurker.trace(model, _x(0))
    assert tr[key].label == "conv2d_1"  # (the three keys name one op)
    modified = copy.deepcopy(model)
    with torch.no_grad():
        modified[0].weight[C] = 0
        modified[0].bias[C] = 0
    x = _x()
    with tr.hooks({key: _zero_channel}):
        out = tr.run(x).output
    torch.testing.assert_close(out, modified(x))
    assert not torch.allclose(out, model(x))  # the hook changed something
    # per call, the same
    torch.testing.assert_close(tr.run(x, hooks={key: _zero_channel}).output, modified(x))
    # and gone after the block: the trace replays the model as it is
    torch.testing.assert_close(tr.run(x).output, model(x))


def test_gradients_through_a_hooked_replay_equal_autograd_on_the_modified_model():
    model = _convnet()
    tr = lurker.trace(model, _x(0))
    oracle = copy.deepcopy(model)
    oracle = nn.Sequential(oracle[0], _Mask(), *list(oracle)[1:])  # same weights, explicit mask

    x1 = _x().requires_grad_(True)
    out = tr.run(x1, hooks={"0": _zero_channel}).output  # not under no_grad: grads flow
    assert out.requires_grad
    out.square().sum().backward()
    x2 = _x().requires_grad_(True)
    oracle(x2).square().sum().backward()

    torch.testing.assert_close(x1.grad, x2.grad)
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, p in oracle.named_parameters():  # oracle's names shift past the inserted mask
        i, rest = n.split(".", 1)
        orig = str(int(i) - (int(i) > 0))
        torch.testing.assert_close(grads[f"{orig}.{rest}"], p.grad, msg=n)
    assert grads["0.weight"][C].abs().sum() == 0  # nothing reaches the switched-off channel
    assert grads["0.weight"][C - 1].abs().sum() > 0


class _Functional(nn.Module):
    """relu and cat as functions, no module of their own; ``change`` writes the edits out."""

    def __init__(self, change: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)
        self.head = nn.Linear(6, 2)
        self.change = change

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x))
        if self.change:
            h = h * 0.5 + 1.0
        z = torch.cat([h, torch.tanh(self.b(x))], dim=1)
        if self.change:
            z = torch.cat([z[:, :4], torch.zeros_like(z[:, 4:])], dim=1)
        return self.head(z)


def test_hooks_on_functional_ops_equal_the_forward_written_with_the_change():
    model = _Functional()
    torch.manual_seed(3)
    tr = lurker.trace(model, torch.randn(5, 4))
    assert "relu_1" in tr and "cat_1" in tr and not tr["relu_1"].module_outputs

    def cut(_op, z):
        return torch.cat([z[:, :4], torch.zeros_like(z[:, 4:])], dim=1)

    hooks = {"relu_1": lambda op, h: h * 0.5 + 1.0, "cat_1": cut}
    oracle = _Functional(change=True)
    oracle.load_state_dict(model.state_dict())
    x1 = torch.randn(7, 4, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    out = tr.run(x1, hooks=hooks).output
    ref = oracle(x2)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for (n, p), q in zip(model.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


class _Loop(nn.Module):
    """One layer run three times: a rolled label with three passes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.cell = nn.Linear(4, 4)

    def forward(self, x: Tensor, scale: tuple[float, ...] = (1.0, 1.0, 1.0)) -> Tensor:
        for s in scale:
            x = torch.tanh(self.cell(x) * s) if s != 1.0 else torch.tanh(self.cell(x))
        return x


@pytest.mark.parametrize(
    ("key", "passes"),
    [("linear_1", (1, 2, 3)), ("cell", (1, 2, 3)), ("cell:2", (2,)), ("linear_1:3", (3,))],
)
def test_a_rolled_key_or_a_reused_module_hooks_every_pass(key, passes):
    model = _Loop()
    tr = lurker.trace(model, torch.randn(2, 4))
    assert [op.label for op in tr.passes("linear_1")] == ["linear_1:1", "linear_1:2", "linear_1:3"]
    seen: list[str] = []

    def double(op, out):
        seen.append(op.label)
        return out * 2

    x = torch.randn(3, 4)
    out = tr.run(x, hooks={key: double}).output
    assert seen == [f"linear_1:{p}" for p in passes]
    # the oracle: the same loop with each hooked pass's linear output doubled, by hand
    ref = model(x, scale=tuple(2.0 if p in passes else 1.0 for p in (1, 2, 3)))
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize(
    ("key", "passes"),
    [("linear_1", (1, 2, 3)), ("cell", (1, 2, 3)), ("cell:2", (2,)), ("linear_1:3", (3,))],
)
def test_hook_ops_names_the_ops_a_hook_runs_on(key, passes):
    """``Trace.hook_ops(key)`` is what ``hooks={key: fn}`` applies to (explain's layer
    targets resolve their keys with it), and ``keys()`` is every name ``trace[...]`` takes."""
    tr = lurker.trace(_Loop(), torch.randn(2, 4))
    seen: list[int] = []
    tr.run(torch.randn(2, 4), hooks={key: lambda op, out: seen.append(op.index)})
    assert [op.index for op in tr.hook_ops(key)] == seen
    assert [op.label for op in tr.hook_ops(key)] == [f"linear_1:{p}" for p in passes]
    with pytest.raises(OpKeyError, match="linear_1"):
        tr.hook_ops("linear_l")
    keys = set(tr.keys())
    assert {op.label for op in tr.ops} | {"cell:1", "cell:2", "cell:3"} <= keys
    assert keys - {op.label for op in tr.ops} == {"cell:1", "cell:2", "cell:3", "x", "output"}


class _Pair(nn.Module):
    """A module whose output tuple comes from two ops."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.a(x), self.b(x)


class _PairUser(nn.Module):
    """``pair`` called ``times`` times, each call feeding the next."""

    def __init__(self, times: int):
        super().__init__()
        torch.manual_seed(0)
        self.pair = _Pair()
        self.times = times

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(self.times):
            p, q = self.pair(x)
            x = p * q
        return x


@pytest.mark.parametrize("times", [1, 2])
def test_a_module_of_several_output_ops_is_hooked_once_per_call(times):
    """A module path reaches, once per call, the op ``trace["pair"]`` (or ``"pair:k"``)
    names: the last of the ops its outputs come from, whether it ran once or several
    times. The oracle: the module's own forward hook, which sees each call's outputs."""
    model = _PairUser(times)
    x = torch.randn(2, 4)
    tr = lurker.trace(model, x)
    seen: list[tuple[str, Tensor]] = []
    tr.run(x, hooks={"pair": lambda op, out: seen.append((op.label, out))})
    calls: list[Tensor] = []
    handle = model.pair.register_forward_hook(lambda m, i, o: calls.append(o[1].detach()))
    try:
        model(x)
    finally:
        handle.remove()
    assert len(seen) == len(calls) == times
    names = ["pair"] if times == 1 else [f"pair:{k}" for k in range(1, times + 1)]
    assert [label for label, _ in seen] == [tr[n].label for n in names]
    assert [op.label for op in tr.hook_ops("pair")] == [label for label, _ in seen]
    for (_, out), want in zip(seen, calls):
        torch.testing.assert_close(out, want)


def test_hooks_are_removed_whatever_happens():
    model = _convnet()
    tr = lurker.trace(model, _x(0))
    x = _x()
    plain = model(x)
    with pytest.raises(RuntimeError, match="inside"), tr.hooks({"0": _zero_channel}):
        raise RuntimeError("inside")
    torch.testing.assert_close(tr.run(x).output, plain)

    def boom(op, out):
        raise ValueError("in a hook")

    with pytest.raises(ValueError, match="in a hook"), tr.hooks({"relu_1": boom}):
        tr.run(x)
    torch.testing.assert_close(tr.run(x).output, plain)
    with pytest.raises(ValueError, match="in a hook"):
        tr.run(x, hooks={"relu_1": boom})
    torch.testing.assert_close(tr.run(x).output, plain)

    # nested blocks: the outer hooks run first and stay when the inner block ends
    calls: list[str] = []

    def note(name):
        def fn(op, out):
            calls.append(name)

        return fn

    with tr.hooks({"relu_1": note("outer")}):
        with tr.hooks({"relu_1": note("inner")}):
            tr.run(x, hooks={"relu_1": note("call")})
        assert calls == ["outer", "inner", "call"]
        calls.clear()
        tr.run(x)
        assert calls == ["outer"]
    calls.clear()
    tr.run(x)
    assert calls == []
    # blocks that end out of order each take only their own hooks away
    outer, inner = tr.hooks({"relu_1": note("a")}), tr.hooks({"relu_1": note("b")})
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    tr.run(x)
    assert calls == ["b"]
    inner.__exit__(None, None, None)
    calls.clear()
    tr.run(x)
    assert calls == []


class _TopK(nn.Module):
    def __init__(self, change: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 6)
        self.change = change

    def forward(self, x: Tensor) -> Tensor:
        values, indices = torch.max(self.lin(x), dim=1)
        a, b = torch.chunk(x, 2, dim=1)
        if self.change:
            values = values.clamp(max=0.1)
            a = -a
        return values[:, None] * a + b.sum(1, keepdim=True) + indices[:, None].float()


def test_a_hooks_block_applies_to_its_own_threads_runs_only():
    """A server runs one trace for several requests at once: a `with tr.hooks()` block
    entered by one thread must not change what another thread's run computes."""
    import threading

    model = _convnet()
    tr = lurker.trace(model, _x(0))
    x = _x()
    plain = model(x)
    inside, done = threading.Event(), threading.Event()
    got: dict[str, Tensor] = {}

    def hooked() -> None:
        with tr.hooks({"0": _zero_channel}):
            got["hooked"] = tr.run(x).output
            inside.set()
            done.wait(30)

    t = threading.Thread(target=hooked)
    t.start()
    assert inside.wait(30)
    got["other"] = tr.run(x).output  # while the other thread is inside its block
    done.set()
    t.join()
    torch.testing.assert_close(got["other"], plain)
    assert not torch.allclose(got["hooked"], plain)
    # the per-thread blocks do not keep a trace from being pickled
    import pickle

    back = pickle.loads(pickle.dumps(tr))
    with back.hooks({"0": _zero_channel}):
        torch.testing.assert_close(back.run(x).output, got["hooked"])
    torch.testing.assert_close(back.run(x).output, plain)


def test_a_multi_output_op_gets_and_returns_a_tuple():
    model = _TopK()
    torch.manual_seed(2)
    tr = lurker.trace(model, torch.randn(3, 6))
    got: dict[str, tuple] = {}

    def clamp_values(op, out):
        got[op.label] = out
        values, indices = out
        return values.clamp(max=0.1), indices

    def negate_first(op, out):
        got[op.label] = out
        return [-out[0], out[1]]  # a list does as well as a tuple

    x = torch.randn(4, 6)
    out = tr.run(x, hooks={"max_1": clamp_values, "chunk_1": negate_first}).output
    assert isinstance(got["max_1"], tuple) and len(got["max_1"]) == 2
    assert got["max_1"][1].dtype == torch.long and len(got["chunk_1"]) == 2
    oracle = _TopK(change=True)
    oracle.load_state_dict(model.state_dict())
    torch.testing.assert_close(out, oracle(x))
    with pytest.raises(LurkerError, match="2 output tensors"):
        tr.run(x, hooks={"max_1": lambda op, out: out[0]})
    with pytest.raises(LurkerError, match="return a tensor"):
        tr.run(x, hooks={"linear_1": lambda op, out: 3.0})


def test_an_in_place_op_takes_its_replacement_in_place():
    class Net(nn.Module):
        def __init__(self, change: bool = False):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(4, 4)
            self.act = nn.ReLU(inplace=True)
            self.change = change

        def forward(self, x: Tensor) -> Tensor:
            h = self.lin(x)
            self.act(h)  # the return value is dropped: h itself is what goes on
            if self.change:
                h = h + 1
            h.add_(2)  # a Tensor method in place, also used through h
            if self.change:
                h = h * 3
            return h

    model = Net()
    tr = lurker.trace(model, torch.randn(2, 4))
    oracle = Net(change=True)
    oracle.load_state_dict(model.state_dict())
    x = torch.randn(5, 4)
    hooks = {"relu_1": lambda op, h: h + 1, "add__1": lambda op, h: h * 3}
    out = tr.run(x, hooks=hooks).output
    torch.testing.assert_close(out, oracle(x))
    with pytest.raises(LurkerError, match=r"in place.*must have its shape \(5, 4\)"):
        tr.run(x, hooks={"relu_1": lambda op, h: h[:, :2]})
    # with gradients: the replacement is written where the ReLU's backward does not look
    # (it needs its own result: written over, the backward failed), and the gradients
    # are the changed model's
    xg, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    tr.run(xg, hooks=hooks).output.pow(2).sum().backward()
    oracle(xo).pow(2).sum().backward()
    torch.testing.assert_close(xg.grad, xo.grad)
    for p, q in zip(model.parameters(), oracle.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(LurkerError, match=r"in place.*must have its shape \(5, 4\)"):
        tr.run(xg, hooks={"relu_1": lambda op, h: h[:, :2]})


def test_a_replacement_the_model_cannot_take_is_named_not_left_to_torch():
    """A hook that returns another shape or dtype: the next op fails inside torch; the
    error names the hook's op and both tensors, and still says what torch said."""
    model = _convnet()
    tr = lurker.trace(model, _x(0))
    x = _x()
    for fn, got in [
        (lambda op, out: out[:, :3], "(2, 3, 8, 8) float32"),
        (lambda op, out: out.double(), "(2, 6, 8, 8) float64"),
    ]:
        with pytest.raises(LurkerError) as err:
            tr.run(x, hooks={"conv2d_1": fn})
        msg = str(err.value)
        assert f"conv2d_1 was (2, 6, 8, 8) float32 on cpu, the hook's replacement {got}" in msg
        assert "The model raised RuntimeError" in msg and isinstance(
            err.value.__cause__, RuntimeError
        )
    # one that fits the model stays allowed, whatever its shape: the output's
    out = tr.run(x, hooks={"linear_1": lambda op, out: out[:, :2]}).output
    assert out.shape == (2, 2)


class _Gate(nn.Module):
    """A branch on a value a hook may change."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.lin(x))
        if h.sum() > 0:
            return h * 2
        return h - 1


def test_a_hook_that_changes_the_path_is_named_as_a_cause():
    model = _Gate()
    x = torch.ones(2, 4)
    tr = lurker.trace(model, x)
    assert tr.branches[0].value is True
    with pytest.raises(GraphChangedError) as err:
        tr.run(x, hooks={"relu_1": lambda op, h: h * 0})  # the traced input itself
    msg = str(err.value)
    assert "read False where the trace read True" in msg
    assert "what your hooks returned" in msg and "input the trace was made with" not in msg


def test_saved_activations_are_the_values_after_the_hooks():
    model = _convnet()
    tr = lurker.trace(model, _x(0))
    x = _x()
    acts = tr.run(x, save=["conv2d_1", "relu_1"], hooks={"conv2d_1": _zero_channel})
    assert acts["conv2d_1"][:, C].abs().sum() == 0
    assert acts["conv2d_1"][:, C - 1].abs().sum() > 0
    torch.testing.assert_close(acts["relu_1"], torch.relu(acts["conv2d_1"]))
    # save="none" keeps only the output
    assert [*tr.run(x, save="none")] == [op.label for op in tr.outputs]


def test_an_unknown_key_fails_before_anything_runs():
    calls = []

    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _convnet()

        def forward(self, x):
            calls.append(1)
            return self.net(x)

    model = Counted()
    tr = lurker.trace(model, _x(0))
    calls.clear()
    with pytest.raises(OpKeyError, match=r"'conv2d_1'") as err:
        tr.hooks({"conv2d_l": _zero_channel})  # (letter l, not one)
    assert isinstance(err.value, KeyError) and isinstance(err.value, LurkerError)
    assert "Did you mean" in str(err.value)
    said = str(err.value).split("Did you mean ")[1]
    assert len(said.split(", ")) == len(set(said.split(", ")))  # each name once
    with pytest.raises(OpKeyError, match=r"'net.0'"):
        tr.run(_x(), hooks={"net.O": _zero_channel})
    with pytest.raises(OpKeyError, match="out of range"):
        tr.run(_x(), hooks={99: _zero_channel})
    with pytest.raises(LurkerError, match="hook the op that computes it, 'linear_1'"):
        tr.run(_x(), hooks={"output": _zero_channel})
    with pytest.raises(LurkerError, match="input x"):
        tr.run(_x(), hooks={"x": _zero_channel})
    with pytest.raises(LurkerError, match="not a function"):
        tr.run(_x(), hooks={"relu_1": 3})
    assert calls == []


# ------------------------------------------------------------------ the model's own hooks
def _hooked_convnet() -> nn.Sequential:
    """Hooks that run torch ops, as attribution libraries (Zennit, Captum) install."""
    model = _convnet()
    model[0].register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))
    model[1].register_forward_hook(lambda mod, args, out: out + 0.25)
    model[2].register_forward_pre_hook(
        lambda mod, args, kwargs: ((args[0] - 0.1,), kwargs), with_kwargs=True
    )
    return model


def test_a_model_with_its_own_hooks_traces_validates_and_replays():
    model = _hooked_convnet()
    tr = lurker.trace(model, _x(0))
    names = [op.name for op in tr.compute_ops]
    assert names[:2] == ["mul", "conv2d"] and "add" in names and "sub" in names
    assert tr["1"].name == "add"  # the hook's output is the module's output
    report = tr.validate()
    assert report.checked == len(tr.compute_ops) and report.output_checked

    x1 = _x().requires_grad_(True)
    x2 = _x().requires_grad_(True)
    out = tr.run(x1).output
    ref = model(x2)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    # our hooks compose with the model's: the hooked op is the model hook's add
    oracle = copy.deepcopy(model)
    oracle[1].register_forward_hook(lambda mod, args, out: _zero_channel(None, out))  # type: ignore[arg-type]
    torch.testing.assert_close(tr.run(x1, hooks={"1": _zero_channel}).output, oracle(x1))


def test_a_hook_added_or_removed_after_tracing_is_named_as_the_cause():
    model = _hooked_convnet()
    tr = lurker.trace(model, _x(0))

    def scale(mod, args, out):
        return out * 3

    handle = model[2].register_forward_hook(scale)
    with pytest.raises(GraphChangedError) as err:
        tr.run(_x())
    msg = str(err.value)
    assert "forward hook (test_a_hook_added_or_removed_after_tracing_is_named_as_the_cause." in msg
    assert "scale) on module '2' (Conv2d) was added" in msg
    assert "depends on the data" not in msg
    handle.remove()
    torch.testing.assert_close(tr.run(_x()).output, model(_x()))  # as traced again

    # one of the hooks the trace ran with, removed
    hid = next(iter(model[1]._forward_hooks))
    saved = model[1]._forward_hooks.pop(hid)
    with pytest.raises(
        GraphChangedError, match=r"forward hook \(.*\) on module '1' \(ReLU\) was removed"
    ):
        tr.run(_x())
    model[1]._forward_hooks[hid] = saved

    # torch's global module hooks count too
    from torch.nn.modules.module import register_module_forward_hook

    g = register_module_forward_hook(lambda mod, args, out: out + 1 if mod is model[3] else None)
    try:
        with pytest.raises(GraphChangedError, match=r"a global forward hook .* was added"):
            tr.run(_x())
    finally:
        g.remove()
    # a hook that runs no torch op changes no path, and is allowed
    seen = []
    handle = model[2].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    torch.testing.assert_close(tr.run(_x()).output, model(_x()))
    handle.remove()
    assert len(seen) == 2


def test_backward_hooks_that_need_grad_mode_are_named():
    model = _convnet()
    model[1].register_full_backward_hook(lambda mod, gin, gout: (gin[0] * 0.5,))
    x = _x(0).requires_grad_(True)
    tr = lurker.trace(model, x)  # grad on: the hook adds its ops to the forward
    assert tr.validate().output_checked
    x1 = _x().requires_grad_(True)
    x2 = _x().requires_grad_(True)
    tr.run(x1).output.sum().backward()
    model(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)  # the backward hook halved it in both
    with torch.no_grad(), pytest.raises(GraphChangedError, match=r"backward hooks.*grad off"):
        tr.run(_x())


def test_an_in_place_op_that_writes_nothing_keeps_its_tensor_under_autograd():
    """Dropout(inplace=True) in eval mode writes nothing and returns its input itself; a
    later in-place write to that tensor shows in what the model returns. With gradients
    on, a run (saving every activation, or with a hook on it) gets the model's own tensor
    back, not a copy, so the output is the model's."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.drop = nn.Dropout(0.5, inplace=True)

        def forward(self, x: Tensor) -> Tensor:
            h = self.lin(x)
            y = self.drop(h)
            h.add_(1)  # y is h: it sees this
            return y * 2

    torch.manual_seed(0)
    model = Net().eval()
    tr = lurker.trace(model, torch.randn(2, 4))
    x = torch.randn(3, 4, requires_grad=True)
    want = model(x)
    torch.testing.assert_close(tr.run(x).output, want)
    torch.testing.assert_close(tr.run(x, hooks={"drop": lambda op, o: None}).output, want)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _convnet()

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.net(x * mask)


@pytest.mark.parametrize(
    ("args", "kwargs", "said"),
    [
        ((torch.randn(2, 4, 8, 8),), {}, r"input 'input' is \(2, 4, 8, 8\) float32 on cpu where"),
        ((torch.randn(2, 3, 9, 9),), {}, r"input 'input' is \(2, 3, 9, 9\) float32"),
        ((torch.randn(3, 8, 8),), {}, r"input 'input' is \(3, 8, 8\) float32"),
        ((torch.randn(2, 3, 8, 8).half(),), {}, r"input 'input' is \(2, 3, 8, 8\) float16"),
        ((torch.zeros(2, 3, 8, 8).long(),), {}, r"input 'input' is \(2, 3, 8, 8\) int64"),
        ((torch.randn(2, 3, 8, 8, device="meta"),), {}, r"float32 on meta where"),
        # the one it takes is still 'input': only the surplus is named by position
        (
            (torch.randn(2, 3, 8, 8), torch.randn(2)),
            {},
            r": 'args\[1\]' \(\(2,\) float32 on cpu\) is ",
        ),
        ((), {}, r"input 'input' is missing \(traced as \(2, 3, 8, 8\) float32 on cpu\)"),
        ((), {"x": torch.randn(2, 3, 8, 8)}, r"'x' \(\(2, 3, 8, 8\) float32 on cpu\) is passed"),
    ],
)
def test_run_on_inputs_unlike_the_traced_ones_says_which_and_what_to_do(args, kwargs, said):
    """Trace.run on an input of another shape, dtype or device, or with other inputs,
    raised torch's error from deep inside the model (a conv's channels, "mat1 and mat2
    shapes cannot be multiplied", a TypeError of Sequential.forward): now one paragraph
    naming the input, what the trace was recorded with, and what to do; torch's error is
    its cause. The traced shape is (2, 3, 8, 8) float32 on cpu."""
    tr = lurker.trace(_convnet(), _x(0))
    with pytest.raises(LurkerError, match=said) as err:
        tr.run(*args, **kwargs)
    text = str(err.value)
    assert "(2, 3, 8, 8) float32 on cpu" in text  # what the trace was recorded with
    assert "batch dimension (dim 0) may differ" in text
    assert "lurker.trace(model, x)" in text and "The model raised" in text
    assert err.value.__cause__ is not None and not isinstance(err.value.__cause__, LurkerError)


def test_run_on_inputs_like_the_traced_ones_runs_or_keeps_the_models_own_error():
    """What the replay takes stays taken, with the model's outputs (the oracle: the model
    itself): another batch size, a channels-last input. A hook's own error, and a model's
    error on traced-like inputs, are not blamed on the inputs."""
    model = _convnet()
    tr = lurker.trace(model, _x(0))
    for x in (_x(n=5), _x(n=1), _x().to(memory_format=torch.channels_last)):
        torch.testing.assert_close(tr.run(x).output, model(x))

    def boom(op: lurker.Op, out: Tensor) -> None:
        raise ValueError("in a hook")

    with pytest.raises(ValueError, match="in a hook"):  # even on another batch size
        tr.run(_x(n=5), hooks={"0": boom})

    class Big(nn.Module):  # runs out of memory on a batch of more than 2
        def forward(self, x: Tensor) -> Tensor:
            if x.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return x * 2

    big = lurker.trace(Big(), _x(0))
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):  # not the input's fault
        big.run(_x(n=5))


def test_run_with_a_missing_input_names_it_and_the_models_own_errors_stand():
    """A model of two inputs run without its mask: the input that is missing. A model's
    own error on inputs like the traced ones but for their batch size (the probe replays
    every batch on a trace of one sample), or on a list of images of other sizes (a
    detection model's), stands as the model raised it: the inputs are not blamed."""
    two = lurker.trace(_TwoInputs(), _x(0), torch.ones(1, 3, 1, 1))
    with pytest.raises(LurkerError, match=r"input 'mask' is missing \(traced as \(1, 3, 1, 1\)"):
        two.run(_x())

    class Checked(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            if x.shape[0] == 5:
                raise ValueError("the model's own check")
            return x.reshape(x.shape[0], -1).sum(1)

    tr = lurker.trace(Checked(), _x(0))
    with pytest.raises(ValueError, match="the model's own check"):
        tr.run(_x(n=5))
    torch.testing.assert_close(tr.run(_x()).output, Checked()(_x()))

    class Images(nn.Module):
        def forward(self, images: list[Tensor]) -> Tensor:
            assert images[0].shape[-1] == 8, "the model's own size check"
            return torch.stack([i.mean((1, 2)) for i in images])

    imgs = lurker.trace(Images(), [torch.randn(3, 8, 8), torch.randn(3, 8, 8)])
    with pytest.raises(AssertionError, match="the model's own size check"):
        imgs.run([torch.randn(3, 6, 6), torch.randn(3, 8, 8)])
    with pytest.raises(LurkerError, match=r"input 'images\[0\]' is \(8, 8\) float32"):
        imgs.run([torch.randn(8, 8), torch.randn(3, 8, 8)])  # another rank: named


def test_run_without_an_optional_input_names_it_not_the_data():
    """A forward(x, mask=None) traced with its mask and run without it takes another path;
    GraphChangedError blamed the shapes and the model's control flow ("1 input tensors
    where the trace had 2 ... a loop over x.shape[0]"). It names the missing input."""

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
            return self.lin(x if mask is None else x * mask)

    tr = lurker.trace(Masked(), torch.randn(2, 4), torch.ones(2, 4))
    with pytest.raises(GraphChangedError, match=r"input 'mask' is missing \(traced as \(2, 4\)"):
        tr.run(torch.randn(2, 4))
    x, mask = torch.randn(5, 4), torch.rand(5, 4)  # another batch runs: the oracle, the model
    torch.testing.assert_close(tr.run(x, mask).output, tr.model(x, mask))


@pytest.mark.parametrize(
    ("fn", "why"),
    [(lambda h: h, "too many positional arguments"), (lambda a, b, c: b, "missing a required")],
)
def test_a_hook_of_the_wrong_signature_is_refused_with_its_key(fn, why):
    """lambda h: h raised torch-deep "takes 1 positional argument but 2 were given" in the
    middle of the forward, naming neither the hook's key nor its op."""
    tr = lurker.trace(_convnet(), _x(0))
    with pytest.raises(LurkerError, match=rf"hooks\['1'\] is .*fn\(op, output\) \({why}"):
        tr.run(_x(), hooks={"1": fn})
    with pytest.raises(LurkerError, match=r"hooks\['1'\]"):
        tr.hooks({"1": fn})


def test_a_replacement_that_does_not_fit_names_the_hooks_key():
    """A hook keyed by module path ('0') returning another shape was named by its op only
    (conv2d_1), which the user never wrote."""
    tr = lurker.trace(_convnet(), _x(0))
    with pytest.raises(LurkerError, match=r"the hook's replacement .* \(from hooks\['0'\]\)"):
        tr.run(_x(), hooks={"0": lambda op, out: out[:, :3]})
    with pytest.raises(LurkerError, match=r"hooks\['0'\] \(on conv2d_1\) returned str"):
        tr.run(_x(), hooks={"0": lambda op, out: "x"})
