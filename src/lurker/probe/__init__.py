"""Probe: sweep a dataset once and learn what every unit of every layer responds to.

``lurker.probe(model, dataset, out=...)`` runs :func:`lurker.probe.probe`: this package is
callable, so the function and its helpers (``lurker.probe.data``, ``UnitImages``) share
one name.
"""

import sys
import types

from .sweep import ProbeInterrupted, probe, select_layers
from .views import UnitImages

__all__ = ["ProbeInterrupted", "UnitImages", "probe", "select_layers"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return probe(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
