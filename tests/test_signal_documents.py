"""A signal run's samples travel once each, by URL, never inside unit documents.

An EEG model's export wrote 232 MB for a 4.9 MB dataset: every unit document embedded its
top entries' full signals. Now each sample's signal is its own document
(``samples/{id}/signal.json``), which the pages fetch once and the static export writes
once per top sample; and a dataset's ``channel_names`` (electrodes) label the lanes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from explorer_fixtures import get_json, served_run, skip_without_browser, strict_page

RID, C, T, K, N = "eeg", 8, 512, 4, 30
NAMES = ["Fz", "Cz", "Pz", "Oz", "C3", "C4", "O1", "O2"]


class Eeg(TensorDataset):
    """(signal, label) pairs whose channels are named, as an EEG loader names electrodes."""

    channel_names = NAMES


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(C, 6, 9, stride=4), nn.ReLU(), nn.AdaptiveMaxPool1d(1), nn.Flatten()
    ).eval()


def _data() -> Eeg:
    g = torch.Generator().manual_seed(3)
    return Eeg(torch.randn(N, C, T, generator=g), torch.arange(N) % 2)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with served_run(tmp_path_factory.mktemp("eeg"), RID, _model(), _data(), "0", K) as s:
        yield s


def test_channel_names_are_stored_and_given_with_each_signal(served: dict):
    url = served["url"]
    assert get_json(f"{url}/api/runs/{RID}")["dataset"]["channel_names"] == NAMES
    assert get_json(f"{url}/api/runs/{RID}/samples/4/signal.json")["channel_names"] == NAMES


def test_a_wrong_count_of_channel_names_is_refused_naming_both(tmp_path: Path):
    from lurker.errors import LurkerError
    from lurker.probe import probe

    data = _data()
    data.channel_names = NAMES[:5]  # type: ignore[misc]
    with pytest.raises(LurkerError, match=r"5 names.*8 channels x 512 samples"):
        probe(_model(), data, out=tmp_path / "bad", k=K, batch_size=16, progress=False)


def test_channel_names_that_count_the_time_axis_are_refused(tmp_path: Path):
    """The names must count the channels the model reads: 512 names for 8 channels x 512
    samples were taken (512 is one of the axes) and then dropped by the server without a
    word."""
    from lurker.errors import LurkerError
    from lurker.probe import probe

    data = _data()
    data.channel_names = [f"t{i}" for i in range(T)]  # type: ignore[misc]
    with pytest.raises(LurkerError, match=rf"{T} names.*{C} channels x {T} samples"):
        probe(_model(), data, out=tmp_path / "bad", k=K, batch_size=16, progress=False)


def test_unit_documents_carry_sample_ids_and_spans_only(served: dict):
    url = served["url"]
    for unit in range(6):
        doc = get_json(f"{url}/api/runs/{RID}/layers/0/units/{unit}")
        size = len(json.dumps(doc))
        assert size < C * T * 4  # one sample's values would be more than the whole unit
        assert all("signal" not in e for e in doc["top"]["max"] + doc["top"]["mean"])


def test_the_export_writes_each_top_samples_signal_once(served: dict, tmp_path: Path):
    from lurker.server.export import export_site

    site = export_site(served["run"], tmp_path / "site", dataset=served["data"], progress=False)
    files = [f for f in site.rglob("*.json")]
    signals = [f for f in files if f.name == "signal.json"]
    ranked: set[int] = set()
    units = 0
    for layer in get_json(f"{served['url']}/api/runs/{RID}")["layers"]:
        for unit in range(layer["num_units"]):
            doc = get_json(f"{served['url']}/api/runs/{RID}/layers/{layer['name']}/units/{unit}")
            ranked |= {e["sample_id"] for lst in ("max", "mean") for e in doc["top"][lst]}
            units += 1
    # one file per distinct top sample, however many of the units' lists rank it
    assert len(ranked) < units * 2 * K
    assert sorted(int(f.parent.name) for f in signals) == sorted(ranked)
    xs = served["data"].tensors[0]
    for f in signals[:3]:
        doc = json.loads(f.read_text())
        np.testing.assert_allclose(doc["values"], xs[int(f.parent.name)].double(), rtol=1e-6)
    # no other document holds a sample's values: each is smaller than one signal's
    # values, and the whole export's JSON at most one signal file per top sample beyond
    one = max(f.stat().st_size for f in signals)
    assert one < C * T * 12  # ~7 digits a value, not float64's 17
    # (a layer's document and the exported samples list: their tiles, 48 columns of 8
    # channels per distinct top sample)
    tiled = ("layers", "exported-samples.json")
    others = [
        f for f in files if f.name != "signal.json" and not {f.parent.name, f.name} & set(tiled)
    ]
    smallest = min(f.stat().st_size for f in signals)
    assert others and all(f.stat().st_size < smallest for f in others)
    # the values once per top sample, and tiles (48 x 8 columns each) at most once per top
    # sample per document: within twice that (per-entry values were ~2K per unit each)
    assert sum(f.stat().st_size for f in files) < 2 * (len(ranked) + 5) * one


def test_an_export_with_a_changed_dataset_says_why_per_sample(served: dict, tmp_path: Path):
    """A dataset that no longer holds some top samples (another, shorter one): the export
    finishes, each such sample's page saying why, as the served page does (the export
    stopped with the server's error: the signal document was read without a guard)."""
    from lurker.server.export import export_site

    data = served["data"]
    small = Eeg(data.tensors[0][:5], data.tensors[1][:5])
    site = export_site(served["run"], tmp_path / "site", dataset=small, progress=False)
    docs = {int(f.stem): f for f in (site / f"data/runs/{RID}/samples").glob("*.json")}
    gone = [sid for sid in docs if sid >= 5]
    assert gone  # some top samples lie beyond the five
    for sid in gone:
        doc = json.loads(docs[sid].read_text())
        assert "not in the run's dataset any more" in doc["signal_error"]
        assert not (site / f"data/runs/{RID}/samples/{sid}/signal.json").exists()
    kept = [sid for sid in docs if sid < 5]
    for sid in kept:
        assert json.loads(docs[sid].read_text())["signal_error"] is None
        assert (site / f"data/runs/{RID}/samples/{sid}/signal.json").is_file()


def test_pages_fetch_each_signal_once_and_name_the_channels(browser: Any, served: dict):
    skip_without_browser()
    url = served["url"]
    doc = get_json(f"{url}/api/runs/{RID}/layers/0/units/2")
    with strict_page(browser) as pg:
        asked: list[str] = []
        pg.on("request", lambda r: asked.append(r.url) if "/signal.json" in r.url else None)
        pg.goto(f"{url}/#/r/{RID}/unit/0/2?tab=max")
        pg.wait_for_function(
            f"document.querySelectorAll('.signal-entry svg.signal-plot').length === {K}"
        )
        assert len(asked) == len({e["sample_id"] for e in doc["top"]["max"]}) == K
        assert all("columns=280" in u and "v=" in u for u in asked)  # kept for good
        lines = pg.locator(".signal-entry").first.locator("path.signal-line title")
        assert lines.all_text_contents() == NAMES  # each line's tooltip its electrode
        pg.goto(f"{url}/#/r/{RID}/sample/4")
        pg.wait_for_selector("#sample-signal svg.signal-plot")
        labels = pg.locator("#sample-signal text.signal-lane-label")
        assert labels.all_text_contents() == NAMES
