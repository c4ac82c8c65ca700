"""A small CNN for scikit-learn's bundled digits, trained in seconds on a CPU.

Used by ``make demo`` and by tests that need a *trained* model without downloading
anything: the data ships with scikit-learn.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsNet(nn.Module):
    """Three conv layers and a classifier head for 1x16x16 digit images."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(4)  # 4x4 keeps where strokes are
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def digits_tensors(image_size: int = 16, split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as one (N, 1, image_size, image_size) batch in [0, 1] and their labels."""
    from .probe.data import digits

    ds = digits(image_size, split=split)
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.labels)


def train_digits(
    epochs: int = 3, *, seed: int = 0, image_size: int = 16, log=print
) -> tuple[DigitsNet, float]:
    """Train :class:`DigitsNet` on the digits' train split; return it (eval) and test accuracy."""
    torch.manual_seed(seed)
    x, y = digits_tensors(image_size, "train")
    xt, yt = digits_tensors(image_size, "test")
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xt).argmax(1) == yt).float().mean().item()
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, test accuracy {acc:.1%}")
    return model.eval(), acc
