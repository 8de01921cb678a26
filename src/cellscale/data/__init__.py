"""Data: sources -> QC/normalisation/HVG -> splits -> dataset dir -> batches.

The main entry points are importable from here (lazily, so ``import cellscale.data`` stays
cheap): ``build_dataset``, ``thin_dataset``, ``Dataset``, ``TrainBatches``, ``eval_batches``, ``make_splits``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "build_dataset": "cellscale.data.build",
    "load_source": "cellscale.data.build",
    "gene_mean_baseline": "cellscale.data.build",
    "thin_dataset": "cellscale.data.thin",
    "Dataset": "cellscale.data.store",
    "TrainBatches": "cellscale.data.loader",
    "eval_batches": "cellscale.data.loader",
    "make_splits": "cellscale.data.split",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cellscale.data' has no attribute {name!r}")
