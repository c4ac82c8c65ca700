"""What counts as an op: one decision for the recorder and the replayer.

A replay finds the ops it wants by counting calls, so it must count exactly the calls the
recorder recorded. Both modes derive from :class:`OpMode`, which routes every
intercepted call (pass-throughs run plainly, composites are opened, ``for row in x``
becomes the ``unbind`` that yields the rows) and hands the rest to the mode's
``_op``; after the call, both ask :func:`produced` whether it made an op.
"""

from __future__ import annotations

from typing import Any

from torch import Size, Tensor
from torch.overrides import TorchFunctionMode

from ..ops import torch_funcs as _funcs
from ..ops.torch_funcs import FuncInfo
from ._tree import tensors

_PASSTHROUGH = _funcs.PASSTHROUGH
_INFO = _funcs.INFO
_DECOMPOSE = _funcs.DECOMPOSE
_TENSOR_ITER = Tensor.__iter__
_UNBIND = Tensor.unbind
# ``t.data = new``: no op, but it gives a parameter or buffer other values (see
# _set_data); a method-wrapper, new on every access and equal to this one
_SET_DATA = Tensor.data.__set__
_WRAPPER = type(_SET_DATA)
NO_KWARGS: dict[str, Any] = {}  # shared by calls without keywords: never mutated


class OpMode(TorchFunctionMode):
    """A torch function mode that sees a forward as lurker's ops.

    Subclasses implement ``_op(func, info, args, kwargs)`` for the calls that may be ops
    (``kwargs`` is :data:`NO_KWARGS` when the call has none).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _PASSTHROUGH:  # x.dim(), x.size(1): nothing to record
            return func(*args, **kwargs) if kwargs else func(*args)
        info = _INFO.get(func)
        if info is None:  # first call of this callable, or one handled specially
            inner = _DECOMPOSE.get(func)
            if inner is not None:
                with self:
                    return inner(*args, **(kwargs or {}))
            if func is _TENSOR_ITER:  # `for row in x`: the unbind that yields the rows
                return iter(self.__torch_function__(_UNBIND, types, (args[0],), {}))
            # `t.data = new`: never cached (as a pass-through), so seen on every call
            if type(func) is _WRAPPER and func == _SET_DATA:
                return self._set_data(func, args)
            info = _funcs.func_info(func)
        return self._op(func, info, args, kwargs or NO_KWARGS)

    def _op(self, func: Any, info: FuncInfo, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def _set_data(self, func: Any, args: tuple) -> None:
        """``t.data = new``: the recorder notes when a parameter, buffer or saved output
        is replaced; a replay only runs it."""
        func(*args)


def produced(
    func: Any, info: FuncInfo, out: Any, ins: list[Tensor], versions: list[int]
) -> tuple[list[Tensor], list[Tensor] | None, bool] | None:
    """What a call that ran made, which decides whether it is an op.

    Returns None for no op (a query such as ``x.shape``: no tensor out, none changed;
    learned as a pass-through unless it returned a container), else ``(outs, changed,
    by_mutation)``: the tensors it produced (``[]`` for a readout such as ``.item()``),
    the inputs whose version moved (None if none), and whether ``outs`` are such inputs
    because the call returned no tensor (``x[i] = v``).
    """
    if isinstance(out, Tensor):
        outs = [out]
    elif info.readout:  # before the list case: tolist() returns a list
        return [], None, False
    elif isinstance(out, (tuple, list)):
        outs = tensors(out, [])
    else:
        outs = []
    changed = None
    for j in range(len(ins)):
        if ins[j]._version != versions[j]:
            if changed is None:
                changed = []
            changed.append(ins[j])
    if outs:
        return outs, changed, False
    if changed is None:
        if out is not None and (type(out) is Size or not isinstance(out, (tuple, list, dict))):
            _PASSTHROUGH.add(func)  # a query: skip it from now on
        return None
    return changed[:1], changed, True  # x[i] = v: the op "produces" the mutated tensor
