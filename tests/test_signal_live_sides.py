"""Live's op sides on signal runs whose input is not ``(C, T)`` as stored.

A raw waveform's ``(T,)`` samples (an M5 unsqueezes them into a Conv1d) made the model's
input op a 1 x T "feature vector", and a channels-last ``(T, C)`` run (transposed into a
Conv1d, or a batch-first LSTM) gave its input T lanes of C values and its ops no time
axis ("stride not known exactly"). Oracles: the dataset's samples, the receptive fields
by hand (and the probe's along time), the dataset's channel names.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

import lurker
from explorer_fixtures import get_json, served_run, skip_without_browser, strict_page
from lurker.server.state import signal_rf
from test_signal_layouts import ChannelsLast, Recurrent
from test_waveform_signals import M5

NAMES = ["Fz", "Cz", "Pz"]


class Named(TensorDataset):
    channel_names = NAMES


class Mic(TensorDataset):
    channel_names = ["mic"]
    sample_rate = 8000


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    made = {
        "wav": (M5().eval(), Mic(torch.randn(12, 240, generator=g), torch.arange(12) % 3), "conv1"),
        "cl": (
            ChannelsLast().eval(),
            Named(torch.randn(12, 64, 3, generator=g), torch.arange(12) % 2),
            "conv",
        ),
        "rnn": (
            Recurrent().eval(),
            TensorDataset(torch.randn(12, 20, 8, generator=g), torch.arange(12) % 2),
            "fc",
        ),
    }
    root = tmp_path_factory.mktemp("livesides")
    with (
        served_run(root, "wav", *made["wav"][:2], made["wav"][2], 3) as wav,
        served_run(root, "cl", *made["cl"][:2], made["cl"][2], 3) as cl,
        served_run(root, "rnn", *made["rnn"][:2], made["rnn"][2], 3) as rnn,
    ):
        yield {"wav": wav, "cl": cl, "rnn": rnn}


def _op(run: dict, rid: str, op: str, sample: int = 2) -> dict:
    return get_json(f"{run['url']}/api/runs/{rid}/live/sample-{sample}/ops/{op}")


def _lines(run: dict, rid: str, op: str, side: str, sample: int = 2) -> torch.Tensor:
    doc = get_json(f"{run['url']}/api/runs/{rid}/live/sample-{sample}/ops/{op}/{side}.json")
    return torch.tensor(doc["values"], dtype=torch.float32).reshape(doc["shape"])


def test_a_waveforms_input_op_is_its_one_channel_over_time(runs: dict):
    run = runs["wav"]
    doc = _op(run, "wav", "input_1")
    assert doc["output_time"] == {
        "model_input": True,
        "channels": True,
        "stride": 1.0,
        "start": 0.0,
    }
    assert doc["output"]["channels"] == 1 and doc["output"]["map_shape"] == [1, 240]
    x = run["data"].tensors[0][2]
    assert torch.equal(_lines(run, "wav", "input_1", "output"), x[None])
    # the conv's input, the unsqueezed waveform, is on the samples; its output's step is
    # the conv's stride, 4 samples, as the probe's field along time says
    conv = _op(run, "wav", "conv1d_1")
    assert conv["input_time"] == {
        "model_input": False,
        "channels": False,
        "stride": 1.0,
        "start": 0.0,
    }
    rf = signal_rf(lurker.Run.open(run["run"]), lurker.Run.open(run["run"]).layer("conv1"))
    assert conv["output_time"]["stride"] == 4.0 == rf["x"]["stride"]


@pytest.mark.parametrize("rid, op", [("cl", "transpose_1"), ("rnn", "lstm_1")])
def test_a_channels_last_input_is_its_channels_over_time(runs: dict, rid: str, op: str):
    run = runs[rid]
    x = run["data"].tensors[0][2]  # (T, C)
    for label, side, key in (("input_1", "output", "output_time"), (op, "input", "input_time")):
        doc = _op(run, rid, label)
        assert doc[key] == {"model_input": True, "channels": True, "stride": 1.0, "start": 0.0}, (
            label,
            side,
        )
        assert doc[side]["channels"] == x.shape[1] and doc[side]["map_shape"] == [1, x.shape[0]]
        assert torch.equal(_lines(run, rid, label, side), x.T), (label, side)


def test_a_channels_last_runs_ops_get_their_stride_along_time(runs: dict):
    """Conv1d(3, 4, 5, padding=2) after the transpose: step t sees samples [t-2, t+3);
    a batch-first LSTM's step t sees [0, t + 1). Both are the probe's fields along time."""
    cl = _op(runs["cl"], "cl", "conv1d_1")
    assert cl["input_time"] == {
        "model_input": False,
        "channels": False,
        "stride": 1.0,
        "start": 0.0,
    }
    assert cl["output_time"] == {
        "model_input": False,
        "channels": False,
        "stride": 1.0,
        "start": -2.0,
    }
    r = lurker.Run.open(runs["cl"]["run"])
    rf = signal_rf(r, r.layer("conv"))  # the probe's field of the conv, along time
    assert (rf["x"]["stride"], rf["x"]["start"]) == (1, -2)
    rnn = _op(runs["rnn"], "rnn", "lstm_1")
    # step t's field ends at t + 1 and spans all 20 steps (clipped at 0): start t - 19
    assert rnn["output_time"] == {
        "model_input": False,
        "channels": False,
        "stride": 1.0,
        "start": -19.0,
    }
    assert rnn["output"]["map_shape"] == [1, 20] and rnn["output"]["channels"] == 16


def _live_lanes(pg: Any, url: str, rid: str, op: str, side: str) -> tuple[list[str], Any]:
    pg.goto(f"{url}/#/r/{rid}/live?image=sample-2&op={op}")
    card = pg.locator(f'section.live-lines[data-side="{side}"]')
    card.locator("svg.signal-plot").first.wait_for()
    return card.locator("figcaption strong").all_text_contents(), card


def test_live_draws_the_inputs_as_named_lines(browser: Any, runs: dict, tmp_path: Path):
    skip_without_browser()
    with strict_page(browser, width=1280) as pg:
        url = runs["cl"]["url"]
        names, card = _live_lanes(pg, url, "cl", "input_1", "output")
        assert names == NAMES  # the 3 channels in order, not 64 lanes of 3 values
        assert "the model's input" in card.locator("h3").inner_text()
        assert card.locator("g.signal-axis").first.get_attribute("data-unit") == "samples"
        pg.screenshot(path=str(tmp_path / "cl-input.png"), full_page=True)
        names, card = _live_lanes(pg, url, "cl", "conv1d_1", "output")
        assert card.locator("p.line-axis").first.inner_text() == "steps · 1 step = 1 sample"
        url = runs["wav"]["url"]
        names, card = _live_lanes(pg, url, "wav", "input_1", "output")
        assert names == ["mic"] and card.locator("path.signal-line").count() == 1
        assert pg.locator(".live-maps .vector-view, .live-maps g.bars").count() == 0
        assert card.locator("g.signal-axis").first.get_attribute("data-unit") == "s"
        pg.screenshot(path=str(tmp_path / "wav-input.png"), full_page=True)
        names, card = _live_lanes(pg, url, "wav", "conv1d_1", "output")
        assert "1 step = 4 samples (0.5 ms)" in card.locator("p.line-axis").first.inner_text()
