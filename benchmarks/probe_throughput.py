"""Probe throughput: images/s of ``lurker.probe`` vs a plain ``no_grad`` forward.

Both read the same synthetic images through the same DataLoader (batch 64); the probe
keeps k=9 top samples by mean and by max for every unit of every conv layer. Runs are
interleaved and the medians compared; the range of the per-repeat ratios follows in
brackets (a shared 2-core machine swings a few percent between runs). Target (issue #3):
probe >= 0.9x the plain forward.
"probe" is end to end; "sweep" leaves out the one-off costs that do not grow with the
dataset (trace, receptive fields, writing the run), printed as "fixed s".

    python benchmarks/probe_throughput.py [--images 1024] [--size 64] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from lurker.probe import probe
from lurker.probe.data import collate, wrap


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain_pass(model, ds, batch_size: int, device: str) -> float:
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        pin_memory=device.startswith("cuda"),
    )
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for images, _, _ in loader:
            model(images.to(device, non_blocking=True))
    _sync(device)
    return time.perf_counter() - t0


def probe_pass(model, ds, batch_size: int, device: str, out: str) -> tuple[float, float]:
    """(end-to-end seconds, sweep-only seconds): the sweep leaves out the one-off trace,
    receptive fields and writing of the run, which do not grow with the dataset."""
    _sync(device)
    t0 = time.perf_counter()
    run = probe(
        model,
        ds,
        out=out,
        layers=["Conv2d"],
        k=9,
        batch_size=batch_size,
        device=device,
        overwrite=True,
        progress=False,
    )
    _sync(device)
    return time.perf_counter() - t0, run.meta["sweep"]["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="vgg11,resnet18")
    a = ap.parse_args()
    torch.manual_seed(0)
    xs = torch.randn(a.images, 3, a.size, a.size)
    ds = wrap(TensorDataset(xs, torch.arange(a.images) % 10))
    print(
        f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}, "
        f"{a.images} images {a.size}x{a.size}, batch {a.batch_size}, k=9, all conv layers"
    )
    print(
        f"{'model':10s} {'plain img/s':>12s} {'probe img/s':>12s} {'ratio':>18s}"
        f" {'sweep img/s':>12s} {'ratio':>18s} {'fixed s':>8s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            model = torchvision.models.get_model(name, weights=None).eval().to(a.device)
            plain_pass(model, ds, a.batch_size, a.device)  # warm-up (allocator, cudnn)
            probe_pass(model, ds, a.batch_size, a.device, f"{tmp}/{name}")
            plain, probed, swept = [], [], []
            for _ in range(a.repeats):
                plain.append(plain_pass(model, ds, a.batch_size, a.device))
                total, sweep = probe_pass(model, ds, a.batch_size, a.device, f"{tmp}/{name}")
                probed.append(total)
                swept.append(sweep)
            p, q, w = (statistics.median(x) for x in (plain, probed, swept))
            n = a.images

            fixed = statistics.median(t - s for t, s in zip(probed, swept))
            print(
                f"{name:10s} {n / p:12.1f} {n / q:12.1f} {p / q:5.2f}x {_spread(plain, probed):>12s}"
                f" {n / w:12.1f} {p / w:5.2f}x {_spread(plain, swept):>12s} {fixed:8.2f}"
            )


def _spread(plain: list[float], ours: list[float]) -> str:
    """The range of the per-repeat ratios (plain time / our time)."""
    ratios = [p / o for p, o in zip(plain, ours)]
    return f"[{min(ratios):.2f}-{max(ratios):.2f}]"


if __name__ == "__main__":
    main()
