"""Registry of scaling laws by the name users pass to ``--law``."""

from __future__ import annotations

from cellscale.fit.laws.base import Law
from cellscale.fit.laws.chinchilla import Chinchilla
from cellscale.fit.laws.data_constrained import DataConstrained
from cellscale.fit.laws.power import Power
from cellscale.fit.laws.power_floor import PowerFloor

LAWS: dict[str, Law] = {
    "power": Power(),
    "power-floor": PowerFloor(),
    "chinchilla": Chinchilla(),
    "data-constrained": DataConstrained(),
}

__all__ = ["LAWS", "Law", "Power", "PowerFloor", "Chinchilla", "DataConstrained"]
