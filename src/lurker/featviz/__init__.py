"""Feature visualization: images optimized to excite a layer's units (Lucid / Microscope).

``lurker.featviz(model, layer, units=None, ...)`` runs :func:`lurker.featviz.featviz`:
this package is callable, so the function and its parts (``lurker.featviz.param``,
``lurker.featviz.transforms``) share one name. See docs/featviz.md.
"""

import sys
import types

from .core import OBJECTIVES, PARAMS, FeatViz, featviz
from .param import FourierImage, MacoImage, color_matrix, spectrum_scale
from .transforms import Transforms

__all__ = [
    "OBJECTIVES",
    "PARAMS",
    "FeatViz",
    "FourierImage",
    "MacoImage",
    "Transforms",
    "color_matrix",
    "featviz",
    "spectrum_scale",
]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return featviz(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
