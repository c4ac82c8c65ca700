"""Small hand-written models that exercise one tracing feature each (shared by tests)."""

from __future__ import annotations

import torch
from torch import nn


class Small(nn.Module):
    """relu(linear(x)) + 1: three ops, hand-checkable."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) + 1


class Branchy(nn.Module):
    """A data-dependent if: which branch runs depends on the input's sum."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Linear(4, 4)
        self.neg = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.pos(x)
        return self.neg(x) * 2


class RNNLoop(nn.Module):
    """An RNN cell unrolled in a Python loop: the same weights applied T times."""

    def __init__(self, d_in: int = 3, d_h: int = 5) -> None:
        super().__init__()
        self.cell = nn.RNNCell(d_in, d_h)
        self.inp = nn.Linear(d_in, d_in)
        self.head = nn.Linear(d_h, 2)
        self.d_h = d_h

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, B, d_in)
        h = torch.zeros(x.shape[1], self.d_h)
        for t in range(x.shape[0]):
            h = self.cell(self.inp(x[t]), h)
        return self.head(h)


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, _c) = self.lstm(x)
        return self.fc(out[:, -1]) + h[-1].sum() * 0


class ConvLSTM(nn.Module):
    """A Conv1d reading a signal's ``channels``, then an LSTM over time (batch first): a
    model of signals with one layer Grad-CAM and LRP can read and one they cannot."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, 4, 3, padding=1)
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(torch.relu(self.conv(x)).transpose(1, 2))
        return self.fc(out[:, -1])


class ReadsEachRow(nn.Module):
    """A loop that reads a value from each row (``.item()``), as Keypoint R-CNN reads each
    box's size: one rolled readout that read a different value on every pass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in range(x.shape[0]):
            k = int(x[i, 0].item())
            rows.append(self.fc(x[i]) * k)
        return torch.stack(rows)


class Pyramid(nn.Module):
    """A feature pyramid's pattern (torchvision's FPN): a ModuleList (``outs``) whose last
    block runs first and whose others each run after an ``add`` outside it that feeds them;
    then, with ``decode``, Faster R-CNN's box decoding (many small ops side by side)."""

    def __init__(self, decode: bool = False) -> None:
        super().__init__()
        self.inner = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.outs = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)])
        self.decode = decode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.inner[2](x)
        r2 = self.outs[2](a)
        b = self.inner[1](x) + a
        r1 = self.outs[1](b)
        c = self.inner[0](x) + b
        r0 = self.outs[0](c)
        out = r0 + r1 + r2
        if not self.decode:
            return out
        from torchvision.models.detection._utils import BoxCoder

        return BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(out, x.abs().cumsum(1))


class Generates(nn.Module):
    """Creates tensors inside forward (zeros, arange, randn, ones_like)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[-1], dtype=x.dtype)
        bias = torch.zeros(x.shape[-1])
        noise = torch.randn(x.shape) * 0  # random, but multiplied away
        return x + pos + bias + noise + torch.ones_like(x)


class InPlace(nn.Module):
    """In-place ops on intermediate tensors: the saved values must be the pre-mutation ones."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        z = y * 1.0
        z += 1
        z.mul_(2)
        v = z.view(-1)
        z[0, 0] = 5.0  # setitem mutates z (and v, a view of it)
        w = self.act(y)  # relu_ overwrites y
        return w + z + v.view_as(z)


class Twice(nn.Module):
    """One submodule called twice (weights reused)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(self.block(x)))


class Structured(nn.Module):
    """Tuple, dict and keyword inputs; a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, pair, feats: dict, *, scale: torch.Tensor) -> dict:
        x, y = pair
        h = self.a(x) + self.b(y) + feats["z"]
        return {"logits": h * scale, "aux": (h.sum(), h.mean())}


class Fails(nn.Module):
    """Raises mid-forward: the second layer expects another width."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def digits_net_float64() -> nn.Module:
    """An untrained DigitsNet in float64 with non-trivial BatchNorm statistics, as after
    training (the explain tests' model: exact enough to compare with other libraries)."""
    from lurker.examples import DigitsNet

    torch.manual_seed(0)
    m = DigitsNet().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m.double()


class DigitsViT(nn.Module):
    """1-channel 16x16 digits through a tiny torchvision ViT (4x4 patches, a class-token
    head, GELU): a transformer the explorer's tests can probe and serve in seconds."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import VisionTransformer

        self.vit = VisionTransformer(16, 4, 2, 2, 32, 64, num_classes=10)
        nn.init.normal_(self.vit.heads.head.weight)  # (zero in torchvision: no gradient)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x.expand(-1, 3, -1, -1))
