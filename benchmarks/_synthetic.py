"""Synthetic runs for the explorer benchmarks: a real traced graph, made-up statistics.

The explorer's speed depends on the sizes of what it serves (layers, units, top-k lists,
images, graph ops), not on whether the numbers came from a real dataset, so the
benchmark builds a VGG16-scale run in seconds instead of probing ImageNet.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import lurker
from lurker.store import RunWriter
from lurker.store.files import sample_file
from lurker.store.writer import LayerResult

N_SAMPLES = 2_000
N_CLASSES = 1_000
K = 9
BINS = 64


def vgg16_run(out: Path, *, image_px: int = 96, linear: bool = False) -> Path:
    """A run of torchvision's VGG16 (13 conv layers, 4,224 units) with random statistics.

    ``linear``: also its first two classifier layers (``classifier.0`` and
    ``classifier.3``, 4,096 units each), the widest layer pages an explorer shows.

    Sample images (``image_px`` square, random colours with a structure so PNGs are not
    trivially small) are written into the run's cache, as ``lurker images`` would, so
    pages can show thumbnails without a model.
    """
    import torchvision

    rng = np.random.default_rng(0)
    model = torchvision.models.vgg16(weights=None).eval()
    with torch.no_grad():
        tr = lurker.trace(model, torch.randn(1, 3, 64, 64), save="none")
    kinds = ("conv2d", "linear") if linear else ("conv2d",)
    convs = [op for op in tr.compute_ops if op.module and op.target.endswith(kinds)]
    convs = [op for op in convs if op.module != "classifier.6"]  # the 1,000 logits
    meta = {
        "model": "VGG",
        "model_fingerprint": "synthetic-vgg16",
        "dataset": "synthetic",
        "k": K,
        "image_size": [image_px, image_px],
        "config": {"model_spec": "torchvision:vgg16", "data": "synthetic"},
    }
    with RunWriter.create(out, meta=meta, overwrite=True) as w:
        w.set_classes([f"class {i}" for i in range(N_CLASSES)])
        w.add_samples((i, f"synthetic/{i}.png", i % N_CLASSES) for i in range(N_SAMPLES))
        w.set_graph(tr.to_json())
        results = []
        for op in convs:
            c = op.shape[1]
            h, wd = op.shape[-2:] if len(op.shape) == 4 else (1, 1)
            edges = np.linspace(-1.0, 8.0, BINS + 1)
            results.append(
                LayerResult(
                    name=op.module,
                    module=op.module,
                    op=op.label,
                    kind="Conv2d" if len(op.shape) == 4 else "Linear",
                    shape=tuple(op.shape[1:]),
                    mean_values=np.sort(rng.gamma(2.0, 1.0, (c, K)), axis=1)[:, ::-1],
                    mean_ids=rng.integers(0, N_SAMPLES, (c, K)),
                    max_values=np.sort(rng.gamma(4.0, 1.0, (c, K)), axis=1)[:, ::-1],
                    max_ids=rng.integers(0, N_SAMPLES, (c, K)),
                    max_y=rng.integers(0, h, (c, K)),
                    max_x=rng.integers(0, wd, (c, K)),
                    unit_mean=rng.gamma(1.0, 0.5, c),
                    unit_max=rng.gamma(4.0, 2.0, c),
                    class_mean=rng.gamma(1.0, 0.5, (c, N_CLASSES)),
                    hist=rng.integers(0, 10_000, (c, BINS)),
                    hist_edges=edges,
                    op_index=op.index,
                )
            )
        w.write_layers_result(results)
    yy, xx = np.mgrid[0:image_px, 0:image_px]
    for i in range(N_SAMPLES):
        phase = rng.uniform(0, 6.28, 3)
        freq = rng.uniform(0.05, 0.3, 3)
        rgb = np.stack(
            [127 + 120 * np.sin(freq[j] * (xx + yy * (j - 1)) + phase[j]) for j in range(3)], -1
        )
        buf = io.BytesIO()
        Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
        sample_file(out, i).write_bytes(buf.getvalue())
    return out
