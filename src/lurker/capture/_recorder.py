"""The hot path: a ``TorchFunctionMode`` that records every tensor operation.

Design notes
- Scoped, not patched: torch function modes live on a per-thread stack, so a trace sees
  only its own thread's calls and nothing is left behind once the ``with`` block exits.
- Module calls are tracked with per-module hooks that check the recording thread, so two
  threads may trace (even the same model) at once.
- Per op we store only cheap facts (shapes, a weakref per output, a skeleton of the
  arguments); labels, passes, distances and FLOPs are derived afterwards.
- In-place ops: a saved activation that shares storage with a tensor about to be modified
  in place is cloned first, so every saved tensor keeps the value its op produced.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Callable
from time import perf_counter
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.overrides import TorchFunctionMode

from ..graph.nodes import ModuleInfo, Op, ParamRef, TensorMeta
from . import _funcs
from ._policy import SavePolicy
from ._tree import call_tensors, tensors

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_LURKER_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep
_CALL_IMPL = nn.Module._call_impl.__code__
_TENSOR_ITER = Tensor.__iter__
_USER, _TORCH_MODEL, _PLUMBING = 0, 1, 2
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
# (module paths, call frames) -> source line; call sites are few, so this is shared
_SOURCES: dict[tuple, str | None] = {}


def _kind_of(filename: str) -> int:
    """Is a frame's file the user's code, torch's model code (nn.Module forwards), or plumbing?"""
    r = _kind_cache.get(filename)
    if r is None:
        if (
            filename.startswith(_LURKER_DIR)
            or filename.startswith("<")
            or filename in _PLUMBING_FILES
        ):
            r = _PLUMBING
        elif filename.startswith(_TORCH_DIR):
            r = _TORCH_MODEL if "/nn/modules/" in filename else _PLUMBING
        else:
            r = _USER
        _kind_cache[filename] = r
    return r


class Recorder(TorchFunctionMode):
    """Records one forward pass. Use through :func:`lurker.trace`, not directly."""

    def __init__(
        self,
        model: nn.Module,
        *,
        save: SavePolicy,
        transform: Callable[[Tensor], Tensor] | None,
        device: torch.device | None,
        grads: bool,
    ):
        super().__init__()
        self.model = model
        self.save = save
        self.transform = transform
        self.device = device
        self.grads = grads
        self.tid = threading.get_ident()
        self.nodes: list[Op] = []
        self.seq = 0
        self.failed: Op | None = None
        # id(tensor) -> (weakref, node index, output index); weakrefs guard against id reuse
        self.producers: dict[int, tuple[Any, int, int]] = {}
        # storage pointer -> nodes whose saved activation aliases it (for in-place safety)
        self.aliases: dict[int, list[int]] = {}
        self.mutators: dict[int, int] = {}  # storage pointer -> last in-place op on it
        self.stale_hit = False
        self.params: dict[int, str] = {}
        self.param_shapes: dict[str, tuple[int, ...]] = {}
        self.buffers: dict[int, str] = {}
        self.buffer_nodes: dict[int, int] = {}
        self.constant_nodes: dict[int, int] = {}
        self.keys: dict[Any, list[int]] = {}  # rolling key -> [class number, passes so far]
        self.name_counts: dict[str, int] = {}
        # module bookkeeping
        self.stack: tuple[tuple[str, int], ...] = ()
        self.module_info: dict[str, ModuleInfo] = {}
        self.param_modules: set[str] = set()  # modules whose subtree holds parameters
        self.hooks: list[Any] = []
        self.active = False
        self._stack_seen: Any = None
        self._paths: tuple[str, ...] = ()
        self.fast_save = save.everything and transform is None and device is None and not grads

    # ------------------------------------------------------------------ module hooks
    def attach(self) -> None:
        """Index modules, parameters and buffers in one walk, then hook module calls."""
        self.paths: dict[int, str] = {}
        counts: dict[str, int] = {}
        infos = self.module_info
        for path, mod in self.model.named_modules():
            parent = path.rsplit(".", 1)[0] if "." in path else ("" if path else None)
            infos[path] = ModuleInfo(path=path, type=type(mod).__name__, parent=parent)
            if parent is not None and parent in infos:
                infos[parent].children.append(path)
            if path:  # the root's call is made by trace() itself
                self.paths[id(mod)] = path
            prefix = f"{path}." if path else ""
            for n, p in mod._parameters.items():
                if p is None or id(p) in self.params:
                    continue  # shared parameters keep their first name
                name = prefix + n
                self.params[id(p)] = name
                self.param_shapes[name] = tuple(p.shape)
                numel = p.numel()
                counts[""] = counts.get("", 0) + numel
                parts = path.split(".") if path else []
                for i in range(1, len(parts) + 1):
                    key = ".".join(parts[:i])
                    counts[key] = counts.get(key, 0) + numel
            for n, b in mod._buffers.items():
                if b is not None and id(b) not in self.buffers:
                    self.buffers[id(b)] = prefix + n
        for path, info in infos.items():
            info.num_params = counts.get(path, 0)
            if info.num_params:
                self.param_modules.add(path)
        # Four global hooks cost less than two per submodule; they ignore other threads
        # and modules outside this model, and are removed as soon as the trace ends.
        self.hooks.append(register_module_forward_pre_hook(self._pre_hook))
        self.hooks.append(register_module_forward_hook(self._post_hook, always_call=True))

    def detach(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    def _pre_hook(self, mod: nn.Module, args: Any) -> None:
        if not self.active or threading.get_ident() != self.tid:
            return
        path = self.paths.get(id(mod))
        if path is None:
            return
        info = self.module_info[path]
        info.num_passes += 1
        self.stack = (*self.stack, (path, info.num_passes))

    def _post_hook(self, mod: nn.Module, args: Any, output: Any) -> None:
        if not self.active or threading.get_ident() != self.tid:
            return
        path = self.paths.get(id(mod))
        if path is None or not self.stack or self.stack[-1][0] != path:
            return
        pass_num = self.stack[-1][1]
        self.stack = self.stack[:-1]
        produced: dict[int, dict[int, Tensor]] = {}
        for t in tensors(output, []):
            hit = self.producers.get(id(t))
            if hit is not None and hit[0]() is t:
                produced.setdefault(hit[1], {})[hit[2]] = t
        save = self.save
        for idx, outs in produced.items():
            node = self.nodes[idx]
            node.module_outputs.append((path, pass_num))  # named in postprocess
            if (
                save.saves_modules
                and node.activation is None
                and len(outs) == len(node.outputs)
                and save.wants_module(path, mod)
            ):
                self._store(node, [outs[k] for k in range(len(outs))])
        self.module_info[path].outputs[pass_num] = list(produced)

    # ------------------------------------------------------------------ sources
    def add_source_node(self, kind: str, name: str, t: Tensor) -> int:
        idx = len(self.nodes)
        node = Op(index=idx, kind=kind, name=name, modules=self.stack)
        node.outputs = [TensorMeta(tuple(t.shape), t.dtype, t.device, t.requires_grad)]
        self.nodes.append(node)
        self._register_output(t, idx, 0)
        self._maybe_save(node, [t])
        return idx

    def _resolve(self, t: Tensor) -> tuple[int, Any]:
        """Where does a tensor argument come from: (node, output) or (-1, param name)."""
        i = id(t)
        hit = self.producers.get(i)
        if hit is not None and hit[0]() is t:
            if hit[3] != t._version:  # changed since, through another view of its storage
                self.stale_hit = True
            return hit[1], hit[2]
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

    def _register_output(self, t: Tensor, idx: int, k: int) -> None:
        self.producers[id(t)] = (weakref.ref(t), idx, k, t._version)

    # ------------------------------------------------------------------ saving
    def _maybe_save(self, node: Op, outs: list[Tensor]) -> None:
        if self.grads:
            for k, o in enumerate(outs):
                if o.requires_grad:
                    o.register_hook(self._grad_hook(node, k, len(outs)))
        if self.save.wants_op(node):
            self._store(node, outs)

    def _store(self, node: Op, outs: list[Tensor]) -> None:
        saved = []
        for o in outs:
            s = o.detach()
            if self.transform is not None:
                s = self.transform(s)
            elif self.device is None:
                ptr = o.untyped_storage().data_ptr()
                self.aliases.setdefault(ptr, []).append(node.index)
            if self.device is not None:
                s = s.to(self.device, copy=True)
            saved.append(s)
        node.activation = saved[0] if len(saved) == 1 else tuple(saved)

    def _grad_hook(self, node: Op, k: int, n: int) -> Callable[[Tensor], None]:
        def hook(g: Tensor) -> None:
            g = g.detach()
            if self.transform is not None:
                g = self.transform(g)
            if self.device is not None:
                g = g.to(self.device)
            if n == 1:
                node.grad = g if node.grad is None else node.grad + g
            else:
                grads = list(node.grad) if node.grad is not None else [None] * n
                grads[k] = g if grads[k] is None else grads[k] + g
                node.grad = tuple(grads)

        return hook

    def _protect(self, t: Tensor) -> None:
        """Clone saved activations that alias ``t`` before ``t`` is modified in place."""
        ptr = t.untyped_storage().data_ptr()
        idxs = self.aliases.pop(ptr, None)
        if not idxs:
            return
        for i in idxs:
            node = self.nodes[i]
            a = node.activation
            node.activation = tuple(x.clone() for x in a) if isinstance(a, tuple) else a.clone()

    def _mark_stale(self, t: Tensor) -> None:
        """An op we did not expect to be in-place modified ``t``: saved copies are wrong."""
        for i in self.aliases.pop(t.untyped_storage().data_ptr(), []):
            self.nodes[i].stale = True

    # ------------------------------------------------------------------ the op hook
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if func in _funcs.PASSTHROUGH:  # x.shape, x.dim(), x.size(1): nothing to record
            return func(*args, **kwargs)
        inner = _funcs.DECOMPOSE.get(func)
        if inner is not None:
            with self:
                return inner(*args, **kwargs)
        if func is _TENSOR_ITER:  # `for row in x`: record the unbind that yields the rows
            return iter(self.__torch_function__(Tensor.unbind, types, (args[0],), {}))
        info = _funcs.func_info(func)
        ins = call_tensors(args, kwargs)
        # resolve before running: a buffer or constant first met by an in-place op must be
        # saved with the value it had going in
        inputs = [self._resolve(t) for t in ins]
        snaps = self._snapshots(ins) if self.stale_hit else None
        inplace = (
            info.inplace_first or kwargs.get("inplace") is True or (kwargs.get("out") is not None)
        )
        if inplace and self.aliases:
            if kwargs.get("out") is not None:
                for t in tensors(kwargs["out"], []):
                    self._protect(t)
            elif ins:
                self._protect(ins[0])
        if info.name in ("batch_norm", "instance_norm") and self.aliases:
            for t in _funcs.mutated_buffers(info, args, kwargs):
                self._protect(t)
        versions = [t._version for t in ins]
        t0 = perf_counter()
        try:
            out = func(*args, **kwargs)
        except BaseException:
            self._record_failure(func, info, inputs, args, kwargs)
            raise
        dt = perf_counter() - t0

        if isinstance(out, Tensor):
            outs = [out]
        elif info.readout:  # before the list case: tolist() returns a list
            self._record(func, info, inputs, args, kwargs, [], dt, "readout", out)
            return out
        elif isinstance(out, (tuple, list)):
            outs = tensors(out, [])
        else:
            outs = []
        changed = [t for t, v in zip(ins, versions) if t._version != v]
        if not outs:
            if not changed:
                if out is not None and not isinstance(out, (tuple, list, dict)):
                    _funcs.PASSTHROUGH.add(func)  # a query: skip it from now on
                return out
            outs = changed[:1]  # x[i] = v and friends: the op "produces" the mutated tensor
            inplace = True
        if changed and not inplace:  # an in-place op we did not foresee: saved copies are off
            for t in changed:
                self._mark_stale(t)
            inplace = True
        node = self._record(func, info, inputs, args, kwargs, outs, dt, None, None)
        node.inplace = inplace
        if inplace:
            self.mutators[outs[0].untyped_storage().data_ptr()] = node.index
        if snaps:
            self._link_mutators(node, ins, snaps)
        return out

    def _snapshots(self, ins: list[Tensor]) -> dict[int, Tensor]:
        """Inputs modified through another view since their op produced them.

        Their producer's saved value is not what this op reads, so we keep what it reads.
        """
        self.stale_hit = False
        snaps = {}
        for j, t in enumerate(ins):
            hit = self.producers.get(id(t))
            if hit is not None and hit[0]() is t and hit[3] != t._version:
                snaps[j] = t.detach().clone()
        return snaps

    def _link_mutators(self, node: Op, ins: list[Tensor], snaps: dict[int, Tensor]) -> None:
        node._snapshots = snaps
        for j in snaps:
            m = self.mutators.get(ins[j].untyped_storage().data_ptr())
            if m is not None and m not in node.parents and m != node.index:
                node.parents.append(m)
                self.nodes[m].children.append(node.index)

    def _record(self, func, info, inputs, args, kwargs, outs, dt, kind, value) -> Op:
        idx = len(self.nodes)
        parents = []
        params = []
        for src, what in inputs:
            if src >= 0:
                if src not in parents:
                    parents.append(src)
            elif not any(p.name == what for p in params):
                params.append(ParamRef(what, self.param_shapes[what]))
        if kind is None:
            kind = "op" if parents or params else "generated"
        stack = self.stack
        if stack is not self._stack_seen:  # module paths without passes, per stack change
            self._stack_seen = stack
            self._paths = tuple(p for p, _ in stack)
        paths = self._paths
        frames = self._frames(stack)
        key = (
            (info.name, paths, frames, *[p.name for p in params])
            if params
            else (info.name, paths, frames)
        )
        entry = self.keys.get(key)
        if entry is None:  # first time at this place: number the layer, find its source
            n = self.name_counts.get(info.name, 0) + 1
            self.name_counts[info.name] = n
            where = (paths, frames)
            source = _SOURCES.get(where)
            if source is None:
                source = _SOURCES[where] = self._source(len(stack))
                if len(_SOURCES) > 200_000:  # a bound, not a policy: call sites are few
                    _SOURCES.clear()
            entry = self.keys[key] = [n, 0, f"{info.name}_{n}", source]
        entry[1] += 1
        label = entry[2]
        source = entry[3]
        node = Op(idx, kind, info.name, label, label, entry[1], 1, stack)
        node.parents = parents
        node.params = params
        node.time = dt
        node.source = source
        node.random = (info.random or info.dropout) and _funcs.is_random_call(info, args, kwargs)
        node.value = value
        node.seq = self.seq
        node._func = func
        node._inputs = inputs
        node._key = key
        self.seq += 1
        new_meta = tuple.__new__  # TensorMeta is a NamedTuple: skip its Python __new__
        node.outputs = [
            new_meta(TensorMeta, (tuple(o.shape), o.dtype, o.device, o.requires_grad)) for o in outs
        ]
        self.nodes.append(node)
        nodes = self.nodes
        for p in parents:
            nodes[p].children.append(idx)
        producers = self.producers
        for k, o in enumerate(outs):
            producers[id(o)] = (weakref.ref(o), idx, k, o._version)
        if outs:
            if self.fast_save and len(outs) == 1:  # the default: keep every output as is
                o = outs[0]
                node.activation = o.detach() if o.requires_grad else o
                self.aliases.setdefault(o.untyped_storage().data_ptr(), []).append(idx)
            else:
                self._maybe_save(node, outs)
        if node.activation is not None or self.save.everything:
            # raw call arguments (validation swaps in saved tensors); lists are copied
            # because models keep appending to them (DenseNet's torch.cat(features))
            if any(type(a) is list for a in args):
                args = tuple(list(a) if type(a) is list else a for a in args)
            if kwargs and any(type(v) is list for v in kwargs.values()):
                kwargs = {k: list(v) if type(v) is list else v for k, v in kwargs.items()}
            node._skel_args = args
            node._skel_kwargs = kwargs
        return node

    def _record_failure(self, func, info, inputs, args, kwargs) -> None:
        if self.failed is None:
            node = self._record(func, info, inputs, args, kwargs, [], 0.0, None, None)
            node.kind = "failed"
            self.failed = node

    def _frames(self, stack: tuple[tuple[str, int], ...]) -> tuple:
        """The call frames that identify an op within its layer.

        They are taken up to the call of the innermost enclosing module that holds
        parameters: ops repeated at the same place inside such a module (or in a loop of
        the model's forward) are passes of one layer; a parameter-free module reused at
        different places (ResNet's shared ReLU) is not a loop. Each frame is (code id,
        bytecode offset): a loop repeats one call instruction, while two calls on one line
        are two instructions; ids hash fast.
        """
        climb = 0  # module calls to climb: up to the innermost one with parameters
        for path, _ in reversed(stack):
            if path in self.param_modules:
                break
            climb += 1
        f = sys._getframe(2)  # the caller of __torch_function__'s caller
        frames = []
        crossed = 0
        while f is not None:
            code = f.f_code
            if code is _CALL_IMPL:
                crossed += 1
                if crossed > climb:
                    break
            elif not code.co_filename.startswith(_LURKER_DIR):
                frames.append((id(code), f.f_lasti))
            f = f.f_back
        return tuple(frames)

    def _source(self, depth: int) -> str | None:
        """``file:line`` of the model code that made the call: the innermost frame of user
        code (or else of torch's own module code) within the model's call. Cached by the
        caller per call site, so this walk happens once per place in the code.
        """
        f = sys._getframe(2)
        fallback = None
        crossed = 0
        while f is not None:
            code = f.f_code
            if code is _CALL_IMPL:
                crossed += 1
                if crossed > depth:  # the model's own call: never look above it
                    break
            else:
                where = _kind_of(code.co_filename)
                if where == _USER:
                    return f"{code.co_filename}:{f.f_lineno}"
                if where == _TORCH_MODEL and fallback is None:
                    fallback = f"{code.co_filename}:{f.f_lineno}"
            f = f.f_back
        return fallback
