"""Large .h5ad files: read in row chunks (backed) and give the same dataset as in memory.

Chunks are made tiny here so that every step (validation, library sizes, seurat_v3
statistics, the column cut) runs over many chunks on a small file.
"""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellscale.data.sources.h5ad as h5ad_mod
from cellscale.config import DataConfig
from cellscale.data.build import build_dataset
from cellscale.data.preprocess import seurat_v3_genes_chunked
from cellscale.data.store import Dataset
from cellscale.errors import DataError


def _counts(n=500, g=120, seed=0):
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 3, size=n)
    rates = rng.gamma(0.4, 2.0, size=(3, g))
    X = rng.poisson(rates[group] * rng.gamma(2.0, 0.5, size=(n, 1))).astype(np.float32)
    X[[3, 50, 51]] = 0  # empty cells
    return X, np.array([f"b{k}" for k in group])


@pytest.fixture()
def small_chunks(monkeypatch):
    monkeypatch.setattr(h5ad_mod, "_CHUNK_NNZ", 997)
    monkeypatch.setattr(h5ad_mod, "_CHUNK_ROWS", 37)


@pytest.fixture()
def counts_file(tmp_path):
    X, batch = _counts()
    obs = pd.DataFrame({"batch": batch}, index=[f"c{i}" for i in range(X.shape[0])])
    path = tmp_path / "big.h5ad"
    ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(X.shape[1])])).write_h5ad(path)
    return path, X, batch


def _scanpy_genes(X, n_top, batch=None):
    import scanpy as sc

    a = ad.AnnData(X=sp.csr_matrix(X))
    if batch is not None:
        a.obs["b"] = batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=n_top, batch_key="b" if batch is not None else None, inplace=False)
    return np.flatnonzero(np.asarray(h["highly_variable"], dtype=bool))


@pytest.mark.parametrize("batched", [False, True])
def test_chunked_seurat_v3_equals_scanpy(batched):
    X, batch = _counts(n=700, g=200, seed=3)
    X = X[X.sum(1) > 0]
    batch = batch[: X.shape[0]] if batched else None
    M = sp.csr_matrix(X)

    def blocks():
        return (M[i : i + 64] for i in range(0, M.shape[0], 64))

    for V in (10, 50, 120):
        got = seurat_v3_genes_chunked(blocks, n_vars=X.shape[1], n_top_genes=V, batch_labels=batch)
        np.testing.assert_array_equal(got, _scanpy_genes(X, V, batch))


@pytest.mark.parametrize("extra", [{}, {"hvg_batch_key": "batch"}, {"hvg_flavor": "variance"}, {"split_by": "batch"}])
def test_backed_build_equals_in_memory(counts_file, tmp_path, monkeypatch, small_chunks, extra):
    path, X, _ = counts_file
    cfg = DataConfig(source="h5ad", input=str(path), genes=25, cells=400, seed=2, **extra)
    mem = Dataset.open(build_dataset(cfg, out=tmp_path / "mem", progress=False))
    monkeypatch.setattr(h5ad_mod, "BACKED_MIN_BYTES", 0)
    big = Dataset.open(build_dataset(cfg, out=tmp_path / "big", progress=False))
    assert big.manifest["source"]["read"].startswith("backed (csr")
    assert "read" not in mem.manifest["source"]
    assert big.genes == mem.genes
    for name in ("values.npy", "counts.npy", "library_size.npy", "splits.npz", "obs.parquet"):
        assert big.manifest["checksums"][name] == mem.manifest["checksums"][name], name
    assert big.manifest["preprocessing"] == mem.manifest["preprocessing"]
    rows = big.obs["cell_id"].str[1:].astype(int).to_numpy()
    np.testing.assert_array_equal(big.library_size, X[rows].sum(axis=1))


def test_backed_dense_and_layer(tmp_path, monkeypatch, small_chunks):
    X, _ = _counts(n=200, g=40, seed=5)
    path = tmp_path / "dense.h5ad"
    ad.AnnData(X=np.zeros_like(X), layers={"counts": X}).write_h5ad(path)
    monkeypatch.setattr(h5ad_mod, "BACKED_MIN_BYTES", 0)
    cfg = DataConfig(source="h5ad", input=str(path), layer="counts", genes=10, cells=150)
    ds = Dataset.open(build_dataset(cfg, out=tmp_path / "ds", progress=False))
    assert ds.manifest["source"]["read"] == "backed (dense, row chunks)"
    rows = ds.obs["cell_id"].astype(int).to_numpy()
    np.testing.assert_array_equal(ds.library_size, X[rows].sum(axis=1))
    with pytest.raises(DataError, match="no layer 'raw'"):
        build_dataset(cfg.model_copy(update={"layer": "raw"}), out=tmp_path / "x", progress=False)


def test_backed_validation_is_chunk_wise(tmp_path, monkeypatch, small_chunks):
    X, _ = _counts(n=300, g=30, seed=1)
    X[290, 7] = 0.5  # in a late chunk
    path = tmp_path / "frac.h5ad"
    ad.AnnData(X=sp.csr_matrix(X)).write_h5ad(path)
    monkeypatch.setattr(h5ad_mod, "BACKED_MIN_BYTES", 0)
    with pytest.raises(DataError, match="non-integer"):
        build_dataset(DataConfig(source="h5ad", input=str(path), genes=10, cells=100), out=tmp_path / "ds", progress=False)
    assert not (tmp_path / "ds").exists()


def test_csc_file_falls_back_to_memory(tmp_path, monkeypatch):
    X, _ = _counts(n=120, g=30, seed=2)
    path = tmp_path / "csc.h5ad"
    ad.AnnData(X=sp.csc_matrix(X)).write_h5ad(path)
    monkeypatch.setattr(h5ad_mod, "BACKED_MIN_BYTES", 0)
    src = h5ad_mod.open_h5ad(path)
    assert isinstance(src, ad.AnnData)
    ds = Dataset.open(build_dataset(DataConfig(source="h5ad", input=str(path), genes=10, cells=100),
                                    out=tmp_path / "ds", progress=False))
    assert json.loads((ds.path / "manifest.json").read_text())["D"] == 100
