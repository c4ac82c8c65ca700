"""What a model made into a run's cache (gradient images, explanations) is served only
when the run's own model made it: the cache records that model's fingerprint
(``cache/model.json``). Files of unknown origin (an older lurker's, which recorded
nothing, or another model's) are never shown as the run's: a server with the run's model
makes them again, one without says so, `lurker export` leaves them out. The Home page's
summary answers at once and the model's check runs in the background; `lurker.featviz`
refuses another model than the run's as the CLI does. Oracles: the images `lurker images`
makes with the run's model, the recorded fingerprint, the identity module's message."""

from __future__ import annotations

import concurrent.futures
import io
import json
import shutil
import socket
import sqlite3
import struct
import threading
import types
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

import lurker
from explorer_fixtures import SiteServer, probe_digits, static_server
from lurker.cli import main
from lurker.errors import LurkerError
from lurker.examples import DigitsNet
from lurker.server import create_app
from lurker.server.deps import session
from lurker.store.files import MODEL_STAMP

SPEC = "lurker.examples:DigitsNet"
LAYER = "features.0"
GRAD = f"/api/runs/digits/layers/{LAYER}/units/0/max/0/grad.png"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A digits run whose gradients of one layer and one sample's saliency were made
    with its own model (`lurker images`), and a file of other weights."""
    root = tmp_path_factory.mktemp("cache-identity")
    run = root / "digits"
    model = probe_digits(run, root / "digits.pt", k=3)
    r = CliRunner().invoke(main, ["images", str(run), "--layers", LAYER, "--which", "max"])
    assert r.exit_code == 0, r.output
    from lurker.server.explained import precompute

    precompute(run, 1, ["saliency"], progress=False)
    torch.manual_seed(1)
    torch.save(DigitsNet().state_dict(), root / "other.pt")
    return {"root": root, "run": run, "model": model}


def _copy(made: dict[str, Any], name: str) -> Path:
    dest = made["root"] / name / "digits"
    shutil.copytree(made["run"], dest)
    return dest


def _as_an_older_lurker_left_it(run: Path) -> bytes:
    """Drop the cache's stamp (a lurker before it kept one) and put another picture in
    place of a gradient (what another model would have made): returns that picture."""
    (run / "cache" / MODEL_STAMP).unlink()
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 255)).save(buf, format="PNG")
    grad = run / "cache" / "grad" / LAYER / "00000-max-000.png"
    assert grad.is_file()
    grad.write_bytes(buf.getvalue())
    return buf.getvalue()


def _without_model(run: Path) -> None:
    """The run's recorded weights file gone: a server of it has no model."""
    db = sqlite3.connect(run / "run.db")
    with db:
        cfg = json.loads(db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0])
        cfg["weights"] = str(run.parent / "gone.pt")
        db.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps(cfg),))
    db.close()


def _wait(c: TestClient) -> str:
    state = c.get("/api/runs/digits/model-check", params={"wait": 60}).json()["state"]
    assert state != "checking", "the model's check did not end in 60 s"
    return str(state)


def test_the_cache_records_the_model_that_made_it(made: dict[str, Any]) -> None:
    """`lurker images` stamps the cache with the run's recorded fingerprint, and the
    server serves what it made as it is."""
    from lurker.store import Run

    with Run.open(made["run"]) as r:
        want = r.meta["model_fingerprint"]
    stamp = json.loads((made["run"] / "cache" / MODEL_STAMP).read_text())
    assert stamp == {"model_fingerprint": want}
    grad = (made["run"] / "cache" / "grad" / LAYER / "00000-max-000.png").read_bytes()
    with TestClient(create_app(made["run"])) as c:
        assert c.get(GRAD).content == grad
        assert [x["image"] for x in c.get("/api/runs/digits/explained").json()["samples"]] == [
            "sample-0"
        ]


def test_a_gradient_of_unknown_origin_is_made_again_with_the_runs_model(
    made: dict[str, Any],
) -> None:
    run = _copy(made, "remade")
    fake = _as_an_older_lurker_left_it(run)
    want = (made["run"] / "cache" / "grad" / LAYER / "00000-max-000.png").read_bytes()
    with TestClient(create_app(run)) as c:
        got = c.get(GRAD)
        assert got.status_code == 200, got.text
        assert got.content != fake
        # the run's model's own picture (pixels: the PNG encoder is the same)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(got.content))),
                              np.asarray(Image.open(io.BytesIO(want))))  # fmt: skip
    assert (run / "cache" / MODEL_STAMP).is_file()  # the cache is the run's model's now


def test_without_the_model_a_cache_of_unknown_origin_is_said_not_shown(
    made: dict[str, Any], tmp_path: Path
) -> None:
    run = _copy(made, "unknown")
    fake = _as_an_older_lurker_left_it(run)
    _without_model(run)
    with TestClient(create_app(run)) as c:
        r = c.get(GRAD)
        assert r.status_code == 404 and r.content != fake
        assert "unknown origin" in r.json()["detail"] and "lurker images RUN" in r.json()["detail"]
        # the precomputed saliency of sample 0 is not the run's model's either
        assert c.get("/api/runs/digits/explained").json()["samples"] == []
        assert c.get("/api/runs/digits").json()["holds"]["explained"] == 0
        r = c.get("/api/runs/digits/live/sample-0/explain/saliency.json")
        assert r.status_code == 409, r.text
    site = tmp_path / "site"
    with pytest.warns(UserWarning, match="unknown origin"):
        lurker.server.export_site(run, site)
    assert not list(site.rglob("grad.png"))
    assert json.loads((site / "data/runs/digits/explained.json").read_text())["samples"] == []
    # the same files under the run's model's stamp: served as they are
    stamp = json.loads((made["run"] / "cache" / MODEL_STAMP).read_text())
    (run / "cache" / MODEL_STAMP).write_text(json.dumps(stamp))
    with TestClient(create_app(run)) as c:
        assert c.get(GRAD).content == fake
    # and under another model's: not
    (run / "cache" / MODEL_STAMP).write_text(json.dumps({"model_fingerprint": "0123"}))
    with TestClient(create_app(run)) as c:
        assert c.get(GRAD).status_code == 404


def test_featviz_from_python_refuses_another_model_than_the_runs(made: dict[str, Any]) -> None:
    """lurker.featviz(model, run=...) checks the fingerprint as `lurker featviz RUN` does,
    with the identity module's message and its fix (the probe's model and weights)."""
    torch.manual_seed(1)
    other = DigitsNet().eval()
    with pytest.raises(LurkerError) as err:
        lurker.featviz(other, LAYER, units=[0], steps=1, run=made["run"])
    said = str(err.value)
    assert said.startswith("The model object given (DigitsNet) is not the one run")
    assert f"--model {SPEC} --weights {made['root'] / 'digits.pt'}" in said
    fv = lurker.featviz(made["model"], LAYER, units=[0], steps=1, run=made["run"])
    assert fv.units == [0]


def _hold_model_thread(app: Any) -> threading.Event:
    """Keep the run's model thread busy (a long job on it) until the event is set."""
    e = app.state.registry.get("digits")
    s = session(types.SimpleNamespace(app=app), e)
    release = threading.Event()
    s.executor().submit(release.wait)
    return release


def test_the_summary_answers_while_the_model_thread_is_busy_and_the_check_ends(
    made: dict[str, Any],
) -> None:
    app = create_app(made["run"])
    release = _hold_model_thread(app)
    try:
        with TestClient(app) as c, concurrent.futures.ThreadPoolExecutor(1) as pool:
            # (a bound only against a hang: the summary used to wait for the model thread)
            holds = pool.submit(lambda: c.get("/api/runs/digits").json()).result(120)["holds"]
            assert holds["model_check"] == "checking" and holds["live"] is False
            assert holds["live_reason"] is None
            busy = c.get("/api/runs/digits/model-check", params={"wait": 0.2}).json()
            assert busy == {"state": "checking", "live": False, "live_reason": None}
            release.set()
            assert _wait(c) == "ok"
            holds = c.get("/api/runs/digits").json()["holds"]
            assert holds["model_check"] == "ok" and holds["live"] is True
    finally:
        release.set()


def test_the_check_of_another_model_ends_refused(made: dict[str, Any]) -> None:
    other = str(made["root"] / "other.pt")
    with TestClient(create_app(made["run"], model=SPEC, weights=other)) as c:
        assert c.get("/api/runs/digits").json()["holds"]["model_check"] == "checking"
        assert _wait(c) == "refused"
        got = c.get("/api/runs/digits/model-check").json()
        assert got["live"] is False and "is not the one run" in got["live_reason"]
        holds = c.get("/api/runs/digits").json()["holds"]
        assert holds["model_check"] == "refused" and holds["live_reason"] == got["live_reason"]


def test_the_static_file_server_prints_no_traceback_for_a_dropped_request(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A browser that drops a request (a page left while its images load) breaks the
    pipe of the answer: no traceback on stderr; another error still prints one."""
    (tmp_path / "big.bin").write_bytes(b"\0" * (32 << 20))
    (tmp_path / "small.txt").write_text("hello")
    with static_server(tmp_path) as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.recv(1024)  # the answer has begun
            # closed with a reset, as a browser cancelling the request does
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        with urllib.request.urlopen(url + "small.txt") as r:  # served after, as before
            assert r.read() == b"hello"
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipe" not in err and "ConnectionReset" not in err
    server = SiteServer(("127.0.0.1", 0), lambda *a: None)
    try:
        try:
            raise ValueError("a real error")
        except ValueError:
            server.handle_error(None, ("127.0.0.1", 1))
    finally:
        server.server_close()
    assert "ValueError: a real error" in capfd.readouterr().err


def test_claiming_a_cache_renews_its_generation_only_where_files_were_dropped(
    tmp_path: Path,
) -> None:
    """Claiming an untrusted cache drops its model-made files and its generation marker (a
    server's image token then changes, so no browser keeps a dropped picture); claiming a
    fresh cache, or one already the model's, keeps the marker (nothing served changes)."""
    from lurker.store.files import GENERATION_MARKER, cache_trusted, claim_cache

    cache = tmp_path / "cache"
    cache.mkdir()
    marker = cache / GENERATION_MARKER
    marker.touch()
    claim_cache(tmp_path, "aaaa")  # fresh: only stamped
    assert marker.exists() and cache_trusted(tmp_path, "aaaa")
    (cache / "grad").mkdir()
    (cache / "grad" / "x.png").write_bytes(b"made by aaaa")
    claim_cache(tmp_path, "aaaa")  # already its own: nothing dropped
    assert marker.exists() and (cache / "grad" / "x.png").exists()
    claim_cache(tmp_path, "bbbb")  # another model's files: dropped, a new generation
    assert not marker.exists() and not (cache / "grad").exists()
    assert cache_trusted(tmp_path, "bbbb") and not cache_trusted(tmp_path, "aaaa")
