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

__all__ = [
    "drop_empty_cells", "library_size", "normalize_log1p", "select_genes", "subsample",
    "seurat_v3_genes", "seurat_v3_genes_chunked", "log_variance_chunked",
]


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


# --------------------------------------------------------------------------- chunk-wise (large inputs)
def _batch_codes(labels: np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    """Integer batch codes in scanpy's order (sorted unique labels) and the number of batches."""
    if labels is None:
        return np.zeros(n, dtype=np.int64), 1
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    return codes.astype(np.int64), int(codes.max()) + 1 if codes.size else 1


def _flat_bincount(block: sp.csr_matrix, codes: np.ndarray, n_batches: int, weights: np.ndarray) -> np.ndarray:
    """Per-(batch, gene) sums of ``weights`` (one per stored value of the CSR ``block``)."""
    n_vars = block.shape[1]
    flat = np.repeat(codes, np.diff(block.indptr)) * n_vars + block.indices
    return np.bincount(flat, weights=weights, minlength=n_batches * n_vars).reshape(n_batches, n_vars)


def _block_codes(blocks, codes_all: np.ndarray | None):
    """(CSR block, the batch code of each of its rows) over ``blocks()``, in row order."""
    n_rows = 0
    for block in blocks():
        block = sp.csr_matrix(block)
        codes = codes_all[n_rows : n_rows + block.shape[0]] if codes_all is not None else np.zeros(block.shape[0], np.int64)
        n_rows += block.shape[0]
        yield block, codes


def _batch_moments(blocks, codes_all, n_batches: int, n_vars: int):
    """Per-(batch, gene) mean and unbiased variance of the counts, and cells per batch."""
    s = np.zeros((n_batches, n_vars))
    sq = np.zeros((n_batches, n_vars))
    n_b = np.zeros(n_batches, dtype=np.int64)
    for block, codes in _block_codes(blocks, codes_all):
        n_b += np.bincount(codes, minlength=n_batches)
        d = block.data.astype(np.float64)
        s += _flat_bincount(block, codes, n_batches, d)
        sq += _flat_bincount(block, codes, n_batches, d * d)
    if np.any(n_b < 2):
        raise DataError("seurat_v3 HVG selection needs at least 2 training cells per batch: use more cells or no batch key")
    mean = s / n_b[:, None]
    var = (sq / n_b[:, None] - mean**2) * (n_b / (n_b - 1))[:, None]
    return mean, var, n_b


def _loess_std(mean: np.ndarray, var: np.ndarray, span: float) -> np.ndarray:
    """Per-(batch, gene) regularised standard deviation from a LOESS fit of log variance on
    log mean (constant genes keep 1)."""
    from skmisc.loess import loess

    n_batches, n_vars = mean.shape
    reg_std = np.ones((n_batches, n_vars))
    for b in range(n_batches):
        not_const = var[b] > 0
        est = np.zeros(n_vars)
        try:
            model = loess(np.log10(mean[b, not_const]), np.log10(var[b, not_const]), span=span, degree=2)
            model.fit()
        except ValueError as err:
            raise DataError(f"seurat_v3 HVG selection failed ({str(err).splitlines()[0]}): try hvg_flavor 'variance' or more cells") from None
        est[not_const] = model.outputs.fitted_values
        reg_std[b] = np.sqrt(10**est)
    return reg_std


def _clipped_sums(blocks, codes_all, clip: np.ndarray):
    n_batches, n_vars = clip.shape
    cs = np.zeros((n_batches, n_vars))
    csq = np.zeros((n_batches, n_vars))
    for block, codes in _block_codes(blocks, codes_all):
        row_codes = np.repeat(codes, np.diff(block.indptr))
        clipped = np.minimum(block.data.astype(np.float64), clip[row_codes, block.indices])
        cs += _flat_bincount(block, codes, n_batches, clipped)
        csq += _flat_bincount(block, codes, n_batches, clipped * clipped)
    return cs, csq


def _rank_top(norm_gene_vars: np.ndarray, V: int) -> np.ndarray:
    """The top ``V`` genes ranked exactly as scanpy (median rank over batches, then number of
    batches), as ascending indices."""
    ranked = np.argsort(np.argsort(-norm_gene_vars, axis=1), axis=1).astype(np.float32)
    n_high = np.sum((ranked < V).astype(int), axis=0)
    ranked[ranked >= V] = np.nan
    median_ranked = np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan)
    df = pd.DataFrame({"highly_variable_rank": median_ranked, "highly_variable_nbatches": n_high})
    order = df.sort_values(["highly_variable_rank", "highly_variable_nbatches"], ascending=[True, False], na_position="last").index
    return np.sort(np.asarray(order[:V], dtype=np.int64))


def seurat_v3_genes_chunked(
    blocks,
    *,
    n_vars: int,
    n_top_genes: int,
    batch_labels: np.ndarray | None = None,
    span: float = 0.3,
) -> np.ndarray:
    """scanpy's ``highly_variable_genes(flavor="seurat_v3")`` computed in row chunks.

    ``blocks()`` returns a fresh iterator of CSR row blocks of the (training) cells' raw
    counts, in the order of ``batch_labels``; it is called twice (mean/variance, then the
    clipped sums). The statistics, the LOESS fit, the clipping and the ranking follow
    scanpy step by step, so the selected genes equal scanpy's on the same cells while only
    one block is in memory at a time. Returns ascending gene indices.
    """
    codes_all, n_batches = None, 1
    if batch_labels is not None:
        codes_all, n_batches = _batch_codes(batch_labels, len(batch_labels))
    mean, var, n_b = _batch_moments(blocks, codes_all, n_batches, n_vars)
    reg_std = _loess_std(mean, var, span)
    clip = reg_std * np.sqrt(n_b)[:, None] + mean
    cs, csq = _clipped_sums(blocks, codes_all, clip)
    n = n_b[:, None].astype(np.float64)
    norm_gene_vars = (1 / ((n - 1) * np.square(reg_std))) * (n * np.square(mean) + csq - 2 * cs * mean)
    return _rank_top(norm_gene_vars, int(n_top_genes))


def log_variance_chunked(blocks, *, n_vars: int, lib_size: np.ndarray, target_sum: float) -> np.ndarray:
    """Per-gene variance of log1p(counts / lib * target_sum) over the rows of ``blocks()``
    (population variance, as ``select_genes(flavor="variance")``); ``lib_size`` per row."""
    total = np.zeros(n_vars)
    total_sq = np.zeros(n_vars)
    n = 0
    for block in blocks():
        block = sp.csr_matrix(block, dtype=np.float64)
        scale = target_sum / lib_size[n : n + block.shape[0]]
        n += block.shape[0]
        vals = np.log1p(block.data * np.repeat(scale, np.diff(block.indptr)))
        total += np.bincount(block.indices, weights=vals, minlength=n_vars)
        total_sq += np.bincount(block.indices, weights=vals * vals, minlength=n_vars)
    mean = total / n
    return total_sq / n - mean**2
