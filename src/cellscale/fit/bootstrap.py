"""Grouped, seeded bootstrap over runs.

A resample draws resampling units (by default: rows sharing the same x values, i.e. the
seeds of one configuration) with replacement, and becomes a vector of row weights. All
weight vectors are drawn up front from one seed, so the numbers do not depend on how
many processes fit them. Each resample is fitted from warm starts chosen by the caller
(``fit_table`` passes the full-data optimum), not from the whole start grid: a resample
is a small perturbation of the data, and its optimum sits next to the full-data one.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from scipy.stats import norm

from cellscale.fit.laws.base import Law
from cellscale.fit.methods import METHODS
from cellscale.fit.threads import blas_single_thread, single_thread_env


def resample_weights(groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_rows) resampling counts: each row weighted by its unit's draw count."""
    n_groups = int(groups.max()) + 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    counts = np.zeros((n_boot, n_groups))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n_groups), draws.ravel()), 1.0)
    return counts[:, groups]


def _fit_chunk(method_name: str, law: Law, X: np.ndarray, y: np.ndarray, base_w: np.ndarray,
               W: np.ndarray, starts: np.ndarray) -> np.ndarray:
    with blas_single_thread():
        return _fit_rows(method_name, law, X, y, base_w, W, starts)


def _fit_rows(method_name, law, X, y, base_w, W, starts):
    method = METHODS[method_name]
    logX, logy = np.log(X), np.log(y)
    out = np.full((W.shape[0], law.n_params), np.nan)
    for i, counts in enumerate(W):
        used = counts > 0
        # A resample with fewer distinct configurations than parameters cannot identify
        # them; it is counted as failed rather than returning an arbitrary point.
        if np.unique(X[used], axis=0).shape[0] < law.n_params:
            continue
        idx = np.flatnonzero(used)
        w = counts[idx] * base_w[idx]
        try:
            outcome = method.fit(law, logX[idx], y[idx], logy[idx], w, starts=starts)
        except Exception:  # noqa: BLE001 - one failed resample must not sink the others
            continue
        out[i] = law.to_natural(outcome.u)
    return out


def _pool_context():
    # forkserver avoids forking a parent that may hold BLAS threads; spawn elsewhere.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


def run_bootstrap(method_name: str, law: Law, X: np.ndarray, y: np.ndarray, base_w: np.ndarray,
                  W: np.ndarray, starts: np.ndarray, n_jobs: int | None = 1) -> np.ndarray:
    """Natural-parameter samples, shape (n_boot, k); NaN rows for failed resamples."""
    if n_jobs is None or n_jobs <= 0:
        n_jobs = os.cpu_count() or 1
    n_jobs = max(1, min(n_jobs, W.shape[0]))
    if n_jobs == 1 or W.shape[0] < 2:
        return _fit_chunk(method_name, law, X, y, base_w, W, starts)
    chunks = np.array_split(W, n_jobs * 4)
    with single_thread_env(), ProcessPoolExecutor(max_workers=n_jobs, mp_context=_pool_context()) as pool:
        parts = pool.map(_fit_chunk, *zip(*[(method_name, law, X, y, base_w, c, starts) for c in chunks]))
        return np.vstack(list(parts))


def jackknife_weights(groups: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
    """(G, n) weights: row g leaves resampling unit g out."""
    n_groups = int(groups.max()) + 1
    W = np.ones((n_groups, groups.size))
    W[groups[None, :] == np.arange(n_groups)[:, None]] = 0.0
    return W


def bca_ci(samples: np.ndarray, theta: np.ndarray, jack: np.ndarray,
           level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Bias-corrected and accelerated percentile intervals (Efron 1987), per parameter.

    Plain percentiles under-cover when the estimator is biased or skewed, as a floor near
    its bound is with a few dozen runs; BCa shifts the percentiles by the bootstrap
    median bias (z0) and the jackknife skewness (acceleration a) and is invariant under
    monotone transforms, so the entropy interval follows from the floor's.
    """
    ok = samples[np.all(np.isfinite(samples), axis=1)]
    k = theta.size
    lo, hi = np.full(k, np.nan), np.full(k, np.nan)
    if ok.shape[0] == 0:
        return lo, hi
    n_boot = ok.shape[0]
    z_tail = norm.ppf([(1 - level) / 2, (1 + level) / 2])
    jack_ok = jack[np.all(np.isfinite(jack), axis=1)]
    for j in range(k):
        below = (np.sum(ok[:, j] < theta[j]) + 0.5 * np.sum(ok[:, j] == theta[j])) / n_boot
        z0 = norm.ppf(np.clip(below, 0.5 / n_boot, 1 - 0.5 / n_boot))
        accel = 0.0
        if jack_ok.shape[0] >= 3:
            d = jack_ok[:, j].mean() - jack_ok[:, j]
            denom = np.sum(d * d) ** 1.5
            accel = float(np.sum(d**3) / (6 * denom)) if denom > 0 else 0.0
        zz = z0 + z_tail
        with np.errstate(divide="ignore", invalid="ignore"):
            probs = norm.cdf(z0 + zz / (1 - accel * zz))
        probs = np.where(np.isfinite(probs), probs, [0.0, 1.0])
        lo[j], hi[j] = np.percentile(ok[:, j], 100 * np.clip(probs, 0, 1))
    return lo, hi
