"""Fast walks over nested call arguments and outputs.

``torch.utils._pytree`` is general but slow for a per-op hot path; model calls only nest
tensors in tuples, lists and dicts, so these hand-written walks cover them in a few µs.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def refill(obj: Any, values: Any) -> Any:
    """Copy ``obj`` with its tensors replaced, in :func:`tensors` order, from ``values``.

    ``values`` is an iterator; used to re-run an op on saved activations.
    """
    if isinstance(obj, Tensor):
        return next(values)
    if isinstance(obj, (tuple, list)):
        items = [refill(o, values) for o in obj]
        if hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*items)
        return type(obj)(items) if type(obj) in (tuple, list) else items
    if isinstance(obj, dict):
        return {k: refill(v, values) for k, v in obj.items()}
    return obj


def call_tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors of one call's arguments, in a fixed order (hot path: flat args first).

    The recorder and the replayer must agree on this order and on which calls count as
    ops, so both use this one function.
    """
    ins: list[Tensor] = []
    kinds = _KINDS
    for a in args:
        k = kinds.get(type(a))
        if k is None:
            k = _kind(type(a))
        if k is _TENSOR:
            ins.append(a)
        elif k is _NESTED:
            tensors(a, ins)
    if kwargs:
        tensors(kwargs, ins)
    return ins


def tensors(obj: Any, acc: list[Tensor]) -> list[Tensor]:
    """Append every tensor nested in ``obj`` (tuples, lists, dicts, namedtuples) to ``acc``."""
    kinds = _KINDS
    k = kinds.get(type(obj))
    if k is None:
        k = _kind(type(obj))
    if k is _TENSOR:
        acc.append(obj)
        return acc
    if k is not _NESTED:
        return acc
    # items tested here, not by a call each: calls carry many scalars (conv2d's stride,
    # padding, dilation; interpolate's keywords)
    for o in obj.values() if isinstance(obj, dict) else obj:
        k = kinds.get(type(o))
        if k is None:
            k = _kind(type(o))
        if k is _TENSOR:
            acc.append(o)
        elif k is _NESTED:
            tensors(o, acc)
    return acc


# What a value is, by its type: looked up per argument of every op. ``isinstance(x,
# Tensor)`` is slow when x is not a tensor (Tensor's metaclass sends it down the generic
# path, which reads ``x.__class__``): several times a dict lookup, for every scalar.
_TENSOR, _NESTED, _OTHER = "tensor", "nested", "other"
_KINDS: dict[type, str] = {}


def _kind(t: type) -> str:
    if issubclass(t, Tensor):
        k = _TENSOR
    elif issubclass(t, (tuple, list, dict)):
        k = _NESTED
    else:
        k = _OTHER
    _KINDS[t] = k
    return k


def paths(obj: Any, prefix: str, acc: list[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """Like :func:`tensors` but also names where each tensor sits: ``out['logits'][0]``."""
    if isinstance(obj, Tensor):
        acc.append((prefix, obj))
    elif isinstance(obj, (tuple, list)):
        for i, o in enumerate(obj):
            paths(o, f"{prefix}[{i}]", acc)
    elif isinstance(obj, dict):
        for k, o in obj.items():
            paths(o, f"{prefix}[{k!r}]", acc)
    elif hasattr(obj, "__dataclass_fields__"):
        for k in obj.__dataclass_fields__:
            paths(getattr(obj, k), f"{prefix}.{k}", acc)
    return acc


def map_tensors(obj: Any, fn: Any) -> Any:
    """Apply ``fn`` to every tensor nested in ``obj``, keeping the structure."""
    if isinstance(obj, Tensor):
        return fn(obj)
    t = type(obj)
    if t is tuple or t is list:
        return t(map_tensors(o, fn) for o in obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return t(*(map_tensors(o, fn) for o in obj))
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn)) for k, v in obj.items())
    return obj
