"""``lurker.trace``: record a model's forward pass, and the :class:`Trace` it returns."""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import numbers
import os
import sys
import threading
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LurkerError, MemoryLimitError, TraceError, first_three, warn
from ..graph.graph import Graph
from ..graph.nodes import Op
from . import _context, _hooks, _lazy, _nonfinite, _state, _stats
from ._build import build
from ._hooks import HookFn
from ._memory import AUTO_FRACTION, TRACED, fmt_bytes, parse_max_memory
from ._nonfinite import FirstNonFinite, MaskedInf, NonFiniteCount
from ._policy import (
    check_classes,
    check_patterns,
    make_policy,
    second_path_gaps,
    second_paths,
    shared_module_note,
)
from ._recorder import Recorder, TransformFailed, _model_index, is_compiled
from ._stats import OpStats
from ._tree import map_tensors, paths


def trace(
    model: nn.Module,
    *args: Any,
    save: Any = "all",
    transform: Callable[[Tensor], Tensor] | None = None,
    save_to: str | torch.device | None = None,
    grads: bool = False,
    max_memory: Any = "auto",
    **kwargs: Any,
) -> Trace:
    """Run ``model(*args, **kwargs)`` once and record every tensor operation.

    Args:
        model: any ``nn.Module``; it is not modified (hooks are removed afterwards).
        save: which activations to keep: ``"all"`` (default), ``"none"``, op labels /
            module paths / globs (``["features.*", "conv2d_3"]``), module classes
            (``nn.Conv2d``), or a predicate ``fn(op) -> bool``.
        transform: applied to each saved activation (and gradient) before it is kept,
            e.g. ``lambda t: t.mean((2, 3))`` to keep only spatial means.
        save_to: device for saved tensors (e.g. ``"cpu"`` to keep GPU memory free), in
            the trace and in every :meth:`Trace.run` of it.
        grads: register gradient hooks so that after ``trace.backward()`` (or your own
            ``.backward()`` on ``trace.output``) each saved op holds its gradient.
        max_memory: most bytes of saved activations before the trace stops with
            :class:`~lurker.errors.MemoryLimitError` instead of running the machine out
            of memory: ``"auto"`` (80% of the memory available on the device they are
            saved to), a size (``2_000_000_000``, ``"2GB"``, ``"512MiB"``), a fraction of
            the available memory (``0.5``), or ``None``/``"off"`` for no limit.

    Raises:
        TraceError: the model raised; ``err.partial`` holds the trace up to the failing op.
        MemoryLimitError: the saved activations would pass ``max_memory``.
    """
    if not isinstance(model, nn.Module):
        raise LurkerError(
            f"lurker.trace needs an nn.Module, got {type(model).__name__}. "
            "Pass the model object itself: lurker.trace(model, x)."
        )
    # the model itself here; a scripted submodule once the model's index is at hand
    top = "" if isinstance(model, torch.jit.ScriptModule) else None
    hidden = hidden_forward(model, scripted=top, compiled=None)
    if hidden is not None:
        reason, ops_seen = hidden
        if not ops_seen:
            raise LurkerError(f"lurker.trace cannot record this model: {reason}.")
        warnings.warn(
            f"lurker.trace: {reason}. The trace holds its ops, none in a module.", stacklevel=2
        )
    # under inference mode: recorded under no_grad instead (see there); the checks above
    # ran once, and a warning below points at the caller either way
    if torch.is_inference_mode_enabled():
        with _context.no_inference_mode():
            return _record(model, args, kwargs, save, transform, save_to, grads, max_memory)
    return _record(model, args, kwargs, save, transform, save_to, grads, max_memory)


def _record(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    save: Any,
    transform: Callable[[Tensor], Tensor] | None,
    save_to: str | torch.device | None,
    grads: bool,
    max_memory: Any,
) -> Trace:
    """:func:`trace` past its checks on the model, outside inference mode: its warnings
    are at ``stacklevel`` 3 from here, the caller of :func:`trace`."""
    args, kwargs = _context.without_inference_tensors(args, kwargs)
    policy = make_policy(save)
    check_classes(policy, model)
    if transform is not None and not callable(transform):  # else "transform= raised" per op
        raise LurkerError(
            f"transform={transform!r} is a {type(transform).__name__}, not a function; it is "
            "called on each saved tensor and returns what to keep, e.g. "
            "transform=lambda t: t.mean(tuple(range(2, t.dim()))). None keeps the tensors."
        )
    device = _save_device(save_to) if save_to is not None else None
    limit, fraction = parse_max_memory(max_memory)
    auto = isinstance(max_memory, str) and max_memory.lower() == "auto"
    rec = Recorder(model, save=policy, transform=transform, device=device, grads=grads)
    if policy.everything or policy.asks_ops or policy.saves_modules:
        rec.set_memory_limit(limit, fraction, auto=auto)
    named = _name_inputs(model, args, kwargs)
    if not kwargs and all(type(a) is Tensor for a in args):  # the common case, quicker
        inputs_copy: tuple = (tuple([a.detach().clone() for a in args]), {})
    else:
        inputs_copy = (map_tensors(args, _copy), map_tensors(kwargs, _copy))
    try:
        for name, t in named:
            rec.add_source_node("input", name, t)
    except TransformFailed as e:  # on an input: the same error, with the same partial,
        # as on an op (the forward has not run: the partial holds the inputs before it)
        rng = _context.current(rng=True, grad=rec.grad0)
        partial = Trace._build(rec, None, inputs_copy, rng, 0.0, complete=False)
        raise _transform_error(e, partial) from e.__cause__
    rng = _context.current(rng=True, grad=rec.grad0)  # the state it starts in
    rec.attach()
    idx = rec.index
    if idx.scripted is not None or idx.compiled is not None:  # its ops would be unseen
        # (or fail deep inside torch, or in TorchDynamo as a wrong input shape)
        reason = hidden_forward(model, idx.scripted, idx.compiled)[0]
        raise LurkerError(f"lurker.trace cannot record this model: {reason}.")
    # lazy modules materialize their parameters in this forward: unrecorded (see _lazy)
    lazy = _lazy.LazyInits(rec, idx.lazy) if idx.lazy else None
    params, param_names = idx.param_list, idx.param_list_names
    kept = _state.held(params) if params else None  # to tell `p.data = ...` afterwards
    state = rec.state_snapshot = _state.snapshot(rec.modules)
    model_hooks = _hooks.model_hooks(rec.modules)  # (a replay that diverges compares)
    rec.stop_frame = sys._getframe()
    grad_ctx = torch.enable_grad() if grads else nullcontext()
    # The recorder makes a few container objects per op, all alive until the trace is
    # built; letting the cyclic GC scan them (and all of torch) over and over costs more
    # than the recording itself, so it waits until the trace is complete.
    gc_was_on = gc.isenabled()
    gc.disable()
    t0 = perf_counter()
    try:
        try:
            with grad_ctx, rec:
                output = model(*args, **kwargs)
        except Exception as e:
            made_there = _inference_made(model, e)
            if made_there is not None:
                raise made_there from e
            if rec.over_limit is None:
                partial = Trace._build(
                    rec, None, inputs_copy, rng, perf_counter() - t0, complete=False
                )
                if isinstance(e, TransformFailed):  # the caller's transform, not the model
                    raise _transform_error(e, partial) from e.__cause__
                raise _trace_error(model, e, partial, rec, (args, kwargs)) from e
            # past max_memory: raised below, out of this block, so that the error does
            # not chain the model's frames (and the tensors they hold)
        finally:
            rec.release_frames()
            if lazy is not None:
                lazy.restore()
        if rec.over_limit is not None:  # (also if the model caught the signal and went on)
            raise _memory_error(model, rec, inputs_copy, rng)
        wall = perf_counter() - t0
        # what the forward changed in the model besides reassignments (below): every list
        # here is empty, and costs nothing, for a model that writes nothing
        changes: list[str] = []
        no_output_check = None
        if lazy is not None and lazy.done:
            changes += _lazy_lines(lazy)
            lazy.update(rec)
            model_hooks = _hooks.model_hooks(rec.modules)  # the init hooks removed themselves
            if lazy.random_before():
                no_output_check = (
                    "a random op ran before a lazy module drew its initial weights, and an "
                    "untraced forward of the materialized model cannot draw the same numbers"
                )
            else:  # what the forward's random ops drew from, as a materialized model would
                rng = rng._replace(rng=lazy.done[-1][2])
        if rec.model_writes:
            changes += _inplace_lines(rec)
            rec.detach_from_model()
        gone = _state.replaced(params, param_names, kept) if kept else {}
        if gone:
            now = dict(zip(param_names, params))
            changes += [_state.replaced_line(n, old, now[n]) for n, old in gone.items()]
        tr = Trace._build(rec, output, inputs_copy, rng, wall, complete=True)
        tr._state = _state.changes(state)
        tr._changes = changes
        tr._param_replaced = gone
        tr._no_output_check = no_output_check
        tr._model_hooks = model_hooks
        tr._max_memory = (limit, fraction, auto)  # Trace.run's default
        check_patterns(policy, tr.ops, tr.modules, model, stacklevel=4)
        if rec.saved_modules:
            _warn_no_output(tr, rec.saved_modules, policy.patterns or ())
        if not model.training and idx.mode_layers:
            _warn_mixed_modes(model, idx.mode_layers)
        return tr
    finally:
        if gc_was_on:
            gc.enable()


def hidden_forward(
    model: nn.Module, scripted: str | None = "?", compiled: str | None = "?"
) -> tuple[str, bool] | None:
    """Why lurker cannot see ``model``'s ops or modules, as ``(reason, ops_seen)``, or None.

    lurker records the Python forward of eager modules. A TorchScript module (or one
    inside the model) runs a compiled graph in C++ and a ``torch.compile``'d model runs
    the code TorchDynamo generated: neither shows its ops to a TorchFunctionMode, so the
    trace would be empty or fail deep inside torch (``ops_seen`` False). A compiled
    submodule is refused too, not warned of: TorchDynamo compiles lurker's recording along
    with it and fails, blaming the input's shape, so the trace would be no use. An fx
    graph of aten ops (``torch.export``'s ``.module()``, ``make_fx``) calls them on its
    weights directly: its ops are seen, but its layers are no longer module calls
    (``ops_seen`` True). The reason names what to pass instead: the eager model.

    ``scripted`` / ``compiled``: the path of the model's outermost TorchScript module /
    torch.compile'd submodule where the caller knows it (``None``: it has none; a trace
    reads them from its cached model index rather than walk the modules on every call);
    by default they are read from that index here."""
    if is_compiled(model):
        return (
            "it is a torch.compile'd model (OptimizedModule), whose forward runs the code "
            "TorchDynamo compiled, where lurker cannot see its ops; pass the eager model it "
            "wraps, model._orig_mod",
            False,
        )
    if scripted == "?" or compiled == "?":  # from the model index a trace caches anyway
        if isinstance(model, torch.jit.ScriptModule):  # (not indexed: refused as it is)
            scripted, compiled = "", None
        else:
            idx = _model_index(model)
            scripted, compiled = idx.scripted, idx.compiled
    if scripted is None and compiled is not None:
        fix = f"model.{compiled} = model.{compiled}._orig_mod"
        if not all(part.isidentifier() for part in compiled.split(".")):  # a Sequential's "0"
            fix = f"its _orig_mod, set where model.get_submodule({compiled!r}) is"
        return (
            f"its submodule {compiled!r} is a torch.compile'd module (OptimizedModule), "
            "whose forward runs the code TorchDynamo compiled, where lurker cannot see its "
            "ops (and TorchDynamo fails on lurker's recording); pass the model with the "
            f"eager module it wraps in its place: {fix}",
            False,
        )
    if scripted is not None:
        what = "it is" if not scripted else f"its submodule {scripted!r} is"
        # (the outermost one: its path goes through eager modules, or is the model's own)
        kind = type(model.get_submodule(scripted) if scripted else model).__name__
        return (
            f"{what} a TorchScript module ({kind}: torch.jit.script, torch.jit.trace or "
            "torch.jit.load), whose forward runs as a compiled graph where lurker cannot see "
            "its ops; pass the eager nn.Module it was made from (for a saved TorchScript "
            "file: build the model's class and load the scripted module's state_dict() "
            "into it)",
            False,
        )
    if isinstance(model, torch.fx.GraphModule) and _aten_graph(model):
        return (
            "it is an fx GraphModule of aten ops (as torch.export.export(...).module() and "
            "make_fx make), whose graph calls aten ops on its weights directly, so none of "
            "its layers is a module call: its ops are named as the eager calls they stand "
            "for (conv2d, linear) and counted as those, but a layer is known by its op label "
            "(conv2d_1), not its module path, in-place ops are copies, and a decomposed "
            "graph (make_fx, run_decompositions) holds aten's parts (convolution, addmm, t) "
            "in place of the eager calls; pass the eager model it was made from to see its "
            "layers",
            True,
        )
    return None


# GraphModule -> (its graph, weakly; its code; whether it calls aten ops; the targets of
# its call_module nodes)
_ATEN_GRAPHS: weakref.WeakKeyDictionary[nn.Module, tuple[Any, str, bool, tuple[str, ...]]] = (
    weakref.WeakKeyDictionary()
)


def _aten_graph(model: torch.fx.GraphModule) -> bool:
    """Whether ``model``'s graph calls aten ops and no module that holds parameters (as
    torch.export's ``.module()`` and ``make_fx`` make it), where a symbolic_trace'd
    model calls its layers as modules.

    The walk over every node of the graph is cached per model, and done again only when
    its graph object or its generated code changes (``model.graph = ...``, a
    ``recompile()`` after an edit), so that tracing a graph of thousands of nodes over and
    over does not pay it each time. The modules the graph calls are looked up on every
    call (only for a graph of aten ops: few), since a swap (``model.sub = other``) changes
    no graph and no code."""
    graph, code = model.graph, model.code
    cached = _ATEN_GRAPHS.get(model)
    if cached is None or cached[0]() is not graph or cached[1] != code:
        nodes = graph.nodes
        aten = any(
            n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in nodes
        )
        targets = tuple(n.target for n in nodes if n.op == "call_module")
        # (the graph weakly: it refers to its module, which would then never leave the cache)
        cached = _ATEN_GRAPHS[model] = (weakref.ref(graph), code, aten, targets)
    if not cached[2]:
        return False
    # (export's own call_modules, such as its input guards, hold no parameters)
    called = (model.get_submodule(t) for t in cached[3])
    return not any(next(m.parameters(), None) is not None for m in called)


def _transform_error(e: TransformFailed, partial: Trace) -> TraceError:
    """``transform=`` raised while recording: a :class:`TraceError` whose partial trace
    (and ``failed_op``) names the op or input whose value it raised on."""
    if e.node is not None:
        partial.failed_op = e.node.label
    return TraceError(str(e), partial=partial, failed_op=partial.failed_op)


def _warn_no_output(tr: Trace, saved: set[str], named: Sequence[str] = ()) -> None:
    """Warn of modules ``save=`` names that ran but have no output to save: none of the
    values made in their calls was used outside them (a result the caller discarded, or a
    module that returned its input), so which op is their result cannot be told and
    nothing of them was kept. A module ``named`` by its path (not a glob) that ran no op
    at all, an ``nn.Identity`` (timm's ``fc_norm``, ``ls1``), is warned of too: asked for
    by name, it would otherwise only fail when its value is read."""
    for path in sorted(saved):
        info = tr.modules.get(path)
        if info is None or info.outputs:
            continue
        if not info.num_passes:
            if path in named:
                warnings.warn(
                    f"save= names module {path!r} ({info.type}), but no op ran inside it: "
                    "it was not called, or it returned a tensor made before its call (an "
                    "nn.Identity returns its input), so no op stands for its output and "
                    "nothing of it was saved; save the layer whose output it passed on",
                    stacklevel=4,
                )
            continue
        inside = [op.label for op in tr.compute_ops if any(p == path for p, _ in op.modules)]
        if not inside:
            continue
        warnings.warn(
            f"save= names module {path!r}, but no value made in its call was used outside "
            "it (the caller discarded its result, or it returned a tensor made before the "
            "call), so lurker cannot tell which op is its result and saved nothing of it; "
            f"name the op to keep instead, e.g. save=[{inside[-1]!r}] (its last op)",
            stacklevel=4,
        )


def _warn_training(model: nn.Module) -> None:
    """Say so where a run keeps the activations of a model in training mode whose layers
    then compute otherwise: a stimulus set's activations would be random (dropout) or
    depend on which stimuli shared a batch (BatchNorm), and nothing else would tell. Once
    per line of the caller's code, as Python shows a warning: a loop over batches warns
    once. Per run, not per op: a walk over the modules."""
    found = _context.training_layers(model)
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        what = (
            f"{type(model).__name__} is in training mode, where"
            if model.training
            else f"{type(model).__name__} is in eval mode, but"
        )
        one = len(found) == 1
        where = "" if model.training else f" {'is' if one else 'are'} in training mode and"
        warn(
            f"{what} {', '.join(found[:3])}{more}{where} "
            f"{'computes' if one else 'compute'} otherwise than at inference: dropout is "
            "random on every forward and "
            "BatchNorm normalises by the statistics of the batch (and updates its running "
            "ones), so the activations this run keeps change from run to run or with the "
            "stimuli that share its batch. Call model.eval() first (the run uses the model's "
            "mode as it is now), unless training-mode values are what you want."
        )


#: nodes that hold the model's state (running statistics, constants), not computed values:
#: left out of stats(), where a BatchNorm's zero running mean would read as a dead layer
_STATE_KINDS = frozenset({"buffer", "constant"})


def _warn_mixed_modes(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
    """Say so where a model in eval mode holds a dropout or BatchNorm in training mode (one
    switched back by fine-tuning code, or a submodule built after ``model.eval()``): the
    trace then records a random dropout and a BatchNorm that normalises by the batch and
    updates its running statistics, where ``model.eval()`` promised inference, and only the
    ops' ``training=True`` arguments would show it. A model wholly in training mode is
    traced as it is, unwarned: that is a choice, not a slip (``tr.run`` warns of both when
    it keeps activations). ``layers``: the model's cached mode-dependent layers, so a
    trace does not walk the whole model for this."""
    found = _context.training_layers(model, layers)
    if found:
        one = len(found) == 1
        warn(
            f"{type(model).__name__} is in eval mode, but {first_three(found)} "
            f"{'is' if one else 'are'} in training mode, so this trace records "
            f"{'it' if one else 'them'} computing as in training: dropout drops values at "
            "random, BatchNorm normalises by the batch's own statistics and updates its "
            "running ones (their ops' training=True). Call model.eval() before tracing, "
            "unless training-mode values are what you want."
        )


def _lazy_lines(lazy: _lazy.LazyInits) -> list[str]:
    """A line per parameter a lazy module materialized in the traced forward."""
    mods = lazy.rec.modules
    out = []
    for path, _n, _rng in lazy.done:
        prefix = f"{path}." if path else ""
        for n, p in mods[path]._parameters.items():
            if p is not None:
                out.append(
                    f"parameter {prefix}{n} materialized by its lazy module {tuple(p.shape)}"
                )
    return out


def _inplace_lines(rec: Recorder) -> list[str]:
    """A line per parameter, buffer and tensor attribute the forward's ops wrote into in
    place (running statistics, an EMA codebook), and per buffer or tensor attribute it
    replaced (``b.data = new``; parameters: ``_state.replaced``): the recorder noted each
    write, so this is per write, after the forward, not per op."""
    written = rec.state_written
    # parameters first, then buffers and attributes, each in the order written
    out = [f"{k} updated in place" for k in written if k.startswith("parameter ")]
    out += [f"{k} updated in place" for k in written if not k.startswith("parameter ")]
    for k, t in rec.state_replaced.items():
        old = rec.state_before[k][1]
        shape = "" if old.shape == t.shape else f", {tuple(old.shape)} -> {tuple(t.shape)}"
        out.append(f"{k} replaced (.data = ...{shape})")
    return out


def settled_trace(model: nn.Module, *args: Any, **kwargs: Any) -> Trace:
    """:func:`trace` of ``model`` as it runs on every later call.

    Some models change their own state in their first forward (timm's LeViT and
    EfficientFormer cache attention biases), so later forwards run fewer ops than the
    first. Whoever replays the trace on other inputs (the probe on every batch, LRP's
    rules) traces such a model again once its state has settled.
    """
    tr = trace(model, *args, **kwargs)
    # reassigned attributes and filled caches change the graph; values written into
    # parameters and buffers (running statistics) do not, nor a lazy module's first
    # forward (its set-up is not recorded)
    if tr._state:
        tr = trace(model, *args, **kwargs)
    return tr


# forward function -> its signature, and the names of its positional parameters when
# it has only those (then positional args need no bind); weak, so a closure over a model
# never keeps it alive
_SIGNATURES: weakref.WeakKeyDictionary[Any, tuple[inspect.Signature, tuple[str, ...] | None]] = (
    weakref.WeakKeyDictionary()
)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _signature(fwd: Any) -> tuple[inspect.Signature, tuple[str, ...] | None]:
    key = getattr(fwd, "__func__", fwd)
    try:
        hit = _SIGNATURES.get(key)
    except TypeError:  # not weakly referenceable: not cached
        hit = None
    if hit is None:  # inspect.signature is slow; a forward's signature never changes
        sig = inspect.signature(fwd)
        params = list(sig.parameters.values())
        simple = all(p.kind in _POSITIONAL for p in params)
        names = tuple(p.name for p in params) if simple else None
        hit = (sig, names)
        with contextlib.suppress(TypeError):
            _SIGNATURES[key] = hit
    return hit


def _save_device(save_to: Any) -> torch.device:
    """``save_to=`` as a device this machine has, checked before the forward runs: torch's
    own errors ("Invalid device string", "Found no NVIDIA driver") name neither the
    argument nor what to pass instead."""
    try:
        dev = torch.device(save_to)
    except (RuntimeError, ValueError, TypeError):
        raise LurkerError(
            f"save_to={save_to!r} is not a device. Pass 'cpu', 'cuda', 'cuda:N' (or an int N "
            "for cuda:N) or a torch.device; None keeps saved tensors where they are."
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            has = f"{count} CUDA device(s) (cuda:0..cuda:{count - 1})" if count else "no CUDA GPU"
            raise LurkerError(
                f"save_to={save_to!r} asks for {dev}, but this machine has {has}. Pass "
                "save_to='cpu' (or None: saved tensors stay on the device they are made on)."
            )
    elif dev.type == "meta":  # would "save" shapes with no values, silently
        raise LurkerError(
            f"save_to={save_to!r} keeps no values (a meta tensor has a shape but no data). "
            "Pass save_to='cpu' or a device this machine has, or save='none' to keep only "
            "the graph."
        )
    elif dev.type != "cpu" and not _device_available(dev):
        # mps on a machine without it, xpu, ...: torch's error would come at the first
        # saved op, from deep in the forward, and name a backend kernel, not save_to=
        raise LurkerError(
            f"save_to={save_to!r} asks for {dev}, but this machine has no {dev.type} "
            "device. Pass save_to='cpu' (or None: saved tensors stay on the device they "
            "are made on)."
        )
    return dev


def _device_available(dev: torch.device) -> bool:
    """Whether a tensor can be made on ``dev`` here (MPS by its own check, as making one
    on a machine without it raises a backend-kernel error rather than saying so)."""
    if dev.type == "mps":
        return torch.backends.mps.is_available()
    try:
        torch.empty(0, device=dev)
    except Exception:  # "Torch not compiled with XPU enabled", no module torch.hpu, ...
        return False
    return True


def _name_inputs(model: nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, Tensor]]:
    """Name each input tensor by the forward() parameter it binds to (``x``, ``mask[0]``)."""
    out: list[tuple[str, Tensor]] = []
    items: Iterable[tuple[str, Any]]
    try:
        names = _signature(model.forward)[1]
        if names is not None and not kwargs and len(args) <= len(names):
            # what bind_call would give, without its cost (the replay names each batch's
            # inputs): the first parameters, in order (those left to their defaults hold
            # no input)
            items = zip(names, args)
        else:
            items = bind_call(model.forward, args, kwargs)[1]
    except (TypeError, ValueError):
        items = [(f"args[{i}]", a) for i, a in enumerate(args)] + list(kwargs.items())
    for name, value in items:
        if isinstance(value, Tensor):
            out.append((name, value))
        else:
            paths(value, name, out)
    return out


def bind_call(
    fwd: Any, args: tuple, kwargs: dict, *, strict: bool = False
) -> tuple[inspect.Signature, list[tuple[str, Any]]]:
    """``fwd``'s signature (cached) and the call's arguments by its parameter names, in
    order: the one place a call is bound to a forward, to name a trace's inputs and for
    the replay's error lines. Raises TypeError or ValueError where ``fwd`` has no
    signature or an argument is given twice.

    Loosely (the default), also where a required argument is missing or a keyword unknown
    (``tr.run(x)`` on a trace of ``model(x, steps=3)``: ``x`` is still called ``x``, so
    the error can name ``steps`` rather than ``args[0]``): unknown keywords keep their own
    names, and positional arguments past those the forward takes are ``args[i]``
    (``tr.run(x, 3)`` on ``forward(x, *, steps)``: ``x`` is still ``x``; see
    :func:`keyword_only_note`). ``strict``: as the call itself binds (a TypeError where it
    would not)."""
    sig = _signature(fwd)[0]
    if strict:
        return sig, list(sig.bind(*args, **kwargs).arguments.items())
    params = sig.parameters
    kinds = [p.kind for p in params.values()]
    any_kw = inspect.Parameter.VAR_KEYWORD in kinds
    known = {k: v for k, v in kwargs.items() if any_kw or k in params}
    n = len(args)
    if inspect.Parameter.VAR_POSITIONAL not in kinds:
        n = min(n, sum(k in _POSITIONAL for k in kinds))
    items = list(sig.bind_partial(*args[:n], **known).arguments.items())
    surplus = [(f"args[{i}]", a) for i, a in enumerate(args) if i >= n]
    return sig, items + surplus + [(k, v) for k, v in kwargs.items() if k not in known]


def keyword_only_note(sig: inspect.Signature, args: tuple, kwargs: dict) -> str | None:
    """The sentence for positional arguments past those the forward takes where it has
    keyword-only parameters they were surely meant for (``forward(x, *, steps)`` called
    with ``(x, 3)``: "'steps' is keyword-only: pass steps=3"); None otherwise."""
    params = list(sig.parameters.values())
    kinds = [p.kind for p in params]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return None
    n = sum(k in _POSITIONAL for k in kinds)
    surplus = args[n:]
    only = [
        p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in kwargs
    ]
    if not surplus or not only:
        return None
    pairs = [f"{name}={_describe_short(v)}" for name, v in zip(only, surplus)]
    return (
        f"{len(args)} positional arguments are passed where forward{sig} takes {n}: "
        f"{first_three([repr(o) for o in only])} {'is' if len(only) == 1 else 'are'} "
        f"keyword-only; pass {'it' if len(only) == 1 else 'them'} by name ({', '.join(pairs)})"
    )


def _describe_short(value: Any) -> str:
    """An argument as a call would spell it: ``3``, ``'greedy'``; ``...`` for anything else."""
    text = repr(value)
    if isinstance(value, (bool, int, float, str, type(None))) and len(text) <= 40:
        return text
    return "..."


_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_TRY_INPUT = (
    "Pass inputs of the shape and dtype the model takes (CLI: --input-shape/-i and --input-dtype)."
)


def _copy(t: Tensor) -> Tensor:
    return t.detach().clone()


def _trace_error(
    model: nn.Module, e: Exception, partial: Trace, rec: Recorder, call: tuple = ((), {})
) -> TraceError:
    """One paragraph on why the forward failed; for the CLI, without ``err.partial``."""
    from ._replay import export_guard_failure

    guard = export_guard_failure(model, e)
    if guard is not None:
        return TraceError(
            f"lurker.trace could not run {guard} The partial trace is in `err.partial`.",
            partial=partial,
            failed_op=None,
            cli=f"lurker trace could not run {guard}",
        )
    mismatch = _call_mismatch(model, e, *call)
    if mismatch is not None:
        return TraceError(
            f"{mismatch} Pass one tensor per input it takes: lurker.trace(model, x, mask); "
            "the partial trace is in `err.partial`.",
            partial=partial,
            failed_op=None,
            cli=f"{mismatch} Give one shape per input it takes, separated by ';': "
            '-i "1,3,224,224;1,7".',
        )
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    detail = " ".join(m.strip() for m in msg[1:3] if m.strip())
    kind = type(e).__name__
    mname = type(model).__name__
    got = ", ".join(str(tuple(op.outputs[0].shape)) for op in partial.inputs if op.outputs)
    inputs = f" The model's input shapes were {got}." if got else ""
    hint, cli_hint = _image_list_hint(model, *call)
    inputs += hint

    def for_cli(text: str) -> str:  # the list-of-images hint as an -i, not as Python
        return text.replace(hint, cli_hint) if hint else text

    failed = rec.failed
    # indices the model makes itself (positions from the input's length) are no matter
    # of --input-dtype: only an op fed by the input gets that hint
    near = failed is None or (failed.dist_from_input is not None and failed.dist_from_input <= 2)
    layer = _failing_layer(model, e, input_hint=near)
    if failed is not None:
        label = partial.ops[failed.index].label
        shapes = [
            tuple(partial.ops[s].outputs[k].shape) if s >= 0 else tuple(_param_shape(rec, k))
            for s, k in failed._inputs
        ]
        where = f" in module '{failed.module}'" if failed.module else ""
        src = f", called at {failed.source}" if failed.source else ""
        near_input = failed.dist_from_input is not None and failed.dist_from_input <= 2
        expects = f" {layer[2]} It got {layer[1]}." if layer is not None and layer[2] else ""
        said = f"{first}{(' ' + detail) if detail else ''}".rstrip(".")
        # (a check such as torch._assert(cond, msg) reads no tensor: no shapes to list)
        had = f" Its tensor inputs had shapes {shapes}." if shapes else ""
        text = (
            f"{mname} failed in op {label} ({failed.name}){where}{src}: {kind}: {said}."
            f"{had}{expects}{inputs}"
        )
        if near_input:
            text += (
                " This op is right after the model's input, so the input probably does not "
                f"have the shape or dtype the model expects. {_TRY_INPUT}"
            )
            cli = for_cli(text)
        else:
            cli = for_cli(text) + " Check the shapes flowing into this op."
            text += (
                " Check the shapes flowing into this op; `err.partial.summary()` shows every "
                "op recorded before it."
            )
        text += (
            f" The partial trace ({len(partial.ops) - 1} ops before the failure) is in "
            "`err.partial`; torch is left untouched."
        )
        return TraceError(
            text,
            partial=partial,
            failed_op=label,
            cli=cli,
            input_advice=_TRY_INPUT if near_input else None,
        )
    tb = traceback.extract_tb(e.__traceback__)
    inner = tb[-1] if tb else None
    loc = f" at {inner.filename}:{inner.lineno}" if inner else ""
    last = partial.ops[-1].label if partial.ops else "none"
    in_torch = inner is not None and _in_torch(inner.filename)
    ends = first.rstrip(".")  # the sentence's own full stop, not a second one after it
    if in_torch and layer is not None and layer[3]:
        # a torch layer's own checks (a norm layer's _check_input_dim, ...) refuse what
        # reached it: the model's code is not at fault, the input's shape or dtype is
        path, got_here, expects, _ = layer
        text = (
            f"The input does not fit layer '{path}' of {mname}: it reached that layer as "
            f"{got_here}, and torch refused it ({kind}: {first}{loc})."
            f"{(' ' + expects) if expects else ''}{inputs} {_TRY_INPUT}"
        )
        more = " The partial trace (up to the last op before that layer) is in `err.partial`."
        return TraceError(
            text + more,
            partial=partial,
            failed_op=None,
            cli=for_cli(text),
            input_advice=_TRY_INPUT,
        )
    if in_torch:  # torch refused what the model's own code handed it
        caller = next((f for f in reversed(tb) if not _in_torch(f.filename)), None)
        at = f", called from {caller.filename}:{caller.lineno}" if caller else ""
        text = (
            f"{mname} raised {kind} inside torch{loc}{at} (last op recorded: {last}): "
            f"{ends}.{inputs} Check what that line passes to torch (shapes, dtypes, "
            "arguments), or the model's inputs"
        )
    else:
        text = (
            f"{mname} raised {kind}{loc} (in its own code, not in a tensor op; last op "
            f"recorded: {last}): {ends}.{inputs} Fix the model code or its inputs"
        )
    return TraceError(
        text + "; the partial trace is in `err.partial`.",
        partial=partial,
        failed_op=None,
        cli=for_cli(text) + ".",
    )


def _call_mismatch(model: nn.Module, e: Exception, args: tuple, kwargs: dict) -> str | None:
    """Where the model's forward does not take the inputs given (a TypeError from the
    call itself, not from inside the forward): what it takes and what it got."""
    if not isinstance(e, TypeError):
        return None
    code = getattr(type(model).forward, "__code__", None)
    tb = e.__traceback__
    while tb is not None:  # the forward ran (its pre-hooks may add inputs): not the call
        if tb.tb_frame.f_code is code:
            return None
        tb = tb.tb_next
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # no signature to read (a builtin, a C forward)
        return None
    try:
        sig.bind(*args, **kwargs)
    except TypeError as why:
        given = [_describe(a) for a in args] + [f"{k}={_describe(v)}" for k, v in kwargs.items()]
        return (
            f"{type(model).__name__}.forward{sig} does not take the inputs given "
            f"({', '.join(given) or 'none'}): {keyword_only_note(sig, args, kwargs) or why}."
        )
    return None


def _image_list_hint(model: nn.Module, args: tuple, kwargs: dict) -> tuple[str, str]:
    """Where the forward takes a list of images (its first parameter annotated as a list
    of tensors, or named ``images``: torchvision's detection models) and got something
    else for it (a dict, whose keys it iterates as images, or one tensor, whose rows it
    takes for images): how to pass it, as ``(Python, command line)``: ``lurker trace``
    takes a list as shapes in brackets (``-i "[3,128,128]"``), not ``[x]``. Else empty."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read
        return "", ""
    if not params or params[0].kind not in (
        params[0].POSITIONAL_ONLY,
        params[0].POSITIONAL_OR_KEYWORD,
    ):
        return "", ""
    first = params[0]
    note = first.annotation
    text = note.replace(" ", "").lower() if isinstance(note, str) else ""
    annotated = getattr(note, "__origin__", None) in (list, Sequence) or text.startswith(
        ("list[tensor", "list[torch.tensor")
    )
    value = args[0] if args else kwargs.get(first.name, first.empty)
    # by its name alone (no annotation): a 4-D batch is what a model whose forward names
    # its batch ``images`` takes, so only a dict or a tensor of another rank gets the hint
    by_name = (
        note is first.empty
        and first.name == "images"
        and not (isinstance(value, Tensor) and value.dim() == 4)
    )
    if not (annotated or by_name) or value is first.empty or isinstance(value, (list, tuple)):
        return "", ""
    if isinstance(value, Mapping):
        said = "a dict (one argument, not keywords: its keys were taken for images)"
    else:
        said = _describe(value)
    batch = isinstance(value, Tensor) and value.dim() == 4
    fix = "list(x)) (x: an (N, C, H, W) batch" if batch else "[x]) (one (C, H, W) tensor per image"
    takes = f" {type(model).__name__}.forward takes '{first.name}' as a list of image tensors"
    return (
        f"{takes} and got {said}: pass lurker.trace(model, {fix}).",
        f"{takes} and got {said}: give the list in brackets, one C,H,W shape per image "
        f"separated by ';': -i {_bracketed(value)}.",
    )


def _bracketed(value: Any) -> str:
    """``-i``'s list of images (its shell quoting included) for what the forward got: the
    images of an ``(N, C, H, W)`` batch, one ``(C, H, W)`` image, else an example."""
    if isinstance(value, Tensor) and value.dim() in (3, 4):
        image = ",".join(str(n) for n in value.shape[-3:])
        n = value.shape[0] if value.dim() == 4 else 1
        if n <= 4:
            return '"[' + "; ".join([image] * n) + ']"'
    return '"[3,128,128]" (two images: "[3,128,128; 3,96,128]")'


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _in_torch(filename: str) -> bool:
    try:
        return str(Path(filename).resolve()).startswith(_TORCH_DIR + os.sep)
    except OSError:
        return False


def _inference_made(model: nn.Module, e: BaseException) -> LurkerError | None:
    """The error for a model whose parameters or buffers were made under
    ``torch.inference_mode``: they have no version counter, by which lurker tells in-place
    ops, so tracing fails on the first op that reads one (not the model's fault)."""
    if not (isinstance(e, RuntimeError) and "do not track version counter" in str(e)):
        return None
    made = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_inference()]
    if not made:
        return None
    return LurkerError(
        f"{type(model).__name__}'s tensors {first_three(made)} were made under "
        "torch.inference_mode (inference tensors carry no version counter, by which lurker "
        "tells in-place ops). Build or load the model outside inference_mode; lurker.trace "
        "itself may run inside it."
    )


def _failing_layer(
    model: nn.Module, e: BaseException, input_hint: bool = True
) -> tuple[str, str, str, bool] | None:
    """``(path, what it got, what it expects, is a torch layer)`` for the innermost module
    whose forward is on the traceback: the layer an input that does not fit was refused by.
    ``input_hint``: the layer reads the model's input, so what it expects may name the
    ``--input-dtype`` that makes such an input."""
    names = {id(m): name for name, m in model.named_modules()}
    found: tuple[str, nn.Module, Any] | None = None
    tb = e.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            code = frame.f_code
            arg = frame.f_locals.get(code.co_varnames[1]) if code.co_argcount > 1 else None
            found = (names[id(owner)], owner, arg)
        tb = tb.tb_next
    if found is None:
        return None
    path, module, arg = found
    if isinstance(arg, Tensor):
        dtype = str(arg.dtype).removeprefix("torch.")
        if not (arg.dtype.is_floating_point or arg.dtype.is_complex) and 0 < arg.numel() < 2**24:
            with contextlib.suppress(Exception):  # (a device that failed cannot be read)
                dtype += f", values {int(arg.min())}..{int(arg.max())}"  # indices: their range
        got = f"a tensor of shape {tuple(arg.shape)} ({dtype})"
    else:
        got = f"a {type(arg).__name__}"
    expects = _expected_input(module, input_hint) if not _fits(module, arg) else None
    what = f"{type(module).__name__} '{path}' expects {expects}." if expects and path else ""
    if not what and path and _dtype_refused(e):
        what = _dtype_mismatch(module, path, arg, input_hint)
    builtin = type(module).__module__.startswith("torch.")
    return path or "(the model itself)", got, what, builtin


_SPATIAL = {1: "L", 2: "H, W", 3: "D, H, W"}


def _dtype_refused(e: BaseException) -> bool:
    """Whether torch's message is about dtypes (``expected scalar type Half but found
    Float``, ``mat1 and mat2 must have the same dtype``, ``Input type (double) and bias
    type``): then a layer whose input fits in shape was refused its dtype."""
    return "type" in str(e)


def _dtype_mismatch(m: nn.Module, path: str, x: Any, input_hint: bool) -> str:
    """The sentence for a floating input of another dtype than the layer's own floating
    parameters (a float16 input to a float32 model: torch only says ``expected scalar type
    Half but found Float``, which names neither the input nor the fix); "" otherwise."""
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        return ""
    own = {p.dtype for p in m.parameters(recurse=False) if p.dtype.is_floating_point}
    if len(own) != 1 or x.dtype in own:
        return ""
    want = str(next(iter(own))).removeprefix("torch.")
    got = str(x.dtype).removeprefix("torch.")
    cli = f"; CLI: --input-dtype {want}" if input_hint else ""
    return (
        f"{type(m).__name__} '{path}' has {want} parameters, so it takes {want} inputs, not "
        f"{got}: convert the input (x.to(torch.{want}){cli}) or the model "
        f"(model.to(torch.{got}))."
    )


def _fits(m: nn.Module, x: Any) -> bool:
    """Whether ``x`` has the layout :func:`_expected_input` describes (then saying what
    the layer expects would mislead: the failure has another cause)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.conv import _ConvNd

    if not isinstance(x, Tensor):
        return False
    if isinstance(m, _ConvNd):
        k = len(m.kernel_size)
        return x.dim() in (k + 1, k + 2) and x.shape[-k - 1] == m.in_channels
    if isinstance(m, _BatchNorm) and not isinstance(m, nn.BatchNorm1d):
        return x.dim() == {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}.get(type(m), -1) and (
            x.shape[1] == m.num_features
        )
    if isinstance(m, nn.Linear):
        return x.dim() >= 1 and x.shape[-1] == m.in_features
    if isinstance(m, nn.LayerNorm):
        n = len(m.normalized_shape)
        return tuple(x.shape[x.dim() - n :]) == tuple(m.normalized_shape)
    if isinstance(m, nn.Embedding):  # integer indices, each a row of the table
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            return False
        try:
            return not x.numel() or (int(x.min()) >= 0 and int(x.max()) < m.num_embeddings)
        except Exception:  # (a device that failed cannot be read: say nothing of the range)
            return True
    return False


def _expected_input(m: nn.Module, input_hint: bool = True) -> str | None:
    """The input a layer takes, in words with its sizes (``(N, 64, H, W)``), or None;
    ``input_hint``: with the ``--input-dtype`` that makes it, where that applies."""
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.modules.conv import _ConvNd
    from torch.nn.modules.rnn import RNNBase

    if isinstance(m, _ConvNd):
        dims = _SPATIAL.get(len(m.kernel_size), "...")
        return f"(N, {m.in_channels}, {dims}) or an unbatched ({m.in_channels}, {dims})"
    if isinstance(m, nn.Linear):
        return f"(..., {m.in_features}): its last dimension is in_features={m.in_features}"
    if isinstance(m, (nn.BatchNorm1d, nn.InstanceNorm1d)):
        return f"(N, {m.num_features}) or (N, {m.num_features}, L)"
    if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)):
        return f"(N, {m.num_features}, H, W)"
    if isinstance(m, (nn.BatchNorm3d, nn.InstanceNorm3d)):
        return f"(N, {m.num_features}, D, H, W)"
    if isinstance(m, _NormBase):
        return f"(N, {m.num_features}, ...)"
    if isinstance(m, nn.GroupNorm):
        return f"(N, {m.num_channels}, ...)"
    if isinstance(m, nn.LayerNorm):
        return f"(..., {', '.join(map(str, m.normalized_shape))})"
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        hint = f", e.g. --input-dtype long:0-{m.num_embeddings}" if input_hint else ""
        return f"integer indices (long) in 0..{m.num_embeddings - 1}{hint}"
    if isinstance(m, nn.MultiheadAttention):
        order = "(N, L, E)" if m.batch_first else "(L, N, E)"
        return f"{order} with E = {m.embed_dim}"
    if isinstance(m, RNNBase):
        order = "N, L" if m.batch_first else "L, N"
        return f"({order}, {m.input_size}) or an unbatched (L, {m.input_size})"
    return None


def _memory_error(model: nn.Module, rec: Recorder, inputs: tuple, rng: Any) -> MemoryLimitError:
    """The trace passed ``max_memory``: say where, how much, and how to save less."""
    over = rec.over_limit
    assert over is not None
    over.__traceback__ = None  # it holds the model's frames
    partial = Trace._build(rec, None, inputs, rng, 0.0, complete=False)
    for node in partial.ops:  # what ran out of room: free every reference to it
        node.activation = None
        if node._skel_args is not None:
            node.args  # noqa: B018  (its skeleton, made before the raw call is freed)
        node._skel_args = node._skel_kwargs = node._snapshots = None
    rec.producers.clear()
    rec.aliases = None
    rec.over_limit = None
    op = partial.ops[over.node_index]
    partial.failed_op = op.label
    where = f" in module '{op.modules[-1][0]}'" if op.modules else ""
    n_ops = sum(1 for o in partial.ops[: over.node_index + 1] if o.kind in ("op", "generated"))
    held = [p for p, _ in op.modules if p in rec.saved_modules]
    fixes = [
        f"save= names module '{held[0]}', and until its call returns every op inside it "
        "that is still in use is kept (any may be its output): name smaller modules inside "
        "it, or op labels"
        if held
        else "save only what you need: save=['layer4.*', 'conv2d_3'] (module paths or op "
        "labels, globs allowed) or save=nn.Conv3d (module classes)",
        "keep a reduction instead of each tensor: transform=lambda t: t.mean(tuple(range(2, "
        "t.dim()))) (per-channel means)",
    ]
    if op.outputs and op.outputs[0].device != "cpu" and rec.device is None:
        fixes.append("move saved activations off the device: save_to='cpu'")
    fixes += [
        "trace a smaller input (fewer frames, smaller images, batch 1)",
        "save='none' records the graph alone",
        "max_memory=None turns this check off",
    ]
    text = (
        f"Tracing {type(model).__name__} stopped before it could run out of memory: the "
        f"activations saved so far add up to {fmt_bytes(over.saved)} after {n_ops} ops, "
        f"past the limit of {fmt_bytes(over.limit)} ({over.basis}). It stopped at op "
        f"{op.label} ({op.name}){where}, whose output is {fmt_bytes(over.nbytes)}; every op "
        "after it would have added more. To save less: "
        + "; ".join(fixes)
        + ". `err.partial` holds the graph up to that op, without its activations "
        "(freed), so you can see which ops are large (`err.partial.summary()`)."
    )
    return MemoryLimitError(
        text, partial=partial, failed_op=op.label, saved_bytes=over.saved, limit=over.limit
    )


def _param_shape(rec: Recorder, name: str) -> tuple[int, ...]:
    return rec.param_shapes.get(name, ())


class Trace(Graph):
    """Everything recorded during one traced forward pass: a :class:`~lurker.graph.Graph`
    (ops, modules, lookups, facts, ``to_json``) plus what only a live trace has: the
    model, its output, saved activations and gradients, the inputs and RNG state the
    forward ran with, and ``run``, ``backward``, ``validate``.

    Index it by op label (``trace["conv2d_3"]``), module path (``trace["features.3"]``,
    the op that produced that module's output; ``"cell:2"`` for a later pass), input or
    output name, or position. Iterating yields the ops in execution order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.output: Any = None
        self.model: nn.Module | None = None
        self.param_shapes: dict[str, tuple[int, ...]] = {}
        self._inputs: tuple[tuple, dict] = ((), {})
        self._rng: Any = None  # autocast, grad mode and RNG state the forward started in
        self._grads = False  # traced with grads=True: ops keep their gradients
        self._state = _state.NO_CHANGES  # what the traced forward changed in the model
        # parameters the forward wrote into in place (an EMA codebook) or replaced
        # (`p.data = new`): name -> (index of the writing op, or of the last op before the
        # replacement; the value just before), for validation; the names it replaced
        self._param_writes: dict[str, list[tuple[int, Tensor]]] = {}
        self._params_replaced: dict[str, None] = {}
        # buffers and tensor attributes the forward wrote into or replaced: "buffer name"
        # or "attribute name" -> (it, its value going in); those it replaced (`b.data = new`)
        self._state_before: dict[str, tuple[Tensor, Tensor]] = {}
        self._state_replaced: dict[str, Tensor] = {}
        # node index -> the op that wrote into its saved value unforeseen (it is `stale`)
        self._stale_by: dict[int, int] = {}
        # what the forward changed besides reassignments (_state): lazy parameters
        # materialized, parameters and buffers written in place, storages replaced
        self._changes: list[str] = []
        # parameters whose storage the forward replaced (`p.data = ...`): name -> the
        # tensor it held going in
        self._param_replaced: dict[str, Tensor] = {}
        # why validation cannot compare the output with an untraced forward, if it cannot
        self._no_output_check: str | None = None
        self._transform: Callable[[Tensor], Tensor] | None = None
        # save_to= as a device (None: values stay where they are made), for run too
        self._save_to: torch.device | None = None
        # max_memory= the trace was made with, parsed: (limit, fraction, "auto"), for run
        self._max_memory: tuple[int | None, float | None, bool] = (None, AUTO_FRACTION, True)
        self._model_hooks: _hooks.ModelHooks = {}  # the model's own hooks when traced
        # the `with trace.hooks()` blocks, per thread: a block applies to the runs of the
        # thread that entered it, not to another thread's runs of the same trace
        self._hook_blocks = threading.local()

    @classmethod
    def _build(
        cls, rec: Recorder, output: Any, inputs: tuple, rng: Any, wall: float, complete: bool
    ) -> Trace:
        return build(cls(), rec, output, inputs, rng, wall, complete)

    def __getitem__(self, key: str | int) -> Op:
        try:
            return super().__getitem__(key)
        except KeyError as e:  # a shared module's second path: say which path names it
            note = shared_module_note(self.model, [key])
            if not note:
                raise
            raise KeyError(f"{e.args[0]}{note}") from None

    def find(self, pattern: str) -> list[Op]:
        """Ops whose label, name or module path matches a glob pattern; warns where the
        glob covers a module only by a second path it is registered under (``enc.*`` over
        ``enc.blk`` where ``self.enc.blk = self.blk``), whose ops it leaves out, as
        ``save=`` does: the trace names that module by its first path (``blk``)."""
        found = super().find(pattern)
        alias = second_paths(self.model) if isinstance(pattern, str) else {}
        gap = second_path_gaps(alias, [pattern], self.modules) if alias else None
        if gap is not None:
            named, add = gap
            warnings.warn(
                f"find({pattern!r}) leaves out modules it covers only by a second path: "
                f"{named} (one module under two paths; a trace names it by its first, as "
                "model.named_modules() does). Use "
                f"{', '.join(f'find({n!r})' for n in add)} for their ops.",
                stacklevel=2,
            )
        return found

    @property
    def state_changes(self) -> list[str]:
        """What the traced forward changed in the model's own state, one line each: buffers,
        parameters and attributes reassigned, caches filled, a lazy module's parameters
        materialized, buffers and parameters updated in place (running statistics, an EMA
        codebook), a parameter's storage replaced (``p.data = ...``); empty when it changed
        nothing. ``tr.validate().state_changes`` lists the same."""
        return [*self._state.lines, *self._changes]

    def constant(self, key: str | int) -> Tensor:
        """The tensor a ``constant`` node stands for: one the forward read from outside
        its recorded ops (a table a module caches, a tensor attribute that is not a
        buffer), as the trace holds it; a replay reads the same tensor. Analyses that
        recompute an op from its arguments (LRP's rules) read constant arguments here."""
        op = self[key]
        value = op._key if op.kind == "constant" else None
        if not isinstance(value, Tensor):
            raise LurkerError(f"{op.label} is a {op.kind} node, not a constant this trace holds")
        return value

    def activations(self) -> dict[str, Any]:
        """Saved activations by op label."""
        return {op.label: op.activation for op in self.ops if op.activation is not None}

    def nonfinite(self) -> dict[str, NonFiniteCount]:
        """NaN, +inf and -inf counts of every saved op whose output is not finite, by label
        in execution order (empty when all are finite). Counted now from the saved values
        (after ``transform=``), not while tracing, so a trace pays nothing for it."""
        return _nonfinite.nonfinite(self)

    def stats(self) -> dict[str, OpStats]:
        """Mean, std, min, max (of the finite values), fraction of zeros and NaN/inf count
        of every saved op's floating-point output (and the inputs'; not the buffers and
        constants the model holds), by label in execution order: a layer
        that explodes or dies, read off one dict; two traces' (two checkpoints, before and
        after a fix) compare by label. Counted now from the saved values (after
        ``transform=``), not while tracing."""
        acts = [
            (op.label, op.activation)
            for op in self.ops
            if op.activation is not None and op.kind not in _STATE_KINDS
        ]
        _stats.require_saved(len(acts), "This trace")
        return _stats.table(acts)

    def first_nonfinite(self) -> FirstNonFinite | None:
        """The first op, in execution order, whose saved output holds NaN or ±inf, with its
        counts, its inputs' ranges, non-finite parameters and the earlier ops not saved;
        None when every saved value is finite. ``str()`` of it is one sentence. An
        attention mask's -inf that only a softmax reads (:meth:`masked_infs`) is by design
        and passed over; one that reaches any other value is found as any other.

        Raises :class:`~lurker.errors.LurkerError` when the trace saved nothing, or when the
        output is not finite but no saved value is (the culprit was not saved)."""
        return _nonfinite.first_nonfinite(self)

    def masked_infs(self) -> list[MaskedInf]:
        """The -inf attention masks write by design (``masked_fill(mask, -inf)``, ``where``,
        a mask added to the scores) that reach only a softmax, which makes them 0, in
        execution order; :meth:`first_nonfinite` passes over them. ``str()`` of one:
        ``-inf from masked_fill_1, an attention mask, made finite by softmax_1``."""
        return _nonfinite.masked_infs(self)

    # ------------------------------------------------------------------ actions
    def run(
        self,
        *args: Any,
        save: Any = None,
        hooks: Mapping[str | int, HookFn] | None = None,
        max_memory: Any = TRACED,
        **kwargs: Any,
    ) -> Activations:
        """Activations for new inputs, reusing this trace's graph (no re-recording).

        By default the same ops as in this trace are saved; ``save=`` selects others
        (``"none"``: only the output; a name that matches nothing raises, with close names,
        rather than saving nothing). ``hooks`` maps ops to functions ``fn(op, output)``
        that may return a replacement output, as in :meth:`hooks`, for this call only
        (after those of any ``with trace.hooks(...)`` block). Saved values are those after
        the hooks. The forward runs in the caller's grad mode: gradients flow through
        replacements. A run that keeps activations while a dropout or BatchNorm of the
        model is in training mode warns: its values are random or depend on the batch.

        Raises :class:`~lurker.errors.GraphChangedError` if the new input takes another
        path through the model (a data-dependent branch, or hooks of the model's own added
        or removed since the trace), naming the first op that differs and the cause; and
        :class:`~lurker.errors.LurkerError` if the model fails on inputs unlike the traced
        ones (missing, extra, or of another dtype, device or shape: only the batch
        dimension may differ), naming each and what the trace was recorded with.

        ``max_memory`` bounds the bytes this run saves, as in :func:`lurker.trace` (the
        same values), so that a large batch with ``save="all"`` stops with
        :class:`~lurker.errors.MemoryLimitError` instead of the kernel killing the process;
        by default the value the trace was made with (a trace made with
        ``max_memory=None`` runs unguarded). Stopped, the run frees what it saved, leaves
        the model's state as it was and the trace ready for the next run (a smaller
        batch, fewer ops in ``save=``). What hooks keep themselves is theirs to bound.

        A trace made with ``save_to=`` keeps every run's values on that device too, after
        its ``transform=`` (inputs, ops' outputs, the output nodes), so that a loop over
        a stimulus set on a GPU fills the CPU's memory, not the GPU's; a value already
        there is not copied, and ``max_memory`` counts against that device's memory.
        ``.output``, the model's return value, stays where the model made it.
        """
        from ._replay import replay

        model = self.model
        # (run() is the per-batch call of a stimulus loop: the modes of the modules that
        # can depend on them only, listed once per trace; a model in eval() with one
        # Dropout or BatchNorm switched back to train() too)
        if model is not None and save is not False and save != "none":
            watched = self.__dict__.get("_mode_dependent")
            if watched is None:
                watched = self.__dict__["_mode_dependent"] = _context.mode_dependent(model)
            if model.training or any([m.training for m in watched]):
                _warn_training(model)
        active = self._active_hooks
        if hooks:
            active = [*active, _hooks.resolve(self, hooks)]
        if not active:
            merged: _hooks.Resolved = {}
        elif len(active) == 1:
            merged = active[0]
        else:
            merged = {}
            for resolved in active:  # outer blocks first, this call's hooks last
                for i, fns in resolved.items():
                    merged.setdefault(i, []).extend(fns)
        return replay(self, args, kwargs, save, merged, max_memory)

    def hook_ops(self, key: str | int) -> list[Op]:
        """The ops a hook keyed by ``key`` applies to, as :meth:`hooks` resolves it: one
        op, or every pass of a rolled label or of a reused module. Raises
        :class:`~lurker.errors.OpKeyError` (with close names) for a key that names no op."""
        return _hooks.ops_for(self, key)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_hook_blocks"]  # a thread's open blocks are not part of the trace
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._hook_blocks = threading.local()

    @property
    def _active_hooks(self) -> list[_hooks.Resolved]:
        blocks = self._hook_blocks.__dict__
        if "entries" not in blocks:
            blocks["entries"] = []
        return blocks["entries"]

    def hooks(self, hooks: Mapping[str | int, HookFn]) -> contextlib.AbstractContextManager[Trace]:
        """Within the ``with`` block, :meth:`run` calls ``fn(op, output)`` for each op a key
        names, with the op's live output; a tensor it returns replaces the output for the
        rest of the forward (None keeps it).

        ``output`` is a tensor, or a tuple of tensors for an op with several outputs (return
        a tuple of as many). A key is an op label (``"relu_4"``, ``"linear_1:2"``), a
        rolled label (``"linear_1"``: every pass), a module path (``"features.3"``: the op
        that produced that module's output; every pass for a module that ran several times,
        ``"cell:2"`` for one) or an op index. Every key is checked here, before anything
        runs (:class:`~lurker.errors.OpKeyError` with close matches). The hooks are removed
        when the block exits, however it exits; blocks nest, outer hooks running first. A
        block applies to the runs of the thread that entered it (a server's other requests
        on the same trace run without it).
        """
        resolved = _hooks.resolve(self, hooks)
        return self._hooked(resolved)

    @contextlib.contextmanager
    def _hooked(self, resolved: _hooks.Resolved) -> Iterator[Trace]:
        self._active_hooks.append(resolved)
        try:
            yield self
        finally:  # this block's own entry, wherever it is (blocks may exit out of order)
            for i, entry in enumerate(self._active_hooks):
                if entry is resolved:
                    del self._active_hooks[i]
                    break

    def backward(self, gradient: Any = None, output: Callable[[Any], Tensor] | None = None) -> None:
        """Backpropagate from the traced output so saved ops receive ``.grad``; only a trace
        made with ``grads=True`` keeps them, so any other is refused before it runs.

        ``output`` picks the tensor to differentiate from the model's output (e.g.
        ``lambda out: out[0, 3]``); without it, the output must be a single tensor, and
        ``gradient`` defaults to ones (the gradient of its sum).
        """
        if self.output is None:
            raise LurkerError("This trace has no output (the forward pass failed).")
        if not self._grads:  # refused before it runs: the autograd graph is not spent
            raise LurkerError(
                "This trace was made without grads=True, so no op keeps its gradient: "
                "after trace.backward() every op.grad would still be None. Trace with "
                "lurker.trace(model, x, grads=True) and call trace.backward() on that trace "
                "(for the parameters' .grad alone, call backward on trace.output yourself)."
            )
        if output is not None and not callable(output):
            if isinstance(self.output, Tensor):  # (out['logits'] would fail on it)
                pick = "out[:, 0].sum()" if self.output.dim() >= 2 else "out.sum()"
            elif isinstance(self.output, (tuple, list)):
                pick = "out[0].sum()"
            else:
                pick = f"out[{repr(output) if isinstance(output, str) else repr('logits')}].sum()"
            raise LurkerError(
                f"trace.backward(output=...) got a {type(output).__name__}; output is a "
                "function that picks the tensor to differentiate from the model's output, "
                "not the tensor or its name. Pass one: "
                f"trace.backward(output=lambda out: {pick})."
            )
        target = output(self.output) if output is not None else self.output
        if not isinstance(target, Tensor):
            got = "output= returned" if output is not None else "the model returned"
            raise LurkerError(
                f"trace.backward() needs one tensor; {got} "
                f"{type(target).__name__}. Pick one: trace.backward(output=lambda out: out['logits'].sum())."
            )
        if not target.requires_grad:
            raise LurkerError(
                "The traced output does not require grad: trace with grads=True, outside "
                "torch.no_grad(), with parameters or inputs that require grad."
            )
        if gradient is None:
            gradient = torch.ones_like(target)
        elif not isinstance(gradient, Tensor) or (
            gradient.shape != target.shape or gradient.device != target.device
        ):
            got = (
                f"{tuple(gradient.shape)} on {gradient.device}"
                if isinstance(gradient, Tensor)
                else type(gradient).__name__
            )
            raise LurkerError(
                f"trace.backward(gradient) takes a tensor like the output it differentiates, "
                f"{tuple(target.shape)} on {target.device}; got {got}. Pass one of that shape "
                "(torch.ones_like(out) is the default), or pick a scalar to differentiate: "
                "trace.backward(output=lambda out: out[:, 3].sum())."
            )
        # each saved op's gradient as it is: a backward that fails may have added to some
        # (those nearest the output) before it failed, which would leave them wrong
        kept = [op.grad for op in self.ops]
        try:
            target.backward(gradient)
        except BaseException as e:
            for op, g in zip(self.ops, kept):
                op.grad = g
            if not isinstance(e, RuntimeError) or "a second time" not in str(e):
                raise
            raise LurkerError(
                "This trace's autograd graph was freed by an earlier backward (through "
                "trace.backward() or the output's own .backward()), so it cannot run again; "
                "the gradients kept are those of the first. For the gradients of another "
                "target, trace again (lurker.trace(model, x, grads=True)) and call "
                "trace.backward(output=...) on that trace."
            ) from e

    def validate(self, *, rtol: float = 1e-4, atol: float = 1e-5) -> ValidationReport:
        """Re-execute every op from its saved inputs and compare; check the final output.

        Raises :class:`~lurker.errors.ValidationError` naming the first op that differs.
        ``rtol`` and ``atol`` are checked first: a bad one would otherwise pass every op
        that re-ran bit for bit and only fail, inside torch, at the first that did not.
        """
        from .validate import validate

        for name, value in (("rtol", rtol), ("atol", atol)):
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not math.isfinite(value)
                or value < 0
            ):
                raise LurkerError(
                    f"trace.validate({name}={value!r}): {name} is a tolerance, a finite "
                    "number >= 0 as in torch.allclose (the defaults are rtol=1e-4, "
                    "atol=1e-5). Pass one: trace.validate(rtol=1e-3, atol=1e-4)."
                )
        return validate(self, rtol=rtol, atol=atol)

    def __repr__(self) -> str:
        state = "" if self.complete else f", failed at {self.failed_op}"
        return (
            f"<Trace {self.model_name}: {self.num_ops} ops, {self.num_params:,} params"
            f", {self.activation_bytes / 2**20:.1f} MiB activations{state}>"
        )


class Activations(Mapping[str, Any]):
    """Activations of one :meth:`Trace.run`, by op label (and module path)."""

    def __init__(self, trace: Trace, values: dict[int, Any], output: Any):
        self._trace = trace
        self._values = values
        self.output = output

    def __getitem__(self, key: str | int) -> Any:
        op = self._trace[key]
        if op.index not in self._values:
            name = op.label if key == op.label else f"{key!r} ({op.label})"
            raise KeyError(
                f"{name} was not saved in this run: pass save=[{key!r}] to tr.run(...), "
                "or to lurker.trace(...), whose save= every run keeps by default"
            )
        return self._values[op.index]

    def __iter__(self) -> Iterator[str]:
        return (self._trace.ops[i].label for i in self._values)

    def __len__(self) -> int:
        return len(self._values)

    def stats(self) -> dict[str, OpStats]:
        """:meth:`Trace.stats` of this run's kept values, by op label in execution order:
        a new input's (or, with ``hooks=``, an edited model's) figures beside the trace's."""
        _stats.require_saved(len(self._values), "This run")
        ops = self._trace.ops
        return _stats.table(
            (ops[i].label, v)
            for i, v in sorted(self._values.items())
            if ops[i].kind not in _STATE_KINDS
        )

    def __repr__(self) -> str:
        out = self.output
        kind = f"tensor {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        return f"<Activations of {self._trace.model_name}: {len(self)} saved, output {kind}>"


from .validate import ValidationReport  # noqa: E402  (re-export for typing)
