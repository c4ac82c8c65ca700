"""A run probed again (``overwrite=True``) while the explorer serves it.

The server must answer for the new run, never from what it cached for the old one (its
explanation LRU, its loaded model, its open database), and must not write the old run's
results into the new run's ``cache/``. Oracles: the new model run directly (forward hooks,
``lurker.explain``) and the new run's store opened directly.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import lurker.explain as xp
from explorer_fixtures import probe_digits
from lurker.probe.data import load_dataset
from lurker.server import create_app
from lurker.server.routes.explain import explain_result
from lurker.store import Run


def _probe(out: Path, weights: Path, seed: int) -> torch.nn.Module:
    """Train the digits CNN (``seed``), save it to ``weights`` and probe it into ``out``."""
    return probe_digits(out, weights, seed=seed, k=3, overwrite=True)


@pytest.fixture(scope="module")
def reprobed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A folder of one run, served; each test reads the state after one re-probe."""
    root = tmp_path_factory.mktemp("reprobe")
    out, weights = root / "runs" / "d", root / "d.pt"
    old = _probe(out, weights, seed=0)
    client = TestClient(create_app(root / "runs"))
    # the old run's answers, cached by the server (LRU, its disk cache, its model)
    assert client.get("/api/runs/d/live/sample-3/explain/saliency.json").status_code == 200
    assert client.get("/api/runs/d/live/sample-3/ops/conv2d_1/output/0.json").status_code == 200
    assert client.get("/api/runs/d/layers/features.0/units/1").status_code == 200
    first = client.get("/api/runs/d/layers/features.4/units/0/max/0/input.png")
    assert first.status_code == 200
    version = client.get("/api/runs/d").json()["images_version"]
    versioned = client.get(f"/api/runs/d/layers/features.4/units/0/max/0/input.png?v={version}")
    stale = client.app.state.registry.entries["d"].session
    new = _probe(out, weights, seed=1)  # the same directory and weights path
    return {
        "client": client,
        "old": old,
        "new": new,
        "out": out,
        "stale": stale,
        "first": first,
        "version": version,
        "versioned": versioned,
    }


def test_explanation_is_the_new_models(reprobed: dict) -> None:
    x = load_dataset("digits:test", 16, channels=1)[3][0][None]
    r = reprobed["client"].get("/api/runs/d/live/sample-3/explain/saliency.json")
    assert r.status_code == 200, r.text
    want = xp.explain(reprobed["new"], x, method="saliency").heatmap(0).double()
    old = xp.explain(reprobed["old"], x, method="saliency").heatmap(0).double()
    assert not torch.allclose(want, old)  # the two models differ here
    doc = r.json()
    assert doc["cached"] is False
    assert doc["max"] == pytest.approx(float(want.max()), rel=1e-5)
    assert doc["sum"] == pytest.approx(float(want.sum()), rel=1e-4)


def test_live_map_is_the_new_models(reprobed: dict) -> None:
    x = load_dataset("digits:test", 16, channels=1)[3][0][None]
    r = reprobed["client"].get("/api/runs/d/live/sample-3/ops/conv2d_1/output/0.json")
    assert r.status_code == 200, r.text
    with torch.no_grad():
        want = reprobed["new"].features[0](x)[0, 0].numpy()
    np.testing.assert_allclose(np.array(r.json()["values"]), want, atol=1e-5)


def test_unit_lists_are_the_new_runs(reprobed: dict) -> None:
    r = reprobed["client"].get("/api/runs/d/layers/features.0/units/1")
    assert r.status_code == 200, r.text
    with Run.open(reprobed["out"]) as run:
        want = [(e.sample_id, e.value) for e in run.unit("features.0", 1).top("max")]
    got = [(e["sample_id"], e["value"]) for e in r.json()["top"]["max"]]
    assert got == want
    old = reprobed["stale"].entry.open_run().unit("features.0", 1).top("max")
    assert [(e.sample_id, e.value) for e in old] != want  # the old run's lists differ
    listed = reprobed["client"].get("/api/runs").json()["runs"]
    assert [e["status"] for e in listed] == ["complete"]


def test_old_session_writes_nothing_into_the_new_cache(reprobed: dict) -> None:
    """A request that began on the old run (its session) and ends after the re-probe keeps
    its answer out of the new run's cache/: a later server would serve it as the new run's."""
    stale = reprobed["stale"]
    assert stale is not reprobed["client"].app.state.registry.get("d").session
    explain_result(stale, "sample-5", "saliency", "top", None)
    assert not (reprobed["out"] / "cache" / "explain" / "sample-5").exists()


def test_browser_asks_again_for_a_units_images(reprobed: dict) -> None:
    """An entry's image URL names another image after the re-probe: it is never cached by
    the browser without asking, and the old copy's ETag gets the new image."""
    client, first = reprobed["client"], reprobed["first"]
    assert "max-age" not in first.headers["cache-control"]
    url = "/api/runs/d/layers/features.4/units/0/max/0/input.png"
    r = client.get(url, headers={"If-None-Match": first.headers["etag"]})
    with Run.open(reprobed["out"]) as run:
        top = run.unit("features.4", 0).top("max")[0].sample_id
    old = reprobed["stale"].entry.open_run().unit("features.4", 0).top("max")[0].sample_id
    assert top != old
    assert r.status_code == 200
    assert r.content == client.get(f"/api/runs/d/samples/{top}/image.png").content
    again = client.get(url, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304  # the same file: nothing sent again


IMMUTABLE = "public, max-age=31536000, immutable"


def test_versioned_image_urls_are_immutable_until_the_run_is_probed_again(
    reprobed: dict,
) -> None:
    """An image URL with the run's ``images_version`` is kept by the browser for good (no
    request when a page is seen again): only with the current token. After a re-probe the
    summary hands out another token, and the old token's URL answers the new run's image,
    revalidated, never as a current one. Oracle: the new top sample from the dataset."""
    from lurker.probe.data import input_image

    client, old_version = reprobed["client"], reprobed["version"]
    assert old_version and reprobed["versioned"].headers["cache-control"] == IMMUTABLE
    assert reprobed["versioned"].content == reprobed["first"].content
    new_version = client.get("/api/runs/d").json()["images_version"]
    assert new_version and new_version != old_version
    url = "/api/runs/d/layers/features.4/units/0/max/0/input.png"
    with Run.open(reprobed["out"]) as run:
        top = run.unit("features.4", 0).top("max")[0].sample_id
    want = np.asarray(input_image(load_dataset("digits:test", 16, channels=1), top))
    for query, cache_control in (
        (f"?v={old_version}", "no-cache"),  # the earlier run's token: not current
        ("?v=not-a-token", "no-cache"),
        ("", "no-cache"),  # no token: revalidated by its ETag, as before
        (f"?v={new_version}", IMMUTABLE),
    ):
        r = client.get(url + query)
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == cache_control, query
        assert "etag" in r.headers
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), want)
    sample = client.get(f"/api/runs/d/samples/{top}/image.png?v={new_version}")
    assert sample.headers["cache-control"] == IMMUTABLE
    assert (
        client.get(f"/api/runs/d/samples/{top}/image.png?v={old_version}").headers["cache-control"]
        == "no-cache"
    )


def test_a_command_that_adds_to_the_run_keeps_its_session(tmp_path: Path) -> None:
    """`lurker map` (or `lurker featviz`) writes into the served run's database: the run
    is the same, so its entry, model and caches stay (a re-open would reload the model and
    answer images in flight with 409), and what was added is served at once. A re-probe
    replaces the entry and lets go of the old session (no second model kept alive)."""
    import gc
    import weakref

    from lurker.map import make_map

    out, weights = tmp_path / "runs" / "d", tmp_path / "d.pt"
    probe_digits(out, weights, k=3, embed=True)
    client = TestClient(create_app(tmp_path / "runs"))
    assert client.get("/api/runs/d/live/sample-3/ops/conv2d_1/output/0.json").status_code == 200
    registry = client.app.state.registry
    entry, session = registry.entries["d"], registry.entries["d"].session
    model = session.model()
    assert client.get("/api/runs/d").json()["holds"]["map"] is False
    with Run.open(out) as run:
        make_map(run, method="pca")
    assert client.get("/api/runs/d").json()["holds"]["map"] is True
    assert client.get("/api/runs/d/live/sample-3/ops/conv2d_1/output/0.json").status_code == 200
    assert registry.entries["d"] is entry and entry.session is session
    assert session.model() is model  # not loaded again
    gone = weakref.ref(session)
    del session, model
    probe_digits(out, weights, seed=1, k=3, overwrite=True)
    assert client.get("/api/runs/d/live/sample-3/ops/conv2d_1/output/0.json").status_code == 200
    assert registry.entries["d"] is not entry and entry.session is None
    gc.disable()  # freed by reference counts alone, not by a later cycle collection
    try:
        assert gone() is None
    finally:
        gc.enable()


def test_a_cache_made_again_gets_another_image_token(tmp_path: Path) -> None:
    """The run's ``cache/`` deleted and made again (by a newer lurker, say) may hold other
    pictures under the same names with no new probe: the summary's token changes, so the
    old token's URL is revalidated and answers the new picture, never kept as current."""
    import shutil

    out = tmp_path / "runs" / "d"
    probe_digits(out, tmp_path / "d.pt", k=3)
    client = TestClient(create_app(tmp_path / "runs"))
    url = "/api/runs/d/layers/features.4/units/0/max/0/grad.png"
    assert client.get(url).status_code == 200  # made, and kept in cache/
    old = client.get("/api/runs/d").json()["images_version"]
    first = client.get(f"{url}?v={old}")
    assert first.headers["cache-control"] == IMMUTABLE
    made = out / "cache" / "grad" / "features.4" / "00000-max-000.png"  # (unit, list, rank)
    assert made.is_file()
    shutil.rmtree(out / "cache")
    made.parent.mkdir(parents=True)
    other = io.BytesIO()
    Image.new("RGB", (3, 3), (255, 0, 0)).save(other, format="PNG")
    made.write_bytes(other.getvalue())
    new = client.get("/api/runs/d").json()["images_version"]
    assert new and new != old
    again = client.get(f"{url}?v={old}")
    assert again.headers["cache-control"] == "no-cache"
    assert again.content == other.getvalue() != first.content
    assert client.get(f"{url}?v={new}").headers["cache-control"] == IMMUTABLE


def test_two_first_requests_at_once_hand_out_one_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache's marker is made once and never touched: a request that missed it while
    another made it (two first requests at once) leaves it as it is, so the token the other
    handed out stays current (a touch changed it, and that client's images were
    revalidated for the rest of its session)."""
    import time

    out = tmp_path / "runs" / "d"
    probe_digits(out, tmp_path / "d.pt", k=3)
    client = TestClient(create_app(tmp_path / "runs"))
    first = client.get("/api/runs/d").json()["images_version"]
    marker = out / "cache" / ".generation"
    assert first and marker.is_file()
    time.sleep(0.01)  # a touch now would show in the marker's change time
    real_stat = Path.stat
    missed = []

    def stat_missing_once(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == marker and not missed:  # this request looked before the other made it
            missed.append(self)
            raise FileNotFoundError(self)
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat_missing_once)
    assert client.get("/api/runs/d").json()["images_version"] == first
    assert missed
