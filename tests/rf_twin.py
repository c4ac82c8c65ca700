"""The receptive-field tests' oracle model: the same geometry with a gradient at every tap
(shared by tests/test_receptive.py and tests/test_receptive_video.py)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class OnesPool(nn.Module):
    """A 2-D or 3-D max pool's geometry as an all-ones depthwise conv: every tap gets a
    gradient, where a max pool passes one to its argmax alone."""

    def __init__(self, m: nn.MaxPool2d | nn.MaxPool3d):
        super().__init__()
        self.dims = 3 if isinstance(m, nn.MaxPool3d) else 2
        self.args = (m.kernel_size, m.stride, m.padding, m.dilation)

    def forward(self, x: Tensor) -> Tensor:
        k, s, p, d = (v if isinstance(v, tuple) else (v,) * self.dims for v in self.args)
        w = torch.ones(x.shape[1], 1, *k)
        conv = F.conv3d if self.dims == 3 else F.conv2d
        return conv(x, w, stride=s, padding=p, dilation=d, groups=x.shape[1])


def twin(model: nn.Module) -> nn.Module:
    """Same geometry, gradients everywhere: ReLU -> identity, max pool -> ones depthwise conv
    (a ``ceil_mode`` pool is kept: a conv cannot take its ragged last window)."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if not name:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, nn.ReLU):
            setattr(parent, leaf, nn.Identity())
        elif isinstance(m, (nn.MaxPool2d, nn.MaxPool3d)) and not m.ceil_mode:
            setattr(parent, leaf, OnesPool(m))
    return model
