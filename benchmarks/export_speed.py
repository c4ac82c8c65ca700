"""How fast ``lurker export`` writes a static site, and how many files, at real-run scale.

Two runs:

- the VGG16-scale synthetic run of the explorer benchmarks (13 conv layers, 4,224 units,
  2,000 cached sample images, 1,000 classes; statistics made up, see ``_synthetic.py``);
- torchvision's resnet18 (random weights, no download) probed on a few dozen images (an
  image folder of made-up pictures), every default layer.

For each it prints files written, MB, seconds and files/s, and beside them the files the
earlier layout needed (one JSON per unit and per sample, a sample-list page per 100, an
``input.png`` per top-k entry and a ``crop.png`` per max entry), as a ratio.

Usage: ``python benchmarks/export_speed.py [--images 48] [--px 64]``. Uses the built
front end when there is one (``make web``), else a one-line page (the data is the same).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import vgg16_run

ROOT = Path(__file__).resolve().parents[1]


def resnet18_run(out: Path, n_images: int, px: int) -> Path:
    """resnet18 (random weights) probed on ``n_images`` made-up pictures in two classes."""
    import torchvision
    from PIL import Image

    from lurker.probe import probe
    from lurker.probe.data import image_folder

    rng = np.random.default_rng(0)
    folder = out.parent / "images"
    yy, xx = np.mgrid[0:px, 0:px]
    for i in range(n_images):
        cls = folder / ("stripes" if i % 2 else "waves")
        cls.mkdir(parents=True, exist_ok=True)
        f = rng.uniform(0.05, 0.4, 3)
        rgb = np.stack([127 + 120 * np.sin(f[j] * (xx + (j - 1) * yy) + i) for j in range(3)], -1)
        Image.fromarray(rgb.astype(np.uint8)).save(cls / f"{i:03d}.png")
    model = torchvision.models.resnet18(weights=None).eval()
    run = probe(model, image_folder(folder, px), out=out, k=9, batch_size=16, progress=False)
    assert run is not None
    run.close()
    return out


def earlier_layout_files(run_dir: Path) -> int:
    """Files the per-unit, per-entry layout wrote for this run (see the module doc)."""
    from lurker.store import Run

    with Run.open(run_dir) as run:
        samples = run._query("SELECT count(*) FROM samples")[0][0]
        units = entries = max_entries = 0
        for info in run.layers:
            for u in run.units(info.name):
                units += 1
                n_max, n_mean = len(u.top("max")), len(u.top("mean"))
                entries += n_max + n_mean
                max_entries += n_max
        layers = len(run.layers)
    pages = -(-samples // 100)
    return 3 + layers + units + samples + pages + samples + entries + max_entries


def measure(name: str, run_dir: Path, static: Path | None, out: Path) -> None:
    from lurker.server import export_site

    t = time.perf_counter()
    export_site(run_dir, out, static_dir=static, progress=False)
    seconds = time.perf_counter() - t
    files = [Path(d) / f for d, _, fs in os.walk(out / "data") for f in fs]
    mb = sum(f.stat().st_size for f in files) / 1e6
    before = earlier_layout_files(run_dir)
    print(
        f"{name:<10} {len(files):>8,} files {mb:>8.1f} MB {seconds:>7.2f} s "
        f"{len(files) / seconds:>9,.0f} files/s   earlier layout: {before:>9,} files "
        f"({before / len(files):.0f}x as many)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=48, help="images resnet18 is probed on")
    ap.add_argument("--px", type=int, default=64, help="their size in pixels")
    args = ap.parse_args(argv)
    built = ROOT / "src" / "lurker" / "server" / "static"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        static: Path | None = built if (built / "index.html").is_file() else None
        if static is None:
            static = root / "static"
            static.mkdir()
            (static / "index.html").write_text("<!doctype html><html><head></head></html>")
        print("building the runs ...", file=sys.stderr)
        vgg = vgg16_run(root / "vgg16" / "vgg16")
        resnet = resnet18_run(root / "resnet18" / "resnet18", args.images, args.px)
        print(f"{'run':<10} {'written':>14} {'size':>11} {'time':>9} {'rate':>15}")
        measure("vgg16", vgg, static, root / "site-vgg16")
        measure("resnet18", resnet, static, root / "site-resnet18")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
