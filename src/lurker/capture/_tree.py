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
    for a in args:
        if isinstance(a, Tensor):
            ins.append(a)
        elif isinstance(a, (tuple, list, dict)):
            tensors(a, ins)
    if kwargs:
        tensors(kwargs, ins)
    return ins


def tensors(obj: Any, acc: list[Tensor]) -> list[Tensor]:
    """Append every tensor nested in ``obj`` (tuples, lists, dicts, namedtuples) to ``acc``."""
    if isinstance(obj, Tensor):
        acc.append(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            tensors(o, acc)
    elif isinstance(obj, dict):
        for o in obj.values():
            tensors(o, acc)
    return acc


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
