"""What ``Trace.validate()`` costs, in plain forwards, measured side by side.

Validation re-runs every op from its saved inputs (about one forward) and runs one
untraced forward to compare outputs, so it should cost about two forwards. Issue #10
found r3d_18 taking over 60 s, most of it in ``torch.allclose``.

    python benchmarks/validate_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import lurker


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cases = [
        ("r3d_18 1x3x8x64x64", torchvision.models.video.r3d_18(), torch.randn(1, 3, 8, 64, 64)),
        ("resnet18 1x3x64x64", torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)),
    ]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'model':<22}{'forward s':>11}{'validate s':>12}{'ratio':>8}")
    for name, model, x in cases:
        model.eval()
        tr = lurker.trace(model, x)
        fwd, val = [], []
        for _ in range(args.repeats):  # interleaved, so load changes hit both alike
            t0 = time.perf_counter()
            with torch.no_grad():
                model(x)
            fwd.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            tr.validate()
            val.append(time.perf_counter() - t0)
        f, v = statistics.median(fwd), statistics.median(val)
        print(f"{name:<22}{f:>11.3f}{v:>12.3f}{v / f:>7.2f}x")


if __name__ == "__main__":
    main()
