"""Scaling-law fitting: laws, methods, grouped bootstrap, entropy, compute-optimal answers.

Imports numpy, scipy and pandas only, so it runs on any machine that has a results table. The names
below load on first use (as the top-level ``cellscale`` does), so that reading the fit's defaults
(``cellscale.fit.defaults``, stdlib only) does not load the fitting machinery.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# name -> module that defines it
_EXPORTS = {
    "fit_table": "cellscale.fit.core", "fit_csv": "cellscale.fit.core", "FitResult": "cellscale.fit.result",
    "LAWS": "cellscale.fit.laws", "METHODS": "cellscale.fit.methods",
    "entropy_bits": "cellscale.fit.entropy", "entropy_bits_per_gene": "cellscale.fit.entropy",
    "simulate_table": "cellscale.fit.simulate", "simulate_branches": "cellscale.fit.simulate",
    "fit_data_axis": "cellscale.fit.data_axis", "predict_json": "cellscale.fit.data_axis",
    "DataAxisFit": "cellscale.fit.data_axis",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cellscale.fit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
