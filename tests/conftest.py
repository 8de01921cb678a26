"""Shared tiny fixtures: a small simulated AnnData, an .h5ad writer and a built dataset."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellscale.config import DataConfig, SimulateConfig

TINY_SIM = SimulateConfig(n_genes=200, n_types=4, n_programs=2)


# -- optional extras (census, ray, tensorboard): .ci/run installs them all, so under CI a missing one
# is a failure; elsewhere the tests that need it are skipped


def ci_requires_extras() -> bool:
    """True where the environment variable CI is set: non-empty and not "0" or "false"."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def require(module: str) -> ModuleType:
    """``module``, imported; without it the calling test is skipped (``pytest.importorskip``'s
    way), or failed under CI (:func:`ci_requires_extras`), with a one-line reason. Inside a test
    or fixture; for a whole file, ``pytestmark = pytest.mark.needs("name", ...)`` (a module-level
    failure would be a collection error, which stops the whole session)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:  # the reason is raised outside the handler: no chained traceback
        first = (str(err).splitlines() or [type(err).__name__])[0]
    missing(f"optional module '{module}' is not installed ({first}); bash scripts/install.sh installs every extra")


def missing(why: str) -> None:
    """Something a test needs and .ci/run provides (an extra, Chromium, the shared reference) is
    absent: a failure under CI (:func:`ci_requires_extras`), a skip with ``why`` elsewhere."""
    if ci_requires_extras():
        pytest.fail(f"CI is set: {why}", pytrace=False)
    pytest.skip(why)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "needs(*modules): optional modules the test needs (conftest.require: "
                                       "skipped without them, failed under CI)")


def pytest_runtest_setup(item) -> None:
    for mark in item.iter_markers("needs"):
        for module in mark.args:
            require(module)


def pytest_sessionstart(session) -> None:
    """Build the fused CPU kernel (about a minute on a fresh machine, cached after) before any test,
    so that no test with a time limit, e.g. a CLI subprocess, pays for the build."""
    from cellscale import kernels

    kernels.available()


@pytest.fixture(scope="session")
def tiny_sim_cfg() -> SimulateConfig:
    return TINY_SIM


@pytest.fixture(scope="session")
def tiny_adata():
    """300 cells x 200 genes of simulated raw counts (do not modify: shared)."""
    from cellscale.data.sources.simulate import simulate

    return simulate(n_cells=300, cfg=TINY_SIM, seed=0)


@pytest.fixture(scope="session")
def tiny_data_cfg() -> DataConfig:
    return DataConfig(source="simulate", cells=300, genes=64, seed=0, simulate=TINY_SIM)


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory, tiny_data_cfg) -> Path:
    """A built dataset dir (300 cells, V=64: train 270, val 15, test 15). Read-only: shared."""
    from cellscale.data.build import build_dataset

    out = tmp_path_factory.mktemp("tiny") / "ds"
    return build_dataset(tiny_data_cfg, out=out, progress=False)


@pytest.fixture()
def write_h5ad(tmp_path):
    """write_h5ad(X, genes=None, name="x.h5ad", layers=None, obs=None) -> path of a new .h5ad."""

    def _write(X, *, genes=None, name="x.h5ad", layers=None, obs=None) -> Path:
        n_obs, n_vars = X.shape
        var = pd.DataFrame(index=pd.Index(genes if genes is not None else [f"g{i}" for i in range(n_vars)]))
        obs = obs if obs is not None else pd.DataFrame(index=pd.Index([f"c{i}" for i in range(n_obs)]))
        a = ad.AnnData(X=X, obs=obs, var=var, layers=layers or {})
        path = tmp_path / name
        a.write_h5ad(path)
        return path

    return _write


def counts_matrix(n_cells: int, n_genes: int, seed: int = 0, sparse: bool = True):
    """Random Poisson counts with gene-specific rates (a few genes dominate)."""
    rng = np.random.default_rng(seed)
    rates = rng.gamma(0.5, 2.0, size=n_genes)
    X = rng.poisson(rates * rng.gamma(2.0, 0.5, size=(n_cells, 1))).astype(np.float32)
    return sp.csr_matrix(X) if sparse else X


# -- the downstream tests (test_downstream.py, test_embed.py): a dataset with enough labelled
# cells to score a probe, and one small model trained on it (a few seconds, once per session)
PROBE_DATA = DataConfig(source="simulate", cells=800, genes=64, seed=0, simulate=TINY_SIM)
PROBE_MODEL = {"name": "P16", "d_model": 16, "n_layers": 1, "n_heads": 2, "ffn_ratio": 2}


def train_probe_run(dataset_dir: Path, out: Path, cells_seen: int) -> Path:
    from cellscale.config import ModelConfig, TrainConfig
    from cellscale.train import train_run

    train_run(dataset_dir, ModelConfig(**PROBE_MODEL),
              TrainConfig(cells_seen=cells_seen, batch_size=32, num_threads=1, device="cpu"), out=out)
    return out


@pytest.fixture(scope="session")
def probe_dataset_dir(tmp_path_factory) -> Path:
    """800 simulated cells x V=64, 4 cell types, 3 batches (train 720, val 40, test 40). Read-only: shared."""
    from cellscale.data.build import build_dataset

    return build_dataset(PROBE_DATA, out=tmp_path_factory.mktemp("probe") / "ds", progress=False)


@pytest.fixture(scope="session")
def trained_run_dir(tmp_path_factory, probe_dataset_dir) -> Path:
    """A model of d=16 trained on ``probe_dataset_dir`` for 8,000 cells. Read-only: shared."""
    return train_probe_run(probe_dataset_dir, tmp_path_factory.mktemp("probe-run") / "run", 8000)
