"""Seconds to the graph page's first picture on real-sized models, in headless Chromium.

Each run is made from a trace alone (random init, nothing downloaded) with one made-up
probed layer, so building it takes seconds: torchvision's DenseNet-121 and Swin-T,
Keypoint R-CNN (ResNet-50 FPN) on one 3x128x128 image (about 3,900 ops), a loop over a
ModuleList of 4,000 residual blocks (12,000 ops: a rolled ``add`` fed back by every block)
and a GRU cell unrolled over 6,000 steps (12,000 ops that roll into a handful of nodes).
For each it prints the seconds from navigation to the page's first drawn layout
(``data-ready``), the items drawn, and the longest task on the page's main thread (a
long-task observer: how long the tab froze). Not a test; needs the front end built
(``make web``). Usage: ``python benchmarks/graph_page.py [NAME ...]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import lurker  # noqa: E402
from graph_view_speed import CHROMIUM, FLAGS, serve  # noqa: E402
from lurker.store import RunWriter  # noqa: E402
from lurker.store.writer import LayerResult  # noqa: E402


class Residuals(nn.Module):
    """``for b in blocks: x = x + b(x)`` over ``n`` small blocks."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return x


class Recurrent(nn.Module):
    """A GRU cell over every step of a sequence, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.out(h)


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kw)

    return make


def _keypoint() -> nn.Module:
    import torchvision

    return torchvision.models.detection.keypointrcnn_resnet50_fpn(
        weights=None, weights_backbone=None
    )


# name: (model, input, the layer recorded as probed)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], str]] = {
    "densenet121": (
        _tv("densenet121"),
        lambda: torch.randn(1, 3, 64, 64),
        "features.denseblock3.denselayer1.conv1",
    ),
    "swin_t": (_tv("swin_t"), lambda: torch.randn(1, 3, 224, 224), "features.5.0.mlp.0"),
    "keypointrcnn": (_keypoint, lambda: [torch.rand(3, 128, 128)], "backbone.body.layer2.0.conv1"),
    "residuals4000": (lambda: Residuals(4000), lambda: torch.randn(1, 8), "blocks.5.0"),
    "gru6000": (Recurrent, lambda: torch.randn(1, 6000, 8), "out"),
}


def build_run(name: str, out: Path) -> int:
    """A run of model ``name`` holding its graph and one layer of made-up statistics; its
    op count."""
    make, x, layer = MODELS[name]
    model = make().eval()
    with torch.no_grad():
        tr = lurker.trace(model, x(), save="none")
    op = next(o for o in tr.compute_ops if o.module == layer)
    c, k, bins = (op.shape[1] if len(op.shape) == 4 else op.shape[-1]), 2, 8
    rng = np.random.default_rng(0)
    meta = {"model": type(model).__name__, "model_fingerprint": name, "dataset": "synthetic"}
    meta |= {"k": k, "image_size": [32, 32], "config": {"data": "synthetic"}}
    with RunWriter.create(out, meta=meta, overwrite=True) as w:
        w.set_classes(["a", "b"])
        w.add_samples((i, f"synthetic/{i}.png", i % 2) for i in range(4))
        w.set_graph(tr.to_json())
        top = {f: np.sort(rng.random((c, k)), 1)[:, ::-1] for f in ("mean", "max")}
        w.write_layers_result(
            [
                LayerResult(
                    name=layer,
                    module=layer,
                    op=op.label,
                    kind="Conv2d" if len(op.shape) == 4 else "Linear",
                    shape=tuple(op.shape[1:]),
                    mean_values=top["mean"],
                    mean_ids=rng.integers(0, 4, (c, k)),
                    max_values=top["max"],
                    max_ids=rng.integers(0, 4, (c, k)),
                    max_y=np.zeros((c, k), int),
                    max_x=np.zeros((c, k), int),
                    unit_mean=rng.random(c),
                    unit_max=rng.random(c) + 1,
                    class_mean=rng.random((c, 2)),
                    hist=rng.integers(0, 10, (c, bins)),
                    hist_edges=np.linspace(0, 2, bins + 1),
                    op_index=op.index,
                )
            ]
        )
    return len(tr)


LONG_TASKS = """window.__longTasks = [];
new PerformanceObserver((l) => { for (const e of l.getEntries()) window.__longTasks.push(e.duration); })
  .observe({ entryTypes: ["longtask"] });"""


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"of {', '.join(MODELS)} (default: all)")
    args = ap.parse_args(argv)
    args.names = args.names or list(MODELS)
    if unknown := set(args.names) - set(MODELS):
        ap.error(f"no model {', '.join(sorted(unknown))}: choose from {', '.join(MODELS)}")
    from playwright.sync_api import sync_playwright

    if not (ROOT / "src/lurker/server/static/index.html").exists():
        raise SystemExit("the explorer's front end is not built: run `make web` first")
    with tempfile.TemporaryDirectory(prefix="lurker-graph-page-") as tmp:
        runs = Path(tmp) / "runs"
        ops = {}
        for name in args.names:
            t = time.perf_counter()
            ops[name] = build_run(name, runs / name)
            print(
                f"built {name} ({ops[name]:,} ops) in {time.perf_counter() - t:.1f} s", flush=True
            )
        with serve(runs) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            for name in args.names:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.add_init_script(LONG_TASKS)
                page.request.get(f"{url}api/runs/{name}/graph")  # the server makes it once
                t0 = time.perf_counter()
                page.goto(f"{url}#/r/{name}/graph")
                page.wait_for_selector(".graph-page[data-ready]", state="attached", timeout=300_000)
                ready = time.perf_counter() - t0
                drawn = page.get_attribute(".graph-page", "data-drawn")
                longest = page.evaluate("Math.max(0, ...window.__longTasks)")
                print(
                    f"{name:>14}  {ops[name]:>6,} ops  first picture {ready:6.2f} s  "
                    f"{drawn} items drawn  longest main-thread task {longest / 1000:.2f} s",
                    flush=True,
                )
                page.close()
            browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
