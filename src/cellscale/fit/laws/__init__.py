"""Registry of scaling laws by the name users pass to ``--law``."""

from __future__ import annotations

from cellscale.fit.defaults import LAW_NAMES
from cellscale.fit.laws.base import Law
from cellscale.fit.laws.chinchilla import Chinchilla
from cellscale.fit.laws.data_constrained import DataConstrained
from cellscale.fit.laws.power import Power
from cellscale.fit.laws.power_floor import PowerFloor

# by name, in the order of cellscale.fit.defaults.LAW_NAMES (where the command line reads the names)
LAWS: dict[str, Law] = dict(zip(LAW_NAMES, (Power(), PowerFloor(), Chinchilla(), DataConstrained())))

__all__ = ["LAWS", "Law", "Power", "PowerFloor", "Chinchilla", "DataConstrained"]
