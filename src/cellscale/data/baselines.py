"""Reference predictors for masked reconstruction, scored under a dataset's FIXED eval mask.

Every number here is an MSE on masked positions exactly as the manifest's gene-mean baseline
and the trainer's evaluation define it: rows of ``ds.splits[split]`` in split order, mask
``ds.eval_mask(split)``, MSE = sum of squared errors over all masked positions / number of
masked positions (a ratio of sums, not a mean of per-cell means).

* ``gene_mean``: each gene's training-split mean (the manifest's number, recomputed by the
  same function, so it is equal to the last bit).
* ``bayes_linear``: the Gaussian conditional mean of the masked genes given the visible ones,
  from the training split's mean ``mu`` and covariance ``S``. With ``P = S_reg^{-1}``::

      E[x_m | x_o] = mu_m - (P_mm)^{-1} P_mo (x_o - mu_o)

  which equals ``mu_m + S_mo S_oo^{-1} (x_o - mu_o)`` but needs only a solve of size |m|
  (~15% of V) per cell. ``S_reg = S + ridge * mean(diag S) * I`` (ridge 1e-6 by default:
  enough to make genes that never vary in training — a zero row of ``S`` — invertible, and
  far too small to move the MSE). Cells are grouped by their number of masked genes and the
  solves are batched. For Gaussian data this predictor is Bayes-optimal (up to the error of
  estimating ``mu`` and ``S`` from the training split); a model below its line has found
  non-linear structure.
* ``knn``: k-nearest-neighbour imputation: neighbours among (a seeded subsample of at most
  ``max_train_cells``) training cells, by squared Euclidean distance on the cell's VISIBLE
  genes only; the masked genes are predicted as the neighbours' mean. Candidates are found
  with a float32 matrix product and re-ranked with exact float64 distances (ties: lower
  training row first).

Likelihood baselines (``"likelihood"``), in bits per masked gene under the same masks, for the
likelihood objectives (``cellscale.rules.objectives``):

* ``gaussian-nll``: ``gene_mean`` = each gene's training mean and (maximum-likelihood) variance;
  ``bayes_linear`` = the Gaussian conditional mean above with its conditional variance
  ``diag((P_mm)^{-1})``; for a gaussian-mode simulated dataset also ``bayes_floor`` (the exact
  conditional's entropy, ``simulate.bayes_floors``).
* ``nb`` (datasets with raw counts): ``gene_mean`` = a per-gene negative binomial with mean
  ``rate_g * library_size / target_sum`` (``rate_g`` = the gene's training counts over the
  training cells' total scale) and a method-of-moments inverse dispersion.

``load_or_compute_baselines`` caches the result in ``DATASET_DIR/baselines.json`` (atomic),
keyed by a hash of the settings and of the dataset's checksums.

For a dataset simulated in ``mode="gaussian"`` the result also holds ``bayes_floor``: the
Bayes-optimal MSE of the exact generative model for the dataset's genes under the dataset's
own evaluation masks (``cellscale.data.sources.simulate.bayes_floor_mse``).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from typing import Any, Sequence

import numpy as np
import scipy.linalg
import scipy.special

from cellscale.data.build import gene_mean_baseline
from cellscale.data.mask import seed_sequence
from cellscale.data.store import Dataset
from cellscale.errors import DataError
from cellscale.rules.lossbounds import FloorCheck, check_not_below_floor  # noqa: F401
from cellscale.runtime.io import DamagedFile, atomic_write_json, read_json_checked, warn

__all__ = [
    "compute_baselines",
    "load_or_compute_baselines",
    "fit_gaussian",
    "bayes_linear_predict",
    "knn_predict",
    "check_not_below_floor",
    "FloorCheck",
    "BASELINES_FILE",
    "DEFAULTS",
]

BASELINES_FILE = "baselines.json"
DEFAULTS: dict[str, Any] = {"knn_k": 10, "max_train_cells": 5000, "ridge": 1e-6, "seed": 0}
_ROW_CHUNK = 2048
_SOLVE_ELEMS = 1 << 22  # float64 elements per batched-solve block (32 MiB)
_CACHE_VERSION = 2  # 2: the likelihood baselines


# --------------------------------------------------------------------------- helpers
def _rows(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """values[rows] as float64, reading the memmap in ascending row order."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    out = np.empty((rows.size, values.shape[1]), dtype=np.float64)
    out[order] = values[rows[order]]
    return out


def _chunks(array: np.ndarray, rows: np.ndarray, mask: np.ndarray):
    """(rows, array[rows] as float64, mask rows) in chunks of ``_ROW_CHUNK`` cells."""
    for start in range(0, rows.size, _ROW_CHUNK):
        r = rows[start : start + _ROW_CHUNK]
        yield r, _rows(array, r), mask[start : start + _ROW_CHUNK]


def _sse(values: np.ndarray, rows: np.ndarray, mask: np.ndarray, predict) -> tuple[float, int]:
    """Sum of squared errors and #masked positions of ``predict(x, m) -> full pred`` by chunk."""
    sse, n = 0.0, 0
    for _, x, m in _chunks(values, rows, mask):
        err = (x - predict(x, m))[m]
        sse += float(np.dot(err, err))
        n += int(m.sum())
    return sse, n


# --------------------------------------------------------------------------- Bayes-linear
def fit_gaussian(values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``values[rows]`` in float64, accumulated by chunk
    around a provisional centre (the first chunk's mean) for numerical stability."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if rows.size < 2:
        raise DataError(f"need at least 2 training cells for a covariance, got {rows.size}")
    V = values.shape[1]
    shift = np.asarray(values[rows[:_ROW_CHUNK]], dtype=np.float64).mean(axis=0)
    s1 = np.zeros(V)
    s2 = np.zeros((V, V))
    for start in range(0, rows.size, _ROW_CHUNK):
        x = np.asarray(values[rows[start : start + _ROW_CHUNK]], dtype=np.float64) - shift
        s1 += x.sum(axis=0)
        s2 += x.T @ x
    n = rows.size
    d = s1 / n
    cov = (s2 - n * np.outer(d, d)) / (n - 1)
    cov = (cov + cov.T) / 2
    return shift + d, cov


def _precision(cov: np.ndarray, ridge: float) -> np.ndarray:
    V = cov.shape[0]
    scale = float(np.mean(np.diag(cov)))
    lam = ridge * (scale if scale > 0 else 1.0)
    reg = cov + lam * np.eye(V)
    cf = scipy.linalg.cho_factor(reg, lower=True, check_finite=False)
    prec = scipy.linalg.cho_solve(cf, np.eye(V), check_finite=False)
    return (prec + prec.T) / 2


def bayes_linear_predict(
    x: np.ndarray, mask: np.ndarray, mean: np.ndarray, cov: np.ndarray | None = None, *,
    precision: np.ndarray | None = None, ridge: float = DEFAULTS["ridge"], return_var: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Gaussian conditional mean of the masked entries of each row of ``x`` given its visible
    entries (``mask`` True = masked). Returns a copy of ``x`` whose masked entries hold the
    prediction. Give ``cov`` (regularised here with ``ridge``) or a ready ``precision``.
    ``return_var`` also returns the conditional variances ``diag((P_mm)^{-1})`` at the masked
    entries (zeros elsewhere)."""
    x = np.asarray(x, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if precision is None:
        if cov is None:
            raise ValueError("give cov or precision")
        precision = _precision(np.asarray(cov, dtype=np.float64), ridge)
    P = precision
    d = x - mean
    d[mask] = 0.0
    rhs = d @ P  # (P d)_m = P_mo (x_o - mu_o) because d_m = 0 (P symmetric)
    out = x.copy()
    var = np.zeros_like(x) if return_var else None
    sizes = mask.sum(axis=1)
    for s in np.unique(sizes):
        if s == 0:
            continue
        cells = np.flatnonzero(sizes == s)
        per_block = max(1, _SOLVE_ELEMS // (int(s) * int(s)))
        for start in range(0, cells.size, per_block):
            c = cells[start : start + per_block]
            idx = np.nonzero(mask[c])[1].reshape(c.size, s)  # masked genes of each cell, ascending
            A = P[idx[:, :, None], idx[:, None, :]]
            b = np.take_along_axis(rhs[c], idx, axis=1)
            if var is None:
                y = np.linalg.solve(A, b[:, :, None])[:, :, 0]
            else:
                Ainv = np.linalg.inv(A)
                y = np.einsum("nij,nj->ni", Ainv, b)
                var[c[:, None], idx] = np.diagonal(Ainv, axis1=1, axis2=2)
            out[c[:, None], idx] = mean[idx] - y
    return out if var is None else (out, var)


# --------------------------------------------------------------------------- kNN
def knn_predict(x: np.ndarray, mask: np.ndarray, train: np.ndarray, *, k: int) -> np.ndarray:
    """k-NN imputation: for each row, the ``k`` training rows nearest on the row's visible
    genes (squared Euclidean); masked entries = the neighbours' mean. Returns a filled copy."""
    x = np.asarray(x, dtype=np.float64)
    train = np.asarray(train, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    n_train = train.shape[0]
    k = int(min(k, n_train))
    if k < 1:
        raise DataError("kNN needs at least one training cell")
    w = (~mask).astype(np.float32)
    xw = (x * w).astype(np.float32)
    t32 = train.astype(np.float32)
    # approximate distances: sum_o x^2 - 2 sum_o x t + sum_o t^2
    approx = (xw * xw).sum(axis=1, keepdims=True) - 2.0 * (xw @ t32.T) + w @ (t32 * t32).T
    n_cand = min(n_train, max(4 * k, k + 16))
    if n_cand < n_train:
        cand = np.argpartition(approx, n_cand - 1, axis=1)[:, :n_cand]
    else:
        cand = np.broadcast_to(np.arange(n_train), (x.shape[0], n_train))
    cand = np.sort(cand, axis=1)  # ties -> lower training row
    out = x.copy()
    for i in range(x.shape[0]):
        vis = ~mask[i]
        diff = train[cand[i]][:, vis] - x[i, vis]
        exact = np.einsum("ij,ij->i", diff, diff)
        nn = cand[i][np.argsort(exact, kind="stable")[:k]]
        out[i, mask[i]] = train[nn][:, mask[i]].mean(axis=0)
    return out


# --------------------------------------------------------------------------- floor check
# check_not_below_floor and FloorCheck live with the loss's other bounds (cellscale.rules.lossbounds),
# torch- and anndata-free, so that the report reads them without this module; imported here for
# the tests and callers that know them from here

# --------------------------------------------------------------------------- driver
def _settings(splits: Sequence[str], knn_k: int, max_train_cells: int | None, ridge: float, seed: int) -> dict[str, Any]:
    return {
        "splits": list(splits), "knn_k": int(knn_k),
        "max_train_cells": None if max_train_cells is None else int(max_train_cells),
        "ridge": float(ridge), "seed": int(seed),
    }


def _gaussian_floor(ds: Dataset, splits: Sequence[str]) -> dict[str, dict[str, float]] | None:
    """Exact Bayes floors (``"mse"`` and ``"bits"``, per split) of a dataset simulated in
    gaussian mode, on its own eval masks."""
    m = ds.manifest
    cfg = (m.get("config") or {})
    sim = cfg.get("simulate") or (m.get("source") or {}).get("simulate") or {}
    if cfg.get("source", "simulate") != "simulate" or sim.get("mode") != "gaussian":
        return None
    from cellscale.config import SimulateConfig
    from cellscale.data.sources.simulate import bayes_floors, gaussian_params, gene_names

    sim_cfg = SimulateConfig.model_validate(sim)
    params = gaussian_params(sim_cfg, int(m.get("seed", cfg.get("seed", 0))))
    pos = {g: i for i, g in enumerate(gene_names(sim_cfg.n_genes))}
    try:
        genes = np.array([pos[g] for g in ds.genes], dtype=np.int64)
    except KeyError:
        return None
    floors = {s: bayes_floors(params, genes=genes, masks=ds.eval_mask(s)) for s in splits}
    return {"mse": {s: f[0] for s, f in floors.items()}, "bits": {s: f[1] for s, f in floors.items()}}


# --------------------------------------------------------------------------- likelihoods
_LN2 = math.log(2.0)


def _gauss_nats(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    return 0.5 * np.log(2 * np.pi * var) + (x - mean) ** 2 / (2 * var)


def _bits(array: np.ndarray, rows: np.ndarray, mask: np.ndarray, nats) -> float:
    """Mean over masked positions of ``nats(a, r) -> per-entry nats`` (``a`` = ``array[r]``),
    in bits."""
    total, n = 0.0, 0
    for r, a, m in _chunks(array, rows, mask):
        total += float(nats(a, r)[m].sum())
        n += int(m.sum())
    return total / n / _LN2


def _bayes_linear_scores(values: np.ndarray, rows: np.ndarray, mask: np.ndarray, mean: np.ndarray,
                         precision: np.ndarray) -> tuple[float, float, int]:
    """MSE, Gaussian NLL (bits) and #masked positions of the Bayes-linear predictor, from one
    batched solve per chunk (its conditional mean and variance)."""
    sse, nats, n = 0.0, 0.0, 0
    for _, x, m in _chunks(values, rows, mask):
        pred, var = bayes_linear_predict(x, m, mean, precision=precision, return_var=True)
        err = (x - pred)[m]
        sse += float(np.dot(err, err))
        nats += float(_gauss_nats(x[m], pred[m], var[m]).sum())
        n += int(m.sum())
    return sse / n, nats / n / _LN2, n


def nb_gene_fit(ds: Dataset, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene NB of the training cells: ``(rate, theta)`` with mean ``rate * scale`` (scale =
    library size / target_sum). ``rate`` = sum of counts / sum of scales (its maximum-likelihood
    value under any fixed dispersion); ``theta`` by moments, ``sum mu^2 / sum((k - mu)^2 - mu)``,
    clipped to [1e-3, 1e6] (a gene with no extra-Poisson variance sits at the Poisson end)."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    scale = ds.library_scale
    V = ds.n_genes
    k_sum = np.zeros(V)
    for start in range(0, rows.size, _ROW_CHUNK):
        k_sum += _rows(ds.counts, rows[start : start + _ROW_CHUNK]).sum(axis=0)
    rate = np.maximum(k_sum / scale[rows].sum(), 1e-12)
    mu2, excess = np.zeros(V), np.zeros(V)
    for start in range(0, rows.size, _ROW_CHUNK):
        r = rows[start : start + _ROW_CHUNK]
        mu = scale[r, None] * rate
        k = _rows(ds.counts, r)
        mu2 += (mu**2).sum(axis=0)
        excess += ((k - mu) ** 2 - mu).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = np.where(excess > 0, mu2 / excess, np.inf)
    return rate, np.clip(theta, 1e-3, 1e6)


def nb_nats(k: np.ndarray, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """-log NB(k; mean mu, inverse dispersion theta), elementwise (numpy twin of the objective's)."""
    return -(scipy.special.gammaln(k + theta) - scipy.special.gammaln(theta) - scipy.special.gammaln(k + 1)
             + theta * np.log(theta / (theta + mu)) + k * np.log(mu / (theta + mu)))


def likelihood_baselines(ds: Dataset, splits: Sequence[str], mean: np.ndarray, cov: np.ndarray,
                         bayes_linear_bits: dict[str, float]) -> dict[str, Any]:
    """The ``"likelihood"`` block of :func:`compute_baselines` (see the module doc);
    ``bayes_linear_bits`` are the Bayes-linear NLLs from :func:`_bayes_linear_scores`."""
    train = ds.splits["train"]
    n_train = train.size
    var = np.diag(cov) * (n_train - 1) / n_train  # the maximum-likelihood variance
    var = np.maximum(var, 1e-6 * max(float(var.mean()), 1e-12))  # a gene constant in training
    out: dict[str, Any] = {"gaussian-nll": {
        "gene_mean": {s: _bits(ds.values, ds.splits[s], ds.eval_mask(s), lambda x, r: _gauss_nats(x, mean, var))
                      for s in splits},
        "bayes_linear": dict(bayes_linear_bits),
    }}
    if ds.counts is not None and np.all(ds.library_scale > 0):
        rate, theta = nb_gene_fit(ds, train)
        scale = ds.library_scale
        out["nb"] = {"gene_mean": {
            s: _bits(ds.counts, ds.splits[s], ds.eval_mask(s), lambda k, r: nb_nats(k, scale[r, None] * rate, theta))
            for s in splits}}
    return out


def compute_baselines(
    ds: Dataset, *, splits: Sequence[str] = ("val", "test"), knn_k: int = DEFAULTS["knn_k"],
    max_train_cells: int | None = DEFAULTS["max_train_cells"], ridge: float = DEFAULTS["ridge"],
    seed: int = DEFAULTS["seed"],
) -> dict[str, Any]:
    """MSEs of the gene-mean, Bayes-linear and kNN predictors on each split under the
    dataset's fixed evaluation mask: ``{"gene_mean": {split: mse}, "bayes_linear": {...},
    "knn": {...}, "n_masked": {split: int}, "settings": {...}}`` (+ ``"bayes_floor"`` for a
    gaussian-mode simulated dataset). ``max_train_cells`` caps (seeded subsample) the training
    cells searched by kNN only; mean and covariance use the whole training split."""
    for s in splits:
        if s == "train":
            raise DataError("baselines are scored on held-out splits: use 'val' or 'test'")
        if s not in ds.splits:
            raise DataError(f"unknown split '{s}': use one of {sorted(ds.splits)}")
    values = ds.values
    train = ds.splits["train"]
    mean, cov = fit_gaussian(values, train)
    P = _precision(cov, ridge)
    knn_rows = np.sort(train)
    if max_train_cells is not None and knn_rows.size > max_train_cells:
        rng = np.random.default_rng(seed_sequence(seed, "baselines-knn"))
        knn_rows = np.sort(rng.choice(knn_rows, size=int(max_train_cells), replace=False))
    knn_train = np.asarray(values[knn_rows], dtype=np.float64)

    out: dict[str, Any] = {"gene_mean": {}, "bayes_linear": {}, "knn": {}, "n_masked": {}}
    bayes_linear_bits: dict[str, float] = {}
    for s in splits:
        rows, mask = ds.splits[s], ds.eval_mask(s)
        out["gene_mean"][s] = gene_mean_baseline(values, train, rows, mask)
        out["bayes_linear"][s], bayes_linear_bits[s], out["n_masked"][s] = _bayes_linear_scores(
            values, rows, mask, mean, P)
        sse, n = _sse(values, rows, mask, lambda x, m: knn_predict(x, m, knn_train, k=knn_k))
        out["knn"][s] = sse / n
    out["likelihood"] = likelihood_baselines(ds, splits, mean, cov, bayes_linear_bits)
    floor = _gaussian_floor(ds, splits)
    if floor is not None:
        out["bayes_floor"] = floor["mse"]
        out["likelihood"]["gaussian-nll"]["bayes_floor"] = floor["bits"]
    out["settings"] = {**_settings(splits, knn_k, max_train_cells, ridge, seed), "knn_train_cells": int(knn_rows.size)}
    return out


def _cache_key(ds: Dataset, settings: dict[str, Any]) -> str:
    blob = json.dumps({"v": _CACHE_VERSION, "settings": settings, "checksums": ds.manifest.get("checksums"),
                       "config_hash": ds.manifest.get("config_hash")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_cache(path) -> dict[str, Any]:
    """The baselines cache of a dataset dir; {} when there is none, or it is damaged (then
    recomputed and rewritten: one line says so)."""
    try:
        cache = read_json_checked(path, keys=("format",))
        if cache.get("format") != "cellscale-baselines":
            raise DamagedFile(path, f"format {cache.get('format')!r}, not 'cellscale-baselines'")
    except OSError:  # none yet, or an unreadable dir: computed, not cached
        return {}
    except DamagedFile as err:
        warn(f"{err}: computing the baselines again")
        return {}
    return cache


def load_or_compute_baselines(
    ds: Dataset, *, splits: Sequence[str] = ("val", "test"), knn_k: int = DEFAULTS["knn_k"],
    max_train_cells: int | None = DEFAULTS["max_train_cells"], ridge: float = DEFAULTS["ridge"],
    seed: int = DEFAULTS["seed"],
) -> dict[str, Any]:
    """``compute_baselines`` cached in ``DATASET_DIR/baselines.json`` (one entry per settings
    hash; written atomically; a read-only dataset dir is computed without caching)."""
    settings = _settings(splits, knn_k, max_train_cells, ridge, seed)
    key = _cache_key(ds, settings)
    path = ds.path / BASELINES_FILE
    cache = _read_cache(path)
    entries = cache.get("entries") if isinstance(cache.get("entries"), dict) else {}
    if key in entries:
        return entries[key]
    result = compute_baselines(ds, splits=splits, knn_k=knn_k, max_train_cells=max_train_cells, ridge=ridge, seed=seed)
    entries = {**entries, key: result}
    try:
        atomic_write_json(path, {"format": "cellscale-baselines", "version": _CACHE_VERSION, "entries": entries})
    except OSError as err:
        warnings.warn(f"could not cache baselines in {path}: {err}", stacklevel=2)
    return result
