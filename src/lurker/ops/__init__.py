"""The op catalogue: what lurker knows about torch ops, in one place.

:mod:`lurker.ops.catalogue` is torch-free and keyed by op name (parameters in torch's
order, in-place, random, FLOPs rules), so graph analyses read it without torch;
:mod:`lurker.ops.torch_funcs` maps torch callables onto it and is imported by capture/
only.
"""

from .catalogue import SPECS, OpSpec, Param, bind, flops, spec

__all__ = ["SPECS", "OpSpec", "Param", "bind", "flops", "spec"]
