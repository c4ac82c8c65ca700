"""Trace overhead: a plain forward vs ``lurker.trace`` and ``Trace.run`` (all activations
saved), side by side.

Prints, per model, the median time of each over interleaved runs and their ratios to the
plain forward. Timed is the call: the result (the forward's output, the trace with all its
saved activations) is freed after the timer stops, as a caller would free it later.
Targets: resnet18 64 px <= 1.4x, vgg11 64 px <= 1.15x, the transformer <= 3.0x, for the
trace and for ``Trace.run``. The "small models" section (a 1-op model, a 10-op MLP, a
2,944-op random graph of tiny ops) shows the fixed cost of a trace, which dominates
sub-millisecond forwards. If torchlens is installed (``pip install -e '.[bench]'``) its
``torchlens.trace(model, [x])`` is timed in the same loop, in the first ``--lens-repeats``
rounds only (it is several hundred times slower than a forward), and its ratio printed
beside ours.

    python benchmarks/trace_overhead.py [--repeats 30] [--device cpu|cuda] [--only small|large]
                                        [--threads N] [--lens-repeats 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F
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


class Interpolate(nn.Module):
    """One op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2)


class RandomGraph(nn.Module):
    """A fixed random DAG of tiny elementwise ops (each reads the last value and a random
    earlier one): thousands of ops whose kernels take about a microsecond."""

    def __init__(self, n: int = 2944, seed: int = 0):
        super().__init__()
        r = random.Random(seed)
        self.plan = [(r.randrange(3), r.random()) for _ in range(n)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals = [x]
        for kind, u in self.plan:
            a, b = vals[int(u * len(vals))], vals[-1]
            vals.append(a + b if kind == 0 else a * 0.5 if kind == 1 else torch.tanh(a))
        return vals[-1]


def small_models(device: str) -> list[tuple[str, nn.Module, tuple]]:
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    mlp = nn.Sequential(*layers, nn.Linear(16, 4), nn.Softmax(-1))
    return [
        ("interpolate 1x3x8x8", Interpolate(), (torch.randn(1, 3, 8, 8, device=device),)),
        ("MLP 10 ops", mlp.to(device), (torch.randn(2, 8, device=device),)),
        ("random graph 4x4", RandomGraph(), (torch.randn(4, 4, device=device),)),
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
    ap.add_argument("--only", choices=["small", "large"], default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument(
        "--lens-repeats", type=int, default=3, help="rounds that also time torchlens (0: none)"
    )
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        import torchlens  # type: ignore[import-not-found]
    except ImportError:
        torchlens = None
    print(f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}")
    print("(medians of interleaved runs; on a shared machine the figures are noisy)")
    if torchlens is None:
        print("torchlens is not installed: no torchlens column (pip install -e '.[bench]')")
    elif a.lens_repeats <= 0:
        torchlens = None
    else:
        print(f"torchlens {torchlens.__version__}: timed in the first {a.lens_repeats} rounds")
    head = (
        f"{'model':28s} {'ops':>5s} {'forward ms':>11s} {'trace ms':>9s} {'trace':>6s} {'run':>6s}"
    )
    sections = [("large", models), ("small", small_models)]
    for section, make in sections:
        if a.only not in (None, section):
            continue
        print(f"\n{section} models: trace / plain forward, Trace.run (all saved) / plain forward")
        print(head)
        for name, model, args in make(a.device):
            # thousands of ops: fewer repeats keep the run short, the medians stay stable
            reps = max(5, a.repeats // 3) if name.startswith("random") else a.repeats
            print(bench(name, model, args, reps, a.device, torchlens, a.lens_repeats), flush=True)


def bench(
    name: str,
    model: nn.Module,
    args: tuple,
    repeats: int,
    device: str,
    torchlens,
    lens_repeats: int = 3,
) -> str:
    """One row: medians of interleaved plain / traced / replayed (/ torchlens) forwards."""
    with torch.no_grad():
        for _ in range(3):  # warm up both paths (first-call costs are not overhead)
            model(*args)
            tr = lurker.trace(model, *args)
            tr.run(*args, save="all")
        plain, traced, ran, lens = [], [], [], []
        skip_lens = torchlens is not None and tr.num_ops > LENS_MAX_OPS
        if skip_lens:
            torchlens = None
        if torchlens is not None:
            torchlens.trace(model, list(args))  # its first-call costs are not overhead either
            _unwrap(torchlens)
        for i in range(repeats):
            plain.append(_time(lambda: model(*args), device))
            traced.append(_time(lambda: lurker.trace(model, *args), device))
            ran.append(_time(lambda: tr.run(*args, save="all"), device))
            if torchlens is not None and i < lens_repeats:
                lens.append(_time(lambda: torchlens.trace(model, list(args)), device))
                _unwrap(torchlens)
    p, t, r = statistics.median(plain), statistics.median(traced), statistics.median(ran)
    line = f"{name:28s} {tr.num_ops:5d} {p * 1e3:11.3f} {t * 1e3:9.3f} {t / p:5.2f}x {r / p:5.2f}x"
    if lens:
        line += f"   torchlens {statistics.median(lens) / p:.0f}x"
    elif skip_lens:
        line += f"   torchlens skipped (over {LENS_MAX_OPS} ops: tens of seconds a call)"
    return line


LENS_MAX_OPS = 1000


def _unwrap(torchlens) -> None:
    """torchlens leaves its wrappers on torch's functions after a trace (the next trace
    reuses them): take them off, untimed, so that the plain forward, lurker's trace and
    its replay (which checks it meets the callables it recorded) run on torch as it is."""
    torchlens.backends.torch.wrappers.unwrap_torch()


if __name__ == "__main__":
    main()
