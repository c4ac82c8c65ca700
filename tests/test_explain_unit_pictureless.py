"""A unit target (``LAYER:CHANNEL``) on inputs with no picture: token ids, feature vectors
and 1-D signals. The unit's score is its activation averaged over its positions (tokens,
time steps), as on images. Before, a unit target on token ids was refused ("not supported
on token ids yet"); now it is attributed at the embedding's output as a class target is,
checked against Captum's LayerIntegratedGradients / IntegratedGradients with a forward
that returns the hooked unit's mean, autograd by hand and IG's completeness."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lurker
from explorer_fixtures import get_json, served_run, skip_without_browser, strict_page
from lurker.errors import LurkerError
from test_explain_signals import _model as _signal_model
from test_explain_signals import _x as _signal_x
from test_explain_tokens import ConvText, TransformerText, _ids
from test_explain_tokens import _model as _text_model

#: (model, unit layer, channel) on token ids: a conv's (B, C, L), an encoder layer's (B, L, D)
TEXT_UNITS = [(ConvText, "conv", 2), (TransformerText, "encoder.layers.1", 5)]


def _unit_mean(model: nn.Module, layer: str, channel: int, run: Any) -> torch.Tensor:
    """``run()``'s forward of ``model`` with ``layer``'s unit ``channel`` averaged over its
    positions, read by a forward hook (the oracle's own reduction): channels on axis 1 of a
    conv's output, on the last axis of a batch-first encoder layer's."""
    got = {}
    module = dict(model.named_modules())[layer]
    h = module.register_forward_hook(lambda m, i, o: got.__setitem__("a", o))
    try:
        run()
    finally:
        h.remove()
    a = got["a"]
    a = a[..., channel] if isinstance(module, nn.TransformerEncoderLayer) else a[:, channel]
    return a.reshape(a.shape[0], -1).mean(1)


@pytest.mark.parametrize(("kind", "layer", "channel"), TEXT_UNITS)
def test_a_unit_on_token_ids_equals_captum_layer_ig(kind: type, layer: str, channel: int):
    captum_attr = pytest.importorskip("captum.attr")
    model, ids = _text_model(kind), _ids()
    e = lurker.explain(
        model, ids, target=(layer, channel), method="integrated_gradients", baseline=0, n_steps=64
    )

    def f(i: torch.Tensor) -> torch.Tensor:
        return _unit_mean(model, layer, channel, lambda: model(i))

    lig = captum_attr.LayerIntegratedGradients(f, model.embedding)
    ref = lig.attribute(ids, baselines=torch.zeros_like(ids), n_steps=64).detach()
    assert e.attribution.shape == ids.shape
    torch.testing.assert_close(e.layer_attribution, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(e.attribution, ref.sum(-1), atol=1e-6, rtol=1e-5)
    assert str(e.target) == f"{layer}:{channel}"


@pytest.mark.parametrize(("kind", "layer", "channel"), TEXT_UNITS)
def test_a_unit_on_token_ids_is_the_autograd_gradient_at_the_embedding(
    kind: type, layer: str, channel: int
):
    model, ids = _text_model(kind), _ids()
    kept = {}

    def keep(m: nn.Module, i: Any, o: torch.Tensor) -> None:
        o.retain_grad()
        kept["e"] = o

    h = model.embedding.register_forward_hook(keep)
    try:
        _unit_mean(model, layer, channel, lambda: model(ids)).sum().backward()
    finally:
        h.remove()
    model.zero_grad(set_to_none=True)
    emb, grad = kept["e"].detach(), kept["e"].grad
    ixg = lurker.explain(model, ids, target=(layer, channel), method="input_x_gradient")
    torch.testing.assert_close(ixg.attribution, (emb * grad).sum(-1), atol=1e-8, rtol=1e-6)
    sal = lurker.explain(model, ids, target=(layer, channel), method="saliency")
    torch.testing.assert_close(sal.attribution, grad.norm(dim=-1), atol=1e-8, rtol=1e-6)
    # completeness: the tokens' scores sum to the unit's mean at the ids minus at zeros
    ig = lurker.explain(model, ids, target=(layer, channel), method="integrated_gradients")
    at_x = _unit_mean(model, layer, channel, lambda: model(ids)).detach()
    assert float(ig.delta.abs().max()) < 1e-3 * max(1.0, float(at_x.abs().max()))


def test_bad_units_on_token_ids_name_the_models_layers():
    model, ids = _text_model(ConvText), _ids()
    with pytest.raises(
        LurkerError, match=r"'nope' is not in the model.*modules: embedding, conv, fc"
    ):
        lurker.explain(model, ids, target=("nope", 0))
    with pytest.raises(LurkerError, match=r"channel 6 is out of range; conv has 6 channels"):
        lurker.explain(model, ids, target=("conv", 6))
    # the lookup itself comes before the attributed embedding output: no gradient to give
    with pytest.raises(LurkerError, match=r"does not depend on the embedding's output.*conv"):
        lurker.explain(model, ids, target=("embedding", 0))
    model = _text_model(TransformerText)  # learned positions: beside the ids' lookup
    with pytest.raises(LurkerError, match=r"'position'.*does not depend on the"):
        lurker.explain(model, ids, target=("position", 0), method="integrated_gradients")


def test_a_unit_on_a_signal_and_a_feature_vector_equals_captum_ig():
    captum_attr = pytest.importorskip("captum.attr")
    model, x = _signal_model(), _signal_x()
    for layer, channel in (("3", 2), ("0", 1)):
        e = lurker.explain(model, x, target=(layer, channel), method="integrated_gradients")

        def f(xb: torch.Tensor, layer: str = layer, channel: int = channel) -> torch.Tensor:
            return _unit_mean(model, layer, channel, lambda: model(xb))

        ref = captum_attr.IntegratedGradients(f).attribute(x, n_steps=50, method="gausslegendre")
        torch.testing.assert_close(e.attribution, ref.detach(), atol=1e-5, rtol=1e-5)
        assert e.signal(0).shape == x.shape[1:]
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    xf = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    e = lurker.explain(mlp, xf, target=("1", 4), method="integrated_gradients", n_steps=64)
    ref = captum_attr.IntegratedGradients(lambda xb: mlp[1](mlp[0](xb))[:, 4]).attribute(
        xf, n_steps=64
    )
    torch.testing.assert_close(e.attribution, ref.detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(LurkerError, match=r"channel 8 is out of range; 1 has 8 channels"):
        lurker.explain(mlp, xf, target=("1", 8))


# ------------------------------------------------------------------ the server


class Text(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(block, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(1))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randint(0, 20, (24, 8), generator=g), torch.arange(24) % 2)
    root: Path = tmp_path_factory.mktemp("unit-text")
    with served_run(root, "text", Text().eval(), data, "enc.layers.1.norm2", 4) as s:
        yield s


def test_the_server_explains_a_unit_of_a_token_run_as_python_does(served: dict):
    import httpx2 as httpx

    model, data, url = served["model"], served["data"], served["url"]
    ids = data.tensors[0][5][None]
    base = f"{url}/api/runs/text/live/sample-5/explain"
    doc = get_json(f"{base}/integrated_gradients.json?target=enc.layers.1.norm2:3")
    ours = lurker.explain(model, ids, ("enc.layers.1.norm2", 3), method="integrated_gradients")
    assert doc["scores"] == pytest.approx(ours.attribution[0].tolist(), abs=1e-5)
    assert doc["target"] == "enc.layers.1.norm2:3" and doc["target_class"] is None
    assert doc["delta"] == pytest.approx(float(ours.delta[0]), abs=1e-5)
    r = httpx.get(f"{base}/saliency.json?target=enc.layers.1.norm2:16")
    assert r.status_code == 400 and "channel 16 is out of range" in r.json()["detail"]
    r = httpx.get(f"{base}/saliency.json?target=nope:1")
    assert r.status_code == 404 and "enc.layers.1.norm2" in r.json()["detail"]
    r = httpx.get(f"{base}/saliency.json?target=emb:1")
    assert r.status_code == 400 and "does not depend on the embedding" in r.json()["detail"]


def test_the_explain_page_takes_a_unit_on_a_token_run(browser: Any, served: dict):
    """The Explain page of a token run has a unit field (was: classes only): a typed unit
    colours each token by the server's score for that unit, links the unit's page, and no
    class button is pressed."""
    skip_without_browser()
    url = served["url"]
    with strict_page(browser) as pg:
        pg.goto(f"{url}/#/r/text/explain?image=sample-5")
        pg.wait_for_selector(".token-explain-card[data-method='saliency'] .tok")
        pg.fill("#explain-unit", "enc.layers.1.norm2:3")
        pg.press("#explain-unit", "Enter")
        pg.wait_for_selector("#explain-unit-page")
        card = ".token-explain-card[data-method='integrated_gradients']"
        pg.wait_for_selector(f"{card} .tok[data-score]")
        doc = get_json(
            f"{url}/api/runs/text/live/sample-5/explain/integrated_gradients.json"
            "?target=enc.layers.1.norm2:3"
        )
        shown = [
            float(v)
            for v in pg.eval_on_selector_all(f"{card} .tok", "e => e.map(t => t.dataset.score)")
        ]
        assert shown == pytest.approx(doc["scores"], abs=1e-6)
        assert pg.locator(".target-list button[aria-pressed='true']").count() == 0
        assert pg.get_attribute("#explain-unit-page", "href").endswith("/unit/enc.layers.1.norm2/3")
        pg.screenshot(path="/tmp/qf66_/unit.png", full_page=True)


# ------------------------------------------------------------------ a module run twice


class Twice(nn.Module):
    """``lin`` runs twice (``lin(relu(lin(e)))``): each call has its own units."""

    def __init__(self, ids: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 8) if ids else nn.Identity()
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin(torch.relu(self.lin(self.embedding(x)))).mean(1))


def _twice_unit(model: Twice, e: torch.Tensor, call: str, channel: int) -> torch.Tensor:
    """The oracle: the forward written out by hand from the embedding's output ``e``,
    returning the chosen call's unit averaged over the tokens."""
    first = model.lin(e)
    a = {"lin:1": first, "relu_1": torch.relu(first), "lin:2": model.lin(torch.relu(first))}
    return a[call][..., channel].mean(1)


def _twice(ids: bool) -> tuple[Twice, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 20, (3, 6), generator=g) if ids else torch.randn(3, 6, 8, generator=g)
    return Twice(ids).eval(), x


@pytest.mark.parametrize("ids", [True, False], ids=["token-ids", "floats"])
def test_a_module_run_twice_is_refused_naming_each_calls_label(ids: bool):
    """Was: scored on its first call without a word (the hook stopped the forward there)."""
    model, x = _twice(ids)
    with pytest.raises(LurkerError, match=r"'lin' runs 2 times.*lin:1 \(op linear_1:1\), lin:2"):
        lurker.explain(model, x, target=("lin", 1), method="saliency")


@pytest.mark.parametrize("call", ["lin:1", "relu_1", "lin:2"])
@pytest.mark.parametrize("ids", [True, False], ids=["token-ids", "floats"])
def test_each_call_of_a_module_run_twice_is_its_own_target(ids: bool, call: str):
    """A call's trace label (and a functional op's, ``relu_1``) is a unit target on token
    ids too (was refused: module paths only), scored on that very call. Oracle: autograd
    through the forward written out by hand."""
    model, x = _twice(ids)
    e = (model.embedding(x) if ids else x).detach().requires_grad_()
    (grad,) = torch.autograd.grad(_twice_unit(model, e, call, 1).sum(), e)
    ixg = lurker.explain(model, x, target=(call, 1), method="input_x_gradient")
    want = (e.detach() * grad).sum(-1) if ids else e.detach() * grad
    torch.testing.assert_close(ixg.attribution, want, atol=1e-7, rtol=1e-5)
    if ids:  # and Captum's layer IG of the hand-written unit at the embedding
        captum_attr = pytest.importorskip("captum.attr")

        def f(i: torch.Tensor) -> torch.Tensor:
            return _twice_unit(model, model.embedding(i), call, 1)

        ref = captum_attr.LayerIntegratedGradients(f, model.embedding).attribute(
            x, baselines=torch.zeros_like(x), n_steps=64
        )
        ig = lurker.explain(
            model, x, target=(call, 1), method="integrated_gradients", baseline=0, n_steps=64
        )
        torch.testing.assert_close(ig.layer_attribution, ref.detach(), atol=1e-6, rtol=1e-5)


def test_every_probed_layer_of_a_token_run_is_a_unit_target_of_the_server(tmp_path: Path):
    """The Explain page suggests the run's probed layers as units; on token ids 3 of 4 were
    refused (trace labels: a call of a module run twice, a functional op), the message
    naming the asked ``lin:1`` as ``linear_1:1``."""
    from fastapi.testclient import TestClient
    from torch.utils.data import TensorDataset

    from lurker.probe import probe
    from lurker.server import create_app

    model, _ = _twice(True)
    data = TensorDataset(torch.randint(0, 20, (12, 6)), torch.arange(12) % 3)
    probe(model, data, out=tmp_path / "r", k=3, batch_size=4, progress=False).close()
    c = TestClient(create_app(tmp_path / "r", model_obj=model, dataset=data))
    names = [i["name"] for i in c.get("/api/runs/r").json()["layers"]]
    assert {"lin:1", "relu_1", "lin:2"} <= set(names)
    base = "/api/runs/r/live/sample-2/explain/input_x_gradient.json"
    for name in names:
        r = c.get(base, params={"target": f"{name}:0"})
        assert r.status_code == 200, (name, r.json())
        assert r.json()["target"] == f"{name}:0"
    ids = data.tensors[0][2][None]
    r = c.get(base, params={"target": "lin:2:1"}).json()
    ours = lurker.explain(model, ids, target=("lin:2", 1), method="input_x_gradient")
    assert r["scores"] == pytest.approx(ours.attribution[0].tolist(), abs=1e-6)
    r = c.get(base, params={"target": "lin:1:9"})
    assert r.status_code == 400
    assert "channel 9 is out of range; lin:1 has 8 channels" in r.json()["detail"]
    assert "linear_1" not in r.json()["detail"]
