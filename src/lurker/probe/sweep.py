"""The probe's sweep: one pass over a dataset, statistics for every unit of every layer.

:func:`probe` runs four steps: plan (trace the model, pick the layers and their layouts),
restore (resume from a checkpoint or start afresh), sweep (the per-batch loop) and finish
(merge the ranks, write the run). Per batch, the traced model is re-run under the replay
mode, which hands the output of each selected op to every consumer
(:mod:`lurker.probe.consumers`) as it is produced, before any later in-place op can change
it; the per-unit statistics (:class:`~lurker.probe.stats.UnitStats`: one vectorised top-k
merge per layer, no per-image or per-unit Python loops, nothing stored per sample) are
one consumer. State is checkpointed every few batches (atomically), so a killed sweep
resumes where it stopped; under ``torchrun`` each rank sweeps its shard and the consumers
are merged with collectives.
"""

from __future__ import annotations

import array
import contextlib
import fnmatch
import functools
import gc
import hashlib
import inspect
import io
import json
import math
import numbers
import os
import re
import shlex
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import Trace, evaluating, settled_trace
from ..capture.trace import hidden_forward
from ..errors import LurkerError, MemoryLimitError, TraceError, close_names, warn
from ..graph.nodes import Op
from ..models import canonical_channel_dim, channels_first_view, default_device
from ..ops.catalogue import QUANTIZED_CONV, QUANTIZED_LINEAR, bind, packed_call
from ..store import Run, RunWriter, atomic_write_bytes, run_lock
from ..vocab import VocabLike, reads_ids
from .consumers import (
    EMBED_BUDGET,
    Batch,
    BatchConsumer,
    ChannelRangeConsumer,
    EmbeddingConsumer,
    LabelsConsumer,
    RelevanceConsumer,
    UnitStatsConsumer,
)
from .layout import (
    PATCH_TOKENS,
    UNIT_DIM_HINT,
    Layout,
    Skip,
    infer_layouts,
    op_names,
    reused_paths,
    rf_matches,
    rf_mismatch,
)
from .layout import layer_name as _layer_name
from .progress import Progress

CONV = {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    *QUANTIZED_CONV, "convolution", "_convolution",
}  # fmt: skip
LINEAR = {"linear", "addmm", *QUANTIZED_LINEAR}
ACTIVATIONS = {
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "gelu", "silu", "silu_", "sigmoid",
    "tanh", "elu", "elu_", "selu", "celu", "hardswish", "hardswish_", "hardsigmoid", "mish",
    "softplus", "hardtanh", "hardtanh_", "prelu", "glu",
}  # fmt: skip


ATTENTION = {"scaled_dot_product_attention", "_native_multi_head_attention"}
_PRODUCTS = {"matmul", "bmm", "baddbmm", "einsum", "mm"}


@dataclass
class Layer:
    """A selected op and how to read units out of its output (see :mod:`.layout`)."""

    op: Op
    name: str  # module path when the op produces a module's output, else the op label
    layout: Layout

    @property
    def width(self) -> int:
        """The number of units."""
        return int(self.op.shape[self.layout.unit])  # type: ignore[index]

    def units(self, t: Tensor) -> Tensor:
        """``t`` as the (B, C, *positions) view :class:`~.stats.UnitStats` takes."""
        return self.layout.units(t)


def _module_type(op: Op, trace: Trace) -> str | None:
    if not op.module_outputs:
        return None
    info = trace.modules.get(op.module_outputs[0].split(":")[0])
    return info.type if info else None


def _is_transformer(trace: Trace, linear: Collection[int] = ()) -> bool:
    """Attention anywhere: a fused attention op, a softmax over a product of two
    activations, or (factorized attention) a softmax inside a repeated block whose output
    weighs another activation. A softmax that weighs activations outside repeated blocks
    is a gate (a mixture of experts in a CNN), and one over a product with a weight
    (``linear``: ``feat @ W.t()``, a hand-written linear layer) is a classifier's
    probabilities unless it weighs activations in a block (learned queries' attention):
    neither makes the model a transformer."""
    blocks: set[str] | None = None
    for op in trace.ops:
        if op.name in ATTENTION:
            return True
        if op.name == "softmax":
            todo, seen = list(op.parents), 0
            while todo and seen < 4:  # the product, maybe scaled or masked on the way
                parent = trace.ops[todo.pop(0)]
                if parent.name in _PRODUCTS and not parent.params:
                    if parent.index not in linear:
                        return True
                    break  # a linear layer's output: attention only as below
                todo.extend(parent.parents[:1])
                seen += 1
            if blocks is None:
                blocks = _blocks(trace)
            if any(p in blocks for p, _ in op.modules) and _weights_activations(trace, op):
                return True
    return False


def _children(trace: Trace) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for op in trace.ops:
        for p in op.parents:
            out.setdefault(p, []).append(op.index)
    return out


#: Ops between a softmax or an attention projection and its product: shapes, scales, picks
_TO_PRODUCT = {
    "view", "reshape", "flatten", "unflatten", "transpose", "permute", "contiguous", "chunk",
    "split", "tensor_split", "unbind", "getitem", "dropout", "mul", "div", "softmax",
}  # fmt: skip


def _reaches(
    trace: Trace,
    start: int,
    kids: Mapping[int, list[int]],
    hit: Callable[[Op, int], bool],
    max_depth: int,
) -> bool:
    """Whether an op ``hit`` accepts (called with the op and the index it was reached
    from) follows ``start`` through at most ``max_depth`` reshapes, splits, picks and
    scales (:data:`_TO_PRODUCT`)."""
    todo, seen = [(start, 0)], {start}
    while todo:
        i, depth = todo.pop()
        for c in kids.get(i, ()):
            child = trace.ops[c]
            if c in seen or child.kind != "op":
                continue
            seen.add(c)
            if hit(child, i):
                return True
            if child.name in _TO_PRODUCT and depth < max_depth:
                todo.append((c, depth + 1))
    return False


def _weights_activations(trace: Trace, softmax: Op) -> bool:
    """Whether a softmax's output is multiplied with another activation (attention
    weights applied to values: CoaT's factorized attention softmaxes the keys, then
    ``k.T @ v``), not with a weight (a hand-written linear layer) nor nothing (a
    classifier's probabilities)."""

    def product_with_activation(op: Op, came_from: int) -> bool:
        if op.name not in _PRODUCTS or op.params:
            return False
        # another factor computed from the input, not from weights alone
        return any(trace.ops[p].parents for p in op.parents if p != came_from)

    return _reaches(trace, softmax.index, _children(trace), product_with_activation, 3)


def _feeds_attention(trace: Trace, op: Op, kids: Mapping[int, list[int]]) -> bool:
    """Whether ``op`` is an attention projection: its output reaches an attention op, an
    attention's softmax or a product with no weights (``q @ k.T``) through reshapes, splits,
    picks and scales only (BoTNet's ``qkv`` 1x1 convolution: queries, keys and values side
    by side, not features of the image)."""

    def attention(child: Op, _from: int) -> bool:
        return (
            child.name in ATTENTION
            or (child.name == "softmax" and _weights_activations(trace, child))
            or (child.name in _PRODUCTS and not child.params)
        )

    return _reaches(trace, op.index, kids, attention, 6)


_CONTAINERS = {"Sequential", "ModuleList", "ModuleDict"}


def _blocks(trace: Trace, mixed: bool = False) -> set[str]:
    """Module paths of repeated blocks: modules with submodules, not plain containers,
    with a sibling of the same type (``encoder.layers.encoder_layer_3``, Swin's
    ``features.1.0``, timm's ``blocks.5``); ``mixed``: also those in a plain container of
    two such modules or more, whatever their types (a hybrid's stage: BoTNet's
    ``stages.2`` runs a bottleneck block, then a self-attention block), whose outputs are
    block outputs too, though what runs inside them was probed as outside any block. Not
    inside a repeated block: there a plain container of composite modules is a block's own
    layers (MaxViT's MBConv: its conv and squeeze-and-excitation modules)."""

    def part(path: str) -> bool:
        # (a leaf that never ran is no layer of its parent: a quantized Linear's weights'
        # holder; a container iterated by hand never runs, and its modules do)
        info = trace.modules.get(path)
        return info is not None and bool(info.num_passes or info.children)

    def composite(path: str) -> bool:
        info = trace.modules.get(path)
        return info is not None and info.type not in _CONTAINERS and any(map(part, info.children))

    plain = _blocks(trace) if mixed else set()
    out = set()
    for path, info in trace.modules.items():
        parent = trace.modules.get(info.parent) if info.parent is not None else None
        if not path or parent is None or not composite(path):
            continue
        same = [
            c for c in parent.children if c in trace.modules and trace.modules[c].type == info.type
        ]
        if len(same) >= 2 or (
            mixed
            and parent.type in _CONTAINERS
            and sum(map(composite, parent.children)) >= 2
            and not any(path.startswith(b + ".") for b in plain)
        ):
            out.add(path)
    return out


#: Ops between an MLP's first linear and its activation that keep its hidden units: norms
#: (LeViT's, EfficientFormer's), reshapes, the chunk of a gated MLP (EVA-02's SwiGLU) and
#: a cast (a quantized Linear's result cast back to its input's dtype)
_MLP_THROUGH = {
    "batch_norm", "layer_norm", "group_norm", "rms_norm", "dropout", "view", "reshape",
    "reshape_as", "view_as", "flatten", "unflatten", "transpose", "permute", "contiguous",
    "chunk", "split", "tensor_split", "to",
}  # fmt: skip


def _conv_kind(op: Op) -> str | None:
    """``"widening"`` for a 1x1 convolution of all channels to more channels (a linear
    layer per position, as a convolutional MLP's first layer: a ResNet bottleneck's first
    1x1 narrows them, and is no MLP), ``"depthwise"`` for one filter per channel; None for
    other convolutions."""
    with contextlib.suppress(TypeError):
        packed = packed_call(op.name, op.meta.get("packed"))  # a quantized conv's
        args = packed if packed is not None else bind(op.name, op.args, op.kwargs, op.target)
        shape = tuple(getattr(args.get("weight"), "shape", ()))
        groups = args.get("groups", 1)
        if len(shape) >= 3 and groups == 1 and all(k == 1 for k in shape[2:]):
            # (out, in, 1, 1), a transposed convolution's (in, out, 1, 1)
            transposed = "transpose" in op.name or args.get("transposed")
            c_out, c_in = (shape[1], shape[0]) if transposed else shape[:2]
            return "widening" if c_out > c_in else None
        if len(shape) >= 3 and isinstance(groups, int) and groups > 1 and shape[1] == 1:
            return "depthwise"
    return None


#: Ops that pool a map for a squeeze-and-excitation block's 1x1 convolutions
_POOLS = {"mean", "sum", "amax", "adaptive_avg_pool2d", "adaptive_max_pool2d"}


def _of_pooled_map(trace: Trace, conv: Op) -> bool:
    """Whether a 1x1 convolution runs on a globally pooled map (a squeeze-and-excitation
    block's, directly or after its first convolution): channel attention, not an MLP."""
    cur = conv
    for _ in range(6):
        if not cur.parents:
            return False
        cur = trace.ops[cur.parents[0]]
        if cur.name in _POOLS:
            return True
        if cur.name not in CONV | ACTIVATIONS or any(n != 1 for n in (cur.shape or ())[2:]):
            return False
    return False


def _mlp_hidden(trace: Trace, op: Op, linear: Collection[int] = ()) -> bool:
    """An activation fed by a linear layer (or a 1x1 convolution that widens the
    channels): directly, or through
    ops that keep its units (norms, reshapes, a gated MLP's chunk, a depthwise convolution:
    PVTv2's MLP). A 3x3 convolution or another activation on the way ends the search, so a
    CNN stem's activations are not MLP layers; nor are a squeeze-and-excitation block's
    (1x1 convolutions of the pooled map)."""
    cur = op
    for _ in range(8):
        if not cur.parents:
            return False
        cur = trace.ops[cur.parents[0]]
        if cur.name in LINEAR or cur.index in linear:
            return True
        if cur.name in CONV:
            kind = _conv_kind(cur)
            if kind == "widening":
                return not _of_pooled_map(trace, cur)
            if kind != "depthwise":
                return False
        elif cur.name not in _MLP_THROUGH:
            return False
    return False


def _cast_back(
    trace: Trace, op: Op, kids: Mapping[int, list[int]], layouts: Mapping[int, Layout | Skip]
) -> Op:
    """A quantized Linear's module output, where ``op`` is its ``quantized_linear_dynamic``: the
    module casts the result back to its input's dtype (``Y.to(x.dtype)``), and that cast,
    not the op, is the module's output, so the layer goes by its path (``fc1``) as a
    float Linear's does. Any other op is itself."""
    if op.name not in QUANTIZED_LINEAR or len(kids.get(op.index, ())) != 1:
        return op
    cast = trace.ops[kids[op.index][0]]
    if cast.name == "to" and cast.module_outputs and isinstance(layouts.get(cast.index), Layout):
        return cast
    return op


def _default_ops(
    trace: Trace, candidates: list[Op], layouts: Mapping[int, Layout | Skip] | None = None
) -> list[Op]:
    """CNNs: every conv, linear and activation op with a unit axis besides the batch:
    (B, C), (B, C, L), (B, C, H, W), and a video model's (B, C, D, H, W). A product of an
    activation with a weight (``x @ W.t()``, an einsum: ``layouts`` says which) is a
    linear layer too.

    Transformers: the outputs of repeated blocks, the MLP hidden layers (an activation fed
    by a linear, see :func:`_mlp_hidden`) and convs outside the blocks (patch embeddings,
    stems) but attention projections; not the reshapes and attention internals between."""
    linear = {
        op.index
        for op in candidates
        if op.name in _PRODUCTS
        and isinstance(lay := (layouts or {}).get(op.index), Layout)
        and lay.source == "linear"
    }
    if not _is_transformer(trace, linear):
        kids = _children(trace)
        return [
            _cast_back(trace, op, kids, layouts or {})
            for op in candidates
            if (op.name in CONV | LINEAR | ACTIVATIONS or op.index in linear)
            and len(op.shape or ()) >= 2
        ]
    blocks, outputs = _blocks(trace), _blocks(trace, mixed=True)
    kids = _children(trace)

    def in_block(op: Op) -> bool:
        return any(path in blocks for path, _ in op.modules)

    def wanted(op: Op) -> bool:
        if {m.split(":")[0] for m in op.module_outputs} & outputs:
            return True  # a block's output
        if op.name in ACTIVATIONS:  # an MLP's hidden layer
            return _mlp_hidden(trace, op, linear)
        return op.name in CONV and not in_block(op) and not _feeds_attention(trace, op, kids)

    return [op for op in candidates if wanted(op)]


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_FEED_CLI = "lurker probe feeds the model one batch of images per forward: a tensor (N, C, H, W)"
_FEED_PY = (
    "probe feeds the model one tensor per batch, the dataset's items stacked on a new first "
    "(batch) axis"
)
_WRAP_CLI = (
    "pass as MODEL a function that builds the wrapper (path/to/file.py:build); `lurker "
    "probe` has no option for other inputs"
)
_SPATIAL_OPS = re.compile(r"(conv|conv_transpose|max_pool|avg_pool|adaptive_\w+_pool|lp_pool)(\d)d")


def _trace_first(
    model: nn.Module,
    x0: Tensor,
    plain: nn.Module | None = None,
    channel_dim: int | None = None,
    data_by_code: bool = False,
) -> Trace:
    """Trace ``model`` on the first sample; where it cannot take one tensor of that shape,
    an error that says what the probe feeds it, what it wanted, and what to do (the trace's
    own advice names ``lurker trace``'s input options, which the probe does not have).
    ``model`` is the model as fed: ``plain`` (the user's) where ``channel_dim`` is None or
    1, else its :func:`channels_first_view`. ``data_by_code``: the CLI's dataset is made by
    code (``--data file.py:fn``), which ``--image-size`` cannot resize (the CLI refuses it):
    the fix is then in the dataset function."""
    need = _required_inputs(model)
    if len(need) > 1:
        py, cli = _more_inputs_error(model, x0, need)
        raise LurkerError(py, cli=cli)
    try:
        with torch.no_grad():
            return settled_trace(model, x0)
    except MemoryLimitError:
        raise
    except TraceError as e:
        layout = _other_layout(plain or model, x0, channel_dim)  # the fix, where it is one
        py, cli = _probe_trace_error(model, x0, e, wrap=layout is None)
        if layout is not None:
            py, cli = f"{py} {layout[0]}", f"{cli} {layout[1]}"
        size = _declared_size(plain or model, x0) if layout is None else None
        if size is not None:
            said = (
                f" The model's config (pretrained_cfg) gives its input size as {size[0]}x"
                f"{size[1]}, and the images here are {x0.shape[-2]}x{x0.shape[-1]}: many "
                "models only run at their own size"
            )
            py += f"{said}; resize the images to it (load_dataset(DATA, {size[0]}))."
            cli += (
                f"{said}; make the dataset function return {size[0]}x{size[1]} images "
                "(--image-size does not resize a dataset made by code)."
                if data_by_code
                else f"{said}; probe with --image-size {size[0]}."
            )
        raise TraceError(py, partial=e.partial, failed_op=e.failed_op, cli=cli) from e


def _declared_size(model: nn.Module, x0: Tensor) -> tuple[int, int] | None:
    """The (H, W) a model says it takes (timm's ``pretrained_cfg["input_size"]``, which
    models with position tables or attention biases of a fixed grid need) where an image
    batch ``x0`` has another size; None where it says none or ``x0`` has it."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
    if x0.dim() != 4 or not isinstance(size, (tuple, list)) or len(size) != 3:
        return None
    if not all(isinstance(v, int) and v > 0 for v in size[1:]):
        return None
    h, w = int(size[1]), int(size[2])
    return None if (h, w) == tuple(x0.shape[-2:]) else (h, w)


def _other_layout(plain: nn.Module, x0: Tensor, channel_dim: int | None) -> tuple[str, str] | None:
    """Where the model failed on the image batch as fed, whether ``plain`` (the user's
    model) runs with the channels on another axis: then the fix is ``channel_dim``, said in
    Python's and the CLI's words (None where that does not help either, or the input is
    not an image batch)."""
    if x0.dim() != 4:
        return None
    given = channel_dim not in (None, 1)
    try:  # a model that runs on the batch as fed failed in its trace for another reason
        with torch.no_grad():
            plain(x0.movedim(1, channel_dim) if given else x0)
        return None
    except Exception:
        pass
    try:  # the layout the model was not fed
        with torch.no_grad():
            plain(x0 if given else x0.movedim(1, -1))
    except Exception:
        return None
    if given:
        said = (
            f"It runs on the images as (N, C, H, W) {tuple(x0.shape)}: it takes its "
            f"channels on axis 1, not {channel_dim}"
        )
        return f"{said}; leave channel_dim unset.", f"{said}; leave out --channel-dim."
    last = tuple(x0.movedim(1, -1).shape)
    said = f"It runs on the images with their channels last (N, H, W, C) {last}"
    return f"{said}: probe it with channel_dim=-1.", f"{said}: probe it with --channel-dim -1."


def _required_inputs(model: nn.Module) -> list[str]:
    """Names of the arguments ``model.forward`` cannot do without (positional ones first)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    empty = inspect.Parameter.empty
    pos = [p.name for p in params if p.kind in _POSITIONAL and p.default is empty]
    kw = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is empty]
    return pos + kw if pos else []


def _more_inputs_error(model: nn.Module, x0: Tensor, need: list[str]) -> tuple[str, str]:
    """Python and CLI messages for a model whose forward needs more than one input."""
    name = type(model).__name__
    listed = ", ".join(need)
    others = ", ".join(need[1:])
    shape = tuple(x0.shape)
    head = f"{name}.forward takes {len(need)} required inputs ({listed}), and "
    py = (
        f"{head}{_FEED_PY} (here {shape}), passed as its first argument ({need[0]}): the "
        f"probe has no way to pass {others}. Wrap the model in a module whose forward takes that one "
        f"tensor and makes {others} itself (fixed values, or computed from the input), and "
        "probe the wrapper."
    )
    cli = (
        f"{head}{_FEED_CLI} (here {shape}), passed as its first "
        f"argument ({need[0]}). Wrap the model in a module whose forward takes one image "
        f"batch and makes {others} itself (fixed values, or computed from the image), and "
        f"{_WRAP_CLI}."
    )
    return py, cli


def _wanted_dims(model: nn.Module, e: TraceError) -> int | None:
    """The number of spatial dims the model's input layer works on (1, 2, 3), where the
    failed op or else the model's first convolution tells."""
    if e.partial is not None and e.failed_op is not None:
        with contextlib.suppress(Exception):
            m = _SPATIAL_OPS.fullmatch(e.partial[e.failed_op].name)
            if m:
                return int(m.group(2))
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return len(conv.kernel_size) if conv is not None else None


def _probe_trace_error(
    model: nn.Module, x0: Tensor, e: TraceError, *, wrap: bool = True
) -> tuple[str, str]:
    """The trace's error, put in the probe's terms (Python and CLI messages); ``wrap``:
    with the advice to wrap the model (not where the fix is another option)."""
    shape = tuple(x0.shape)
    py, cli = str(e), e.for_cli()
    advice = e.input_advice  # the trace's, naming options the probe does not have
    about_input = advice is not None
    if advice:
        py, cli = (m.replace(" " + advice, "").replace(advice, "") for m in (py, cli))
    wanted = ""
    n = _wanted_dims(model, e) if about_input else None  # else the input may be fine
    if n is not None and n + 2 != x0.dim():
        axes = {1: "(N, C, L): a sequence or signal", 3: "(N, C, D, H, W): a video or volume"}
        what = axes.get(n, f"with {n} spatial axes")
        wanted = f" The model wants a {n + 2}-D input {what}."
        about_input = True
    py = f"{_FEED_PY} (here {shape}), and the model failed on the first: {py}{wanted}"
    cli = f"{_FEED_CLI} (here {shape}), and the model failed on the first: {cli}{wanted}"
    if about_input and wrap:
        example = " (for a video model, e.g. x.unsqueeze(2): a clip of one frame)" if n == 3 else ""
        py += (
            " Pass a dataset whose items are (input, label), each input shaped as the "
            "model's one input without the batch axis"
            + (" (for a video model, (C, D, H, W) clips)" if n == 3 else "")
            + ", or wrap the model in a module whose forward takes a batch of the dataset's "
            "items and makes the model's input from it."
        )
        cli += (
            " To probe it, wrap it in a module whose forward takes one image batch and makes "
            f"the model's input from it{example}, and {_WRAP_CLI}."
        )
    return py, cli


def _has_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def select_layers(
    trace: Trace,
    layers: Sequence[str] | str | None = None,
    *,
    unit_dim: int | Mapping[str, int] | None = None,
    skipped: list[tuple[str, str]] | None = None,
    layouts: Mapping[int, Layout | Skip] | None = None,
) -> list[Layer]:
    """Pick the layers to probe, each with its layout (which axis holds the units).

    Default: for CNNs every conv and linear op and every activation function; for
    transformers the block outputs and MLP hidden layers. ``layers`` may name op labels
    (``conv2d_3``), module paths (``features.10``), module types (``Conv2d``) or op names
    (``relu``), globs allowed. Ops whose units lurker cannot locate (see
    :func:`~lurker.probe.layout.infer_layouts`) are left out and appended to ``skipped`` as
    ``(name, reason)``; a layer named exactly (no glob, not a type or op name) that cannot
    be probed raises :class:`LurkerError` with the reason. ``unit_dim`` names the unit
    axis: an int for every selected layer, or ``{pattern: axis}``.
    """
    candidates = [
        op for op in trace.ops if op.kind == "op" and op.shape is not None and len(op.shape) >= 2
    ]
    types = {op.index: [t] for op in candidates if (t := _module_type(op, trace))}
    if layouts is None:
        layouts = infer_layouts(trace, unit_dim=unit_dim, names=types)
    exact: set[int] = set()
    unbatched = _unbatched(trace, layouts)
    if layers is None:
        chosen = _default_ops(trace, candidates, layouts)
        for op, why in unbatched:  # a conv or linear a default would probe: say why not
            if skipped is not None and op.name in CONV | LINEAR:
                skipped.append((_layer_name(op, trace), why))
    else:
        pats = [layers] if isinstance(layers, str) else list(layers)
        chosen = []
        unmatched = set(pats)
        for op in candidates:
            names = op_names(op, types)
            hit = [p for p in pats if any(fnmatch.fnmatchcase(n, p) for n in names)]
            if hit:
                chosen.append(op)
                unmatched.difference_update(hit)
                specific = [op.label, op.rolled, *op.module_outputs, *reused_paths(op)]
                if any(not _has_glob(p) and p in specific for p in hit):
                    exact.add(op.index)
        for op, why in unbatched:  # named exactly, but no candidate: why, not "no match"
            if unmatched & {op.label, op.rolled, *op.module_outputs, *reused_paths(op)}:
                raise _cannot_probe(op, _layer_name(op, trace), why, False)
        if unmatched:
            valid = sorted({_layer_name(op, trace) for op in candidates})
            shown = ", ".join(valid[:60]) + (" ..." if len(valid) > 60 else "")
            close = [
                c
                for p in sorted(unmatched)
                for c in close_names(p, [n for op in candidates for n in op_names(op, types)], n=3)
            ]
            said = f" Close names: {', '.join(dict.fromkeys(close))}." if close else ""
            raise LurkerError(
                f"No layer matches {sorted(unmatched)}.{said} Name op labels, module paths, "
                f"module types or op names (globs allowed). Layers with channels here: {shown}"
            )
    if isinstance(unit_dim, Mapping):
        keys = [n for op in chosen for n in op_names(op, types)]
        unused = [p for p in unit_dim if not any(fnmatch.fnmatchcase(n, p) for n in keys)]
        if unused:
            shown = ", ".join(sorted({_layer_name(op, trace) for op in chosen})[:40])
            raise LurkerError(
                f"unit_dim names {unused}, which match none of the layers to probe ({shown}). "
                "Use their names (globs allowed), or select the layer with layers=."
            )
    out: list[Layer] = []
    seen: set[int] = set()
    unit_dim_helped = False  # a layer left out that naming its unit axis could make probed
    for op in chosen:
        if op.index in seen:
            continue
        seen.add(op.index)
        lay = layouts.get(op.index)
        if isinstance(lay, Layout):
            out.append(Layer(op, _layer_name(op, trace), lay))
            continue
        if layers is None and not (isinstance(lay, Skip) and lay.per_sample):
            continue  # weights or position tables computed in forward: not activations
        reason = lay.reason if isinstance(lay, Skip) else "it is not a per-sample activation"
        name = _layer_name(op, trace)
        helps = isinstance(lay, Skip) and lay.unit_dim_helps
        if op.index in exact:
            raise _cannot_probe(op, name, reason, helps)
        unit_dim_helped = unit_dim_helped or helps
        if skipped is not None:
            skipped.append((name, reason))
    names = Counter(layer.name for layer in out)
    clash = sorted(n for n, c in names.items() if c > 1)
    if clash:  # (a module path that is also another op's label): before any work is done
        raise LurkerError(
            f"Layer names {clash} would each stand for several ops (a module's path equals "
            "another op's label); leave one of each out with layers=[...]."
        )
    if not out:
        why = "; ".join(f"{n}: {r.removesuffix(UNIT_DIM_HINT)}" for n, r in (skipped or [])[:5])
        head = "No layer with a unit (channel) axis was found to probe" + (
            f" ({why})" if why else ""
        )
        tail = ("name layers explicitly with layers=", "name layers explicitly with --layers")
        if unit_dim_helped:
            tail = (
                tail[0] + ", with unit_dim={LAYER: AXIS} where lurker cannot tell the axis",
                tail[1] + ", with --unit-dim LAYER=AXIS where lurker cannot tell the axis",
            )
        raise LurkerError(f"{head}; {tail[0]}.", cli=f"{head}; {tail[1]}.")
    return out


def _unbatched(trace: Trace, layouts: Mapping[int, Layout | Skip]) -> list[tuple[Op, str]]:
    """Ops the model leaves with no batch axis at the traced batch of one (``x.squeeze()``),
    with why: not candidates (their output has under two axes there), but a default conv
    or linear among them, or one named, is told why instead of left out without a word."""
    out = []
    for op in trace.ops:
        lay = layouts.get(op.index)
        if op.kind == "op" and len(op.shape or (0, 0)) < 2 and isinstance(lay, Skip):
            out += [(op, lay.reason)] if lay.per_sample else []
    return out


def _cannot_probe(op: Op, name: str, reason: str, unit_dim_helps: bool) -> LurkerError:
    """The error for a layer named exactly that cannot be probed: advice only where it can
    work (naming the unit axis does not unfold a batch), once, in the words of the
    interface in use (``unit_dim=`` from Python, ``--unit-dim`` on the command line)."""
    text = (
        f"Layer {name!r} ({op.label}, output {list(op.shape or ())}) cannot be probed: "
        f"{reason.removesuffix(UNIT_DIM_HINT)}."
    )
    if not unit_dim_helps:
        return LurkerError(text)
    py = f" If you know which axis holds its units, pass unit_dim={{{name!r}: AXIS}}"
    cli = f" If you know which axis holds its units, pass --unit-dim {name}=AXIS"
    axes = ", counting the batch axis (negative: from the end)."
    return LurkerError(text + py + axes, cli=text + cli + axes)


def fingerprint(model: nn.Module) -> str:
    """Identifies a model by architecture AND weights, to refuse mixing two models' runs.

    Hashes names, shapes and a strided sample of up to 4,096 values per tensor: cheap even
    for large models, and two different trainings differ at sampled positions.
    """
    h = hashlib.sha1(type(model).__name__.encode())
    with torch.no_grad():
        for name, p in _state_leaves(model.state_dict().items()):
            if not isinstance(p, Tensor):  # a quantized Linear's dtype, say
                h.update(f"{name}{_stable_repr(p)}".encode())
                continue
            if p.is_quantized:  # its int values have no float64 view
                p = p.dequantize()
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            if p.numel():
                flat = p.detach().flatten()
                sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float64)
                h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _state_leaves(items: Iterator[tuple[str, Any]] | Any) -> Iterator[tuple[str, Any]]:
    """A state dict's entries with its tuples and lists opened: a dynamically quantized
    Linear keeps ``_packed_params._packed_params`` as a (weight, bias) tuple."""
    for name, value in items:
        if isinstance(value, (tuple, list)):
            yield from _state_leaves((f"{name}.{i}", v) for i, v in enumerate(value))
        else:
            yield name, value


def _stable_repr(value: Any) -> str:
    """``repr`` for plain values; the type's name for other objects, whose repr may hold
    an address that differs from one process to the next (and so the fingerprint)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return repr(value)
    return type(value).__name__


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank, which all have received on return: a rank that
    then stops (an error all raise) does not close its connections on a rank still
    receiving (gloo aborts that process: "terminate called without an active exception")."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    torch.distributed.barrier()
    return box[0]


def _stop_with_rank0(refused: LurkerError | None, world: int) -> None:
    """Raise rank 0's error (None: go on) on every rank, marked ``every_rank`` under
    torchrun, so that each stops with it rather than in its next collective and the CLI
    says it once."""
    if world > 1:
        refused = _from_rank0(refused)
    if refused is not None:
        refused.every_rank = world > 1
        raise refused


def _one_writer(fn: Callable[..., Run | None]) -> Callable[..., Run | None]:
    """Run ``fn`` holding the run directory's lock (rank 0, the only writer, takes it):
    a second probe into the same ``out`` fails at once instead of redoing the sweep."""

    @functools.wraps(fn)
    def locked(*args: Any, out: str | os.PathLike[str], **kwargs: Any) -> Run | None:
        kwargs = _check_args(**kwargs)  # before the lock creates the directory
        rank, world = _dist()
        with contextlib.ExitStack() as held:
            held.enter_context(_older_objects_frozen())
            refused: LurkerError | None = None
            if rank == 0:
                try:
                    held.enter_context(run_lock(out))
                except LurkerError as err:
                    refused = err
            _stop_with_rank0(refused, world)
            return fn(*args, out=out, **kwargs)

    return locked


@contextlib.contextmanager
def _older_objects_frozen() -> Iterator[None]:
    """Leave the objects alive before the probe (torch's, the model's, the caller's) out
    of the cyclic garbage collector's full collections while it runs: one walks all of
    them, a tenth of a second in a process that imported torch and torchvision, and the
    sweep's allocations set one off every run or two of a small dataset. The probe's own
    garbage is collected as before, and the older objects are tracked again afterwards
    (cyclic garbage made before the probe and not yet collected waits until it ends, as it
    would until the next full collection). Left alone where the caller froze objects."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _check_args(**kwargs: Any) -> dict[str, Any]:
    """Refuse arguments the sweep cannot use before anything is traced or created; return
    them with integer ones as Python ints (numpy ones would not go into the run's JSON)."""
    at_least = {"k": 1, "batch_size": 1, "num_workers": 0, "hist_bins": 2}
    options = {"k": " (CLI: --k)", "batch_size": " (CLI: -b)", "num_workers": " (CLI: --workers)"}
    for name, low in at_least.items():
        value = kwargs.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < low:
            raise LurkerError(
                f"probe: {name} must be an integer >= {low}, got {value!r}{options.get(name, '')}."
            )
        kwargs[name] = int(value)
    every = kwargs.get("checkpoint_every")
    if every is not None and (not _is_int(every) or every < 1):
        raise LurkerError(
            f"probe: checkpoint_every must be None or an integer >= 1, got {every!r}."
        )
    seconds = kwargs.get("checkpoint_seconds")
    if seconds is not None and not (isinstance(seconds, (int, float)) and seconds >= 0):
        raise LurkerError(f"probe: checkpoint_seconds must be a number >= 0, got {seconds!r}.")
    return kwargs


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@_one_writer
def probe(
    model: nn.Module,
    dataset: Any,
    *,
    out: str | os.PathLike[str],
    layers: Sequence[str] | str | None = None,
    k: int = 9,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float = 30.0,
    hist_bins: int = 64,
    overwrite: bool = False,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    unit_dim: int | Mapping[str, int] | None = None,
    relevance: bool | str = False,
    embed: bool | str = False,
    channel_dim: int | None = None,
    vocab: VocabLike | None = None,
) -> Run | None:
    """Sweep ``dataset`` once through ``model`` and store per-unit statistics in ``out``.

    ``dataset`` is any torch Dataset of (image, label), or one from
    :mod:`lurker.probe.data`. State is checkpointed every ``checkpoint_seconds`` (and
    every ``checkpoint_every`` batches, if given); rerunning the same call after an
    interruption resumes it. Under ``torchrun`` every rank sweeps its shard and rank 0
    writes the merged run. Arguments are checked before anything is created; while the
    probe runs, its process holds ``out`` (a second probe into it fails at once). The same
    call on a run it finished sweeps nothing (``overwrite=True`` sweeps it again).
    ``progress``: a bar on stderr when it is a terminal, one output redrawn in place in a
    notebook, else a line every 10 seconds.

    Each layer's batch, unit and position axes are found from the trace (see
    :mod:`lurker.probe.layout`); layers whose units cannot be located are skipped, printed
    and listed in the run's meta (``skipped_layers``). ``unit_dim`` names the unit axis
    (counting the batch axis) for every layer, or per layer as ``{pattern: axis}``.

    ``relevance`` (True, or an LRP composite name as for ``lurker.explain``) adds each
    unit's relevance-max list: the samples where the unit carried the most LRP relevance
    for the model's prediction (``unit.top("relevance")``). It costs one LRP forward and
    backward per batch on top of the sweep's forward.

    ``embed`` (True, or a layer name) keeps every sample's feature vector at that layer
    (mean-pooled over its positions, float16) with the model's prediction and confidence,
    for the dataset map (``lurker.make_map``, ``lurker map RUN``). True takes the
    penultimate layer: the input of the model's last linear op. It costs nothing beyond
    the sweep's forward; the features must fit a budget of 4 GiB.

    ``channel_dim`` is the axis of the model's input that holds the channels, for a model
    that takes its images channels-last (``-1``: ``(N, H, W, C)``); the dataset's
    ``(C, H, W)`` images are batched as ``(N, C, H, W)`` and moved there
    (:func:`lurker.models.channels_first_view`). The run records it, so that its unit
    images and the explorer's live view feed the model the same way.

    ``vocab`` (a text model's: its tokens by id as a list, a ``{token: id}`` dict as a
    tokenizer's ``get_vocab()`` gives, or a callable id -> token; default the dataset's
    ``vocab`` or ``itos`` attribute) is stored in the run, so that the explorer shows
    words beside the ids. It must name every id the embedding can look up (else every id
    seen); a vocabulary for inputs that are not token ids is refused. A dataset's
    ``pad_id``, ``pad_token_id`` or ``pad_index`` is stored too: the explorer pads with it.

    The model is swept in eval mode and left in the mode it came in (each module's
    ``training`` flag restored, however the call ends).

    Returns the written :class:`~lurker.store.Run` on rank 0 (always, without
    ``torchrun``), and ``None`` on the other ranks, which write nothing.
    """
    hidden = hidden_forward(model)
    if hidden is not None:  # no layers to probe (and torch's own error, deep inside)
        raise LurkerError(f"probe: cannot find the layers of this model: {hidden[0]}.")
    with evaluating(model):  # a model probed between training epochs goes on training
        with before_sweep():
            plan = _plan(
                model,
                dataset,
                out=Path(out),
                layers=layers,
                k=k,
                batch_size=batch_size,
                device=device,
                num_workers=num_workers,
                checkpoint_every=checkpoint_every,
                checkpoint_seconds=checkpoint_seconds,
                hist_bins=hist_bins,
                progress=progress,
                meta=meta,
                unit_dim=unit_dim,
                relevance=relevance,
                embed=embed,
                channel_dim=channel_dim,
                vocab=vocab,
            )
            writer = _open_writer(plan, overwrite)
            _check_checkpoints_world(plan, writer)
            if _finished_before(plan, writer):
                return Run.open(plan.out) if plan.rank == 0 else None
            consumers = _consumers(plan)
            start = _restore(plan, writer, consumers)
        swept = _sweep(plan, consumers, start)  # (says itself what a signal left)
        return _finish(plan, writer, consumers, swept)


def input_noun(x0: torch.Tensor, ids: bool) -> str:
    """What the samples of a batch ``x0`` are, for the probe's rate ("images/s"): token ids
    (``ids``: a lookup reads the input, as the explorer tells them) and feature vectors
    (integer counts and samples of a signal included) are no images."""
    if x0.dim() == 4:
        return "images"
    if x0.dim() == 5:
        return "clips"
    if x0.dim() == 2:
        return "sequences" if ids and not x0.is_floating_point() else "vectors"
    return "samples"


@dataclass
class _Plan:
    """What a probe call will do, settled before the sweep: the model on its device, the
    dataset and this rank's shard of it, the traced graph, the layers to probe and the
    run's meta. Everything after it reads this, so each step stays a small function."""

    model: nn.Module
    ds: Any  # a lurker.probe.data wrapper
    dev: torch.device
    rank: int
    world: int
    trace: Trace
    rfs: dict[int, Any]  # op index -> receptive field, where one could be computed
    #: op index -> why it has none (the op that broke the chain), for ops after the input
    rf_gaps: dict[int, str]
    layers: list[Layer]
    layer_skips: list[tuple[str, str]]  # (layer, why its units cannot be located)
    #: every sample's label (-1: none) where the dataset tells them without reading its
    #: items (``targets``); None: they are collected from the items as the sweep reads them
    #: (a :class:`LabelsConsumer`), so that each item is read once
    labels: list[int] | None
    classes: list[str]  # the run's classes, so far as known before the sweep
    run_meta: dict[str, Any]
    out: Path
    k: int
    batch_size: int
    num_workers: int
    checkpoint_every: int | None
    checkpoint_seconds: float
    hist_bins: int
    progress: bool
    relevance: str | None = None  # LRP composite of the relevance-max lists ("": default)
    embed: Layer | None = None  # the layer whose per-sample features are kept
    #: on a run of signals, ``(C, channel axis)`` (the axis None for a waveform ``(T,)``):
    #: each channel's range over the dataset is recorded (meta ``channel_range``)
    signal: tuple[int, int | None] | None = None

    first: str = ""  # digest of the first image (the traced input), as loaded
    inputs: str = "images"  # what a sample is, in the progress line's rate ("images/s")

    @functools.cached_property
    def data_key(self) -> str:
        """The dataset as a checkpoint records it: its size, its labels in order (where it
        tells them without reading its items: reading them all for this would double the
        cost of a sweep), its files and the indices a ``Subset`` takes. A run's ``dataset``
        meta names only the type of an in-memory dataset, so another dataset of that type
        (a new random subset) must not continue this one's statistics. Not the images: a
        dataset with random transforms must still resume."""
        known = self.labels is not None
        h = hashlib.sha1(array.array("q", self.labels).tobytes() if known else b"from items")
        h.update(repr((self.ds.paths, self.ds.source_indices(), _subset_indices(self.ds))).encode())
        # a dataset made by code (`--data file.py:fn`): a few of its items, so that an
        # unseeded random one made again does not continue the statistics of another (their
        # exact parts only: a float item's sums may differ by roundoff on another machine,
        # which the server's check allows)
        fingerprint = self.run_meta["config"].get("data_fingerprint")
        if fingerprint is not None:
            exact = [[e.get(k) for k in ("item", "shape", "label", "sha256")] for e in fingerprint]
            h.update(repr(exact).encode())
        return f"{len(self.ds)}:{h.hexdigest()[:16]}"

    @property
    def settings(self) -> dict[str, Any]:
        """What the results depend on beyond what resuming checks (model, dataset, k and
        image size): a complete run probed with the same settings is not swept again."""
        return {
            "layers": [[x.name, x.layout.to_dict()] for x in self.layers],
            "data": self.data_key,
            # the images themselves, as far as one tells: the first as loaded (other files
            # under the same names, another normalization)
            "first_image": self.first,
            "hist_bins": self.hist_bins,
            "relevance": self.relevance,
            "embed": None if self.embed is None else self.embed.name,
            # (only where set: a run probed before the option existed is the same probe)
            **({"channel_dim": dim} if (dim := self.run_meta["config"].get("channel_dim")) else {}),
        }

    @property
    def num_classes(self) -> int:
        """The run's classes known before the sweep (none for an unlabelled dataset: no
        class means to store); labels read from the items may add more as it meets them."""
        return len(self.classes)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def shard(self) -> list[int]:
        """This rank's sample indices: disjoint shards, no padding duplicates."""
        return list(range(self.rank, len(self.ds), self.world))

    @property
    def checkpoint(self) -> Path:
        name = f"checkpoint-rank{self.rank}.pt" if self.world > 1 else "checkpoint.pt"
        return self.out / name

    def describe(self, layer: Layer) -> dict[str, Any]:
        """A layer's stored description: every :class:`LayerResult` field but the
        statistics (the graph's side of a layer, which consumers do not know)."""
        op = layer.op
        rf = self.rfs.get(op.index)
        why = self.rf_gaps.get(op.index) if rf is None else None
        if rf is not None and not rf_matches(layer.layout, rf):
            why = rf_mismatch(layer.layout, op, self.trace, self.rfs)
            rf = None  # its y/x are not this layer's position axes
        if rf is None and layer.layout.boxes is not None:  # crops are the tokens' patches
            why = PATCH_TOKENS
        return {
            "name": layer.name,
            "module": op.module_outputs[0] if op.module_outputs else op.module,
            "op": op.label,
            "op_index": op.index,
            "kind": _module_type(op, self.trace) or op.name,
            "shape": tuple(n for d, n in enumerate(op.shape or ()) if d != layer.layout.batch),
            "rf": rf.to_dict() if rf is not None else None,
            "rf_reason": why,
            "layout": layer.layout.to_dict(),
        }


def _recorded_folder(dataset: Any) -> dict[str, str]:
    """The ``data`` a run records for lurker's own image folder given from Python, as
    ``lurker probe --data FOLDER`` records it, so that ``lurker serve``, ``lurker images``
    and ``lurker export`` read its images again (with the run's image size, channels and
    recorded mean and std). Only the folder itself: a ``Subset`` of it, or a subclass with
    its own loading, would be read back as other samples under the same ids."""
    from .data import ImageFolderDataset

    if type(dataset) is ImageFolderDataset:
        return {"data": str(dataset.root)}
    return {}


def _plan(
    model: nn.Module,
    dataset: Any,
    *,
    out: Path,
    layers: Sequence[str] | str | None,
    k: int,
    batch_size: int,
    device: str | torch.device | None,
    num_workers: int,
    checkpoint_every: int | None,
    checkpoint_seconds: float,
    hist_bins: int,
    progress: bool,
    meta: dict[str, Any] | None,
    unit_dim: int | Mapping[str, int] | None,
    relevance: bool | str = False,
    embed: bool | str = False,
    channel_dim: int | None = None,
    vocab: VocabLike | None = None,
) -> _Plan:
    """Trace the model on the first image, pick the layers and their layouts, and check
    that every rank holds the same model: all that can fail before the run is created."""
    from ..graph.receptive import receptive_fields
    from . import data as pdata

    composite = _relevance_composite(relevance)
    if composite is not None:
        _check_relevance_model(model)
    ds = pdata.wrap(dataset)
    if len(ds) == 0:
        raise LurkerError("The dataset is empty: nothing to probe.")
    rank, world = _dist()
    dev = torch.device(device if device is not None else default_device())
    if dev.type == "cuda" and world > 1 and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    plain = model
    channel_dim = canonical_channel_dim(channel_dim)  # one value per layout, checked
    # a channels-last model is fed through a view that moves the (N, C, H, W) batch's
    # channels (same modules and parameters: moving it to dev moves the model)
    model = channels_first_view(model, channel_dim).eval().to(dev)
    x0 = ds.first_image().unsqueeze(0).to(dev)
    if channel_dim is not None and x0.dim() != 4:
        raise LurkerError(
            f"probe: channel_dim={channel_dim} moves the channels of image batches (N, C, H, "
            f"W), and the dataset's items are {tuple(x0.shape[1:])}, not (C, H, W) images: "
            "leave channel_dim unset and give items shaped as the model's input",
            cli=f"--channel-dim {channel_dim} moves the channels of image batches (N, C, H, W), "
            f"and the dataset's images are {tuple(x0.shape[1:])}: leave out --channel-dim",
        )
    spec = (meta or {}).get("data")
    by_code = isinstance(spec, str) and pdata.is_code_spec(spec)
    tr = _trace_first(model, x0, plain, channel_dim, data_by_code=by_code)
    if rank == 0:
        _warn_scaled_again(tr, x0)
    rf_gaps: dict[int, str] = {}
    try:
        rfs = receptive_fields(tr, gaps=rf_gaps)
    except LurkerError:  # no image, clip or signal input: no positions to crop
        rfs = {}
    layer_skips: list[tuple[str, str]] = []
    types = {op.index: [t] for op in tr.ops if (t := _module_type(op, tr))}
    layouts = infer_layouts(tr, (x0,), unit_dim=unit_dim, names=types, rfs=rfs)
    selected = select_layers(tr, layers, unit_dim=unit_dim, skipped=layer_skips, layouts=layouts)
    if layer_skips and progress and rank == 0:
        # (a unit axis lurker cannot tell, or a batch folded with heads or windows)
        print(f"lurker: skipping {len(layer_skips)} layer(s) that cannot be probed as they are:")
        for name, reason in layer_skips:
            print(f"  {name}: {reason}")
    embed_layer = None
    if embed is not False and embed is not None:
        embed_layer = embed_layer_of(tr, embed, layouts=layouts, unit_dim=unit_dim)
        check_embed_budget(embed_layer, len(ds))
    all_labels = _labels(ds)
    # labels read from the items are met during the sweep: the classes named so far; none
    # where targets that are no class indices make the run unlabelled
    ignored = getattr(ds, "labels_ignored", None)
    classes = [] if ignored else _class_names(ds.class_names, all_labels or [])
    names = _feature_names(
        getattr(ds, "feature_names", None), tuple(x0.shape[1:]), x0.is_floating_point()
    )
    sample = tuple(x0.shape[1:])
    axis = _signal_channel_axis(tr, sample)
    if len(sample) == 1 and axis is not None:  # a waveform the model gives one channel
        sample = (1, sample[0])
    channels = _channel_names(
        getattr(ds, "channel_names", None), sample, x0.is_floating_point(), axis
    )
    rate = _sample_rate(getattr(ds, "sample_rate", None), sample, x0.is_floating_point())
    signal = None
    if axis is not None and x0.is_floating_point():
        signal = (sample[axis], None if x0.dim() == 2 else axis)
    run_meta = {
        "model": type(model).__name__,
        "model_fingerprint": fingerprint(model),
        "dataset": ds.description,
        "k": k,
        "image_size": list(x0.shape[2:]),
        "config": {
            "layers": [layer.name for layer in selected],
            "batch_size": batch_size,
            "hist_bins": hist_bins,
            "input_shape": list(x0.shape[1:]),
            "mean": ds.mean,
            "std": ds.std,
            # how the (C, H, W) images are laid out for the model: unit images and the
            # explorer's live view feed it the same way
            "channel_dim": channel_dim,
            **({"feature_names": names} if names is not None else {}),
            **({"channel_names": channels} if channels is not None else {}),
            **({"sample_rate": rate} if rate is not None else {}),
            **_recorded_folder(dataset),
            **(meta or {}),
            # a raw dataset (uint8 0..255) is reloaded raw whoever probed it: its mean 0 and
            # std 1 alone would read it back as [0, 1] floats the model scales again
            **({"normalize": "raw"} if getattr(ds, "raw", False) else {}),
        },
    }
    # the dataset as given, past lurker's wrapper (a `--data file.py:fn` one is wrapped):
    # its own vocab/itos attribute and its tensors are what the vocabulary is checked by
    given = dataset.dataset if isinstance(dataset, pdata.WrappedDataset) else dataset
    words = _run_vocab(vocab, given, tr, x0)
    if words is not None:
        run_meta["vocab"] = words
    pad = _run_pad_id(given, tr, x0)
    if pad is not None:
        run_meta["pad_id"] = pad
    if world > 1:
        prints: list[Any] = [None] * world
        torch.distributed.all_gather_object(prints, run_meta["model_fingerprint"])
        if len(set(prints)) > 1:
            raise LurkerError(
                f"The {world} processes hold different models (fingerprints {prints}): load "
                "the same weights on every rank before probing."
            )
    return _Plan(
        model=model,
        ds=ds,
        dev=dev,
        rank=rank,
        world=world,
        trace=tr,
        rfs=rfs,
        rf_gaps=rf_gaps,
        layers=selected,
        layer_skips=layer_skips,
        labels=all_labels,
        classes=classes,
        run_meta=run_meta,
        out=out,
        k=k,
        batch_size=batch_size,
        num_workers=num_workers,
        checkpoint_every=checkpoint_every,
        checkpoint_seconds=checkpoint_seconds,
        hist_bins=hist_bins,
        progress=progress,
        relevance=composite,
        embed=embed_layer,
        first=_digest(x0),
        inputs=input_noun(x0, reads_ids(tr)),
        signal=signal,
    )


#: Ops that pass the input's values on unchanged but for their dtype, layout or order
#: (``x.float() / 255``, a channels-last model's ``x.permute(0, 3, 1, 2)``, RGB to BGR
#: ``x[:, [2, 1, 0]]``): what follows them still reads the input's pixels.
_PASS_ON = frozenset(
    {
        *("float", "double", "half", "bfloat16", "to", "type", "contiguous", "clone"),
        *("movedim", "moveaxis", "permute", "transpose", "swapaxes", "swapdims", "flip"),
        *("reshape", "view", "unsqueeze", "squeeze", "getitem", "index_select"),
    }
)


def _real(value: Any) -> float | None:
    """``value`` as a float when it is a real number of any kind (Python's, numpy's),
    else None: a tensor, a string, a bool or anything else says nothing."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError, NotImplementedError):
        # NotImplementedError: a TorchScript object (a dynamically quantized Linear's
        # packed weights) that implements no number protocol
        return None


def raw_scaling(tr: Trace) -> str | None:
    """How the model treats its input as raw 0..255 pixels, from the trace, or None: the
    input (through casts and layout-only ops) divided by 255, multiplied by 1/255 (to a
    relative 1e-4, as a rounded 0.00392157 is), or cast to uint8. Only those forms: a
    model that merely compares or clamps its input says nothing."""
    derived = {op.index for op in tr.ops if op.is_input}
    for op in tr.ops:
        args = op.args
        first = args[0] if args else None
        if getattr(first, "index", None) not in derived or op.is_input:
            continue
        if op.dtype == "uint8":
            return f"casts its input to uint8 ({op.name})"
        number = _real(args[1] if len(args) > 1 else op.kwargs.get("other"))
        if number is not None:
            if op.name in ("div", "div_", "true_divide", "true_divide_") and math.isclose(
                number, 255.0, rel_tol=1e-4
            ):
                return "divides its input by 255"
            if op.name in ("mul", "mul_", "multiply") and math.isclose(
                number, 1 / 255, rel_tol=1e-4
            ):
                return "multiplies its input by 1/255"
        if op.name in _PASS_ON:
            derived.add(op.index)
    return None


def _warn_scaled_again(tr: Trace, x0: Tensor) -> None:
    """Warn when the model scales raw 0..255 pixels itself (:func:`raw_scaling`) and the
    first input holds float values no larger than a normalised or [0, 1] image's: then it
    scales them again, and every number of the run is silently wrong."""
    if not x0.is_floating_point():
        return
    how = raw_scaling(tr)
    finite = x0[torch.isfinite(x0)]
    if how is None or not finite.numel() or float(finite.abs().max()) > 8.0:
        return
    lo, hi = float(finite.min()), float(finite.max())
    warn(
        f"probe: the model's forward {how}, so it takes raw 0..255 pixel values, but the "
        f"dataset feeds floats in [{lo:.3g}, {hi:.3g}] (its first image): scaled again, "
        "every number of the run would be wrong. Feed raw images: on the command line "
        "--normalize raw (an image folder's images as uint8, 0..255); from Python a "
        "dataset of uint8 tensors (transforms.PILToTensor() instead of ToTensor() and "
        "Normalize), or image_folder(..., raw=True)"
    )


def _run_vocab(
    vocab: VocabLike | None, dataset: Any, tr: Trace, x0: Tensor
) -> list[str | None] | None:
    """The vocabulary to store in the run (given, else the dataset's own), checked before
    the sweep: only inputs of token ids have one, and it names every id the data uses
    (every sample of a TensorDataset, else the first sample: a dataset read lazily is not
    swept twice), padded to the rows of the embedding that reads the ids."""
    from ..vocab import as_vocab, dataset_vocab, fit_vocab, id_space, reads_ids

    ids = x0.dim() == 2 and not x0.is_floating_point() and not x0.is_complex() and reads_ids(tr)
    if vocab is None and not ids:
        return None  # a vocab/itos attribute of another meaning
    if vocab is not None and not ids:
        raise LurkerError(
            f"probe: vocab= names the words of token ids, and the model's input is "
            f"{tuple(x0.shape[1:])} {str(x0.dtype).removeprefix('torch.')}"
            f"{'' if x0.dim() != 2 or x0.is_floating_point() else ' that no embedding looks up'}"
            ", not a sequence of token ids: leave vocab out",
            cli="--vocab names the words of token ids, and the model's input is "
            f"{tuple(x0.shape[1:])} {str(x0.dtype).removeprefix('torch.')}, not a sequence of "
            "token ids: leave out --vocab",
        )
    rows = id_space(tr)
    tensors = getattr(dataset, "tensors", None)
    seen = tensors[0] if isinstance(tensors, tuple) and tensors else x0
    used = int(seen.max()) + 1 if seen.numel() else 0
    where = "the samples use" if seen is not x0 else "the first sample uses"
    if vocab is None:
        found = dataset_vocab(dataset)
        if found is None:
            return None
        try:
            return fit_vocab(found, rows, used, where)
        except LurkerError as e:
            # the attribute may mean something else: store nothing rather than wrong words
            warn(f"probe: the dataset's vocab/itos is not stored as the run's vocabulary: {e}")
            return None
    return fit_vocab(as_vocab(vocab, rows), rows, used, where)


def _run_pad_id(dataset: Any, tr: Trace, x0: Tensor) -> int | None:
    """The padding id the dataset names (``pad_id``, ``pad_token_id``, ``pad_index``), to
    store in a run of token ids beside its vocabulary; None on other runs."""
    from ..vocab import dataset_pad_id, id_space, reads_ids

    ids = x0.dim() == 2 and not x0.is_floating_point() and not x0.is_complex() and reads_ids(tr)
    return dataset_pad_id(dataset, id_space(tr)) if ids else None


def _check_relevance_model(model: nn.Module) -> None:
    """Refuse relevance lists of a quantized model before the run is created: LRP cannot
    pass a quantized layer (packed weights, no gradient, no rule), and the first op it
    would stop at, mid-sweep, is the model's QuantStub, which says nothing of why."""
    from ..explain.lrp import QuantizedNoRule, check_quantized

    try:
        check_quantized(model)
    except QuantizedNoRule as e:
        why = (
            f"LRP has no rule for {e.plain}: it runs quantized kernels on packed weights, with no gradient. Probe "
            "the float model it was quantized from (before quantize_dynamic or convert) for "
            "relevance lists, or this model without them; occlusion explains its decisions "
            "(it only runs the model)"
        )
        raise LurkerError(
            f"probe: relevance lists rank samples by LRP relevance, and {why}: "
            "lurker.explain(model, x, method='occlusion')",
            cli=f"--relevance ranks samples by LRP relevance, and {why}: lurker explain "
            "--method occlusion",
        ) from None


def _relevance_composite(relevance: bool | str) -> str | None:
    """None: no relevance lists; "": the engine's default composite; else a checked name."""
    from ..explain.lrp import COMPOSITES

    if relevance is False or relevance is None:
        return None
    if relevance is True:
        return ""
    if isinstance(relevance, str) and relevance in COMPOSITES:
        return relevance
    raise LurkerError(
        f"probe: relevance must be True, False or an LRP composite ({', '.join(COMPOSITES)}), "
        f"got {relevance!r}"
    )


def _open_writer(plan: _Plan, overwrite: bool) -> RunWriter | None:
    """Create (or reopen, to resume) the run on rank 0, the only writer; the other ranks
    wait for it, so that their checkpoints land in an existing directory."""
    writer = None
    refused: LurkerError | None = None
    if plan.rank == 0:
        try:
            writer = RunWriter.create(plan.out, meta=plan.run_meta, overwrite=overwrite)
        except LurkerError as err:  # (another model's run there): every rank stops with it
            refused = err
    _stop_with_rank0(refused, plan.world)  # (a barrier too)
    return writer


def _check_checkpoints_world(plan: _Plan, writer: RunWriter | None) -> None:
    """Refuse to resume checkpoints saved by another number of processes: each holds its
    rank's shard (sample ``i`` goes to rank ``i % world``), which another number of ranks
    would split differently, so they would be ignored and their work silently swept again
    (and left behind). Rank 0 looks and decides for all ranks."""
    refused: LurkerError | None = None
    if writer is not None and writer.resumed:
        saved: dict[str, int] = {}
        for path in sorted(plan.out.glob("checkpoint*.pt")):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                saved[path.name] = int(state["world"])
            except Exception:  # not a checkpoint of this layout: the sweep's own rules
                continue
        others = sorted({w for w in saved.values() if w != plan.world})
        if others:
            was = " or ".join(str(w) for w in others)
            names = ", ".join(saved)
            how = (
                "without torchrun"
                if others == [1]
                else f"with {was} processes (torchrun --nproc_per_node {was})"
            )
            said = (
                f"{plan.out} holds checkpoints of a probe interrupted while it ran as {was} "
                f"process{'es' if others != [1] else ''} ({names}), and this probe runs as "
                f"{plan.world}: each checkpoint holds its process's shard of the dataset "
                "(sample i on process i % processes), so it resumes only with as many "
                f"processes. Resume it {how}, or sweep it again from the start with "
            )
            refused = LurkerError(said + "overwrite=True.", cli=said + "--overwrite.")
            writer.close()  # the run is left as it is, checkpoints and all
    _stop_with_rank0(refused, plan.world)


def _digest(x: Tensor) -> str:
    """A digest of a tensor's values (float64 holds every float and index dtype exactly;
    its bytes, not its storage's: a dataset's first image is a view of all of them)."""
    return hashlib.sha1(x.detach().to("cpu", torch.float64).numpy().tobytes()).hexdigest()


def _subset_indices(ds: Any) -> list[Any]:
    """The indices of each ``torch.utils.data.Subset`` the dataset wraps, outermost first."""
    out = []
    inner = getattr(ds, "dataset", None)
    while inner is not None:
        if isinstance(inner, torch.utils.data.Subset):
            out.append(list(inner.indices))
        inner = getattr(inner, "dataset", None)
    return out


def _finished_before(plan: _Plan, writer: RunWriter | None) -> bool:
    """Whether the run is complete and was probed with this call's settings: then there is
    nothing to sweep, and sweeping again would drop what was made from the run since (unit
    images, feature visualizations) for the same numbers. Rank 0 decides for all ranks."""
    done = False
    if writer is not None and writer.resumed:
        finished = writer.status == "complete" and not plan.checkpoint.exists()
        before = writer.meta_get("probed_with") or {}
        now = json.loads(json.dumps(plan.settings))  # as stored: tuples are lists
        done = finished and before == now
        if finished and not done and plan.rank == 0:
            _say_swept_again(plan, before, now)
        if done:
            # this call's way to load the model and data again (the CLI's spec, where a
            # Python call recorded none): the same model, by its fingerprint, and data
            old = writer.meta_get("config") or {}
            writer.meta_set("config", {**old, **plan.run_meta["config"]})
            for key in ("vocab", "pad_id"):  # a vocabulary given to a finished run: stored
                if key in plan.run_meta:
                    writer.meta_set(key, plan.run_meta[key])
            writer.close()
            warn(
                f"{plan.out} already holds this probe, complete (same model, dataset, layers "
                "and settings): nothing to sweep. To sweep it again, overwrite it "
                "(overwrite=True; on the command line --overwrite)"
            )
    if plan.world > 1:
        done = bool(_from_rank0(done))
        if done:  # a rank's checkpoint left by a job killed after rank 0 wrote the run
            _drop_checkpoint(plan)
    return done


def _say_swept_again(plan: _Plan, before: dict[str, Any], now: dict[str, Any]) -> None:
    """Warn, before the sweep, that a finished run is swept again for other settings: its
    results and the unit images made from it (maybe hours of work) are replaced when the
    new sweep commits, so the user can still stop and keep them (or probe into another
    --out)."""
    names = {"data": "dataset", "first_image": "images as loaded", "hist_bins": "histogram bins"}
    differ = [
        names.get(key, key.replace("_", " "))
        for key in sorted({*before, *now})
        if before.get(key) != now.get(key)
    ]
    cache = plan.out / "cache"
    files = sum(1 for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else 0
    lost = f" and its {files:,} cached images and files" if files else ""
    # a run from before lurker recorded its settings: which of them differ is unknown
    which = f"other settings ({', '.join(differ)})" if before else "settings it did not record"
    warn(
        f"{plan.out} holds a finished probe with {which}: "
        f"sweeping it again; when this sweep ends, its results{lost} are replaced. To keep "
        "them, stop now (Ctrl-C) and probe into another out directory (--out)"
    )


def _consumers(plan: _Plan) -> list[BatchConsumer]:
    """What the sweep feeds with each probed layer's output: a new statistic is one more
    consumer here, with no change to the loop, the checkpoint or the ranks' merge."""
    consumers: list[BatchConsumer] = [
        UnitStatsConsumer(
            plan.layers,
            k=plan.k,
            num_classes=plan.num_classes,
            device=plan.dev,
            hist_bins=plan.hist_bins,
            batch_size=plan.batch_size,
            describe=plan.describe,
        )
    ]
    if plan.relevance is not None:  # after the statistics: its lists name their layers
        consumers.append(
            RelevanceConsumer(
                plan.model,
                plan.layers,
                k=plan.k,
                device=plan.dev,
                composite=plan.relevance or None,
            )
        )
    if plan.embed is not None:
        probed = plan.embed.op.index in {layer.op.index for layer in plan.layers}
        rows = plan.checkpoint.with_name(f"{plan.checkpoint.stem}-embedding.rows")
        consumers.append(EmbeddingConsumer(plan.embed, probed=probed, rows=rows))
    if plan.signal is not None:  # the input's own scale, for feature visualization
        consumers.append(ChannelRangeConsumer(*plan.signal, device=plan.dev))
    if plan.labels is None:  # the run's labels, as the sweep reads the items
        consumers.append(LabelsConsumer(len(plan.ds), plan.dev))
    return consumers


def embed_layer_of(
    tr: Trace,
    embed: bool | str,
    *,
    layouts: Mapping[int, Layout | Skip] | None = None,
    unit_dim: int | Mapping[str, int] | None = None,
    arg: str = "probe: embed",
    cli_arg: str = "--embed-layer",
) -> Layer:
    """The layer ``embed`` names (True: the input of the model's last linear op).

    ``arg`` and ``cli_arg`` are how the caller's user spelled the layer (``map``'s
    ``layer=``/``--layer``): a name that matches no layer, or several, is reported so.
    """
    if embed is True:
        linear = [op for op in tr.ops if op.kind == "op" and op.name in LINEAR]
        if not linear:
            raise LurkerError(
                "probe: embed=True takes the input of the model's last linear layer, and this "
                "model has none; name the layer to embed, e.g. embed='avgpool'"
            )
        last = linear[-1]
        src = tr.ops[last.parents[0]] if last.parents else None
        if src is None or src.kind != "op" or len(src.shape or ()) < 2:
            raise LurkerError(
                f"probe: embed=True: the input of the last linear op {last.label} is not an "
                "activation of the model (it is the model's input); name the layer to embed"
            )
        if layouts is None:
            layouts = infer_layouts(tr, unit_dim=unit_dim)
        lay = layouts.get(src.index)
        if not isinstance(lay, Layout):
            if len(src.shape or ()) != 2:
                why = lay.reason if isinstance(lay, Skip) else "no unit axis found"
                raise LurkerError(
                    f"probe: embed=True: cannot read features out of {_layer_name(src, tr)} "
                    f"(the input of {last.label}): {why}; name the layer to embed"
                )
            lay = Layout(batch=0, unit=1, positions=())
        return Layer(src, _layer_name(src, tr), lay)
    if not isinstance(embed, str) or not embed:
        raise LurkerError(f"probe: embed must be True, False or a layer name, got {embed!r}")
    if layouts is None:
        layouts = infer_layouts(tr, unit_dim=unit_dim)
    try:
        found = select_layers(tr, embed, unit_dim=unit_dim, layouts=_as_features(tr, layouts))
    except LurkerError as err:
        raise LurkerError(
            f"{arg}={embed!r}: {err}", cli=f"{cli_arg} {embed}: {err.for_cli()}"
        ) from None
    if len(found) != 1:
        names = ", ".join(layer.name for layer in found[:10])
        said = f"names {len(found)} layers ({names}); name one of them"
        raise LurkerError(f"{arg}={embed!r} {said}", cli=f"{cli_arg} {embed} {said}")
    return found[0]


def _as_features(tr: Trace, layouts: Mapping[int, Layout | Skip]) -> Mapping[int, Layout | Skip]:
    """``layouts`` with every ``(batch, features)`` output whose unit axis lurker cannot tell
    (a ``Flatten`` of a conv map) read as one vector per sample, as ``embed=True`` reads
    the last linear op's input: the map needs each sample's features, not units, and
    naming a unit axis (``unit_dim``) would also make the probe read it as units."""
    out = dict(layouts)
    for op in tr.ops:
        lay = layouts.get(op.index)
        # a unit skip knows its batch axis (found with the layouts): only its units are not
        if isinstance(lay, Skip) and lay.batch is not None and len(op.shape or ()) == 2:
            out[op.index] = Layout(batch=lay.batch, unit=1 - lay.batch, positions=())
    return out


def check_embed_budget(layer: Layer, n: int, budget: int = EMBED_BUDGET) -> None:
    """Refuse features that would not fit the budget, before the sweep starts."""
    need = n * layer.width * 2
    if need > budget:
        raise LurkerError(
            f"probe: embedding {n:,} samples at {layer.name} ({layer.width:,} features each, "
            f"float16) needs {need / 2**30:.1f} GiB, over the {budget / 2**30:.0f} GiB budget; "
            "embed a narrower layer (embed=True: the penultimate), or probe a subset"
        )


@dataclass
class _Progress:
    """How far this rank's sweep has come: samples of its shard done (in shard order), the
    unreadable files met so far and the files whose transparency was dropped (None: the
    dataset does not check). ``seen`` and ``seconds`` count this call only."""

    done: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    transparent: list[str] | None = None
    seen: int = 0
    seconds: float = 0.0


def _restore(
    plan: _Plan, writer: RunWriter | None, consumers: Sequence[BatchConsumer]
) -> _Progress:
    """Resume from this rank's checkpoint when the run is being resumed and the checkpoint
    is of the same layers, ranks, consumers and dataset (size, labels and normalisation:
    statistics of images normalised two ways must not be mixed); otherwise start from the
    first sample (a mismatched checkpoint is overwritten by the first save)."""
    ckpt = plan.checkpoint
    if not ckpt.exists() or (writer is not None and not writer.resumed):
        return _Progress()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    why = (
        "its layers differ" if state.get("layers") != plan.layer_names
        else f"it was swept by {state.get('world')} process(es)" if state.get("world") != plan.world
        # (no data key: an older checkpoint)
        else "the dataset differs (its size, labels or items)"
        if state.get("data", plan.data_key) != plan.data_key
        else f"the dataset differs ({changed}): the checkpoint's statistics are of the "
        "other values, and are not mixed with these; if the change was a mistake, stop "
        "and restore the dataset as it was (its file, its normalisation) to resume"
        if (changed := _values_changed(plan, state)) is not None
        else "the images were normalised otherwise"
        if state.get("normalization", _normalization(plan)) != _normalization(plan)
        else "it lacks some of the statistics now kept"
        if any(c.key not in state for c in consumers)
        else None
    )  # fmt: skip
    if why is not None:
        if plan.rank == 0:
            warn(
                f"probe: not resuming from {ckpt} ({state.get('done', 0)} samples swept): "
                f"{why}; sweeping from the first sample"
            )
        return _Progress()
    for c in consumers:
        try:
            c.load_state_dict(state[c.key])
        except LurkerError as err:
            raise LurkerError(f"{ckpt} cannot be resumed: {err}") from None
    return _Progress(
        done=int(state["done"]),
        skipped=[tuple(s) for s in state["skipped"]],
        transparent=state.get("transparent"),  # (none: an older checkpoint)
    )


def _values_changed(plan: _Plan, state: Mapping[str, Any]) -> str | None:
    """How a dataset made by code (``--data file.py:fn``) now holds other values than the
    checkpoint's (its float items, which the data key leaves out: e.g. the file's
    normalisation changed), or None: the same, or no fingerprint to tell by."""
    from .data import fingerprints_differ

    was = state.get("data_fingerprint")
    now = plan.run_meta["config"].get("data_fingerprint")
    if not was or not now:
        return None
    return fingerprints_differ(was, now)


def _normalization(plan: _Plan) -> list[list[float]]:
    """The dataset's mean and std, as a checkpoint keeps them, and ``["raw"]`` for an image
    folder fed raw (uint8 0..255: its mean and std are those of ``none``'s [0, 1] images)."""
    out = [[float(v) for v in plan.ds.mean], [float(v) for v in plan.ds.std]]
    return [*out, ["raw"]] if getattr(plan.ds, "raw", False) else out


def _save_checkpoint(plan: _Plan, consumers: Sequence[BatchConsumer], position: _Progress) -> None:
    """Write this rank's checkpoint atomically (a killed sweep leaves the previous one)."""
    buf = io.BytesIO()
    state: dict[str, Any] = {
        "done": position.done,
        "world": plan.world,
        "layers": plan.layer_names,
        "data": plan.data_key,
        # a dataset made by code: its items' values too (data_key holds only the exact
        # parts), compared with a tolerance when resumed (another normalisation is caught)
        "data_fingerprint": plan.run_meta["config"].get("data_fingerprint"),
        "normalization": _normalization(plan),
        "skipped": [list(s) for s in _merge_skipped(position.skipped, plan.ds.skipped)],
        "transparent": _merge_transparent(position.transparent, plan.ds.transparent),
    }
    for c in consumers:
        state[c.key] = c.state_dict()
    torch.save(state, buf)
    atomic_write_bytes(plan.checkpoint, buf.getvalue())


def _sweep(plan: _Plan, consumers: Sequence[BatchConsumer], start: _Progress) -> _Progress:
    """Run the rest of this rank's shard through the model, once, feeding every probed
    layer's output to every consumer as the op produces it (before a later in-place op can
    change it); checkpoint every few batches. Returns where it ended, with this call's
    samples and seconds."""
    from . import data as pdata

    dev, batch_size = plan.dev, plan.batch_size
    position = _Progress(
        done=start.done, skipped=list(start.skipped), transparent=start.transparent
    )
    todo = plan.shard[start.done :]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(plan.ds, todo),
        batch_size=batch_size,
        shuffle=False,
        num_workers=plan.num_workers,
        collate_fn=pdata.collate,
        pin_memory=dev.type == "cuda",
        # a SIGTERM to the process group (a batch system, torchrun) would kill the workers
        # and torch then raises in the middle of a batch: a worker stops as on Ctrl-C
        worker_init_fn=_worker_stops_on_sigterm if plan.num_workers else None,
    )
    # op index -> (layer, consumer) pairs: every consumer sees the probed layers, and a
    # consumer's extra layers go to it alone
    routes: dict[int, list[tuple[Layer, BatchConsumer]]] = {}
    for layer in plan.layers:
        routes[layer.op.index] = [(layer, c) for c in consumers]
    for c in consumers:
        for layer in c.extra_layers:
            routes.setdefault(layer.op.index, []).append((layer, c))
    n_batches = 0
    t_start = last_ckpt = time.perf_counter()
    total = len(plan.shard)
    # what the run will say they are, where told before the sweep (targets)
    known = None if plan.labels is None else torch.tensor(plan.labels, dtype=torch.int64)
    # the labels the items carry (no targets), and the per-class statistics kept by them
    reader = next((c for c in consumers if isinstance(c, LabelsConsumer)), None)
    unit_stats = next(c for c in consumers if isinstance(c, UnitStatsConsumer))
    unlabelled = reader is not None and reader.ignored is not None  # (kept by a checkpoint)
    classes = 0 if unlabelled else plan.num_classes  # grows with the labels the items carry
    negative_said: list[int] = []
    # under torchrun rank 0 shows its own shard's count and rate, and says so: a bare
    # "probing: 899/899" on a dataset of 1797 reads as half the dataset swept
    label = "probing" if plan.world == 1 else f"probing (process 0 of {plan.world}, its shard)"
    bar = Progress(label, total, position.done, plan.progress and plan.rank == 0, 10.0, plan.inputs)
    batches = iter(loader)
    with contextlib.closing(bar), torch.no_grad(), _stop_signals() as interrupted:
        while True:
            try:
                images, labels, ids = next(batches)  # unreadable images dropped (ds.skipped)
            except StopIteration:
                break
            except LurkerError as e:  # lurker's own (mixed shapes, a label): says what to do
                worker = worker_error(e)
                if worker is None:
                    raise
                # from a DataLoader worker, as torch's "Caught ... Traceback" text: read the
                # batch again here, where the same check raises it as lurker says it, or
                # else say the worker's own message
                e.__traceback__ = None  # (its frames hold the iterator, and so the workers)
                batches = iter(())  # (ends the workers, which hold the run's lock)
                batch_ids = todo[n_batches * batch_size : (n_batches + 1) * batch_size]
                try:
                    pdata.collate([plan.ds[i] for i in batch_ids])
                except LurkerError as said:
                    raise said from None  # (not torch's wrapped copy as its context)
                except Exception:  # (read here, the batch fails otherwise: the worker's)
                    pass
                raise LurkerError(worker[1]) from None
            except Exception as e:
                if interrupted:  # DataLoader workers stopped by the same Ctrl-C
                    break
                # the dataset's own error, maybe wrapped by a DataLoader worker: keep the
                # batches swept so far and name the item, rather than torch's traceback
                if position.done:
                    _save_checkpoint(plan, consumers, position)
                # DataLoader workers inherit the run's lock: end them now, not when the
                # error is collected (a notebook keeps it, and the rerun found the run in use)
                e.__traceback__ = None  # (its frames hold the iterator)
                batches = iter(())
                batch_ids = todo[n_batches * batch_size : (n_batches + 1) * batch_size]
                said = _dataset_item_error(plan, batch_ids, e, position.done)
                raise said from said.__cause__
            if len(images):
                labels = _batch_labels(plan, labels, ids, known, reader, negative_said)
                if reader is not None and reader.ignored is not None and not unlabelled:
                    unlabelled = True  # (an item's label is no class index: none are kept)
                    unit_stats.drop_classes()
                    classes = 0
                classes = max(classes, int(labels.max()) + 1)  # (on the host: no sync)
                batch = Batch(
                    images.to(dev, non_blocking=True),
                    ids.to(dev, non_blocking=True),
                    labels.to(dev, non_blocking=True),
                    classes,
                )
                for c in consumers:
                    c.begin(batch)

                def feed(op: Any, value: Any, batch: Batch = batch) -> None:
                    output = value[0] if isinstance(value, tuple) else value
                    if getattr(output, "is_quantized", False):  # a static quantized layer's
                        output = output.dequantize()  # (its ints have no float view)
                    for layer, c in routes[op.index]:
                        c.update(layer, output, batch)

                acts = plan.trace.run(batch.images, save="none", hooks=dict.fromkeys(routes, feed))
                for c in consumers:
                    c.end(batch, acts.output)
            step = min(batch_size, len(todo) - n_batches * batch_size)
            position.done += step
            position.seen += step
            n_batches += 1
            bar.advance(step)
            now = time.perf_counter()
            if now - last_ckpt >= plan.checkpoint_seconds or (
                plan.checkpoint_every and n_batches % plan.checkpoint_every == 0
            ):
                _save_checkpoint(plan, consumers, position)  # a device sync and a file write
                last_ckpt = now
            if interrupted:  # Ctrl-C or SIGTERM during the batch: keep it, then stop
                break
    if interrupted:
        _save_checkpoint(plan, consumers, position)  # every batch whole: none half-counted
        _say_interrupted(plan, position, total, interrupted[0])
        raise ProbeInterrupted(interrupted[0])
    if plan.world > 1:  # a rank interrupted while this one waits to merge costs it nothing
        _save_checkpoint(plan, consumers, position)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    position.seconds = time.perf_counter() - t_start
    position.skipped = _merge_skipped(position.skipped, plan.ds.skipped)
    position.transparent = _merge_transparent(position.transparent, plan.ds.transparent)
    return position


def _failing_item(ds: Any, ids: Sequence[int]) -> tuple[int, Exception] | None:
    """The first of ``ids`` whose item raises when read again in this process, with its
    error (a DataLoader worker's error names neither the item nor keeps its type)."""
    for i in ids:
        try:
            ds[i]
        except LurkerError:
            raise
        except Exception as e:
            return int(i), e
    return None


def item_error(what: str, error: BaseException, then: str) -> LurkerError:
    """One paragraph for ``what`` ("dataset item 7") whose reading raised: its error and
    where in the dataset's code it was raised, and ``then`` (what was kept, the fix); the
    dataset's own error is its cause, with its traceback."""
    worker = worker_error(error)
    if worker is not None:  # the worker's own error, not torch's "Caught ... in worker"
        kind, message, where = worker
    else:
        frames = traceback.extract_tb(error.__traceback__)
        kind, message = type(error).__name__, str(error)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    said = message.strip().splitlines()
    at = f" (at {where})" if where else ""
    err = LurkerError(
        f"{what} raised {kind}{': ' + said[0] if said else ''}{at}: the "
        f"probe reads every item of the dataset. {then}"
    )
    err.__cause__ = error
    return err


_WORKER_CAUGHT = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")
_FRAME = re.compile(r'  File "(.+)", line (\d+)')


def worker_error(error: BaseException) -> tuple[str, str, str] | None:
    """``(type name, message, "file:line")`` of the error a DataLoader worker raised, or
    None where ``error`` is not one. torch re-raises it in this process as a new exception
    whose message is "Caught ValueError in DataLoader worker process 0." and the worker's
    formatted traceback (its type may be RuntimeError; no traceback object comes across):
    the dataset's own message and line are read back from that text."""
    text = str(error)
    if not _WORKER_CAUGHT.match(text):
        return None
    lines = text.rstrip("\n").splitlines()
    last = max((i for i, line in enumerate(lines) if _FRAME.match(line)), default=None)
    if last is None:
        return None
    frame = _FRAME.match(lines[last])
    assert frame is not None
    rest = lines[last + 1 :]
    while rest and rest[0].startswith("    "):  # the frame's source line and its carets
        rest = rest[1:]
    if not rest:
        return None
    kind, _, first = rest[0].partition(": ")
    message = "\n".join([first, *rest[1:]])
    return kind.rsplit(".", 1)[-1], message, f"{Path(frame[1]).name}:{frame[2]}"


def _dataset_item_error(
    plan: _Plan, batch_ids: Sequence[int], error: Exception, done: int
) -> LurkerError:
    """The error for a batch whose reading failed, once the batches before it are
    checkpointed (``done`` samples): the item, found by reading the batch's items again."""
    found = _failing_item(plan.ds, batch_ids)
    what = f"dataset item {found[0]}" if found else "reading the batch of dataset items "
    if found:
        error = found[1]
    elif batch_ids:  # not one item alone (collating them, a flaky read, a worker's state)
        what += f"{batch_ids[0]}..{batch_ids[-1]}"
        if worker_error(error) is not None:
            what += " in a DataLoader worker (read again in this process, each item loads)"
    kept = (
        f"The {done} samples swept before it are saved in {plan.checkpoint}: fix the item "
        "and run the same call again to resume from there (a dataset that leaves it out, "
        "such as a Subset of the other indices, is another dataset and is swept from its "
        "first sample)."
        if done
        else "Nothing was swept before it: fix the item and probe again."
    )
    return item_error(what, error, kept)


class StopSignal(KeyboardInterrupt):
    """A SIGTERM that stopped the process outside the sweep's batches, raised where Python
    was so that everything unwinds as for Ctrl-C: ``signum`` is the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum: int, frame: Any) -> None:
    raise StopSignal(signum)


@contextlib.contextmanager
def stops_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM stops the process as Ctrl-C does (:class:`StopSignal`, a
    KeyboardInterrupt) instead of killing it on the spot: the run directory's lock is
    released, a directory made for nothing is removed, and the caller can say so. Only
    where SIGTERM has its default handler (a caller's own is left alone), in the main
    thread. The sweep's :func:`_stop_signals` takes over inside it. Not under torchrun:
    a worker waits in C++ (a rendezvous, a barrier while rank 0 traces), where a Python
    handler runs only once the call returns, and the launcher's SIGTERM must stop it at
    once, as the default handler does."""
    if (
        _under_torchrun()
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is _raise_stop:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def before_sweep() -> Iterator[None]:
    """A Ctrl-C or SIGTERM before the sweep's first batch (while the model is traced, the
    dataset read, the run opened) stops with one line saying that nothing was swept and
    nothing is lost, and :class:`ProbeInterrupted`; it used to be a traceback, or for
    SIGTERM a silent kill. The sweep's own stop (after its checkpoint) passes through."""
    try:
        with stops_on_sigterm():
            yield
    except ProbeInterrupted:
        raise
    except KeyboardInterrupt as stop:
        signum = stop.signum if isinstance(stop, StopSignal) else int(signal.SIGINT)
        if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) == 0:
            how = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
            print(
                f"lurker: {how} before the sweep's first batch: nothing was swept in this "
                "call and nothing is lost (the run keeps what earlier calls saved): "
                f"{_resume_command(int(os.environ.get('WORLD_SIZE', '1')))}",
                file=sys.stderr,
            )
        raise ProbeInterrupted(signum) from None


class ProbeInterrupted(KeyboardInterrupt):
    """The probe stopped on Ctrl-C (SIGINT) or SIGTERM, after checkpointing its last batch
    or before its first, and said so; ``signum`` is the signal (the command line exits
    with 128 + it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def __reduce__(self) -> tuple[Any, ...]:  # (pickled by name, it would not rebuild)
        return (type(self), (self.signum,))


def _worker_stops_on_sigterm(_worker: int) -> None:
    """In a DataLoader worker: SIGTERM ends it as Ctrl-C does (torch's worker loop leaves
    quietly on KeyboardInterrupt), so that the sweep finishes and keeps its batch. Not
    ignored: at exit, multiprocessing ends its daemon workers with SIGTERM and waits."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _under_torchrun() -> bool:
    """Whether this process is a worker of torchrun's launcher (which sets this variable)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


@contextlib.contextmanager
def _stop_signals() -> Iterator[list[int]]:
    """While the sweep runs, Ctrl-C (SIGINT) and SIGTERM (a preempted job) record the
    signal instead of stopping the process in the middle of a batch (where the statistics
    may hold part of it): the sweep finishes the batch, checkpoints it and stops, so the
    next run resumes from the last image swept. A second signal stops at once (the previous
    checkpoint stands), except under torchrun: its launcher passes on the signal a terminal
    already sent every process (two per Ctrl-C), and kills workers that have not stopped
    after its own grace period. A signal with a handler of the caller's is left alone, as
    is everything outside the main thread. Yields the signals received."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    once = not _under_torchrun()
    ours = {
        sig: default
        for sig, default in (
            (signal.SIGINT, signal.default_int_handler),
            (signal.SIGTERM, signal.SIG_DFL),
        )
        # (SIGTERM's handler of stops_on_sigterm, outside the sweep, counts as the default)
        if signal.getsignal(sig) in (default, _raise_stop)
    }
    previous = {sig: signal.getsignal(sig) for sig in ours}

    def deferred(signum: int, frame: Any) -> None:
        got.append(signum)
        if once:
            signal.signal(signum, ours[signum])

    for sig in ours:
        signal.signal(sig, deferred)
    try:
        yield got
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _resume_command(world: int) -> str:
    """How to resume: the same call, or for `lurker probe` its command line (under
    torchrun, rebuilt with the launcher's options the workers can see)."""
    args = sys.argv[1:]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    # `lurker probe ...` (its console script imports lurker.cli) or, under torchrun,
    # `python -m lurker.cli probe ...` (lurker.cli runs as __main__)
    cli = "lurker.cli" in sys.modules or (spec is not None and spec.name == "lurker.cli")
    if not args or args[0] != "probe" or not cli:
        return (
            "run the same call again"
            + (f", with {world} processes," if world > 1 else "")
            + " to resume"
        )
    if world == 1:
        return f"run the same command again to resume: {shlex.join(['lurker', *args])}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = world // max(local, 1)
    launch = ["torchrun", f"--nproc_per_node={local}"]
    launch += ["--standalone"] if nodes == 1 else [f"--nnodes={nodes}"]
    cmd = shlex.join([*launch, "-m", "lurker.cli", *args])
    where = f" on each of the {nodes} machines (its --node_rank, --master_addr too)"
    return (
        f"run the same command again, with {world} processes, to resume"
        f"{where if nodes > 1 else ''}: {cmd}"
    )


def _say_interrupted(plan: _Plan, position: _Progress, total: int, signum: int) -> None:
    """Tell the user what was kept and how to resume: the same command, with as many
    processes (each rank resumes its own shard). Under torchrun the first process of each
    machine speaks for it: a Ctrl-C or a SIGTERM to the launcher reaches every process
    (each used to print the same line), and a rank stopped alone makes the others fail at
    the merge with a message that says so."""
    if plan.world == 1:
        print(
            f"lurker: interrupted after {position.done} of {total} images, which are saved "
            f"in {plan.checkpoint}: {_resume_command(1)}",
            file=sys.stderr,
        )
        return
    if int(os.environ.get("LOCAL_RANK", plan.rank)) != 0:
        return
    how = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
    print(
        f"lurker: process {plan.rank} of {plan.world} {how} after {position.done} of its "
        f"{total} images; each process keeps the images it swept in "
        f"{plan.out / 'checkpoint-rank*.pt'}: {_resume_command(plan.world)}",
        file=sys.stderr,
    )


def _batch_labels(
    plan: _Plan,
    labels: Tensor,
    ids: Tensor,
    known: Tensor | None,
    reader: LabelsConsumer | None,
    negative_said: list[int],
) -> Tensor:
    """The batch's labels as the run keeps them (-1: none), decided here, in the main
    process, from what the batch carries (its items may be read in DataLoader workers,
    whose state never reaches the run). Told by ``targets`` (``known``), they are checked
    against the items'. Read from the items: the first label that is no class index
    (:data:`~lurker.probe.data.NOT_A_CLASS`) makes the whole run unlabelled (``reader``
    ignores its labels from then on, said once); a label below -1 is none, said once."""
    from . import data as pdata

    not_class = labels == pdata.NOT_A_CLASS
    if known is not None:
        if getattr(plan.ds, "labels_ignored", None) is not None:  # (said before the sweep)
            return torch.full_like(labels, -1)
        if bool(not_class.any()):
            i = int(ids[not_class][0])
            raise LurkerError(
                f"dataset item {i} carries {_label_shown(plan.ds, i)}, not a class index, but "
                f"the dataset's targets say {int(known[i])}: the probe names each sample's "
                "class from targets and keeps class statistics by the items' labels, so the "
                "two must agree. Make targets hold the labels the items carry."
            )
        labels = labels.clamp(min=-1)  # (below -1: no class, said as targets were read)
        _check_labels(labels, ids, known)
        return labels
    assert reader is not None
    if reader.ignored is None and bool(not_class.any()):
        i = int(ids[not_class][0])
        reader.ignore(pdata.labels_ignored(i, _label_shown(plan.ds, i)))
    if reader.ignored is not None:
        return torch.full_like(labels, -1)
    negative = labels < -1
    if bool(negative.any()):
        if not negative_said:
            i = int(negative.nonzero()[0, 0])
            negative_said.append(int(ids[i]))
            pdata.say_negative(int(ids[i]), int(labels[i]))
        labels = labels.clamp(min=-1)
    return labels


def _label_shown(ds: Any, index: int) -> str:
    """Item ``index``'s label as a message names it (read again: the batch holds only
    :data:`~lurker.probe.data.NOT_A_CLASS`)."""
    shown = getattr(ds, "label_shown", None)
    return shown(index) if callable(shown) else "a label"


def _check_labels(labels: Tensor, ids: Tensor, known: Tensor) -> None:
    """Refuse a batch whose items carry other labels than the run records for them (read
    from the dataset's ``targets`` before the sweep): the class statistics would be kept by
    one set of labels and the samples named by the other."""
    bad = (labels != known[ids]).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise LurkerError(
            f"dataset item {int(ids[i])} carries the label {int(labels[i])}, but the dataset's "
            f"targets say {int(known[ids[i]])}: the probe names each sample's class from "
            "targets (read without loading images) and keeps class statistics by the items' "
            "labels, so the two must agree. Make targets hold the labels the items carry."
        )


def _finish(
    plan: _Plan,
    writer: RunWriter | None,
    consumers: Sequence[BatchConsumer],
    swept: _Progress,
) -> Run | None:
    """Merge the ranks' consumers and figures, then write the run on rank 0 in one
    transaction; the other ranks drop their checkpoints and return None."""
    from . import data as pdata

    skipped, seen, seconds, done = swept.skipped, swept.seen, swept.seconds, swept.done
    clear = swept.transparent
    if plan.world > 1:
        gathered: list[Any] = [None] * plan.world
        # a signal while this rank waits for the others is deferred, not raised inside a
        # collective (a traceback, then gloo's abort): a rank that stopped ends the merge
        with _stop_signals():
            try:
                _agree_unlabelled(consumers)
                for c in consumers:
                    c.merge()
                # one gather: every rank's unreadable (and transparent) files, and its share
                # of the run's figures
                torch.distributed.all_gather_object(gathered, (skipped, seen, seconds, done, clear))
            except RuntimeError as e:  # (gloo: "Connection closed by peer"; NCCL's own words)
                err = LurkerError(
                    f"another process of this torchrun job stopped (interrupted, preempted or "
                    f"failed) before the {plan.world} processes merged their "
                    f"statistics ({type(e).__name__}: {str(e).splitlines()[0][:120]}). Every "
                    f"process's sweep is saved in {plan.out / 'checkpoint-rank*.pt'} (one killed "
                    f"outright, up to its last checkpoint): run the same command again, with "
                    f"{plan.world} processes, to resume"
                )
                raise err from None  # (by every rank left: rank 0 may be the one gone)
        skipped = _merge_skipped(*(g[0] for g in gathered))
        seen = sum(g[1] for g in gathered)
        seconds = max(g[2] for g in gathered)
        done = sum(g[3] for g in gathered)
        clear = _merge_transparent(*(g[4] for g in gathered))
    if plan.rank != 0:
        # this rank's checkpoint is the only copy of its shard until rank 0 has written the
        # run: it is dropped after the barrier, kept if rank 0 fails to write
        try:
            torch.distributed.barrier()
        except RuntimeError as e:  # (gloo: "Connection closed by peer")
            raise LurkerError(
                f"process 0 of this torchrun job stopped before it wrote the run ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:120]}). This process's sweep is kept in "
                f"{plan.checkpoint}: run the same command again, with {plan.world} processes, "
                "to resume"
            ) from None
        _drop_checkpoint(plan)
        for c in consumers:
            c.discard()
        return None
    assert writer is not None
    labels, classes = plan.labels, plan.classes
    # why the items' labels were not class indices, so the run has no classes (None: none)
    ignored = getattr(plan.ds, "labels_ignored", None)
    if labels is None:  # read from the items by the sweep: all known now
        reader = next(c for c in consumers if isinstance(c, LabelsConsumer))
        labels, ignored = reader.result(), reader.ignored
        classes = [] if ignored else _class_names(plan.ds.class_names, labels)
        if ignored is None:
            pdata.warn_if_regression(labels, plan.ds.class_names)
    # One transaction (one fsync): classes, this call's config (on resume the store keeps
    # the first call's other meta; the config says how to load this call's model and data
    # again), the sweep's figures, samples, skipped files and every consumer's results are
    # all stored, and the run marked complete, or none of it is.
    with writer.batch():
        writer.set_classes(classes)
        writer.meta_set("config", plan.run_meta["config"])
        for key in ("vocab", "pad_id"):  # this call's (a resumed run keeps its first meta)
            if key in plan.run_meta:
                writer.meta_set(key, plan.run_meta[key])
        writer.meta_set(
            "sweep",
            {
                "seconds": seconds,
                "images": seen,
                "images_per_s": seen / max(seconds, 1e-9),
                # swept before an interruption, by the calls this one resumed
                "resumed_from": max(done - seen, 0),
                "world": plan.world,
            },
        )
        # replaced, not added to: a rerun over fewer samples, or over files since repaired,
        # leaves none of the earlier probe's behind (skipped: this sweep's, checkpoint's too)
        rows = plan.ds.sample_rows()
        writer.add_samples(
            ((i, path, labels[i] if labels[i] >= 0 else None, src) for i, path, _, src in rows),
            replace=True,
        )
        writer.add_skipped(skipped, replace=True)
        writer.meta_set("labels_ignored", ignored)
        # files whose transparency the loader dropped: count and two names (null: the
        # dataset does not check, as a wrapped dataset decodes its files itself)
        writer.meta_set(
            "transparent_images", None if clear is None else pdata.transparency_meta(clear)
        )
        writer.set_graph(plan.trace.to_json())  # the layers' op_index and op label index into it
        writer.meta_set("probed_with", plan.settings)
        # (a run of signals' consumer writes it: a re-probe of another input keeps none)
        writer.meta_set("channel_range", None)
        writer.meta_set(
            "skipped_layers",
            [{"layer": name, "reason": why} for name, why in plan.layer_skips],
        )
        for c in consumers:
            c.finish(writer)
    writer.close()
    if clear:  # said once per run, as the run is written (the meta keeps it)
        warn(f"probe: {pdata.transparency_summary(clear)}")
    _drop_checkpoint(plan)  # checkpoint-rank0.pt: the store drops checkpoint.pt
    for c in consumers:
        c.discard()
    if plan.world > 1:
        torch.distributed.barrier()  # the run is written: the other ranks drop theirs
    return Run.open(plan.out)


def _agree_unlabelled(consumers: Sequence[BatchConsumer]) -> None:
    """Under torchrun, before the ranks merge: where any rank met an item whose label is no
    class index, every rank's run is unlabelled (the first such item's reason), its classes
    dropped, so that no rank's class statistics are mixed into a run without classes."""
    reader = next((c for c in consumers if isinstance(c, LabelsConsumer)), None)
    if reader is None:  # (the same on every rank: labels told by targets, or not)
        return
    said: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(said, reader.ignored)
    first = min((s for s in said if s is not None), key=lambda s: s["item"], default=None)
    if first is not None:
        reader.ignore(first)
        next(c for c in consumers if isinstance(c, UnitStatsConsumer)).drop_classes()


def _drop_checkpoint(plan: _Plan) -> None:
    """Remove this rank's checkpoint and the row files beside it, including those of a
    consumer the resumed call no longer runs (an embedding asked for only the first time)."""
    plan.checkpoint.unlink(missing_ok=True)
    for rows in plan.checkpoint.parent.glob(f"{plan.checkpoint.stem}-*.rows"):
        rows.unlink(missing_ok=True)


def _labels(ds: Any) -> list[int] | None:
    """Every sample's label (-1: none) where the dataset tells them without reading its
    items, else None: the sweep then collects them from the items it reads (a pass of its
    own would read every item twice, which doubles the cost of a costly pipeline)."""
    labels = ds.labels_list()  # (a wrapped dataset's targets, as its items carry them)
    return None if labels is None else [int(v) for v in labels]


def _feature_names(
    names: Sequence[str] | None, shape: tuple[int, ...], floating: bool
) -> list[str] | None:
    """The dataset's ``feature_names``, one per value of its flat feature vectors (what
    the explorer names them by; ignored for inputs of other shapes and for integer token
    ids, which it does not name as features); a list that does not name each value is
    refused, since a name after a gap or a surplus would be shown beside another feature's
    value."""
    if names is None or len(shape) != 1 or not floating:
        return None
    if shape[0] != len(names):
        raise LurkerError(
            f"The dataset's feature_names has {len(names)} names, but its inputs are vectors "
            f"of {shape[0]} values: give one name per value, in order, or remove the attribute."
        )
    return [str(n) for n in names]


def _signal_channel_axis(tr: Trace, shape: tuple[int, ...]) -> int | None:
    """The axis of a two-axis sample (0 or 1, the batch not counted) that the traced
    model reads as channels, as the explorer reads it (0 for a one-axis waveform the
    model gives its one channel: ``(1, T)``); None where the graph does not say (or the
    samples are not signals)."""
    from ..explain.axes import graph_signal_layout

    found = graph_signal_layout(tr, shape)
    return None if found is None else int(found[2])


def _channel_names(
    names: Sequence[str] | None,
    shape: tuple[int, ...],
    floating: bool,
    channel_axis: int | None = None,
) -> list[str] | None:
    """The dataset's ``channel_names``, one per channel of its signals (two axes per
    sample: ``(C, T)``, or ``(T, C)`` for a channels-last model: ``channel_axis``, read
    from the graph as the explorer reads it); ignored for other inputs. A list of another
    length is refused: a lane labelled with another channel's electrode is a silently
    wrong reading (where the graph does not say which axis is channels, a list that names
    neither)."""
    if names is None or len(shape) != 2 or not floating:
        return None
    if channel_axis is not None:
        c, t = shape[channel_axis], shape[1 - channel_axis]
        if len(names) != c:
            order = "" if channel_axis == 0 else ", channels last"
            raise LurkerError(
                f"The dataset's channel_names has {len(names)} names, but its samples are "
                f"signals of {c} channels x {t} samples{order} (as the model reads them): "
                "give one name per channel, in order, or remove the attribute."
            )
        return [str(n) for n in names]
    if len(names) not in shape:
        raise LurkerError(
            f"The dataset's channel_names has {len(names)} names, but its samples are signals "
            f"of {shape[0]} channels x {shape[1]} samples (or {shape[1]} channels, channels "
            "last): give one name per channel, in order, or remove the attribute."
        )
    return [str(n) for n in names]


def _sample_rate(rate: object, shape: tuple[int, ...], floating: bool) -> float | None:
    """The dataset's ``sample_rate`` (Hz) of its signals, so the explorer gives times in
    seconds beside sample indices; ignored for other inputs. Anything but a positive finite
    number is refused: every time the pages show would be silently wrong by it."""
    if rate is None or len(shape) != 2 or not floating:
        return None
    ok = isinstance(rate, numbers.Real) and not isinstance(rate, bool)
    if not ok or not math.isfinite(float(rate)) or float(rate) <= 0:  # type: ignore[arg-type]
        raise LurkerError(
            f"The dataset's sample_rate is {rate!r}, but it must be the signals' sampling "
            "rate in Hz, a positive finite number (such as 128 or 256.0): give one, or "
            "remove the attribute."
        )
    return float(rate)  # type: ignore[arg-type]


def _class_names(names: Sequence[str] | None, labels: list[int]) -> list[str]:
    """The run's classes: the dataset's names where they name every label, else the label
    ids (a ``target_transform`` mapping folders to a model's classes makes labels the
    folder names do not stand for), with a warning that says so."""
    top = max(labels, default=-1) + 1
    if names and top <= len(names):
        return [str(n) for n in names]
    if names:
        warn(
            f"probe: the dataset names {len(names)} classes but its labels go up to {top - 1} "
            "(a target_transform?); the run names its classes by their label ids"
        )
    return [str(i) for i in range(top)]


def _merge_transparent(*parts: list[str] | None) -> list[str] | None:
    """Files whose transparency was dropped, from several sources (checkpoint, workers,
    ranks), once each and sorted; None when no source checked."""
    if all(p is None for p in parts):
        return None
    return sorted({str(path) for part in parts if part for path in part})


def _merge_skipped(*parts: Any) -> list[tuple[str, str]]:
    """Unreadable files from several sources (checkpoint, workers, ranks), once each."""
    seen: dict[str, str] = {}
    for part in parts:
        for path, reason in part:
            seen.setdefault(str(path), str(reason))
    return sorted(seen.items())
