"""Drawing speed: seconds to trace, then to draw (``Trace.render`` to SVG) at full depth and depth 2.

Models are random-init torchvision architectures on one 3x128x128 image (nothing is
downloaded). keypointrcnn_resnet50_fpn is seeded so that it keeps 100 detections, which
makes its keypoint post-processing loop run 100 times (about 3,900 ops): the drawing that
used to keep ``dot`` busy for many minutes. A drawing whose long loops were rolled
automatically is marked "rolled"; ``--no-auto-roll`` times every pass drawn (it may hit
``--timeout``).

    python benchmarks/render_speed.py [--models resnet18,keypointrcnn_resnet50_fpn]

``--anchors`` also draws each model at depth 2 with the invisible ties of unfed nodes
forcing a rank each (``minlen`` 1, as before they were allowed to share their anchor's
rank) and prints the ratio to the drawing as it is, measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

import lurker
from lurker.errors import LurkerError
from lurker.render import graphviz as gv

MODELS = ("resnet18", "densenet121", "swin_t", "keypointrcnn_resnet50_fpn")


def build(name: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(1)
    if name == "keypointrcnn_resnet50_fpn":
        model = torchvision.models.detection.keypointrcnn_resnet50_fpn(
            weights=None, weights_backbone=None
        )
        return model.eval(), ([torch.rand(3, 128, 128)],)
    model = torchvision.models.get_model(name, weights=None)
    return model.eval(), (torch.randn(1, 3, 128, 128),)


def draw(tr: lurker.Trace, path: Path, depth: int | None, auto_roll: bool, timeout: float) -> str:
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tr.render(path, depth=depth, auto_roll=auto_roll, timeout=timeout)
        except LurkerError as e:
            return f"failed ({str(e)[:40]}...)"
    dt = time.perf_counter() - t0
    rolled = any("loops drawn rolled" in str(w.message) for w in caught)
    return f"{dt:7.2f} s" + (" rolled" if rolled else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--timeout", type=float, default=600.0, help="dot's limit per drawing (s)")
    ap.add_argument("--no-auto-roll", dest="auto_roll", action="store_false")
    ap.add_argument("--anchors", action="store_true", help="compare ties forcing a rank (depth 2)")
    a = ap.parse_args()
    print(f"{'model':28s} {'ops':>6s} {'trace':>8s} {'full depth':>16s} {'depth 2':>16s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            model, args = build(name)
            t0 = time.perf_counter()
            with torch.no_grad():
                tr = lurker.trace(model, *args, save="none")
            traced = time.perf_counter() - t0
            full = draw(tr, Path(tmp) / f"{name}.svg", None, a.auto_roll, a.timeout)
            two = draw(tr, Path(tmp) / f"{name}_d2.svg", 2, a.auto_roll, a.timeout)
            print(f"{name:28s} {tr.num_ops:6,d} {traced:6.1f} s {full:>16s} {two:>16s}", flush=True)
            if a.anchors:
                now = gv.ANCHOR_EDGE
                try:
                    gv.ANCHOR_EDGE = {"style": "invis"}  # dot's default minlen: 1
                    t0 = time.perf_counter()
                    old = draw(tr, Path(tmp) / f"{name}_d2_old.svg", 2, a.auto_roll, a.timeout)
                    t_old = time.perf_counter() - t0
                finally:
                    gv.ANCHOR_EDGE = now
                t0 = time.perf_counter()
                draw(tr, Path(tmp) / f"{name}_d2_new.svg", 2, a.auto_roll, a.timeout)
                t_new = time.perf_counter() - t0
                print(
                    f"{'':28s} depth 2, ties forcing a rank: {old.strip()}; sharing: "
                    f"{t_new:.2f} s ({t_old / t_new:.1f}x faster)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
