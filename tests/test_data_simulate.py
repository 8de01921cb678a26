import numpy as np
import scipy.sparse as sp

from cellscale.config import SimulateConfig
from cellscale.data.sources.simulate import simulate


def test_shape_types_and_obs(tiny_adata):
    a = tiny_adata
    assert a.shape == (300, 200)
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.int32
    assert a.X.data.min() >= 0
    for col in ("cell_type", "dataset_id", "donor_id"):
        assert col in a.obs
    assert a.obs["cell_type"].nunique() == 4
    assert a.obs["dataset_id"].nunique() == 3
    assert a.var_names.is_unique


def test_seeded_identical_and_prefix_stable(tiny_sim_cfg, tiny_adata):
    again = simulate(n_cells=300, cfg=tiny_sim_cfg, seed=0)
    assert (again.X != tiny_adata.X).nnz == 0
    assert np.array_equal(again.obs["cell_type"], tiny_adata.obs["cell_type"])
    other = simulate(n_cells=300, cfg=tiny_sim_cfg, seed=1)
    assert (other.X != tiny_adata.X).nnz > 0
    prefix = simulate(n_cells=100, cfg=tiny_sim_cfg, seed=0)
    assert (prefix.X != tiny_adata.X[:100]).nnz == 0


def test_realistic_sparsity_and_library_size():
    a = simulate(n_cells=2000, cfg=SimulateConfig(n_genes=2000), seed=0)
    zeros = 1 - a.X.nnz / np.prod(a.shape)
    assert 0.82 <= zeros <= 0.95, zeros
    lib = np.asarray(a.X.sum(axis=1)).ravel()
    assert 3000 < np.median(lib) < 5500
    sd = np.std(np.log(lib))
    assert 0.45 < sd < 0.8  # lognormal spread ~ library_sigma 0.6
    gene_means = np.asarray(a.X.mean(axis=0)).ravel()
    assert np.mean(gene_means < 0.1) > 0.4  # many lowly expressed genes


def test_cell_types_are_visible_in_counts(tiny_adata):
    """Type centroids of log-normalised counts differ far more than within-type noise."""
    X = tiny_adata.X.toarray().astype(float)
    L = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    types = tiny_adata.obs["cell_type"].to_numpy()
    centroids = np.stack([L[types == t].mean(0) for t in np.unique(types)])
    nearest = np.argmin(((L[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert np.mean(np.unique(types)[nearest] == types) > 0.9


