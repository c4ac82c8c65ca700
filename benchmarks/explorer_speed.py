"""How fast the explorer feels, in headless Chromium on localhost, at VGG16 scale.

Builds a VGG16-scale run (13 conv layers, 4,224 units, 2,000 sample images; statistics
made up, see ``_synthetic.py``), serves it with the real server and measures with
Playwright driving Debian's /usr/bin/chromium, each page in a fresh browser context (cold
HTTP cache):

- first paint of the home page and of a layer page (512 units): from navigation start to
  the page's content in the DOM, target < 1 s;
- the unit page after a click on the layer grid, target < 150 ms (content), and until
  its nine top-k images have loaded;
- the bytes the home page fetched for its first paint, target < 500 KB;
- a wide layer page (``classifier.0``, 4,096 units, as wide as a ViT MLP or resnet50's
  layer4): its first screen of cards, all its cards, the main thread's long tasks (> 50 ms,
  summed) while it loads, and a change of sort until the next frame is painted;
- the graph page (via ``graph_view_speed.measure``): interactive < 2 s for 2,000 ops and
  < 5 s for 10,000 ops, expanding a group < 200 ms.

Usage: ``python benchmarks/explorer_speed.py [--repeat 3] [--no-graph]
[--baseline-static DIR]``; needs the front end built (``make web``). Figures are medians;
each is printed beside its target. ``--baseline-static``: a copy of an earlier build of
the front end (``src/lurker/server/static``), whose wide-layer figures are measured in the
same run, on the same data, and printed beside this build's with their ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import vgg16_run
from graph_view_speed import CHROMIUM, FLAGS, ROOT, measure, serve

LAYER = "features.28"  # the last conv: 512 units
WIDE = "classifier.0"  # a Linear: 4,096 units
RUN = "vgg16"

# In the page: collect long tasks from navigation on (buffered), so the sum covers the load.
_LONG_TASKS = """
window.__long = 0;
new PerformanceObserver((l) => { for (const e of l.getEntries()) window.__long += e.duration; })
  .observe({ type: "longtask", buffered: true });
"""


def _first_paint(browser: Any, url: str, ready_js: str) -> tuple[float, int]:
    """(ms from navigation start until ``ready_js`` is true, bytes received until then)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    page = ctx.new_page()
    received: list[int] = []

    def count(response: Any) -> None:
        with contextlib.suppress(Exception):  # redirects, aborted requests: no body
            received.append(len(response.body()))

    page.on("response", count)
    page.goto(url)
    page.wait_for_function(ready_js, timeout=30_000)
    ms = float(page.evaluate("performance.now()"))
    page.wait_for_load_state("networkidle")
    total = sum(received)
    ctx.close()
    return ms, total


def _unit_after_click(browser: Any, url: str) -> tuple[float, float]:
    """(ms from the click on a unit of the layer grid to the unit page's top-k in the
    DOM, ms until all those images have loaded)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    page = ctx.new_page()
    page.goto(f"{url}#/r/{RUN}/layer/{LAYER}")
    page.wait_for_function("document.querySelectorAll('.unit-card').length >= 512")
    page.wait_for_load_state("networkidle")
    page.evaluate(
        "() => { window.__t0 = performance.now();"
        " document.querySelectorAll('.unit-card')[7].click(); }"
    )
    page.wait_for_function("document.querySelectorAll('figure.top-entry').length >= 9")
    content = float(page.evaluate("performance.now() - window.__t0"))
    page.wait_for_function(
        "[...document.querySelectorAll('figure.top-entry img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    images = float(page.evaluate("performance.now() - window.__t0"))
    ctx.close()
    return content, images


def _wide_layer(browser: Any, url: str) -> dict[str, float]:
    """The wide layer page: ms to its first screen of cards (60) with its histogram, ms
    until every card is in the DOM, ms of long tasks until then plus the network going
    idle, and ms from a click on "sort by mean" to the next painted frame with the grid
    in that order."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    page = ctx.new_page()
    page.add_init_script(_LONG_TASKS)
    page.goto(f"{url}#/r/{RUN}/layer/{WIDE}?sort=max")
    page.wait_for_function(
        "document.querySelectorAll('.unit-card').length >= 60 && "
        "document.querySelector('.chart-card svg') !== null",
        timeout=60_000,
    )
    first = float(page.evaluate("performance.now()"))
    page.wait_for_function("document.querySelectorAll('.unit-card').length >= 4096", timeout=60_000)
    full = float(page.evaluate("performance.now()"))
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(300)
    long = float(page.evaluate("window.__long"))
    # the unit of highest mean, from the API (not the page): the grid's first card after the
    # sort must be it
    doc = page.request.get(f"{url}api/runs/{RUN}/layers/{WIDE}").json()
    best = max(doc["units"], key=lambda u: u["mean"])["unit"]
    sort_ms = float(
        page.evaluate(
            """async (best) => {
              const t0 = performance.now();
              [...document.querySelectorAll('button')].find((b) => b.textContent === 'mean').click();
              while (document.querySelector('.unit-card')?.dataset.unit !== String(best))
                await new Promise((r) => setTimeout(r, 0));
              await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
              return performance.now() - t0;
            }""",
            best,
        )
    )
    ctx.close()
    return {"first": first, "full": full, "long": long, "sort": sort_ms}


def _row(name: str, value: float, unit: str, target: float) -> None:
    ok = "ok" if value < target else "MISSED"
    print(f"{name:<52} {value:10.1f} {unit:<3} target < {target:g} {unit:<3} {ok}")


def _wide(browser: Any, url: str, repeat: int) -> dict[str, float]:
    """Medians of :func:`_wide_layer` over ``repeat`` fresh contexts."""
    runs = [_wide_layer(browser, url) for _ in range(repeat)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-graph", action="store_true", help="skip the graph page figures")
    ap.add_argument("--baseline-static", type=Path, default=None, help="an earlier front end")
    a = ap.parse_args(argv)
    if not (ROOT / "src/lurker/server/static/index.html").exists():
        raise SystemExit("the explorer's front end is not built: run `make web` first")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="lurker-explorer-bench-") as tmp:
        t = time.perf_counter()
        vgg16_run(Path(tmp) / "runs" / RUN, linear=True)
        print(f"built a VGG16-scale run (12,416 units) in {time.perf_counter() - t:.1f} s")
        with serve(Path(tmp) / "runs") as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            home_js = "document.querySelectorAll('#page table tbody tr').length >= 13"
            layer_js = (
                "document.querySelectorAll('.unit-card').length >= 512 && "
                "document.querySelector('.chart-card svg') !== null"
            )
            _first_paint(browser, f"{url}#/r/{RUN}", home_js)  # warm the server's caches
            home = [_first_paint(browser, f"{url}#/r/{RUN}", home_js) for _ in range(a.repeat)]
            layer = [
                _first_paint(browser, f"{url}#/r/{RUN}/layer/{LAYER}", layer_js)
                for _ in range(a.repeat)
            ]
            unit = [_unit_after_click(browser, url) for _ in range(a.repeat)]
            wide = {"this build": _wide(browser, url, a.repeat)}
            if a.baseline_static:
                with serve(Path(tmp) / "runs", static_dir=a.baseline_static) as base_url:
                    wide["baseline"] = _wide(browser, base_url, a.repeat)
            browser.close()
    print(f"\nexplorer speed (medians of {a.repeat}; headless chromium, localhost)")
    _row("home: first paint", statistics.median(m for m, _ in home), "ms", 1000)
    _row(
        "home: bytes fetched (until the network is idle)",
        statistics.median(b for _, b in home) / 1e3,
        "KB",
        500,
    )
    _row(
        f"layer page ({LAYER}, 512 units): first paint",
        statistics.median(m for m, _ in layer),
        "ms",
        1000,
    )
    _row("unit page after a click: content", statistics.median(c for c, _ in unit), "ms", 150)
    print(
        f"{'unit page after a click: all 9 images loaded':<52} {statistics.median(i for _, i in unit):10.1f} ms"
    )
    print(f"\nwide layer page ({WIDE}, 4,096 units; medians of {a.repeat})")
    labels = {
        "first": "first screen of cards (60) and histogram",
        "full": "every card in the DOM",
        "long": "long tasks (> 50 ms) while loading, summed",
        "sort": "sort by mean: click to next painted frame",
    }
    for key, label in labels.items():
        line = f"{label:<52} {wide['this build'][key]:10.1f} ms"
        if "baseline" in wide:
            b = wide["baseline"][key]
            ratio = b / max(wide["this build"][key], 1e-9)
            line += f"   baseline {b:10.1f} ms   baseline/this {ratio:6.2f}x"
        print(line)
    if not a.no_graph:
        print()
        measure(sizes=(2000, 10000), repeat=a.repeat, flat=())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
