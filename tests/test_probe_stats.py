"""UnitStats against an independent brute-force oracle over the whole activation tensor."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

import dist_ranks
from lurker.probe.stats import HostBatch, UnitStats, _bin_index, _grid

N = 57
SIZES = [1, 8, 16, 3, 1, 20, 8]  # batch size 1 included, last batch partial
assert sum(SIZES) == N


class DevicePath(UnitStats):
    """UnitStats on the CPU taking the torch code path of other devices (GPUs), which the CPU
    also takes without numba: buffered samples, max with indices for every map, one-hot matmul
    class sums, histogram bins by float64 arithmetic, one fold per buffer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fused = False
        self._hist = self._hist.to(torch.int64)  # as built off the CPU


PATHS = pytest.mark.parametrize("cls", [UnitStats, DevicePath], ids=["cpu", "torch"])


def make_data(shape, seed=0, num_classes=4, ties=False):
    """Activations (N, *shape), unique non-contiguous sample ids, labels with unlabelled -1."""
    rng = np.random.default_rng(seed)
    if ties:  # quarter steps, mostly zeros (ReLU-like): spatial means are exact in float32
        vals = np.maximum(rng.integers(-4, 3, size=(N, *shape)), 0) / 4.0
        vals[:, 0] = 0.0  # a dead unit: every sample ties at 0
    else:
        vals = rng.standard_normal((N, *shape))
    ids = rng.choice(10_000, size=N, replace=False)
    labels = rng.integers(-1, num_classes - 1, size=N)  # the last class never occurs
    return (
        torch.tensor(vals, dtype=torch.float32),
        torch.tensor(ids, dtype=torch.int64),
        torch.tensor(labels, dtype=torch.int64),
    )


def feed(stats, acts, ids, labels, sizes=SIZES, order=None):
    if order is not None:
        acts, ids, labels = acts[order], ids[order], labels[order]
    start = 0
    for size in sizes:
        sl = slice(start, start + size)
        stats.update(acts[sl], ids[sl], None if labels is None else labels[sl])
        start += size
    assert start == len(ids)
    return stats


def grid_edges(values, bins):
    """The canonical histogram edges by brute force: the smallest power-of-two width, no finer
    than the float32 spacing at the largest |value|, on whose multiples the finite values span
    fewer than ``bins`` bins; NaN edges without a finite value."""
    v = np.asarray(values, dtype=np.float32).astype(np.float64).ravel()
    v = v[np.isfinite(v)]
    if not len(v):
        return np.full(bins + 1, np.nan)
    lo, hi = v.min(), v.max()
    e = int(np.log2(np.spacing(np.float32(max(abs(lo), abs(hi))))))
    while np.floor(hi / 2.0**e) - np.floor(lo / 2.0**e) >= bins:
        e += 1
    return (np.floor(lo / 2.0**e) + np.arange(bins + 1)) * 2.0**e


def np_hist(values, edges):
    """numpy.histogram of the finite float32 ``values`` (n, C) per unit over ``edges``."""
    v = np.asarray(values, dtype=np.float32).astype(np.float64)
    return np.stack([np.histogram(col[np.isfinite(col)], bins=edges)[0] for col in v.T])


def oracle(acts, ids, labels, k, num_classes, edges):
    """Brute force in numpy (float64): per unit lexsort by (-value, id) over all samples; the
    histogram by numpy.histogram over edges of its own (``edges``: only their count is used)."""
    a = acts.double().numpy()
    n, c = a.shape[:2]
    width = a.shape[-1] if a.ndim > 2 else 1
    flat = a.reshape(n, c, -1)
    means, peaks = flat.mean(axis=2), flat.max(axis=2)
    argmax = flat.argmax(axis=2)  # first occurrence in row-major order
    ids_np = ids.numpy()
    out = {}
    for name, vals in (("mean", means), ("max", peaks)):
        v = np.full((c, k), -np.inf)
        i = np.full((c, k), -1, dtype=np.int64)
        y = np.full((c, k), -1, dtype=np.int64)
        x = np.full((c, k), -1, dtype=np.int64)
        for u in range(c):
            best = np.lexsort((ids_np, -vals[:, u]))[:k]
            v[u, : len(best)] = vals[best, u]
            i[u, : len(best)] = ids_np[best]
            y[u, : len(best)] = argmax[best, u] // width
            x[u, : len(best)] = argmax[best, u] % width
        out[f"{name}_values"], out[f"{name}_ids"] = v, i
        out[f"{name}_y"], out[f"{name}_x"] = y, x  # where the sample peaked, in both lists
    lab = labels.numpy()
    class_mean = np.full((c, num_classes), np.nan)
    class_count = np.zeros(num_classes, dtype=np.int64)
    for cls in range(num_classes):
        sel = lab == cls
        class_count[cls] = sel.sum()
        if sel.any():
            class_mean[:, cls] = means[sel].mean(axis=0)
    out.update(class_mean=class_mean, class_count=class_count)
    out.update(unit_mean=means.mean(axis=0), unit_max=peaks.max(axis=0), count=n)
    m32 = means.astype(np.float32)
    e = grid_edges(m32, len(edges) - 1)
    out.update(hist_edges=e, hist=np_hist(m32, e), hist_nan=np.isnan(m32).sum(0))
    out.update(hist_neginf=(m32 == -np.inf).sum(0), hist_posinf=(m32 == np.inf).sum(0))
    return out, means


def check_against(res, exp):
    for key in ("mean_ids", "mean_y", "mean_x", "max_ids", "max_y", "max_x", "class_count", "hist"):
        np.testing.assert_array_equal(res[key].numpy(), exp[key], err_msg=key)
    for key in ("hist_edges", "hist_nan", "hist_neginf", "hist_posinf"):
        np.testing.assert_array_equal(res[key].numpy(), exp[key], err_msg=key)
    assert (res["hist"].sum(1) + res["hist_nan"] + res["hist_neginf"] + res["hist_posinf"] ==
            exp["count"]).all()  # fmt: skip
    for key in ("mean_values", "max_values", "class_mean", "unit_mean", "unit_max"):
        np.testing.assert_allclose(res[key].numpy(), exp[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert int(res["count"]) == exp["count"]


def assert_same(r1, r2):
    """Equal results: exact except float sums (means too), which may differ by rounding."""
    assert r1.keys() == r2.keys()
    for key in r1:
        if key in ("class_mean", "unit_mean", "mean_values"):
            torch.testing.assert_close(r1[key], r2[key], atol=1e-6, rtol=1e-5, equal_nan=True)
        else:
            assert torch.equal(r1[key], r2[key]) or (
                r1[key].is_floating_point() and torch.allclose(r1[key], r2[key], equal_nan=True)
            ), key


@pytest.mark.parametrize("shape", [(5,), (4, 7), (3, 5, 6)], ids=["2d", "3d", "4d"])
def test_matches_bruteforce(shape):
    acts, ids, labels = make_data(shape, seed=len(shape))
    res = feed(UnitStats(shape[0], 5, 4, device="cpu", hist_bins=16), acts, ids, labels).result()
    exp, means = oracle(acts, ids, labels, 5, 4, res["hist_edges"])
    check_against(res, exp)
    # the first batch (1 sample) held a fraction of the final range: the grid grew since
    assert not (means[0].min() - 1e-6 <= means.min() and means.max() <= means[0].max() + 1e-6)
    assert res["hist"].sum(1).tolist() == [N] * shape[0]
    assert torch.isnan(res["class_mean"][:, 3]).all() and res["class_count"][3] == 0
    if len(shape) == 1:
        assert (res["max_y"] == 0).all() and (res["max_x"] == 0).all()
    if len(shape) == 2:
        assert (res["max_y"] == 0).all() and (res["max_x"] > 0).any()


@pytest.mark.parametrize("shape", [(6, 4, 4), (6, 8), (6,)], ids=["4d", "3d", "2d"])
def test_many_exact_ties(shape):
    acts, ids, labels = make_data(shape, seed=7, ties=True)
    k = 7
    res = feed(UnitStats(6, k, 4, device="cpu", hist_bins=8), acts, ids, labels).result()
    exp, means = oracle(acts, ids, labels, k, 4, res["hist_edges"])
    check_against(res, exp)
    # The dead unit ties everywhere: its top-k are the k smallest ids, peak at the first pixel.
    smallest = np.sort(ids.numpy())[:k]
    np.testing.assert_array_equal(res["mean_ids"][0].numpy(), smallest)
    np.testing.assert_array_equal(res["max_ids"][0].numpy(), smallest)
    assert (res["max_y"][0] == 0).all() and (res["max_x"][0] == 0).all()
    # Ties really happen at the top-k boundary of the other units, too.
    assert len(np.unique(means[:, 1])) < N // 2


def test_negative_zero_ties_with_zero():
    # -0.0 == 0.0, so the tie goes to the smaller id whichever sign each sample's zero has.
    acts = torch.tensor([[0.0], [-0.0], [0.0], [-0.0]]).expand(4, 2).contiguous()
    acts[:, 1] = -acts[:, 1]
    ids = torch.tensor([7, 3, 1, 5])
    res = UnitStats(2, 4, 1, device="cpu")
    res.update(acts[:2], ids[:2], None)
    res.update(acts[2:], ids[2:], None)
    out = res.result()
    assert out["mean_ids"].tolist() == [[1, 3, 5, 7]] * 2
    assert out["max_ids"].tolist() == [[1, 3, 5, 7]] * 2


def test_half_precision_and_channels_last_input():
    acts, ids, labels = make_data((3, 4, 5), seed=31)
    acts16 = acts.half().to(memory_format=torch.channels_last)
    res = feed(UnitStats(3, 4, 4, device="cpu"), acts16, ids, labels).result()
    exp = feed(UnitStats(3, 4, 4, device="cpu"), acts16.float().contiguous(), ids, labels).result()
    assert_same(exp, res)
    assert res["mean_values"].dtype == torch.float32


@PATHS
def test_nan_ranks_first_and_stays_out_of_histogram(cls):
    acts = torch.tensor([[1.0, 0.0], [math.nan, 0.5], [2.0, 0.25], [0.5, -1.0]])
    stats = cls(2, 2, 1, device="cpu", hist_bins=4)
    stats.update(acts, torch.tensor([4, 3, 2, 1]), torch.tensor([0, 0, 0, -1]))
    res = stats.result()
    assert res["mean_ids"].tolist() == [[3, 2], [3, 2]]  # NaN above all, as torch.sort has it
    assert math.isnan(res["mean_values"][0, 0]) and math.isnan(res["unit_max"][0])
    # finite means in [-1, 2]: bins 1 wide from -1 (0.5 wide would need 6 bins)
    assert res["hist_edges"].tolist() == [-1.0, 0.0, 1.0, 2.0, 3.0]
    assert res["hist"].tolist() == [[0, 1, 1, 1], [1, 3, 0, 0]]  # NaN counted apart
    assert res["hist_nan"].tolist() == [1, 0] and res["hist_posinf"].tolist() == [0, 0]


@pytest.mark.parametrize("hw", [(2, 2), (5, 7)], ids=["4-positions", "35-positions"])
def test_non_finite_maps_match_the_torch_path(hw):
    # A NaN anywhere makes a map's mean and max NaN, its peak the first NaN; +inf and -inf in
    # one map make its mean NaN and its max +inf. The CPU's compiled kernel reads maps in SIMD
    # lanes plus a remainder (4 positions: remainder only) and must agree with torch's path.
    rng = np.random.default_rng(73)
    acts = torch.tensor(rng.standard_normal((12, 3, *hw)), dtype=torch.float32)
    acts[1, 0, 1, 1] = acts[1, 0, 0, 1] = math.nan
    acts[4, 0] = -math.inf
    acts[5, 1, 1, 0], acts[5, 1, 0, 1] = math.inf, -math.inf
    acts[6, 1, 1, 1] = math.inf
    acts[7, 2], acts[8, 2] = 0.0, -0.0
    ids = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 10])
    labels = torch.tensor([0, 1] * 6)
    kw = {"device": "cpu", "hist_bins": 4}
    res = feed(UnitStats(3, 12, 2, **kw), acts, ids, labels, sizes=[5, 7]).result()
    assert_same(feed(DevicePath(3, 12, 2, **kw), acts, ids, labels, sizes=[5, 7]).result(), res)
    assert res["max_ids"][0, 0] == 8 and (res["max_y"][0, 0], res["max_x"][0, 0]) == (0, 1)
    assert res["max_ids"][0, -1] == 5 and res["max_values"][0, -1] == -math.inf
    assert res["max_ids"][1, :2].tolist() == [3, 4] and res["max_values"][1, 0] == math.inf
    assert (res["max_y"][1, 1], res["max_x"][1, 1]) == (1, 0)
    assert res["mean_ids"][0, 0] == 8 and res["mean_ids"][1, 0] == 4  # NaN means rank first
    # NaN and infinite means are counted apart, never in a bin
    assert res["hist"].sum(1).tolist() == [10, 10, 12]
    assert res["hist_nan"].tolist() == [1, 1, 0]
    assert res["hist_neginf"].tolist() == [1, 0, 0] and res["hist_posinf"].tolist() == [0, 1, 0]
    with np.errstate(invalid="ignore"):  # inf - inf in the oracle's sums
        exp, _ = oracle(acts, ids, labels, 12, 2, res["hist_edges"])
    for key in ("hist", "hist_edges", "hist_nan", "hist_neginf", "hist_posinf"):
        np.testing.assert_array_equal(res[key].numpy(), exp[key], err_msg=key)
    # a non-finite mean stays in its own class (no 0 * inf leaking into the others)
    assert res["class_mean"][0, 0] == -math.inf and res["class_mean"][1, 0] == math.inf


def test_float32_overflow_in_a_map_sum():
    # Sums of huge values of both signs overflow float32 SIMD lanes to inf and -inf; the CPU
    # kernel then sums in float64, so the mean is the true one (0 here), not NaN.
    big = np.float32(3e38)
    acts = torch.tensor([[[big] * 16 + [-big] * 16, [big, -big] * 16]])
    stats = UnitStats(2, 1, 0, device="cpu")
    stats.update(acts, torch.tensor([0]), None)
    res = stats.result()
    assert res["mean_values"][:, 0].tolist() == [0.0, 0.0]
    assert res["max_values"][:, 0].tolist() == [float(big)] * 2 and res["max_x"][:, 0].tolist() == [
        0,
        0,
    ]


@pytest.mark.parametrize("bins", [2, 4])
def test_histogram_of_extremes_near_float32_max(bins):
    # Means of +-3e38, +-inf, tiny and subnormal ones: the grid's span overflows float32 but
    # not its float64 edges; every finite value lands in one bin of its unit, on both paths.
    first = torch.tensor([[-2e38, 0.0], [2e38, 1.0]])
    later = torch.tensor([[math.inf, 1e-45], [-3.4e38, 3.4e38], [-1e-45, -math.inf]])
    results = []
    for cls in (UnitStats, DevicePath):
        stats = cls(2, 1, 0, device="cpu", hist_bins=bins)
        stats.update(first, torch.tensor([0, 1]), None)
        stats.update(later, torch.tensor([2, 3, 4]), None)
        results.append(stats.result())
    assert_same(*results)
    values = torch.cat([first, later]).numpy()
    edges = grid_edges(values, bins)
    np.testing.assert_array_equal(results[0]["hist_edges"].numpy(), edges)
    np.testing.assert_array_equal(results[0]["hist"].numpy(), np_hist(values, edges))
    assert results[0]["hist"].sum(1).tolist() == [4, 4]


@PATHS
def test_maps_without_positions_are_refused(cls):
    with pytest.raises(ValueError, match="no positions"):
        cls(3, 2, 0, device="cpu").update(torch.zeros(2, 3, 0), torch.arange(2), None)
    with pytest.raises(ValueError, match="no positions"):
        cls(3, 2, 0, device="cpu").update(torch.zeros(2, 3, 4, 0), torch.arange(2), None)


@PATHS
@pytest.mark.parametrize("how", ["numpy", "data"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_reused_id_and_label_buffers_refilled_without_a_version_bump(cls, how, dtype):
    # A loader that refills one ids/labels tensor per batch through .numpy() or .data (which
    # do not bump tensor versions): every batch counts with its own ids and labels.
    acts = torch.arange(8, dtype=torch.float32).reshape(4, 2, 1)
    ids_buf, labels_buf = torch.zeros(2, dtype=dtype), torch.zeros(2, dtype=torch.int64)
    stats = cls(2, 4, 3, device="cpu")
    for b in range(2):
        ids, labels = torch.tensor([10 + 2 * b, 11 + 2 * b], dtype=dtype), torch.tensor([b, b + 1])
        if how == "numpy":
            ids_buf.numpy()[:] = ids.numpy()
            labels_buf.numpy()[:] = labels.numpy()
        else:
            ids_buf.data.copy_(ids)
            labels_buf.data.copy_(labels)
        stats.update(acts[2 * b : 2 * b + 2], ids_buf, labels_buf)
    res = stats.result()
    assert res["max_ids"][0].tolist() == [13, 12, 11, 10]
    assert res["class_count"].tolist() == [1, 2, 1]


def test_a_host_batch_made_once_serves_every_layer_and_a_wrong_one_is_not_trusted():
    """The sweep converts a batch's ids and labels once (HostBatch) for all its layers: the
    result equals plain updates, and a HostBatch of another batch size or class count is
    remade rather than handed to the kernels (which index it by the activation's batch)."""
    acts, ids, labels = make_data((4, 6), seed=5)
    plain = UnitStats(4, 3, 3, device="cpu")
    shared = UnitStats(4, 3, 3, device="cpu")
    for start in range(0, len(ids), 8):
        at = slice(start, start + 8)
        plain.update(acts[at], ids[at], labels[at])
        host = HostBatch(ids[at], labels[at], 3)
        wrong = HostBatch(ids[at][:1], labels[at][:1], 3)
        shared.update(acts[at], ids[at], labels[at], host=wrong if start else host)
    a, b = plain.result(), shared.result()
    for key in a:
        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


@PATHS
def test_inference_mode_ids_labels_and_activations_needing_grad(cls):
    acts, ids, labels = make_data((3, 4), seed=79)
    with torch.inference_mode():
        ids_inf, labels_inf = ids.clone(), labels.clone()
    stats = cls(3, 4, 4, device="cpu", hist_bins=8)
    feed(stats, acts.requires_grad_(), ids_inf, labels_inf)
    res = stats.result()
    exp, _ = oracle(acts.detach(), ids, labels, 4, 4, res["hist_edges"])
    check_against(res, exp)


def test_cpu_histogram_widens_before_int32_overflow_and_paths_merge():
    # The CPU path counts in int32 and must switch to int64 before any bin could pass 2**31;
    # its states merge with the torch path's (int64) either way round.
    acts, ids, labels = make_data((3, 4), seed=83)
    kw = {"device": "cpu", "hist_bins": 8}
    whole = feed(UnitStats(3, 4, 4, **kw), acts, ids, labels).result()
    for a_cls, b_cls in [(UnitStats, DevicePath), (DevicePath, UnitStats)]:
        a = feed(a_cls(3, 4, 4, **kw), acts[:30], ids[:30], labels[:30], sizes=[30])
        b = feed(b_cls(3, 4, 4, **kw), acts[30:], ids[30:], labels[30:], sizes=[27])
        a.merge(b)
        assert_same(whole, a.result())
    stats = UnitStats(3, 4, 4, **kw)
    assert stats._hist.dtype == torch.int32
    stats._count = (1 << 31) - 3  # as if 2**31 - 3 samples had been seen
    stats.update(acts[:5], ids[:5], labels[:5])
    assert stats._hist.dtype == torch.int64 and int(stats._hist.sum()) == 5 * 3
    state = stats.state_dict()
    assert UnitStats.from_state_dict(state)._hist.dtype == torch.int64


def test_without_numba_the_cpu_takes_the_torch_path(monkeypatch):
    import lurker.probe.stats as stats_module

    monkeypatch.setattr(stats_module, "_kernels", False)  # as if importing numba failed
    acts, ids, labels = make_data((3, 2, 2), seed=89)
    stats = UnitStats(3, 4, 4, device="cpu", hist_bins=8)
    assert not stats._fused
    res = feed(stats, acts, ids, labels).result()
    exp, _ = oracle(acts, ids, labels, 4, 4, res["hist_edges"])
    check_against(res, exp)


@pytest.mark.parametrize("numba", [True, False], ids=["kernels-not-loaded", "numba-missing"])
def test_unpickled_cpu_state_goes_on(monkeypatch, numba):
    # Unpickling skips __init__, which loads the kernels: a state sent to a fresh process
    # loads them at its first update, or takes the torch path where numba is missing.
    import pickle

    import lurker.probe.stats as stats_module

    acts, ids, labels = make_data((3, 4), seed=97)
    kw = {"device": "cpu", "hist_bins": 8}
    whole = feed(UnitStats(3, 4, 4, **kw), acts, ids, labels).result()
    first = feed(UnitStats(3, 4, 4, **kw), acts[:25], ids[:25], labels[:25], sizes=SIZES[:3])
    blob = pickle.dumps(first)
    monkeypatch.setattr(stats_module, "_kernels", None if numba else False)
    resumed = pickle.loads(blob)
    feed(resumed, acts[25:], ids[25:], labels[25:], sizes=SIZES[3:])
    assert resumed._fused is numba
    assert_same(whole, resumed.result())


def test_cpu_kernels_use_as_many_threads_as_torch():
    # torchrun ranks limited to one thread each must not each fan out to every core.
    numba = pytest.importorskip("numba")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        acts, ids, labels = make_data((3, 4), seed=101)
        res = feed(UnitStats(3, 4, 4, device="cpu", hist_bins=8), acts, ids, labels).result()
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    exp, _ = oracle(acts, ids, labels, 4, 4, res["hist_edges"])
    check_against(res, exp)


def test_cpu_kernels_give_the_same_results_on_any_number_of_threads():
    # the kernels run on as many threads as torch (1 under torchrun ranks, all cores alone):
    # a run's statistics must not depend on that (means are reduced per map, extremes and
    # class sums per unit, in sample order, whatever thread takes them)
    pytest.importorskip("numba")
    acts, ids, labels = make_data((5, 6, 7), seed=107, ties=True)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(feed(UnitStats(5, 4, 4, device="cpu", hist_bins=8), acts, ids, labels))
    finally:
        torch.set_num_threads(before)
    assert_same(results[0].result(), results[1].result())
    exp, _ = oracle(acts, ids, labels, 4, 4, results[0].result()["hist_edges"])
    check_against(results[0].result(), exp)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ties", [False, True])
def test_cuda_matches_bruteforce(ties):
    acts, ids, labels = make_data((6, 4, 4), seed=37, ties=ties)
    stats = UnitStats(6, 7, 4, device="cuda", hist_bins=8)
    res = feed(stats, acts.cuda(), ids.cuda(), labels.cuda()).result()
    exp, _ = oracle(acts, ids, labels, 7, 4, res["hist_edges"])
    check_against(res, exp)
    assert_same(
        feed(UnitStats(6, 7, 4, device="cpu", hist_bins=8), acts, ids, labels).result(), res
    )


def test_fewer_samples_than_k():
    acts, ids, labels = make_data((3, 2, 3), seed=3)
    acts, ids, labels = acts[:3], ids[:3], labels[:3]
    stats = UnitStats(3, 5, 4, device="cpu")
    res = feed(stats, acts, ids, labels, sizes=[2, 1]).result()
    exp, _ = oracle(acts, ids, labels, 5, 4, res["hist_edges"])
    check_against(res, exp)
    assert (res["mean_ids"][:, 3:] == -1).all() and (res["max_y"][:, 3:] == -1).all()
    assert torch.isneginf(res["mean_values"][:, 3:]).all()
    assert torch.isneginf(res["max_values"][:, 3:]).all()


def test_empty_state_result():
    res = UnitStats(2, 3, 2, device="cpu").result()
    assert (res["mean_ids"] == -1).all() and torch.isnan(res["unit_mean"]).all()
    assert torch.isnan(res["hist_edges"]).all() and int(res["count"]) == 0


@pytest.mark.parametrize("ties", [False, True])
def test_shuffled_batch_order_is_identical(ties):
    acts, ids, labels = make_data((4, 3, 3), seed=11, ties=ties)

    def run(order, sizes):
        stats = UnitStats(4, 6, 4, device="cpu", hist_bins=10)
        return feed(stats, acts, ids, labels, sizes=sizes, order=order).result()

    base = run(None, SIZES)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    assert_same(base, run(perm, list(reversed(SIZES))))
    assert_same(base, run(perm.flip(0), [N]))
    assert_same(base, run(perm, [1] * N))


def test_merge_of_shards_equals_single_pass():
    acts, ids, labels = make_data((5, 4, 3), seed=13, ties=True)
    acts[1::2] += 2.0  # the shards' ranges differ: merging brings both to a coarser grid
    kw = {"device": "cpu", "hist_bins": 12}
    single = feed(UnitStats(5, 4, 4, **kw), acts, ids, labels).result()
    a = feed(UnitStats(5, 4, 4, **kw), acts[0::2], ids[0::2], labels[0::2], sizes=[10, 19])
    b = feed(UnitStats(5, 4, 4, **kw), acts[1::2], ids[1::2], labels[1::2], sizes=[1, 27])
    b.merge(a)
    assert_same(single, b.result())
    # An empty state (no grid yet) adopts the other's.
    empty = UnitStats(5, 4, 4, device="cpu", hist_bins=12)
    empty.merge(b)
    assert_same(single, empty.result())


def test_merge_rejects_incompatible_states():
    base = UnitStats(3, 4, 2, device="cpu")
    with pytest.raises(ValueError, match="num_units"):
        base.merge(UnitStats(3, 5, 2, device="cpu"))
    with pytest.raises(ValueError, match="hist_bins"):
        base.merge(UnitStats(3, 4, 2, device="cpu", hist_bins=32))


def test_state_dict_round_trip_mid_stream():
    acts, ids, labels = make_data((4, 5), seed=17)
    whole = feed(UnitStats(4, 5, 4, device="cpu", hist_bins=9), acts, ids, labels).result()
    first = feed(UnitStats(4, 5, 4, device="cpu", hist_bins=9), acts[:25], ids[:25], labels[:25],
                 sizes=SIZES[:3])  # fmt: skip
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert all(v.device.type == "cpu" for v in state.values() if isinstance(v, torch.Tensor))
    resumed = UnitStats.from_state_dict(state, device="cpu")
    feed(resumed, acts[25:], ids[25:], labels[25:], sizes=SIZES[3:])
    assert_same(whole, resumed.result())


def test_labels_none_skips_class_stats():
    acts, ids, _ = make_data((3,), seed=19)
    res = feed(UnitStats(3, 2, 4, device="cpu"), acts, ids, None).result()
    assert (res["class_count"] == 0).all() and torch.isnan(res["class_mean"]).all()
    assert int(res["count"]) == N


def test_bad_inputs_raise():
    stats = UnitStats(3, 2, 2, device="cpu")
    ids = torch.arange(2)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4, 1\)"):
        stats.update(torch.zeros(2, 3, 4, 4, 1), ids, None)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        stats.update(torch.zeros(2), ids, None)
    with pytest.raises(ValueError, match="units"):
        stats.update(torch.zeros(2, 4), ids, None)
    with pytest.raises(ValueError, match="sample_ids"):
        stats.update(torch.zeros(2, 3), torch.arange(3), None)
    with pytest.raises(ValueError, match="sample_ids"):
        stats.update(torch.zeros(2, 3), torch.tensor([0, -1]), None)
    with pytest.raises(ValueError, match="num_classes"):
        stats.update(torch.zeros(2, 3), ids, torch.tensor([0, 2]))
    # the CPU path checks a batch's ids once for all layers (a sweep passes one batch's ids
    # to every layer), and again once their values change
    ok = torch.arange(2)
    stats.update(torch.zeros(2, 3), ok, None)
    ok[1] = -5
    with pytest.raises(ValueError, match="sample_ids"):
        UnitStats(3, 2, 2, device="cpu").update(torch.zeros(2, 3), ok, None)
    with pytest.raises(ValueError, match="hist_bins >= 2"):
        UnitStats(3, 2, 2, device="cpu", hist_bins=1)


# ---------------------------------------------------------------- torch.distributed (gloo)

DIST_SHAPE = (4, 3, 5)
DIST_SIZES = [[1, 12, 9, 7], [5, 2, 16, 5]]  # rank 0 gets 29 samples, rank 1 gets 28


def dist_data():
    acts, ids, labels = make_data(DIST_SHAPE, seed=29, ties=True)
    acts[1::2] += 3.0  # rank 1's values are larger: its grid is coarser than rank 0's
    return acts, ids, labels


def _dist_worker(rank, out_dir):
    acts, ids, labels = dist_data()
    mine = slice(rank, None, dist.get_world_size())
    a, i, lab = acts[mine], ids[mine], labels[mine]
    out = {}
    for name, cls in (("cpu", UnitStats), ("torch", DevicePath)):
        stats = cls(4, 6, 4, device="cpu", hist_bins=10)
        feed(stats, a, i, lab, sizes=DIST_SIZES[rank]).all_reduce()
        out[name] = stats.result()
    # The same with a buffer smaller than most batches: all_reduce folds in what is buffered.
    stats = DevicePath(4, 6, 4, device="cpu", hist_bins=10, buffer_samples=6)
    feed(stats, a, i, lab, sizes=DIST_SIZES[rank]).all_reduce()
    out["small_buffer"] = stats.result()
    # Only rank 0 sees data; rank 1 (no grid yet) adopts rank 0's.
    stats = UnitStats(4, 6, 4, device="cpu", hist_bins=10)
    if rank == 0:
        feed(stats, a, i, lab, sizes=DIST_SIZES[0])
    stats.all_reduce()
    out["one_sided"] = stats.result()
    # Different layouts: every rank raises instead of deadlocking or merging garbage.
    stats = UnitStats(4, 6, 4, device="cpu", hist_bins=10 + rank)
    stats.update(a[:3], i[:3], lab[:3])
    try:
        stats.all_reduce()
        out["raised"] = False
    except ValueError:
        out["raised"] = True
    dist.barrier()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def test_all_reduce_two_gloo_ranks_equals_single_process(tmp_path):
    dist_ranks.spawn(_dist_worker, str(tmp_path))
    acts, ids, labels = dist_data()
    single = UnitStats(4, 6, 4, device="cpu", hist_bins=10)
    sizes = DIST_SIZES[0] + DIST_SIZES[1]
    order = torch.cat([torch.arange(0, N, 2), torch.arange(1, N, 2)])
    single = feed(single, acts, ids, labels, sizes=sizes, order=order).result()
    exp, _ = oracle(acts, ids, labels, 6, 4, single["hist_edges"])
    check_against(single, exp)
    rank0 = feed(UnitStats(4, 6, 4, device="cpu", hist_bins=10), acts[0::2], ids[0::2],
                 labels[0::2], sizes=DIST_SIZES[0]).result()  # fmt: skip
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name in ("cpu", "torch", "small_buffer"):
            assert_same(single, out[name])
        assert_same(rank0, out["one_sided"])
        assert out["raised"]


# ---------------------------------------------------------------- buffering (deferred folding)


@pytest.mark.parametrize("shape", [(5,), (4, 7), (3, 5, 6)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("buffer_samples", [1, 7, 20, 64])
def test_buffer_boundaries_match_bruteforce(shape, ties, buffer_samples):
    # 7: smaller than and not a divisor of most batches (8, 16, 20 are folded in directly);
    # 20: batches straddle the boundary; 64: everything buffered until result().
    acts, ids, labels = make_data(shape, seed=41 + len(shape), ties=ties)
    kw = {"device": "cpu", "hist_bins": 8}
    stats = DevicePath(shape[0], 6, 4, **kw, buffer_samples=buffer_samples)
    res = feed(stats, acts, ids, labels).result()
    exp, _ = oracle(acts, ids, labels, 6, 4, res["hist_edges"])
    check_against(res, exp)
    # ... and identical (float sums up to rounding) to an unbuffered pass, range included,
    # and to the CPU's compiled path.
    ref = DevicePath(shape[0], 6, 4, **kw, buffer_samples=1)
    assert_same(feed(ref, acts, ids, labels).result(), res)
    assert_same(feed(UnitStats(shape[0], 6, 4, **kw), acts, ids, labels).result(), res)


@PATHS
@pytest.mark.parametrize("buffer_samples", [3, 19, 100])
def test_class_sorted_data_growing_range_nothing_clamped(cls, buffer_samples):
    # Data sorted by class, each class larger than the last (an ImageFolder's order): the first
    # batch holds a sliver of the final range. Every value still lands in its own bin of the
    # final edges, as numpy.histogram puts it, whatever the batches, the buffer, a checkpoint
    # and resume mid-stream or the order.
    acts, ids, labels = make_data((3, 4), seed=43)
    labels = torch.arange(N) * 4 // N  # 4 classes in order
    acts = acts * 0.01 + 2.0 ** labels[:, None, None].double().mul(3).float()  # 1, 8, 64, 512
    sizes = [20, 1, 16, 8, 12]
    stats = cls(3, 4, 4, device="cpu", hist_bins=10, buffer_samples=buffer_samples)
    res = feed(stats, acts, ids, labels, sizes=sizes).result()
    exp, means = oracle(acts, ids, labels, 4, 4, res["hist_edges"])
    check_against(res, exp)
    assert res["hist_edges"][0] <= means.min() and means.max() < res["hist_edges"][-1]
    assert (res["hist"][:, 0] > 0).any() and (res["hist"][:, -4:].sum(1) > 0).all()
    first = feed(cls(3, 4, 4, device="cpu", hist_bins=10, buffer_samples=buffer_samples),
                 acts[:21], ids[:21], labels[:21], sizes=[20, 1])  # fmt: skip
    resumed = cls.from_state_dict(torch.load(_saved(first.state_dict()), weights_only=True))
    assert_same(res, feed(resumed, acts[21:], ids[21:], labels[21:], sizes=sizes[2:]).result())
    rev = torch.arange(N - 1, -1, -1)
    assert_same(res, feed(cls(3, 4, 4, device="cpu", hist_bins=10), acts, ids, labels,
                          sizes=[7] * 8 + [1], order=rev).result())  # fmt: skip


@PATHS
@pytest.mark.parametrize("buffer_samples", [4, 1000])
def test_dropped_classes_leave_the_statistics_of_an_unlabelled_sweep(cls, buffer_samples):
    """A sweep that turns out unlabelled (an item's label was no class index) drops the
    classes met so far, buffered samples' too: its statistics are those of the same data
    fed unlabelled throughout (the unit means over every sample), with no class rows."""
    acts, ids, labels = make_data((3, 4), seed=5)
    kw = {"device": "cpu", "hist_bins": 10, "buffer_samples": buffer_samples}
    stats = feed(cls(3, 4, 3, **kw), acts[:29], ids[:29], labels[:29], sizes=[8, 1, 20])
    stats.drop_classes()
    feed(stats, acts[29:], ids[29:], None, sizes=[16, 12])
    res = stats.result()
    want = feed(cls(3, 4, 0, **kw), acts, ids, None).result()
    assert res["class_mean"].shape == (3, 0) and res["class_count"].shape == (0,)
    assert_same(res, want)
    torch.testing.assert_close(
        res["unit_mean"].double(), acts.double().mean((0, 2)), rtol=1e-5, atol=1e-7
    )


def _saved(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_grid_is_the_smallest_fitting_one():
    # _grid against the brute-force search of grid_edges over random, tiny, huge, equal and
    # subnormal extremes: the same edges, all values in half-open bins.
    rng = np.random.default_rng(3)
    cases = [(0.0, 0.0), (1.0, 1.0), (-1e-45, 1e-45), (-3.4e38, 3.4e38), (1e4, 1e4 + 3.0),
             (5.0, 5.0 + 1e-4), (-0.75, -0.25), (-1.0, 1.0), (0.1, 0.3)]  # fmt: skip
    for _ in range(300):
        a, b = np.sort(rng.standard_normal(2) * 10.0 ** rng.integers(-40, 38, size=2))
        cases.append((a, b))
    for lo, hi in cases:
        lo, hi = float(np.float32(lo)), float(np.float32(hi))
        for bins in (2, 3, 7, 64, 1000):
            e, m = _grid(lo, hi, bins)
            want = grid_edges([lo, hi], bins)
            got = (m + np.arange(bins + 1)) * 2.0**e
            np.testing.assert_array_equal(got, want, err_msg=f"{lo} {hi} {bins}")
            assert got[0] <= lo and hi < got[-1]


def test_bin_index_without_float64_equals_float64():
    # MPS has no float64: the bin index then comes from two float32 scalings, exactly.
    rng = np.random.default_rng(7)
    v = np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.integers(-45, 38, size=2000),
                        [0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, -2.0**-126]])  # fmt: skip
    v = torch.tensor(v, dtype=torch.float32)
    v = v[torch.isfinite(v)]
    for e in (-149, -130, -60, -3, 0, 5, 60, 100, 127, 129):
        m = -(1 << 20)
        fine = v[(v.double() * 2.0**-e).abs() < 2**24] if e < 100 else v
        want = torch.floor(fine.double() / 2.0**e).long() - m
        assert torch.equal(_bin_index(fine, e, m, exact64=True), want), e
        assert torch.equal(_bin_index(fine, e, m, exact64=False), want), e


def test_old_checkpoint_format_is_refused():
    state = UnitStats(3, 2, 2, device="cpu").state_dict()
    state["format"] = 1
    with pytest.raises(ValueError, match=r"older lurker.*sweep the data again"):
        UnitStats.from_state_dict(state)
    # format 2 kept no peaks for the mean list: resuming would mix entries with and without
    state["format"] = 2
    with pytest.raises(ValueError, match=r"no peak positions for the mean list.*sweep the data"):
        UnitStats.from_state_dict(state)


@PATHS
def test_activation_is_read_during_update_only(cls):
    # The probe hands over outputs that a later in-place op may overwrite.
    acts, ids, labels = make_data((4, 3, 5), seed=53)
    stats = cls(4, 5, 4, device="cpu", buffer_samples=1000)
    scratch = acts.clone()
    start = 0
    for size in SIZES:
        sl = slice(start, start + size)
        stats.update(scratch[sl], ids[sl], labels[sl])
        scratch[sl] = -scratch[sl] + 7.0  # clobbered right after the update
        start += size
    res = stats.result()
    exp, _ = oracle(acts, ids, labels, 5, 4, res["hist_edges"])
    check_against(res, exp)


@PATHS
def test_map_size_may_change_between_batches(cls):
    # Flat peak indices are split into (y, x) by the width of the batch they came from.
    rng = np.random.default_rng(59)
    shapes = [(6, 3, 4, 5), (5, 3, 2, 7), (4, 3, 6, 1), (3, 3, 2, 4), (3, 3, 4, 5)]
    acts = [torch.tensor(rng.standard_normal(s), dtype=torch.float32) for s in shapes]
    ids = torch.tensor(rng.choice(1000, size=21, replace=False))
    stats = cls(3, 21, 0, device="cpu", buffer_samples=50)
    start = 0
    want = {}
    for a in acts:
        b = len(a)
        stats.update(a, ids[start : start + b], None)
        flat = a.flatten(2)
        peak, arg = flat.max(2)
        for i in range(b):
            for u in range(3):
                idx = int(arg[i, u])
                want[int(ids[start + i]), u] = (
                    float(peak[i, u]),
                    idx // a.shape[3],
                    idx % a.shape[3],
                )
        start += b
    res = stats.result()
    for u in range(3):
        got = {
            int(i): (float(v), int(y), int(x))
            for i, v, y, x in zip(
                res["max_ids"][u], res["max_values"][u], res["max_y"][u], res["max_x"][u]
            )
        }
        assert got == {i: w for (i, uu), w in want.items() if uu == u}


@PATHS
def test_peaks_at_the_threshold_and_nan(cls):
    # On the CPU peaks are located only for maps that enter the top-k by max: a late map that
    # only ties with the k-th best max so far (and wins on its id), and a NaN maximum, must
    # still be located.
    acts, ids, labels = make_data((3, 3, 4), seed=61)
    rng = np.random.default_rng(61)
    acts[:, 2] = torch.tensor(rng.uniform(0.0, 0.4, size=(N, 3, 4)), dtype=torch.float32)
    for i in range(49):  # unit 2 saturates: every early map peaks at exactly 0.5
        acts[i, 2, i % 3, i % 4] = 0.5
    acts[50, 2, 1, 1] = 0.5  # the last batch (49..56): only this one reaches the threshold,
    first = int(ids.argmin())  # and it has the smallest id, so it ranks first
    ids[[50, first]] = ids[[first, 50]]
    acts[52, 1, 2, 3] = math.nan
    stats = cls(3, 4, 4, device="cpu", buffer_samples=8)
    res = feed(stats, acts, ids, labels).result()
    # NaN ranks above everything (the oracle cannot rank it): like a huge value at that pixel.
    finite = acts.clone()
    finite[52, 1, 2, 3] = 1e30
    exp, _ = oracle(finite, ids, labels, 4, 4, res["hist_edges"])
    for key in ("mean_ids", "max_ids", "max_y", "max_x", "class_count"):
        np.testing.assert_array_equal(res[key].numpy(), exp[key], err_msg=key)
    means = acts.flatten(2).mean(2).numpy()  # unit 1's NaN mean changes the oracle's grid
    hist = np_hist(means, res["hist_edges"].numpy())
    np.testing.assert_array_equal(res["hist"].numpy(), hist)
    assert res["hist_nan"].tolist() == [0, 1, 0]
    assert int(res["max_ids"][1, 0]) == int(ids[52]) and math.isnan(res["max_values"][1, 0])
    assert (res["max_y"][1, 0], res["max_x"][1, 0]) == (2, 3)
    assert int(res["max_ids"][2, 0]) == int(ids[50])
    assert (res["max_y"][2, 0], res["max_x"][2, 0]) == (1, 1)


@PATHS
@pytest.mark.parametrize("bins", [2, 7, 64, 1000])
def test_histogram_binning_equals_numpy_on_and_beside_every_edge(cls, bins):
    # Values on, just above and just below every edge inside the range, random ones, and
    # non-finite ones: the counts equal numpy.histogram's over the same edges, each finite
    # value in exactly one half-open bin, the others counted apart.
    g = torch.Generator().manual_seed(bins)
    for lo, hi in [(0.0, 1.0), (-3.5, 2.0), (1e4, 1e4 + 3.0), (5.0, 5.0 + 1e-4), (-1e-30, 1e-30)]:
        span = torch.tensor([lo, hi], dtype=torch.float32)
        e = torch.tensor(grid_edges(span.numpy(), bins), dtype=torch.float32)
        inf = torch.tensor(math.inf)
        v = torch.cat([
            span, e, torch.nextafter(e, inf), torch.nextafter(e, -inf),
            lo + (hi - lo) * torch.rand(3000, generator=g),
        ])  # fmt: skip
        v = v[(v >= span[0]) & (v <= span[1])]  # the extremes, hence the grid, stay the same
        v = torch.cat([v, torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0])])
        v = v[(v != 0) | (lo <= 0 <= hi)]
        stats = cls(1, 1, 0, device="cpu", hist_bins=bins)
        stats.update(v[:, None], torch.arange(len(v)), None)
        res = stats.result()
        edges = grid_edges(v.numpy(), bins)
        np.testing.assert_array_equal(res["hist_edges"].numpy(), edges)
        np.testing.assert_array_equal(res["hist"].numpy(), np_hist(v[:, None].numpy(), edges))
        assert int(res["hist"].sum()) == len(v) - 3, (lo, hi)
        assert (res["hist_nan"].item(), res["hist_neginf"].item(), res["hist_posinf"].item()) == (
            1, 1, 1)  # fmt: skip


@PATHS
def test_state_dict_and_merge_include_buffered_samples(cls):
    acts, ids, labels = make_data((4, 3, 2), seed=67)
    whole = feed(UnitStats(4, 5, 4, device="cpu"), acts, ids, labels).result()
    kw = {"device": "cpu", "buffer_samples": 1000}
    first = feed(cls(4, 5, 4, **kw), acts[:25], ids[:25], labels[:25], sizes=SIZES[:3])
    state = first.state_dict()
    saved = {key: v.clone() if torch.is_tensor(v) else v for key, v in state.items()}
    assert state["count"] == 25 and int(state["class_count"].sum()) == 25
    resumed = cls.from_state_dict(state, buffer_samples=5)
    assert resumed.buffer_samples == 5
    feed(resumed, acts[25:], ids[25:], labels[25:], sizes=SIZES[3:])
    assert_same(whole, resumed.result())
    for key, v in saved.items():  # updates never write into the tensors they were given
        assert torch.equal(state[key], v) if torch.is_tensor(v) else state[key] == v
    # merge: both sides still hold buffered samples
    a = feed(cls(4, 5, 4, **kw), acts[:30], ids[:30], labels[:30], sizes=[30])
    b = feed(cls(4, 5, 4, **kw), acts[30:], ids[30:], labels[30:], sizes=[20, 7])
    a.merge(b)
    assert_same(whole, a.result())
    # Saving folded the buffer in; the saved-from state goes on as if nothing happened.
    feed(first, acts[25:], ids[25:], labels[25:], sizes=SIZES[3:])
    assert_same(whole, first.result())


def test_buffer_samples_validated_and_sized_by_units():
    with pytest.raises(ValueError, match="buffer_samples"):
        UnitStats(3, 2, 2, device="cpu", buffer_samples=0)
    assert UnitStats(8, 2, 2, device="cpu").buffer_samples == 1024
    assert UnitStats(4096, 2, 2, device="cpu").buffer_samples == 256  # 16 MiB at 16 B each
    assert UnitStats(8, 2, 2, device="meta").buffer_samples == 4096
    assert UnitStats(4096, 2, 2, device="meta").buffer_samples == 1024  # 64 MiB


@pytest.mark.parametrize("shape", [(5,), (4, 7), (3, 5, 6)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("buffer_samples", [1, 7, 64])
def test_device_code_path_matches_bruteforce(shape, buffer_samples):
    acts, ids, labels = make_data(shape, seed=71 + len(shape), ties=True)
    stats = DevicePath(shape[0], 6, 4, device="cpu", hist_bins=8, buffer_samples=buffer_samples)
    res = feed(stats, acts, ids, labels).result()
    assert stats._buf is None or stats._buf.is_contiguous()  # the sample-major layout
    exp, _ = oracle(acts, ids, labels, 6, 4, res["hist_edges"])
    check_against(res, exp)
    cpu = UnitStats(shape[0], 6, 4, device="cpu", hist_bins=8, buffer_samples=buffer_samples)
    assert_same(feed(cpu, acts, ids, labels).result(), res)


@PATHS
def test_class_means_do_not_depend_on_batches_buffer_or_resume(cls):
    """Resuming at another batch size (or a GPU's buffer folding other runs of samples): the
    torch path summed each fold's class means as a float32 matmul, so class and unit means
    changed in their last bits with the folds. Now every fold sums in float64, as the CPU
    kernel does: the float32 results are the same bits whatever the folds, and numpy's."""
    rng = np.random.default_rng(5)
    n, c = 600, 6
    acts = torch.from_numpy(rng.standard_normal((n, c, 3, 3)).astype(np.float32) * 10 + 3)
    ids, labels = torch.arange(n), torch.from_numpy(rng.integers(0, 3, n))
    means = acts.double().mean(dim=(2, 3)).float().double().numpy()  # the float32 means
    lab = labels.numpy()
    want = np.stack([means[lab == k].sum(0) / (lab == k).sum() for k in range(3)], 1)
    got = []
    for sizes, buffer in [([1] * n, 1), ([7] * 85 + [5], 64), ([600], 600), ([64] * 9 + [24], 100)]:
        stats = cls(c, 3, 3, device="cpu", buffer_samples=buffer)
        start = 0
        for size in sizes:
            stats.update(
                acts[start : start + size], ids[start : start + size], labels[start : start + size]
            )
            start += size
            if start == 300:  # a checkpoint and a resume halfway
                stats = UnitStats.from_state_dict(stats.state_dict()) if cls is UnitStats else stats
        got.append(stats.result())
    for res in got:  # (a path's float32 spatial means may differ from numpy's in the last bit)
        np.testing.assert_allclose(res["class_mean"].numpy(), want, rtol=3e-7)
        np.testing.assert_allclose(res["unit_mean"].numpy(), means.mean(0), rtol=3e-7)
        for key in ("class_mean", "unit_mean", "hist"):
            assert torch.equal(res[key], got[0][key]), key
