"""Swin's windowed attention on the image: each (window, token) of a softmax whose batch
axis holds windows is placed on its patch of the input
(:func:`lurker.graph.attention.token_boxes`, the live view's ``patches`` per window).

Oracle: which patch each token of each window is, computed by hand from torchvision's
definition of the window partition (a 4x4 window of the stage's patch grid, windows
row-major, tokens row-major in a window), the cyclic shift ``roll(-window // 2)`` of every
second block, and the stage's patch size (4 px, 8 px after patch merging); and the
attention weights recomputed with numpy from the features a hook saw at those patches (q·k
scaled, the relative position bias, and the shift's mask: -100 between patches from
opposite sides of the image), which equal the served ones only where the patches are right.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

import lurker
from lurker.graph.attention import attention_softmaxes, token_boxes
from lurker.graph.receptive import receptive_fields

SAMPLE = 3
SIZE = 64  # a 16 x 16 patch grid: 16 windows in stage 1, 4 in stage 2 (both shifted)
WIN = 4


def small_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 2],
        window_size=[WIN, WIN], num_classes=10,
    ).eval()  # fmt: skip


#: per softmax op: (stage's patch size in px, its grid's side, the block's cyclic shift)
BLOCKS = {"softmax_1": (4, 16, 0), "softmax_2": (4, 16, 2),
          "softmax_3": (8, 8, 0), "softmax_4": (8, 8, 2)}  # fmt: skip


def oracle(patch: int, grid: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """(windows, 16) boxes ``[y0, y1, x0, x1]`` and ``[row, col]`` cells by hand: window
    w = (wr, wc) row-major over the rolled grid, token t = (tr, tc) row-major in it; the
    rolled grid's (R, C) holds the patch ((R + shift) % grid, (C + shift) % grid)."""
    n = grid // WIN
    boxes = np.zeros((n * n, WIN * WIN, 4), int)
    cells = np.zeros((n * n, WIN * WIN, 2), int)
    for wr in range(n):
        for wc in range(n):
            for tr in range(WIN):
                for tc in range(WIN):
                    r = (wr * WIN + tr + shift) % grid
                    c = (wc * WIN + tc + shift) % grid
                    w, t = wr * n + wc, tr * WIN + tc
                    boxes[w, t] = [r * patch, (r + 1) * patch, c * patch, (c + 1) * patch]
                    cells[w, t] = [r, c]
    return boxes, cells


def test_token_boxes_of_every_window_and_token():
    """The graph alone (a trace read back from JSON too) places every token of every
    window, in both stages, shifted and not, on its patch; the shifted blocks' rolls are
    named."""
    from lurker.graph import Graph

    tr = lurker.trace(small_swin(), torch.randn(1, 3, SIZE, SIZE))
    for graph in (tr, Graph.from_json(tr.to_json())):
        rfs = receptive_fields(graph)
        found = {graph.ops[i].label: a for i, a in attention_softmaxes(graph).items()}
        assert sorted(found) == sorted(BLOCKS)
        for label, (patch, grid, shift) in BLOCKS.items():
            tb = token_boxes(graph, found[label], rfs)
            assert not isinstance(tb, str), tb
            want, _ = oracle(patch, grid, shift)
            # (windows, heads, L, 4): the same boxes in each head
            for head in range(2):
                np.testing.assert_array_equal(tb.queries[:, head], want)
                np.testing.assert_array_equal(tb.keys[:, head], want)
            assert graph.ops[tb.start].label == "conv2d_1"
            assert [graph.ops[i].name for i in tb.rolls] == (["roll"] if shift else [])


class GatheredWindows(nn.Module):
    """Windows cut out by an index tensor (``x[:, idx]``): lurker cannot follow a gather."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.qkv = nn.Linear(8, 24)
        idx = torch.arange(16).view(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(-1)
        self.register_buffer("idx", idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)[:, self.idx]  # (B, 16, 8)
        t = t.reshape(-1, 4, 8)  # 4 windows of 4 tokens
        q, k, v = self.qkv(t).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-2, -1), -1)
        return (a @ v).mean((0, 1))


def test_a_gather_is_named_not_guessed():
    tr = lurker.trace(GatheredWindows().eval(), torch.randn(1, 3, 16, 16))
    (found,) = attention_softmaxes(tr).values()
    why = token_boxes(tr, found, receptive_fields(tr))
    assert isinstance(why, str) and "getitem" in why and "tensor" in why, why


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from lurker.probe import probe
    from lurker.probe.data import load_dataset
    from lurker.server import create_app

    data = load_dataset("digits:test", SIZE, channels=3)
    model = small_swin()
    root: Path = tmp_path_factory.mktemp("swin-windows")
    run = probe(model, data, out=root / "swin", k=3, batch_size=64, progress=False)
    assert run is not None
    run.close()
    client = TestClient(create_app(root / "swin", model_obj=model, dataset=data))
    yield {"model": model, "data": data, "client": client}


def _get(client: TestClient, op: str, **query: Any) -> dict[str, Any]:
    r = client.get(f"/api/runs/swin/live/sample-{SAMPLE}/ops/{op}/attention", params=query)
    assert r.status_code == 200, r.text
    return r.json()


def test_each_window_drawn_on_its_patches(served: dict[str, Any]):
    """Every window of every block is served with its patch boxes and grid cells as the
    oracle computes them, on the stage's whole grid; the card says how they were placed."""
    client = served["client"]
    for label, (patch, grid, shift) in BLOCKS.items():
        boxes, cells = oracle(patch, grid, shift)
        first = _get(client, label)
        assert first["windows"] == len(boxes) and first["patches_note"] is None
        notes = " ".join(first["notes"])
        assert f"{patch}x{patch}-pixel patch of the {grid} x {grid} grid" in notes
        assert ("roll_" in notes and "wraps around" in notes) == bool(shift)
        assert first["query"] == 0  # a window has no class token
        for w in range(len(boxes)):
            p = _get(client, label, window=w, query=0)["patches"]
            assert p["window"] is True and (p["rows"], p["cols"]) == (grid, grid)
            assert p["image_size"] == [SIZE, SIZE]
            assert p["boxes"] == boxes[w].tolist()
            assert p["keys"] == p["queries"] == cells[w].tolist()


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_shifted_window_weights_by_hand_at_the_placed_patches(served: dict[str, Any]):
    """Stage 1's shifted block: for each window, the weights recomputed from the features
    a hook saw at the oracle's patches (with the bias and the shift's mask between patches
    that wrapped around and those that did not) equal the served rows; in the corner
    window, split in four pieces by the shift, a query puts (almost) no weight on the
    pieces from the image's other sides."""
    model, client = served["model"], served["client"]
    attn = model.features[1][1].attn
    seen: list[torch.Tensor] = []
    hook = attn.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = served["data"][SAMPLE][0]
    with torch.no_grad():
        model(x[None])
        hook.remove()
        bias = attn.get_relative_position_bias()[0].double().numpy()  # (heads, 16, 16)
    fmap = seen[0][0].double().numpy()  # (16, 16, 24): the block's input, unrolled
    w, b = (p.detach().double().numpy() for p in (attn.qkv.weight, attn.qkv.bias))
    _, cells = oracle(4, 16, 2)
    for win in range(16):
        r, c = cells[win, :, 0], cells[win, :, 1]
        qkv = (fmap[r, c] @ w.T + b).reshape(16, 3, 2, 12).transpose(1, 2, 0, 3)
        q, k = qkv[0] * 12**-0.5, qkv[1]
        # a patch that wrapped around (rolled in from the far side) meets only its like
        wr, wc = r < cells[win, 0, 0], c < cells[win, 0, 1]
        region = wr.astype(int) * 2 + wc
        mask = np.where(region[:, None] == region[None, :], 0.0, -100.0)
        want = _softmax(q @ k.transpose(0, 2, 1) + bias + mask)  # (heads, 16, 16)
        for query in (0, 5, 15):
            doc = _get(client, "softmax_2", window=win, query=query)
            np.testing.assert_allclose(doc["rows"], want[:, query], atol=1e-5)
    corner = _get(client, "softmax_2", window=15, query=0)
    own = [t for t, cell in enumerate(corner["patches"]["keys"]) if cell[0] >= 14 and cell[1] >= 14]
    assert len(own) == 4 and sum(corner["mean"][t] for t in own) > 0.999
