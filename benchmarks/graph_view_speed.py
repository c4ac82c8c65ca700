"""How fast the explorer's graph page becomes usable, in headless Chromium on localhost.

Builds runs whose graphs have about 2,000 and 10,000 ops (stages of residual MLP blocks,
nested three modules deep, probed on a few random vectors), serves them with the real
server (``lurker.server.create_app`` under uvicorn) and measures with Playwright driving
Debian's /usr/bin/chromium:

- time to interactive: from navigation to the page's ``data-ready`` attribute (set when
  the first layout is drawn, groups beyond depth 1 collapsed), target < 2 s (2,000 ops)
  and < 5 s (10,000 ops);
- expanding a group: from the click on a collapsed box to its contents drawn, target
  < 200 ms (the page's own ``data-expand-ms``, and the wall time seen from Playwright);
- the graph document's size (compact JSON as served).

A third run, ``flat10000``, is one Sequential of 10,000 leaf layers: a single group too
big for dagre, laid out by the page's linear-time fallback (no group to expand).

``--densenet`` also times DenseNet-121 (random init): opening ``features.denseblock3``
(300 edges between 25 items, drawn as trunks with taps) and then opening and closing one
of its layers, the clicks inside an open dense block.

Usage: ``python benchmarks/graph_view_speed.py [--ops 2000 10000] [--repeat 3] [--densenet]``; needs
the front end built (``make web``). :func:`measure` is callable from other scripts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lurker.examples import deep_mlp

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TARGETS = {2000: 2.0, 10000: 5.0}  # seconds to interactive
EXPAND_TARGET = 0.2  # seconds


def flat_model(ops: int, d: int = 8) -> nn.Module:
    """One Sequential of ``ops`` leaf layers (linear, ReLU, ...): a single group of ``ops``
    items, the case that the page lays out without dagre."""
    return nn.Sequential(*[nn.Linear(d, d) if i % 2 == 0 else nn.ReLU() for i in range(ops)])


def build_run(out: Path, ops: int, *, flat: bool = False) -> Path:
    """A probed run (one layer, 8 random vectors) of a ``deep_mlp(ops)`` (or a
    ``flat_model``), with its graph."""
    from torch.utils.data import TensorDataset

    from lurker.probe import probe

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 8), torch.zeros(8, dtype=torch.long))
    run = probe(
        flat_model(ops) if flat else deep_mlp(ops),
        data,
        out=out,
        layers=["0"] if flat else ["0.blocks.0.fc"],
        k=2,
        batch_size=8,
        progress=False,
        overwrite=True,
    )
    assert run is not None
    run.close()
    return out


@contextmanager
def serve(source: Path, static_dir: Path | None = None) -> Iterator[str]:
    """The explorer over ``source`` (a run or a folder of runs) on a free port; its URL.
    ``static_dir``: another build of the front end than the package's."""
    from lurker.server import create_app
    from lurker.server.serve import background

    with background(create_app(source, static_dir=static_dir)) as url:
        yield url


def open_graph(page: Any, url: str, run: str) -> float:
    """Seconds from navigation to the graph page's first drawn layout."""
    page.goto("about:blank")
    t0 = time.perf_counter()
    page.goto(f"{url}#/r/{run}/graph")
    page.wait_for_selector(".graph-page[data-ready]", state="attached", timeout=60_000)
    return time.perf_counter() - t0


def expand_first_box(page: Any) -> tuple[float, float]:
    """(wall seconds, the page's own ms) to open the first collapsed group drawn."""
    draws = int(page.get_attribute(".graph-page", "data-draws") or 0)
    box = page.locator("svg.graph g.box").first
    t0 = time.perf_counter()
    box.click()
    page.wait_for_function(
        "n => +document.querySelector('.graph-page').dataset.draws > n", arg=draws, timeout=30_000
    )
    wall = time.perf_counter() - t0
    return wall, float(page.get_attribute(".graph-page", "data-expand-ms") or "nan")


def measure(
    sizes: Sequence[int] = (2000, 10000), repeat: int = 3, flat: Sequence[int] = (10000,)
) -> dict[str, dict[str, float]]:
    """Build, serve and time the graph page for each size; prints each figure beside its
    target and returns them."""
    from playwright.sync_api import sync_playwright

    if not (ROOT / "src/lurker/server/static/index.html").exists():
        raise SystemExit("the explorer's front end is not built: run `make web` first")
    results: dict[str, dict[str, float]] = {}
    cases = [(f"ops{n}", n, False) for n in sizes] + [(f"flat{n}", n, True) for n in flat]
    with tempfile.TemporaryDirectory(prefix="lurker-graph-bench-") as tmp:
        runs = Path(tmp) / "runs"
        for run, n, is_flat in cases:
            t = time.perf_counter()
            build_run(runs / run, n, flat=is_flat)
            print(f"built run {run} in {time.perf_counter() - t:.1f} s", flush=True)
        with serve(runs) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            for run, n, is_flat in cases:
                size = len(page.request.get(f"{url}api/runs/{run}/graph").body())
                open_graph(page, url, run)  # warm: the server makes the document once
                ready, wall, own = [], [], []
                for _ in range(repeat):
                    ready.append(open_graph(page, url, run))
                    if not is_flat:
                        w, o = expand_first_box(page)
                        wall.append(w)
                        own.append(o)
                r = {
                    "ready_s": statistics.median(ready),
                    "expand_s": statistics.median(wall) if wall else 0.0,
                    "expand_page_ms": statistics.median(own) if own else 0.0,
                    "doc_bytes": size,
                    "drawn": float(page.get_attribute(".graph-page", "data-drawn") or 0),
                }
                results[run] = r
                target = TARGETS.get(n, 5.0)
                expand = (
                    "no group to expand"
                    if is_flat
                    else f"expand {r['expand_s'] * 1000:.0f} ms wall, "
                    f"{r['expand_page_ms']:.0f} ms in page (target < {EXPAND_TARGET * 1000:.0f} ms: "
                    f"{'ok' if r['expand_s'] < EXPAND_TARGET else 'MISSED'})"
                )
                print(
                    f"{run:>10}  {r['drawn']:.0f} drawn  doc {size / 1e6:.2f} MB  "
                    f"interactive {r['ready_s']:.2f} s (target < {target:g} s: "
                    f"{'ok' if r['ready_s'] < target else 'MISSED'})  {expand}",
                    flush=True,
                )
            browser.close()
    return results


def measure_densenet(repeat: int = 3) -> dict[str, float]:
    """Seconds (wall, median) to open DenseNet-121's ``denseblock3`` and to open one of its
    layers inside it; prints them."""
    import torchvision
    from playwright.sync_api import sync_playwright
    from torch.utils.data import TensorDataset

    from lurker.probe import probe

    def click(page: Any, sel: str) -> float:
        n = int(page.get_attribute(".graph-page", "data-draws") or 0)
        t0 = time.perf_counter()
        page.locator(sel).dispatch_event("click")
        page.wait_for_function(
            "n => +document.querySelector('.graph-page').dataset.draws > n", arg=n, timeout=60_000
        )
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="lurker-graph-bench-") as tmp:
        torch.manual_seed(0)
        data = TensorDataset(torch.randn(4, 3, 64, 64), torch.zeros(4, dtype=torch.long))
        model = torchvision.models.densenet121().eval()
        layer = "features.denseblock3.denselayer1.conv1"
        out = Path(tmp) / "densenet"
        run = probe(model, data, out=out, layers=[layer], k=2, batch_size=4, progress=False)
        assert run is not None
        run.close()
        with serve(out) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            doc = page.request.get(f"{url}api/runs/densenet/graph").json()
            gi = {g["p"]: i for i, g in enumerate(doc["groups"])}
            block, inner = gi["features.denseblock3"], gi["features.denseblock3.denselayer12"]
            opens, inside = [], []
            for _ in range(repeat):
                open_graph(page, url, "densenet")
                opens.append(click(page, f'svg.graph .box[data-k="g{block}"]'))
                inside.append(click(page, f'svg.graph .box[data-k="g{inner}"]'))
                click(page, f'svg.graph .frame[data-k="g{inner}"] > .title')
            browser.close()
    r = {"open_block_s": statistics.median(opens), "open_inside_s": statistics.median(inside)}
    print(
        f"  densenet  open denseblock3 {r['open_block_s'] * 1000:.0f} ms, "
        f"open a layer inside it {r['open_inside_s'] * 1000:.0f} ms",
        flush=True,
    )
    return r


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--flat", type=int, nargs="*", default=[10000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--densenet", action="store_true", help="also time DenseNet-121's block 3")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    res = measure(args.ops, args.repeat, args.flat)
    if args.densenet:
        measure_densenet(args.repeat)
    missed = [
        run
        for run, r in res.items()
        if r["ready_s"] >= TARGETS.get(int(run.removeprefix("ops").removeprefix("flat")), 5.0)
        or r["expand_s"] >= EXPAND_TARGET
    ]
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
