"""Activations over a stimulus set with ``transform=``, checked against forward hooks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import lurker


class Block(nn.Module):
    """conv -> batch norm -> in-place ReLU, as in a ResNet: the ReLU overwrites the
    batch norm's output, and the block's call holds the norm's running statistics."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(Block(3, 6), Block(6, 4), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    with torch.no_grad():  # batch norms that shift values below zero, so ReLU changes them
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model.eval()


def _hooked(model: nn.Module, names: list[str], x: Tensor) -> dict[str, Tensor]:
    """The oracle: each module's output as a plain forward hook sees it, copied."""
    seen: dict[str, Tensor] = {}
    mods = dict(model.named_modules())
    handles = [
        mods[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.detach().clone()))
        for n in names
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize(
    "transform",
    [lambda t: t.flatten(1), lambda t: t, lambda t: t[:, :3]],
    ids=["flatten", "identity", "slice"],
)
def test_a_transform_returning_a_view_keeps_the_value_before_an_inplace_op(
    transform: Callable[[Tensor], Tensor],
):
    # a view of the batch norm's output shared its storage with the tensor the in-place
    # ReLU then overwrote: the saved "bn" values were silently the ReLU's
    model = _model()
    x = torch.randn(4, 3, 8, 8)
    oracle = _hooked(model, ["0.bn", "1.bn"], x)
    assert all((v < 0).any() for v in oracle.values())  # the ReLU does change them
    tr = lurker.trace(model, x[:1], save=["0.bn", "1.bn"], transform=transform)
    with torch.no_grad():
        acts = tr.run(x)
    traced = lurker.trace(model, x, save=["0.bn", "1.bn"], transform=transform)
    for name, want in oracle.items():
        assert torch.equal(acts[name], transform(want)), name
        assert torch.equal(traced[name].activation, transform(want)), name


def test_a_spatial_mean_of_saved_modules_over_batches_matches_forward_hooks():
    # transform= t.mean((2, 3)) with save= naming modules that hold batch norms: it used
    # to run on the norms' 1-D running statistics too, and the trace failed
    model = _model()
    stimuli = torch.randn(23, 3, 8, 8)
    layers = ["0", "1"]
    tr = lurker.trace(model, stimuli[:1], save=layers, transform=lambda t: t.mean((2, 3)))
    oracle = _hooked(model, layers, stimuli)
    for batch_size in (1, 5, 23):
        out: dict[str, list[Tensor]] = {n: [] for n in layers}
        with torch.no_grad():
            for batch in stimuli.split(batch_size):
                acts = tr.run(batch)
                kept = {tr[n].label for n in layers} | {"output_1"}
                assert set(acts) == kept  # nothing inside the modules is kept
                for n in layers:
                    out[n].append(acts[n])
        for n in layers:
            got = torch.cat(out[n])
            assert got.shape == (23, model[int(n)].conv.out_channels)
            torch.testing.assert_close(got, oracle[n].mean((2, 3)), rtol=1e-5, atol=1e-6)


def test_a_transform_that_raises_is_named_not_the_model():
    model = _model()
    with pytest.raises(lurker.TraceError, match=r"transform= raised IndexError .*shape \(2, 5\)"):
        lurker.trace(model, torch.randn(2, 3, 8, 8), save=["3"], transform=lambda t: t.mean((2, 3)))
    tr = lurker.trace(model, torch.randn(2, 3, 8, 8), save=["3"])
    tr._transform = lambda t: t.mean((2, 3))  # (as if traced with it on another layer)
    with pytest.raises(lurker.LurkerError, match=r"transform= raised .* linear_1 of shape"):
        tr.run(torch.randn(2, 3, 8, 8))
