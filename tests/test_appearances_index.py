"""The sample page's inverted index of every unit's top lists is built one layer at a time
(numpy over all its units: a ResNet-50's 50,000 units took seconds one by one). It must
equal the index built unit by unit with the scalar criteria, which
tests/test_silent_units.py checks against hand-set models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lurker.server.state import (
    ROUNDOFF,
    _slots_constant_rows,
    _tied_tail_rows,
    slots_constant,
)
from lurker.store import Run
from lurker.store.schema import TOP_DTYPE

K = 5


def _tail_by_hand(values: np.ndarray, keep: np.ndarray, samples: int = 100) -> np.ndarray:
    """The tied tail of one list by a plain walk back from its last entry: two or more
    zeros ending a full list, or a full list all of one value, in a run of more samples
    than the list holds."""
    out = np.zeros(len(values), bool)
    n = int(keep.sum())
    if n < 2 or n < len(values) or samples <= len(values):
        return out
    i = n - 1
    while i > 0 and values[i - 1] == values[n - 1]:
        i -= 1
    if n - i >= 2 and (values[n - 1] == 0 or i == 0):
        out[i:n] = True
    return out


def _random_lists(rng: np.random.Generator, n: int) -> tuple[list, list, np.ndarray]:
    """``n`` units' stored mean, max and top slots, drawn to hit every branch: constant
    units (0 and other values, with the mean's roundoff), lists of ties, tied tails,
    unfilled slots, NaN and inf values, unknown means."""
    top = np.zeros((n, 2 * K), TOP_DTYPE)
    means: list = []
    maxes: list = []
    for i in range(n):
        kind = rng.integers(7)
        filled = rng.integers(0, K + 1) if kind == 6 else K
        c = float(rng.choice([0.0, 0.1, -0.37, 2.0]))
        vals = np.sort(rng.choice([c, c - 1, c - 2, 3.0], 2 * K))[::-1]
        if kind in (0, 1):  # constant, or constant but for one dip of the mean list
            vals = np.full(2 * K, c)
            if kind == 1:
                vals[K + rng.integers(K)] -= 1e-3
        elif kind == 2:
            vals[rng.integers(2 * K)] = rng.choice([math.nan, math.inf])
        top["value"][i] = vals
        top["sample_id"][i] = rng.permutation(40)[: 2 * K]
        top["sample_id"][i, filled:K] = -1
        top["sample_id"][i, K + filled :] = -1
        mean = c * (1 + float(rng.choice([0, 50, 1e4])) * ROUNDOFF) if kind < 2 else c - 0.5
        means.append(None if kind == 5 else mean)
        maxes.append(None if kind == 4 and rng.integers(2) else float(vals[0]))
    return means, maxes, top


@pytest.mark.parametrize("seed", range(5))
def test_rows_at_once_equal_unit_by_unit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    means, maxes, top = _random_lists(rng, 400)
    for positions in (1, 64, 12544):
        fast = _slots_constant_rows(means, maxes, top, positions)
        slow = [slots_constant(m, x, t, positions) for m, x, t in zip(means, maxes, top)]
        assert fast.tolist() == slow
        assert 0 < sum(slow) < len(slow)  # both kinds drawn
    keep = top["sample_id"] >= 0
    for half in (slice(0, K), slice(K, 2 * K)):
        fast = _tied_tail_rows(top["value"][:, half], keep[:, half], 100)
        slow = [_tail_by_hand(v, k) for v, k in zip(top["value"][:, half], keep[:, half])]
        assert fast.tolist() == [s.tolist() for s in slow]
    assert fast.any() and not fast.all()


def _index_unit_by_unit(run: Run) -> tuple[dict, dict, set]:
    """The index as the server built it before, one unit at a time: its entries by sample
    as ``(layer, unit, list, rank, value)``, the left-out counts and the tied samples."""
    position = {info.id: i for i, info in enumerate(run.layers)}
    from lurker.server.state import positions_per_sample

    positions = {info.id: positions_per_sample(info) for info in run.layers}
    entries: dict[int, list] = {}
    left: dict[int, dict[int, int]] = {}
    tied: set[int] = set()

    def leave_out(ids: np.ndarray, layer: int) -> None:
        for sid in ids[ids >= 0].tolist():
            left.setdefault(sid, {}).setdefault(layer, 0)
            left[sid][layer] += 1

    for layer_id, unit, mean, mx, top in run._query(
        "SELECT layer_id, unit, mean, max, top FROM units"
    ):
        if top is None or layer_id not in position:
            continue
        slots = np.frombuffer(bytes(top), TOP_DTYPE)
        layer = position[layer_id]
        if slots_constant(mean, mx, slots, positions[layer_id]):
            leave_out(slots["sample_id"], layer)
            continue
        k = len(slots) // 2
        for which, half in enumerate((slice(0, k), slice(k, len(slots)))):
            s = slots[half]
            keep = s["sample_id"] >= 0
            tail = _tail_by_hand(s["value"], keep, run.num_samples)
            leave_out(s["sample_id"][tail], layer)
            tied.update(s["sample_id"][tail].tolist())
            for rank in np.flatnonzero(keep & ~tail).tolist():
                sid = int(s["sample_id"][rank])
                entries.setdefault(sid, []).append(
                    (layer, int(unit), which, rank, float(s["value"][rank]))
                )
    return entries, left, tied


def test_index_of_a_run_equals_the_unit_by_unit_one(tmp_path: Path) -> None:
    """A small CNN with dead ReLU channels (bias -10: constant 0, left out), a constant
    non-zero channel and live ones, its lists full of ties at 0."""
    from lurker.probe import probe
    from lurker.server.state import RunEntry

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU())
    with torch.no_grad():
        model[0].bias[:3] = -10.0  # never fire after the ReLU
        model[0].bias[3] = -2.0  # fires on a few samples: its lists end in ties at 0
        model[2].weight[0].zero_()
        model[2].bias[0] = 0.25  # constant 0.25
    x = torch.randn(30, 3, 10, 10)
    data = torch.utils.data.TensorDataset(x, torch.arange(30) % 3)
    out = tmp_path / "run"
    probe(model.eval(), data, out=out, k=K, progress=False).close()

    run = Run.open(out)
    index = RunEntry("run", out, run).appearances()
    entries, left, tied = _index_unit_by_unit(run)
    got: dict[int, list] = {}
    for i in range(len(index.sample)):
        got.setdefault(int(index.sample[i]), []).append(
            (int(index.layer[i]), int(index.unit[i]), int(index.which[i]), int(index.rank[i]),
             float(index.value[i]))
        )  # fmt: skip
    assert {s: sorted(v) for s, v in got.items()} == {s: sorted(v) for s, v in entries.items()}
    assert index.left == left and left  # dead units were left out
    assert set(index.tails.tolist()) == tied and tied  # ties at 0 of the live ReLUs
