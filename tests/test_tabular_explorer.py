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

import numpy as np
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


def _row(data: Any, sid: int) -> list[float]:
    return data.tensors[0][sid].double().tolist()


def _tile_oracle(row: list[float]) -> tuple[list[int], list[float | None], list[int]]:
    """What a layer tile shows of ``row``, by numpy: its first feature per bin (at most
    64 bins of consecutive features), each bin's value of largest |value| (signed; None
    where one is NaN) and the 3 features of largest |value| (NaN last)."""
    x = np.array(row)
    bins = np.array_split(np.arange(len(x)), min(len(x), 64))
    strip = [None if np.isnan(x[b]).any() else float(x[b][np.argmax(np.abs(x[b]))]) for b in bins]
    key = np.where(np.isnan(x), -1.0, np.abs(x))
    top = sorted(range(len(x)), key=lambda i: (-key[i], i))[:3]
    return [int(b[0]) for b in bins], strip, top


def test_the_api_gives_each_samples_feature_values_and_names(served: dict):
    from sklearn.datasets import load_wine

    url, data = served["url"], served["data"]
    ds = get_json(f"{url}/api/runs/{RID}")["dataset"]
    assert ds["features"] == 13 and ds["feature_names"] == list(load_wine().feature_names)
    layer = get_json(f"{url}/api/runs/{RID}/layers/{LAYER}")
    assert layer["features_error"] is None
    tops = {u["top_max"] for u in layer["units"] if u["top_max"] is not None}
    assert tops and set(layer["features"]) == {str(t) for t in tops}
    for sid in tops:  # oracle: the dataset tensor; 13 features: one bin each
        tile = layer["features"][str(sid)]
        starts, strip, top = _tile_oracle(_row(data, sid))
        assert tile["count"] == 13 and tile["starts"] == starts == list(range(13))
        assert tile["strip"] == strip == _row(data, sid)
        assert tile["top"] == [{"index": i, "value": _row(data, sid)[i]} for i in top]
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


def test_explain_scores_each_feature_as_captum_does(served: dict):
    """Explain on a feature vector: one score per feature, in the vector's order, for the
    asked class (was: 409 "the live view and Explain show images" for every method)."""
    import httpx2 as httpx
    from captum.attr import IntegratedGradients, Saliency

    url, model, data = served["url"], served["model"], served["data"]
    x = data.tensors[0][7:8].clone()
    base = f"{url}/api/runs/{RID}/live/sample-7/explain"
    methods = get_json(f"{url}/api/runs/{RID}/explain/methods")["methods"]
    assert [m["name"] for m in methods] == [
        "saliency", "input_x_gradient", "integrated_gradients", "smoothgrad"
    ]  # fmt: skip
    for target in (0, 2):  # the class asked, not only the top one
        oracle = {
            "saliency": Saliency(model).attribute(x, target=target, abs=True),
            "integrated_gradients": IntegratedGradients(model).attribute(
                x, target=target, n_steps=50
            ),
        }
        for method, want in oracle.items():
            doc = get_json(f"{base}/{method}.json?target={target}")
            assert doc["target_class"] == target and doc["shape"] == [1, 13]
            np.testing.assert_allclose(
                doc["scores"], want[0].detach().numpy(), rtol=1e-4, atol=1e-6
            )
        # input x gradient by autograd: each feature's value times its partial derivative
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xg)[0, target], xg)
        doc = get_json(f"{base}/input_x_gradient.json?target={target}")
        np.testing.assert_allclose(doc["scores"], (x * grad)[0].numpy(), rtol=1e-4, atol=1e-6)
    # SmoothGrad noises the vector by 15% of its range (the paper's level: raw features
    # of very different scales are noised in proportion), seeded as lurker.explain is
    import lurker

    doc = get_json(f"{base}/smoothgrad.json?target=2")
    stdev = 0.15 * float(x.max() - x.min())
    assert doc["options"]["stdev"] == pytest.approx(stdev, rel=1e-6)
    own = lurker.explain(model, x, 2, method="smoothgrad", seed=0, stdev=stdev)
    np.testing.assert_allclose(doc["scores"], own.attribution[0].numpy(), rtol=1e-5, atol=1e-7)
    # methods that draw on an image, uploads and the PNG are refused saying why
    r = httpx.get(f"{base}/gradcam.json")
    assert r.status_code == 409 and "vectors of 13 features" in r.json()["detail"]
    r = httpx.get(f"{base}/saliency.png")
    assert r.status_code == 409 and "each feature's score" in r.json()["detail"]
    r = httpx.get(f"{url}/api/runs/{RID}/live/0123456789abcdef/explain/saliency.json")
    assert r.status_code == 409 and "sample-N" in r.json()["detail"]


def test_the_explain_page_charts_each_features_score(browser: Any, served: dict):
    skip_without_browser()
    url, data = served["url"], served["data"]
    doc = get_json(f"{url}/api/runs/{RID}/live/sample-3/explain/integrated_gradients.json")
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/{RID}/sample/3")  # the sample page leads there
        pg.locator("#explain-this").click()
        pg.wait_for_url("**/explain?image=sample-3")
        card = pg.locator('.feature-explain-card[data-method="integrated_gradients"]')
        card.locator("details summary").click()
        rows = card.locator("details tr")
        rows.first.wait_for()
        shown = rows.evaluate_all("es => es.map(e => [+e.dataset.feature, +e.dataset.value])")
        assert shown == [[i, v] for i, v in enumerate(doc["scores"])]
        assert data.feature_names[0] in card.inner_text()


def _check_pages(pg: Any, base: str, data: Wine, layer: dict, unit: dict) -> None:
    """A tile and a unit entry show their sample's values (named), the sample page all."""
    pg.goto(f"{base}#/r/{RID}/layer/{LAYER}")
    pg.wait_for_selector(".feat-thumb")
    u = next(u for u in layer["units"] if u["top_max"] is not None and not u["constant"])
    tile = pg.locator(f'.unit-card[data-unit="{u["unit"]}"] .feat-thumb')
    cells = tile.locator(".feat-strip > span").evaluate_all("es => es.map(e => +e.dataset.value)")
    assert cells == pytest.approx(_row(data, u["top_max"]), abs=0)  # 13: one cell each
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
    # a vector has no image: the export's "holds no image ... could not be loaded" was false
    assert "holds no image" not in pg.inner_text(".view")


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


class Wide(TensorDataset):
    """300 random features per sample, the last NaN (a missing value the model skips)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(40, 300, generator=g)
        x[:, -1] = float("nan")
        super().__init__(x, torch.arange(40) % 2)


class SkipLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(299, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x[:, :-1]).relu()


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    torch.manual_seed(0)
    with served_run(tmp_path_factory.mktemp("wide"), "wide", SkipLast(), Wide(), "fc", 3) as s:
        yield s


def test_a_wide_vectors_tiles_are_binned_with_the_largest_named(wide: dict):
    """300 features: a tile is 64 bins (each its largest |value|, signed), not 300 values
    per unit (a layer of 2,000 units over 500 features was 12 MB of JSON); the NaN is
    null, in its bin and in the sample's own values."""
    url, data = wide["url"], wide["data"]
    layer = get_json(f"{url}/api/runs/wide/layers/fc")
    tops = {u["top_max"] for u in layer["units"] if u["top_max"] is not None}
    assert tops and set(layer["features"]) == {str(t) for t in tops}
    for sid in tops:
        tile = layer["features"][str(sid)]
        starts, strip, top = _tile_oracle(_row(data, sid))
        assert tile["count"] == 300 and tile["starts"] == starts and len(starts) == 64
        assert tile["strip"] == strip and strip[-1] is None
        assert tile["top"] == [{"index": i, "value": _row(data, sid)[i]} for i in top]
    sample = get_json(f"{url}/api/runs/wide/samples/{min(tops)}")
    assert sample["features"][-1] is None  # JSON has no NaN: null, not a made-up number
    assert sample["features"][:-1] == _row(data, min(tops))[:-1]


def test_a_wide_vectors_tile_draws_at_most_64_cells(browser: Any, wide: dict):
    skip_without_browser()
    url, data = wide["url"], wide["data"]
    layer = get_json(f"{url}/api/runs/wide/layers/fc")
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/wide/layer/fc")
        pg.wait_for_selector(".feat-thumb")
        u = next(u for u in layer["units"] if u["top_max"] is not None and not u["constant"])
        tile = pg.locator(f'.unit-card[data-unit="{u["unit"]}"] .feat-thumb')
        starts, strip, top = _tile_oracle(_row(data, u["top_max"]))
        cells = tile.locator(".feat-strip > span")
        assert cells.count() == 64  # not one node per feature
        shown = cells.evaluate_all(
            "es => es.map(e => [+e.dataset.first, +e.dataset.last, e.dataset.value ?? null, e.title])"
        )
        assert [c[0] for c in shown] == starts and shown[-1][1] == 299
        assert [None if c[2] is None else float(c[2]) for c in shown] == strip
        assert shown[0][3].startswith(f"features 0-{starts[1] - 1}")
        assert shown[-1][3].endswith("not finite")
        named = tile.locator(".feat-top").evaluate_all("es => es.map(e => +e.dataset.feature)")
        assert named == top
        # the sample page keeps every value, the NaN said as such
        pg.goto(f"{url}/#/r/wide/sample/{u['top_max']}")
        pg.wait_for_selector("#sample-features tr")
        assert pg.locator("#sample-features tr").count() == 300
        assert "not finite" in pg.locator("#sample-features tr").last.inner_text()


class Tokens(TensorDataset):
    """Sequences of 13 token ids whose dataset also carries ``feature_names`` (of another
    length): ids are not feature vectors, so the names are not theirs to check or store."""

    feature_names = ["a", "b"]

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        super().__init__(torch.randint(0, 20, (8, 13), generator=g), torch.zeros(8).long())


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x).mean(1))


def test_feature_names_of_a_token_run_are_ignored(tmp_path: Path):
    from lurker.probe import probe

    run = probe(Bag(), Tokens(), out=tmp_path / "r", k=2, progress=False)
    assert run is not None
    assert "feature_names" not in run.meta["config"]
    run.close()


def test_feature_names_that_are_not_a_list_are_ignored(tmp_path: Path):
    """A dataset whose ``feature_names`` is a method (or a string) names no features:
    wrapping it, and probing it, works as without the attribute."""
    from lurker.probe import probe
    from lurker.probe.data import wrap

    class Method(Wine):
        def feature_names(self) -> list[str]:  # type: ignore[override]
            return ["x"]

    class Text(Wine):
        feature_names = "alcohol"  # type: ignore[assignment]

    for cls in (Method, Text):
        data = cls.__new__(cls)
        TensorDataset.__init__(data, *Wine().tensors)
        assert wrap(data).feature_names is None
    run = probe(nn.Sequential(nn.Linear(13, 3)), data, out=tmp_path / "r", k=2, progress=False)
    assert run is not None and "feature_names" not in run.meta["config"]
    run.close()
    assert wrap(Wine()).feature_names == Wine().feature_names  # a list is still used


def test_the_live_view_takes_typed_features_not_an_image(browser: Any, served: dict):
    """It offered "Upload an image..." on a run of feature vectors; then only a pointer
    to Explain. Now one named field per feature; tests/test_live_typed.py runs it."""
    skip_without_browser()
    with strict_page(browser) as pg:
        pg.goto(f"{served['url']}/#/r/{RID}/live")
        pg.wait_for_selector("#live-preds li")
        assert pg.locator("#live-features input").count() == 13
        assert pg.locator("input[type=file]").count() == 0


class _Counts(torch.nn.Module):
    """Reads integer counts as numbers (casts them itself)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.float())


def test_explain_on_integer_vectors_scores_the_numbers(tmp_path: Path):
    """A vector of integer counts: each method scores them as numbers (was: four cards
    each failing with "must be floating point ... pass x.float()")."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randint(0, 9, (24, 6), generator=g, dtype=torch.int16), torch.arange(24) % 3
    )
    model = _Counts().eval()
    with served_run(tmp_path, "counts", model, data, "fc", 3) as served:
        base = f"{served['url']}/api/runs/counts/live/sample-4/explain"
        x = data.tensors[0][4:5].float().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x)[0, 1], x)
        doc = get_json(f"{base}/input_x_gradient.json?target=1")
        np.testing.assert_allclose(doc["scores"], (x * grad)[0].detach().numpy(), rtol=1e-5)
        for method in ("saliency", "integrated_gradients", "smoothgrad"):
            assert len(get_json(f"{base}/{method}.json?target=1")["scores"]) == 6


def test_the_samples_list_carries_each_samples_binned_values(served: dict, wide: dict):
    """The Samples page of a vector run was a grid of grey "no image" tiles: the list now
    carries each sample's values binned as a layer tile's (oracle: the dataset tensors,
    binned by numpy), for the page asked; without the dataset, none and why."""
    for url, rid, data in (
        (served["url"], RID, served["data"]),
        (wide["url"], "wide", wide["data"]),
    ):
        page = get_json(f"{url}/api/runs/{rid}/samples?offset=3&limit=40")
        assert page["features_error"] is None and page["tokens_error"] is None
        assert [s["id"] for s in page["samples"]] == list(range(3, min(43, len(data))))
        for s in page["samples"]:
            starts, strip, top = _tile_oracle(_row(data, s["id"]))
            tile = s["features"]
            assert tile["count"] == len(data.tensors[0][0]) and tile["starts"] == starts
            assert tile["strip"] == strip and [t["index"] for t in tile["top"]] == top
            assert s["tokens"] is None
    bare = get_json(f"{served['bare']}/api/runs/{RID}/samples?limit=5")
    assert all(s["features"] is None for s in bare["samples"])
    assert "does not record its dataset" in bare["features_error"]


def test_the_samples_page_shows_feature_strips_not_missing_images(
    browser: Any, served: dict, wide: dict
):
    skip_without_browser()
    url, data = served["url"], served["data"]
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/{RID}/samples?offset=100")
        pg.wait_for_selector(".sample-card .feat-thumb")
        cards = pg.locator(".sample-card")
        assert cards.count() == len(data) - 100 == pg.locator(".sample-card .feat-thumb").count()
        assert pg.locator("img").count() == 0 and pg.locator(".no-img").count() == 0
        first = cards.first
        sid = int(first.get_attribute("data-sample") or -1)
        cells = first.locator(".feat-strip > span").evaluate_all(
            "es => es.map(e => +e.dataset.value)"
        )
        assert sid == 100 and cells == _row(data, sid)  # 13 features: one cell each
        row = _row(data, sid)
        assert data.feature_names[max(range(13), key=lambda i: abs(row[i]))] in first.inner_text()
        key = pg.inner_text("#samples-key")
        assert "Under each sample" in key and "image" not in key
        assert "Click a sample for the sample's page" in key
        pg.goto(f"{wide['url']}/#/r/wide/samples")
        pg.wait_for_selector(".sample-card .feat-thumb")
        counts = pg.locator(".sample-card .feat-strip").evaluate_all(
            "es => es.map(e => e.children.length)"
        )
        assert counts and set(counts) == {64}  # bounded as a layer tile, not 300 nodes
    with strict_page(browser) as pg:  # no dataset: said once, grey tiles, no broken images
        pg.goto(f"{served['bare']}/#/r/{RID}/samples")
        pg.wait_for_selector("#flat-why")
        assert "does not record its dataset" in pg.inner_text("#flat-why")
        assert pg.locator("img").count() == 0


def test_a_top_sample_the_dataset_cannot_read_leaves_the_layer_page_working(served: dict):
    """The layer document reads each unit's top sample for its tile: a row the dataset's
    own code fails on gave the page a 500 (only the server's own errors were caught); the
    page now has its units and says why the tiles are missing."""
    from lurker.server import create_app
    from lurker.server.serve import background

    data = served["data"]
    layer = get_json(f"{served['url']}/api/runs/{RID}/layers/{LAYER}")
    bad = layer["units"][0]["top_max"]

    class Flaky(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int):
            if i == bad:
                raise RuntimeError(f"row {i} is corrupt")
            return data[i]

    with background(create_app(served["run"], dataset=Flaky())) as url:
        doc = get_json(f"{url.rstrip('/')}/api/runs/{RID}/layers/{LAYER}")
        assert len(doc["units"]) == len(layer["units"]) and doc["features"] is None
        assert "RuntimeError" in doc["features_error"] and "is corrupt" in doc["features_error"]
