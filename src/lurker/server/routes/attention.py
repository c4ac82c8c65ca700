"""``/api/runs/{run}/live/{image}/ops/{op}/attention``: which tokens each token attends to.

A ViT's attention is one fused call (``F.scaled_dot_product_attention``, which
``nn.MultiheadAttention`` also records when asked for no weights), so no op's output is
the attention weights. They are made here from the call's own query and key on the
image, bound by name with the op catalogue, as torch defines them: ``softmax(q kᵀ · scale
+ mask)`` per head, honouring ``attn_mask``, ``is_causal``, ``scale`` and
``enable_gqa``; dropout is not applied (the eval view). Where the tokens are a ViT's
patches (the probe's token boxes carried from the patch embedding to the op's query and
key), each key token's patch is given, so the page draws a query's weights on the image.

Attention written out by hand (``softmax(q @ kᵀ ...) @ v``: Swin, minGPT, timm's ViTs with
``fused_attn=False``) has its weights as a softmax op's output: for a softmax that
:func:`lurker.graph.attention.attention_softmaxes` finds to be attention, that output on the
image is served as the model computed it, with no scale, mask or causality claimed; windows
folded into the batch axis (Swin) are served one at a time (``window=W``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Query, Request

from ..deps import live_call
from ..errors import ApiError
from ..schemas import AttentionPatches, LiveAttention
from ..session import Session, finite_range, json_values
from . import json_get
from .live import ATTENTION, image_id, written_attention

router = APIRouter(prefix="/api", tags=["attention"])

#: The most values (queries x keys) the L x S matrix is sent with: 512 tokens squared.
MAX_MATRIX = 512 * 512
#: Weights of one (image, op) kept for the next request (queries, heads) up to this many.
KEEP_VALUES = 1 << 20


@dataclass(frozen=True)
class Weights:
    """An attention op's weights on one image, and what the page says about them."""

    weights: Any  # (windows, heads, L, S) float32, CPU; NaN on a query whose every key is masked
    scale: float | None
    causal: bool
    mask: str | None
    notes: list[str]
    patches: AttentionPatches | None
    patches_note: str | None
    last_query: bool = False  # the last query is the default (it sees every key)
    scores_op: str | None = None
    values_op: str | None = None
    cross: str | None = None  # cross-attention: where the queries and the keys come from
    sequence: str = "window"  # what each of the windows is: "window" or "sequence"
    #: per window (windows folded into the batch axis, Swin), its tokens on the image
    window_patches: list[AttentionPatches] | None = None


def sdpa_weights(
    query: Any,
    key: Any,
    attn_mask: Any = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Any:
    """The attention weights ``scaled_dot_product_attention`` takes its weighted sum of
    the values with, ``(..., heads, L, S)``, computed in float64 as torch documents its
    reference: scores ``q kᵀ · scale`` (default ``1/sqrt(E)``), a boolean ``attn_mask``
    leaving out the keys where it is False, a float one added, ``is_causal`` leaving out
    the keys after each query (top-left aligned), ``enable_gqa`` sharing each key head
    among its group of query heads; softmax over the keys, no dropout. A query whose every
    key is left out has no weights: NaN (torch's kernels differ there)."""
    import torch

    q, k = query.double(), key.double()
    if enable_gqa and q.dim() >= 3 and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
    s = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.size(-1)) if scale is None else scale)
    L, S = s.shape[-2:]
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        m = attn_mask.to(s.device)
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.double()
    return torch.softmax(s, dim=-1)


@json_get(
    router,
    "/runs/{run_id}/live/{image}/ops/{op}/attention",
    LiveAttention,
    "An attention op's weights on this image: each head's for one query token, and the "
    "query x key matrix of one head (or their mean); 409 saying why where its inputs "
    "cannot give them",
)
async def attention(
    request: Request,
    run_id: str,
    image: str,
    op: str,
    query: int | None = Query(
        None, ge=0, le=2**31, description="query token (default: the class token)"
    ),
    head: int | None = Query(
        None, ge=0, le=2**31, description="the matrix's head (default: the mean)"
    ),
    window: int | None = Query(
        None,
        ge=0,
        le=2**31,
        description="the window, where the batch axis holds several for this input (default: 0)",
    ),
) -> LiveAttention:
    return await live_call(request, run_id, lambda s: _attention(s, image, op, query, head, window))


def _attention(
    s: Session,
    image: str,
    label: str,
    query: int | None,
    head: int | None,
    window: int | None = None,
) -> LiveAttention:
    iid = image_id(s, image, sequences=True)
    node = s.op(label)
    found = s.cached(
        ("attention", s.entry.generation, iid, node.index),
        lambda: _weights(s, iid, node),
        keep=lambda w: w.weights.numel() <= KEEP_VALUES,
    )
    windows = int(found.weights.shape[0])
    if window is not None and not window < windows:
        raise ApiError(
            404,
            f"no window {window} in {node.label!r}: its windows are 0..{windows - 1}"
            if windows > 1
            else f"{node.label!r} has one sequence per input, no windows: omit window",
        )
    w = found.weights[window or 0]
    heads, L, S = (int(n) for n in w.shape)
    patches = found.window_patches[window or 0] if found.window_patches else found.patches
    if query is None and patches is not None and patches.window:
        # a window has no class token: its first token with a patch
        query = next((i for i, c in enumerate(patches.queries) if c is not None), 0)
    if query is None:
        # the class token sees the whole image; a causal call's last query sees every key
        # (its first sees only itself: a weight of 1, which says nothing)
        cells = patches.queries if patches else []
        query = next(
            (i for i, c in enumerate(cells) if c is None), L - 1 if found.last_query else 0
        )
    if not query < L:
        raise ApiError(
            404, f"no query token {query} in {node.label!r}: its queries are tokens 0..{L - 1}"
        )
    if head is not None and not head < heads:
        raise ApiError(
            404,
            f"no head {head} in {node.label!r}: its heads are 0..{heads - 1} (omit it for their mean)",
        )
    m = w.mean(0) if head is None else w[head]
    matrix = matrix_min = matrix_max = matrix_note = None
    if L * S <= MAX_MATRIX:
        a = m.numpy()
        matrix = json_values(a)
        matrix_min, matrix_max = finite_range(a)
    else:
        matrix_note = (
            f"the {L} x {S} matrix holds {L * S:,} weights, more than the {MAX_MATRIX:,} "
            "sent at once: choose query tokens to see their rows"
        )
    # in any head: a mask may differ by head (a 3-D attn_mask of nn.MultiheadAttention)
    masked = [int(i) for i in w.isnan().all(-1).any(0).nonzero().flatten().tolist()]
    return LiveAttention(
        op=node.label,
        name=node.name,
        heads=heads,
        queries=L,
        keys=S,
        query=query,
        head=head,
        scale=found.scale,
        causal=found.causal,
        mask=found.mask,
        notes=found.notes,
        rows=json_values(w[:, query].numpy()),
        mean=json_values(w[:, query].mean(0).numpy()[None])[0],
        matrix=matrix,
        matrix_min=matrix_min,
        matrix_max=matrix_max,
        matrix_note=matrix_note,
        patches=patches,
        patches_note=found.patches_note,
        masked=masked,
        windows=windows,
        window=(window or 0) if windows > 1 else None,
        scores_op=found.scores_op,
        values_op=found.values_op,
        cross=found.cross,
        sequence=found.sequence,
    )


def _weights(s: Session, iid: str, node: Any) -> Weights:
    """The op's weights on one image from its live query and key (409 saying why they
    cannot be had from them)."""
    import torch

    what = f"{node.label!r} ({node.name})"
    written = written_attention(s).get(node.index)
    if written is not None:
        return _softmax_weights(s, iid, node, written)
    if node.name != "scaled_dot_product_attention":
        if node.name in ATTENTION:
            raise ApiError(
                409,
                f"{what} is a fused attention whose call holds the projection weights, "
                "not the query and key: lurker computes attention weights from a "
                "scaled_dot_product_attention call's query and key only (nn.MultiheadAttention "
                "records one when traced by lurker)",
            )
        raise ApiError(
            404,
            f"{what} is not an attention op: attention weights are shown for "
            "scaled_dot_product_attention calls and for a softmax over q @ kᵀ whose output "
            "weighs the values (attention written out by hand)"
            + (
                "; this softmax is not one: its input is no product of two tensors of the "
                "input (q and kᵀ), or its output weighs no values"
                if node.name == "softmax"
                else ""
            ),
        )
    try:
        call, missing = s.call_values(iid, node)
    except (KeyError, TypeError) as e:
        raise ApiError(409, f"{what}: lurker cannot read its call's arguments ({e})") from None
    gone = [n for n in ("query", "key", "attn_mask") if n in missing]
    if gone:
        raise ApiError(
            409,
            f"the live run does not give {what}'s {' and '.join(gone)}: the replay neither "
            "computes nor keeps that tensor (it was made once, at trace time), so its weights "
            "cannot be computed on this image",
        )
    q, k, mask = call.get("query"), call.get("key"), call.get("attn_mask")
    for name, t in (("query", q), ("key", k), ("attn_mask", mask)):
        if isinstance(t, torch.Tensor) and (t.is_nested or t.layout != torch.strided):
            raise ApiError(
                409,
                f"{what}'s {name} is a {'nested' if t.is_nested else str(t.layout)} tensor "
                "(sequences of several lengths in one tensor): lurker computes attention "
                "weights from dense query and key tensors only",
            )
        if name != "attn_mask" and not isinstance(t, torch.Tensor):
            raise ApiError(409, f"{what}'s {name} is not a tensor ({type(t).__name__})")
    _check_form(what, q, k, bool(call.get("enable_gqa", False)))
    scale = call.get("scale")
    causal = bool(call.get("is_causal", False))
    try:
        w = sdpa_weights(q, k, mask, causal, scale, bool(call.get("enable_gqa", False)))
    except RuntimeError as e:  # a mask that does not broadcast: said, never a 500
        raise ApiError(409, f"{what}: its weights cannot be made from its inputs ({e})") from None
    w = w.reshape(-1, *w.shape[-2:]).to("cpu", torch.float32)[None]
    return Weights(
        w,
        float(1 / math.sqrt(q.size(-1)) if scale is None else scale),
        causal,
        _mask_words(s, node, mask),
        _notes(s, node, call, q, k),
        *_patches(s, iid, node, q, k),
        last_query=causal,
    )


def _softmax_weights(s: Session, iid: str, node: Any, found: Any) -> Weights:
    """The weights of attention written out by hand: the softmax op's own output on the
    image, ``(..., heads, L, S)``, as the model computed it (its scale, masks and biases
    are in it, so none is recomputed or claimed); leading axes past one input's are
    sequences folded into the batch axis (a Swin's windows), each shown apart."""
    import torch

    from lurker.ops.catalogue import bind

    tr = s.trace()
    what = f"{node.label!r} ({node.name})"
    t = s.op_output(iid, node)
    if not isinstance(t, torch.Tensor):
        raise ApiError(409, f"the live run does not give {what}'s output on this input")
    if t.is_nested or t.layout != torch.strided:
        raise ApiError(
            409, f"{what}'s output is not a dense tensor: lurker shows dense weights only"
        )
    t = t.detach().to("cpu", torch.float32)
    L, S = (int(n) for n in t.shape[-2:])
    scores, values = tr.ops[found.scores].label, tr.ops[found.values].label
    notes = [
        f"These weights are the output of {node.label} (a softmax over the key tokens) on "
        f"this input, as the model computed it: the scores {scores} makes (q @ kᵀ) with "
        "whatever scale, bias and mask the model applies on the way, which lurker does not "
        f"recompute; {values} weighs the values with them."
    ]
    w, fold_notes, sequence = _unfold(t, found.folds)
    notes.extend(fold_notes)
    windows = int(w.shape[0])
    cross = _cross_words(tr, found)
    if cross:
        notes.insert(0, f"Cross-attention: {cross}.")
    for i in found.between:
        op = tr.ops[i]
        try:
            p = bind(op.name, op.args, op.kwargs, op.target).get("p") if "dropout" in op.name else 0
        except (KeyError, TypeError):
            p = None
        if isinstance(p, (int, float)) and p > 0:
            notes.append(
                f"{op.label} (dropout, p = {p}) follows the softmax before the values are "
                "weighed: the identity in eval mode; the weights shown are before it."
            )
    notes.extend(_train_note(s, node))
    last = False
    if L == S > 1:
        upper = torch.ones(L, S, dtype=torch.bool).triu(1)
        last = bool((w[..., upper] == 0).all())
        if last:
            notes.append(
                "On this input every query puts weight 0 on the keys after it (query i "
                "weighs keys 0..i only, as a causal mask gives): the last query, which sees "
                "every key, is shown first."
            )
    patches: AttentionPatches | None = None
    note: str | None = None
    placed: list[AttentionPatches] | None = None
    if windows == 1:  # a ViT's tokens: the probe's token boxes, as for a fused call
        patches, note = _patches_of(
            s, iid, found.query, found.query_axis, L, found.key, found.key_axis, S
        )
    if patches is None and s.token_length() is None:
        got = _placed(s, iid, found, windows)
        if isinstance(got, str):
            if windows > 1:
                note = (
                    f"its tokens are shown by position within the {sequence}: lurker cannot "
                    f"place a {sequence} folded into the batch axis on the image ({got})"
                )
        else:
            placed, words = got
            note = None
            notes.append(words)
    return Weights(
        w, None, False, None, notes, patches, note, last_query=last,
        scores_op=scores, values_op=values, cross=cross, sequence=sequence,
        window_patches=placed,
    )  # fmt: skip


def _placed(
    s: Session, iid: str, found: Any, windows: int
) -> tuple[list[AttentionPatches], str] | str:
    """Each window's tokens on the image (windows in the order :func:`_unfold` shows
    them), and a note saying how they were placed; or why they cannot be. The boxes are
    the patch embedding's, carried along the ops that made the query and key
    (:func:`lurker.graph.attention.token_boxes`: the window partition's reshapes and
    permutes, a cyclic shift, padding, patch merging), so each (window, token) is placed
    as the model's own ops place it."""
    import torch

    from lurker.graph.attention import token_boxes
    from lurker.graph.receptive import receptive_fields

    tr = s.trace()
    rfs = s.cached(("receptive-fields", s.entry.generation, id(tr)), lambda: receptive_fields(tr))
    tb = token_boxes(tr, found, rfs)
    if isinstance(tb, str):
        return tb
    if found.folds is None:
        return "the trace does not say which of its leading axes hold the windows"
    sides = []
    for arr in (tb.queries, tb.keys):
        n = int(arr.shape[-2])
        # one input: index 0 on the trace's batch factors
        a = arr.reshape(*(m for _, m in found.folds), n, 4)
        a = a[tuple(0 if k == "batch" else slice(None) for k, _ in found.folds)]
        a, _, _ = _unfold(torch.from_numpy(a.copy()), found.folds)
        if int(a.shape[0]) != windows or not bool((a == a[:, :1]).all()):
            return "the boxes lurker carried differ between heads"
        sides.append(a[:, 0].numpy())
    qs, ks = sides
    have = [tuple(int(v) for v in b) for b in ks.reshape(-1, 4) if b[0] >= 0]
    if not have:
        return "none of its keys comes from a patch"
    ys = sorted({b[0] for b in have})
    xs = sorted({b[2] for b in have})
    if len(set(have)) != len(ys) * len(xs) or len({(b[0], b[2]) for b in have}) != len(set(have)):
        return "its tokens' patches do not tile one grid"
    row = {y: i for i, y in enumerate(ys)}
    col = {x: i for i, x in enumerate(xs)}
    h, w = (int(n) for n in s.live_input(iid).shape[-2:])

    def cell(b: Any) -> list[int] | None:
        return None if b[0] < 0 else [row.get(int(b[0]), -1), col.get(int(b[2]), -1)]

    out = []
    for win in range(windows):
        qc = [cell(b) for b in qs[win]]
        if any(c is not None and -1 in c for c in qc):
            return "its queries' patches are not on its keys' grid"
        out.append(
            AttentionPatches(
                rows=len(ys),
                cols=len(xs),
                image_size=[h, w],
                keys=[cell(b) for b in ks[win]],
                queries=qc,
                boxes=[
                    None
                    if b[0] < 0
                    else [
                        max(int(b[0]), 0),
                        min(int(b[1]), h),
                        max(int(b[2]), 0),
                        min(int(b[3]), w),
                    ]
                    for b in ks[win]
                ],
                window=windows > 1,
            )
        )
    size = sorted({(b[1] - b[0], b[3] - b[2]) for b in have})
    ph, pw = size[len(size) // 2]
    ops = tr.ops
    words = (
        f"Its tokens are placed on the image by following the trace from the patch "
        f"embedding {ops[tb.start].label} ({ops[tb.start].name}) to its query and key: "
        f"each token is a {ph}x{pw}-pixel patch of the {len(ys)} x {len(xs)} grid"
    )
    if windows > 1:
        words += (
            ", each window's patches outlined on the image (a window is "
            f"{windows} of the image's, numbered as the model folded them)"
        )
    if tb.rolls:
        said = ", ".join(f"{ops[i].label} (shifts {_call_shifts(ops[i])})" for i in tb.rolls)
        words += (
            f"; the cyclic shift of {said} is followed, so a window at the image's edge "
            "wraps around to its other side, in up to four pieces"
        )
    return out, words + "."


def _call_shifts(op: Any) -> Any:
    from lurker.ops.catalogue import bind

    try:
        return bind(op.name, op.args or (), op.kwargs or {}, op.target).get("shifts")
    except (KeyError, TypeError):
        return "?"


def _unfold(t: Any, folds: tuple[tuple[str, int], ...] | None) -> tuple[Any, list[str], str]:
    """Softmax output ``t`` (one input's, ``(..., L, S)``) as ``(sequences, heads, L, S)``,
    the notes saying how its leading axes were read, and what a sequence is ("window" or
    "sequence"). ``folds`` (:class:`lurker.graph.attention.SoftmaxAttention`) say what the
    leading axes hold, read from the trace: heads are put last, windows first, whatever
    order the model folded them in. Where the trace does not say, a 3-D output's first axis
    is not called heads (it may be windows or inputs): each of its slices is shown apart,
    no mean taken across them; a 4-D or wider one is read as ``(..., heads, L, S)``, the
    form attention documents."""
    L, S = (int(n) for n in t.shape[-2:])
    lead = [int(n) for n in t.shape[:-2]]
    n = math.prod(lead)
    if folds is not None:
        # one input: the batch's factors are 1 here, whatever batch the trace ran
        kept = [(k, m) for k, m in folds if k != "batch"]
        if math.prod(m for _, m in kept) == n:
            heads = [i for i, (k, _) in enumerate(kept) if k == "heads"]
            rest = [i for i, (k, _) in enumerate(kept) if k != "heads"]
            h = math.prod(kept[i][1] for i in heads)
            w = t.reshape(*(m for _, m in kept), L, S)
            w = w.permute(*rest, *heads, len(kept), len(kept) + 1).reshape(n // h, h, L, S)
            notes = []
            if n > 1 and (len(lead) == 1 or n // h > 1):
                said = " x ".join(f"{k} {m}" for k, m in kept)
                notes.append(
                    f"Its output is {[*lead, L, S]}: lurker followed the reshapes and "
                    "permutes that made its query from the model's input, which say its "
                    f"leading axes hold {said} (in that order) for this one input"
                    + (", no heads" if not heads else "")
                    + "."
                )
            if n // h > 1:
                notes.append(
                    f"Its batch axis holds {n // h} sequences for this one input: windows of "
                    "the image folded into the batch axis, as in Swin's windowed attention, "
                    f"each its own {L} x {S} attention. One window is shown at a time, "
                    "numbered in the order the model folded them; the mean is over one "
                    "window's heads, never over windows."
                )
            return w, notes, "window"
    if len(lead) <= 1:
        if n <= 1:
            return t.reshape(1, 1, L, S), [], "window"
        return (
            t.reshape(n, 1, L, S),
            [
                f"Its output is {[n, L, S]}: lurker cannot tell from the trace whether its "
                f"first axis holds {n} heads, windows or inputs folded into the batch axis "
                "(the reshapes that made its query are not ones it follows back to the "
                f"input), so each of the {n} is shown apart as a sequence, one at a time, "
                "with no mean over them."
            ],
            "sequence",
        )
    w = t.reshape(-1, *t.shape[-3:])
    notes = [
        f"Its output is {[*lead, L, S]}: lurker could not follow the reshapes that made its "
        "query back to the input, so it reads axis -3 as the heads, the form attention "
        "documents (batch, heads, L, S)."
    ]
    if w.shape[0] > 1:
        notes.append(
            f"Its leading axes hold {int(w.shape[0])} sequences for this one input, each shown "
            "apart, one at a time; the mean is over one sequence's heads, never over them."
        )
    return w, notes, "sequence"


def _cross_words(tr: Any, found: Any) -> str | None:
    """Cross-attention in words (the keys come from other model inputs than the queries,
    :attr:`lurker.graph.attention.SoftmaxAttention.cross`), naming each side's inputs."""
    if not found.cross:
        return None

    def side(ix: tuple[int, ...]) -> str:
        named = [f"{tr.ops[i].name} ({tr.ops[i].label})" for i in ix]
        return ("input " if len(named) == 1 else "inputs ") + " and ".join(named)

    q = side(found.query_inputs) if found.query_inputs else "no model input"
    return f"its keys come from the model's {side(found.key_inputs)}, its queries from {q}"


def _check_form(what: str, q: Any, k: Any, gqa: bool) -> None:
    """409 unless query and key are one image's ``(1, heads, L, E)`` or ``(1, L, E)``,
    the forms ``scaled_dot_product_attention`` documents (heads on axis -3)."""
    form = (
        "lurker reads attention as (batch, heads, tokens, channels) or (batch, tokens, "
        "channels), the forms scaled_dot_product_attention documents"
    )
    if q.dim() not in (3, 4) or k.dim() != q.dim():
        raise ApiError(
            409,
            f"{what}'s query {list(q.shape)} and key {list(k.shape)} are not in a form "
            f"lurker knows: {form}",
        )
    if q.shape[0] != 1:
        raise ApiError(
            409,
            f"{what}'s query {list(q.shape)} holds {q.shape[0]} sequences on its batch axis "
            "for this one input (windows or crops folded into the batch, as in windowed "
            f"attention, or heads): {form}, one sequence per input",
        )
    hq, hk = (q.shape[1], k.shape[1]) if q.dim() == 4 else (1, 1)
    if k.shape[0] != 1 or k.shape[-1] != q.shape[-1] or (hk != hq and not (gqa and hq % hk == 0)):
        raise ApiError(
            409,
            f"{what}'s query {list(q.shape)} and key {list(k.shape)} do not pair head by "
            f"head: {form}",
        )


def _mask_words(s: Session, node: Any, mask: Any) -> str | None:
    """The call's ``attn_mask`` in words: its kind, shape and where it comes from."""
    import torch

    from lurker.graph.nodes import OpRef, ParamRef
    from lurker.ops.catalogue import bind

    if mask is None:
        return None
    a = bind(node.name, node.args or (), node.kwargs or {}, getattr(node, "target", None)).get(
        "attn_mask"
    )
    where = ""
    if isinstance(a, OpRef):
        src = s.trace().ops[a.index]
        where = (
            f", the model's buffer {src.name}"
            if src.kind == "buffer"
            else f", the output of {src.label}"
        )
    elif isinstance(a, ParamRef):
        where = f", the model's {a.name}"
    if mask.dtype == torch.bool:
        left = int((~mask).sum())
        return (
            f"a boolean mask {list(mask.shape)}{where}: keys where it is False are left out "
            f"({left:,} of its {mask.numel():,} entries)"
        )
    # nn.MultiheadAttention turns a boolean mask and key_padding_mask into -inf entries
    out = int(mask.isneginf().sum())
    return (
        f"a {str(mask.dtype).removeprefix('torch.')} mask {list(mask.shape)}{where}, added "
        "to the scores"
        + (f" (-inf at {out:,} of its {mask.numel():,} entries: keys left out)" if out else "")
    )


def _notes(s: Session, node: Any, call: dict[str, Any], q: Any, k: Any) -> list[str]:
    """Dropout the call applies and the weights shown do not; a module in train mode;
    key heads shared by query heads."""
    notes = []
    p = call.get("dropout_p", 0.0)
    if isinstance(p, (int, float)) and p > 0:
        notes.append(
            f"This call applies dropout to its weights (dropout_p = {p}), so the model's "
            "output on this image is random; the weights shown have no dropout, as in eval mode."
        )
    notes.extend(_train_note(s, node))
    if q.dim() == 4 and k.shape[1] != q.shape[1]:
        notes.append(
            f"Grouped-query attention: its {k.shape[1]} key heads are each shared by "
            f"{q.shape[1] // k.shape[1]} of its {q.shape[1]} query heads."
        )
    return notes


def _train_note(s: Session, node: Any) -> list[str]:
    """A note where the module running ``node`` is in train mode."""
    model = s.model()
    path = node.module or ""
    try:
        mod = model.get_submodule(path) if path else model
    except AttributeError:
        mod = model
    if not mod.training:
        return []
    return [
        f"The module running it ({path or 'the model'}) is in train mode; the weights "
        "shown have no dropout, as in eval mode."
    ]


def _patches(
    s: Session, iid: str, node: Any, q: Any, k: Any
) -> tuple[AttentionPatches | None, str | None]:
    """Where a ``scaled_dot_product_attention`` call's tokens lie on the image: its query's
    and key's token axes (axis -2 of each), see :func:`_patches_of`."""
    from lurker.ops.catalogue import bind

    call = bind(node.name, node.args or (), node.kwargs or {}, getattr(node, "target", None))
    L, S = int(q.shape[-2]), int(k.shape[-2])
    return _patches_of(s, iid, call.get("query"), q.dim() - 2, L, call.get("key"), k.dim() - 2, S)


def _patches_of(
    s: Session, iid: str, qref: Any, qaxis: int, L: int, kref: Any, kaxis: int, S: int
) -> tuple[AttentionPatches | None, str | None]:
    """Where the tokens of query ``qref`` (on its axis ``qaxis``, ``L`` of them) and key
    ``kref`` (axis ``kaxis``, ``S``) lie on the image: the token boxes the probe's layout
    inference carries from the patch embedding to those axes
    (:func:`lurker.probe.layout.token_axes`), placed on their patch grid."""
    from lurker.graph.nodes import OpRef
    from lurker.probe.layout import patch_grid, token_axes

    tr = s.trace()
    found = s.cached(("token-axes", s.entry.generation, id(tr)), lambda: token_axes(tr))

    def boxes(ref: Any, axis: int, n: int) -> list[tuple[int, int, int, int] | None] | None:
        hit = found.get((ref.index, ref.output)) if isinstance(ref, OpRef) else None
        if hit is None or hit[0] != axis or len(hit[1]) != n:
            return None
        return [None if b[0] < 0 else tuple(int(v) for v in b) for b in hit[1]]  # type: ignore[misc]

    kb, qb = boxes(kref, kaxis, S), boxes(qref, qaxis, L)
    grid = None if kb is None else patch_grid(kb)
    if grid is None and s.token_length() is not None:
        return (
            None,
            "this run's inputs are sequences of token ids: its tokens are shown by position",
        )
    if grid is None:
        return None, (
            "its tokens are not shown on the image: lurker could not follow them from a "
            "patch embedding (a conv's grid flattened into tokens) to this op's key"
            if kb is None
            else "its key tokens' patches do not tile one grid"
        )
    order, rows, cols, _ = grid
    cell = {t: [i // cols, i % cols] for i, t in enumerate(order)}
    at = {(b[0], b[2]): cell[t] for t, b in enumerate(kb) if b is not None}
    h, w = (int(n) for n in s.live_input(iid).shape[-2:])
    return AttentionPatches(
        rows=rows,
        cols=cols,
        image_size=[h, w],
        keys=[cell.get(t) for t in range(len(kb))],
        queries=[None if b is None else at.get((b[0], b[2])) for b in (qb or [None] * L)],
        boxes=[
            None if b is None else [max(b[0], 0), min(b[1], h), max(b[2], 0), min(b[3], w)]
            for b in kb
        ],
    ), None
