"""Trace.run keeps outputs without copying them where nothing can change them; these check
that every value is still the one its op produced, and stays so after the run.

Oracle: a bare TorchFunctionMode that clones each call's output the moment it is made
(what Trace.run did for every output before), on a deep copy of the model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

import lurker


class Aliasing(nn.Module):
    """Outputs that share storage with later in-place writes, inputs, parameters, buffers
    and constants."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("buf", torch.ones(4))
        self.c = torch.full((4,), 2.0)  # a plain tensor attribute: a constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.float()  # the input itself
        b = self.lin(a)
        v = b.view(2, 2, 2)  # a view of an op output, written below through b
        b.relu_()
        w = self.lin.weight.t()  # a view of a parameter
        c = b + w.sum(0)
        c[0] = 5.0  # setitem
        d = F.relu(c, inplace=True)
        e = self.bn(d)  # running statistics written in training mode
        f = self.buf.view(2, 2)  # a view of a buffer
        g = e * self.c
        g += 1
        h = F.hardtanh(g, 0.0, 3.0, True)  # in place through a positional flag
        return h.sum() + f.sum() + v.sum() + self.c.contiguous().sum()


class _Clones(TorchFunctionMode):
    """Each call's tensor output (or the tensor it wrote into) cloned when made."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        ins = [a for a in args if isinstance(a, torch.Tensor)]
        versions = [t._version for t in ins]
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.values.append(out.detach().clone())
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            self.values.append(out[0].detach().clone())
        elif out is None:
            changed = [t for t, v in zip(ins, versions) if t._version != v]
            if changed:
                self.values.append(changed[0].detach().clone())
        return out


def _first(v):
    return v[0] if isinstance(v, tuple) else v


@pytest.mark.parametrize(
    "make, shape",
    [
        (Aliasing, (2, 4)),
        (lambda: torchvision.models.resnet18(num_classes=5), (2, 3, 32, 32)),
    ],
    ids=["aliasing", "resnet18"],
)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_run_values_are_those_produced(make, shape, training):
    torch.manual_seed(0)
    model = make().train(training)
    x, x2 = torch.randn(*shape), torch.randn(*shape)
    tr = lurker.trace(model, x)
    twin = copy.deepcopy(model)  # the same state the replay starts from
    acts = tr.run(x2, save="all")
    oracle = _Clones()
    x3 = x2.clone()
    with oracle, torch.no_grad():
        twin(x3)
    calls = sorted((op for op in tr.ops if op.seq >= 0), key=lambda op: op.seq)
    assert len(oracle.values) == len(calls)
    for op, want in zip(calls, oracle.values):
        torch.testing.assert_close(_first(acts[op.label]), want, msg=op.label)
    kept = {op.label: _first(acts[op.label]).clone() for op in calls}
    # what the caller does next: reuse the input buffer, step the parameters
    x2.zero_()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    for op in calls:
        assert torch.equal(_first(acts[op.label]), kept[op.label]), op.label


def test_run_with_hooks_copies_what_a_hook_hands_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(2, 4)
    tr = lurker.trace(model, x)
    held = torch.ones(2, 4)  # the hook's own tensor, changed by its owner afterwards
    acts = tr.run(x, save="all", hooks={"0": lambda op, out: held})
    held.zero_()
    torch.testing.assert_close(acts["0"], torch.ones(2, 4))
    torch.testing.assert_close(acts["1"], torch.ones(2, 4))  # relu of the replacement


class WritesItsInput(nn.Module):
    """Doubles its second input in place before using it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y.mul_(2)
        return self.lin(x) + y


@pytest.mark.parametrize("save", [["input_1"], ["input_2"], ["y"], ["input_*"], "all", None])
def test_inputs_are_saved_by_their_label_as_they_went_in(save):
    # the model's inputs are saved when save= names them (input_1, or the forward()
    # parameter's name), by trace and by Trace.run, with the value the model was given,
    # not what it wrote into it later; they were matched by name but silently not saved
    model = WritesItsInput()
    x0, y0 = torch.randn(2, 3), torch.randn(2, 3)
    tr = lurker.trace(model, x0.clone(), y0.clone(), save=save or "all")
    x1, y1 = torch.randn(2, 3), torch.randn(2, 3)
    acts = tr.run(x1.clone(), y1.clone(), save=save)
    with_hooks = None
    with tr.hooks({"linear_1": lambda op, out: out}):
        with_hooks = tr.run(x1.clone(), y1.clone(), save=save)
    wanted = {
        "input_1": save in ("all", None) or save in (["input_1"], ["input_*"]),
        "input_2": save in ("all", None) or save in (["input_2"], ["y"], ["input_*"]),
    }
    for label, (given_trace, given_run) in {"input_1": (x0, x1), "input_2": (y0, y1)}.items():
        if wanted[label]:
            torch.testing.assert_close(tr[label].activation, given_trace, rtol=0, atol=0)
            torch.testing.assert_close(acts[label], given_run, rtol=0, atol=0)
            torch.testing.assert_close(with_hooks[label], given_run, rtol=0, atol=0)
        else:
            assert tr[label].activation is None
            assert label not in list(acts)
