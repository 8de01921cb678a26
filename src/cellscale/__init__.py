"""cellscale: scaling laws for masked-reconstruction transformers on single-cell data.

The Python API mirrors the command line; every name is loaded on first use, so
``import cellscale`` stays cheap (it does not import torch, scanpy or the data layer):

=====================================  ==========================================================
command line                           Python
=====================================  ==========================================================
``cellscale data build ...``           ``cellscale.build_dataset(DataConfig(...), out=...)``
``cellscale data info DIR``            ``cellscale.Dataset.open(DIR)`` (``.manifest``, ``.values``)
``cellscale data thin DIR ...``        ``cellscale.thin_dataset(DIR, fraction=F, out=...)``
``cellscale ladder``                   ``cellscale.ladder_table(n_genes)``
``cellscale train ...``                ``cellscale.train_run(dataset, get_size(...), TrainConfig(), out=...)``
``cellscale sweep CONFIG --out D``     ``cellscale.run_sweep(load_study_config(CONFIG), out=D)``
``cellscale fit RESULTS.csv``          ``cellscale.fit_csv(path)`` / ``cellscale.fit_table(df)``
``cellscale report D``                 ``cellscale.write_report(D)``
``cellscale run --preset NAME``        ``cellscale.run_study(resolve_config(preset=NAME), out=D)``
``cellscale embed RUN --input F ...``  ``cellscale.embed(adata, RUN)`` (``obsm``/``uns``, in memory)
=====================================  ==========================================================

The functions live in the submodules ``cellscale.train`` (``train_run``), ``cellscale.sweep``
(``run_sweep``), ``cellscale.fit`` (``fit_table``, ``fit_csv``), ``cellscale.report``
(``write_report``), ``cellscale.data`` (``build_dataset``, ``Dataset``) and
``cellscale.pipeline`` (``run_study``). Those submodules are reachable as attributes too
(``cellscale.fit.fit_table``); the module names are never rebound to functions, so
``cellscale.train`` is always the module and ``cellscale.train_run`` the function.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it (imported on first attribute access)
_EXPORTS = {
    "build_dataset": "cellscale.data.build",
    "thin_dataset": "cellscale.data.thin",
    "Dataset": "cellscale.data.store",
    "train_run": "cellscale.train",
    "run_sweep": "cellscale.sweep.study",
    "fit_table": "cellscale.fit.core",
    "fit_csv": "cellscale.fit.core",
    "FitResult": "cellscale.fit.result",
    "write_report": "cellscale.report.writer",
    "run_study": "cellscale.pipeline",
    "resolve_config": "cellscale.pipeline",
    "load_study_config": "cellscale.config",
    "parse_config": "cellscale.config",
    "list_presets": "cellscale.config",
    "StudyConfig": "cellscale.config",
    "DataConfig": "cellscale.config",
    "TrainConfig": "cellscale.config",
    "ladder_table": "cellscale.model.ladder",
    "get_size": "cellscale.model.ladder",
    "CellscaleError": "cellscale.errors",
    "embed": "cellscale.downstream.embedding",
    "RunModel": "cellscale.downstream.embedding",
}

# the names before 0.2 (a study's config was called RunConfig): cellscale.config resolves them, with a
# DeprecationWarning, on every use
_RENAMED = ("RunConfig", "load_run_config")

# submodules reachable as attributes without an explicit ``import cellscale.<name>``
_SUBMODULES = {"config", "data", "model", "train", "sweep", "fit", "report", "downstream", "pipeline", "rules",
               "runtime", "schema", "errors", "cli", "kernels"}

__all__ = [
    "CellscaleError",
    "DataConfig",
    "Dataset",
    "FitResult",
    "RunModel",
    "StudyConfig",
    "TrainConfig",
    "__version__",
    "build_dataset",
    "embed",
    "fit_csv",
    "fit_table",
    "get_size",
    "ladder_table",
    "list_presets",
    "load_study_config",
    "parse_config",
    "resolve_config",
    "run_study",
    "run_sweep",
    "thin_dataset",
    "train_run",
    "write_report",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value  # cache: later look-ups skip this hook
        return value
    if name in _RENAMED:
        return getattr(import_module("cellscale.config"), name)
    if name in _SUBMODULES:
        return import_module(f"cellscale.{name}")  # the import binds it on this package
    raise AttributeError(f"module 'cellscale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)
