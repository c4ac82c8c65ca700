"""Re-run a traced model on new inputs and hand the outputs of chosen ops to hooks.

The graph is not re-derived: a light mode counts recorded calls exactly as the recorder
does and passes the outputs of the hooked ones to their hooks (which may replace them),
checking that the same callables run in the same order (otherwise the input took another
branch, or the model's hooks changed, and we say which). ``Trace.run`` is built on it,
and through it the probe's sweep and unit images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import GraphChangedError
from ..ops import torch_funcs as _funcs
from . import _hooks
from ._hooks import Resolved
from ._mode import OpMode, produced
from ._policy import make_policy
from ._tree import call_tensors, paths, tensors

if TYPE_CHECKING:
    from ..graph.nodes import Op
    from .trace import Activations, Trace


class Replayer(OpMode):
    """Calls each hooked op's hooks with its live output; what they return replaces it."""

    def __init__(self, trace: Trace, hooks: Resolved):
        super().__init__()
        cached = trace.__dict__.get("_replay_calls")
        if cached is None:  # a trace's ops never change: sorted once, not per run
            calls = sorted((op for op in trace.ops if op.seq >= 0), key=lambda op: op.seq)
            cached = ([op._func for op in calls], [op.label for op in calls])
            trace.__dict__["_replay_calls"] = cached
        self.funcs, self.labels = cached
        ops = trace.ops
        self.hooks = {ops[i].seq: (ops[i], fns) for i, fns in hooks.items() if ops[i].seq >= 0}
        self.seq = 0
        self.trace = trace
        self.call: tuple[tuple, dict] = ((), {})  # the inputs of the forward being run

    def _op(self, func: Any, info: _funcs.FuncInfo, args: tuple, kwargs: dict) -> Any:
        """Count one call that may be an op (:class:`OpMode` routed it here, as it does
        for the recorder) and hand its output to its hooks, if it has any."""
        ins = call_tensors(args, kwargs)
        versions = [t._version for t in ins]
        out = func(*args, **kwargs) if kwargs else func(*args)
        made = produced(func, info, out, ins, versions)  # the recorder asks the same
        if made is None:
            return out
        outs = made[0]
        seq = self._count(func)
        if not outs:  # a readout: a value, nothing to hook
            return out
        hooked = self.hooks.get(seq)
        if hooked is None:
            return out
        # in place: the output is an input the call modified (returned, or not: x[i] = v)
        inplace = any(outs[0] is t and t._version != v for t, v in zip(ins, versions))
        return _hooks.call(hooked[0], hooked[1], out, outs, inplace)

    def _count(self, func: Any) -> int:
        seq = self.seq
        self.seq += 1
        if seq >= len(self.funcs) or not _same(self.funcs[seq], func):
            expected = self.labels[seq] if seq < len(self.labels) else "the end of the forward"
            raise GraphChangedError(
                f"This input takes another path through the model: call #{seq + 1} was "
                f"{_funcs.op_name(func)} where the trace recorded {expected}. {self._why()}"
            )
        return seq

    def _why(self) -> str:
        """Why the path changed: the model's hooks, its own state, or the data."""
        hooks = _hooks.hook_changes(self.trace)
        if hooks:
            listed = "; ".join(hooks[:3]) + (
                f" and {len(hooks) - 3} more" if len(hooks) > 3 else ""
            )
            return (
                f"The model's hooks changed since the trace: {listed}. A forward runs the "
                "ops of the model's hooks, so it no longer runs the traced ones. Trace the "
                "model again with the hooks it will run with (lurker.trace(model, x)), or "
                "undo the change."
            )
        grad = torch.is_grad_enabled()
        traced = self.trace._rng
        if traced is not None and grad != traced.grad and _hooks.has_backward_hooks(self.trace):
            return (
                "The model has backward hooks, whose forward ops run only while autograd "
                f"records: the trace ran with grad {'on' if traced.grad else 'off'}, this "
                f"forward with grad {'on' if grad else 'off'}. Run it in the trace's grad "
                "mode (torch.no_grad() / torch.enable_grad()), or trace it in this one."
            )
        changes = self.trace._state.lines
        if changes:
            listed = ", ".join(changes[:3]) + (
                f" and {len(changes) - 3} more" if len(changes) > 3 else ""
            )
            return (
                f"The model changed its own state while it was traced ({listed}), so later "
                "forwards run other ops than the traced one: the graph depends on the model's "
                "state, not on the data. Trace the model again now that its state has settled "
                "(lurker.trace(model, x)): that trace records the ops its forwards now run."
            )
        if _same_inputs(self.call, self.trace._inputs):
            return (
                "This is the input the trace was made with, so the path depends on the model's "
                "state (attributes or caches changed since the trace, e.g. by train()/eval() or "
                "another forward) or on random numbers, not on the data. Trace the model again "
                "in the state you will run it in."
            )
        return (
            "The model's control flow depends on the data; trace this input with "
            "lurker.trace() instead."
        )

    def run(self, model: Any, args: tuple, kwargs: dict) -> Any:
        """One forward of ``model`` under this mode."""
        self.seq = 0
        self.call = (args, kwargs)
        with self:
            output = model(*args, **kwargs)
        self.finish()
        return output

    def finish(self) -> None:
        try:
            if self.seq != len(self.funcs):
                raise GraphChangedError(
                    f"This input ran {self.seq} ops where the trace recorded "
                    f"{len(self.funcs)}. {self._why()}"
                )
        finally:
            self.call = ((), {})  # (kept for the messages only: not the batch after it ran)


_same = _funcs.same_callable


def _same_inputs(a: tuple[tuple, dict], b: tuple[tuple, dict]) -> bool:
    """Whether two calls' arguments hold equal tensors in the same places."""
    ta, tb = tensors(a, []), tensors(b, [])
    if len(ta) != len(tb) or not ta:
        return False
    for x, y in zip(ta, tb):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if not torch.equal(x.detach(), y.detach().to(x.device)):
            return False
    return True


def chosen_ops(trace: Trace, save: Any) -> list[Op]:
    """The ops ``save=`` selects (default: those this trace saved)."""
    if save is False or save == "none":
        return []
    calls = [op for op in trace.ops if op.seq >= 0]
    if save is None:
        return [op for op in calls if op.activation is not None]
    policy = make_policy(save)
    modules = dict(trace.model.named_modules()) if trace.model is not None else {}

    def wanted_module(name: str) -> bool:
        path = name.split(":")[0]
        return path in modules and policy.wants_module(path, modules[path])

    return [
        op
        for op in calls
        if policy.wants_op(op) or any(wanted_module(m) for m in op.module_outputs)
    ]


def replay(trace: Trace, args: tuple, kwargs: dict, save: Any, hooks: Resolved) -> Activations:
    """Run the traced model on new inputs with ``hooks``; save what ``save`` selects
    (after the hooks: the values the rest of the forward used)."""
    from .trace import Activations

    if trace.model is None or not trace.complete:
        raise GraphChangedError("Only a complete trace can be re-run on new inputs.")
    transform = trace._transform
    values: dict[int, Any] = {}

    def keep(op: Op, value: Any) -> None:
        def one(t: Tensor) -> Tensor:
            t = t.detach()
            return transform(t) if transform is not None else t.clone()

        values[op.index] = tuple(one(t) for t in value) if isinstance(value, tuple) else one(value)

    chosen = chosen_ops(trace, save)
    if chosen:
        hooks = {i: list(fns) for i, fns in hooks.items()}  # (the caller's stay as they are)
        for op in chosen:
            hooks.setdefault(op.index, []).append(keep)
    output = Replayer(trace, hooks).run(trace.model, args, kwargs)
    named = dict(paths(output, "output", []))
    for op in trace.ops:
        if op.kind == "output" and op.name in named:
            values[op.index] = named[op.name].detach()
    return Activations(trace, values, output)
