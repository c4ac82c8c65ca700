"""Attention weights in the live view (``GET .../live/IMAGE/ops/OP/attention``).

A ViT's attention is one fused ``scaled_dot_product_attention`` call, so no op's output is
its weights: the server computes them from the call's own query and key on the image.
Oracles: torchvision's ``nn.MultiheadAttention`` asked for its per-head weights
(``need_weights=True, average_attn_weights=False``) on the inputs a forward hook saw;
weights made by hand in numpy from the projections a hook saw (a boolean mask given by
keyword, a keyword ``scale``, a positional ``is_causal``); and torch's own SDPA output,
which the weights times the values must give. The patch grid is checked against the
patch embedding: key token ``t`` is patch ``t - 1`` (token 0 the class token).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from torch import nn

from lurker.server.routes.attention import sdpa_weights

SAMPLE = 3


class MaskedAttention(nn.Module):
    """A class token and 4x4 patch tokens of a 16x16 digit through three attention calls:
    a boolean mask (a buffer) and a scale passed by keyword, ``is_causal`` passed by
    position, and windows of 4 tokens folded into the batch (which the live view cannot
    show as one image's attention, and says so)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.embed = nn.Conv2d(1, 8, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8, generator=g))
        self.qkv = nn.Linear(8, 24)
        keep = torch.rand(17, 17, generator=g) > 0.4
        keep[:, 0] = True  # every query keeps the class token: no row is all masked
        self.register_buffer("keep", keep)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 16, 8): token i is patch i
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        q, k, v = self.qkv(t).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)  # (B, 2, 17, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.keep, scale=0.3)
        b = F.scaled_dot_product_attention(q, k, a, None, 0.0, True)
        win = q[:, :, 1:].reshape(-1, 2, 4, 4, 4).transpose(1, 2).reshape(-1, 2, 4, 4)
        c = F.scaled_dot_product_attention(win, win, win)  # (B * 4 windows, 2, 4, 4)
        y = (a + b).mean(2).flatten(1) + c.reshape(len(x), 4, 2, 4, 4).mean((1, 3)).flatten(1)
        return self.head(y)


def _probe(root: Path, rid: str, model: nn.Module, data: Any) -> Path:
    from lurker.probe import probe

    run = probe(model, data, out=root / rid, k=3, batch_size=128, progress=False)
    assert run is not None
    run.close()
    return root / rid


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from lurker.probe.data import load_dataset
    from lurker.server import create_app
    from models_zoo import DigitsViT

    torch.manual_seed(0)
    vit, masked = DigitsViT().eval(), MaskedAttention().eval()
    data = load_dataset("digits:test", 16, channels=1)
    root = tmp_path_factory.mktemp("attention")
    out = {"vit": vit, "masked": masked, "data": data}
    for rid, model in (("vit", vit), ("masked", masked)):
        app = create_app(_probe(root, rid, model, data), model_obj=model, dataset=data)
        out[f"{rid}_client"] = TestClient(app)
    yield out


def _get(client: TestClient, rid: str, op: str, **query: Any) -> dict[str, Any]:
    r = client.get(f"/api/runs/{rid}/live/sample-{SAMPLE}/ops/{op}/attention", params=query)
    assert r.status_code == 200, r.text
    return r.json()


def _values(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows])


def _mha_weights(vit: nn.Module, x: torch.Tensor, block: int) -> np.ndarray:
    """Per-head weights ``(heads, L, S)`` of a torchvision encoder block's attention, from
    ``nn.MultiheadAttention`` itself on the input a forward hook saw."""
    mha = vit.vit.encoder.layers[block].self_attention
    seen: list[torch.Tensor] = []
    hook = mha.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        vit(x[None])
        hook.remove()
        _, w = mha(seen[0], seen[0], seen[0], need_weights=True, average_attn_weights=False)
    return w[0].numpy()


@pytest.mark.parametrize("block", [0, 1])
def test_vit_weights_are_multihead_attentions_own(runs: dict[str, Any], block: int):
    """Every head's row for several queries, every head's matrix and the mean's, equal
    the weights nn.MultiheadAttention gives for its own inputs; the class token's row is
    the default query."""
    client, op = runs["vit_client"], f"scaled_dot_product_attention_{block + 1}"
    want = _mha_weights(runs["vit"], runs["data"][SAMPLE][0], block)
    heads, L, S = want.shape
    doc = _get(client, "vit", op)
    assert (doc["heads"], doc["queries"], doc["keys"]) == (heads, L, S) == (2, 17, 17)
    assert doc["query"] == 0 and doc["head"] is None  # the class token, the mean
    assert doc["scale"] == pytest.approx(1 / np.sqrt(16))
    np.testing.assert_allclose(_values(doc["rows"]), want[:, 0], atol=1e-6)
    np.testing.assert_allclose(doc["mean"], want[:, 0].mean(0), atol=1e-6)
    np.testing.assert_allclose(_values(doc["matrix"]), want.mean(0), atol=1e-6)
    assert doc["matrix_max"] == pytest.approx(want.mean(0).max(), abs=1e-6)
    for query in (5, 16):
        for head in range(heads):
            doc = _get(client, "vit", op, query=query, head=head)
            assert (doc["query"], doc["head"]) == (query, head)
            np.testing.assert_allclose(_values(doc["rows"]), want[:, query], atol=1e-6)
            np.testing.assert_allclose(_values(doc["matrix"]), want[head], atol=1e-6)


def test_vit_key_token_t_is_patch_t_minus_1(runs: dict[str, Any]):
    """The overlay's cell for key token t is patch t - 1 of the 4x4 grid of 4x4-pixel
    patches the patch embedding (conv, stride 4) cuts; the class token has none."""
    vit = runs["vit"]
    conv = vit.vit.conv_proj
    assert conv.kernel_size == conv.stride == (4, 4)
    doc = _get(runs["vit_client"], "vit", "scaled_dot_product_attention_1")
    grid = doc["patches"]
    assert (grid["rows"], grid["cols"], grid["image_size"]) == (4, 4, [16, 16])
    assert grid["keys"][0] is None and grid["boxes"][0] is None and grid["queries"][0] is None
    for t in range(1, 17):
        row, col = divmod(t - 1, 4)  # torchvision flattens the conv's (h, w) row-major
        assert grid["keys"][t] == grid["queries"][t] == [row, col]
        assert grid["boxes"][t] == [4 * row, 4 * row + 4, 4 * col, 4 * col + 4]


def test_vit_op_says_it_is_attention_and_others_are_refused(runs: dict[str, Any]):
    client = runs["vit_client"]
    base = f"/api/runs/vit/live/sample-{SAMPLE}/ops"
    assert client.get(f"{base}/scaled_dot_product_attention_1").json()["attention"] is True
    assert client.get(f"{base}/linear_1").json()["attention"] is False
    r = client.get(f"{base}/linear_1/attention")
    assert r.status_code == 404 and "not an attention op" in r.json()["detail"]
    r = client.get(f"{base}/scaled_dot_product_attention_1/attention", params={"query": 17})
    assert r.status_code == 404 and "0..16" in r.json()["detail"]
    r = client.get(f"{base}/scaled_dot_product_attention_1/attention.json", params={"head": 2})
    assert r.status_code == 404 and "0..1" in r.json()["detail"]


def _by_hand(masked: MaskedAttention, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The weights of the first two calls, by hand in numpy from the projections a hook saw."""
    seen: list[torch.Tensor] = []
    hook = masked.qkv.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        masked(x[None])
    hook.remove()
    qkv = seen[0][0].double().numpy().reshape(17, 3, 2, 4)  # tokens, q/k/v, heads, channels
    q, k = qkv[:, 0].transpose(1, 0, 2), qkv[:, 1].transpose(1, 0, 2)  # (2, 17, 4)

    def softmax(s: np.ndarray) -> np.ndarray:
        e = np.exp(s - s.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    scores = q @ k.transpose(0, 2, 1)
    keep = masked.keep.numpy()
    a = softmax(np.where(keep, scores * 0.3, -np.inf))
    b = softmax(np.where(np.tril(np.ones((17, 17), bool)), scores / 2, -np.inf))
    return a, b


def test_mask_scale_and_causal_are_bound_by_name(runs: dict[str, Any]):
    """A boolean mask and a scale given by keyword, is_causal by position: each honoured
    (the catalogue binds the call's arguments by name), equal to weights made by hand."""
    client, masked = runs["masked_client"], runs["masked"]
    a, b = _by_hand(masked, runs["data"][SAMPLE][0])
    doc = _get(client, "masked", "scaled_dot_product_attention_1", head=1, query=4)
    assert doc["scale"] == pytest.approx(0.3) and not doc["causal"]
    assert doc["mask"].startswith("a boolean mask [17, 17], the model's buffer keep:")
    assert f"({int((~masked.keep).sum())} of its 289 entries)" in doc["mask"]
    np.testing.assert_allclose(_values(doc["matrix"]), a[1], atol=1e-6)
    np.testing.assert_allclose(_values(doc["rows"]), a[:, 4], atol=1e-6)
    assert doc["patches"]["keys"][5] == [1, 0]  # the mask changes nothing of the grid
    doc = _get(client, "masked", "scaled_dot_product_attention_2", head=0)
    assert doc["causal"] and doc["scale"] == pytest.approx(0.5) and doc["mask"] is None
    m = _values(doc["matrix"])
    np.testing.assert_allclose(m, b[0], atol=1e-6)
    assert (m[np.triu_indices(17, 1)] == 0).all()  # no query sees a later key


def test_windows_folded_into_the_batch_are_said(runs: dict[str, Any]):
    """Attention over windows folded into the batch axis (4 sequences for one image) is
    not one image's attention: a 409 that says why, never weights of the first window
    passed off as the image's."""
    r = runs["masked_client"].get(
        f"/api/runs/masked/live/sample-{SAMPLE}/ops/scaled_dot_product_attention_3/attention"
    )
    assert r.status_code == 409
    assert "holds 4 sequences on its batch axis" in r.json()["detail"]


@pytest.mark.parametrize(
    "kind", ["plain", "bool_mask", "float_mask", "causal", "scale", "gqa", "causal_wide"]
)
def test_weights_times_values_are_torchs_attention(kind: str):
    """``sdpa_weights(q, k, ...) @ v`` is torch's own scaled_dot_product_attention for
    every argument that changes the weights."""
    g = torch.Generator().manual_seed(0)
    L, S = (5, 7) if kind == "causal_wide" else (6, 6)
    q = torch.randn(2, 4, L, 8, generator=g)
    k = torch.randn(2, 2 if kind == "gqa" else 4, S, 8, generator=g)
    v = torch.randn(*k.shape[:-1], 3, generator=g)
    kw: dict[str, Any] = {
        "plain": {},
        "bool_mask": {"attn_mask": torch.rand(L, S, generator=g) > 0.3},
        "float_mask": {"attn_mask": torch.randn(1, 4, L, S, generator=g)},
        "causal": {"is_causal": True},
        "causal_wide": {"is_causal": True},
        "scale": {"scale": 0.17},
        "gqa": {"enable_gqa": True},
    }[kind]
    if kind == "bool_mask":
        kw["attn_mask"][:, 0] = True
    w = sdpa_weights(q, k, **kw)
    assert w.shape == (2, 4, L, S)
    vv = v.repeat_interleave(2, dim=-3) if kind == "gqa" else v
    with torch.no_grad():
        want = F.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close((w @ vv.double()).float(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, L, dtype=w.dtype))


class CausalText(nn.Module):
    """Token ids through one causal grouped-query attention (4 query heads, 2 key heads):
    a text model, whose tokens are the sequence's positions, not an image's patches."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def heads(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        t = self.emb(ids)
        split = lambda x: x.unflatten(-1, (-1, 4)).transpose(1, 2)  # noqa: E731
        return split(self.q(t)), split(self.k(t)), split(self.v(t))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(ids)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.head(self.mlp(y.transpose(1, 2).flatten(2))[:, -1])


class PaddedMHA(nn.Module):
    """Patch tokens through ``nn.MultiheadAttention`` given a key_padding_mask made from the
    tokens and a per-head boolean attn_mask (3-D) that leaves query 2 no key in head 1:
    the module merges both into one float mask of -inf entries for its fused call."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.embed = nn.Conv2d(1, 8, 4, 4)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        block = torch.rand(2, 16, 16, generator=g) > 0.7  # True: not allowed
        block[1, 2] = True
        self.register_buffer("block", block)
        self.head = nn.Linear(8, 10)

    def masks(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        norm = t.norm(dim=-1)
        return {
            "key_padding_mask": norm < norm.median(),
            "attn_mask": self.block.repeat(len(t), 1, 1),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        y, _ = self.mha(t, t, t, need_weights=False, **self.masks(t))
        return self.head(y.nan_to_num().mean(1))


@pytest.fixture(scope="module")
def more(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from torch.utils.data import TensorDataset

    from lurker.probe.data import load_dataset
    from lurker.server import create_app

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (24, 10), generator=g)
    text = TensorDataset(ids, torch.randint(0, 3, (24,), generator=g))
    digits = load_dataset("digits:test", 16, channels=1)
    models = {"text": (CausalText().eval(), text), "padded": (PaddedMHA().eval(), digits)}
    root = tmp_path_factory.mktemp("attention-more")
    out: dict[str, Any] = {"ids": ids, "digits": digits}
    for rid, (model, data) in models.items():
        app = create_app(_probe(root, rid, model, data), model_obj=model, dataset=data)
        out[rid], out[f"{rid}_client"] = model, TestClient(app)
    yield out


def test_token_run_causal_gqa_weights_by_hand(more: dict[str, Any]):
    """A text model's attention on a dataset sample and on a typed sequence (before, the
    endpoint refused every run of token ids, as image maps do): each head's weights equal
    numpy's softmax of its query against its shared key head, nothing after the query;
    the default query is the last (the first sees only itself), and the tokens are said to
    be positions, not patches."""
    model, client, ids = more["text"], more["text_client"], more["ids"]
    with torch.no_grad():
        q, k, _ = (t[0].double().numpy() for t in model.heads(ids[SAMPLE][None]))
    s = q @ np.repeat(k, 2, axis=0).transpose(0, 2, 1) / 2  # key head h // 2, 1/sqrt(4)
    s = np.where(np.tril(np.ones((10, 10), bool)), s, -np.inf)
    want = np.exp(s - s.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    typed = client.post("/api/runs/text/live/inputs", json={"ids": ids[SAMPLE].tolist()})
    assert typed.status_code == 200, typed.text
    for image in (f"sample-{SAMPLE}", typed.json()["input"]):
        r = client.get(f"/api/runs/text/live/{image}/ops/scaled_dot_product_attention_1/attention")
        assert r.status_code == 200, r.text
        doc = r.json()
        assert (doc["heads"], doc["queries"], doc["keys"], doc["query"]) == (4, 10, 10, 9)
        assert doc["causal"] and doc["patches"] is None and "token ids" in doc["patches_note"]
        assert any("2 key heads are each shared by 2" in n for n in doc["notes"])
        np.testing.assert_allclose(_values(doc["rows"]), want[:, 9], atol=1e-6)
        np.testing.assert_allclose(_values(doc["matrix"]), want.mean(0), atol=1e-6)
    doc = _get(client, "text", "scaled_dot_product_attention_1", head=3, query=4)
    np.testing.assert_allclose(_values(doc["matrix"]), want[3], atol=1e-6)
    assert doc["rows"][0][5:] == [0.0] * 5


def test_multihead_padding_and_per_head_masks(more: dict[str, Any]):
    """nn.MultiheadAttention's key_padding_mask and a per-head boolean attn_mask reach the
    fused call as one float mask: the weights are the module's own (need_weights=True),
    the mask's words count its -inf entries (else "added to the scores" hid that keys
    are left out), and a query with no key in head 1 only is listed as masked (before,
    only head 0 was looked at) while head 0 still has its weights."""
    model, client = more["padded"], more["padded_client"]
    seen: list[torch.Tensor] = []
    hook = model.mha.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(more["digits"][SAMPLE][0][None])
        hook.remove()
        t = seen[0]
        masks = model.masks(t)
        _, want = model.mha(t, t, t, need_weights=True, average_attn_weights=False, **masks)
    want = want[0].numpy()
    assert np.isnan(want[1, 2]).all() and not np.isnan(want[0, 2]).any()
    left = int((masks["key_padding_mask"][0][None, None] | model.block).sum())
    for head in (0, 1):
        doc = _get(client, "padded", "scaled_dot_product_attention_1", head=head, query=2)
        np.testing.assert_allclose(_values(doc["matrix"]), want[head], atol=1e-6)
        np.testing.assert_allclose(_values(doc["rows"]), want[:, 2], atol=1e-6)
        assert doc["masked"] == [2]
        assert f"(-inf at {left} of its 512 entries: keys left out)" in doc["mask"]
