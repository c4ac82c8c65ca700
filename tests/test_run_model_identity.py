"""The explorer, `lurker images` (and `--explanations`), `lurker export` and `lurker
explain RUN` never compute with another model than the one a run was probed with: the
run records the model's fingerprint (architecture and a sample of every weight), and a
model whose fingerprint differs (other weights, a weights file trained again since the
probe) is refused with the reason and the fix. The server still serves everything the run
holds alone. A run that records no fingerprint (older runs) is not checked."""

from __future__ import annotations

import copy
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from explorer_fixtures import probe_digits
from lurker.cli import main
from lurker.examples import DigitsNet
from lurker.server import create_app

SPEC = "lurker.examples:DigitsNet"
LAYER = "features.0"


def _untrained(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return DigitsNet().eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A trained digits run (its weights file recorded), and a file of other weights: a
    DigitsNet of another seed, never trained."""
    root = tmp_path_factory.mktemp("identity")
    weights = root / "digits.pt"
    model = probe_digits(root / "runs" / "digits", weights, k=3)
    other = _untrained(1)
    torch.save(other.state_dict(), root / "other.pt")
    # the oracle that they are other models: not one tensor of their weights is equal
    mine, theirs = model.state_dict(), other.state_dict()
    assert all(not torch.equal(mine[k], theirs[k]) for k in mine if mine[k].is_floating_point())
    return {"root": root, "run": root / "runs" / "digits", "weights": weights, "model": model}


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("cache"))
    return dest


def _forget_fingerprint(run: Path) -> None:
    """Make ``run`` an older run, one that records no model fingerprint."""
    db = sqlite3.connect(run / "run.db")
    with db:
        db.execute("DELETE FROM meta WHERE key = 'model_fingerprint'")
    db.close()


def _holds(c: TestClient, run: str) -> dict[str, Any]:
    """The run summary's ``holds`` once the model's check against the run's fingerprint,
    which the first summary starts in the background, has ended."""
    state = c.get(f"/api/runs/{run}/model-check", params={"wait": 60}).json()["state"]
    assert state != "checking", "the model's check did not end in 60 s"
    return c.get(f"/api/runs/{run}").json()["holds"]  # type: ignore[no-any-return]


def _digit_png(path: Path) -> Path:
    from lurker.probe.data import load_dataset

    x = load_dataset("digits:test", 16, channels=1)[0][0]
    Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8)).save(path)
    return path


def test_serving_other_weights_refuses_every_model_endpoint_and_keeps_the_stored_pages(
    runs: dict[str, Any],
) -> None:
    """`lurker serve RUN --model SPEC --weights OTHER`: the summary (the Home page) says
    the model is not the run's and how to fix it; every endpoint that runs the model
    answers 409 with that; what the run stores alone is served as before; and the other
    model's gradients go nowhere near the run's cache."""
    other = str(runs["root"] / "other.pt")
    run = _copy(runs["run"], runs["root"] / "other-served" / "digits")
    with TestClient(create_app(run, model=SPEC, weights=other)) as c:
        holds = _holds(c, "digits")
        assert holds["live"] is False
        why = holds["live_reason"]
        assert "is not the one run" in why and other in why
        assert f"--model {SPEC} --weights {runs['weights']}" in why  # the fix: the probe's
        needs_model = [
            "/api/runs/digits/live/sample-0",
            "/api/runs/digits/live/sample-0/explain/saliency",
            "/api/runs/digits/live/sample-0/explain/concepts",
            "/api/runs/digits/live/sample-0/ops/conv2d_1/output/0.png",
            "/api/runs/digits/filters",
            f"/api/runs/digits/layers/{LAYER}/units/0/max/0/grad.png",
        ]
        for url in needs_model:
            r = c.get(url)
            assert r.status_code == 409, (url, r.status_code, r.text)
            assert "is not the one run" in r.json()["detail"], url
            assert f"--weights {runs['weights']}" in r.json()["detail"], url
        stored = [
            "/api/runs/digits/graph",
            f"/api/runs/digits/layers/{LAYER}",
            f"/api/runs/digits/layers/{LAYER}/units/0",
            "/api/runs/digits/samples?offset=0&limit=5",
            "/api/runs/digits/samples/0/image.png",
            f"/api/runs/digits/layers/{LAYER}/units/0/max/0/input.png",
            f"/api/runs/digits/layers/{LAYER}/units/0/max/0/crop.png",
        ]
        for url in stored:
            assert c.get(url).status_code == 200, url
        detail = c.get("/api/runs/digits/samples/0").json()
        assert detail["prediction"] is None  # no prediction of the other model
        assert c.get("/api/runs/digits/explained").json()["samples"] == []
    assert not (run / "cache" / "grad").exists()


def test_a_model_object_of_other_weights_is_refused_too(runs: dict[str, Any]) -> None:
    """create_app(run, model_obj=...) from Python: the same refusal, naming the object."""
    with TestClient(create_app(runs["run"], model_obj=_untrained(2))) as c:
        r = c.get("/api/runs/digits/live/sample-0")
        assert r.status_code == 409
        assert "the model object given (DigitsNet) is not the one run" in r.json()["detail"]
        holds = _holds(c, "digits")
        assert holds["live"] is False and "model object given" in holds["live_reason"]


def test_the_runs_own_model_works_as_before(runs: dict[str, Any]) -> None:
    """The recorded model, the same spec and weights given, and the model object itself
    all attach: the live predictions are the model's own (the oracle: its softmax)."""
    from lurker.probe.data import load_dataset

    x = load_dataset("digits:test", 16, channels=1)[0][0]
    with torch.no_grad():
        want = torch.softmax(runs["model"](x[None]), 1)[0]
    top = int(want.argmax())
    for app in (
        create_app(runs["run"]),
        create_app(runs["run"], model=SPEC, weights=str(runs["weights"])),
        create_app(runs["run"], model_obj=runs["model"]),
    ):
        with TestClient(app) as c:
            holds = _holds(c, "digits")
            assert holds["live"] is True and holds["live_reason"] is None
            r = c.get("/api/runs/digits/live/sample-0")
            assert r.status_code == 200, r.text
            best = r.json()["predictions"][0]
            assert best["class"] == top and best["prob"] == pytest.approx(float(want[top]), 1e-5)
            assert c.get("/api/runs/digits/live/sample-0/explain/saliency").status_code == 200


def test_the_fingerprint_is_computed_once_per_model(
    runs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check reads a sample of every tensor: once per loaded model, not per request;
    again only when the model's weights change."""
    import lurker.probe.identity as identity

    calls: list[int] = []
    real = identity.fingerprint

    def counted(model: torch.nn.Module) -> str:
        calls.append(1)
        return real(model)

    monkeypatch.setattr(identity, "fingerprint", counted)
    model = _untrained(0)
    model.load_state_dict(runs["model"].state_dict())
    with TestClient(create_app(runs["run"], model_obj=model)) as c:
        for _ in range(3):
            assert c.get("/api/runs/digits").status_code == 200
            assert c.get("/api/runs/digits/live/sample-0").status_code == 200
            assert (
                c.get(f"/api/runs/digits/layers/{LAYER}/units/1/max/0/grad.png").status_code == 200
            )
    assert len(calls) == 1
    before = identity.fingerprint_of(model)
    assert before == real(model) and len(calls) == 1
    with torch.no_grad():
        model.features[0].bias.add_(1.0)  # trained further: fingerprinted again
    assert identity.fingerprint_of(model) == real(model) != before and len(calls) == 2


@pytest.fixture
def changed(runs: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """A run of an untrained DigitsNet whose weights file was replaced after the probe
    (trained again into the same file): the run's own recorded model is another one now."""
    from lurker.probe import probe
    from lurker.probe.data import load_dataset

    weights = tmp_path / "w.pt"
    model = _untrained(3)
    torch.save(model.state_dict(), weights)
    out = tmp_path / "run"
    probe(
        model, load_dataset("digits:test", 16, channels=1), out=out, k=2, layers=LAYER,
        progress=False,
        meta={"model_spec": SPEC, "weights": str(weights), "data": "digits:test"},
    ).close()  # fmt: skip
    torch.save(_untrained(4).state_dict(), weights)
    return {"run": out, "weights": weights, "model": model}


def test_lurker_images_refuses_a_changed_weights_file_and_writes_nothing(
    changed: dict[str, Any], tmp_path: Path
) -> None:
    """`lurker images RUN` and `--explanations N` load the run's recorded weights: a file
    replaced since the probe is refused before anything is written, naming the run, the
    file and the fix; with the probe's weights put back, the same command makes them."""
    run, weights = changed["run"], changed["weights"]
    cli = CliRunner()
    for args in (
        ["images", str(run), "--layers", LAYER],
        ["images", str(run), "--explanations", "2"],
    ):
        r = cli.invoke(main, args)
        assert r.exit_code != 0, r.output
        text = " ".join(r.output.split())
        assert f"run {run}" in text and f"weights file {weights} has changed" in text, text
        assert "Put back the file the probe loaded" in text
        assert "Traceback" not in r.output
        assert not any((run / "cache").rglob("*.png")), list((run / "cache").rglob("*"))
        assert not (run / "cache" / "explain").exists()
    # the export shows what the run holds; the first layer's filters, drawn from the
    # model, would be another model's: left out, warned of
    site = tmp_path / "site"
    with pytest.warns(UserWarning, match="no first-layer filters") as said:
        r = cli.invoke(main, ["export", str(run), str(site)])
    assert r.exit_code == 0, r.output
    assert any(f"weights file {weights} has changed" in str(w.message) for w in said)
    assert any(site.rglob("*.json")) and not list(site.rglob("filters.json"))
    r = cli.invoke(main, ["explain", str(run), "--image", str(_digit_png(tmp_path / "7.png")),
                          "--out", str(tmp_path / "heat.png")])  # fmt: skip
    assert r.exit_code != 0 and "has changed since the probe" in " ".join(r.output.split())
    assert not (tmp_path / "heat.png").exists()
    torch.save(changed["model"].state_dict(), weights)  # the probe's weights back
    r = cli.invoke(main, ["images", str(run), "--layers", LAYER, "--which", "max"])
    assert r.exit_code == 0, r.output
    assert any((run / "cache" / "grad").rglob("*.png"))


def test_an_older_run_without_a_fingerprint_behaves_as_before(
    changed: dict[str, Any], runs: dict[str, Any], tmp_path: Path
) -> None:
    """A run that records no fingerprint cannot be checked: its model attaches and
    `lurker images` runs, as before (nothing new is said)."""
    run = changed["run"]
    _forget_fingerprint(run)
    with TestClient(create_app(run)) as c:
        holds = c.get("/api/runs/run").json()["holds"]
        assert holds["live"] is True and holds["live_reason"] is None
        assert c.get("/api/runs/run/live/sample-0").status_code == 200
    r = CliRunner().invoke(main, ["images", str(run), "--layers", LAYER, "--which", "max"])
    assert r.exit_code == 0, r.output


def test_a_random_init_run_is_served_with_its_rebuilt_model_and_a_mismatch_says_why(
    tmp_path: Path,
) -> None:
    """`lurker probe SPEC` with no weights: the run stores no weights, and lurker builds a
    model without weights from seed 0, so `lurker serve RUN` rebuilds the same model (the
    oracle: two builds' state dicts are equal). Where the rebuild differs (another torch
    or model code: simulated by another recorded fingerprint), the reason says why and
    what to do: probe with --weights."""
    from lurker.models import load_model

    a, b = load_model(SPEC).state_dict(), load_model(SPEC).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    out = tmp_path / "rand"
    r = CliRunner().invoke(main, ["probe", SPEC, "--data", "digits:test", "--image-size", "16",
                                  "--layers", LAYER, "--k", "2", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    with TestClient(create_app(out)) as c:
        assert _holds(c, "rand")["live"] is True
        assert c.get("/api/runs/rand/live/sample-0").status_code == 200
    db = sqlite3.connect(out / "run.db")
    with db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'model_fingerprint'", ('"0123"',))
    db.close()
    with TestClient(create_app(out)) as c:
        why = _holds(c, "rand")["live_reason"]
        assert "probed from a random-init" in why and "a run stores no weights" in why
        assert "probe with --weights FILE" in why
        r = c.get("/api/runs/rand/live/sample-0")
        assert r.status_code == 409 and "probe with --weights FILE" in r.json()["detail"]


def test_a_model_built_under_inference_mode_is_the_runs_own(runs: dict[str, Any]) -> None:
    """A model made inside torch.inference_mode() (its tensors keep no version counter)
    is the run's own when its weights are: it attaches and predicts as the model does,
    where reading its version counters made every page that needs it fail."""
    from lurker.probe.data import load_dataset

    with torch.inference_mode():
        model = DigitsNet().eval()
        model.load_state_dict(runs["model"].state_dict())
    assert next(model.parameters()).is_inference()
    x = load_dataset("digits:test", 16, channels=1)[0][0]
    with torch.no_grad():
        want = torch.softmax(runs["model"](x[None]), 1)[0]
    with TestClient(create_app(runs["run"], model_obj=model)) as c:
        holds = _holds(c, "digits")
        assert holds["live"] is True, holds["live_reason"]
        r = c.get("/api/runs/digits/live/sample-0")
        assert r.status_code == 200, r.text
        best = r.json()["predictions"][0]
        assert best["class"] == int(want.argmax())


def test_a_model_that_cannot_be_used_is_said_on_the_home_page(runs: dict[str, Any]) -> None:
    """A model the check cannot read (left on the meta device: a lazy init never
    materialised) does not fail the run's summary, which the Home page needs: the
    summary says why the live views are off, and the live endpoints refuse."""
    model = DigitsNet().to("meta")
    with TestClient(create_app(runs["run"], model_obj=model)) as c:
        r = c.get("/api/runs/digits")
        assert r.status_code == 200, r.text
        holds = _holds(c, "digits")
        assert holds["live"] is False and holds["model_check"] == "refused"
        assert "the model cannot be used" in holds["live_reason"]
        assert "meta" in holds["live_reason"]
        r = c.get("/api/runs/digits/live/sample-0")
        assert r.status_code == 409 and "the model cannot be used" in r.json()["detail"]


def test_the_same_weights_in_another_dtype_are_named_as_a_possible_cause() -> None:
    """A run probed with ``model.half()`` and served in float32 computes other numbers:
    refused, and the reason names the dtype among the causes, not only other weights."""
    from lurker.probe.identity import model_mismatch
    from lurker.probe.sweep import fingerprint

    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    meta = {"model_fingerprint": fingerprint(copy.deepcopy(model).half())}
    why = model_mismatch(model, meta, "runs/r")
    assert why is not None and "another dtype" in why
    assert model_mismatch(copy.deepcopy(model).half(), meta, "runs/r") is None
