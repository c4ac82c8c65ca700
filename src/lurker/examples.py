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


def digits_tensors(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, 1, image_size, image_size) floats in [0, 1] and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear")
    return x.clamp(0, 1), torch.tensor(d.target, dtype=torch.long)


def train_digits(
    epochs: int = 3, *, seed: int = 0, image_size: int = 16, log=print
) -> tuple[DigitsNet, float]:
    """Train :class:`DigitsNet` on 80% of digits; return it (eval mode) and test accuracy."""
    torch.manual_seed(seed)
    x, y = digits_tensors(image_size)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    tr, te = perm[:cut], perm[cut:]
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(epochs):
        model.train()
        for idx in tr[torch.randperm(len(tr))].split(32):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x[te]).argmax(1) == y[te]).float().mean().item()
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, test accuracy {acc:.1%}")
    return model.eval(), acc
