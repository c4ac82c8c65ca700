"""The state an op ran under besides its arguments: autocast, grad mode, the RNG.

The recorder keeps it per op only where it is not the default (a random op, an op under
autocast or another grad mode than the trace's), so that validation re-executes each op
under the state it ran in, and the untraced comparison forward runs under the trace's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple

import torch

from ._tree import map_tensors, tensors

# device types whose autocast state is recorded
_AUTOCAST_DEVICES = ("cpu", "cuda")
any_autocast = torch._C._is_any_autocast_enabled
grad_enabled = torch._C.is_grad_enabled

RngState = tuple[torch.Tensor, "list[torch.Tensor] | None"]


class OpContext(NamedTuple):
    autocast: tuple[tuple[str, torch.dtype], ...]  # (device type, dtype) where enabled
    grad: bool
    rng: RngState | None  # the generators' state just before a random op ran


def rng_state() -> RngState:
    """The CPU generator's state and, if CUDA is in use, every CUDA generator's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: RngState) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def autocast_state() -> tuple[tuple[str, torch.dtype], ...]:
    if not any_autocast():
        return ()
    return tuple(
        (d, torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)
    )


_new = tuple.__new__  # skips NamedTuple's slower __new__: this runs once per trace


def current(rng: bool = False, grad: bool | None = None) -> OpContext:
    """The state now (``grad``: the grad mode to record instead of the current one)."""
    return _new(
        OpContext,
        (
            autocast_state(),
            grad_enabled() if grad is None else grad,
            rng_state() if rng else None,
        ),
    )


@contextmanager
def applied(ctx: OpContext | None, grad_default: bool = False) -> Iterator[None]:
    """Run under ``ctx``: its autocast (and none where it had none), grad mode and RNG
    state; the caller's RNG state is restored afterwards. ``None``: no autocast and
    ``grad_default``."""
    autocast = ctx.autocast if ctx is not None else ()
    on = dict(autocast)
    saved = rng_state() if ctx is not None and ctx.rng is not None else None
    with ExitStack() as stack:
        for d in _AUTOCAST_DEVICES:
            if d in on:
                stack.enter_context(torch.autocast(d, dtype=on[d]))
            elif torch.is_autocast_enabled(d):  # the caller's, not the op's
                stack.enter_context(torch.autocast(d, enabled=False))
        stack.enter_context(torch.set_grad_enabled(ctx.grad if ctx is not None else grad_default))
        if saved is not None:
            set_rng_state(ctx.rng)  # type: ignore[union-attr, arg-type]
        try:
            yield
        finally:
            if saved is not None:
                set_rng_state(saved)


def describe(ctx: Any) -> str:
    """``under autocast(cpu, bfloat16), grad enabled`` for messages."""
    parts = [f"autocast({d}, {str(t).replace('torch.', '')})" for d, t in ctx.autocast]
    parts.append("grad enabled" if ctx.grad else "grad disabled")
    if ctx.rng is not None:
        parts.append("the RNG state it drew from")
    return "under " + ", ".join(parts)


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode for the block; each module's ``training`` flag put back
    however it exits, so a model handed in between training epochs goes on training."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


#: module classes, by name, that drop whole residual branches at random in training mode
#: (timm's DropPath, torchvision's StochasticDepth): their drop probability attribute
_STOCHASTIC_DEPTH = {"DropPath": "drop_prob", "StochasticDepth": "p"}


def _train_dependent(m: torch.nn.Module) -> bool:
    """Whether ``m`` computes another function in training mode: dropout, stochastic
    depth, and norms that keep running statistics (in training mode they normalise by
    the batch's own)."""
    if isinstance(m, torch.nn.modules.dropout._DropoutNd):  # Dropout*, AlphaDropout, ...
        return m.p > 0
    attr = _STOCHASTIC_DEPTH.get(type(m).__name__)
    if attr is not None:
        return float(getattr(m, attr, 0) or 0) > 0
    if isinstance(m, torch.nn.MultiheadAttention):
        return m.dropout > 0
    if isinstance(m, torch.nn.modules.batchnorm._NormBase):  # BatchNorm*, InstanceNorm*
        return bool(m.track_running_stats)
    return False


def mode_dependent(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` of a kind that may compute otherwise in training mode
    (dropout, stochastic depth, attention with dropout, norms), whatever their settings
    now: a caller that checks modes per forward keeps this list and walks only it."""
    return [m for m in model.modules() if mode_kind(m)]


_MODE_KINDS = (
    torch.nn.modules.dropout._DropoutNd,
    torch.nn.MultiheadAttention,
    torch.nn.modules.batchnorm._NormBase,
)


def mode_kind(m: torch.nn.Module) -> bool:
    """Whether ``m`` is of a kind that may compute otherwise in training mode (see
    :func:`mode_dependent`), whatever its settings now."""
    return isinstance(m, _MODE_KINDS) or type(m).__name__ in _STOCHASTIC_DEPTH


def training_layers(
    model: torch.nn.Module, among: Iterable[tuple[str, torch.nn.Module]] | None = None
) -> list[str]:
    """The layers of ``model`` in training mode that compute otherwise at inference
    (``'features.3 (Dropout)'``, the model itself as ``'the model'``), in module order:
    dropout makes every forward random, BatchNorm normalises by the batch's statistics.
    ``among``: the ``(path, module)`` pairs to look at, the model itself left out (a
    cached list of its :func:`mode_kind` layers), instead of a walk of the whole model.
    Lurker never switches the mode itself; its callers say so instead."""
    pairs = model.named_modules() if among is None else [("", model), *among]
    return [
        f"{name or 'the model'} ({type(m).__name__})"
        for name, m in pairs
        if m.training and _train_dependent(m)
    ]


@contextmanager
def no_inference_mode() -> Iterator[None]:
    """Leave ``torch.inference_mode`` (grad stays off) for a forward lurker records or
    replays: tensors made in inference mode have no version counter, which is how lurker
    tells an in-place op, and under ``no_grad`` the forward computes the same values."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


def without_inference_tensors(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with each inference tensor (made under inference mode: no
    version counter) replaced by a copy that has one. Outside inference mode torch
    refuses to write into an inference tensor, so the forward computes the same."""
    if not kwargs and all(type(a) is torch.Tensor for a in args):  # the common case
        if not any(a.is_inference() for a in args):
            return args, kwargs
    elif not any(t.is_inference() for t in tensors((args, kwargs), [])):
        return args, kwargs

    def normal(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if t.is_inference() else t

    with torch.inference_mode(False):
        return map_tensors(args, normal), map_tensors(kwargs, normal)
