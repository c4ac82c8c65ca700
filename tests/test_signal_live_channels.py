"""Live names the dataset's channels on ops that keep them, and only on those.

An op whose output is the input's channels one to one (a dropout, ``x * 0.5``, ``x -
mean`` with a stored mean, an activation) showed "unit 0, unit 1" where the input showed
"Fz, Cz": the graph was not read for which ops keep channels. A conv, a transpose, a mean
over time or a permutation of the channels must not be named so: names on a permutation
would be wrong. Oracles: each op's output computed by hand from the sample, channel by
channel, and the graph's own shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from explorer_fixtures import get_json, served_run, skip_without_browser, strict_page

C, T, RATE = 3, 40, 100
NAMES = ["Fz", "Cz", "Pz"]
SAMPLE = 2


class Eeg(TensorDataset):
    channel_names = NAMES
    sample_rate = RATE


class Chain(nn.Module):
    """Elementwise ops before the first conv, and beside them ops that move or mix the
    channels (all of them reach the output, so all are traced)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.register_buffer("mean", torch.tensor([[1.0], [-2.0], [3.0]]))
        self.conv = nn.Conv1d(C, 4, 5, padding=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = torch.tanh(self.drop(x) * 0.5 - self.mean)
        moved = (
            x.flip(1).sum()
            + x[:, [2, 0, 1]].sum()
            + (x + x.flip(1)).sum()
            + torch.cat([x, x.flip(1)], 2).sum()
            + x.transpose(1, 2).sum()
            + x.mean(-1, keepdim=True).sum()
        )
        return self.fc(self.conv(kept).mean(-1)) + 0 * moved


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    data = Eeg(torch.randn(12, C, T, generator=g), torch.arange(12) % 2)
    with served_run(tmp_path_factory.mktemp("keep"), "eeg", Chain().eval(), data, "conv", 3) as r:
        yield r


def _labels(run: dict) -> dict[str, str]:
    """The first op of each name, by the run's graph: ``{'dropout': 'dropout_1', ...}``."""
    import lurker

    found: dict[str, str] = {}
    for op in lurker.Run.open(run["run"]).graph.ops:
        found.setdefault(op.name, op.label)
    return found


def _op(run: dict, op: str) -> dict:
    return get_json(f"{run['url']}/api/runs/eeg/live/sample-{SAMPLE}/ops/{op}")


def _lines(run: dict, op: str, side: str) -> torch.Tensor:
    doc = get_json(f"{run['url']}/api/runs/eeg/live/sample-{SAMPLE}/ops/{op}/{side}.json")
    return torch.tensor(doc["values"], dtype=torch.float32).reshape(doc["shape"])


KEPT = {"channels": True, "model_input": False, "stride": 1.0, "start": 0.0}


def test_elementwise_ops_on_the_input_keep_its_channels_and_samples(run: dict):
    x = run["data"].tensors[0][SAMPLE]
    mean = torch.tensor([[1.0], [-2.0], [3.0]])
    by_hand = {"dropout": x, "mul": x * 0.5, "sub": x * 0.5 - mean}
    by_hand["tanh"] = torch.tanh(by_hand["sub"])
    labels = _labels(run)
    for name, want in by_hand.items():
        doc = _op(run, labels[name])
        assert doc["output_time"] == KEPT, name
        # lane i is channel i: the values by hand, channel by channel
        torch.testing.assert_close(_lines(run, labels[name], "output"), want, msg=name)
    conv = _op(run, labels["conv1d"])  # its input is the chain's end: channels, samples
    assert conv["input_time"] == KEPT
    assert conv["output_time"]["channels"] is False  # its units mix every channel
    inp = _op(run, "input_1")["output_time"]
    assert inp == {**KEPT, "model_input": True}


# x + x.flip(1): add_1 and the other adds are of the sums
@pytest.mark.parametrize(
    "label", ["flip_1", "getitem_1", "add_2", "cat_1", "transpose_1", "mean_1"]
)
def test_ops_that_move_or_mix_channels_are_not_named_by_them(run: dict, label: str):
    doc = _op(run, label)
    # each reads the input (an eval dropout hands on the input tensor itself)
    assert doc["input_time"]["channels"] is True
    time = doc["output_time"]
    assert time is None or time["channels"] is False, (label, time)
    if label in ("flip_1", "getitem_1"):  # same shape, other order: names would be wrong
        lines = _lines(run, label, "output")
        x = run["data"].tensors[0][SAMPLE]
        assert lines.shape == x.shape and not torch.equal(lines, x)


def test_live_names_the_lanes_of_an_op_that_keeps_channels(browser: Any, run: dict, tmp_path: Path):
    skip_without_browser()
    labels = _labels(run)
    with strict_page(browser, width=1280) as pg:
        for label, named in ((labels["sub"], True), ("flip_1", False)):
            pg.goto(f"{run['url']}/#/r/eeg/live?image=sample-{SAMPLE}&op={label}")
            card = pg.locator('section.live-lines[data-side="output"]')
            card.locator("svg.signal-plot").first.wait_for()
            lanes = card.locator("figcaption strong").all_text_contents()
            unit = card.locator("g.signal-axis").first.get_attribute("data-unit")
            if named:
                assert lanes == NAMES and unit == "s"
                assert "the input's channels" in card.locator("h3").inner_text()
                pg.screenshot(path=str(tmp_path / "sub.png"), full_page=True)
            else:
                assert lanes == ["0", "1", "2"]


class _Parts(nn.Module):
    """A parameter and a buffer of the input's shape, for calls whose other tensor
    arguments give no values (``p.type_as(x)``, ``out=``)."""

    def __init__(self, fwd: Any) -> None:
        super().__init__()
        self.fwd = fwd
        self.p = nn.Parameter(torch.randn(1, 3, 3))
        self.register_buffer("b", torch.randn(1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fwd(self, x)


def _neg_into(s: Any, x: torch.Tensor) -> torch.Tensor:
    y = x * 1
    torch.neg(s.b.flip(1), out=y)  # y now holds the flipped buffer, not the input
    return y * 1


@pytest.mark.parametrize(
    "fwd, last, kept",
    [
        (lambda s, x: s.p.type_as(x) * 1, False, []),  # the parameter's values
        (lambda s, x: s.p.to(x) * 1, False, []),
        (_neg_into, False, ["mul"]),  # x * 1 is the input; neg's out= is not its value
        (lambda s, x: x.type_as(s.p) * 2, False, ["type_as", "mul"]),  # x's own values
        # axis 1 is time on a channels-last input: the norm mixes its channels
        (lambda s, x: F.instance_norm(x) * 1, True, []),
        (lambda s, x: F.instance_norm(x) * 1, False, ["instance_norm", "mul"]),
    ],
)
def test_only_the_arguments_that_give_values_carry_the_inputs_channels(fwd, last, kept):
    # review: p.type_as(x), p.to(x) and torch.neg(b.flip(1), out=y) were said to be the
    # input's channels (to()'s other and out= were read as values), and a norm over axis 1
    # on a channels-last input, which is time there
    import lurker
    from lurker.server.session import _keeps_input

    model = _Parts(fwd).eval()
    tr = lurker.trace(model, torch.randn(1, 3, 3))
    found = _keeps_input(tr, channels_last=last)
    assert [op.name for op in tr.ops if op.kind == "op" and found.get(op.index)] == kept
