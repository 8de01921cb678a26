"""QC, library size, normalisation + log1p, and HVG selection (scanpy underneath).

Order matters and is fixed here: empty cells are dropped first; the library size is the
total over ALL genes of a cell, computed before any gene is cut; HVGs are chosen on the
training cells only; the normalised values of the kept genes use the all-gene library size.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from cellscale.errors import DataError

__all__ = ["drop_empty_cells", "library_size", "normalize_log1p", "select_genes", "subsample"]


def _row_sums(X) -> np.ndarray:
    if sp.issparse(X):
        return np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
    return np.asarray(X, dtype=np.float64).sum(axis=1)


def drop_empty_cells(adata: AnnData, *, normalized: bool = False) -> tuple[AnnData, int]:
    """Drop cells whose counts (or normalised values) are all zero; return (adata, n_dropped)."""
    X = adata.X
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        nonempty = np.diff(X.indptr) > 0
        if nonempty.any():
            nonempty &= (np.abs(X).sum(axis=1).A1 > 0) if normalized else (_row_sums(X) > 0)
    else:
        nonempty = (np.abs(np.asarray(X)).sum(axis=1) > 0) if normalized else (_row_sums(X) > 0)
    n_dropped = int((~nonempty).sum())
    if n_dropped == adata.n_obs:
        raise DataError(
            f"all {adata.n_obs} cells have zero counts: the matrix is empty; check the input "
            "(or the --layer you named)"
        )
    if n_dropped:
        adata = adata[nonempty].copy()
    return adata, n_dropped


def library_size(adata: AnnData, *, normalized: bool = False) -> np.ndarray:
    """Total counts of each cell over ALL genes (float64).

    For normalised input (log values) this is the total of expm1(values) over all genes."""
    X = adata.X
    if not normalized:
        return _row_sums(X)
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64, copy=True)
        np.expm1(X.data, out=X.data)
        return _row_sums(X)
    return np.expm1(np.asarray(X, dtype=np.float64)).sum(axis=1)


def normalize_log1p(counts, lib_size: np.ndarray, *, target_sum: float = 1e4) -> np.ndarray:
    """log1p(counts / lib_size * target_sum) as a dense float64 array (rows = cells)."""
    dense = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    out = dense.astype(np.float64, copy=True)
    out *= (target_sum / lib_size)[:, None]
    return np.log1p(out, out=out)


def subsample(n: int, *, n_keep: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n_keep`` of ``n`` cells, seeded; all cells when n <= n_keep."""
    from cellscale.data.mask import seed_sequence

    if n <= n_keep:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed_sequence(seed, "subsample"))
    return np.sort(rng.choice(n, size=n_keep, replace=False)).astype(np.int64)


def select_genes(
    adata: AnnData,
    *,
    n_top_genes: int,
    train_idx: np.ndarray,
    flavor: str = "seurat_v3",
    batch_key: str | None = None,
    normalized: bool = False,
    target_sum: float = 1e4,
) -> np.ndarray:
    """Indices (ascending, i.e. original gene order) of the V genes the model sees.

    ``seurat_v3``: scanpy's ``highly_variable_genes(flavor="seurat_v3")`` on the raw counts
    of the training cells (optionally batch-aware). ``variance``: the top-V genes by variance
    of the log values on the training cells (for normalised input; for counts the values are
    first normalised with the all-gene library size). ``all``: every gene (V must equal their
    number).
    """
    n_genes = adata.n_vars
    V = int(n_top_genes)
    if V > n_genes:
        raise DataError(f"asked for {V} genes but the data has only {n_genes}: lower --genes to at most {n_genes}")
    train_idx = np.sort(np.asarray(train_idx, dtype=np.int64))
    if flavor == "all":
        if V != n_genes:
            raise DataError(
                f"hvg_flavor 'all' keeps every gene, but --genes is {V} and the data has {n_genes}: "
                f"set --genes {n_genes} or choose another hvg_flavor"
            )
        return np.arange(n_genes, dtype=np.int64)
    if flavor == "variance":
        var = _log_variance(adata, train_idx, normalized=normalized, target_sum=target_sum)
        order = np.argsort(-var, kind="stable")[:V]
        return np.sort(order).astype(np.int64)
    if flavor != "seurat_v3":
        raise DataError(f"unknown hvg_flavor '{flavor}': use seurat_v3, variance or all")
    if V == n_genes:
        return np.arange(n_genes, dtype=np.int64)
    return seurat_v3_genes(adata[train_idx], n_top_genes=V, batch_key=batch_key)


def _log_variance(adata: AnnData, train_idx: np.ndarray, *, normalized: bool, target_sum: float) -> np.ndarray:
    """Per-gene variance over the training cells of the log values (normalised first if counts)."""
    M = adata.X[train_idx]
    M = sp.csr_matrix(M, dtype=np.float64) if sp.issparse(M) else np.asarray(M, dtype=np.float64)
    if not normalized:
        scale = target_sum / library_size(adata)[train_idx]
        if sp.issparse(M):
            M = sp.csr_matrix(sp.diags(scale) @ M)
            M.data = np.log1p(M.data)
        else:
            M = np.log1p(M * scale[:, None])
    if sp.issparse(M):
        mean = np.asarray(M.mean(axis=0)).ravel()
        sq = np.asarray(M.multiply(M).mean(axis=0)).ravel()
        return sq - mean**2
    return M.var(axis=0)


def seurat_v3_genes(adata_train: AnnData, *, n_top_genes: int, batch_key: str | None = None) -> np.ndarray:
    """Scanpy seurat_v3 HVGs on the (training) cells' raw counts; ascending gene indices."""
    import scanpy as sc

    if batch_key is not None and batch_key not in adata_train.obs:
        raise DataError(f"hvg batch key '{batch_key}' is not an obs column: pick one of {list(adata_train.obs.columns)[:10]}")
    sub = AnnData(X=adata_train.X, obs=adata_train.obs[[batch_key]] if batch_key else pd.DataFrame(index=adata_train.obs_names), var=pd.DataFrame(index=adata_train.var_names))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hvg = sc.pp.highly_variable_genes(
                sub, flavor="seurat_v3", n_top_genes=n_top_genes, batch_key=batch_key, inplace=False
            )
    except ImportError as err:
        raise DataError(f"seurat_v3 HVG selection needs scikit-misc ({err}): pip install scikit-misc") from None
    except ValueError as err:
        raise DataError(f"seurat_v3 HVG selection failed ({str(err).splitlines()[0]}): try hvg_flavor 'variance' or more cells") from None
    chosen = np.flatnonzero(np.asarray(hvg["highly_variable"], dtype=bool))
    if chosen.size != n_top_genes:
        raise DataError(
            f"seurat_v3 selected {chosen.size} genes instead of {n_top_genes} (too few variable genes): "
            "lower --genes or use hvg_flavor 'variance'"
        )
    return chosen.astype(np.int64)
