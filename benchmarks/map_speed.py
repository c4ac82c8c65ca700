"""Seconds to place N points in 2-D for the dataset map, by method and engine.

Wall seconds depend on what else the machine runs; CPU seconds (all threads) less so:
on an idle machine with T cores, wall is about cpu / T for the threaded engines.
Synthetic features: a mixture of 10 gaussians in 512 dimensions (what a penultimate
layer of a trained classifier looks like to a reduction). Run:
``PYTHONPATH=src python benchmarks/map_speed.py --n 10000 50000`` (add ``umap`` to
``--engines`` where umap-learn is installed). umap-learn compiles its numba kernels on the
first call in a process: that one-off cost is paid on a small warm-up set first and
printed apart, so the figures are what a reduction costs once compiled (the compile
cache on disk makes later processes start faster too).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def mixture(n: int, dim: int = 512, k: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (k, dim))
    return (centres[rng.integers(0, k, n)] + rng.normal(0, 1, (n, dim))).astype(np.float32)


def run_opentsne(x: np.ndarray, threads: int) -> None:
    import openTSNE

    openTSNE.TSNE(
        perplexity=30, initialization="pca", negative_gradient_method="fft",
        neighbors="annoy", n_jobs=threads, random_state=0,
    ).fit(x)  # fmt: skip


def run_sklearn(x: np.ndarray, threads: int) -> None:
    from sklearn.manifold import TSNE

    TSNE(perplexity=30, init="pca", random_state=0, n_jobs=threads).fit_transform(x)


def warm_up_umap() -> None:
    """Compile umap-learn's numba kernels (a process pays this once) outside the timing."""
    from lurker.map import reduce

    t0, c0 = time.perf_counter(), time.process_time()
    reduce(mixture(5_000, seed=1), "umap")  # over 4,096 points: NN-descent, not exact kNN
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"umap warm-up (numba compile + 5,000 points): {wall:.1f} s wall {cpu:.1f} s cpu",
          flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 50_000])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--engines", nargs="+", default=["lurker", "opentsne", "sklearn", "pca"],
        choices=["lurker", "opentsne", "sklearn", "pca", "umap"],
        help="lurker is reduce(x, 'tsne') (openTSNE when installed); umap needs umap-learn",
    )  # fmt: skip
    a = ap.parse_args()
    from lurker.map import TSNE_PCA_DIMS, pca, reduce

    if "umap" in a.engines:
        warm_up_umap()

    for n in a.n:
        x = mixture(n)
        x50 = pca(x, TSNE_PCA_DIMS).astype(np.float32)  # what t-SNE is given
        times: dict[str, float] = {}
        for engine in a.engines:
            t0, c0 = time.perf_counter(), time.process_time()
            if engine == "lurker":
                reduce(x, "tsne")
            elif engine == "opentsne":
                run_opentsne(x50, a.threads)
            elif engine == "sklearn":
                run_sklearn(x50, a.threads)
            elif engine == "pca":
                reduce(x, "pca")
            elif engine == "umap":
                reduce(x, "umap")
            times[engine] = time.perf_counter() - t0
            cpu = time.process_time() - c0  # all threads: robust to a busy machine
            print(f"n={n:>6}  {engine:<9} {times[engine]:8.1f} s wall {cpu:8.1f} s cpu", flush=True)
        if "opentsne" in times and "sklearn" in times:
            print(f"n={n:>6}  sklearn / openTSNE: {times['sklearn'] / times['opentsne']:.1f}x")


if __name__ == "__main__":
    main()
