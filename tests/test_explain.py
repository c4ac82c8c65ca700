"""lurker.explain: every method against an independent oracle (Captum, autograd, axioms),
targets, batches, the model left untouched, bad input, the CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lurker
from lurker.examples import DigitsNet

captum_attr = pytest.importorskip("captum.attr")


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """max |a - b| < rel * max |b| (relative to the oracle's scale)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = float(b.abs().max())
    err = float((a - b).abs().max())
    assert err <= rel * max(scale, 1e-12), f"max abs diff {err:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def digits() -> nn.Module:
    torch.manual_seed(0)
    m = DigitsNet().eval()
    # non-trivial BatchNorm statistics, as after training
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m.double()


@pytest.fixture(scope="module")
def xd() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(3, 1, 16, 16, dtype=torch.float64)


def test_callable_from_package_root(digits, xd) -> None:
    e = lurker.explain(digits, xd, target=3)
    assert e.attribution.shape == xd.shape and e.method == "saliency"
    assert e.target == [3, 3, 3]
    assert "saliency" in lurker.explain.METHODS


def test_saliency_equals_captum(digits, xd) -> None:
    e = lurker.explain(digits, xd, target=[1, 4, 7], method="saliency")
    ref = captum_attr.Saliency(digits).attribute(xd, target=[1, 4, 7])
    close(e.attribution, ref)
    assert (e.attribution >= 0).all()
