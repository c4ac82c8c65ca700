"""Gradient images per second for one resnet18 layer: batched vs one at a time.

A random-init resnet18 is probed on synthetic in-memory images (one layer, k top
samples per list); then the guided-backprop images of the first ``--units`` units' top
lists ("max" and "mean") are made twice, each time from scratch into an empty cache:

* **one at a time**, as ``lurker images`` (then named ``lurker render``) did before: per
  image one forward and backward (:func:`lurker.probe.images.unit_gradient`),
  ``gradient_image``, a PNG at the default compression, written with an fsync;
* **batched**, as ``lurker images`` does now: ``--batch-size`` images per forward and
  backward, across units, the forward stopped at the layer, pixels scaled on the device,
  PNGs encoded and written on worker threads.

Both write the same files (up to float rounding). The two are interleaved and repeated;
medians, with the range of the per-repeat ratios in brackets.

    python benchmarks/unit_images.py [--layer layer2.0.conv1] [--units 16] [--device cuda]
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import TensorDataset

from lurker.probe import UnitImages, probe
from lurker.probe.images import gradient_image, unit_gradient
from lurker.probe.views import _Job, _Progress, _Writer
from lurker.store import atomic_write_bytes


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _jobs(images: UnitImages, layer: str, units: int) -> list[_Job]:
    return [
        _Job(u, which, e.rank, e.sample_id, (e.y, e.x) if e.y is not None else None, grad=True)
        for u in range(units)
        for which in ("max", "mean")
        for e in images.run.unit(layer, u).top(which)  # type: ignore[arg-type]
    ]


def one_at_a_time(images: UnitImages, layer: str, jobs: list[_Job], device: str) -> float:
    tr, op = images.trace, images._layer(layer).op_index
    _sync(device)
    t0 = time.perf_counter()
    for j in jobs:
        x = images._sample(j.sample_id).to(images.device)
        grad = unit_gradient(tr, op, x, j.unit, j.which, j.peak)  # type: ignore[arg-type]
        buf = io.BytesIO()
        gradient_image(grad).save(buf, format="PNG")
        path = images.cache.path(images.run, "grad", layer, j.unit, j.rank, j.which)
        atomic_write_bytes(path, buf.getvalue())
    _sync(device)
    return time.perf_counter() - t0


def batched(images: UnitImages, layer: str, jobs: list[_Job], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    with _Writer(_Progress(len(jobs), 0, False, 0.0)) as out:
        images._write_layer(layer, [_Job(**vars(j)) for j in jobs], out)
        out.close()
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layer", default="layer2.0.conv1")
    ap.add_argument("--units", type=int, default=16)
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval().to(a.device)
    ds = TensorDataset(torch.randn(a.images, 3, a.size, a.size), torch.arange(a.images) % 10)
    with tempfile.TemporaryDirectory() as tmp:
        run = probe(
            model, ds, out=Path(tmp) / "run", layers=[a.layer], k=a.k, progress=False,
            device=a.device,
        )  # fmt: skip
        images = UnitImages(run, model=model, dataset=ds, batch_size=a.batch_size)
        jobs = _jobs(images, a.layer, a.units)
        batched(images, a.layer, jobs[: a.batch_size], a.device)  # warm-up: trace, check
        one_at_a_time(images, a.layer, jobs[:2], a.device)
        single_s, batch_s = [], []
        for _ in range(a.repeats):
            for fn, times in ((one_at_a_time, single_s), (batched, batch_s)):
                shutil.rmtree(run.path / "cache", ignore_errors=True)
                times.append(fn(images, a.layer, jobs, a.device))
        n = len(jobs)
        single, batch = statistics.median(single_s), statistics.median(batch_s)
        ratios = sorted(s / b for s, b in zip(single_s, batch_s))
        print(
            f"resnet18 {a.layer}, {a.size} px, {a.device}: {n} gradient images "
            f"({a.units} units x 2 lists x k={a.k}), batch {a.batch_size}, "
            f"{torch.get_num_threads()} torch threads"
        )
        print(f"  one at a time: {n / single:8.1f} images/s")
        print(f"  batched:       {n / batch:8.1f} images/s")
        print(
            f"  batched / one at a time: {single / batch:.2f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}]"
        )


if __name__ == "__main__":
    main()
