"""The hot path: a ``TorchFunctionMode`` that records every tensor operation.

Design notes
- Scoped, not patched: torch function modes live on a per-thread stack, so a trace sees
  only its own thread's calls and nothing is left behind once the ``with`` block exits.
- No module hooks: an op's enclosing module calls are read off the Python stack, whose
  ``Module.__call__`` frames name the module (``self``) and, by frame identity, the
  call. Hooks would push every module call onto torch's slow path; the walk is needed
  anyway to tell the call sites of a loop apart. Stacks are per thread, so two threads
  may trace (even the same model) at once.
- Per op, while the model runs, only what cannot wait: the module call and call site,
  where each input came from, each output's identity (later ops resolve their inputs by
  it), saved tensors and the raw arguments. Parents, parameters, labels, passes and
  output metadata are derived in one pass afterwards (``_build.build``, which also runs
  the graph's own steps: labels, distances, FLOPs): Python run between torch kernels costs
  2-3x what it does in a batch, because the kernels leave the caches cold.
- The cyclic GC is paused while recording (trace() does that), and frame references are
  dropped at the end, so a trace holds no reference cycle and frees at once.
- In-place ops: a saved activation that shares storage with a tensor about to be modified
  in place is cloned first, so every saved tensor keeps the value its op produced.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import operator
import os
import sys
import weakref
from collections.abc import Callable, Container, Iterable
from time import perf_counter
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LurkerError
from ..graph.nodes import ITEMSIZE, ModuleInfo, Op, ParamRef, TensorMeta
from ..ops import torch_funcs as _funcs

# _build imports this module back: its names are read at call time
from . import _build, _context, _memory, _state
from ._mode import NO_KWARGS as _NO_KWARGS
from ._mode import OpMode
from ._mode import produced as _produced
from ._policy import SavePolicy
from ._tree import call_tensors, map_tensors, tensors

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_LURKER_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep
# lurker's example models are model code like the user's, not plumbing
_EXAMPLES_PY = os.path.join(_LURKER_DIR, "examples.py")
# The frame that marks a module call: Module.__call__ (``_wrapped_call_impl`` since torch 2.1;
# its three locals make ``f_locals`` cheaper than on ``_call_impl``).
_CALL_IMPL = nn.Module.__call__.__code__
_USER, _TORCH_MODEL, _PLUMBING = 0, 1, 2
_MODULE_PY = os.path.join(_TORCH_DIR, "nn", "modules", "module.py")
_OVERRIDES_PY = os.path.join(_TORCH_DIR, "overrides.py")
_SITE, _CALL, _SKIP, _RESUMABLE = 0, 1, 2, 3
# generators and coroutines: a call site whose frame may be resumed under other callers
_RESUMABLE_FLAGS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
# id(code) -> _SITE (a frame that tells call sites apart), _CALL (Module.__call__) or
# _SKIP (lurker's and torch's dispatch plumbing). Keyed by id: hashing a code object
# hashes its bytecode.
_code_kinds: dict[int, int] = {}


def _code_kind(code: Any) -> int:
    if code is _CALL_IMPL:
        k = _CALL
    elif _is_lurker(code.co_filename) or code.co_filename in (
        _MODULE_PY,
        _OVERRIDES_PY,
    ):
        k = _SKIP
    else:
        k = _RESUMABLE if code.co_flags & _RESUMABLE_FLAGS else _SITE
        _codes[id(code)] = code  # keeps the id valid and the source findable
    _code_kinds[id(code)] = k
    return k


# torch files that only dispatch calls: never shown as an op's source
_PLUMBING_FILES = tuple(
    os.path.join(_TORCH_DIR, f)
    for f in (
        "overrides.py",
        "_tensor.py",
        "functional.py",
        "nn/functional.py",
        "nn/modules/module.py",
    )
)
_kind_cache: dict[str, int] = {}
# bound once: the hot path would otherwise look each up through its module per op
_getframe = sys._getframe
_ref = weakref.ref
_detach = Tensor.detach
_new_tuple = tuple.__new__
_blank = Op.blank
_any_autocast = _context.any_autocast
_grad_enabled = _context.grad_enabled


def _is_lurker(filename: str) -> bool:
    return filename.startswith(_LURKER_DIR) and filename != _EXAMPLES_PY


def _kind_of(filename: str) -> int:
    """Is a frame's file the user's code, torch's model code (nn.Module forwards), or plumbing?"""
    r = _kind_cache.get(filename)
    if r is None:
        if _is_lurker(filename) or filename.startswith("<") or filename in _PLUMBING_FILES:
            r = _PLUMBING
        elif filename.startswith(_TORCH_DIR):
            r = _TORCH_MODEL if "/nn/modules/" in filename else _PLUMBING
        else:
            r = _USER
        _kind_cache[filename] = r
    return r


def _stamp(modules: Any) -> tuple[list[Any], list[Any], list[Any], list[int], list[Any]]:
    """What :class:`_ModelIndex` depends on: every submodule, parameter and buffer by name
    and identity, and parameter shapes (``p.data = ...`` keeps the identity). The objects
    themselves, not their ids: an id can be reused once its object is gone.

    Flat lists, built with ``extend`` and compared with ``map(operator.is_, ...)``: this
    runs on every trace, and C-level loops make it several times cheaper than a Python
    loop over the entries (the check is a fixed cost that small models feel).
    """
    objs: list[Any] = []
    params: list[Any] = []
    keys: list[Any] = []
    lens: list[int] = []
    for mod in modules:
        d = mod._modules
        lens.append(len(d))
        keys.extend(d)
        objs.extend(d.values())
        d = mod._parameters
        lens.append(len(d))
        keys.extend(d)
        params.extend(d.values())
        d = mod._buffers
        lens.append(len(d))
        keys.extend(d)
        objs.extend(d.values())
    shapes = [p.shape if type(p) is _PARAMETER else _shape(p) for p in params]
    return objs, params, keys, lens, shapes


def _same_stamp(stamp: Any, modules: Any) -> bool:
    """Whether :func:`_stamp` of ``modules`` equals ``stamp``: same objects (by identity:
    ``==`` on tensors compares values), same names, same parameter shapes."""
    objs, params, keys, lens, shapes = _stamp(modules)
    old_objs, old_params, old_keys, old_lens, old_shapes = stamp
    return (
        lens == old_lens
        and keys == old_keys
        and len(objs) == len(old_objs)
        and len(params) == len(old_params)
        and all(map(_is, objs, old_objs))
        and all(map(_is, params, old_params))
        and shapes == old_shapes
    )


def _shape(p: Any) -> tuple[int, ...] | None:
    """A parameter's shape; () while a lazy module's parameter is uninitialized."""
    if p is None:
        return None
    if type(p) is not _PARAMETER and isinstance(p, nn.parameter.UninitializedParameter):
        return ()
    return tuple(p.shape)


_PARAMETER = nn.Parameter
_UNINITIALIZED = nn.parameter.UninitializedParameter
_SCRIPTED = torch.jit.ScriptModule
_UNINITIALIZED_B = nn.parameter.UninitializedBuffer
_is = operator.is_


def is_compiled(mod: nn.Module) -> bool:
    """Whether ``mod`` is a ``torch.compile``'d module (an OptimizedModule, which wraps
    the eager one as ``_orig_mod``), told without importing torch._dynamo."""
    return type(mod).__name__ == "OptimizedModule" and isinstance(
        getattr(mod, "_orig_mod", None), nn.Module
    )


def packed_tensors(obj: Any) -> list[Tensor]:
    """The tensors a TorchScript object packs (a quantized Linear's or conv's
    ``_packed_params``, a dynamically quantized LSTM cell's), read off its pickled state
    in order: no ``nn.Parameter`` holds them, yet they are the model's weights. A tensor
    met twice in the state (an LSTM cell's bias, kept beside its packed Linear too) is
    listed once."""
    found: dict[tuple[int, int], Tensor] = {}  # (data_ptr, numel) -> the tensor, in order
    todo = [obj]
    while todo:
        o = todo.pop()
        if isinstance(o, Tensor):
            found.setdefault((o.data_ptr(), o.numel()), o)
        elif isinstance(o, torch.ScriptObject):
            with contextlib.suppress(AttributeError, RuntimeError):  # a class with no state
                todo.append(o.__getstate__())
        elif isinstance(o, (list, tuple)):
            todo.extend(reversed(o))
    return list(found.values())


def _packed_numel(obj: Any) -> int:
    """The elements of the weights a TorchScript object packs: as many as the float model
    it was quantized from has."""
    return sum(t.numel() for t in packed_tensors(obj))


class _ModelIndex:
    """A model's module tree, parameters and buffers, indexed in one walk.

    Cached per model (weakly) and checked against :func:`_stamp` on every trace, which is
    several times cheaper than walking the tree again.
    """

    def __init__(self, model: nn.Module):
        self.modules: dict[str, nn.Module] = {}
        self.paths: dict[int, str] = {}  # id(module) -> path, the root excluded
        self.params: dict[int, str] = {}
        self.param_shapes: dict[str, tuple[int, ...]] = {}
        self.param_refs: dict[str, ParamRef] = {}  # shared by every op that uses one
        self.buffers: dict[int, str] = {}
        self.param_modules: set[str] = set()  # modules whose subtree holds parameters
        # each parameter once, with its name, for the per-trace check of `p.data = ...`
        # (a lazy module's uninitialized ones left out: they have no storage yet)
        self.param_list: list[Tensor] = []
        self.param_list_names: list[str] = []
        # lazy modules whose first forward will materialize their parameters: (path, module)
        self.lazy: list[tuple[str, nn.Module]] = []
        # the first TorchScript submodule's path (left out of the index): a trace cannot
        # see its ops (a scripted model itself is refused before it is indexed)
        self.scripted: str | None = None
        # the first torch.compile'd submodule's path (its insides left out), refused alike
        self.compiled: str | None = None
        # rolling key (op name, module paths, call sites, parameters) -> the number of its
        # place (see _place): the same on every trace of the model
        self.places: dict[tuple[Any, ...], int] = {}
        parents: dict[str, str | None] = {}
        children: dict[str, list[str]] = {}
        counts: dict[str, dict[int, int]] = {}
        todo: list[tuple[str, nn.Module, str | None]] = [("", model, None)]
        seen: dict[int, str] = {}  # id(module) -> its (first) path
        again: list[tuple[str, str]] = []  # (parent, first path) of a module met twice
        while todo:  # depth first, children in order: named_modules() order, faster
            path, mod, parent = todo.pop()
            if id(mod) in seen:  # a module registered twice keeps its first path
                if parent is not None:
                    again.append((parent, seen[id(mod)]))  # (its parameters are the parent's too)
                continue
            if parent is not None and isinstance(mod, _SCRIPTED):
                # TorchScript's insides, not modules (a trace refuses the model, naming it)
                if self.scripted is None:
                    self.scripted = path
                continue
            if parent is not None and is_compiled(mod):
                if self.compiled is None:
                    self.compiled = path
                continue
            seen[id(mod)] = path
            self.modules[path] = mod
            parents[path] = parent
            children[path] = []
            if parent is not None:
                children[parent].append(path)
                self.paths[id(mod)] = path
            prefix = f"{path}." if path else ""
            held: dict[int, int] = {}  # its parameters, shared ones too: id -> numel
            lazy = False
            for n, p in mod._parameters.items():
                if p is None:
                    continue
                shape = _shape(p)
                held[id(p)] = math.prod(shape) if shape else 0
                if id(p) in self.params:
                    continue  # shared parameters keep their first name
                name = prefix + n
                self.params[id(p)] = name
                self.param_shapes[name] = shape
                self.param_refs[name] = ParamRef(name, shape)
                if isinstance(p, _UNINITIALIZED):
                    lazy = True
                elif p.layout is torch.strided:  # (a sparse tensor has no data pointer)
                    self.param_list.append(p)
                    self.param_list_names.append(name)
            for v in vars(mod).values():  # weights packed by quantization: parameters too
                if isinstance(v, torch.ScriptObject):
                    held[id(v)] = _packed_numel(v)
            if lazy and hasattr(mod, "_initialize_hook"):  # its init pre-hook has not run
                self.lazy.append((path, mod))
            counts[path] = held
            for n, b in mod._buffers.items():
                if b is not None and id(b) not in self.buffers:
                    self.buffers[id(b)] = prefix + n
            todo.extend(
                (prefix + n, m, path) for n, m in reversed(mod._modules.items()) if m is not None
            )
        # children before parents: each subtree's parameters, a shared one counted once in
        # each module that holds it (a tied head's weight is the head's and the embedding's)
        for path in reversed(list(self.modules)):
            parent = parents[path]
            if counts[path]:
                self.param_modules.add(path)
                if parent is not None:
                    counts[parent].update(counts[path])
        for parent, first in again:  # a module met twice: its subtree, up its second path
            while parent is not None:
                counts[parent].update(counts[first])
                if counts[parent]:
                    self.param_modules.add(parent)
                parent = parents[parent]
        self.rows = [
            (
                path,
                type(mod).__name__,
                parents[path],
                tuple(children[path]),
                sum(counts[path].values()),
            )
            for path, mod in self.modules.items()
        ]
        self.stamp = _stamp(self.modules.values())
        # layers whose computation may depend on train/eval mode (the per-trace check of a
        # model in eval mode holding some in training mode walks only these)
        self.mode_layers = [(p, m) for p, m in self.modules.items() if p and _context.mode_kind(m)]
        # the model is the cache's weak key: a strong reference to it here would keep it
        # (and all its weights) alive for good
        del self.modules[""]


_INDEX: weakref.WeakKeyDictionary[nn.Module, _ModelIndex] = weakref.WeakKeyDictionary()


def _model_index(model: nn.Module) -> _ModelIndex:
    """The model's index, cached while its tree is unchanged."""
    idx = _INDEX.get(model)
    if idx is None or not _same_stamp(idx.stamp, (model, *idx.modules.values())):
        idx = _INDEX[model] = _ModelIndex(model)
    return idx


def param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> the name a trace's ``ParamRef`` gives it (a shared parameter its
    first name)."""
    return _model_index(model).params


# ops whose output is a new tensor on its input's storage, though not a view (no _base):
# the memory guard counts no bytes for them
_SHARES_STORAGE = frozenset({"detach", "data", "alias"})


class _Core:
    """The recorder's state and per-op work; :class:`Recorder` adds the torch function
    mode around it."""

    def __init__(
        self,
        model: nn.Module,
        *,
        save: SavePolicy,
        transform: Callable[[Tensor], Tensor] | None,
        device: torch.device | None,
        grads: bool,
    ):
        self.model = model
        self.save = save
        self.transform = transform
        # storages of the parameters, buffers, inputs and constants (see _outside)
        self._outside_ptrs: set[int] | None = None
        self.device = device
        self.grads = grads
        self.nodes: list[Op] = []
        self.seq = 0
        self.failed: Op | None = None
        # id(tensor) -> (tensor or weakref to it, (node index, output index), version when
        # produced). Saving everything keeps every output alive anyway, so the tensor itself
        # is held (no id can be reused); otherwise a weakref guards against id reuse
        # without keeping unsaved outputs alive. _alive(hit[0], t) checks either.
        self.producers: dict[int, tuple[Any, tuple[int, int], int]] = {}
        # storage pointer -> nodes whose saved activation aliases it (for in-place safety);
        # None until the first in-place op (see _arm): models without any never pay for it
        self.aliases: dict[int, list[int]] | None = None
        self.mutators: dict[int, int] = {}  # storage pointer -> last in-place op on it
        # parameters, buffers and tensor attributes written in place or replaced
        self.model_writes: list[Tensor] = []
        # parameter name -> (index of the op that wrote into it in place, or of the last op
        # before `p.data = new` replaced it; its value just before): ops up to that index
        # are validated against the value they read
        self.param_writes: dict[str, list[tuple[int, Tensor]]] = {}
        self.params_replaced: dict[str, None] = {}  # `p.data = new` seen (in param_writes)
        # "buffer name" or "attribute name" (a plain tensor attribute of a module) -> (it,
        # its value going in), kept at its first write or replacement (the untraced forward
        # of validation starts from it); later reads see the new values (_state_written)
        self.state_before: dict[str, tuple[Tensor, Tensor]] = {}
        # "parameter name", "buffer name", "attribute name" -> the tensor: written in
        # place, in order; given new storage (`b.data = new`, parameters aside: _state)
        self.state_written: dict[str, Tensor] = {}
        self.state_replaced: dict[str, Tensor] = {}
        # node index -> the op that wrote into its saved value in place unforeseen (an
        # operator whose schema does not declare the write): validation names the writer
        self.stale_by: dict[int, int] = {}
        self.state_snapshot: _state.Snapshot = []  # the modules' attributes going in
        # storage pointer -> (kind, name, the parameter, buffer or tensor attribute)
        self._model_storages: dict[int, tuple[str, str, Tensor]] | None = None
        self.stale_hit = False
        self.index: _ModelIndex | None = None  # set by attach()
        self.params: dict[int, str] = {}
        self.param_shapes: dict[str, tuple[int, ...]] = {}
        self.param_refs: dict[str, ParamRef] = {}
        self.buffers: dict[int, str] = {}
        self.buffer_nodes: dict[int, int] = {}
        self.constant_nodes: dict[int, int] = {}
        # place number (see _place) -> [class number, passes so far, label, call sites
        # (their source once the build found it)]
        self.keys: dict[int, list[Any]] = {}
        self._places: dict[tuple[Any, ...], int] = {}  # the model's table (attach())
        self.name_counts: dict[str, int] = {}
        # module bookkeeping
        self.stack: tuple[tuple[str, int], ...] = ()  # (path, pass) of the current op's calls
        self.module_info: dict[str, ModuleInfo] = {}
        self.modules: dict[str, nn.Module] = {}
        self.param_modules: set[str] = set()  # modules whose subtree holds parameters
        self.saved_modules: set[str] = set()  # modules whose outputs save= asks for
        # ops saved in case they are the output of a module in saved_modules: (op,
        # weakrefs to its outputs, the serial numbers of the module calls it ran in, those
        # of calls save= wants). When a call it ran in ends, it is dropped if its outputs
        # are gone (see _drop_dead), so saving a module keeps its output, not every op
        # inside it until the forward ends
        self._pending: list[tuple[Op, list[Any], tuple[int, ...], frozenset[int]]] = []
        # the calls that just ended while ops were pending: (serials, serials of wanted
        # ones, where in _pending the outermost began: the entries made inside them follow)
        self._ended: tuple[set[int], set[int], int] | None = None
        self._call_serial = 0
        # the current op's module calls, outer to inner: [frame, path or None, module
        # stack, paths, innermost call with parameters, serial number of the call,
        # len(_pending) when it began], the stack, paths and depth up to that call
        self._chain: list[list[Any]] = []
        self._paths: tuple[str, ...] = ()
        self._param_depth = -1  # index in _chain of the innermost call with parameters
        self._sites: list[int] = []
        self._calls: list[Any] = []
        self.stop_frame: Any = None  # trace()'s frame: stack walks end there
        self._top: Any = None  # the previous op's innermost call-site frame
        self.save_all = save.everything
        self.fast_save = save.everything and transform is None and device is None and not grads
        self.grad0 = grads or _grad_enabled()  # the grad mode trace() records under
        # the memory guard (see _memory): bytes saved so far, the total at which to look
        # again (None: no guard), and the fraction of available memory "auto" allows
        self.saved_bytes = 0
        self.mem_check: int | None = None
        self.mem_fraction: float | None = None
        self.mem_basis = ""
        self.over_limit: _memory.OverLimit | None = None
        # node index -> bytes counted for a provisional save, taken off when it is dropped
        self._prov_bytes: dict[int, int] = {}

    def set_memory_limit(
        self, limit: int | None, fraction: float | None, auto: bool = True
    ) -> None:
        """A fixed budget in bytes, or a fraction of the memory available: measured at the
        first saved tensor when the user asked for it, else (``auto``, the default) only
        once the saved total reaches ``_memory.AUTO_FIRST_CHECK``, so that small traces
        never read the machine's memory."""
        if limit is not None:
            self.mem_check = limit
            self.mem_basis = f"max_memory={limit:,} bytes"
        elif fraction is not None:
            self.mem_check = _memory.AUTO_FIRST_CHECK if auto else 0
            self.mem_fraction = fraction

    def _over(self, node_index: int, nbytes: int, device: torch.device) -> None:
        """The saved total passed the point to check: measure the budget, or stop."""
        saved = self.saved_bytes
        if self.mem_fraction is not None:  # a fraction: measure once, now
            fraction = self.mem_fraction
            self.mem_fraction = None
            avail = _memory.available_bytes(self.device or device)
            if avail is None:  # cannot tell: no guard rather than a wrong one
                self.mem_check = None
                return
            # what was available when the trace started: now, plus what it has saved
            start = avail + saved
            self.mem_check = int(fraction * start)
            self.mem_basis = (
                f"{fraction:.0%} of the {_memory.fmt_bytes(start)} available on "
                f"{self.device or device} when the trace started"
            )
            if saved <= self.mem_check:
                return
        self.over_limit = _memory.OverLimit(
            node_index, nbytes, saved, self.mem_check or 0, self.mem_basis
        )
        raise self.over_limit

    # ------------------------------------------------------------------ modules
    def attach(self) -> None:
        """Index modules, parameters and buffers (cached per model while its tree is unchanged)."""
        idx = _model_index(self.model)
        self.index = idx
        self._places = idx.places
        self.paths = idx.paths
        self.params = idx.params
        self.param_shapes = idx.param_shapes
        self.param_refs = idx.param_refs
        self.buffers = idx.buffers
        self.param_modules = idx.param_modules
        self.modules = {"": self.model, **idx.modules}
        infos = self.module_info
        for path, type_name, parent, children, num_params in idx.rows:
            infos[path] = ModuleInfo(path, type_name, parent, list(children), 0, num_params)
        save = self.save
        if save.saves_modules:
            for path, mod in idx.modules.items():
                if save.wants_module(path, mod):
                    self.saved_modules.add(path)

    def _locate(self) -> None:
        """Walk the Python stack: the op's module calls and its call-site frames.

        ``Module.__call__`` frames mark module calls (a new frame object is a new call,
        so a module's pass number is counted here); every other frame adds its (code id,
        bytecode offset) to ``_sites``, which tells call sites apart for loop detection
        and gives the source line later. The walk stops at the first module call the
        previous op was also inside: everything outside that call is unchanged (its
        callers are suspended in it), so the previous op's outer part is reused and a
        module's ``f_locals`` is read once per call.
        """
        f = _getframe(_DEPTH)
        kinds = _code_kinds
        top = self._top  # the previous op's innermost call site
        if top is not None:
            # the common case: another op called from the same function frame as the
            # previous one (past torch's dispatch frames); only the offset there changed
            g = f
            while kinds.get(id(g.f_code)) == _SKIP:
                g = g.f_back
            if g is top:
                sites = self._sites[:]
                sites[1] = g.f_lasti
                self._sites = sites
                return
        stop = self.stop_frame
        chain = self._chain
        sites: list[int] = []  # flat: code id, offset, code id, offset, ... inner to outer
        calls: list[Any] = []  # flat: Module.__call__ frame, len(sites) there, ... inner to outer
        known = -1  # position in chain of the first known call met
        first = None
        splice = -1  # where in the previous op's _calls (and, at cut, _sites) to reuse it
        cut = 0
        while f is not None and f is not stop:
            cid = id(f.f_code)
            k = kinds.get(cid)
            if k is None:
                k = _code_kind(f.f_code)
            if k == _SKIP:  # torch's and lurker's dispatch plumbing: most frames walked
                f = f.f_back
                continue
            if k != _CALL:  # _SITE or _RESUMABLE
                sites.append(cid)
                sites.append(f.f_lasti)
                if first is None:
                    # a generator's frame can resume under other callers: never a shortcut
                    first = f if k == _SITE else False
                if f is top:  # same function as the previous op: the rest is as it was
                    known = len(chain) - 1
                    splice, cut = 0, 2
                    break
            else:  # _CALL: a module call
                for q in range(len(chain) - 1, -1, -1):
                    if chain[q][0] is f:
                        known = q
                        break
                if known >= 0:  # a call the previous op was in: outside it, all is as it was
                    splice = 2 * (len(chain) - 1 - known)  # the call's pair in _calls
                    cut = self._calls[splice + 1]
                    break
                calls.append(f)
                calls.append(len(sites))
            f = f.f_back
        if splice >= 0:  # the previous op's walk from there outwards, offsets shifted
            prev_calls = self._calls
            shift = len(sites) - cut
            if shift:
                for i in range(splice, len(prev_calls), 2):
                    calls.append(prev_calls[i])
                    calls.append(prev_calls[i + 1] + shift)
            else:
                calls.extend(prev_calls[splice:])
            sites.extend(self._sites[cut:])
        self._sites = sites
        self._calls = calls
        # the innermost site, if it lies inside every call (true unless an op is called
        # straight from Module.__call__)
        self._top = first if first and (not calls or calls[1] >= 2) else None
        new = (len(calls) >> 1) - (known + 1)  # calls this op is in and the last was not
        if known == len(chain) - 1 and not new:
            return  # same module call as the previous op
        if self._pending and known + 1 < len(chain):
            # checked in _op, once this walk's references to frames are gone
            wanted = self.saved_modules
            ended = chain[known + 1 :]
            self._ended = (
                {e[5] for e in ended},
                {e[5] for e in ended if e[1] in wanted},
                ended[0][6],
            )
        del chain[known + 1 :]
        if chain:
            stack, paths, depth = chain[-1][2:5]
        else:
            stack, paths, depth = (), (), -1
        for j in range(new - 1, -1, -1):  # the new calls, outer to inner
            fr = calls[2 * j]
            path = self.paths.get(id(fr.f_locals.get("self")))
            if path is not None:  # else the model itself, or a module not part of it
                info = self.module_info[path]
                info.num_passes += 1
                stack = (*stack, (path, info.num_passes))
                paths = (*paths, path)
                if path in self.param_modules:
                    depth = len(chain)
            self._call_serial += 1
            chain.append([fr, path, stack, paths, depth, self._call_serial, len(self._pending)])
        self.stack = stack
        self._paths = paths
        self._param_depth = depth

    def release_frames(self) -> None:
        """Drop every frame reference: frames hold the model's locals, and trace()'s frame
        holds this recorder, so keeping one would leave the whole trace in a cycle."""
        self.stop_frame = None
        self._chain = []
        self._calls = []
        self._top = None

    def _cut(self) -> int:
        """How many entries of ``_sites`` lie inside the innermost call with parameters.

        Only those frames identify an op within its rolled op: ops repeated at the same
        place inside such a module (or in a loop of the model's forward) are passes of one
        rolled op, while a parameter-free module reused at different places (ResNet's shared
        ReLU) is not a loop. A loop repeats one call instruction; two calls on one line
        are two instructions.
        """
        d = self._param_depth
        if d < 0:
            return len(self._sites)
        calls = self._calls
        return calls[2 * ((len(calls) >> 1) - 1 - d) + 1]

    # ------------------------------------------------------------------ sources
    def _outside(self) -> set[int]:
        """Storages of the tensors from outside the forward: the model's parameters and
        buffers, the inputs and constants met so far (made once, for ``transform=``)."""
        if self._outside_ptrs is None:
            model = self.model
            mods = model.modules() if isinstance(model, nn.Module) else []
            self._outside_ptrs = outside_storages(mods, [])
        return self._outside_ptrs

    def add_source_node(self, kind: str, name: str, t: Tensor) -> int:
        if self.transform is not None:  # an op's output viewing it is not handed over as is
            ptr = storage_ptr(t)
            if ptr is not None:
                self._outside().add(ptr)
        idx = len(self.nodes)
        node = _blank(idx, kind, name, self.stack)
        if kind == "input":  # its label now, so that save=["input_1"] finds it (the build
            # names the rest of the source nodes, by the same rule: kind, number of its kind)
            node.label = node.rolled = f"input_{sum(n.kind == 'input' for n in self.nodes) + 1}"
        node.outputs = [_meta(t)]
        self.nodes.append(node)
        self.producers[id(t)] = (t if self.fast_save else _ref(t), (idx, 0), t._version)
        if self.fast_save:
            node.activation = t.detach() if t.requires_grad else t
            if self.aliases is not None:
                self.aliases.setdefault(t.untyped_storage().data_ptr(), []).append(idx)
        else:  # never a module's output (see _maybe_save): not kept for one
            self._maybe_save(node, [t], provisional=False)
        return idx

    def _resolve(self, t: Tensor) -> tuple[int, Any]:
        """Where does a tensor argument come from: (node, output) or (-1, param name)."""
        i = id(t)
        hit = self.producers.get(i)
        if hit is not None and _alive(hit[0], t):
            if hit[2] != t._version:  # changed since, through another view of its storage
                self.stale_hit = True
            return hit[1]
        return self._source_of(t)

    def _source_of(self, t: Tensor) -> tuple[int, Any]:
        """A tensor no recorded op produced: a parameter, a buffer or a constant."""
        i = id(t)
        name = self.params.get(i)
        if name is not None:
            return -1, name
        name = self.buffers.get(i)
        if name is not None:
            idx = self.buffer_nodes.get(i)
            if idx is None:
                idx = self.buffer_nodes[i] = self.add_source_node("buffer", name, t)
            return idx, 0
        idx = self.constant_nodes.get(i)
        if idx is None or self.nodes[idx]._key is not t:
            idx = self.add_source_node("constant", f"constant_{len(self.constant_nodes) + 1}", t)
            self.constant_nodes[i] = idx
            self.nodes[idx]._key = t  # keep the constant alive and identifiable
        return idx, 0

    # ------------------------------------------------------------------ saving
    def _maybe_save(self, node: Op, outs: list[Tensor], provisional: bool = True) -> None:
        """Save ``node``'s outputs if save= wants them, or (``provisional``: an op, not a
        parameter, buffer or constant, which a call's output never is) if they may be the
        output of a module call save= wants."""
        if self.save.wants_op(node):
            self._store(node, outs)
        elif provisional and self.saved_modules and not self.saved_modules.isdisjoint(self._paths):
            # inside a module whose output save= wants: keep it until we know whether
            # it is that output (see _build.drop_provisional)
            self._store(node, outs)
            node._provisional = True
            wanted = self.saved_modules
            chain = self._chain
            self._pending.append(
                (
                    node,
                    [_ref(o) for o in outs],
                    tuple([e[5] for e in chain]),
                    frozenset([e[5] for e in chain if e[1] in wanted]),
                )
            )
        else:
            return  # not saved: no gradient kept either (nor transform run on it)
        if self.grads:
            for k, o in enumerate(outs):
                if o.requires_grad:
                    o.register_hook(self._grad_hook(node, k, len(outs)))

    def _drop_dead(self) -> None:
        """Settle the provisional saves made inside the module calls that just ended.

        A value is a call's output only if something uses it after the call returns: one
        that no longer exists when a call it was made in ends is the output of no call
        that holds it, and is dropped now. One still alive when the innermost wanted call
        holding it ends may be that call's output: it stays saved, and the build decides
        (``drop_provisional``). Without this, ``save=["layer3"]`` kept every op inside
        layer3, and the raw inputs of their calls, until the forward ended."""
        ended, wanted, start = self._ended  # type: ignore[misc]
        self._ended = None
        # only the entries made since the outermost ended call began: a scan of them all
        # would make a saved module looping over a child quadratic in its steps
        pending = self._pending
        scan = pending[start:]
        kept = []
        dropped = []
        for entry in scan:
            node, refs, calls, wanted_calls = entry
            if ended.isdisjoint(calls):
                kept.append(entry)  # made outside the calls that ended
            elif not any(r() is not None for r in refs):
                dropped.append(node)
            elif wanted.isdisjoint(wanted_calls):
                kept.append(entry)  # alive, and a wanted call holding it still runs
        if dropped:
            if self._prov_bytes:
                self._uncount(dropped, scan)
            for node in dropped:
                _build.unsave(node, self.param_refs)
        pending[start:] = kept
        n = len(pending)
        for e in self._chain:  # calls begun after those ended began at the shorter end
            if e[6] > n:
                e[6] = n

    def _uncount(self, dropped: list[Op], scan: list[Any]) -> None:
        """Take the provisional saves about to be dropped off the memory guard's total.

        A dropped op's storage stays held when a save that is kept is a view of it: its
        bytes then pass to that save (or, not provisional, stay counted)."""
        gone = {id(n) for n in dropped}
        holders: dict[int, Op] = {}
        if self.transform is None and self.device is None:  # else saves are own copies
            for node, _, _, _ in scan:
                a = node.activation
                if id(node) in gone or a is None:
                    continue
                for x in a if isinstance(a, tuple) else (a,):
                    holders.setdefault(x.untyped_storage().data_ptr(), node)
        counted = self._prov_bytes
        for node in dropped:
            n = counted.pop(node.index, 0)
            a = node.activation
            if not n or a is None:
                continue
            holder = None
            if holders:
                for x in a if isinstance(a, tuple) else (a,):
                    holder = holders.get(x.untyped_storage().data_ptr())
                    if holder is not None:
                        break
            if holder is None:
                self.saved_bytes -= n
            elif holder._provisional:
                counted[holder.index] = counted.get(holder.index, 0) + n

    def _store(self, node: Op, outs: list[Tensor]) -> None:
        saved = []
        for o in outs:
            s = o.detach()
            if self.transform is not None:
                if node.kind in _SOURCE_KINDS:  # the caller's input, the model's buffer: a
                    s = s.clone()  # transform that writes into it must not change them
                try:
                    s = apply_transform(self.transform, s, _what(node), self._outside())
                except TransformFailed as e:  # so that the error can name it
                    e.node = node
                    raise
            elif self.device is None and self.aliases is not None:
                ptr = o.untyped_storage().data_ptr()
                self.aliases.setdefault(ptr, []).append(node.index)
            if self.device is not None:
                s = s.to(self.device, copy=True)
            if self.transform is not None or self.device is not None:
                self.saved_bytes += s.nbytes  # a new tensor (counted for the memory guard)
            saved.append(s)
        node.activation = saved[0] if len(saved) == 1 else tuple(saved)

    def _grad_hook(self, node: Op, k: int, n: int) -> Callable[[Tensor], None]:
        def hook(g: Tensor) -> None:
            if node._provisional and node.activation is None:
                return  # kept provisionally, and not a module output save= wants
            g = g.detach()
            if self.transform is not None:
                g = apply_transform(
                    self.transform, g, f"the gradient of {node.name} (op {node.index})"
                )
            if self.device is not None:
                g = g.to(self.device)
            if n == 1:
                node.grad = g if node.grad is None else node.grad + g
            else:
                grads = list(node.grad) if node.grad is not None else [None] * n
                grads[k] = g if grads[k] is None else grads[k] + g
                node.grad = tuple(grads)

        return hook

    def _guard(
        self, inplace: bool, info: Any, ins: list[Tensor], args: tuple, kwargs: dict
    ) -> None:
        """Before an op writes into tensors (in place, ``out=``, running statistics),
        clone the saved activations that share their storage."""
        targets: list[Tensor] = []
        if inplace:
            out = kwargs.get("out")
            if out is not None:
                targets = tensors(out, [])
            elif ins:
                targets = [ins[0]]
        if info.mutates_buffers:
            targets += _funcs.mutated_buffers(info, args, kwargs)
        if targets:
            if self.aliases is None:
                self._arm()
            for t in targets:
                self._protect(t)
                name = self.buffers.get(id(t))
                if name is not None:  # the buffer itself: its next reads resolve to this op
                    self._state_written("buffer", name, t, t)
                    continue
                name = self.params.get(id(t))
                owner = ("parameter", name, t) if name is not None else self._state_of(t)
                if owner is None:
                    self._through_data(t)
                    continue
                kind, name, it = owner
                if kind == "parameter":  # the parameter itself, its .data or a view of it
                    self.model_writes.append(t)
                    self._param_written(name, it)
                    if t is not it:  # (an earlier in-place op on it may have produced it)
                        self._moved(it)
                        self._through_data(t)  # views of it made before: see below
                else:  # a buffer's .data or a view of it; a tensor attribute, or its view
                    self._state_written(kind, name, it, t)

    def _state_of(self, t: Tensor) -> tuple[str, str, Tensor] | None:
        """The model parameter, buffer or tensor attribute whose storage ``t`` shares, if
        any (``p.data`` is another tensor object on the same storage)."""
        table = self._model_storages
        if table is None:  # at the first in-place op: models without any never pay
            table = self._model_storages = {}
            names, buffers = self.params, self.buffers
            for mod in self.modules.values():
                for p in mod._parameters.values():
                    # a lazy module's parameter has no storage until its first forward
                    # (an exact Parameter is not one: isinstance against a parameter
                    # class runs a Python __instancecheck__, ~0.25 µs per parameter)
                    if (
                        p is None
                        or id(p) not in names
                        or (type(p) is not _PARAMETER and isinstance(p, _UNINITIALIZED))
                    ):
                        continue
                    ptr = p.untyped_storage().data_ptr()
                    if ptr:  # 0: no memory (meta, or empty)
                        table.setdefault(ptr, ("parameter", names[id(p)], p))
                for b in mod._buffers.values():
                    if (
                        b is None
                        or id(b) not in buffers
                        or (type(b) is not Tensor and isinstance(b, _UNINITIALIZED_B))
                    ):
                        continue
                    ptr = b.untyped_storage().data_ptr()
                    if ptr:
                        table.setdefault(ptr, ("buffer", buffers[id(b)], b))
            # tensors the modules held as plain attributes going in (self.mem = zeros):
            # from the snapshot of their attributes (_state), not one this forward set
            for path, _mod, attrs, *_ in self.state_snapshot:
                prefix = f"{path}." if path else ""
                for k, v in attrs.items():
                    if type(v) is Tensor:
                        ptr = v.untyped_storage().data_ptr()
                        if ptr:
                            table.setdefault(ptr, ("attribute", prefix + k, v))
        ptr = t.untyped_storage().data_ptr()
        return table.get(ptr) if ptr else None

    def _param_written(self, name: str, p: Tensor) -> None:
        """An op is about to write into parameter ``name``: keep the value it holds now,
        which the ops that read it so far (and this op) read."""
        before = p.detach().clone()
        self.param_writes.setdefault(name, []).append((len(self.nodes), before))
        self.state_written["parameter " + name] = p
        if self.mem_check is not None:  # a copy: memory the guard counts
            self.saved_bytes += before.nbytes

    def _state_written(self, kind: str, name: str, b: Tensor, through: Tensor) -> None:
        """An op is about to write into buffer or tensor attribute ``name`` through
        ``through`` (it, or another tensor on its storage). Ops that read it so far read
        its node's saved value (cloned by ``_protect``); ops after it must read the new one:
        the op's output, if it writes into ``b`` itself or a view (which shares its version
        counter), else what ``_moved`` arranges."""
        key = f"{kind} {name}"
        self.model_writes.append(b)
        self.state_written[key] = b
        self._keep_going_in(key, b)
        if through is not b:
            self._moved(b)
            # through its .data: views of it made before (v = b.view(-1)) share the storage
            # but not the version counter, so they too must not read their saved value
            self._through_data(through)

    def _keep_going_in(self, key: str, b: Tensor) -> None:
        if key not in self.state_before:
            before = b.detach().clone()
            self.state_before[key] = (b, before)
            if self.mem_check is not None:  # a copy: memory the guard counts
                self.saved_bytes += before.nbytes

    def _through_data(self, t: Tensor) -> None:
        """A write through a ``.data`` (or a view of that) of an op's output, a parameter,
        buffer or tensor attribute, whose version counter is its own: the tensors on that
        storage (views made before the write) must not resolve to their saved values at
        their next read (see ``_moved``). A walk over the recorded outputs, only for such a
        write; one check for any other."""
        base = t._base if t._base is not None else t
        hit = self.producers.get(id(base))
        if hit is None or self.nodes[hit[1][0]].name != "data":
            return
        ptr = t.untyped_storage().data_ptr()
        for key, (held, where, _v) in list(self.producers.items()):
            x = held() if type(held) is _REF else held
            if x is not None and x.untyped_storage().data_ptr() == ptr:
                self.producers[key] = (held, where, -1)

    def _moved(self, b: Tensor) -> None:
        """``b`` holds other values, and its version counter did not move (a write through
        ``b.data``, whose counter is its own, or ``b.data = new``): its next read must not
        resolve to its saved value. A version that never matches makes that read a stale
        one, which keeps the value it reads (see ``_snapshots``)."""
        hit = self.producers.get(id(b))
        if hit is not None:
            self.producers[id(b)] = (hit[0], hit[1], -1)

    def _unshare(self, t: Tensor) -> None:
        """Saved activations that are ``t`` itself (a buffer node, an in-place op's output,
        saved undetached) would show the new storage once ``t.data = new`` runs: they
        keep a tensor on the old one. A walk over the ops so far, per replacement."""
        for node in self.nodes:
            a = node.activation
            if a is t:
                node.activation = t.detach()
            elif type(a) is tuple and any(x is t for x in a):
                node.activation = tuple(x.detach() if x is t else x for x in a)

    def _set_data(self, func: Any, args: tuple) -> None:
        """``t.data = new`` (no op: torch function modes see the setter alone): where ``t``
        is a parameter, buffer, tensor attribute or an op's output, ops before read its
        old value, ops after the new one."""
        t = args[0]
        if isinstance(t, _UNINITIALIZED):
            return func(*args)
        state = True
        name = self.params.get(id(t))
        if name is not None:
            # the ops so far read the old value, the next one the new (see
            # validate._param_read: an in-place op's entry has its own index, as it reads
            # the value before its write)
            before = t.detach().clone()
            self.param_writes.setdefault(name, []).append((len(self.nodes) - 1, before))
            self.params_replaced[name] = None
            if self.mem_check is not None:
                self.saved_bytes += before.nbytes
        else:
            name = self.buffers.get(id(t))
            key = f"buffer {name}"
            if name is None:
                owner = self._state_of(t)
                if owner is not None and owner[2] is t:  # a tensor attribute
                    key = f"{owner[0]} {owner[1]}"
                else:
                    state = False
            if state:
                self._keep_going_in(key, t)
                self.state_replaced[key] = t
        hit = self.producers.get(id(t))
        if state or (hit is not None and _alive(hit[0], t)):
            self._moved(t)  # later reads see the new storage
            self._unshare(t)  # saved values keep the old one
        func(*args)
        if state:
            self._model_storages = None  # its storage changed: the table is built again
            self.model_writes.append(t)  # the new storage may be a saved activation's

    def detach_from_model(self) -> None:
        """After the forward: clone saved activations that share storage with a buffer or
        parameter an op wrote into, since the model's next forward writes into it again."""
        if self.aliases is None:  # storages replaced (`p.data = new`), no op in place
            self._arm()
        for t in self.model_writes:
            self._protect(t)
        self.model_writes = []

    def _arm(self) -> dict[int, list[int]]:
        """Start tracking which saved activations share storage, at the first in-place op.

        Until then nothing could have changed a saved tensor, so the map is built from the
        activations saved so far, exactly as if every op had registered its own.
        """
        aliases: dict[int, list[int]] = {}
        self.aliases = aliases
        if self.transform is not None or self.device is not None:
            return aliases  # saved copies never share the model's storage
        for node in self.nodes:
            a = node.activation
            if a is None:
                continue
            for x in a if isinstance(a, tuple) else (a,):
                aliases.setdefault(x.untyped_storage().data_ptr(), []).append(node.index)
        return aliases

    def _protect(self, t: Tensor) -> None:
        """Clone saved activations that alias ``t`` before ``t`` is modified in place."""
        ptr = t.untyped_storage().data_ptr()
        idxs = self.aliases.pop(ptr, None)
        if not idxs:
            return
        for i in idxs:
            node = self.nodes[i]
            a = node.activation
            if a is None:  # a provisional save dropped since (_drop_dead)
                continue
            node.activation = tuple(x.clone() for x in a) if isinstance(a, tuple) else a.clone()
            if self.mem_check is not None:  # a copy: memory the guard counts
                n = sum(x.nbytes for x in a) if isinstance(a, tuple) else a.nbytes
                self.saved_bytes += n
                if node._provisional:
                    self._prov_bytes[i] = self._prov_bytes.get(i, 0) + n

    def _mark_stale(self, t: Tensor) -> None:
        """An op we did not expect to be in-place modified ``t``: saved copies are wrong.
        It is recorded next (its index is the number of nodes so far), named as the writer."""
        aliases = self.aliases if self.aliases is not None else self._arm()
        for i in aliases.pop(t.untyped_storage().data_ptr(), []):
            node = self.nodes[i]
            if node.activation is None:  # a provisional save dropped since (its storage
                continue  # freed and handed to another tensor): nothing kept to be wrong
            node.stale = True
            self.stale_by.setdefault(i, len(self.nodes))

    # ------------------------------------------------------------------ the op hook
    def _op(self, func, info, args, kwargs):
        """Record one call that may be an op (:class:`OpMode` routed it here)."""
        self._locate()
        if self._ended is not None:
            self._drop_dead()
        ins = call_tensors(args, kwargs)
        # resolve before running: a buffer or constant first met by an in-place op must be
        # saved with the value it had going in
        producers = self.producers
        inputs = []
        versions = []
        for t in ins:
            hit = producers.get(id(t))
            v = t._version
            versions.append(v)
            if hit is not None:
                held = hit[0]  # _alive(held, t), inlined: this runs per input of every op
                if held is t or (type(held) is _REF and held() is t):
                    if hit[2] != v:  # changed since, through another view of its storage
                        self.stale_hit = True
                    inputs.append(hit[1])
                    continue
            inputs.append(self._source_of(t))
        snaps = self._snapshots(ins) if self.stale_hit else None
        inplace = info.inplace_first
        if kwargs is not _NO_KWARGS:
            inplace = inplace or kwargs.get("inplace") is True or kwargs.get("out") is not None
        if inplace and ins:
            self._settle_meta(ins[0])  # before unsqueeze_/t_/requires_grad_ change it
        if inplace or info.mutates_buffers:
            self._guard(inplace, info, ins, args, kwargs)
        ctx = None
        # asked once per call: the op's context and its record both need it (dropout in
        # eval mode, or with p=0, draws nothing)
        drawn = (info.random or info.dropout) and _funcs.is_random_call(info, args, kwargs)
        if drawn or _any_autocast() or _grad_enabled() is not self.grad0:
            ctx = self._context(drawn)
        t0 = perf_counter()
        try:
            out = func(*args, **kwargs) if kwargs else func(*args)
        except BaseException:
            self._record_failure(func, info, inputs, args, kwargs, drawn)
            raise
        dt = perf_counter() - t0

        if type(out) is Tensor:  # the common case of _produced, inlined: one tensor out
            outs = [out]
            changed = None
            for t, v in zip(ins, versions):
                if t._version != v:
                    if changed is None:
                        changed = []
                    changed.append(t)
        else:
            made = _produced(func, info, out, ins, versions)  # the replayer asks the same
            if made is None:
                return out
            outs, changed, by_mutation = made
            if not outs:  # a readout
                self._record(func, info, inputs, args, kwargs, [], dt, "readout", out, drawn)
                return out
            if by_mutation:  # x[i] = v and friends: the op "produces" the mutated tensor
                inplace = True
        if changed is not None and not inplace:  # an in-place op we did not foresee
            for t in changed:
                self._mark_stale(t)  # saved copies of its storage are off
            inplace = True
        node = self._record(func, info, inputs, args, kwargs, outs, dt, None, None, drawn)
        if ctx is not None:
            node._ctx = ctx
        if inplace:
            node.inplace = True
            self.mutators[outs[0].untyped_storage().data_ptr()] = node.index
        if snaps:
            self._link_mutators(node, ins, snaps)
        return out

    def _context(self, random: bool) -> _context.OpContext | None:
        """The autocast, grad mode and RNG state (when the op draws random numbers,
        ``random``) this op runs under, if not the default."""
        if not random and not _any_autocast() and _grad_enabled() is self.grad0:
            return None  # dropout in eval mode, p=0: the default state, nothing to read
        ctx = _context.current(rng=random)
        if not random and not ctx.autocast and ctx.grad is self.grad0:
            return None
        return ctx

    def _settle_meta(self, t: Tensor) -> None:
        """Read now the output metadata of the op that produced ``t`` (normally left for
        :func:`._build.complete_calls`), because an in-place op is about to run on ``t``."""
        hit = self.producers.get(id(t))
        if hit is not None and _alive(hit[0], t):
            node = self.nodes[hit[1][0]]
            outs = node._outs
            if outs is not None:
                node.outputs = [_meta(o) for o in outs]
                node._outs = None

    def _snapshots(self, ins: list[Tensor]) -> dict[int, Tensor]:
        """Inputs modified through another view since their op produced them.

        Their producer's saved value is not what this op reads, so we keep what it reads.
        """
        self.stale_hit = False
        snaps = {}
        for j, t in enumerate(ins):
            hit = self.producers.get(id(t))
            if hit is not None and _alive(hit[0], t) and hit[2] != t._version:
                snaps[j] = t.detach().clone()
        return snaps

    def _link_mutators(self, node: Op, ins: list[Tensor], snaps: dict[int, Tensor]) -> None:
        node._snapshots = snaps
        extra = []
        for j in snaps:
            m = self.mutators.get(ins[j].untyped_storage().data_ptr())
            if m is not None and m != node.index and m not in extra:
                extra.append(m)
        if node._where is None:  # completed already (save= asked about it by label)
            for m in extra:
                if m not in node.parents:
                    node.parents.append(m)
                    self.nodes[m].children.append(node.index)
        else:
            node._extra_parents = extra

    def _record(self, func, info, inputs, args, kwargs, outs, dt, kind, value, drawn) -> Op:
        """The per-op minimum; the build derives the rest once the forward is done.

        Python run between torch kernels is several times slower than the same code run
        in one batch afterwards (caches are cold), so only what cannot wait is done here:
        output registration (later ops resolve their inputs by it) and saving.
        """
        idx = len(self.nodes)
        node = _blank(idx, kind, info.name, self.stack)
        node.time = dt
        node.value = value
        node.seq = self.seq
        self.seq += 1
        node._func = func
        node._inputs = inputs
        node._where = (self._paths, self._sites, self._cut())
        if info.random or info.dropout:
            node.random = drawn  # whether this call draws random numbers (see _op)
        self.nodes.append(node)
        if outs:
            producers = self.producers
            hold = self.fast_save
            check = self.mem_check
            fresh = 0  # bytes of new storage (not a view, not an input modified in place)
            for k, o in enumerate(outs):
                if check is not None:
                    base = o._base
                    if base is None:
                        prev = producers.get(id(o))
                        if (prev is None or not _alive(prev[0], o)) and (
                            info.name not in _SHARES_STORAGE
                        ):
                            fresh += o.nbytes
                    elif id(base) not in producers and id(base) not in self.params:
                        fresh += o.nbytes  # a view of a temporary (reshape's copy)
                producers[id(o)] = (o if hold else _ref(o), (idx, k), o._version)
            if self.fast_save and len(outs) == 1:  # the default: keep every output as is
                o = outs[0]
                node.activation = o.detach() if o.requires_grad else o
                if self.aliases is not None:
                    self.aliases.setdefault(o.untyped_storage().data_ptr(), []).append(idx)
                node._outs = outs  # shapes are read in the build (the tensor is kept anyway)
                if check is not None:
                    self.saved_bytes += fresh
                    if self.saved_bytes > check:
                        self._over(idx, fresh, o.device)
            else:
                node.outputs = [_meta(o) for o in outs]
                if self.save.asks_ops:  # it decides by label, shape, ...: complete it now
                    self._complete(node)
                self._maybe_save(node, outs)
                if check is not None and node.activation is not None:
                    if self.transform is None and self.device is None:
                        self.saved_bytes += fresh  # else _store counted the copies
                        if node._provisional:  # uncounted if dropped (_drop_dead)
                            self._prov_bytes[idx] = fresh
                    elif node._provisional:
                        a = node.activation
                        self._prov_bytes[idx] = (
                            sum([x.nbytes for x in a]) if type(a) is tuple else a.nbytes
                        )
                    if self.saved_bytes > check:
                        self._over(idx, fresh, outs[0].device)
        if node.activation is not None or self.save_all:
            # raw call arguments (validation swaps in saved tensors); lists are copied
            # because models keep appending to them (DenseNet's torch.cat(features))
            for a in args:
                if type(a) is list:
                    args = tuple([list(a) if type(a) is list else a for a in args])
                    break
            if kwargs:
                for v in kwargs.values():
                    if type(v) is list:
                        kwargs = {
                            key: list(v) if type(v) is list else v for key, v in kwargs.items()
                        }
                        break
            if node._provisional:  # held as detached tensors, so that the call's inputs
                # can die and _drop_dead can tell (the values are the same storage)
                args, kwargs = map_tensors(args, _detach), map_tensors(kwargs, _detach)
            node._skel_args = args
            node._skel_kwargs = kwargs
        else:  # the raw arguments would keep unsaved tensors alive: their skeleton now
            node.args, node.kwargs = _build.call_skeleton(args, kwargs, inputs, self.param_refs)
        return node

    def _record_failure(self, func, info, inputs, args, kwargs, drawn) -> None:
        if self.failed is None:
            node = self._record(func, info, inputs, args, kwargs, [], 0.0, None, None, drawn)
            node.kind = "failed"
            self.failed = node

    def _complete(self, node: Op) -> None:
        """:meth:`_complete_all` of one op (save= asks about an op by its label at once)."""
        self._complete_all((node,))

    def _complete_all(self, nodes: Iterable[Op]) -> None:
        """Parents and children, parameters used, kind, output metadata, and the rolling
        key that numbers the op (``conv2d_3``), counts its passes and finds its source,
        of every op of ``nodes`` not completed already.

        One loop over them all (the build's first step), with what it reads per op
        looked up once: at a few microseconds an op, this is most of the build.
        """
        graph = self.nodes
        refs = self.param_refs
        places = self._places
        keys = self.keys
        counts = self.name_counts
        for node in nodes:
            where = node._where
            if where is None:  # a source node, or completed already
                continue
            paths, sites, cut = where
            node._where = None
            parents: list[int] = []
            pnames: list[str] | None = None
            for src, what in node._inputs:
                if src >= 0:
                    if src not in parents:
                        parents.append(src)
                elif pnames is None:
                    pnames = [what]
                elif what not in pnames:
                    pnames.append(what)
            extra = node._extra_parents
            if extra:
                parents.extend([m for m in extra if m not in parents])
            node.parents = parents
            if parents:
                i = node.index
                for p in parents:
                    graph[p].children.append(i)
            if pnames:
                node.params = [refs[w] for w in pnames]
            if node.kind is None:
                node.kind = "op" if parents or pnames else "generated"
            outs = node._outs
            if outs is not None:  # (kept for one output only: no comprehension to run)
                node.outputs = [_meta(outs[0])] if len(outs) == 1 else [_meta(o) for o in outs]
                node._outs = None
            name = node.name
            frames = tuple(sites) if cut == len(sites) else tuple(sites[:cut])
            key = (name, paths, frames, *pnames) if pnames else (name, paths, frames)
            # the number of the op's place in the model's table: one hash of the key,
            # where a table of this trace's keys took two, and the frames' a third
            place = places.get(key)
            if place is None:
                place = _place(places, key, name, paths, frames, pnames)
            entry = keys.get(place)
            if entry is None:  # a new rolled op: its number among ops of its name,
                # passes so far, label, the call sites its source is found from
                n = counts[name] = counts.get(name, 0) + 1
                entry = keys[place] = [n, 0, f"{name}_{n}", sites]
            entry[1] += 1
            node.label = node.rolled = entry[2]
            node.pass_num = entry[1]
            node._key = entry  # its final pass count (and source) is read in the build


class Recorder(_Core, OpMode):
    """Records one forward pass. Use through :func:`lurker.trace`, not directly."""


def _alive(held: Any, t: Tensor) -> bool:
    """Whether a producers entry (the tensor, or a weakref to it) still refers to ``t``."""
    return held is t or (type(held) is _REF and held() is t)


_REF = weakref.ReferenceType


# The stack walk starts at the op's caller, past ``_locate``, ``_op`` and
# ``OpMode.__torch_function__`` (the only path to ``_locate``); starting at the latter
# would cost a frame object and a step of the walk per op.
_DEPTH = 3


def _meta(t: Tensor) -> TensorMeta:
    # TensorMeta is a NamedTuple: tuple.__new__ skips its slower Python __new__
    try:
        dtype = _DTYPE_NAMES[t.dtype]
    except KeyError:
        dtype = _dtype_name(t.dtype)
    if t.is_cpu:  # read cheaper than t.device, which makes a device object to look up
        device = "cpu"
    else:
        try:
            device = _DEVICE_NAMES[t.device]
        except KeyError:
            device = _DEVICE_NAMES[t.device] = str(t.device)
    return _new_tuple(TensorMeta, (tuple(t.shape), dtype, device, t.requires_grad))


#: nodes whose values are the caller's or the model's own (not made by the forward)
_SOURCE_KINDS = frozenset({"input", "buffer", "constant"})


class TransformFailed(LurkerError):
    """``transform=`` raised on a saved value: the message names the op and its shape,
    ``node`` is the node whose value it was (set where it is known: at record time)."""

    node: Op | None = None


def _what(node: Op) -> str:
    """The value ``transform=`` ran on, as its error names it: ``input x (input_1)``,
    ``buffer bn.running_mean``, ``the output of linear (op 3)``."""
    if node.kind == "input":
        return f"input {node.name!r} ({node.label})"
    if node.kind in ("buffer", "constant"):
        return f"{node.kind} {node.name}"
    return f"the output of {node.name} (op {node.index})"


def storage_ptr(t: Tensor) -> int | None:
    """The address of the storage ``t`` lies on (shared by its views), or None where it
    has no plain storage (sparse, ...)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def outside_storages(modules: Iterable[nn.Module], more: Iterable[Any]) -> set[int]:
    """The storages of ``modules``' parameters and buffers and of the tensors in ``more``
    (inputs, constants): an op's output on one of them (``x.flatten(1)`` of the input,
    ``pos_embed[:, 1:]``) is the caller's or the model's own tensor."""
    found: set[int] = set()
    for m in modules:
        for t in (*m._parameters.values(), *m._buffers.values()):
            if isinstance(t, Tensor):
                found.add(storage_ptr(t) or 0)
    for t in more:
        if isinstance(t, Tensor):
            found.add(storage_ptr(t) or 0)
    found.discard(0)
    return found


def apply_transform(
    transform: Callable[[Tensor], Any],
    t: Tensor,
    what: str,
    outside: Container[int] | None = None,
) -> Any:
    """``transform(t)`` as a value of its own.

    A transform that returns ``t`` itself or a view of it (``t.flatten(1)``, ``t[:, :8]``)
    would share storage with the model's tensor, which a later in-place op (resnet's
    ``ReLU(inplace=True)`` after a batch norm) overwrites: such a result is copied, so the
    saved value is the op's own. ``what`` names the value in the error if it raises.

    ``t`` is the model's own tensor (detached, not copied: a copy per op would cost as much
    as the ops), so a transform that writes into it (``t.relu_()``, ``t.sub_(m)``) changes
    the forward: every later value and the output would be silently wrong. Its version
    counter tells such a write, which is refused (a model input or buffer is handed over
    as a copy, so the caller's stimuli and the model's state stay as they were, and so is a
    value on the storage of one in ``outside`` (:func:`outside_storages`): a view of the
    input, a slice of a parameter); so is a result that is no tensor (a float, a tuple,
    None), which nothing downstream could keep, count or move."""
    copied = outside is not None and storage_ptr(t) in outside
    if copied:  # the refused write must not reach the caller's or the model's tensor
        t = t.clone()
    try:
        version = t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        version = None
    try:
        out = transform(t)
    except Exception as e:
        raise TransformFailed(
            f"transform= raised {type(e).__name__} on {what} of shape {tuple(t.shape)}: "
            f"{str(e).strip()}. It runs on every saved activation (and gradient): save only "
            "values it accepts (save= op labels or module paths), or make it accept this one."
        ) from e
    if version is not None and t._version != version:
        raise TransformFailed(
            f"transform= changed {what} of shape {tuple(t.shape)} in place: it is the "
            "model's own tensor, which the rest of the forward reads, so every later value "
            "and the output would be wrong. Return a new tensor instead (t.relu() rather "
            "than t.relu_(), t - m rather than t.sub_(m))."
        )
    if not isinstance(out, Tensor):
        raise TransformFailed(
            f"transform= returned {type(out).__name__} on {what} of shape {tuple(t.shape)}, "
            "not a tensor: it must return the tensor to keep (several statistics stacked "
            "into one, torch.stack([t.mean((2, 3)), t.amax((2, 3))], 1); .numpy() or .item() "
            "on the values the trace or run gives back)."
        )
    try:
        shared = out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no plain storage: a fresh value
        shared = False
    if shared:
        out = out.clone()
    return out


# torch.dtype -> "float32", torch.device -> "cuda:0": the graph holds strings (it is
# torch-free), converted once per dtype and device rather than with str() per op
_DTYPE_NAMES: dict[torch.dtype, str] = {}
_DEVICE_NAMES: dict[torch.device, str] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    if name not in ITEMSIZE:  # a dtype newer than the graph's table
        ITEMSIZE[name] = dtype.itemsize
    return name


_codes: dict[int, Any] = {}  # id -> code object, for the ids kept in call sites


_SOURCES: dict[tuple[int, ...], str | None] = {}  # call sites -> source; sites are few


def _source(sites: list[int]) -> str | None:
    """``file:line`` of the model code that made the call: the innermost frame of user
    code (or else of torch's own module code) within the model's call.
    """
    key = tuple(sites)
    src = _SOURCES.get(key, False)
    if src is False:
        if len(_SOURCES) > 100_000:  # a bound, not a policy
            _SOURCES.clear()
        src = _SOURCES[key] = _find_source(sites)
    return src  # type: ignore[return-value]


def _find_source(sites: list[int]) -> str | None:
    fallback = None
    for i in range(0, len(sites), 2):
        code = _codes.get(sites[i])
        if code is None:
            continue
        where = _kind_of(code.co_filename)
        if where == _PLUMBING:
            continue
        line = _line(code, sites[i + 1])
        if where == _USER:
            return f"{code.co_filename}:{line}"
        if fallback is None:
            fallback = f"{code.co_filename}:{line}"
    return fallback


def _line(code: Any, offset: int) -> int | None:
    for start, end, line in code.co_lines():
        if start <= offset < end:
            return line
    return code.co_firstlineno


# code id -> {offset of a later copy of an instruction: the first copy's offset}, made once
# per code object (empty, without disassembling, where no source span recurs)
_COPIES: dict[int, dict[int, int]] = {}
# frames -> what _first_copies returns for them (_NO_COPY: the frames themselves)
_FIRST: dict[tuple[int, ...], tuple[int, ...]] = {}
_NO_COPY: tuple[int, ...] = ()


def _first_copies(frames: tuple[int, ...]) -> tuple[int, ...]:
    """``frames`` (code id, offset, ...) with each offset replaced by that of the first copy
    of its instruction; ``frames`` itself when none is a later copy.

    The compiler writes some code twice: a ``while`` loop's condition before the loop and
    again at its end, a ``finally`` block on the normal and the exception path. Both
    copies are one call site of the model's code, so one rolled op.
    """
    hit = _FIRST.get(frames)
    if hit is not None:  # the same frames again (each block of a model's stack)
        return frames if hit is _NO_COPY else hit
    out = None
    for i in range(1, len(frames), 2):
        copies = _COPIES.get(frames[i - 1])
        if copies is None:
            copies = _COPIES[frames[i - 1]] = _copies_in(frames[i - 1])
        first = copies.get(frames[i]) if copies else None
        if first is not None:
            if out is None:
                out = list(frames)
            out[i] = first
    if len(_FIRST) > 100_000:  # a bound, not a policy
        _FIRST.clear()
    if out is None:
        _FIRST[frames] = _NO_COPY
        return frames
    _FIRST[frames] = first_frames = tuple(out)
    return first_frames


_place_numbers = itertools.count()  # next() is atomic: threads may trace one model at once


def _place(
    places: dict[tuple[Any, ...], int],
    key: tuple[Any, ...],
    name: str,
    paths: tuple[str, ...],
    frames: tuple[int, ...],
    pnames: list[str] | None,
) -> int:
    """The number of the place ``key`` names in a model's table of places (``places``),
    adding it: a place the compiler wrote twice (a while loop's condition: once before
    the loop, once at its end) is one place, numbered as its first copy is.

    Numbers are never reused nor removed while the model lives, so that every trace, in
    any thread, tells the same places apart (they are few: the model's call sites)."""
    first = _first_copies(frames)
    if first is not frames:
        key0 = (name, paths, first, *pnames) if pnames else (name, paths, first)
        place = places.setdefault(key0, next(_place_numbers))
    else:
        place = next(_place_numbers)
    return places.setdefault(key, place)


def _copies_in(code_id: int) -> dict[int, int]:
    """:func:`copied_instructions` of a code object, or ``{}`` without disassembling it
    where no source span recurs apart (the common case: a cheap pass over positions)."""
    code = _codes.get(code_id)
    if code is None or not hasattr(code, "co_positions") or not _repeated_spans(code):
        return {}
    return copied_instructions(code)


def _repeated_spans(code: Any) -> frozenset[Any]:
    """The complete source positions of ``code`` found in more than one run of consecutive
    code units (a copy of an instruction has its original's position): one pass over the
    code, so a forward of thousands of calls (an fx ``GraphModule``) costs linear time."""
    runs: dict[Any, int] = {}
    prev = None
    for p in code.co_positions():  # one per code unit, inline caches included
        if p != prev and None not in p:
            runs[p] = runs.get(p, 0) + 1
        prev = p
    return frozenset(p for p, n in runs.items() if n > 1)


def copied_instructions(code: Any) -> dict[int, int]:
    """Instructions of ``code`` that copy an earlier one: each offset inside such an
    instruction (its inline caches too) -> the same offset in the first copy.

    A copy has the same operation, argument and source position (line and columns, so
    two calls on one line differ), and so has every instruction before it back to where
    both leave that position's span: the whole expression up to the call was written
    twice. Two instructions of one expression that only share a span (the two
    comparisons of ``a < b < c``) differ in what comes before them, so they stay apart.
    Jumps compare by kind only: the copies jump to different places (``while``'s first
    test jumps out on false, the last one back on true). Needs column positions (Python
    3.11+); without them every instruction is its own place.
    """
    if not hasattr(code, "co_positions"):
        return {}
    import dis

    instrs = list(dis.get_instructions(code))
    sigs: list[Any] = []
    spans: list[Any] = []
    for ins in instrs:
        pos = ins.positions
        if pos is None or None in (pos.lineno, pos.end_lineno, pos.col_offset, pos.end_col_offset):
            spans.append(None)
        else:
            spans.append(((pos.lineno, pos.col_offset), (pos.end_lineno, pos.end_col_offset)))
        op = "JUMP" if "JUMP" in ins.opname else ins.opname
        sigs.append((op, None if op == "JUMP" else ins.arg, spans[-1]))
    seen: dict[Any, list[int]] = {}
    first = list(range(len(instrs)))  # index of each instruction's first copy
    out: dict[int, int] = {}
    ends = [ins.offset for ins in instrs[1:]] + [len(code.co_code)]
    for i, sig in enumerate(sigs):
        span = spans[i]
        earlier = seen.setdefault(sig, [])
        if span is not None:
            for j in earlier:
                if _same_prefix(sigs, spans, span, i, j):
                    first[i] = first[j]
                    # every offset inside the instruction: a frame running a call stops
                    # at its inline cache entries, past the instruction's own offset
                    start, to = instrs[i].offset, instrs[first[i]].offset
                    for o in range(start, ends[i]):
                        out[o] = to + o - start
                    break
        earlier.append(i)
    return out


def _same_prefix(sigs: list[Any], spans: list[Any], span: Any, i: int, j: int) -> bool:
    """Whether the instructions before ``i`` and ``j`` match back to where both leave ``span``."""
    lo, hi = span
    k = 1
    while True:
        a = i - k
        b = j - k
        sa = spans[a] if a >= 0 else None
        sb = spans[b] if b >= 0 else None
        in_a = sa is not None and lo <= sa[0] and sa[1] <= hi
        in_b = sb is not None and lo <= sb[0] and sb[1] <= hi
        if not in_a and not in_b:
            return True
        if in_a != in_b or sigs[a] != sigs[b]:
            return False
        k += 1
