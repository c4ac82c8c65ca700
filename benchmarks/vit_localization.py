"""Where attribution methods point on a vision transformer whose answer has a known place.

Trains a tiny torchvision ViT (32 px images, 8 px patches, 2 blocks; seconds on one CPU
thread) to say which quadrant holds a bright square, then prints, per method, how often
its heatmap puts most of its mass in that quadrant (chance: 25%) and how often the map is 0
everywhere.
The figures in docs/explain.md ("Grad-CAM on vision transformers") come from this script.

    python benchmarks/vit_localization.py [--steps 1500] [--test 64]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from torchvision.models import VisionTransformer

import lurker

METHODS = (
    "gradcam",
    "gradcam_plus_plus",
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "lrp",
)
SIGNED = {"input_x_gradient", "integrated_gradients", "lrp"}  # compared by magnitude


def squares(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Dim noise with one bright 8x8 square; the label is the quadrant it lies in."""
    x = torch.rand(n, 3, 32, 32, generator=g) * 0.3
    y = torch.randint(0, 4, (n,), generator=g)
    for i in range(n):
        r0 = 16 * (int(y[i]) // 2) + int(torch.randint(0, 9, (1,), generator=g))
        c0 = 16 * (int(y[i]) % 2) + int(torch.randint(0, 9, (1,), generator=g))
        x[i, :, r0 : r0 + 8, c0 : c0 + 8] = 1.0
    return x, y


def quadrant(heat: torch.Tensor) -> torch.Tensor:
    """The quadrant of each (H, W) map that holds the most mass."""
    h = heat.shape[-1] // 2
    parts = [heat[:, :h, :h], heat[:, :h, h:], heat[:, h:, :h], heat[:, h:, h:]]
    return torch.stack([p.sum((1, 2)) for p in parts], 1).argmax(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--test", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(1)  # the trained model, so the figures, depend on the thread count
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    vit = VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=4)
    opt = torch.optim.Adam(vit.parameters(), 1e-3)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        x, y = squares(64, g)
        loss = F.cross_entropy(vit(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    vit.eval()
    x, y = squares(a.test, g)
    with torch.no_grad():
        acc = (vit(x).argmax(1) == y).float().mean().item()
    print(f"trained in {time.perf_counter() - t0:.0f} s; test accuracy {acc:.0%} on {a.test}")
    print(f"{'method':22s} {'right quadrant':>15s} {'map 0 everywhere':>17s}")
    for method in METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the empty-map warning is counted below
            e = lurker.explain(vit, x, y.tolist(), method=method)
        heat = torch.stack([e.heatmap(i) for i in range(a.test)])
        if method in SIGNED:
            heat = heat.abs()
        hit = (quadrant(heat) == y).float().mean().item()
        empty = (heat.flatten(1).amax(1) == 0).float().mean().item()
        print(f"{method:22s} {hit:15.0%} {empty:17.0%}")


if __name__ == "__main__":
    main()
