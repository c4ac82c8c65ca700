"""Trace overhead: a plain forward vs ``lurker.trace`` (all activations saved), side by side.

Prints, per model, the median time of each over interleaved runs and their ratio. Timed
is the call: the result (the forward's output, the trace with all its saved activations) is
freed after the timer stops, as a caller would free it later.
Targets (issue #2): <= 1.3x for the CNNs, <= 2.5x for the transformer. If torchlens is
installed it is timed in the same loop for comparison.

    python benchmarks/trace_overhead.py [--repeats 30] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

import lurker


def models(device: str) -> list[tuple[str, nn.Module, tuple]]:
    img = torch.randn(1, 3, 64, 64, device=device)
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512, batch_first=True),
        num_layers=4,
        enable_nested_tensor=False,
    )
    seq = torch.randn(1, 64, 128, device=device)
    return [
        ("resnet18 1x3x64x64", torchvision.models.resnet18().eval().to(device), (img,)),
        ("vgg11 1x3x64x64", torchvision.models.vgg11().eval().to(device), (img,)),
        ("transformer 4x(d128) seq64", enc.eval().to(device), (seq,)),
    ]


def _time(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    del result  # freed outside the timed region
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    try:
        import torchlens  # type: ignore[import-not-found]
    except ImportError:
        torchlens = None
    print(f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}")
    print(f"{'model':28s} {'ops':>5s} {'forward ms':>11s} {'trace ms':>9s} {'ratio':>6s}")
    for name, model, args in models(a.device):
        print(bench(name, model, args, a.repeats, a.device, torchlens))


def bench(name: str, model: nn.Module, args: tuple, repeats: int, device: str, torchlens) -> str:
    """One row: medians of interleaved plain / traced (/ torchlens) forwards."""
    with torch.no_grad():
        for _ in range(3):  # warm up both paths (first-call costs are not overhead)
            model(*args)
            tr = lurker.trace(model, *args)
        plain, traced, lens = [], [], []
        for _ in range(repeats):
            plain.append(_time(lambda: model(*args), device))
            traced.append(_time(lambda: lurker.trace(model, *args), device))
            if torchlens is not None:
                lens.append(_time(lambda: torchlens.trace(model, list(args)), device))
    p, t = statistics.median(plain), statistics.median(traced)
    line = f"{name:28s} {tr.num_ops:5d} {p * 1e3:11.2f} {t * 1e3:9.2f} {t / p:5.2f}x"
    if lens:
        line += f"   torchlens {statistics.median(lens) / p:.1f}x"
    return line


if __name__ == "__main__":
    main()
