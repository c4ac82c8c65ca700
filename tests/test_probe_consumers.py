"""lurker.probe.consumers: a statistic added as one more consumer, with no change to the sweep."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from lurker.examples import DigitsNet
from lurker.probe import sweep
from lurker.probe.consumers import Batch, BatchConsumer
from lurker.probe.data import digits
from lurker.probe.sweep import Layer
from lurker.store import RunWriter


class SampleSums(BatchConsumer):
    """Each sample's sum over a layer's whole output, by layer: the simplest statistic."""

    key = "sample_sums"

    def __init__(self, layers: list[Layer], n: int) -> None:
        self.sums = {
            layer.name: torch.full((n,), float("nan"), dtype=torch.float64) for layer in layers
        }
        self.batches = 0
        self.finished = False

    def begin(self, batch: Batch) -> None:
        self.batches += 1

    def update(self, layer: Layer, output: torch.Tensor, batch: Batch) -> None:
        self.sums[layer.name][batch.ids.cpu()] = output.flatten(1).double().sum(1).cpu()

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "batches": self.batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums, self.batches = dict(state["sums"]), int(state["batches"])

    def merge(self, group: Any = None) -> None:
        raise AssertionError("a single process never merges")

    def finish(self, writer: RunWriter) -> None:
        self.finished = True
        writer.meta_set("sample_sums_batches", self.batches)


def test_added_consumer_sees_every_layer_output_before_inplace_ops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A consumer added beside the unit statistics gets every sample's output of every probed
    layer, as the op produced it: features.8's conv output is read before the in-place ReLU
    after it overwrites it (the oracle: forward hooks that clone), and writes into the run."""
    torch.manual_seed(0)
    model = DigitsNet().eval()
    ds = digits(16, split="test")
    layers = ["features.8", "classifier.3"]
    made: list[SampleSums] = []
    default = sweep._consumers

    def with_sums(plan: Any) -> list[BatchConsumer]:
        made.append(SampleSums(plan.layers, len(ds)))
        return [*default(plan), made[-1]]

    monkeypatch.setattr(sweep, "_consumers", with_sums)
    run = sweep.probe(model, ds, out=tmp_path / "run", layers=layers, k=2, batch_size=50,
                      progress=False)  # fmt: skip
    assert run is not None
    (sums,) = made
    assert sums.finished and sums.batches == -(-len(ds) // 50)
    assert run.meta["sample_sums_batches"] == sums.batches
    assert [layer.name for layer in run.layers] == layers  # the unit statistics still there

    outs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: Any, args: Any, output: torch.Tensor) -> None:  # None: output kept
            outs[name] = output.clone()

        return hook

    mods = dict(model.named_modules())
    hooks = [mods[name].register_forward_hook(keep(name)) for name in layers]
    with torch.no_grad():
        model(torch.stack([ds[i][0] for i in range(len(ds))]))
    for h in hooks:
        h.remove()
    for name in layers:
        want = outs[name].flatten(1).double().sum(1)
        torch.testing.assert_close(sums.sums[name], want, rtol=1e-5, atol=1e-3)
    assert (outs["features.8"] < 0).any()  # so the in-place ReLU would have changed it
