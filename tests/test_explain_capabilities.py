"""The Explain page's method list says, per method and for concept relevance, whether the
run's model can give it (decided from its trace, never an attribution), and the answer
agrees with what calling the method really does."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn
from torch.utils.data import TensorDataset

import lurker
from explorer_fixtures import served_run, skip_without_browser, strict_page
from lurker.errors import LurkerError
from lurker.probe import probe
from lurker.server import create_app
from models_zoo import ConvLSTM


def _conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )


def _mlp() -> nn.Module:  # images, no layer that makes a map: no Grad-CAM
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.ReLU(), nn.Linear(6, 2))


class _GRUNet(nn.Module):  # images read row by row by a GRU: no LRP rule
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gru = nn.GRU(32, 5, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))  # (B, 4, 8, 8) -> rows of 4 * 8
        out, _ = self.gru(h.permute(0, 2, 1, 3).flatten(2))
        return self.fc(out[:, -1])


MODELS = {
    "convlstm": (ConvLSTM, (3, 16)),
    "conv1d": (_conv1d, (3, 16)),
    "cnn": (_cnn, (3, 8, 8)),
    "mlp": (_mlp, (3, 8, 8)),
    "gru": (_GRUNet, (3, 8, 8)),
}


def _really(model: nn.Module, x: torch.Tensor, method: str) -> str | None:
    """The oracle: the method's own error on a real input, or None when it explains it."""
    try:
        lurker.explain(model, x, method=method)
    except LurkerError as e:
        return str(e)
    return None


@pytest.fixture(scope="module", params=sorted(MODELS))
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    make, shape = MODELS[request.param]
    torch.manual_seed(0)
    model = make().eval()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(8, *shape, generator=g), torch.arange(8) % 2)
    root = tmp_path_factory.mktemp(request.param)
    probe(model, data, out=root / "r", k=2, batch_size=4, progress=False).close()
    with TestClient(create_app(root / "r", model_obj=model, dataset=data)) as c:
        doc = c.get("/api/runs/r/explain/methods").json()
        yield request.param, model, data, doc, c, root / "r"


def test_the_methods_answer_agrees_with_what_each_method_really_does(served: Any):
    name, model, data, doc, _, _ = served
    x = data[0][0][None]
    said = {m["name"]: m["unavailable"] for m in doc["methods"]}
    for method in ("lrp", "gradcam"):
        really = _really(model, x, method)
        assert (said[method] is None) == (really is None), (name, method, said[method], really)
    if name in ("convlstm", "gru"):
        assert "LSTM" in said["lrp"] or "GRU" in said["lrp"]
        assert "Integrated gradients" in said["lrp"] and "lstm_1" not in said["lrp"]
        assert not doc["concepts"] or doc["concepts_reason"]
        assert "concept relevance is LRP" in doc["concepts_reason"]
        assert ("LSTM" if name == "convlstm" else "GRU") in doc["concepts_reason"]
    else:
        assert doc["concepts_reason"] is None
    if name == "mlp":
        assert "no layer of this model makes a map" in said["gradcam"]
    # the gradient methods need no rule: always offered
    assert said["integrated_gradients"] is None and said["saliency"] is None


def test_concepts_reason_agrees_with_concept_relevance(served: Any):
    """The oracle: the concepts endpoint itself, which runs concept relevance."""
    name, _, _, doc, c, _ = served
    if doc["concept_layer"] is None:  # no layer makes a map: nothing to rank
        assert name == "mlp"
        return
    r = c.get("/api/runs/r/live/sample-0/explain/concepts")
    assert (r.status_code == 400) == (doc["concepts_reason"] is not None), r.text
    assert r.status_code in (200, 400)


def test_a_server_without_the_model_lists_as_before(served: Any):
    _, _, _, doc, _, run = served
    with TestClient(create_app(run)) as c:
        bare = c.get("/api/runs/r/explain/methods").json()
    assert all(m["unavailable"] is None for m in bare["methods"])
    assert bare["concepts_reason"] is None
    assert [m["name"] for m in bare["methods"]] == [m["name"] for m in doc["methods"]]


@pytest.mark.parametrize("name", ["convlstm", "gru"])
def test_the_page_shows_why_and_asks_nothing_the_model_cannot_give(
    browser: Any, tmp_path: Path, name: str
):
    """A signal (ConvLSTM) and an image (a GRU over rows) model: the LRP card disabled with
    its reason and the concept section replaced by why, no request made for either (before:
    both asked, and the page showed a 400 after it)."""
    skip_without_browser()
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    data = TensorDataset(
        torch.randn(8, *shape, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 2
    )
    with served_run(tmp_path, "r", model, data, "conv", 2) as s, strict_page(browser) as pg:
        asked: list[str] = []
        pg.on("request", lambda r: asked.append(r.url))
        pg.goto(f"{s['url']}/#/r/r/explain?image=sample-1")
        card = pg.locator("[data-method='lrp'][aria-disabled='true']")
        card.wait_for()
        said = card.locator(".unavailable-reason").inner_text()
        assert "LRP has no rule for" in said and ("LSTM" if name == "convlstm" else "GRU") in said
        assert "Integrated gradients" in said and card.get_attribute("title") == said
        note = pg.locator(".concept-unavailable")
        note.wait_for()
        assert "Concept relevance is LRP" in note.inner_text()
        # the methods it can give are drawn
        pg.wait_for_selector("[data-method='integrated_gradients']:not([aria-disabled])")
        pg.wait_for_load_state("networkidle")
        pg.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
        assert not [u for u in asked if "/explain/concepts" in u or "/explain/lrp" in u]
        # every card says what its method is, and integrated gradients what its delta is,
        # on the signal page as on the image page (review: the signal page said neither)
        ig = pg.locator(".card[data-method='integrated_gradients']")
        ig.locator(".delta-note").wait_for()
        assert "completeness check" in ig.locator(".delta-note").inner_text()
        summary = lurker.explain.METHODS["integrated_gradients"].summary
        assert ig.locator(".method-summary").inner_text() == summary
        # the disabled card lines up with the others (review: a figure's margins)
        a, b = card.bounding_box(), ig.bounding_box()
        assert abs(a["width"] - b["width"]) < 1


def _recorded_run(tmp_path: Path, name: str) -> tuple[Path, TensorDataset]:
    """A run of MODELS[name] probed with its model recorded (precompute loads it)."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    data = TensorDataset(torch.randn(8, *shape, generator=torch.Generator().manual_seed(1)))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    meta = {"model_spec": f"{__name__}:{make.__name__}", "weights": str(tmp_path / "w.pt")}
    probe(model, data, out=tmp_path / "r", k=2, batch_size=4, progress=False, meta=meta).close()
    return tmp_path / "r", data


@pytest.mark.parametrize(
    ("name", "refused"), [("mlp", {"gradcam", "gradcam_plus_plus"}), ("gru", {"lrp", "concepts"})]
)
def test_precompute_asks_what_the_model_cannot_give_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, refused: set[str]
):
    """``lurker images --explanations`` leaves out what the Explain page greys out, asking
    the model's trace before any sample: the methods it cannot give are never run (they
    were tried on sample 0 and their failure caught), and one named by the user is
    refused before anything is made, with the reason and the fix (was: after sample 0's
    files were written, as 'sample 0: ...')."""
    from lurker.server import explained
    from lurker.server.routes import explain as routes

    run, data = _recorded_run(tmp_path, name)
    tried: list[str] = []
    real = routes.unkept_result  # (precompute's: each method made before a file is written)
    monkeypatch.setattr(
        routes, "unkept_result", lambda s, image, m, *a: tried.append(m) or real(s, image, m, *a)
    )
    done = explained.precompute(run, 2, dataset=data, progress=False)
    assert set(done.skipped) == refused and not refused & set(tried)
    assert all("integrated_gradients" in why for why in done.skipped.values())
    assert set(tried) == set(lurker.explain.METHODS) - refused  # every other one made
    bare = tmp_path / "bare"
    run.rename(bare)  # (without the cache the first precompute made)
    shutil.rmtree(bare / "cache", ignore_errors=True)
    method = sorted(refused)[0]
    with pytest.raises(
        LurkerError, match=rf"cannot precompute '{method}' .*leave it out of --methods"
    ):
        explained.precompute(bare, 1, ["saliency", method], dataset=data, progress=False)
    assert not (bare / "cache" / "explain").exists()  # nothing made before it was said


def test_the_cli_says_each_reason_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Grad-CAM and Grad-CAM++ left out for one reason: one line naming both."""
    from click.testing import CliRunner

    from lurker.cli import main
    from lurker.server import explained

    why = "Grad-CAM weighs a layer's maps, and no layer of this model makes a map"
    done = explained.Precomputed(1, 3, 0, 0.1, {"gradcam": why, "gradcam_plus_plus": why})
    monkeypatch.setattr(explained, "precompute", lambda *a, **k: done)
    res = CliRunner().invoke(main, ["images", str(tmp_path), "--explanations", "1"])
    assert res.exit_code == 0, res.output
    assert res.output.count(why) == 1
    assert f"lurker: gradcam, gradcam_plus_plus left out: {why}" in res.output
