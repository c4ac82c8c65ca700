"""Attention written out by hand (``q @ kᵀ``, a scale, a mask or bias, a softmax, ``@ v``):
which softmax ops are attention, read off the graph alone
(:func:`lurker.graph.attention.attention_softmaxes`), and the live view's weights for them
(``GET .../live/IMAGE/ops/SOFTMAX/attention``), which are the softmax's own output.

Oracles: the softmax outputs a plain forward makes (recorded by a TorchFunctionMode, not
by lurker), numpy's softmax of the scores made by hand from the projections a forward
hook saw (minGPT's causal attention; a Swin block's windows, with its relative position
bias), and the patch embedding's grid (key token t is patch t - 1 in a timm ViT).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from torch import nn
from torch.overrides import TorchFunctionMode

import lurker
from lurker.graph import Graph
from lurker.graph.attention import attention_softmaxes

SAMPLE = 3


class GPTAttention(nn.Module):
    """minGPT's CausalSelfAttention, as written there."""

    def __init__(self, n_embd: int = 16, n_head: int = 2, block: int = 10) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(0.1)
        self.n_head, self.n_embd = n_head, n_embd
        tril = torch.tril(torch.ones(block, block)).view(1, 1, block, block)
        self.register_buffer("bias", tril)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MiniGPT(nn.Module):
    """Token ids through one minGPT block; the class scores of the last token, through a
    softmax (a classifier's: not attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(20, 16), nn.Embedding(10, 16)
        self.attn = GPTAttention()
        self.mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        x = x + self.attn(x)
        return F.softmax(self.head(self.mlp(x)[:, -1]), dim=-1)


class MoE(nn.Module):
    """A mixture of experts: a gate's softmax (a learned matrix times the tokens, over the
    experts) weighs the experts' outputs with an einsum, and a classifier's softmax ends
    it. Neither softmax is attention."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.w_gate = nn.Parameter(torch.randn(16, 4))
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
        self.router = nn.Linear(16, 4)
        self.head = nn.Linear(16, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        outs = torch.stack([e(x) for e in self.experts], dim=2)  # (B, T, E, C)
        gate = F.softmax(x @ self.w_gate, dim=-1)  # (B, T, E)
        y = torch.einsum("bte,betc->btc", gate, outs.transpose(1, 2))
        gate2 = torch.softmax(self.router(y), -1)  # a linear router
        y = y + torch.matmul(gate2.unsqueeze(-2), outs).squeeze(-2)
        return F.softmax(self.head(y.mean(1)), dim=-1)


def small_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 2],
        window_size=[4, 4], num_classes=10,
    ).eval()  # fmt: skip


def timm_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, in_chans=1,
        embed_dim=16, depth=2, num_heads=2, num_classes=10,
    )  # fmt: skip
    for block in vit.blocks:
        block.attn.fused_attn = False
    return vit.eval()


def _labels(tr: Any) -> dict[str, Any]:
    return {tr.ops[i].label: a for i, a in attention_softmaxes(tr).items()}


def _softmaxes(tr: Any) -> list[str]:
    return [op.label for op in tr if op.name == "softmax"]


def test_mingpt_attention_softmax_but_not_its_classifier():
    tr = lurker.trace(MiniGPT().eval(), torch.randint(0, 20, (1, 10)))
    assert _softmaxes(tr) == ["softmax_1", "softmax_2"]
    found = _labels(tr)
    assert list(found) == ["softmax_1"]  # softmax_2 is the classifier's
    a = found["softmax_1"]
    assert tr.ops[a.scores].name == tr.ops[a.values].name == "matmul"
    assert tr.ops[a.scores].index < a.softmax < a.values
    # q (1, 2, T, 8) on its axis 2; kᵀ (1, 2, 8, T) on its axis 3; then the dropout
    assert (a.query_axis, a.key_axis) == (2, 3)
    assert tr.ops[a.query.index].outputs[0].shape == (1, 2, 10, 8)
    assert tr.ops[a.key.index].name == "transpose"
    assert [tr.ops[i].name for i in a.between] == ["dropout"]
    # the graph read back from JSON (the run's stored graph) answers the same
    assert attention_softmaxes(Graph.from_json(tr.to_json())) == attention_softmaxes(tr)


def test_swin_window_attention_with_its_bias_and_shift_mask():
    """torchvision's Swin: q·scale @ kᵀ, a relative position bias added, in the shifted
    blocks a mask added through a view that unfolds the windows; every block's softmax."""
    tr = lurker.trace(small_swin(), torch.randn(1, 3, 32, 32))
    found = _labels(tr)
    assert list(found) == _softmaxes(tr) and len(found) == 4
    for a in found.values():
        assert tr.ops[a.softmax].outputs[0].shape[1:] == (2, 16, 16)
        assert tr.ops[a.values].name == "matmul" and tr.ops[a.values].module.endswith(".attn")


def test_timm_vit_without_fused_attention():
    tr = lurker.trace(timm_vit(), torch.randn(1, 1, 16, 16))
    assert list(_labels(tr)) == _softmaxes(tr) == ["softmax_1", "softmax_2"]


def test_gates_classifiers_and_fused_attention_are_not_attention_softmaxes():
    """A mixture of experts' gates (a parameter times the tokens; a linear router) and
    classifier softmaxes weigh things, but not values by q·kᵀ: none is attention. A model
    with scaled_dot_product_attention calls has no softmax op to call attention."""
    from models_zoo import DigitsViT

    tr = lurker.trace(MoE().eval(), torch.randint(0, 20, (1, 10)))
    assert len(_softmaxes(tr)) == 3 and attention_softmaxes(tr) == {}
    tr = lurker.trace(DigitsViT().eval(), torch.randn(1, 1, 16, 16))
    assert attention_softmaxes(tr) == {}
    assert sum(op.name == "scaled_dot_product_attention" for op in tr) == 2


class _Softmaxes(TorchFunctionMode):
    """The output of every softmax a plain forward runs, in order (lurker takes no part)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") == "softmax":
            self.seen.append(out.detach().clone())
        return out


def _forward_softmaxes(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    mode = _Softmaxes()
    with torch.no_grad(), mode:
        model(x[None])
    return [t.numpy() for t in mode.seen]


def _probe(root: Path, rid: str, model: nn.Module, data: Any) -> Path:
    from lurker.probe import probe

    run = probe(model, data, out=root / rid, k=3, batch_size=64, progress=False)
    assert run is not None
    run.close()
    return root / rid


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from torch.utils.data import TensorDataset

    from lurker.probe.data import load_dataset
    from lurker.server import create_app

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (24, 10), generator=g)
    torch.manual_seed(0)
    models = {
        "gpt": (MiniGPT().eval(), TensorDataset(ids, torch.randint(0, 3, (24,), generator=g))),
        "swin": (small_swin(), load_dataset("digits:test", 32, channels=3)),
    }
    root = tmp_path_factory.mktemp("written-attention")
    out: dict[str, Any] = {}
    for rid, (model, data) in models.items():
        app = create_app(_probe(root, rid, model, data), model_obj=model, dataset=data)
        out[rid], out[f"{rid}_data"], out[f"{rid}_client"] = model, data, TestClient(app)
    yield out


def _get(client: TestClient, rid: str, op: str, **query: Any) -> dict[str, Any]:
    r = client.get(f"/api/runs/{rid}/live/sample-{SAMPLE}/ops/{op}/attention", params=query)
    assert r.status_code == 200, r.text
    return r.json()


def _values(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows])


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_mingpt_weights_are_its_causal_softmax_by_hand(served: dict[str, Any]):
    """Each head's weights equal numpy's causal softmax of q kᵀ / sqrt(8) from the
    projection a hook saw; the card claims no scale or causality it cannot know (both
    come from the model's own code), says the weights are the softmax's output, and
    starts at the last query, as every weight after a query is 0 on this input."""
    model, client = served["gpt"], served["gpt_client"]
    seen: list[torch.Tensor] = []
    hook = model.attn.c_attn.register_forward_hook(lambda m, i, o: seen.append(o))
    ids = served["gpt_data"][SAMPLE][0]
    with torch.no_grad():
        model(ids[None])
    hook.remove()
    q, k, _ = seen[0][0].double().numpy().reshape(10, 3, 2, 8).transpose(1, 2, 0, 3)
    s = np.where(np.tril(np.ones((10, 10), bool)), q @ k.transpose(0, 2, 1) / math.sqrt(8), -np.inf)
    want = _softmax(s)
    doc = _get(client, "gpt", "softmax_1")
    assert (doc["name"], doc["heads"], doc["queries"], doc["keys"]) == ("softmax", 2, 10, 10)
    assert doc["scale"] is None and doc["causal"] is False and doc["mask"] is None
    assert (doc["windows"], doc["window"]) == (1, None)
    assert (doc["scores_op"], doc["values_op"]) == ("matmul_1", "matmul_2")
    assert (
        "output of softmax_1" in doc["notes"][0] and "as the model computed it" in doc["notes"][0]
    )
    assert any("dropout_1 (dropout, p = 0.1)" in n for n in doc["notes"])
    assert any("weight 0 on the keys after it" in n for n in doc["notes"])
    assert doc["query"] == 9 and doc["patches"] is None and "token ids" in doc["patches_note"]
    np.testing.assert_allclose(_values(doc["rows"]), want[:, 9], atol=1e-6)
    np.testing.assert_allclose(_values(doc["matrix"]), want.mean(0), atol=1e-6)
    doc = _get(client, "gpt", "softmax_1", head=1, query=4)
    np.testing.assert_allclose(_values(doc["matrix"]), want[1], atol=1e-6)
    assert doc["rows"][0][5:] == [0.0] * 5
    # the classifier's softmax is no attention, and is said not to be
    r = client.get(f"/api/runs/gpt/live/sample-{SAMPLE}/ops/softmax_2/attention")
    assert r.status_code == 404 and "this softmax is not one" in r.json()["detail"]
    # the graph view marks the attention softmax for the text page's chooser
    nodes = {n["l"]: n for n in client.get("/api/runs/gpt/graph").json()["nodes"]}
    assert nodes["softmax_1"].get("a") == 1 and "a" not in nodes["softmax_2"]


def _swin_block0_by_hand(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Block 0's weights (4 windows, 2 heads, 16, 16) by hand: the 8x8 map a hook saw cut
    into 4x4 windows (row-major), q·scale @ kᵀ plus the relative position bias, softmax."""
    attn = model.features[1][0].attn
    seen: list[torch.Tensor] = []
    hook = attn.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(x[None])
        hook.remove()
        bias = attn.get_relative_position_bias()[0].detach().double().numpy()  # (heads, 16, 16)
    m = seen[0][0].double().numpy()  # (8, 8, 24)
    wins = m.reshape(2, 4, 2, 4, 24).transpose(0, 2, 1, 3, 4).reshape(4, 16, 24)
    w, b = (p.detach().double().numpy() for p in (attn.qkv.weight, attn.qkv.bias))
    qkv = (wins @ w.T + b).reshape(4, 16, 3, 2, 12).transpose(2, 0, 3, 1, 4)
    q, k = qkv[0] * 12**-0.5, qkv[1]
    return _softmax(q @ k.transpose(0, 1, 3, 2) + bias)


def test_swin_windows_are_served_one_at_a_time(served: dict[str, Any]):
    """Swin's 4 windows (folded into the batch axis for one image) are each their own
    attention: window W's weights equal the hand-made ones and the softmax a plain
    forward makes, the mean is over one window's heads, and the card says so."""
    model, client = served["swin"], served["swin_client"]
    x = served["swin_data"][SAMPLE][0]
    want = _swin_block0_by_hand(model, x)
    forward = _forward_softmaxes(model, x)
    np.testing.assert_allclose(forward[0], want, atol=1e-5)  # the oracles agree
    doc = _get(client, "swin", "softmax_1")
    assert (doc["windows"], doc["window"], doc["heads"], doc["queries"]) == (4, 0, 2, 16)
    assert any("4 sequences for this one input: windows" in n for n in doc["notes"])
    # placed on the image (window 0: the top-left 4x4 patches; tests/test_live_attention_windows.py)
    assert doc["patches"]["window"] is True and doc["patches_note"] is None
    assert doc["patches"]["keys"][:5] == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]]
    for window in range(4):
        for head in (None, 1):
            query = {} if head is None else {"head": head}
            doc = _get(client, "swin", "softmax_1", window=window, query=5, **query)
            assert doc["window"] == window
            np.testing.assert_allclose(_values(doc["rows"]), want[window, :, 5], atol=1e-5)
            m = want[window].mean(0) if head is None else want[window, head]
            np.testing.assert_allclose(_values(doc["matrix"]), m, atol=1e-5)
    # the shifted block (its mask added through a view) and the last stage (one window)
    for op, i in (("softmax_2", 1), ("softmax_4", 3)):
        doc = _get(client, "swin", op, window=forward[i].shape[0] - 1, head=0)
        np.testing.assert_allclose(_values(doc["matrix"]), forward[i][-1, 0], atol=1e-5)
    assert _get(client, "swin", "softmax_4")["windows"] == 1
    base = f"/api/runs/swin/live/sample-{SAMPLE}/ops"
    assert client.get(f"{base}/softmax_1").json()["attention"] is True  # the live op's flag
    assert client.get(f"{base}/matmul_1").json()["attention"] is False
    r = client.get(f"{base}/softmax_1/attention?window=4")
    assert r.status_code == 404 and "0..3" in r.json()["detail"]


def test_timm_vit_weights_on_the_patch_grid(tmp_path: Path):
    """A timm ViT with fused_attn=False: the weights are the softmax a plain forward
    makes, and its tokens lie on the patch grid as a fused ViT's do (key t: patch t - 1)."""
    from lurker.probe.data import load_dataset
    from lurker.server import create_app

    vit = timm_vit()
    data = load_dataset("digits:test", 16, channels=1)
    client = TestClient(
        create_app(_probe(tmp_path, "timm", vit, data), model_obj=vit, dataset=data)
    )
    forward = _forward_softmaxes(vit, data[SAMPLE][0])
    for block in (0, 1):
        doc = _get(client, "timm", f"softmax_{block + 1}", head=1)
        assert doc["query"] == 0 and doc["windows"] == 1  # the class token
        np.testing.assert_allclose(_values(doc["rows"]), forward[block][0, :, 0], atol=1e-6)
        np.testing.assert_allclose(_values(doc["matrix"]), forward[block][0, 1], atol=1e-6)
    grid = doc["patches"]
    assert (grid["rows"], grid["cols"], grid["image_size"]) == (4, 4, [16, 16])
    assert grid["keys"][0] is None and grid["queries"][0] is None
    for t in range(1, 17):
        row, col = divmod(t - 1, 4)
        assert grid["keys"][t] == grid["queries"][t] == [row, col]
        assert grid["boxes"][t] == [4 * row, 4 * row + 4, 4 * col, 4 * col + 4]
