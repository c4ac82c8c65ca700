"""A tabular model's run in the explorer: the pages show the feature values.

scikit-learn's wine data (13 features, standardized, with its ``feature_names``) probed
from Python on ``(features, label)`` pairs by a small MLP. Before, a layer's tiles were
grey boxes naming a sample id, a unit's entries only their value, the sample page no
values, and ``UnitImages`` failed on the first sample with a generic "not an image".
Now the API gives each sample's feature values (checked against the dataset tensor),
named by the dataset's feature names, the pages show them (served and exported), and
``UnitImages`` / ``lurker images`` say why there are no images to make.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from explorer_fixtures import get_json, served_run, skip_without_browser, static_server, strict_page

RID, LAYER, K = "wine", "1", 4  # layer "1": the hidden ReLU of the Sequential


class Wine(TensorDataset):
    """The wine data standardized, as a user would feed it, with its column names."""

    def __init__(self, names: list[str] | None = None) -> None:
        from sklearn.datasets import load_wine

        d = load_wine()
        x = torch.tensor(d.data, dtype=torch.float32)
        super().__init__((x - x.mean(0)) / x.std(0), torch.tensor(d.target))
        self.feature_names = list(d.feature_names) if names is None else names
        self.classes = list(d.target_names)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with served_run(tmp_path_factory.mktemp("tab"), RID, model, Wine(), LAYER, K) as served:
        yield served


def _row(data: Wine, sid: int) -> list[float]:
    return data.tensors[0][sid].double().tolist()


def test_the_api_gives_each_samples_feature_values_and_names(served: dict):
    from sklearn.datasets import load_wine

    url, data = served["url"], served["data"]
    ds = get_json(f"{url}/api/runs/{RID}")["dataset"]
    assert ds["features"] == 13 and ds["feature_names"] == list(load_wine().feature_names)
    layer = get_json(f"{url}/api/runs/{RID}/layers/{LAYER}")
    assert layer["features_error"] is None
    tops = {u["top_max"] for u in layer["units"] if u["top_max"] is not None}
    assert tops and set(layer["features"]) == {str(t) for t in tops}
    for sid in tops:  # oracle: the dataset tensor, value for value
        assert layer["features"][str(sid)] == _row(data, sid)
    unit = get_json(f"{url}/api/runs/{RID}/layers/{LAYER}/units/0")
    assert unit["features_error"] is None
    for e in unit["top"]["max"] + unit["top"]["mean"]:
        assert e["features"] == _row(data, e["sample_id"])
    sample = get_json(f"{url}/api/runs/{RID}/samples/5")
    assert sample["features"] == _row(data, 5) and sample["features_error"] is None


def test_without_the_dataset_the_values_are_missing_with_the_reason(served: dict):
    bare = served["bare"]
    layer = get_json(f"{bare}/api/runs/{RID}/layers/{LAYER}")
    assert layer["features"] is None and "dataset" in layer["features_error"]
    unit = get_json(f"{bare}/api/runs/{RID}/layers/{LAYER}/units/0")
    assert "dataset" in unit["features_error"]
    assert all(e["features"] is None for e in unit["top"]["max"])
    sample = get_json(f"{bare}/api/runs/{RID}/samples/5")
    assert sample["features"] is None and "dataset" in sample["features_error"]


def test_feature_names_that_do_not_name_each_value_are_refused(tmp_path: Path):
    from lurker.errors import LurkerError
    from lurker.probe import probe

    model = nn.Sequential(nn.Linear(13, 3))
    with pytest.raises(LurkerError, match=r"feature_names has 2 names.*vectors of 13 values"):
        probe(model, Wine(["a", "b"]), out=tmp_path / "r", k=2, progress=False)


def test_unit_images_say_feature_vectors_have_none(served: dict):
    from click.testing import CliRunner

    from lurker.cli import main
    from lurker.errors import LurkerError
    from lurker.probe import UnitImages

    # was: "sample 0 is a tensor of shape (13,) (torch.float32), not an image ..."
    with pytest.raises(LurkerError, match=r"flat vectors of 13 values.*no images to make"):
        UnitImages(served["run"], model=served["model"], dataset=served["data"]).write_all(
            progress=False
        )
    # the CLI, on a run probed from Python: the reason, not "probe it from the CLI"
    r = CliRunner().invoke(main, ["images", str(served["run"])])
    assert r.exit_code != 0 and "flat vectors of 13 values" in r.output, r.output
    assert "lurker serve" in r.output


def _check_pages(pg: Any, base: str, data: Wine, layer: dict, unit: dict) -> None:
    """A tile and a unit entry show their sample's values (named), the sample page all."""
    pg.goto(f"{base}#/r/{RID}/layer/{LAYER}")
    pg.wait_for_selector(".feat-thumb")
    u = next(u for u in layer["units"] if u["top_max"] is not None and not u["constant"])
    tile = pg.locator(f'.unit-card[data-unit="{u["unit"]}"] .feat-thumb')
    cells = tile.locator(".feat-strip > span").evaluate_all("es => es.map(e => +e.dataset.value)")
    assert cells == pytest.approx(_row(data, u["top_max"]), abs=0)
    row = _row(data, u["top_max"])
    biggest = max(range(13), key=lambda i: abs(row[i]))
    assert data.feature_names[biggest] in tile.inner_text()
    pg.goto(f"{base}#/r/{RID}/unit/{LAYER}/0?tab=max")
    pg.wait_for_selector(".vector-entry .feat-strip")
    first = pg.locator(".vector-entry").first
    sid = unit["top"]["max"][0]["sample_id"]
    assert int(first.get_attribute("data-sample") or -1) == sid
    shown = first.locator("details tr").evaluate_all(
        "es => es.map(e => [e.querySelector('th').textContent, +e.dataset.value])"
    )
    assert shown == [[n, v] for n, v in zip(data.feature_names, _row(data, sid))]
    pg.goto(f"{base}#/r/{RID}/sample/{sid}")
    pg.wait_for_selector("#sample-features tr")
    rows = pg.locator("#sample-features tr").evaluate_all("es => es.map(e => +e.dataset.value)")
    assert rows == _row(data, sid)
    assert data.feature_names[0] in pg.inner_text("#sample-features")
    assert pg.locator("img").count() == 0


def test_pages_show_the_feature_values(browser: Any, served: dict):
    skip_without_browser()
    url, data = served["url"], served["data"]
    layer = get_json(f"{url}/api/runs/{RID}/layers/{LAYER}")
    unit = get_json(f"{url}/api/runs/{RID}/layers/{LAYER}/units/0")
    with strict_page(browser) as pg:
        _check_pages(pg, f"{url}/", data, layer, unit)


def test_the_static_export_shows_the_feature_values(browser: Any, served: dict, tmp_path: Path):
    skip_without_browser()
    from lurker.server.export import export_site

    url, data = served["url"], served["data"]
    layer = get_json(f"{url}/api/runs/{RID}/layers/{LAYER}")
    unit = get_json(f"{url}/api/runs/{RID}/layers/{LAYER}/units/0")
    site = export_site(served["run"], tmp_path / "site", dataset=data, progress=False)
    assert not list(site.rglob("*.png"))  # no picture exists: none is written
    with static_server(site) as base, strict_page(browser) as pg:
        _check_pages(pg, base, data, layer, unit)
