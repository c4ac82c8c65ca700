"""Which activations a trace keeps: ``save=`` in :func:`lurker.trace`."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from ..errors import LurkerError, close_names
from ..graph.nodes import Op
from ..ops.catalogue import FORMER_NAMES


class SavePolicy:
    """Decides per op (at record time) and per module call (when it returns)."""

    def __init__(
        self,
        ops: Callable[[Op], bool] | None = None,
        modules: Callable[[str, nn.Module], bool] | None = None,
        everything: bool = False,
        patterns: list[str] | None = None,
        classes: tuple[type, ...] = (),
    ):
        self._ops = ops
        self._modules = modules
        self.everything = everything
        self.patterns = patterns  # the names/globs given, checked against the trace after
        self.classes = classes  # the module classes given, checked against the model before

    def wants_op(self, op: Op) -> bool:
        return self.everything or (self._ops is not None and self._ops(op))

    def wants_module(self, path: str, module: nn.Module) -> bool:
        return self._modules is not None and self._modules(path, module)

    @property
    def asks_ops(self) -> bool:
        """Whether it looks at each op (which must then be complete when recorded)."""
        return self._ops is not None

    @property
    def saves_modules(self) -> bool:
        return self._modules is not None


def _match(patterns: list[str], *names: str) -> bool:
    for n in names:
        for p in patterns:
            if n == p or fnmatch.fnmatchcase(n, p):
                return True
    return False


def make_policy(save: Any) -> SavePolicy:
    """Turn the user's ``save=`` into a :class:`SavePolicy`.

    Accepts ``"all"``/``True``, ``"none"``/``False``/``None``, a name or glob or a list of
    them (op labels like ``conv2d_3``, rolled labels, module paths like ``features.*``),
    a module class or tuple of classes, or a predicate ``fn(op) -> bool``.
    """
    if save is True or save == "all":
        return SavePolicy(everything=True)
    if save is False or save is None or save == "none":
        return SavePolicy()
    if isinstance(save, type) and issubclass(save, nn.Module):
        save = (save,)
    if isinstance(save, tuple) and save and all(isinstance(s, type) for s in save):
        types = save
        return SavePolicy(modules=lambda path, mod: isinstance(mod, types), classes=types)
    if isinstance(save, str):
        save = [save]
    if callable(save):
        fn = save
        return SavePolicy(ops=lambda op: bool(fn(op)))
    if isinstance(save, Mapping):  # iterating gives its keys: {"fc": False} would save fc
        raise LurkerError(
            f"save= is a {type(save).__name__}; it takes names, not a mapping. Pass the names/globs to save as a list "
            "(save=[k for k, keep in d.items() if keep]), module classes, 'all', 'none' or "
            "a function op -> bool."
        )
    if isinstance(save, Iterable):
        pats = list(save)
        if not all(isinstance(p, str) for p in pats):
            raise LurkerError(
                f"save={save!r} mixes names with other things. Pass names/globs "
                "(['features.*', 'conv2d_3']), module classes ((nn.Conv2d, nn.Linear)), "
                "'all', 'none' or a function op -> bool."
            )

        def ops(op: Op) -> bool:
            # the rolled label too: while recording it is the label, but after the build a
            # looped op's label is linear_1:2, and a replay asking for linear_1 must match
            return _match(pats, op.label, op.rolled, f"{op.rolled}:{op.pass_num}", op.name)

        def modules(path: str, mod: nn.Module) -> bool:
            return _match(pats, path)

        return SavePolicy(ops=ops, modules=modules, patterns=pats)
    raise LurkerError(
        f"save={save!r} is not understood. Use 'all', 'none', a list of op labels or "
        "module paths (globs allowed), module classes, or a function op -> bool."
    )


def check_classes(policy: SavePolicy, model: nn.Module) -> None:
    """Raise if the ``save=`` module classes match no module of the model (before it
    runs): as a name that matches nothing, it would silently save nothing."""
    if not policy.classes or any(isinstance(m, policy.classes) for m in model.modules()):
        return
    given = ", ".join(c.__name__ for c in policy.classes)
    held = ", ".join(dict.fromkeys(type(m).__name__ for m in model.modules()))
    raise LurkerError(
        f"save=({given}) matches no module of {type(model).__name__}, so nothing would be "
        f"saved. Its module classes: {held}."
    )


def second_paths(model: nn.Module | None) -> dict[str, str]:
    """Each path a module is registered under besides its first (``enc.emb`` where
    ``self.enc.emb = self.emb``, and the paths below it), mapped to the first (``emb``),
    the one a trace names it by, as ``model.named_modules()`` does."""
    if model is None:
        return {}
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        name = first.setdefault(id(module), path)
        if name != path:
            alias[path] = name
    return alias


def shared_module_note(model: nn.Module | None, keys: Iterable[Any]) -> str:
    """A sentence for each key that names a module by a second path it is registered
    under (``enc.emb`` where ``self.enc.emb = self.emb``), or empty. A trace names each
    module by its first path, as ``model.named_modules()`` does, so such a key matches
    nothing; the sentence gives the path that does. Only called once a key matched nothing."""
    alias = second_paths(model)
    notes = []
    for key in keys:
        if not isinstance(key, str) or not alias:
            continue
        path, colon, pass_num = key.partition(":")
        parts = path.split(".")
        for n in range(len(parts), 0, -1):  # the longest registered prefix
            head = ".".join(parts[:n])
            if head in alias:
                name = ".".join([alias[head], *parts[n:]]) + colon + pass_num
                notes.append(
                    f"'{head}' is the module registered first as '{alias[head]}' (one module "
                    "under two paths); a trace names it by its first path, as "
                    f"model.named_modules() does: use {name!r}."
                )
                break
    return (" " + " ".join(notes)) if notes else ""


def check_patterns(
    policy: SavePolicy,
    ops: Iterable[Op],
    module_paths: Iterable[str],
    model: nn.Module | None = None,
    stacklevel: int = 3,
) -> None:
    """Raise if a ``save=`` name or glob matched nothing in the trace: a typo would
    otherwise silently save nothing. The message lists what the names can match (and,
    for a shared module's second path, its first: ``model`` is read for that). Warn
    (at ``stacklevel`` above this call) of a glob that covers a shared module only by
    its second path, which would leave it out as silently."""
    if not policy.patterns:
        return
    ops = list(ops)
    labels: list[str] = []
    names: set[str] = set()
    extra: set[str] = set()
    for op in ops:
        if op.kind in ("buffer", "constant"):  # matched by name, but not worth listing
            extra.update((op.label, op.name))
            continue
        labels.append(op.label)
        names.add(op.name)
        extra.update((op.rolled, f"{op.label}:{op.pass_num}"))
    paths = [p for p in module_paths if p]
    everything = [*labels, *names, *extra, *paths]
    missing = [p for p in policy.patterns if not _match([p], *everything)]
    if not missing:
        _warn_second_paths(policy, ops, set(paths), model, stacklevel + 1)
        return

    def some(items: Iterable[str], n: int = 12) -> str:
        items = list(dict.fromkeys(items))
        more = f", ... ({len(items) - n} more)" if len(items) > n else ""
        return ", ".join(items[:n]) + more

    close = [
        c
        for p in missing
        if not any(ch in p for ch in "*?[")
        for c in close_names(p, [*paths, *labels, *names], n=4, cutoff=0.6)
    ]
    hint = f" Did you mean {', '.join(map(repr, dict.fromkeys(close)))}?" if close else ""
    path_set = set(paths)
    for p in missing:  # 'layer1.0.relu:2', the name a module's pass is read by
        base, _, num = p.rpartition(":")
        if num.isdigit() and base in path_set:
            hint += (
                f" A module is saved by its path, every pass of it: save=[{base!r}] keeps "
                f"them all, and its pass {num} is read as acts[{p!r}]."
            )
            break
    for p in missing:  # 'linear_dynamic_1', as an older lurker named the op
        old = max((n for n in FORMER_NAMES if p.startswith(n)), key=len, default=None)
        renamed = None if old is None else FORMER_NAMES[old] + p[len(old) :]
        if renamed is not None and _match([renamed], *everything):
            hint += (
                f" The op {old!r} is named {FORMER_NAMES[old]!r} now (torch's quantized "
                f"operators are named apart from aten's): use {renamed!r}."
            )
    raise LurkerError(
        f"save={missing!r} matches no op or module of this model, so nothing would be saved "
        f"for {'it' if len(missing) == 1 else 'them'}.{hint}"
        f"{shared_module_note(model, missing)} save= names (globs allowed) match op "
        f"labels ({some(labels)}), op names ({some(sorted(names))}) and module paths "
        f"({some(paths) or 'none'}); or pass 'all', 'none', module classes or a function."
    )


def _warn_second_paths(
    policy: SavePolicy, ops: list[Op], paths: set[str], model: nn.Module | None, stacklevel: int
) -> None:
    """Warn of modules a ``save=`` glob covers only by a second path they are registered
    under (``enc.*`` over ``enc.emb`` where ``self.enc.emb = self.emb``): a trace names a
    module by its first path, which the glob does not match, so its output is not saved,
    while the user asked for everything under ``enc``. The warning names the path to add;
    none where save= keeps that module's output anyway (by an op label or name)."""
    alias = second_paths(model)
    if not alias:  # the common case: no module under two paths
        return
    kept = {m.partition(":")[0] for op in ops for m in op.module_outputs if policy.wants_op(op)}
    gap = second_path_gaps(alias, policy.patterns, paths - kept)
    if gap is None:
        return
    named, add = gap
    warnings.warn(
        f"save={policy.patterns!r} does not save every module it covers: {named} (one "
        "module under two paths). A trace names a module by its first path, as "
        "model.named_modules() does, and the pattern does not match that one, so its "
        f"output is not saved; add {', '.join(map(repr, add))} to save= to keep it.",
        stacklevel=stacklevel,
    )


def second_path_gaps(
    alias: Mapping[str, str], patterns: list[str], paths: Iterable[str]
) -> tuple[str, list[str]] | None:
    """The modules among ``paths`` (first paths, as a trace names them) that ``patterns``
    cover only by a second path (``alias``: :func:`second_paths`), or None: a sentence
    naming them (at most 4, the topmost: one below another is covered with it) and the
    patterns that cover them by their first paths (``blk`` and ``blk.*`` where the
    modules below ``blk`` were covered too). For ``save=`` and ``Trace.find``."""
    paths = set(paths)
    left: dict[str, str] = {}  # first path -> the second path a pattern matched
    for second, first in alias.items():
        if (
            first in paths
            and first not in left
            and not _match(patterns, first)
            and any(fnmatch.fnmatchcase(second, p) for p in patterns)
        ):
            left[first] = second
    if not left:
        return None
    tops = [f for f in left if not any(f.startswith(g + ".") for g in left)]
    named = "; ".join(f"{left[f]!r} is the module registered first as {f!r}" for f in tops[:4])
    more = f" (and {len(tops) - 4} more)" if len(tops) > 4 else ""
    add = [
        n
        for f in tops[:4]
        for n in ([f, f"{f}.*"] if any(g.startswith(f + ".") for g in left) else [f])
    ]
    return named + more, add
