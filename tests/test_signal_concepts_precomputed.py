"""Precomputed concept relevance on a run of 1-D signals, served without a model and exported.

``lurker images RUN --explanations top`` keeps each sample's concept relevance (every
unit's relevance at the default layer and the top units' ``(C, T)`` conditional heatmaps)
as it does an image's; a server without the model answers the ranking from it exactly as
a server with the model does, the static export writes it, and the static Explain page
draws its cards. Before, precompute skipped concept relevance on a signal run (its
``stored_concepts`` checked the sample as an image id), so the static page had none.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from explorer_fixtures import (
    get_json,
    skip_without_browser,
    static_server,
    strict_page,
    without_weights,
)

RID = "eeg"
QUERY = "concepts.json?target=top&top=8"
STATIC = "concepts.json~3Ftarget~3Dtop~26top~3D8.json"


def _run(root: Path, methods: list[str] | None) -> dict[str, Any]:
    """The signal run probed with its model recorded, precomputed with ``methods`` (None:
    the default) and exported."""
    import test_export_pictureless as t
    from lurker.probe import probe
    from lurker.server.explained import precompute
    from lurker.server.export import export_site

    model, data, _, k = t._model_and_data("eeg")
    model = t.as_spec("eeg", model)
    torch.save(model.state_dict(), root / "w.pt")
    meta = {"model_spec": "test_export_pictureless:EegNet", "weights": str(root / "w.pt")}
    run = probe(model, data, out=root / RID, k=k, batch_size=16, progress=False, meta=meta)
    assert run is not None
    run.close()
    done = precompute(root / RID, "top", methods, dataset=data, progress=False)
    site = export_site(root / RID, root / "site", dataset=data, progress=False)
    held = json.loads((site / f"data/runs/{RID}/explained.json").read_text())["samples"]
    return {"run": root / RID, "site": site, "model": model, "data": data, "done": done,
            "held": held}  # fmt: skip


@pytest.fixture(scope="module")
def pre(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield _run(tmp_path_factory.mktemp("signal-concepts"), None)


@pytest.fixture(scope="module")
def older(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A run precomputed as before concept relevance was kept on signals: methods only."""
    yield _run(tmp_path_factory.mktemp("signal-no-concepts"), ["saliency", "lrp"])


def test_precomputed_concepts_equal_the_live_ones_and_lurker_explain(
    pre: dict, tmp_path: Path
) -> None:
    """Each sample's exported ranking is, JSON for JSON, what a server without the model
    answers from the store and what one with the run's model answers; computed afresh
    by the model it differs only in ``cached``/``seconds``; its heatmaps are
    ``lurker.explain.concepts``'s along time."""
    import lurker
    from lurker.server import create_app
    from lurker.server.serve import background

    held = pre["held"]
    assert held and all(h["concepts"] == "4" for h in held)  # the default layer (its ReLU)
    assert pre["done"].skipped == {}
    bare = without_weights(pre["run"], tmp_path)
    apps = (
        create_app(bare, dataset=pre["data"]),  # no model: the store only
        create_app(pre["run"], dataset=pre["data"]),  # the run's own model
        create_app(pre["run"], model_obj=pre["model"], dataset=pre["data"]),  # afresh
    )
    with background(apps[0]) as a, background(apps[1]) as b, background(apps[2]) as fresh:
        assert get_json(f"{a}api/runs/{RID}")["holds"]["live"] is False
        for h in held:
            f = pre["site"] / f"data/runs/{RID}/live/{h['image']}/explain/{STATIC}"
            doc = json.loads(f.read_text())
            path = f"api/runs/{RID}/live/{h['image']}/explain/{QUERY}"
            assert doc == get_json(a + path) == get_json(b + path)
            assert doc["cached"] is True and doc["layer"] == "4" and len(doc["units"]) == 5
            live = get_json(fresh + path)
            assert live["cached"] is False
            for key in ("cached", "seconds"):
                doc.pop(key), live.pop(key)
            assert doc == live, h["image"]
            x = pre["data"][h["sample"]][0][None]
            c = lurker.explain.concepts(pre["model"], x, layer="4", top=5)
            assert [u["unit"] for u in doc["units"]] == c.units[0].tolist()
            for i, u in enumerate(doc["units"]):
                got = torch.tensor(u["signal_scores"], dtype=torch.float64)
                torch.testing.assert_close(got, c.heatmaps[0, i].double(), atol=1e-5, rtol=1e-4)


def test_a_run_precomputed_without_concepts_serves_and_says_what_to_run(
    older: dict, tmp_path: Path
) -> None:
    from lurker.server import create_app
    from lurker.server.serve import background

    held = older["held"]
    assert held and all(h["concepts"] is None and h["methods"] for h in held)
    assert not list(older["site"].rglob("concepts.json*"))
    bare = without_weights(older["run"], tmp_path)
    with background(create_app(bare, dataset=older["data"])) as a:
        image = held[0]["image"]
        assert get_json(f"{a}api/runs/{RID}/live/{image}/explain/saliency.json?target=top")
        import httpx2 as httpx

        r = httpx.get(f"{a}api/runs/{RID}/live/{image}/explain/{QUERY}")
        assert r.status_code == 409, r.text
        assert "gone.pt" in r.json()["detail"] and "--weights" in r.json()["detail"]


def test_the_static_explain_page_draws_the_precomputed_concepts(
    browser: Any, pre: dict, older: dict
) -> None:
    skip_without_browser()
    held = pre["held"][0]
    with static_server(pre["site"]) as base, strict_page(browser) as pg:
        pg.goto(f"{base}#/r/{RID}/explain?image={held['image']}")
        cards = pg.locator(".concept-section .signal-concept-card")
        cards.first.wait_for()
        assert cards.count() == 5
        doc = json.loads(
            (pre["site"] / f"data/runs/{RID}/live/{held['image']}/explain/{STATIC}").read_text()
        )
        units = [c.get_attribute("data-unit") for c in cards.all()]
        assert units == [str(u["unit"]) for u in doc["units"]]
        for c in cards.all():  # the sample's lines with the unit's bands
            c.locator("svg.signal-plot").wait_for()
        section = pg.locator(".concept-section")
        assert pg.locator("#concept-layer").is_disabled()
        assert "Precomputed at 4 for the top class" in section.inner_text()
        assert "The 5 of 5 units of 4" in section.inner_text()
        pg.screenshot(path=str(pre["run"].parent / "explain.png"), full_page=True)
    with static_server(older["site"]) as base, strict_page(browser) as pg:
        pg.goto(f"{base}#/r/{RID}/explain?image={older['held'][0]['image']}")
        pg.locator("[data-method]").first.wait_for()
        note = pg.locator(".concept-section")
        note.wait_for()
        assert "lurker images RUN --explanations top" in note.inner_text()
        assert not pg.locator(".signal-concept-card").count()


def test_precomputing_a_model_lrp_cannot_pass_leaves_concepts_out_saying_why(tmp_path: Path):
    """A Conv1d then an LSTM: concept relevance (LRP) has no rule for the LSTM, so with no
    --methods it is left out and said like LRP, not the whole precompute stopped at
    sample 0 (it was, once concepts became a signal run's default)."""
    from torch.utils.data import TensorDataset

    from lurker.errors import LurkerError
    from lurker.probe import probe
    from lurker.server.explained import precompute
    from models_zoo import ConvLSTM

    torch.manual_seed(0)
    model = ConvLSTM(3).eval()
    data = TensorDataset(torch.randn(12, 3, 32), torch.arange(12) % 2)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    meta = {"model_spec": "models_zoo:ConvLSTM", "weights": str(tmp_path / "w.pt")}
    probe(model, data, out=tmp_path / "r", k=3, batch_size=4, progress=False, meta=meta).close()
    done = precompute(tmp_path / "r", 1, dataset=data, progress=False)
    assert "concepts" in done.skipped and "lstm" in done.skipped["concepts"]
    assert "lrp" in done.skipped
    assert done.made > 0  # the gradient methods were made
    with pytest.raises(LurkerError, match=r"'concepts'.*leave it out of --methods"):  # named
        precompute(tmp_path / "r", 1, ["concepts"], dataset=data, progress=False)
