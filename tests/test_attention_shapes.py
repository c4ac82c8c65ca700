"""Attention written out by hand in the shapes lurker used to miss or misread
(:func:`lurker.graph.attention.attention_softmaxes` and the live view's reading of the
softmax output, ``lurker.server.routes.attention._unfold``):

- heads folded into the batch axis (``(B*H, L, S)`` by ``bmm``, as ``nn.MultiheadAttention``'s
  internals do), windows and heads folded together in either order: which leading factor
  is heads, windows or the batch is read from the reshapes that made q, not from sizes;
- scores made as ``k @ qᵀ`` and transposed, weights transposed or permuted after the
  softmax, the values weighed as ``vᵀ @ wᵀ`` or by an einsum;
- cross-attention: keys from another model input than the queries.

Oracles: the attention weights recomputed with numpy from the projections a forward hook
saw, and the softmax outputs of a plain forward (recorded by a TorchFunctionMode)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import lurker
from lurker.graph import Graph
from lurker.graph.attention import attention_softmaxes
from lurker.server.routes.attention import _cross_words, _unfold
from test_live_attention_written import _Softmaxes


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _forward(model: nn.Module, *x: torch.Tensor) -> list[torch.Tensor]:
    mode = _Softmaxes()
    with torch.no_grad(), mode:
        model(*x)
    return mode.seen


def _one(tr: Any) -> Any:
    found = attention_softmaxes(tr)
    assert len(found) == 1, [tr.ops[i].label for i in found]
    (a,) = found.values()
    assert attention_softmaxes(Graph.from_json(tr.to_json())) == found
    return a


class BmmHeads(nn.Module):
    """nn.MultiheadAttention's internals: heads folded into the batch axis, ``bmm``."""

    def __init__(self, C: int = 16, H: int = 4) -> None:
        super().__init__()
        self.qkv, self.H = nn.Linear(C, 3 * C), H

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        D = C // self.H
        q, k, v = (
            t.reshape(B, L, self.H, D).transpose(1, 2).reshape(B * self.H, L, D)
            for t in self.qkv(x).chunk(3, -1)
        )
        a = torch.softmax(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(D), -1)
        return torch.bmm(a, v).reshape(B, self.H, L, D).transpose(1, 2).reshape(B, L, C)


def _bmm_by_hand(model: BmmHeads, x: torch.Tensor) -> np.ndarray:
    """(B, H, L, S) weights from the projection a hook saw."""
    q, k = _qk_by_hand(model, x)
    return _softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]))


def test_heads_folded_into_the_batch_axis_are_heads_not_windows():
    """(B*H, L, S): the first axis is the batch times 4 heads, read from the reshapes, at a
    batch of 1 and of 3; one input's output is unfolded to 1 sequence of 4 heads that are
    the hand-made heads (the old reading called 12 rows heads at a batch of 3)."""
    torch.manual_seed(0)
    model = BmmHeads().eval()
    for B in (1, 3):
        x = torch.randn(B, 6, 16)
        a = _one(lurker.trace(model, x))
        assert a.folds == ((("batch", 3),) if B == 3 else ()) + (("heads", 4),)
        assert not a.cross
    x = torch.randn(1, 6, 16)
    out = _forward(model, x)[0]
    w, notes, seq = _unfold(out, a.folds)
    assert tuple(w.shape) == (1, 4, 6, 6) and seq == "window"
    np.testing.assert_allclose(w.numpy(), _bmm_by_hand(model, x), atol=1e-6)
    assert "heads 4" in notes[0] and not any("sequences" in n for n in notes)


class WindowsHeadsOuter(nn.Module):
    """A windowed attention on an image, written with ``bmm``: 4x4 windows of an 8x8 map
    folded into the batch axis with the heads, heads outer: ``(H * B * nW, N, N)``."""

    def __init__(self, C: int = 16, H: int = 2) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, C, 1)
        self.qkv, self.H = nn.Linear(C, 3 * C), H

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.embed(img).permute(0, 2, 3, 1)  # (B, 8, 8, C)
        B, C = x.shape[0], x.shape[-1]
        x = x.view(B, 2, 4, 2, 4, C).permute(0, 1, 3, 2, 4, 5).reshape(B * 4, 16, C)
        qkv = self.qkv(x).reshape(B * 4, 16, 3, self.H, C // self.H).permute(2, 3, 0, 1, 4)
        q, k, v = (t.reshape(self.H * B * 4, 16, C // self.H) for t in qkv)
        a = torch.softmax(torch.bmm(q * 0.5, k.transpose(1, 2)), -1)
        return torch.bmm(a, v).sum()


def test_windows_and_heads_folded_heads_outer():
    """The first axis folds heads 2 (outer) then windows 2 x 2: read so from the trace; one
    image's weights unfold to (4 windows, 2 heads, 16, 16) equal to the ones made by hand
    per window (row-major over the 8x8 map) and head."""
    torch.manual_seed(0)
    model = WindowsHeadsOuter().eval()
    x = torch.randn(1, 3, 8, 8)
    a = _one(lurker.trace(model, x))
    assert a.folds == (("heads", 2), ("windows", 2), ("windows", 2))
    seen: list[torch.Tensor] = []
    hook = model.qkv.register_forward_hook(lambda m, i, o: seen.append(o))
    out = _forward(model, x)[0]
    hook.remove()
    qkv = seen[0].double().numpy().reshape(4, 16, 3, 2, 8).transpose(2, 0, 3, 1, 4)
    want = _softmax(qkv[0] * 0.5 @ qkv[1].transpose(0, 1, 3, 2))  # (windows, heads, 16, 16)
    w, notes, seq = _unfold(out, a.folds)
    assert tuple(w.shape) == (4, 2, 16, 16) and seq == "window"
    np.testing.assert_allclose(w.numpy(), want, atol=1e-6)
    assert any("4 sequences for this one input: windows" in n for n in notes)


class Untraceable(nn.Module):
    """Two heads made by separate projections and stacked on the batch axis with ``cat``:
    nothing in the trace says the first axis is heads."""

    def __init__(self, C: int = 8) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(C, 2 * C), nn.Linear(C, 2 * C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.cat(self.q(x).chunk(2, -1), 0)  # (2B, L, C)
        k = torch.cat(self.k(x).chunk(2, -1), 0)
        a = torch.softmax(q @ k.transpose(1, 2), -1)
        return a @ k


def test_an_axis_the_trace_cannot_name_is_not_called_heads():
    """Where the reshapes do not say what the first axis of (N, L, S) holds, it is not
    read as heads (a mean over them could mix windows or inputs): each slice is shown
    apart as a "sequence", one head each, the note saying lurker cannot tell."""
    torch.manual_seed(0)
    model = Untraceable().eval()
    x = torch.randn(1, 5, 8)
    a = _one(lurker.trace(model, x))
    assert a.folds is None
    out = _forward(model, x)[0]
    w, notes, seq = _unfold(out, a.folds)
    assert tuple(w.shape) == (2, 1, 5, 5) and seq == "sequence"
    np.testing.assert_array_equal(w[:, 0].numpy(), out.numpy())
    assert "cannot tell" in notes[0] and "shown apart" in notes[0]


class TransposedScores(nn.Module):
    """Scores made as ``k @ qᵀ`` then transposed (contiguous, scaled); the weights
    transposed after the softmax and weighing the values as ``vᵀ @ wᵀ``."""

    def __init__(self, C: int = 16, H: int = 2) -> None:
        super().__init__()
        self.qkv, self.H = nn.Linear(C, 3 * C), H

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4)
        s = (k @ q.transpose(-2, -1)).transpose(-2, -1).contiguous() * 0.5
        a = F.dropout(s.softmax(-1), 0.0, self.training)
        return (v.transpose(-2, -1) @ a.transpose(-2, -1)).sum()


class PermutedWeights(nn.Module):
    """Weights permuted to (B, L, H, S) after the softmax, weighing the values by einsum;
    the scores by einsum too."""

    def __init__(self, C: int = 16, H: int = 2) -> None:
        super().__init__()
        self.qkv, self.H = nn.Linear(C, 3 * C), H

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4)
        a = torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1).permute(0, 2, 1, 3)
        return torch.einsum("blhs,bhsd->blhd", a, v).sum()


def _qk_by_hand(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    seen: list[torch.Tensor] = []
    hook = model.qkv.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(x)
    hook.remove()
    B, L, _ = x.shape
    q, k, _ = seen[0].double().numpy().reshape(B, L, 3, model.H, -1).transpose(2, 0, 3, 1, 4)
    return q, k


def _operand(tr: Any, ref: Any, axis: int) -> np.ndarray:
    """A traced operand's value with its token axis moved to -2 (its channels then last)."""
    t = tr.ops[ref.index].activation
    t = t[ref.output] if isinstance(t, (tuple, list)) else t
    return np.moveaxis(t.double().numpy(), axis, -2)


def test_transposed_and_permuted_attention_with_its_query_and_key_axes():
    """Both are found; the query and key operands named (with their token axes) are q and
    k as a hook saw them, and the softmax's output is the weights numpy makes from them."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, 16)
    for model, scale in ((TransposedScores().eval(), 0.5), (PermutedWeights().eval(), 1.0)):
        tr = lurker.trace(model, x)
        a = _one(tr)
        assert a.folds == (("heads", 2),)
        q, k = _qk_by_hand(model, x)
        # each operand with its token axis moved last but one is q (and k): (B, H, L, D)
        np.testing.assert_allclose(_operand(tr, a.query, a.query_axis), q, atol=1e-6)
        np.testing.assert_allclose(_operand(tr, a.key, a.key_axis), k, atol=1e-6)
        want = _softmax(q @ k.transpose(0, 1, 3, 2) * scale)
        np.testing.assert_allclose(tr.ops[a.softmax].activation.numpy(), want, atol=1e-6)


class Cross(nn.Module):
    """Queries from the image features ``x``, keys and values from a second input ``t``
    (text tokens, prototypes): ``softmax(f(x) @ tᵀ) @ t``."""

    def __init__(self, C: int = 16) -> None:
        super().__init__()
        self.f = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.f(x) @ t.transpose(-2, -1), -1) @ t


def test_keys_from_another_input_are_cross_attention():
    """softmax(f(x) @ tᵀ) @ t with t a second input is cross-attention, the key side named
    (t, input_2); the weights are numpy's from f(x) and t; self-attention is not called so."""
    torch.manual_seed(0)
    model = Cross().eval()
    x, t = torch.randn(1, 6, 16), torch.randn(1, 5, 16)
    tr = lurker.trace(model, x, t)
    a = _one(tr)
    assert a.cross and a.key_inputs == (1,) and a.query_inputs == (0,)
    words = _cross_words(tr, a)
    assert words is not None
    assert "keys come from the model's input t (input_2)" in words
    assert "queries from input x (input_1)" in words
    with torch.no_grad():
        fx = model.f(x).double().numpy()
    want = _softmax(fx @ t.double().numpy().transpose(0, 2, 1))
    np.testing.assert_allclose(tr.ops[a.softmax].activation.numpy(), want, atol=1e-6)
    b = _one(lurker.trace(BmmHeads().eval(), torch.randn(1, 6, 16)))
    assert not b.cross and _cross_words(tr, b) is None
