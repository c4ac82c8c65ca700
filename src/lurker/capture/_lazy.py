"""Lazy modules (``nn.LazyLinear``, ``nn.LazyConv2d``) traced on their first forward.

Their first call runs a forward pre-hook that materializes the parameters (``empty``,
``kaiming_uniform_``, ...) from the input's shape, removes itself and turns the module
into its plain class. Those ops are set-up, not what the model computes: recorded, they
made a graph that no later forward runs (a replay failed on it) and ops that read the
parameters' empty placeholder (validation failed on them). So the recorder does not see
the hook (it runs with torch function modes off), and afterwards the trace takes the
parameters' materialized shapes and the modules' new classes from the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..graph.nodes import ParamRef
from . import _context
from ._recorder import Recorder, _model_index


class LazyInits:
    """The init pre-hooks of a model's lazy modules, wrapped for one traced forward."""

    def __init__(self, rec: Recorder, lazy: list[tuple[str, nn.Module]]) -> None:
        self.rec = rec
        self.wrapped: list[tuple[dict, int, Any]] = []  # (hook dict, handle id, original)
        # (path, number of ops recorded before it, RNG state after it), per materialization
        self.done: list[tuple[str, int, Any]] = []
        for path, mod in lazy:
            hooks = mod._forward_pre_hooks
            hid = mod._initialize_hook.id
            orig = hooks.get(hid)
            if orig is None:
                continue
            hooks[hid] = self._wrap(path, orig)
            self.wrapped.append((hooks, hid, orig))

    def _wrap(self, path: str, orig: Any) -> Any:
        def unrecorded_init(module: nn.Module, args: Any, kwargs: Any = None) -> Any:
            with torch._C.DisableTorchFunction():  # the recorder does not see set-up ops
                out = orig(module, args, kwargs)
            self.done.append((path, len(self.rec.nodes), _context.rng_state()))
            return out

        return unrecorded_init

    def restore(self) -> None:
        """Put the original hooks back where they still are (the forward failed before
        the module's first call; a hook that ran removed itself)."""
        for hooks, hid, orig in self.wrapped:
            if hid in hooks:
                hooks[hid] = orig
        self.wrapped = []

    def random_before(self) -> bool:
        """Whether an op that draws random numbers ran before the last materialization,
        which drew random numbers too (the parameters' initial values)."""
        if not self.done:
            return False
        last = self.done[-1][1]
        return any(op.random for op in self.rec.nodes[:last])

    def update(self, rec: Recorder) -> None:
        """After the forward: the recorder's parameter shapes and references, and its
        modules' types and parameter counts, from the materialized model."""
        idx = _model_index(rec.model)  # rebuilt: the parameter shapes changed
        rec.index = idx
        rec.param_shapes = idx.param_shapes
        rec.param_refs = idx.param_refs
        rec.param_modules = idx.param_modules
        for path, type_name, _parent, _children, num_params in idx.rows:
            info = rec.module_info.get(path)
            if info is not None:
                info.type = type_name
                info.num_params = num_params
        refs = idx.param_refs
        for node in rec.nodes:
            if node.params:
                node.params = [refs.get(r.name, r) for r in node.params]
            if node._skel_args is None and node._args:  # a skeleton made during the forward
                node._args = _swap(node._args, refs)
                node._kwargs = _swap(node._kwargs, refs)


def _swap(obj: Any, refs: dict[str, ParamRef]) -> Any:
    """``obj`` with each :class:`ParamRef` replaced by the one of that name in ``refs``."""
    if type(obj) is ParamRef:
        return refs.get(obj.name, obj)
    if isinstance(obj, list):
        return [_swap(o, refs) for o in obj]
    if isinstance(obj, tuple) and type(obj) is tuple:
        return tuple([_swap(o, refs) for o in obj])
    if isinstance(obj, dict):
        return {k: _swap(v, refs) for k, v in obj.items()}
    return obj
