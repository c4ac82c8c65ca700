"""How smooth the Map page is at 50,000 points, in headless Chromium on localhost.

Builds a run holding only a 50,000-point map (10 gaussian clusters, 10 classes, one in
ten points misclassified; written with ``RunWriter.write_map`` as ``lurker map`` does),
serves it with the real server and measures with Playwright driving Debian's
/usr/bin/chromium at 1280 x 800:

- first paint: navigation start to the canvas drawn with every point, target < 1.5 s;
- pan and zoom: one synthetic wheel or drag event per frame for 90 frames each (as a
  trackpad or a mouse drag sends them); the page's draw per frame and the interval between
  frames, target < 16.7 ms (60 fps; 33 ms = 30 fps at worst);
- hover: the mousemove handler (quadtree search + the tooltip), target < 16.7 ms;
- lasso: the pointerup handler selecting about half the points (point-in-polygon of a
  200-vertex outline + the selection panel), target < 100 ms.

``--disable-gpu`` means Skia draws the canvas on the CPU: a browser with GPU canvas is
usually faster. Usage: ``python benchmarks/map_page_speed.py [--n 50000] [--repeat 3]``;
needs the front end built (``make web``). Figures are medians (and the 95th percentile).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from graph_view_speed import CHROMIUM, FLAGS, ROOT, serve

RUN = "map50k"
FRAME = 1000 / 60

# Installed in the page: every animation-frame callback the page queues (its draw) is timed,
# and event handlers are timed from a window capture listener (before the page's) to a
# bubble listener (after). `animate` sends one synthetic wheel or drag event per frame for
# `frames` frames (as a trackpad or a mouse drag does) and answers the intervals between
# frames and the draws' durations meanwhile.
PROBE_JS = """() => {
  const w = window, raf = w.requestAnimationFrame.bind(w);
  w.__t = {handler: [], draws: []};
  w.requestAnimationFrame = (cb) => raf((t) => {
    const s = performance.now(); cb(t); w.__t.draws.push(performance.now() - s);
  });
  for (const type of ["mousemove", "pointerup"]) {
    w.addEventListener(type, () => (w.__t.t0 = performance.now()), {capture: true});
    w.addEventListener(type, () => w.__t.handler.push([type, performance.now() - w.__t.t0]));
  }
  w.__animate = (kind, frames) => new Promise((done) => {
    const c = document.querySelector("canvas.map-canvas"), r = c.getBoundingClientRect();
    const cx = r.left + r.width / 2, cy = r.top + r.height / 2;
    const at = (i) => ({clientX: cx + 150 * Math.sin(i / 9), clientY: cy + 90 * Math.cos(i / 7),
                        bubbles: true, cancelable: true, view: w});
    const stamps = [];
    w.__t.draws = [];
    if (kind === "pan") c.dispatchEvent(new MouseEvent("mousedown", {...at(0), button: 0}));
    const step = (t) => {
      stamps.push(t);
      const i = stamps.length;
      if (i > frames) {
        if (kind === "pan") w.dispatchEvent(new MouseEvent("mouseup", at(i)));
        const gaps = stamps.slice(1).map((s, j) => s - stamps[j]);
        return done({intervals: gaps, draws: w.__t.draws.slice()});
      }
      if (kind === "zoom")
        c.dispatchEvent(new WheelEvent("wheel", {...at(0), deltaY: i <= frames / 2 ? -40 : 40}));
      else w.dispatchEvent(new MouseEvent("mousemove", at(i)));
      raf(step);
    };
    raf(step);
  });
}"""
SETTLE_JS = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


def build_run(out: Path, n: int) -> Path:
    """A complete run whose only content is an ``n``-point map (and its samples' labels)."""
    from lurker.store import RunWriter

    rng = np.random.default_rng(0)
    k = 10
    label = rng.integers(0, k, n)
    centres = rng.normal(0, 12, (k, 2))
    xy = centres[label] + rng.normal(0, 2.5, (n, 2))
    wrong = rng.random(n) < 0.1
    pred = np.where(wrong, (label + rng.integers(1, k, n)) % k, label)
    conf = rng.uniform(0.3, 1.0, n)
    meta = {"model": "synthetic", "model_fingerprint": "synthetic-map", "dataset": "synthetic",
            "k": 9, "image_size": [32, 32]}  # fmt: skip
    with RunWriter.create(out, meta=meta, overwrite=True) as w:
        w.set_classes([f"class {i}" for i in range(k)])
        w.add_samples((i, f"synthetic/{i}.png", int(label[i])) for i in range(n))
        w.write_layers_result([])  # complete, with no layer statistics
        w.write_map(np.arange(n), xy, pred, conf, {"layer": "fc", "method": "tsne",
                                                   "engine": "synthetic", "seconds": 0.0})  # fmt: skip
    return out


def _stats(xs: Sequence[float]) -> str:
    if not xs:
        return "n/a"
    p95 = float(np.percentile(xs, 95))
    return f"median {statistics.median(xs):6.1f} ms  p95 {p95:6.1f} ms  max {max(xs):6.1f} ms"


def _verdict(ms: float, target: float) -> str:
    return "ok" if ms < target else "OVER"


def measure(n: int, repeat: int) -> dict[str, float]:
    """Serve a run of ``n`` map points and time the Map page; prints and returns the
    figures (ms)."""
    from playwright.sync_api import sync_playwright

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_run(Path(tmp) / RUN, n)
        with serve(Path(tmp)) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            paints, data_at, draws, intervals, hovers, lassos = [], [], [], [], [], []
            selected = 0
            for _ in range(repeat):
                ctx = browser.new_context(viewport={"width": 1280, "height": 800})
                page = ctx.new_page()
                page.goto("about:blank")
                page.goto(f"{url}#/r/{RUN}/map")
                page.wait_for_function(
                    f"() => document.querySelector('canvas.map-canvas')?.dataset.shown == {n}",
                    timeout=60_000,
                )
                page.evaluate(SETTLE_JS)  # the first draw is in this frame
                paints.append(float(page.evaluate("performance.now()")))
                data_at.append(float(page.evaluate(
                    "() => performance.getEntriesByType('resource')"
                    ".find(e => /\\/map(\\.json)?$/.test(e.name)).responseEnd"
                )))  # fmt: skip
                g = page.evaluate(
                    "() => { const r = document.querySelector('canvas.map-canvas')"
                    ".getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; }"
                )
                cx, cy = g[0] + g[2] / 2, g[1] + g[3] / 2
                page.evaluate(PROBE_JS)
                for kind in ("zoom", "pan"):
                    t = page.evaluate(f"() => window.__animate('{kind}', 90)")
                    draws += t["draws"]
                    intervals += t["intervals"]
                page.evaluate("() => { window.__t.handler = []; }")
                for j in range(30):  # hover across the map
                    page.mouse.move(g[0] + g[2] * (0.2 + 0.02 * j), cy + 40 * np.sin(j))
                    page.evaluate(SETTLE_JS)
                t = page.evaluate("() => window.__t")
                hovers += [ms for kind, ms in t["handler"] if kind == "mousemove"]
                page.get_by_role("button", name="lasso select").click()
                turns = np.linspace(0, 2 * np.pi, 200, endpoint=False)
                r = 0.3 * min(g[2], g[3])
                page.mouse.move(cx + r, cy)
                page.mouse.down()
                for a in turns[1:]:
                    page.mouse.move(cx + r * np.cos(a) * 1.6, cy + r * np.sin(a))
                page.evaluate("() => { window.__t.handler = []; }")
                page.mouse.up()
                page.evaluate(SETTLE_JS)
                t = page.evaluate("() => window.__t")
                lassos += [ms for kind, ms in t["handler"] if kind == "pointerup"]
                head = page.locator(".map-selection h2").inner_text()
                selected = int(head.split(":")[1].split()[0].replace(",", ""))
                ctx.close()
            browser.close()
    print(f"Map page, {n:,} points, headless Chromium (software canvas), {repeat} loads")
    out["first_paint"] = statistics.median(paints)
    print(f"  first paint          {out['first_paint']:7.0f} ms  target < 1500 ms  "
          f"{_verdict(out['first_paint'], 1500)}")  # fmt: skip
    out["map_data"] = statistics.median(data_at)
    print(f"    of which the map's JSON arrived at {out['map_data']:.0f} ms")
    out["draw"] = statistics.median(draws)
    print(f"  draw per pan/zoom    {_stats(draws)}  target < {FRAME:.1f} ms  "
          f"{_verdict(float(np.percentile(draws, 95)), FRAME)}")  # fmt: skip
    out["frame_interval"] = statistics.median(intervals)
    print(f"  frame interval       {_stats(intervals)}  (60 fps = {FRAME:.1f} ms)")
    out["hover"] = statistics.median(hovers)
    print(f"  hover handler        {_stats(hovers)}  target < {FRAME:.1f} ms  "
          f"{_verdict(out['hover'], FRAME)}")  # fmt: skip
    out["lasso"] = statistics.median(lassos)
    print(f"  lasso select         {_stats(lassos)}  ({selected:,} of {n:,} points selected)"
          f"  target < 100 ms  {_verdict(out['lasso'], 100)}")  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    measure(args.n, args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
