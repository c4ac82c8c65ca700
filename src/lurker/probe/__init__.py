"""Probe: sweep a dataset once and learn what every unit of every layer responds to."""

from .sweep import probe, select_layers
from .views import UnitImages

__all__ = ["UnitImages", "probe", "select_layers"]
