"""Re-run a traced model on new inputs, saving activations by position in the op sequence.

The graph is not re-derived: a light mode counts recorded calls exactly as the recorder
does and keeps the outputs of the wanted ones, checking that the same callables run in
the same order (otherwise the input took another branch, and we say so).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..errors import GraphChangedError
from . import _funcs
from ._policy import make_policy
from ._tree import paths, tensors

if TYPE_CHECKING:
    from .trace import Activations, Trace


class _Replayer(TorchFunctionMode):
    def __init__(
        self, funcs: list[Any], labels: list[str], want: dict[int, int], transform, device
    ):
        super().__init__()
        self.funcs = funcs
        self.labels = labels
        self.want = want
        self.transform = transform
        self.device = device
        self.seq = 0
        self.saved: dict[int, Any] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        inner = _funcs.DECOMPOSE.get(func)
        if inner is not None:
            with self:
                return inner(*args, **kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, Tensor):
            outs = [out]
        elif isinstance(out, (tuple, list)):
            outs = tensors(out, [])
            if not outs:
                return out
        elif _funcs.func_info(func).readout and args and isinstance(args[0], Tensor):
            outs = []
        else:
            return out
        seq = self.seq
        self.seq += 1
        if seq >= len(self.funcs) or self.funcs[seq] is not func:
            expected = self.labels[seq] if seq < len(self.labels) else "the end of the forward"
            raise GraphChangedError(
                f"This input takes another path through the model: call #{seq + 1} was "
                f"{_funcs.op_name(func)} where the trace recorded {expected}. The model's "
                "control flow depends on the data; trace this input with lurker.trace() instead."
            )
        idx = self.want.get(seq)
        if idx is not None and outs:
            vals = []
            for o in outs:
                s = o.detach()
                if self.transform is not None:
                    s = self.transform(s)
                s = s.clone() if self.device is None else s.to(self.device, copy=True)
                vals.append(s)
            self.saved[idx] = vals[0] if len(vals) == 1 else tuple(vals)
        return out


def replay(trace: Trace, args: tuple, kwargs: dict, save: Any) -> Activations:
    from .trace import Activations

    if trace.model is None or not trace.complete:
        raise GraphChangedError("Only a complete trace can be re-run on new inputs.")
    calls = sorted((op for op in trace.ops if op.seq >= 0), key=lambda op: op.seq)
    funcs = [op._func for op in calls]
    labels = [op.label for op in calls]
    if save is None:
        chosen = [op for op in calls if op.activation is not None]
    else:
        policy = make_policy(save)
        chosen = [
            op
            for op in calls
            if policy.wants_op(op)
            or any(policy.wants_module(m.split(":")[0], None) for m in op.module_outputs)  # type: ignore[arg-type]
        ]
    want = {op.seq: op.index for op in chosen}
    rep = _Replayer(funcs, labels, want, trace._transform, None)
    with rep:
        output = trace.model(*args, **kwargs)
    if rep.seq != len(funcs):
        raise GraphChangedError(
            f"This input ran {rep.seq} ops where the trace recorded {len(funcs)}: the model's "
            "control flow depends on the data; trace this input with lurker.trace() instead."
        )
    values = dict(rep.saved)
    named = dict(paths(output, "output", []))
    for op in trace.ops:
        if op.kind == "output" and op.name in named:
            values[op.index] = named[op.name].detach()
    return Activations(trace, values, output)
