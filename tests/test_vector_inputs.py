"""A tabular model's run in the explorer: inputs that are 1-D float feature vectors.

An MLP on 64 float features (sklearn's digits' 8x8 pixels as a flat vector, here drawn at
random) probed from Python on ``(features, label)`` pairs. Before, the sample page's
prediction failed with "sample 0 is a tensor of shape (64,) (torch.float32), not an
image" and every picture URL with that error or a broken image. Now the sample page
shows the model's prediction, checked here against the model's own softmax; pictures are
refused with the reason (the inputs are feature vectors), as the live view and Explain
are, and the run summary says so for the pages.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from explorer_fixtures import get_json, served_run, skip_without_browser, strict_page

FEATURES, CLASSES, N, K = 64, 10, 40, 4
RID = "tab"
LAYER = "net.1"  # the hidden ReLU


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(N, FEATURES, generator=g) * 16  # digits' pixel values run 0..16
    return TensorDataset(x, torch.arange(N) % CLASSES)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    torch.manual_seed(0)
    model, data = Mlp().eval(), _dataset()
    root: Path = tmp_path_factory.mktemp("tab")
    with served_run(root, RID, model, data, LAYER, K) as served:
        yield served


def test_sample_shows_the_models_prediction_on_its_features(served: dict):
    model, data, url = served["model"], served["data"], served["url"]
    for sid in (0, 13):
        doc = get_json(f"{url}/api/runs/{RID}/samples/{sid}")
        # was: "sample 0 is a tensor of shape (64,) (torch.float32), not an image"
        assert doc["prediction_error"] is None, doc["prediction_error"]
        with torch.no_grad():
            probs = model(data.tensors[0][sid][None]).softmax(-1)[0]
        top = probs.argsort(descending=True)[:5].tolist()
        assert [p["class"] for p in doc["prediction"]] == top
        for p in doc["prediction"]:
            assert p["prob"] == pytest.approx(float(probs[p["class"]]), rel=1e-5)
        assert doc["tokens"] is None  # features are not token ids


def test_the_summary_says_the_inputs_are_feature_vectors(served: dict):
    for url in (served["url"], served["bare"]):
        ds = get_json(f"{url}/api/runs/{RID}")["dataset"]
        assert ds["features"] == FEATURES and ds["tokens"] is None


def test_pictures_of_feature_vectors_are_refused_with_the_reason(served: dict):
    import httpx2 as httpx

    url = served["url"]
    for path in (
        "samples/3/image.png",
        f"layers/{LAYER}/units/0/max/0/input.png",
        "live/sample-3",
    ):
        r = httpx.get(f"{url}/api/runs/{RID}/{path}")
        assert r.status_code == 409, (path, r.status_code, r.text)
        assert f"vectors of {FEATURES} features" in r.json()["detail"], (path, r.text)


def test_a_changed_dataset_is_refused_not_fed(served: dict):
    """A dataset whose items are no longer the run's vectors (another length) is refused
    with the reason, not fed to the model for a prediction of something else."""
    from lurker.server import create_app
    from lurker.server.serve import background

    other = TensorDataset(torch.rand(N, FEATURES // 2), torch.arange(N) % CLASSES)
    with background(create_app(served["run"], model_obj=served["model"], dataset=other)) as url:
        doc = get_json(f"{url.rstrip('/')}/api/runs/{RID}/samples/2")
    assert doc["prediction"] is None and "changed since the probe" in doc["prediction_error"]


def test_pages_say_the_inputs_have_no_picture(browser: Any, served: dict):
    skip_without_browser()
    url = served["url"]
    doc = get_json(f"{url}/api/runs/{RID}/samples/7")
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/{RID}/sample/7")
        pg.wait_for_selector("#vector-inputs")
        assert f"vectors of {FEATURES} features" in pg.inner_text("#vector-inputs")
        assert pg.locator("img").count() == 0
        # Live takes a typed vector, filled from this sample
        assert pg.get_attribute("#open-live", "href").endswith("/live?sample=7")
        shown = pg.locator("ol.preds li").all_inner_texts()  # the model's top 5, in order
        assert [int(t.split()[0]) for t in shown] == [p["class"] for p in doc["prediction"]]
        doc = get_json(f"{url}/api/runs/{RID}/layers/{LAYER}/units/0")
        pg.goto(f"{url}/#/r/{RID}/unit/{LAYER}/0?tab=max")  # the top list, with no tiles
        pg.wait_for_selector(".vector-entry")
        got = pg.locator(".vector-entry").evaluate_all("es => es.map(e => +e.dataset.sample)")
        assert got == [e["sample_id"] for e in doc["top"]["max"]]
        assert pg.locator(".no-img").count() == 0 and pg.locator("img").count() == 0
        for page in (f"layer/{LAYER}", f"unit/{LAYER}/0", "samples"):
            pg.goto(f"{url}/#/r/{RID}/{page}")
            pg.wait_for_selector("#vector-inputs")
            assert pg.locator("img").count() == 0, page
