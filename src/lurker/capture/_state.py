"""What a model holds besides its computation, before and after one forward.

Some models change their own state in ``forward``: they reassign buffers
(``self.buffer1 = torch.rand(4)``), or fill caches at their first call (timm's LeViT and
EfficientFormer cache attention biases), so that the next forward computes something
else or runs fewer ops. :func:`snapshot` before a traced forward and :func:`changes`
after it tell that apart from tracing changing what the model computes: validation
compares against an untraced forward from the state the trace started in, and replay
says that the graph depends on the model's state, not on the data.

Cheap by design (it runs on every trace): shallow copies of the attribute, buffer and
parameter dicts of each module whose class is not one of torch's own (``nn.Conv2d`` and
friends change nothing but running statistics, in place), and of the containers (dict,
list, set) kept there.
"""

from __future__ import annotations

from operator import eq as _eq
from operator import is_ as _is
from typing import Any

from torch import Tensor, nn

# attributes every nn.Module has (hook dicts, the submodule dicts): not the model's own
_MODULE_ATTRS = frozenset(nn.Module().__dict__)
_CONTAINERS = (dict, list, set)
_MISSING = object()

Snapshot = list[tuple[str, nn.Module, dict, dict, dict, dict]]


_TORCH_CLASSES: dict[type, bool] = {}  # module class -> defined in torch.nn


def _torch_class(cls: type) -> bool:
    r = _TORCH_CLASSES.get(cls)
    if r is None:
        r = _TORCH_CLASSES[cls] = cls.__module__.startswith("torch.nn.")
    return r


def snapshot(modules: dict[str, nn.Module]) -> Snapshot:
    """The state of ``modules`` (path -> module, ``""`` the model itself)."""
    out: Snapshot = []
    for path, mod in modules.items():
        if _torch_class(type(mod)):
            continue
        attrs = mod.__dict__
        kept = {
            k: v.copy()
            for k, v in attrs.items()
            if type(v) in _CONTAINERS and k not in _MODULE_ATTRS
        }
        out.append((path, mod, attrs.copy(), mod._buffers.copy(), mod._parameters.copy(), kept))
    return out


class StateChanges:
    """What a forward changed in the model: readable lines, and what reassigned
    attributes held before (to run a forward from the starting state again)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.before: list[tuple[nn.Module, str, Any]] = []  # (module, attribute, old value)
        self.contents: list[tuple[Any, Any]] = []  # (container changed in place, old copy)

    def __bool__(self) -> bool:
        return bool(self.lines)

    def restored(self) -> list[tuple[Any, ...]]:
        """Put what the forward changed back as it was; returns what :meth:`undo` needs."""
        undo: list[tuple[Any, ...]] = []
        for mod, name, old in self.before:
            undo.append((mod, name, _get(mod, name)))
            _put(mod, name, old)
        for box, old in self.contents:
            undo.append((box, box.copy()))
            _refill(box, old)
        return undo

    @staticmethod
    def undo(undo: list[tuple[Any, ...]]) -> None:
        for entry in reversed(undo):
            if len(entry) == 3:
                _put(*entry)
            else:
                _refill(*entry)


def _refill(box: Any, items: Any) -> None:
    """Give a dict, list or set the contents of ``items``, in place (the model may hold it
    under other names too)."""
    if type(box) is list:
        box[:] = items
    else:
        box.clear()
        box.update(items)


def _get(mod: nn.Module, name: str) -> Any:
    for d in (mod._buffers, mod._parameters, mod.__dict__):
        if name in d:
            return d[name]
    return _MISSING


def _put(mod: nn.Module, name: str, value: Any) -> None:
    for d in (mod._buffers, mod._parameters, mod.__dict__):
        if name in d:
            if value is _MISSING:
                del d[name]
            else:
                d[name] = value
            return
    if value is not _MISSING:
        mod.__dict__[name] = value


def _same_items(a: Any, b: Any) -> bool:
    """Whether two containers hold the same objects (by identity: cheap, never ambiguous)."""
    if len(a) != len(b):
        return False
    if type(a) is dict:
        return all(k in b and b[k] is v for k, v in a.items())
    if type(a) is list:
        return all(x is y for x, y in zip(a, b))
    return a == b  # a set: its items are hashable, equality is by value


def _equal(a: Any, b: Any) -> bool:
    if type(a) is not type(b) or isinstance(b, (Tensor, nn.Module)):
        return False
    try:
        return bool(a == b)
    except Exception:  # arrays and other values without a truth value
        return False


def _what(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"a {tuple(v.shape)} tensor"
    return type(v).__name__


def _unchanged(was: dict, now: dict) -> bool:
    """The same keys holding the same objects (C-level loops: the common case is fast)."""
    return (
        len(was) == len(now)
        and all(map(_is, was.values(), now.values()))
        and all(map(_eq, was, now))
    )


NO_CHANGES = StateChanges()  # shared: never modified


def changes(snap: Snapshot) -> StateChanges:
    """What changed since :func:`snapshot` (nothing, for almost every model)."""
    out = NO_CHANGES
    for path, mod, attrs, buffers, params, kept in snap:
        now_attrs = mod.__dict__
        if (
            _unchanged(attrs, now_attrs)
            and _unchanged(buffers, mod._buffers)
            and _unchanged(params, mod._parameters)
            and (not kept or all(_same_items(v, now_attrs[k]) for k, v in kept.items()))
        ):
            continue
        if out is NO_CHANGES:
            out = StateChanges()
        _module_changes(out, path, mod, attrs, buffers, params, kept)
    return out


def _module_changes(
    out: StateChanges,
    path: str,
    mod: nn.Module,
    attrs: dict,
    buffers: dict,
    params: dict,
    kept: dict,
) -> None:
    prefix = f"{path}." if path else ""
    for kind, was, now in (
        ("buffer", buffers, mod._buffers),
        ("parameter", params, mod._parameters),
    ):
        for k, v in now.items():
            old = was.get(k, _MISSING)
            if old is not v:
                verb = "added" if old is _MISSING else "reassigned"
                out.lines.append(f"{kind} {prefix}{k} {verb} ({_what(v)})")
                out.before.append((mod, k, old))
        for k in was.keys() - now.keys():
            out.lines.append(f"{kind} {prefix}{k} removed")
            out.before.append((mod, k, was[k]))
    for k, v in mod.__dict__.items():
        if k in _MODULE_ATTRS:
            continue
        old = attrs.get(k, _MISSING)
        if old is not v:
            if _equal(old, v):
                continue  # an equal plain value set again (self.step = 0)
            verb = "added" if old is _MISSING else "reassigned"
            out.lines.append(f"attribute {prefix}{k} {verb} ({_what(v)})")
            out.before.append((mod, k, old))
        elif k in kept and not _same_items(kept[k], v):
            was = kept[k]
            how = f"from {len(was)} to {len(v)} items" if len(was) != len(v) else "in place"
            out.lines.append(f"attribute {prefix}{k} ({type(v).__name__}) changed {how}")
            out.contents.append((v, was))


# ---------------------------------------------------------------- p.data = new_tensor
_DETACH = Tensor.detach
_DATA_PTR = Tensor.data_ptr
_SIZE = Tensor.size
_STRIDE = Tensor.stride


def held(params: list[Tensor]) -> list[Tensor]:
    """Each parameter's value going into a forward, uncopied: a detached tensor on its
    storage, which ``p.data = new_tensor`` in forward leaves as it was (and alive). About
    1 µs per parameter per trace, nothing per op."""
    return list(map(_DETACH, params))


def replaced(params: list[Tensor], names: list[str], kept: list[Tensor]) -> dict[str, Tensor]:
    """Parameters whose storage the forward replaced without an op (``self.p.data =
    new_tensor``): name -> the tensor it held going in. A new tensor on the same storage
    counts too where its shape or strides differ (``p.data = p.data[:k]``, ``p.data =
    p.data.t()``: the same data pointer). Per parameter a pointer, a size and a stride
    comparison (C-level loops)."""
    if (
        all(map(_eq, map(_DATA_PTR, params), map(_DATA_PTR, kept)))
        and all(map(_eq, map(_SIZE, params), map(_SIZE, kept)))
        and all(map(_eq, map(_STRIDE, params), map(_STRIDE, kept)))
    ):
        return {}
    return {
        n: k
        for p, n, k in zip(params, names, kept)
        if p.data_ptr() != k.data_ptr() or p.shape != k.shape or p.stride() != k.stride()
    }


def replaced_line(name: str, old: Tensor, new: Tensor) -> str:
    shape = "" if old.shape == new.shape else f", {tuple(old.shape)} -> {tuple(new.shape)}"
    return f"parameter {name} replaced (p.data = ...{shape})"
