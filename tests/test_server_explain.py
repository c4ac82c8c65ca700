"""The Explain endpoints: each method's heatmap equals ``lurker.explain.explain`` run in
the test on the same input, coloured by the normalisation docs/explorer.md states
(written out here independently); bad input answers 400/404/409 with clear messages;
one attribution per (image, method, target, layer) is computed.
"""

from __future__ import annotations

import inspect
import io
import sys
import threading
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import lurker.explain  # the package module (patched below), and lurker.trace
from explorer_fixtures import ExplorerRun, explorer_run, summary_rank_behind  # noqa: F401
from lurker.explain import METHODS
from lurker.explain.gradcam import default_layer
from lurker.probe.data import load_dataset
from lurker.server import create_app

XP = sys.modules["lurker.explain"]
SAMPLE = 3
BASE = f"/api/runs/digits/live/sample-{SAMPLE}/explain"


@pytest.fixture(scope="module")
def client(explorer_run: ExplorerRun) -> Any:  # noqa: F811
    app = create_app(explorer_run.path, model_obj=explorer_run.model)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    """Sample SAMPLE as the run's dataset gives it to the model (a batch of one)."""
    return load_dataset("digits:test", 16, channels=1)[SAMPLE][0][None]


def _png(r: Any) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(r.content)))


def _expected_rgba(heat: np.ndarray, signed: bool) -> np.ndarray:
    """The documented colouring: v = heat / max|heat|; signed: blue-white-red with
    opacity |v|; unsigned: black-red-yellow-white ("hot") with opacity max(v, 0)."""
    v = heat / np.abs(heat).max()
    if signed:
        pos, neg = np.clip(v, 0, None), np.clip(-v, 0, None)
        rgb = [1 - neg, 1 - pos - neg, 1 - pos]
        a = np.abs(v)
    else:
        a = np.clip(v, 0, None)
        rgb = [3 * a, 3 * a - 1, 3 * a - 2]
    out = np.stack([*[np.clip(c, 0, 1) for c in rgb], a], -1)
    return np.rint(out * 255).astype(int)


def _oracle(model: torch.nn.Module, x: torch.Tensor, method: str, target: Any, options: dict):
    """The method run in the test with the options the server reports (those that are
    the method's own parameters: a method may also record derived facts there)."""
    params = inspect.signature(METHODS[method].compute).parameters
    opts = {k: v for k, v in options.items() if v is not None and k in params}
    return XP.explain(model, x, target=target, method=method, **opts)


def test_methods_listed(client: TestClient):
    body = client.get("/api/runs/digits/explain/methods").json()
    assert [m["name"] for m in body["methods"]] == list(METHODS)
    by = {m["name"]: m for m in body["methods"]}
    assert by["gradcam"]["needs_layer"] and by["gradcam_plus_plus"]["needs_layer"]
    assert not by["saliency"]["needs_layer"] and not by["occlusion"]["needs_layer"]
    assert by["saliency"]["signed"] is False and by["integrated_gradients"]["signed"] is True
    assert all(m["summary"] for m in body["methods"])
    # the run's probed layers with a (C, H, W) output larger than 1x1; the last is concept
    # relevance's default; Grad-CAM's is lurker.explain's own (null: found per image)
    assert body["layers"] == [f"features.{i}" for i in (0, 2, 4, 6, 8, 9)]
    assert body["default_layer"] is None and body["concept_layer"] == "features.9"


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_equals_explain(
    client: TestClient,
    explorer_run: ExplorerRun,  # noqa: F811
    x: torch.Tensor,
    method: str,
):
    model = explorer_run.model
    r = client.get(f"{BASE}/{method}.json")
    assert r.status_code == 200, r.text
    body = r.json()
    with torch.no_grad():
        top = int(model(x).argmax(1))
    assert body["target"] == str(top) and body["target_class"] == top
    assert body["method"] == method and body["shape"] == [16, 16] and body["scale"] == 14
    if method == "smoothgrad":
        assert body["options"]["seed"] == 0  # deterministic: the cache and a rerun agree
    if method in ("gradcam", "gradcam_plus_plus"):  # Python's default layer, by Python
        want = default_layer(model, x, top)
        assert body["layer"] == want and body["options"]["layer"] == want
        assert body["layer_module"] == lurker.trace(model, x)[want].module

    ex = _oracle(model, x, method, top, body["options"])
    heat = ex.heatmap(0).double().numpy()
    assert body["signed"] == ex.signed
    assert body["min"] == pytest.approx(heat.min(), rel=1e-4, abs=1e-6)
    assert body["max"] == pytest.approx(heat.max(), rel=1e-4, abs=1e-6)
    assert body["sum"] == pytest.approx(heat.sum(), rel=1e-4, abs=1e-4)
    if method == "integrated_gradients":
        assert body["delta"] == pytest.approx(float(ex.delta[0]), abs=1e-5)
    else:
        assert body["delta"] is None

    bare = client.get(f"{BASE}/{method}.png", params={"overlay": 0})
    rgba = _png(bare)
    assert rgba.shape == (224, 224, 4) and bare.headers["X-Lurker-Scale"] == "14"
    # nearest-neighbour upscale: every 14x14 block is one heatmap pixel
    assert (rgba == np.repeat(np.repeat(rgba[::14, ::14], 14, 0), 14, 1)).all()
    diff = np.abs(rgba[::14, ::14].astype(int) - _expected_rgba(heat, ex.signed))
    assert diff.max() <= 1, f"{method}: heatmap pixels differ by up to {diff.max()}"

    over = _png(client.get(f"{BASE}/{method}.png"))
    assert over.shape == (224, 224, 3)


def test_overlay_blends_the_heatmap_over_the_image(client: TestClient):
    image = _png(client.get(f"/api/runs/digits/live/sample-{SAMPLE}/input.png")).astype(int)
    bare = _png(client.get(f"{BASE}/input_x_gradient.png", params={"overlay": 0}))[::14, ::14]
    clear = _png(client.get(f"{BASE}/input_x_gradient.png", params={"opacity": 0}))[::14, ::14]
    assert (np.abs(clear.astype(int) - image[..., None]) <= 1).all()  # opacity 0: the image
    full = _png(client.get(f"{BASE}/input_x_gradient.png", params={"opacity": 1}))[::14, ::14]
    peak = np.unravel_index(bare[..., 3].argmax(), bare.shape[:2])  # |v| = 1: pure colour
    assert bare[peak][3] == 255
    assert (np.abs(full[peak].astype(int) - bare[peak][:3].astype(int)) <= 1).all()


def test_class_and_unit_targets(
    client: TestClient,
    explorer_run: ExplorerRun,  # noqa: F811
    x: torch.Tensor,
):
    body = client.get(f"{BASE}/saliency.json", params={"target": "7"}).json()
    assert body["target"] == "7" and body["target_class"] == 7 and body["target_name"] == "7"
    want = XP.explain(explorer_run.model, x, target=7, method="saliency").heatmap(0)
    assert body["max"] == pytest.approx(float(want.max()), rel=1e-4)

    body = client.get(f"{BASE}/saliency.json", params={"target": "features.4:5"}).json()
    assert body["target"] == "features.4:5" and body["target_class"] is None
    unit = XP.explain(explorer_run.model, x, target=("features.4", 5), method="saliency")
    heat = unit.heatmap(0).double().numpy()
    assert body["sum"] == pytest.approx(heat.sum(), rel=1e-4)
    rgba = _png(client.get(f"{BASE}/saliency.png", params={"target": "features.4:5", "overlay": 0}))
    assert np.abs(rgba[::14, ::14].astype(int) - _expected_rgba(heat, False)).max() <= 1

    # Grad-CAM for a unit target defaults to a layer the unit depends on (its own)
    body = client.get(f"{BASE}/gradcam.json", params={"target": "features.4:5"}).json()
    assert body["layer"] == "features.4"
    body = client.get(f"{BASE}/gradcam.json", params={"layer": "features.0"}).json()
    assert body["layer"] == "features.0" and body["options"]["layer"] == "features.0"


@pytest.mark.parametrize(
    ("path", "params", "status", "says"),
    [
        ("nope.json", {}, 404, "unknown explanation method 'nope'; supported: saliency"),
        ("nope.png", {}, 404, "supported: saliency, input_x_gradient"),
        ("saliency.json", {"target": "12"}, 400, "target class 12 is out of range"),
        ("saliency.png", {"target": "12"}, 400, "the model has 10 outputs"),
        ("saliency.json", {"target": "bad"}, 400, "give a class index (3), 'top', or a unit"),
        ("saliency.json", {"target": "features.4:99"}, 400, "channel 99 is out of range"),
        ("saliency.json", {"target": "foo:1"}, 404, "layer 'foo' is not in the model"),
        # in the page's words, with the run's layers (not Python's model.named_modules())
        (
            "saliency.json",
            {"target": "foo:1"},
            404,
            "A unit is LAYER:CHANNEL, its layer one of "
            "this run's (features.0, features.2, features.4",
        ),
        ("gradcam.json", {"layer": "nope"}, 404, "layer 'nope' is not in the model"),
        ("saliency.json", {"layer": "features.4"}, 400, "takes no layer"),
        ("gradcam.json", {"layer": "features.9", "target": "features.4:1"}, 400, "does not depend"),
        ("saliency.png", {"opacity": "2"}, 422, "opacity"),
    ],
)
def test_bad_input(client: TestClient, path: str, params: dict, status: int, says: str):
    r = client.get(f"{BASE}/{path}", params=params)
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]


def test_bad_image_and_no_model(client: TestClient, explorer_run: ExplorerRun):  # noqa: F811
    r = client.get("/api/runs/digits/live/nope/explain/saliency.json")
    assert r.status_code == 404 and "uploads return, or sample-N" in r.json()["detail"]
    r = client.get("/api/runs/digits/live/sample-99999/explain/saliency.png")
    assert r.status_code == 404 and "no sample 99999" in r.json()["detail"]
    with TestClient(create_app(explorer_run.path, live=False)) as c:
        r = c.get(f"{BASE}/saliency.png")
        assert r.status_code == 409 and "lurker serve RUN --model" in r.json()["detail"]
        # the method list needs no model
        assert c.get("/api/runs/digits/explain/methods").status_code == 200


def test_cached_per_image_method_target_layer(
    explorer_run: ExplorerRun,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    calls: list[tuple[str, Any]] = []
    real = XP.explain

    def counting(model: Any, x: Any, target: Any = None, method: str = "saliency", **kw: Any):
        calls.append((method, target))
        return real(model, x, target=target, method=method, **kw)

    monkeypatch.setattr(XP, "explain", counting)
    model = explorer_run.model
    hooks_before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    flags = [p.requires_grad for p in model.parameters()]
    with TestClient(create_app(explorer_run.path, model_obj=model)) as c:
        first = c.get(f"{BASE}/gradcam.json").json()
        assert not first["cached"] and first["seconds"] > 0
        for params in ({"overlay": 0}, {}, {"opacity": 0.2}):
            assert c.get(f"{BASE}/gradcam.png", params=params).status_code == 200
        again = c.get(f"{BASE}/gradcam.json").json()
        assert again["cached"] and again["seconds"] == 0
        assert len(calls) == 1
        c.get(f"{BASE}/gradcam.json", params={"target": "1"})
        c.get(f"{BASE}/gradcam.json", params={"layer": "features.4"})
        c.get("/api/runs/digits/live/sample-4/explain/gradcam.json")
        assert len(calls) == 4
        # concurrent requests for one heatmap compute it once (the second waits for the
        # model's lock, then finds it in the cache)
        codes: list[int] = []
        threads = [
            threading.Thread(
                target=lambda: codes.append(c.get(f"{BASE}/occlusion.png").status_code)
            )
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert codes == [200] * 4 and len(calls) == 5
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == (
        hooks_before
    )
    assert [p.requires_grad for p in model.parameters()] == flags


def test_concept_relevance_equals_concepts(
    client: TestClient,
    explorer_run: ExplorerRun,  # noqa: F811
    x: torch.Tensor,
):
    model = explorer_run.model
    r = client.get(f"{BASE}/concepts.json", params={"layer": "features.4", "top": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    c = XP.concepts(model, x, None, layer="features.4", top=5)
    assert body["layer"] == "features.4" and body["probed"] and body["channels"] == 32
    assert body["target_class"] == int(c.target[0]) and body["composite"] == c.composite
    assert [u["unit"] for u in body["units"]] == c.units[0].tolist()
    rel = [u["relevance"] for u in body["units"]]
    assert rel == pytest.approx(c.unit_relevance[0].tolist(), rel=1e-4, abs=1e-7)
    assert rel == sorted(rel, reverse=True)
    # the units partition the layer's relevance: the total is the sum over all of them
    assert body["total"] == pytest.approx(float(c.relevance[0].sum()), rel=1e-4)
    # each share is signed and of all the relevance that passed, whatever the total's sign
    spread = float(c.relevance[0].abs().sum())
    for u in body["units"]:
        assert u["share"] == pytest.approx(u["relevance"] / spread, rel=1e-4)
        assert (u["share"] > 0) == (u["relevance"] > 0)
    sums = [u["heatmap_sum"] for u in body["units"]]
    assert sums == pytest.approx(c.heatmap_sums[0].tolist(), rel=1e-4, abs=1e-6)

    first = body["units"][0]["unit"]
    rgba = _png(
        client.get(f"{BASE}/concepts/{first}.png", params={"layer": "features.4", "overlay": 0})
    )
    heat = c.heatmaps[0, 0].sum(0).double().numpy()
    assert np.abs(rgba[::14, ::14].astype(int) - _expected_rgba(heat, True)).max() <= 1
    # a unit outside the ranking gets its conditional heatmap too
    last = int(c.relevance[0].argmin())
    rgba = _png(
        client.get(f"{BASE}/concepts/{last}.png", params={"layer": "features.4", "overlay": 0})
    )
    one = XP.concepts(model, x, None, layer="features.4", units=[last])
    heat = one.heatmaps[0, 0].sum(0).double().numpy()
    assert np.abs(rgba[::14, ::14].astype(int) - _expected_rgba(heat, True)).max() <= 1

    # a unit target and the default layer (the last probed spatial one)
    body = client.get(f"{BASE}/concepts.json", params={"target": "features.9:0"}).json()
    # the last spatial layer before the unit's (the relevance must pass the layer)
    assert body["target"] == "features.9:0" and body["layer"] == "features.8"
    body = client.get(f"{BASE}/concepts.json", params={"target": "features.4:3"}).json()
    assert body["layer"] == "features.2"


@pytest.mark.parametrize(
    ("path", "params", "status", "says"),
    [
        ("concepts/32.png", {"layer": "features.4"}, 404, "no unit 32 in layer 'features.4'"),
        ("concepts.json", {"layer": "nope"}, 404, "layer 'nope' is not in the model"),
        ("concepts.json", {"layer": "features.9", "target": "features.4:1"}, 400, "not between"),
        ("concepts.json", {"target": "12"}, 400, "target class 12 is out of range"),
        ("concepts.json", {"top": 0}, 422, "top"),
    ],
)
def test_concepts_bad_input(client: TestClient, path: str, params: dict, status: int, says: str):
    r = client.get(f"{BASE}/{path}", params=params)
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]


def test_concepts_cached(
    explorer_run: ExplorerRun,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    calls: list[Any] = []
    real = XP.concepts

    def counting(*a: Any, **kw: Any) -> Any:
        calls.append(kw.get("units"))
        return real(*a, **kw)

    monkeypatch.setattr(XP, "concepts", counting)
    with TestClient(create_app(explorer_run.path, model_obj=explorer_run.model)) as c:
        q = {"layer": "features.4"}
        ranked = [u["unit"] for u in c.get(f"{BASE}/concepts.json", params=q).json()["units"]]
        assert len(ranked) == 8 and calls == [None]
        assert c.get(f"{BASE}/concepts.json", params={**q, "top": 3}).json()["cached"]
        for u in ranked:
            assert c.get(f"{BASE}/concepts/{u}.png", params=q).status_code == 200
        assert calls == [None]  # the ranked units' maps came with the ranking
        other = next(u for u in range(32) if u not in ranked)
        for _ in range(2):
            assert c.get(f"{BASE}/concepts/{other}.png", params=q).status_code == 200
        assert calls == [None, [other]]


def test_explain_requests_waiting_for_the_model_hold_no_worker_thread(
    explorer_run: ExplorerRun,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    """60 slow explanations in flight (more than the 40 worker threads): a run-summary
    request sent after them still answers before all but a few of them (as for the live
    routes)."""
    import time

    import lurker.server.routes.explain as routes

    started = threading.Event()

    def slow(
        s: Any, model: Any, x: Any, method: str, target: str, layer: Any, instead: Any = None
    ) -> Any:
        started.set()  # called under the model's lock, as a real attribution is
        time.sleep(0.05)
        return routes.Result(torch.zeros(16, 16), True, target, 0, layer, None, {}, 0.05)

    app = create_app(explorer_run.path, model_obj=explorer_run.model)
    monkeypatch.setattr(routes, "_compute", slow)

    def url(i: int) -> str:  # distinct (image, target, kind): no cache hits
        kind = ("json", "png")[i % 2]
        return f"/api/runs/digits/live/sample-{i // 10}/explain/saliency.{kind}?target={i % 10}"

    assert summary_rank_behind(app, url, started) < 10


def test_a_zero_gradcam_and_a_relu_rule_without_relus_say_so(tmp_path, x):
    """On a ViT the page showed Grad-CAM after the last attention as an empty map (min 0,
    max 0) and guided backprop and deconvnet as two maps of their own, both the plain
    gradient. The JSON now carries the method's warning as ``notes`` (kept in the run's
    cache with the heatmap); the numbers are lurker.explain's, checked against autograd:
    the class token's head gets no gradient from the patch tokens after the last
    attention, and the ReLU rules' map is the gradient."""
    from lurker.probe import probe
    from models_zoo import DigitsViT

    torch.manual_seed(0)
    model = DigitsViT().eval()
    torch.save(model.state_dict(), tmp_path / "vit.pt")
    data = load_dataset("digits:test", 16, channels=1)
    meta = {"model_spec": "models_zoo:DigitsViT", "weights": str(tmp_path / "vit.pt")}
    run = probe(
        model, data, out=tmp_path / "vit", k=3, batch_size=128, progress=False,
        meta={**meta, "data": "digits:test"},
    )  # fmt: skip
    assert run is not None
    run.close()
    last = "vit.encoder.layers.encoder_layer_1"
    base = f"/api/runs/vit/live/sample-{SAMPLE}/explain"
    for fresh in (False, True):  # computed, then read back from the run's cache by a new server
        with TestClient(create_app(tmp_path / "vit")) as c:  # the run's own model: cached
            cam = c.get(f"{base}/gradcam", params={"layer": last}).json()
            assert cam["cached"] is fresh and cam["max"] == 0
            assert [n for n in cam["notes"] if "is 0 everywhere" in n], cam["notes"]
            default = c.get(f"{base}/gradcam").json()
            assert default["cached"] is fresh and default["max"] > 0 and default["notes"] == []
            # the default is Python's: the last block's first norm (pytorch-grad-cam's
            # recipe), not a probed layer (the page used the block before it)
            assert default["layer"] == default_layer(model, x)
            assert default["layer_module"] == "vit.encoder.layers.encoder_layer_1.ln_1"
            assert c.get("/api/runs/vit/explain/methods").json()["default_layer"] is None
            for method in ("guided_backprop", "deconvnet"):
                r = c.get(f"{base}/{method}").json()
                assert any("runs no ReLU" in n for n in r["notes"]), r
            assert c.get(f"{base}/saliency").json()["notes"] == []
    xi = x.clone().requires_grad_(True)
    seen: list[torch.Tensor] = []
    h = model.get_submodule(last).register_forward_hook(lambda m, i, o: seen.append(o))
    score = model(xi)[0, cam["target_class"]]
    h.remove()
    g_tokens, g_x = torch.autograd.grad(score, [seen[0], xi])
    assert g_tokens[:, 1:].abs().amax() == 0 and g_tokens[:, 0].abs().amax() > 0
    assert abs(r["sum"] - float(g_x.sum())) <= 1e-4 * float(g_x.abs().sum())  # deconvnet
    # the explorer's default Grad-CAM is lurker.explain's: same layer, same heatmap
    want = XP.explain(model, x, target=cam["target_class"], method="gradcam")
    assert default["layer"] == want.options["layer"] == default_layer(model, x)
    assert lurker.trace(model, x)[want.options["layer"]].module.endswith("encoder_layer_1.ln_1")
    heat = want.heatmap(0).double()
    assert default["sum"] == pytest.approx(float(heat.sum()), rel=1e-4, abs=1e-6)
    assert default["max"] == pytest.approx(float(heat.max()), rel=1e-4, abs=1e-7)


def test_a_cnns_explanations_have_no_notes(client: TestClient):
    for method in ("gradcam", "guided_backprop", "saliency"):
        assert client.get(f"{BASE}/{method}").json()["notes"] == []


def test_notes_are_collected_per_thread_and_leave_warnings_as_they_were():
    """The server collects a method's warnings as its notes. It did that with
    ``warnings.catch_warnings``, whose process-wide state two concurrent requests restore
    out of order (leaving one request's recorder installed for good); ``collected`` is per
    thread: each thread gets its own messages, nothing is shown, and a warning outside
    any block is a plain warning again."""
    import threading
    import warnings

    from lurker.errors import collected, warn

    got: dict[int, list[str]] = {}
    ready = threading.Barrier(2)

    def work(i: int) -> None:
        with collected() as said:
            ready.wait()  # both blocks open at once
            warn(f"note {i}")
            warn(f"note {i}")  # said once
            ready.wait()
        got[i] = said

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == {0: ["note 0"], 1: ["note 1"]}
        assert shown == []
        warn("after")
        assert [str(w.message) for w in shown] == ["after"]


class _TokenMeanNet(torch.nn.Module):
    """A transformer on 4x4 patches whose head averages every token (as Swin's does),
    with no class token: after its last attention every token still reaches the target."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(1, 16, 4, stride=4)
        self.block = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 16 tokens, 16)
        return self.head(self.norm(self.block(t)).mean(1))


def test_default_gradcam_layer_of_a_token_averaging_head_is_its_last_map(tmp_path, x):
    """The page's default Grad-CAM layer skipped every layer after the last attention,
    right for a class-token head (ViT, test above) but not for a head that averages all
    tokens (Swin): its last stage was never the default. Oracle: lurker.explain's own
    default layer, the last map the target's gradient reaches, and that gradient."""
    from lurker.probe import probe

    torch.manual_seed(0)
    model = _TokenMeanNet().eval()
    data = load_dataset("digits:test", 16, channels=1)
    run = probe(
        model, data, out=tmp_path / "tm", k=3, batch_size=128, progress=False,
        meta={"data": "digits:test"},
    )  # fmt: skip
    assert run is not None
    run.close()
    from lurker.explain.gradcam import layer_and_grad

    with TestClient(create_app(tmp_path / "tm", model_obj=model)) as c:
        doc = c.get("/api/runs/tm/explain/methods").json()
        cam = c.get(f"/api/runs/tm/live/sample-{SAMPLE}/explain/gradcam").json()
    # concept relevance: the last probed map (the block's ReLU, after the attention; before
    # a fix: "embed"); Grad-CAM: lurker.explain's own, the last map (the final norm)
    assert doc["concept_layer"] == "relu_1" and doc["default_layer"] is None
    assert cam["layer"] == default_layer(model, x) and cam["max"] > 0
    assert cam["layer_module"] == "norm"
    _, g, _, _ = layer_and_grad(model, x, cam["target_class"], cam["layer"])
    assert g.shape[-2:] == (4, 4) and bool((g.abs().amax(1) > 0).all())  # every token reaches
    heat = _oracle(model, x, "gradcam", cam["target_class"], cam["options"]).heatmap(0)
    assert cam["sum"] == pytest.approx(float(heat.sum()), rel=1e-4, abs=1e-4)
    assert cam["max"] == pytest.approx(float(heat.max()), rel=1e-4, abs=1e-6)


def _cam_model(signal: bool) -> torch.nn.Module:
    """Maps of several positions (a conv, its ReLU), a map of one position (a global pool,
    a 1x1 conv over it) and flat units (the head): on images or along a signal's time."""
    conv, pool = (
        (torch.nn.Conv1d, torch.nn.AdaptiveAvgPool1d)
        if signal
        else (torch.nn.Conv2d, torch.nn.AdaptiveAvgPool2d)
    )
    torch.manual_seed(0)
    return torch.nn.Sequential(
        conv(3, 4, 3, padding=1), torch.nn.ReLU(), pool(1), conv(4, 3, 1),
        torch.nn.Flatten(), torch.nn.Linear(3, 2),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("signal", [False, True], ids=["image", "signal"])
def test_the_pages_layers_are_lurker_explains_grad_cam_layers_by_one_rule(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, signal: bool
):
    """The Explain page's layer list (explain/methods ``layers``) and the layers
    ``lurker.explain``'s Grad-CAM can be taken at come from one rule
    (``Layout.makes_map``): the probed layers whose op Grad-CAM's trace lists, the 1x1 map
    and the flat head left out. Before, the server kept a copy of the rule: a rule changed
    in one place (here patched to take a map of one position) changed only one list."""
    from torch.utils.data import TensorDataset

    from lurker.explain.gradcam import _map_layers
    from lurker.probe import probe
    from lurker.probe.layout import Layout

    model = _cam_model(signal)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(20, 3, 24, generator=g) if signal else torch.randn(20, 3, 8, 8, generator=g)
    run = probe(model, TensorDataset(xs, torch.arange(20) % 2), out=tmp_path / "r", k=3,
                batch_size=10, progress=False)  # fmt: skip
    assert run is not None
    ops = {info.name: info.op for info in run.layers}
    run.close()

    def lists() -> tuple[list[str], list[str]]:
        with TestClient(create_app(tmp_path / "r")) as c:  # a new server: nothing kept
            page = c.get("/api/runs/r/explain/methods").json()["layers"]
        cam = set(_map_layers(model, xs[:1], signal)[1])
        return page, [name for name, op in ops.items() if op in cam]

    page, cam = lists()
    assert page == cam and len(page) == 2  # the conv and its ReLU; not the 1x1 map, the head
    assert len(ops) == 4  # the pool is not probed

    def any_map(self: Layout, shape: Any, line: bool = False) -> bool:
        return (self.line_shape(shape) if line else self.map_shape(shape)) is not None

    monkeypatch.setattr(Layout, "makes_map", any_map)  # a map of one position counts too
    page, cam = lists()
    assert page == cam and len(page) == 3  # the 1x1 conv joins both lists


def _breaks(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the digits model (the run's own: the same fingerprint) whose forward raises
    its own error (as one out of memory would) where it is asked for a gradient: every
    explanation, not the first look at the input."""
    import copy

    broken = copy.deepcopy(model)
    forward = broken.forward

    def breaking(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("boom in forward")
        return forward(x)

    broken.forward = breaking  # type: ignore[method-assign]
    return broken


def test_the_models_own_error_is_one_line_naming_what_failed(explorer_run: ExplorerRun):  # noqa: F811
    """Each endpoint that runs the model says its error the one way (``errors.model_failed``):
    400, what failed, the exception's type and message; never a traceback."""
    app = create_app(explorer_run.path, model_obj=_breaks(explorer_run.model))
    with TestClient(app) as c:
        for method, what in (("saliency", "saliency"), ("gradcam", "Grad-CAM")):
            r = c.get(f"{BASE}/{method}")
            assert r.status_code == 400, r.text
            assert (
                r.json()["detail"] == f"{what} failed on this input: RuntimeError: boom in forward"
            )
        r = c.get(f"{BASE}/concepts")
        assert r.status_code == 400, r.text
        assert r.json()["detail"] == (
            "concept relevance failed on this input: RuntimeError: boom in forward"
        )
