"""Faithfulness of each ``lurker.explain`` method on a small trained model, so that users
can compare methods by the same figures: deletion and insertion AUC (Petsiuk et al.,
2018) and the randomization sanity check (Adebayo et al., 2018), computed by
``lurker.explain.evaluate``.

The model is :class:`lurker.examples.DigitsNet` trained for a few epochs on scikit-learn's
digits (seconds on a CPU); the samples are the first ``--samples`` of the test split,
each explained for its true class. A ``random`` row ranks the pixels by noise: a method
should beat it (lower deletion, higher insertion AUC). ``rand. Spearman`` is the mean
correlation of ``|attribution|`` with the original once every layer is re-initialised
(near 0: the map depends on the weights, as it should; near 1: it does not).

    python benchmarks/explain_quality.py
    python benchmarks/explain_quality.py --samples 128 --epochs 5 --methods saliency,lrp
"""

from __future__ import annotations

import argparse
import time

import torch

import lurker
from lurker.examples import digits_tensors, train_digits

OPTIONS: dict[str, dict] = {
    "integrated_gradients": {"n_steps": 32},
    "smoothgrad": {"n_samples": 16, "stdev": 0.15, "seed": 0},
    "gradcam": {"layer": "features.8"},
    "gradcam_plus_plus": {"layer": "features.8"},
    "occlusion": {"window": 4, "strides": 2},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--methods", default=None, help="comma-separated; default all")
    p.add_argument("--patch", type=int, default=1, help="pixels per side of a deleted patch")
    p.add_argument("--deletion-baseline", default="zeros", help="zeros, blur or mean")
    p.add_argument("--insertion-baseline", default="blur", help="zeros, blur or mean")
    args = p.parse_args()

    model, acc = train_digits(args.epochs, log=lambda s: None)
    x, y = digits_tensors(16, "test")
    x, y = x[: args.samples], y[: args.samples].tolist()
    methods = args.methods.split(",") if args.methods else list(lurker.explain.METHODS)
    print(
        f"DigitsNet, {args.epochs} epochs (test accuracy {acc:.1%}), {len(y)} test digits, "
        f"true class; deletion to {args.deletion_baseline}, insertion from "
        f"{args.insertion_baseline}, patch {args.patch}"
    )
    print(
        f"{'method':21} {'deletion AUC':>12} {'insertion AUC':>13} {'rand. Spearman':>14} "
        f"{'seconds':>8}"
    )
    common = dict(
        patch=args.patch,
        deletion_baseline=args.deletion_baseline,
        insertion_baseline=args.insertion_baseline,
    )
    for method in ["random", *methods]:
        t0 = time.perf_counter()
        if method == "random":
            e = lurker.explain(model, x, y, "saliency")
            e.attribution = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
            ev = lurker.explain.evaluate(model, x, e, metrics=("deletion", "insertion"), **common)
            last = float("nan")
        else:
            ev = lurker.explain.evaluate(model, x, y, method, **common, **OPTIONS.get(method, {}))
            assert ev.randomization is not None
            last = float(ev.randomization.similarity[-1].nanmean())
        assert ev.deletion is not None and ev.insertion is not None
        dt = time.perf_counter() - t0
        print(
            f"{method:21} {float(ev.deletion.auc.mean()):12.4f} "
            f"{float(ev.insertion.auc.mean()):13.4f} {last:14.4f} {dt:8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
