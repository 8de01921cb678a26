import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from cellscale.config import DataConfig
from cellscale.data.build import build_dataset
from cellscale.data.preprocess import drop_empty_cells, library_size, select_genes
from cellscale.data.store import Dataset
from cellscale.errors import DataError


def _housekeeping_counts(n_cells=400, n_var=60, n_house=40, seed=0):
    """Variable genes plus many flat, heavily expressed 'housekeeping' genes whose counts
    vary a lot in total between cells: cutting to the variable genes first would change
    every cell's library size."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 3, size=n_cells)
    rates = rng.gamma(0.6, 2.0, size=(3, n_var))
    var_counts = rng.poisson(rates[group] * 3)
    house = rng.poisson(rng.uniform(20, 400, size=(n_cells, 1)) * np.ones((1, n_house)))
    # interleave so the kept genes are not a prefix
    X = np.empty((n_cells, n_var + n_house), dtype=np.float32)
    X[:, ::2][:, :n_house] = house
    rest = [j for j in range(n_var + n_house) if not (j % 2 == 0 and j // 2 < n_house)]
    X[:, rest] = var_counts
    return X, group


@pytest.fixture(scope="module")
def house_dataset(tmp_path_factory):
    import anndata as ad

    X, group = _housekeeping_counts()
    tmp = tmp_path_factory.mktemp("house")
    obs = pd.DataFrame({"batch": [f"b{g}" for g in group]}, index=[f"c{i}" for i in range(X.shape[0])])
    a = ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(X.shape[1])]))
    a.write_h5ad(tmp / "house.h5ad")
    cfg = DataConfig(source="h5ad", input=str(tmp / "house.h5ad"), genes=30, cells=400, seed=1)
    ds = Dataset.open(build_dataset(cfg, out=tmp / "ds", progress=False))
    return X, a, ds


def _rows(ds):
    return ds.obs["cell_id"].str[1:].astype(int).to_numpy()


def test_library_size_over_all_genes(house_dataset):
    X, _, ds = house_dataset
    rows = _rows(ds)
    full = X[rows].sum(axis=1)
    kept_idx = [int(g[1:]) for g in ds.genes]
    kept = X[rows][:, kept_idx].sum(axis=1)
    assert not np.allclose(full, kept)  # the case distinguishes the two answers
    assert ds.library_size.dtype == np.float64
    assert np.array_equal(ds.library_size, full.astype(np.float64))


def test_normalised_values_formula(house_dataset):
    X, _, ds = house_dataset
    rows = _rows(ds)
    kept_idx = [int(g[1:]) for g in ds.genes]
    C = X[rows][:, kept_idx].astype(np.float64)
    expected = np.log1p(C / X[rows].sum(axis=1, keepdims=True) * 1e4)
    assert ds.values.dtype == np.float32
    np.testing.assert_allclose(ds.values, expected, rtol=1e-6, atol=1e-6)
    assert np.array_equal(ds.counts, C.astype(np.int32))
    assert ds.counts.dtype == np.int32


def test_hvgs_equal_scanpy_on_training_cells(house_dataset):
    import scanpy as sc

    _, a, ds = house_dataset
    train_cells = ds.obs["cell_id"].to_numpy()[ds.splits["train"]]
    sub = a[train_cells].copy()
    sc.pp.highly_variable_genes(sub, flavor="seurat_v3", n_top_genes=30)
    expected = list(sub.var_names[sub.var["highly_variable"].to_numpy()])
    assert ds.genes == expected  # same set, in the original gene order
    assert ds.manifest["preprocessing"]["hvg_flavor"] == "seurat_v3"
    # and not the same as on all cells' counts or the first 30 genes
    assert ds.genes != [f"g{j}" for j in range(30)]


def test_hvgs_batch_aware_match_scanpy(house_dataset):
    import scanpy as sc

    _, a, _ = house_dataset
    train = np.arange(0, 400, 2)
    got = select_genes(a, n_top_genes=25, train_idx=train, batch_key="batch")
    sub = a[train].copy()
    sc.pp.highly_variable_genes(sub, flavor="seurat_v3", n_top_genes=25, batch_key="batch")
    assert np.array_equal(got, np.flatnonzero(sub.var["highly_variable"].to_numpy()))


def test_hvg_all_needs_all_genes(tiny_adata):
    assert np.array_equal(select_genes(tiny_adata, n_top_genes=200, train_idx=np.arange(100), flavor="all"), np.arange(200))
    with pytest.raises(DataError, match="'all' keeps every gene"):
        select_genes(tiny_adata, n_top_genes=50, train_idx=np.arange(100), flavor="all")
    with pytest.raises(DataError, match="only 200"):
        select_genes(tiny_adata, n_top_genes=201, train_idx=np.arange(100))


def test_drop_empty_cells_counts_them():
    X = sp.csr_matrix(np.array([[0, 0, 0], [1, 0, 2], [0, 0, 0], [0, 5, 0]], dtype=np.float32))
    a, n = drop_empty_cells(AnnData(X=X))
    assert n == 2 and a.n_obs == 2
    assert np.array_equal(library_size(a), [3.0, 5.0])
    with pytest.raises(DataError, match="all 2 cells have zero counts"):
        drop_empty_cells(AnnData(X=sp.csr_matrix((2, 3), dtype=np.float32)))


def test_build_records_dropped_cells(write_h5ad, tmp_path):
    from conftest import counts_matrix

    X = counts_matrix(60, 20, sparse=False)
    X[X.sum(1) == 0, 0] = 1
    X[[4, 9, 30]] = 0
    ds = Dataset.open(build_dataset(
        DataConfig(source="h5ad", input=str(write_h5ad(X)), genes=10, cells=57, hvg_flavor="variance"),
        out=tmp_path / "ds", progress=False,
    ))
    p = ds.manifest["preprocessing"]
    assert (p["n_loaded_cells"], p["n_empty_cells_dropped"], p["n_usable_cells"]) == (60, 3, 57)
    assert not {"c4", "c9", "c30"} & set(ds.obs["cell_id"])
    assert np.all(ds.library_size > 0)


def test_subsample_to_D_is_seeded(tiny_data_cfg, tmp_path):
    cfg = tiny_data_cfg.model_copy(update={"cells": 120})
    a = Dataset.open(build_dataset(cfg, out=tmp_path / "a", progress=False))
    b = Dataset.open(build_dataset(cfg, out=tmp_path / "b", progress=False))
    assert a.n_cells == 120 and a.manifest["preprocessing"]["subsampled"]
    assert list(a.obs["cell_id"]) == list(b.obs["cell_id"])
    assert np.array_equal(np.asarray(a.values), np.asarray(b.values))
    assert a.manifest["checksums"] == b.manifest["checksums"]
