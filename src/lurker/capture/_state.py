"""What a model holds besides its computation, before and after one forward.

Some models change their own state in ``forward``: they reassign buffers
(``self.buffer1 = torch.rand(4)``), or fill caches at their first call (timm's LeViT and
EfficientFormer cache attention biases), so that the next forward computes something
else or runs fewer ops. :func:`snapshot` before a traced forward and :func:`changes`
after it tell that apart from tracing changing what the model computes: validation
compares against an untraced forward from the state the trace started in, and replay
says that the graph depends on the model's state, not on the data.

Cheap by design (it runs on every trace): shallow copies of each module's attribute,
buffer and parameter dicts, and the sizes of the containers the model's own code keeps.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

# attributes every nn.Module has (hook dicts, the submodule dicts): not the model's own
_MODULE_ATTRS = frozenset(nn.Module().__dict__)
_CONTAINERS = (dict, list, set)
_MISSING = object()

Snapshot = list[tuple[str, nn.Module, dict, dict, dict, dict]]


def snapshot(modules: dict[str, nn.Module]) -> Snapshot:
    """The state of ``modules`` (path -> module, ``""`` the model itself)."""
    out: Snapshot = []
    for path, mod in modules.items():
        attrs = mod.__dict__
        sizes = {
            k: len(v) for k, v in attrs.items() if type(v) in _CONTAINERS and k not in _MODULE_ATTRS
        }
        out.append((path, mod, attrs.copy(), mod._buffers.copy(), mod._parameters.copy(), sizes))
    return out


class StateChanges:
    """What a forward changed in the model: readable lines, and what reassigned
    attributes held before (to run a forward from the starting state again)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.before: list[tuple[nn.Module, str, Any]] = []  # (module, attribute, old value)

    def __bool__(self) -> bool:
        return bool(self.lines)

    def restored(self) -> list[tuple[nn.Module, str, Any]]:
        """Put the reassigned attributes back as they were; returns what :meth:`undo` needs."""
        undo = []
        for mod, name, old in self.before:
            undo.append((mod, name, _get(mod, name)))
            _put(mod, name, old)
        return undo

    @staticmethod
    def undo(undo: list[tuple[nn.Module, str, Any]]) -> None:
        for mod, name, value in reversed(undo):
            _put(mod, name, value)


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


def changes(snap: Snapshot) -> StateChanges:
    """What changed since :func:`snapshot` (nothing, for almost every model)."""
    out = StateChanges()
    for path, mod, attrs, buffers, params, sizes in snap:
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
        now_attrs = mod.__dict__
        for k, v in now_attrs.items():
            if k in _MODULE_ATTRS:
                continue
            old = attrs.get(k, _MISSING)
            if old is not v:
                if _equal(old, v):
                    continue  # an equal plain value set again (self.step = 0)
                verb = "added" if old is _MISSING else "reassigned"
                out.lines.append(f"attribute {prefix}{k} {verb} ({_what(v)})")
                out.before.append((mod, k, old))
            elif k in sizes and len(v) != sizes[k]:
                out.lines.append(
                    f"attribute {prefix}{k} ({type(v).__name__}) changed size from "
                    f"{sizes[k]} to {len(v)}"
                )
    return out
