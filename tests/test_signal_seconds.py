"""A signal dataset's ``sample_rate`` (Hz) gives the explorer's spans in seconds.

A neuroscientist's EEG at 128 Hz was shown only in samples ("sees samples 157-172
(16)"): now the rate is stored in the run, given in the summary, and where it is known the
unit captions, the layer's receptive field and the sample page's time axis are in seconds
too; a bad rate is refused before anything is probed, and runs without one are unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from explorer_fixtures import get_json, served_run, skip_without_browser, strict_page
from test_signal_documents import _model  # the same 8-channel Conv1d model

C, T, K, N, RATE = 8, 512, 4, 30, 128
NAMES = ["Fz", "Cz", "Pz", "Oz", "F3", "F4", "P3", "P4"]
DASH = "\u2013"  # the pages' en dash between a span's ends


class Eeg(TensorDataset):
    """(signal, label) pairs recorded at ``RATE`` Hz, as an EEG loader says."""

    sample_rate = RATE
    channel_names = NAMES


def _tensors() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, C, T, generator=g), torch.arange(N) % 2


@pytest.fixture(scope="module")
def timed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with served_run(tmp_path_factory.mktemp("hz"), "eeg", _model(), Eeg(*_tensors()), "0", K) as s:
        yield s


@pytest.fixture(scope="module")
def untimed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data = TensorDataset(*_tensors())
    with served_run(tmp_path_factory.mktemp("nohz"), "raw", _model(), data, "0", K) as s:
        yield s


def test_the_rate_is_stored_and_served(timed: dict, untimed: dict):
    from lurker.store import Run

    run = Run.open(timed["run"])
    assert run.meta["config"]["sample_rate"] == 128.0
    run.close()
    for url in (timed["url"], timed["bare"]):
        assert get_json(f"{url}/api/runs/eeg")["dataset"]["sample_rate"] == 128.0
    assert get_json(f"{untimed['url']}/api/runs/raw")["dataset"]["sample_rate"] is None


@pytest.mark.parametrize("bad", [0, -128, math.nan, math.inf, "128", True, [128]])
def test_a_bad_rate_is_refused_naming_it(tmp_path: Path, bad: object):
    from lurker.errors import LurkerError
    from lurker.probe import probe

    data = Eeg(*_tensors())
    data.sample_rate = bad  # type: ignore[assignment]
    with pytest.raises(LurkerError, match=r"sample_rate is .*positive finite number"):
        probe(_model(), data, out=tmp_path / "bad", k=K, batch_size=16, progress=False)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").rglob("*.json"))


def test_a_rate_on_inputs_that_are_not_signals_is_ignored(tmp_path: Path):
    """Images have no time axis: the rate (even a bad one) means nothing to them."""
    from lurker.probe import probe

    class Pictures(TensorDataset):
        sample_rate = -1

    g = torch.Generator().manual_seed(0)
    data = Pictures(torch.rand(12, 1, 8, 8, generator=g), torch.arange(12) % 2)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten()).eval()
    run = probe(model, data, out=tmp_path / "img", k=2, batch_size=4, progress=False)
    assert run is not None and "sample_rate" not in run.meta["config"]
    run.close()


def _seconds(text: str) -> tuple[float, float] | None:
    m = re.search(rf"· ([\d.]+){DASH}([\d.]+) s$", text)
    return None if m is None else (float(m[1]), float(m[2]))


def test_the_pages_give_seconds_as_samples_over_the_rate(browser: Any, timed: dict):
    skip_without_browser()
    url = timed["url"]
    doc = get_json(f"{url}/api/runs/eeg/layers/0/units/2")
    spans = [e["span"] for e in doc["top"]["max"]]
    rf = get_json(f"{url}/api/runs/eeg/layers/0")["rf"]["x"]
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/eeg/unit/0/2?tab=max")
        pg.wait_for_function(
            f"document.querySelectorAll('.signal-entry .span-text').length === {K}"
        )
        texts = pg.locator(".signal-entry .span-text").all_text_contents()
        for (t0, t1), text in zip(spans, texts, strict=True):
            assert text.startswith(f"sees samples {t0}{DASH}{t1 - 1} ({t1 - t0})")
            first, last = _seconds(text) or pytest.fail(f"no seconds in {text!r}")
            # to the shown 3 decimals (128 Hz: a sample is 7.8 ms)
            assert abs(first - t0 / RATE) <= 5e-4 and abs(last - (t1 - 1) / RATE) <= 5e-4

        pg.goto(f"{url}/#/r/eeg/layer/0")
        line = pg.locator("#rf-text").inner_text(timeout=10_000)
        m = re.fullmatch(r"(\d+) samples \((\d+) ms\), stride (\d+) \((\d+) ms\)", line)
        assert m, line
        assert (int(m[1]), int(m[3])) == (rf["size"], rf["stride"])
        assert int(m[2]) == round(1000 * rf["size"] / RATE)  # 9 samples: 70 ms
        assert int(m[4]) == round(1000 * rf["stride"] / RATE)  # 4 samples: 31 ms

        pg.goto(f"{url}/#/r/eeg/sample/4")
        axis = pg.locator("#sample-signal g.signal-axis")
        axis.wait_for()
        assert axis.get_attribute("data-unit") == "s"
        ticks = axis.locator("g.tick")
        values = [float(v) for v in ticks.locator("text").all_text_contents()]
        assert values[0] == 0 and 3.5 <= values[-1] <= T / RATE  # a 512-sample signal: 4 s
        # each tick sits where its time's sample is: x = 4 + (t * rate) / T * (width - 8)
        for i, v in enumerate(values):
            x = float(re.search(r"translate\(([\d.]+)", ticks.nth(i).get_attribute("transform"))[1])
            assert abs(x - (4 + v * RATE / T * 1192)) < 0.6
        # every tick label lies inside the plot (those at its edges were cut in half)
        svg = pg.locator("#sample-signal svg.signal-plot").bounding_box()
        for box in (ticks.nth(i).locator("text").bounding_box() for i in range(len(values))):
            assert svg["x"] <= box["x"] and box["x"] + box["width"] <= svg["x"] + svg["width"]


def test_pages_of_a_run_without_a_rate_stay_in_samples(browser: Any, untimed: dict):
    skip_without_browser()
    url = untimed["url"]
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/raw/unit/0/2?tab=max")
        pg.wait_for_function(
            f"document.querySelectorAll('.signal-entry .span-text').length === {K}"
        )
        for text in pg.locator(".signal-entry .span-text").all_text_contents():
            assert re.fullmatch(rf"sees samples \d+{DASH}\d+ \(\d+\)", text), text
        pg.goto(f"{url}/#/r/raw/layer/0")
        assert re.fullmatch(r"\d+ samples, stride \d+", pg.locator("#rf-text").inner_text())
        pg.goto(f"{url}/#/r/raw/sample/4")
        axis = pg.locator("#sample-signal g.signal-axis")
        axis.wait_for()
        assert axis.get_attribute("data-unit") == "samples"
        assert pg.locator("#sample-signal .signal-axis-unit").count() == 0


def _ticks(axis: Any, width: int, length: int, per: float) -> list[float]:
    """An axis's tick values, each checked to sit where its position is drawn: x = 4 +
    (v * per) / length * (width - 8) (``per``: the rate on a seconds axis, else 1)."""
    ticks = axis.locator("g.tick")
    values = [float(v) for v in ticks.locator("text").all_text_contents()]
    assert values and values[0] == 0
    for i, v in enumerate(values):
        x = float(re.search(r"translate\(([\d.]+)", ticks.nth(i).get_attribute("transform"))[1])
        assert abs(x - (4 + v * per / length * (width - 8))) < 0.6, (v, x)
    return values


def _live_op(pg: Any, url: str, rid: str, shot: Path | None = None) -> tuple[Any, Any]:
    pg.goto(f"{url}/#/r/{rid}/live?image=sample-4&op=conv1d_1")
    inp = pg.locator(".live-lines[data-side='input']")
    out = pg.locator(".live-lines[data-side='output']")
    out.wait_for(timeout=60_000)
    if shot is not None:
        for width in (1280, 800):
            pg.set_viewport_size({"width": width, "height": 900})
            pg.screenshot(path=str(shot / f"live-{rid}-{width}.png"), full_page=True)
    return inp, out


def test_live_op_lines_name_the_input_channels_and_time_the_steps(
    browser: Any, timed: dict, tmp_path: Path
):
    """The model's input drawn on Live is the EEG itself: its lanes are the electrodes and
    its axis seconds (sample / rate); the conv's output keeps unit numbers, its axis in
    steps, each step the layer's stride in samples and ms (the receptive field's, exact)."""
    skip_without_browser()
    url = timed["url"]
    stride = get_json(f"{url}/api/runs/eeg/layers/0")["rf"]["x"]["stride"]
    with strict_page(browser) as pg:
        inp, out = _live_op(pg, url, "eeg", tmp_path)
        assert [t.strip() for t in inp.locator("figcaption strong").all_text_contents()] == NAMES
        axes = inp.locator("g.signal-axis")
        assert axes.count() == C
        assert {axes.nth(i).get_attribute("data-unit") for i in range(C)} == {"s"}
        values = _ticks(axes.first, 260, T, RATE)
        assert 3.5 <= values[-1] <= T / RATE  # 512 samples at 128 Hz: 4 s
        assert inp.locator(".line-axis").all_text_contents() == ["time (s), 128 Hz"] * C
        assert [
            inp.locator("path.signal-line title").nth(i).text_content() for i in range(C)
        ] == NAMES

        # units, not channels: no electrode names
        assert "Fz" not in out.inner_text()
        assert [t.strip() for t in out.locator("figcaption strong").all_text_contents()] == [
            str(u) for u in range(6)
        ]
        axis = out.locator("g.signal-axis").first
        assert axis.get_attribute("data-unit") == "steps"
        _ticks(axis, 260, (T - 9) // 4 + 1, 1)  # 126 steps
        notes = out.locator(".line-axis").all_text_contents()
        assert len(notes) == 6 and len(set(notes)) == 1
        m = re.fullmatch(r"steps · 1 step = (\d+) samples \((\d+) ms\)", notes[0])
        assert m, notes[0]
        assert int(m[1]) == stride == 4 and int(m[2]) == round(1000 * stride / RATE)


def test_live_op_lines_without_a_rate_stay_in_samples(browser: Any, untimed: dict):
    skip_without_browser()
    url = untimed["url"]
    with strict_page(browser) as pg:
        inp, out = _live_op(pg, url, "raw")
        axis = inp.locator("g.signal-axis").first
        assert axis.get_attribute("data-unit") == "samples"
        assert _ticks(axis, 260, T, 1)[-1] <= T
        assert set(inp.locator(".line-axis").all_text_contents()) == {"samples"}
        assert inp.locator("figcaption strong").first.text_content().strip() == "0"
        assert set(out.locator(".line-axis").all_text_contents()) == {"steps · 1 step = 4 samples"}


#: where a plot's axis unit ("time (s), 128 Hz") lies against its tick labels and the plot
_AXIS_NOTE_BOX = """svg => {
  const note = svg.querySelector('.signal-axis-unit').getBoundingClientRect();
  const ticks = [...svg.querySelectorAll('.signal-axis .tick text')]
    .map(t => t.getBoundingClientRect().bottom);
  return {note_top: note.top, note_bottom: note.bottom, ticks_bottom: Math.max(...ticks),
          svg_bottom: svg.getBoundingClientRect().bottom};
}"""


def test_explain_plots_are_in_seconds_with_the_channel_names(
    browser: Any, timed: dict, untimed: dict, tmp_path: Path
):
    skip_without_browser()
    for s, rid, unit in ((timed, "eeg", "s"), (untimed, "raw", "samples")):
        with strict_page(browser) as pg:
            pg.set_viewport_size({"width": 1280, "height": 900})
            pg.goto(f"{s['url']}/#/r/{rid}/explain?image=sample-4")
            pg.wait_for_function(
                "document.querySelectorAll('.signal-explain-card svg.signal-plot').length > 0",
                timeout=60_000,
            )
            card = pg.locator(".signal-explain-card").first
            axis = card.locator("g.signal-axis")
            assert axis.get_attribute("data-unit") == unit
            values = _ticks(axis, 560, T, RATE if unit == "s" else 1)
            assert values[-1] <= (T / RATE if unit == "s" else T)
            labels = card.locator(".signal-lane-label").all_text_contents()
            assert labels == (NAMES if rid == "eeg" else [])
            if unit == "s":  # the unit's row lies under the tick labels, inside the plot
                box = card.locator("svg.signal-plot").first.evaluate(_AXIS_NOTE_BOX)
                assert box["note_top"] >= box["ticks_bottom"] - 0.5, box
                assert box["note_bottom"] <= box["svg_bottom"] + 0.5, box
            # concept relevance's cards too (they were in samples, their lanes unnamed)
            pg.wait_for_function(
                "document.querySelectorAll('.signal-concept-card svg.signal-plot').length > 0",
                timeout=60_000,
            )
            concept = pg.locator(".signal-concept-card").first
            assert concept.locator("g.signal-axis").get_attribute("data-unit") == unit
            named = concept.locator(".signal-lane-label").all_text_contents()
            assert named == (NAMES if rid == "eeg" else [])
            pg.screenshot(path=str(tmp_path / f"explain-{rid}-1280.png"), full_page=True)
            pg.set_viewport_size({"width": 800, "height": 900})
            pg.screenshot(path=str(tmp_path / f"explain-{rid}-800.png"))


def test_tiles_tooltips_give_seconds(browser: Any, timed: dict, untimed: dict):
    """The layer's tiles say their peak's span in seconds, the Samples page's tiles the
    sample's length; without a rate, samples alone."""
    skip_without_browser()
    for s, rid in ((timed, "eeg"), (untimed, "raw")):
        url = s["url"]
        with strict_page(browser) as pg:
            pg.goto(f"{url}/#/r/{rid}/layer/0")
            tile = pg.locator(".signal-tile[data-span]").first
            tile.wait_for(timeout=30_000)
            t0, t1 = (int(v) for v in tile.get_attribute("data-span").split())
            title = tile.get_attribute("title")
            span = f"its peak sees samples {t0}{DASH}{t1 - 1}"
            if rid == "eeg":
                assert title.endswith(f"{span} ({t0 / RATE:.3f}{DASH}{(t1 - 1) / RATE:.3f} s)")
            else:
                assert title.endswith(span)
            pg.goto(f"{url}/#/r/{rid}/samples")
            title = pg.locator(".signal-tile").first.get_attribute("title", timeout=30_000)
            tail = f"{C} channels \u00d7 {T} samples"
            assert title.endswith(f"{tail} (4 s at 128 Hz)" if rid == "eeg" else tail), title
