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

Usage: ``python benchmarks/graph_view_speed.py [--ops 2000 10000] [--repeat 3]``; needs
the front end built (``make web``). :func:`measure` is callable from other scripts.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TARGETS = {2000: 2.0, 10000: 5.0}  # seconds to interactive
EXPAND_TARGET = 0.2  # seconds


class Block(nn.Module):
    """A residual MLP block: linear, layer norm, GELU, add (4 ops)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.norm(self.fc(x)))


class Stage(nn.Module):
    def __init__(self, blocks: int, d: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(d) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def deep_model(ops: int, d: int = 8) -> nn.Module:
    """Stages of 25 blocks (100 ops each): ``ops`` ops for a multiple of 100."""
    return nn.Sequential(*[Stage(25, d) for _ in range(max(1, ops // 100))])


def build_run(out: Path, ops: int) -> Path:
    """A probed run (one layer, 8 random vectors) of a ``deep_model(ops)``, with its graph."""
    from torch.utils.data import TensorDataset

    from lurker.probe import probe

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 8), torch.zeros(8, dtype=torch.long))
    run = probe(
        deep_model(ops),
        data,
        out=out,
        layers=["0.blocks.0.fc"],
        k=2,
        batch_size=8,
        progress=False,
        overwrite=True,
    )
    assert run is not None
    run.close()
    return out


@contextmanager
def serve(source: Path) -> Iterator[str]:
    """The explorer over ``source`` (a run or a folder of runs) on a free port; its URL."""
    import uvicorn

    from lurker.server import create_app

    app = create_app(source)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the explorer server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(10)


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


def measure(sizes: Sequence[int] = (2000, 10000), repeat: int = 3) -> dict[int, dict[str, float]]:
    """Build, serve and time the graph page for each size; prints each figure beside its
    target and returns them."""
    from playwright.sync_api import sync_playwright

    if not (ROOT / "src/lurker/server/static/index.html").exists():
        raise SystemExit("the explorer's front end is not built: run `make web` first")
    results: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="lurker-graph-bench-") as tmp:
        runs = Path(tmp) / "runs"
        for n in sizes:
            t = time.perf_counter()
            build_run(runs / f"ops{n}", n)
            print(f"built run ops{n} in {time.perf_counter() - t:.1f} s", flush=True)
        with serve(runs) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            for n in sizes:
                run = f"ops{n}"
                size = len(page.request.get(f"{url}api/runs/{run}/graph").body())
                open_graph(page, url, run)  # warm: the server makes the document once
                ready, wall, own = [], [], []
                for _ in range(repeat):
                    ready.append(open_graph(page, url, run))
                    w, o = expand_first_box(page)
                    wall.append(w)
                    own.append(o)
                r = {
                    "ready_s": statistics.median(ready),
                    "expand_s": statistics.median(wall),
                    "expand_page_ms": statistics.median(own),
                    "doc_bytes": size,
                    "drawn": float(page.get_attribute(".graph-page", "data-drawn") or 0),
                }
                results[n] = r
                target = TARGETS.get(n, 5.0)
                print(
                    f"{n:>6} ops  doc {size / 1e6:.2f} MB  "
                    f"interactive {r['ready_s']:.2f} s (target < {target:g} s: "
                    f"{'ok' if r['ready_s'] < target else 'MISSED'})  "
                    f"expand {r['expand_s'] * 1000:.0f} ms wall, {r['expand_page_ms']:.0f} ms in page "
                    f"(target < {EXPAND_TARGET * 1000:.0f} ms: "
                    f"{'ok' if r['expand_s'] < EXPAND_TARGET else 'MISSED'})",
                    flush=True,
                )
            browser.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    res = measure(args.ops, args.repeat)
    missed = [
        n
        for n, r in res.items()
        if r["ready_s"] >= TARGETS.get(n, 5.0) or r["expand_s"] >= EXPAND_TARGET
    ]
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
