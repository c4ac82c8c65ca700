"""Hooks on a trace's ops (``Trace.hooks``, ``Trace.run(hooks=...)``), and the model's own.

Interventions: a hook ``fn(op, output)`` sees the live output of one op during a replay
and may return a replacement, which the rest of the forward then uses. Keys name ops the
way the trace does (label, rolled label, module path, index) and are resolved to op
indices once, before anything runs, so a typo fails at once and with suggestions.

The model's own hooks (``register_forward_hook`` and friends, as Zennit and Captum
install) run torch ops inside the forward, which the trace records and the replay
replays like any other. One added or removed after the trace changes the ops a forward
runs: :func:`model_hooks` records which hooks the traced forward ran with, so that a
replay that diverges can name that cause instead of blaming the data.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torch.nn.modules import module as _module

from ..errors import LurkerError, OpKeyError, close_names
from ._policy import shared_module_note

if TYPE_CHECKING:
    from ..graph.nodes import Op
    from .trace import Trace

HookFn = Callable[["Op", Any], Any]
"""``fn(op, output) -> replacement or None``: output is a tensor, or a tuple of tensors
for an op with several outputs."""
Resolved = dict[int, list[HookFn]]  # op index -> hooks, in the order given


# --------------------------------------------------------------------------- keys
def resolve(trace: Trace, hooks: Mapping[Any, HookFn]) -> Resolved:
    """Op indices of ``hooks``' keys; raises :class:`OpKeyError` for a key that names no
    op (with close matches) and :class:`LurkerError` for one that names no call, or for
    hooks that are not a mapping (a list of pairs would otherwise fail on ``.items``)."""
    if not isinstance(hooks, Mapping):
        raise LurkerError(
            f"hooks= is a {type(hooks).__name__}; it maps each op to its hook, "
            "{key: fn(op, output)}, a key being an op label, rolled label, module path or "
            "index. Pass a dict: hooks={'relu_1': fn} (for a list of pairs, dict(pairs))."
        )
    out: Resolved = {}
    checked: set[int] = set()  # one signature read per function (probe: one for all keys)
    for key, fn in hooks.items():
        if not callable(fn):
            raise LurkerError(
                f"hooks[{key!r}] is {type(fn).__name__}, not a function; a hook is called "
                "as fn(op, output) and returns a replacement output or None."
            )
        if id(fn) not in checked:
            _check_arity(key, fn)
            checked.add(id(fn))
        keyed = Keyed(key, fn)
        for op in ops_for(trace, key):
            out.setdefault(op.index, []).append(keyed)
    return out


class Keyed:
    """A hook with the key it was given under, so that a replacement that does not fit
    can be blamed on ``hooks['layer3']`` rather than only on the op it ran on."""

    __slots__ = ("fn", "key")

    def __init__(self, key: Any, fn: HookFn) -> None:
        self.key = key
        self.fn = fn

    def __call__(self, op: Op, output: Any) -> Any:
        return self.fn(op, output)


def _check_arity(key: Any, fn: HookFn) -> None:
    """Raise if ``fn`` cannot be called as ``fn(op, output)``: checked before anything
    runs, else it fails mid-forward with a TypeError naming neither the key nor the op."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (a builtin): let the call tell
        return
    try:
        sig.bind(None, None)
    except TypeError as why:
        name = getattr(fn, "__qualname__", type(fn).__name__)
        raise LurkerError(
            f"hooks[{key!r}] is {name}{sig}, which cannot be called as fn(op, output) "
            f"({why}). A hook takes the op and its output and returns a replacement or "
            "None: lambda op, out: out * 0.5."
        ) from None


def ops_for(trace: Trace, key: Any) -> list[Op]:
    """The ops ``key`` names: one, or every pass of a rolled label or reused module."""
    ops = trace.ops
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise OpKeyError(
            f"hook key {key!r} is a {type(key).__name__}; name an op by label "
            "('conv2d_3'), rolled label ('linear_1', every pass), module path "
            "('features.3', 'cell:2') or index (an int)."
        )
    if isinstance(key, int):
        if not 0 <= key < len(ops):
            raise OpKeyError(f"op index {key} out of range: this trace has {len(ops)} ops")
        found = [ops[key]]
    elif key in trace._index:
        found = [ops[trace._index[key]]]
    else:
        found = [op for op in ops if op.rolled == key]
        if not found and key in trace.modules:  # a reused module: each pass's output op
            # the op trace["cell:2"] names, once per call, as for a module called once: a
            # call whose outputs come from several ops is hooked at the last of them
            calls = dict.fromkeys(
                m for op in ops for m in op.module_outputs if m.startswith(key + ":")
            )
            found = [ops[trace._index[m]] for m in calls]
            if not found:
                raise OpKeyError(
                    f"module {key!r} produced no tensor output in this forward pass, so no "
                    "op stands for it; hook an op inside it ("
                    + ", ".join(op.label for op in trace.find(f"{key}.*")[:5])
                    + ")"
                )
        if not found:
            close = close_names(key, [*trace._index, *(op.rolled for op in ops), *trace.modules])
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            note = shared_module_note(trace.model, [key])
            raise OpKeyError(f"hook key {key!r} names no op or module of this trace.{hint}{note}")
    for op in found:
        _check_hookable(trace, key, op)
    return found


def _check_hookable(trace: Trace, key: Any, op: Op) -> None:
    if op.kind == "output":
        src = trace.ops[op.parents[0]] if op.parents else None
        fix = f"hook the op that computes it, {src.label!r}" if src is not None else ""
        raise LurkerError(f"hook key {key!r} is the model's output {op.name}, not a call; {fix}")
    if op.kind in ("input", "buffer", "constant"):
        raise LurkerError(
            f"hook key {key!r} is the model's {op.kind} {op.name}, which no op computes in "
            "the forward; pass another input (or change the model's tensor) instead."
        )
    if op.kind == "readout":
        raise LurkerError(
            f"hook key {key!r} is {op.label}, a readout (bool(t), t.item()) whose value is "
            "Python's, not a tensor; hook the op it reads."
        )
    if op.seq < 0:
        raise LurkerError(f"hook key {key!r} is {op.label}, which no call of the forward made")


# --------------------------------------------------------------------------- calling
def call(
    op: Op,
    fns: list[HookFn],
    out: Any,
    outs: list[Tensor],
    inplace: bool,
    into: Tensor | None = None,
) -> Any:
    """Run ``fns`` on the op's output; return what the model's call returns.

    ``out`` is what the call returned, ``outs`` its output tensors (the input it modified
    for an op that returns nothing), ``inplace`` whether ``outs[0]`` is an input it
    modified in place: a replacement is then written into that tensor, since the model
    may go on using it rather than the return value (``x.relu_()``). ``into``: the input
    itself, where the in-place op ran on a copy of it (``outs[0]``): the hooks' value,
    replaced or not, is written there, and stands for the copy in what the call returns.
    """
    value = outs[0] if len(outs) == 1 else tuple(outs)
    last = None  # the hook whose replacement stands, named only in an error
    for fn in fns:
        new = fn(op, value)
        if new is not None:
            last = fn
            value = _check(fn, op, new, value)
    if len(outs) == 1:
        if into is not None:
            _write(last, op, value, into)
            return into if out is outs[0] else out
        if value is outs[0]:
            return out
        if inplace:
            _write(last, op, value, outs[0])
            return out
        if isinstance(out, Tensor) or out is None:
            return value
        value = (value,)
    elif all(a is b for a, b in zip(value, outs)):
        return out
    return _rebuild(out, iter(value))


def named(op: Op, fn: Any) -> str:
    """The hook as a message names it: its key, and the op where the key is another name."""
    key = fn.key if type(fn) is Keyed else None
    if key is None:
        return f"a hook on {op.label}"
    return f"hooks[{key!r}]" + ("" if key == op.label else f" (on {op.label})")


def _write(fn: Any, op: Op, value: Tensor, target: Tensor) -> None:
    """Write a hook's value into the tensor an in-place op writes (autograd records the
    copy: gradients reach the replacement)."""
    if value.shape != target.shape:
        raise LurkerError(
            f"{named(op, fn)} returned shape {tuple(value.shape)}; {op.label} writes "
            f"its input in place, so its replacement is written into that tensor and must "
            f"have its shape {tuple(target.shape)}"
        )
    target.copy_(value)


def _rebuild(obj: Any, values: Any) -> Any:
    """``obj`` with its tensors, in :func:`~._tree.tensors` order, taken from ``values``;
    the same containers (torch's structseqs such as ``torch.return_types.max`` too)."""
    if isinstance(obj, Tensor):
        return next(values)
    if isinstance(obj, (tuple, list)):
        items = [_rebuild(o, values) for o in obj]
        t = type(obj)
        if t is tuple or t is list:
            return t(items)
        return t(*items) if hasattr(obj, "_fields") else t(items)  # namedtuple, structseq
    if isinstance(obj, dict):
        return type(obj)((k, _rebuild(v, values)) for k, v in obj.items())
    return obj


def _check(fn: Any, op: Op, new: Any, old: Any) -> Any:
    """A hook's replacement, checked against what it replaces."""
    if isinstance(old, Tensor):
        if not isinstance(new, Tensor):
            raise LurkerError(
                f"{named(op, fn)} returned {type(new).__name__}; return a tensor "
                "(the replacement output) or None (keep it)"
            )
        return new
    if (
        not isinstance(new, (tuple, list))
        or len(new) != len(old)
        or not all(isinstance(t, Tensor) for t in new)
    ):
        what = f"{len(new)} items" if isinstance(new, (tuple, list)) else type(new).__name__
        raise LurkerError(
            f"{named(op, fn)} returned {what}; {op.label} has {len(old)} output "
            f"tensors, so return a tuple of {len(old)} tensors or None"
        )
    return tuple(new)


# --------------------------------------------------------------------------- the model's own
_KINDS = (
    ("_forward_pre_hooks", "forward pre-hook"),
    ("_forward_hooks", "forward hook"),
    ("_backward_pre_hooks", "backward pre-hook"),
    ("_backward_hooks", "backward hook"),
)
_GLOBAL = (
    ("_global_forward_pre_hooks", "global forward pre-hook"),
    ("_global_forward_hooks", "global forward hook"),
    ("_global_backward_pre_hooks", "global backward pre-hook"),
    ("_global_backward_hooks", "global backward hook"),
)
# (module path or None for torch's global hooks, kind) -> {handle id: the hook's name}
ModelHooks = dict[tuple[str | None, str], dict[int, str]]


def model_hooks(modules: Mapping[str, nn.Module]) -> ModelHooks:
    """The hooks torch will run around ``modules``' forwards (path -> module), by handle
    id: cheap enough for every trace (most modules have none)."""
    out: ModelHooks = {}
    for attr, kind in _GLOBAL:
        d = getattr(_module, attr, None)
        if d:
            out[(None, kind)] = {k: _name(v) for k, v in d.items()}
    for path, mod in modules.items():
        for attr, kind in _KINDS:
            d = getattr(mod, attr, None)
            if d:
                out[(path, kind)] = {k: _name(v) for k, v in d.items()}
    return out


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def hook_changes(trace: Trace) -> list[str]:
    """The model's hooks added or removed since ``trace`` was made, one line each."""
    before: ModelHooks | None = getattr(trace, "_model_hooks", None)
    model = trace.model
    if before is None or model is None:
        return []
    mods = dict(model.named_modules())
    now = model_hooks(mods)
    lines = []
    for where in dict.fromkeys([*before, *now]):
        old, new = before.get(where, {}), now.get(where, {})
        for hid, name in new.items():
            if hid not in old:
                lines.append(f"{_describe(where, name, mods)} was added")
        for hid, name in old.items():
            if hid not in new:
                lines.append(f"{_describe(where, name, mods)} was removed")
    return lines


def _describe(where: tuple[str | None, str], name: str, mods: Mapping[str, nn.Module]) -> str:
    """``a forward hook (scale) on module 'features.2' (Conv2d)``."""
    path, kind = where
    if path is None:
        return f"a {kind} ({name})"
    mod = mods.get(path)
    cls = f" ({type(mod).__name__})" if mod is not None else ""
    on = f"module '{path}'{cls}" if path else f"the model itself{cls}"
    return f"a {kind} ({name}) on {on}"


def has_backward_hooks(trace: Trace) -> bool:
    """Whether the model runs backward hooks, which add ops to a forward only while
    autograd records it."""
    if trace.model is None:
        return False
    now = model_hooks(dict(trace.model.named_modules()))
    return any("backward" in kind for _, kind in now)
