"""Speed of the explorer's JSON API on a VGG16-scale run (a benchmark, not a test).

Builds a synthetic run shaped like VGG16's 13 conv layers (4,224 units, k=9, 1,000
classes, 50,000 samples, 64 histogram bins) with RunWriter, then times the endpoints the
pages call, through the app in process (no network): the first call (cold: indexes are
built then) and the median of the next ones. Prints each figure beside its target.

    PYTHONPATH=src python benchmarks/explorer_api_speed.py [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from lurker.store import LayerResult, RunWriter

CHANNELS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
SIZES = [224, 224, 112, 112, 56, 56, 56, 28, 28, 28, 14, 14, 14]


def build(out: Path, samples: int = 50_000, k: int = 9, classes: int = 1000) -> Path:
    rng = np.random.default_rng(0)
    meta = {
        "model": "VGG",
        "model_fingerprint": "bench",
        "dataset": f"synthetic ({samples} images)",
        "k": k,
        "image_size": [224, 224],
        "config": {"input_shape": [3, 224, 224], "hist_bins": 64},
    }
    w = RunWriter.create(out, meta=meta, overwrite=True)
    w.set_classes([f"class {i}" for i in range(classes)])
    w.add_samples((i, f"/data/val/{i % classes}/{i}.JPEG", i % classes) for i in range(samples))
    layers = []
    for n, (c, s) in enumerate(zip(CHANNELS, SIZES)):

        def ids(c: int = c) -> np.ndarray:
            return rng.integers(0, samples, (c, k))

        layers.append(
            LayerResult(
                name=f"features.{n}",
                module=f"features.{n}",
                op=f"conv2d_{n + 1}",
                kind="Conv2d",
                shape=(c, s, s),
                mean_values=np.sort(rng.random((c, k)))[:, ::-1],
                mean_ids=ids(),
                max_values=np.sort(rng.random((c, k)))[:, ::-1] * 10,
                max_ids=ids(),
                max_y=rng.integers(0, s, (c, k)),
                max_x=rng.integers(0, s, (c, k)),
                unit_mean=rng.random(c),
                unit_max=rng.random(c) * 10,
                class_mean=rng.random((c, classes)).astype(np.float32),
                hist=rng.integers(0, 1000, (c, 64)).astype(np.float64),
                hist_edges=np.linspace(0, 10, 65),
            )
        )
    w.write_layers_result(layers)
    w.close()
    return out


def timed(client, path: str, repeat: int = 9) -> tuple[float, float, int]:
    """(first call ms, median of the next ms, bytes)."""
    t0 = time.perf_counter()
    r = client.get(path)
    first = (time.perf_counter() - t0) * 1e3
    assert r.status_code == 200, (path, r.status_code, r.text[:200])
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        client.get(path)
        times.append((time.perf_counter() - t0) * 1e3)
    return first, statistics.median(times), len(r.content)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="where to build the run (default: a temp dir)")
    a = ap.parse_args()
    root = Path(a.out or tempfile.mkdtemp(prefix="lurker-bench-"))
    t0 = time.perf_counter()
    run = build(root / "vgg")
    print(f"built {run} in {time.perf_counter() - t0:.1f} s")

    from fastapi.testclient import TestClient

    from lurker.server import create_app

    t0 = time.perf_counter()
    client = TestClient(create_app(run))
    client.__enter__()  # the app's startup: it imports torch in the background
    print(f"create_app: {(time.perf_counter() - t0) * 1e3:.0f} ms")
    time.sleep(3)  # a user opens a unit page seconds after the server started
    rows = [
        ("run summary (first paint)", "/api/runs/vgg", 100, 500_000),
        ("layer of 512 units", "/api/runs/vgg/layers/features.12", 100, None),
        ("unit", "/api/runs/vgg/layers/features.12/units/300", 50, None),
        ("samples page of 100", "/api/runs/vgg/samples?offset=40000&limit=100", 50, None),
        ("sample + appearances", "/api/runs/vgg/samples/12345", 50, None),
    ]
    print(f"{'endpoint':28} {'first':>9} {'median':>9} {'target':>8} {'size':>10}")
    for name, path, target, max_bytes in rows:
        first, median, size = timed(client, path)
        ok = median <= target and (max_bytes is None or size <= max_bytes)
        limit = f" (< {max_bytes // 1000} KB)" if max_bytes else ""
        print(
            f"{name:28} {first:7.1f}ms {median:7.1f}ms {target:6d}ms {size / 1000:8.1f}KB"
            f"{limit} {'ok' if ok else 'SLOW'}"
        )


if __name__ == "__main__":
    main()
