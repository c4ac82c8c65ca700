"""Re-run a traced model on new inputs and hand over the outputs of chosen ops.

The graph is not re-derived: a light mode counts recorded calls exactly as the recorder
does and passes the outputs of the wanted ones to a callback, checking that the same
callables run in the same order (otherwise the input took another branch, and we say so).
This is what ``Trace.run`` and the probe's sweep are built on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..errors import GraphChangedError
from . import _funcs
from ._policy import make_policy
from ._tree import call_tensors, paths, tensors

if TYPE_CHECKING:
    from ..graph.nodes import Op
    from .trace import Activations, Trace

OnOutput = Callable[[int, Any], None]  # (node index, tensor or tuple of tensors)


class Replayer(TorchFunctionMode):
    """Calls ``on_output(node_index, value)`` for the wanted ops, with live tensors."""

    def __init__(self, trace: Trace, want: Iterable[int], on_output: OnOutput):
        super().__init__()
        cached = trace.__dict__.get("_replay_calls")
        if cached is None:  # a trace's ops never change: sorted once, not per run
            calls = sorted((op for op in trace.ops if op.seq >= 0), key=lambda op: op.seq)
            cached = ([op._func for op in calls], [op.label for op in calls])
            trace.__dict__["_replay_calls"] = cached
        self.funcs, self.labels = cached
        self.want = {trace.ops[i].seq: i for i in want if trace.ops[i].seq >= 0}
        self.on_output = on_output
        self.seq = 0
        self.trace = trace
        self.call: tuple[tuple, dict] = ((), {})  # the inputs of the forward being run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if func in _funcs.PASSTHROUGH:
            return func(*args, **kwargs)
        inner = _funcs.DECOMPOSE.get(func)
        if inner is not None:
            with self:
                return inner(*args, **kwargs)
        if func is Tensor.__iter__:  # mirror the recorder: rows come from a recorded unbind
            return iter(self.__torch_function__(Tensor.unbind, types, (args[0],), {}))
        ins = call_tensors(args, kwargs)
        versions = [t._version for t in ins]
        out = func(*args, **kwargs)
        if isinstance(out, Tensor):
            outs = [out]
        elif _funcs.func_info(func).readout:  # before the list case: tolist() returns a list
            self._count(func)
            return out
        elif isinstance(out, (tuple, list)):
            outs = tensors(out, [])
        else:
            outs = []
        if not outs:
            outs = [t for t, v in zip(ins, versions) if t._version != v][:1]
            if not outs:
                return out
        seq = self._count(func)
        idx = self.want.get(seq)
        if idx is not None and outs:
            self.on_output(idx, outs[0] if len(outs) == 1 else tuple(outs))
        return out

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
        """Why the path changed: the model's own state, or the data."""
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

    def run(self, model: Any, args: tuple, kwargs: dict, on_output: OnOutput | None = None) -> Any:
        """One forward of ``model`` under this mode (reusable: a sweep makes one Replayer)."""
        if on_output is not None:
            self.on_output = on_output
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


def run_with(
    trace: Trace, args: tuple, kwargs: dict, want: Iterable[int], on_output: OnOutput
) -> Any:
    """Run the traced model on new inputs, calling ``on_output`` for the wanted ops."""
    if trace.model is None or not trace.complete:
        raise GraphChangedError("Only a complete trace can be re-run on new inputs.")
    return Replayer(trace, want, on_output).run(trace.model, args, kwargs)


def chosen_ops(trace: Trace, save: Any) -> list[Op]:
    """The ops ``save=`` selects (default: those this trace saved)."""
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


def replay(trace: Trace, args: tuple, kwargs: dict, save: Any) -> Activations:
    from .trace import Activations

    transform = trace._transform
    values: dict[int, Any] = {}

    def keep(idx: int, value: Any) -> None:
        def one(t: Tensor) -> Tensor:
            t = t.detach()
            return transform(t) if transform is not None else t.clone()

        values[idx] = tuple(one(t) for t in value) if isinstance(value, tuple) else one(value)

    output = run_with(trace, args, kwargs, [op.index for op in chosen_ops(trace, save)], keep)
    named = dict(paths(output, "output", []))
    for op in trace.ops:
        if op.kind == "output" and op.name in named:
            values[op.index] = named[op.name].detach()
    return Activations(trace, values, output)
