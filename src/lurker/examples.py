"""Small example models: a CNN for scikit-learn's bundled digits, trained in seconds on a
CPU, a GPT-like decoder fed token ids, and deep residual MLPs of a chosen op count.

Used by ``make demo``, the docs' command-line examples and tests that need a *trained*
model without downloading anything: the digits ship with scikit-learn.
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


class TinyGPT(nn.Module):
    """A GPT-like decoder (token and position embeddings, causal self-attention blocks, a
    language-model head) small enough to trace on a CPU in a second. Takes token ids
    ``(B, T)`` with ``T <= context`` and returns logits ``(B, T, vocab_size)``."""

    def __init__(
        self,
        vocab_size: int = 50257,
        context: int = 64,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class MLPBlock(nn.Module):
    """A residual MLP block: linear, layer norm, GELU, add."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.norm(self.fc(x)))


class MLPStage(nn.Module):
    """A Sequential of ``blocks`` residual MLP blocks, as a module of its own."""

    def __init__(self, blocks: int, d: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[MLPBlock(d) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def deep_mlp(ops: int, d: int = 8) -> nn.Module:
    """A graph of a chosen size for graph tests and benchmarks: stages of 25 residual MLP
    blocks (100 ops a stage), nested three modules deep; ``ops`` rounds down to a multiple
    of 100 (at least one stage). Takes ``(N, d)`` inputs."""
    return nn.Sequential(*[MLPStage(25, d) for _ in range(max(1, ops // 100))])
