"""Seeded bootstrap resamples, fitted in worker processes, with their failures counted.

Two kinds of resample share one machinery: a **group** resample draws resampling units (by
default: rows sharing the same x values, i.e. the seeds of one configuration) with
replacement and becomes a vector of row weights; a **residual** resample keeps the rows and
their weights and replaces the losses (``cellscale.fit.intervals``). All resamples are drawn
up front from one seed, so the numbers do not depend on how many processes fit them. Each
resample is fitted from warm starts chosen by the caller (``fit_table`` passes the
full-data optimum), not from the whole start grid: a resample is a small perturbation of the
data, and its optimum sits next to the full-data one.

A resample that cannot be fitted leaves a NaN row and a one-line reason (``Resamples``):
too few distinct configurations to identify the law, a non-positive simulated loss, or the
exception the fit raised. Callers count them; nothing is dropped unseen.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from cellscale.fit.laws.base import Law
from cellscale.fit.methods import METHODS
from cellscale.fit.threads import blas_single_thread, single_thread_env
from cellscale.runtime.cpus import usable_cpus

TOO_FEW_CONFIGS = "fewer distinct configurations than parameters"
NON_POSITIVE = "a simulated loss is not positive"
NON_FINITE = "the fit returned a non-finite estimate"


# who hears how a batch of resamples stands (done, total): the report's progress bar (on_resamples)
_ON_RESAMPLES: ContextVar[Callable[[int, int], None] | None] = ContextVar("on_resamples", default=None)
CHUNKS_PER_JOB = 4  # chunks per worker process: load balance without much pickling
CHUNKS_REPORTED = 16  # chunks per batch when someone hears its progress (finer steps for the ETA)


@contextlib.contextmanager
def on_resamples(callback: Callable[[int, int], None]) -> Iterator[None]:
    """Within the block, every batch of resamples fitted in this process (:func:`fit_resamples`)
    calls ``callback(done, total)`` as its chunks finish. The numbers do not change: each resample
    is fitted alone, whatever the chunks."""
    token = _ON_RESAMPLES.set(callback)
    try:
        yield
    finally:
        _ON_RESAMPLES.reset(token)


@dataclass
class Resamples:
    """Fitted resamples: natural parameters (NaN rows where a fit failed) and why each failed."""

    samples: np.ndarray  # (B, k)
    errors: list[str | None]  # one per resample: None, or why it failed
    extra: np.ndarray | None = None  # (B, k) per-resample standard errors, when asked for

    @property
    def n_failed(self) -> int:
        return sum(e is not None for e in self.errors)

    def failures(self) -> dict[str, int]:
        """{reason: count} of the failed resamples, most frequent first."""
        return dict(Counter(e for e in self.errors if e is not None).most_common())


def resample_weights(groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_rows) resampling counts: each row weighted by its unit's draw count."""
    n_groups = int(groups.max()) + 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    counts = np.zeros((n_boot, n_groups))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n_groups), draws.ravel()), 1.0)
    return counts[:, groups]


def _reason(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text[:160]}" if text else type(err).__name__


def _fit_one(method, law, X, logX, y, w, starts, se_fn):
    """(theta, se or None, None) for one resample, or (None, None, reason)."""
    used = w > 0
    # A resample with fewer distinct configurations than parameters cannot identify them;
    # it is counted as failed rather than returning an arbitrary point.
    if np.unique(X[used], axis=0).shape[0] < law.n_params:
        return None, None, TOO_FEW_CONFIGS
    if not np.all(y[used] > 0):
        return None, None, NON_POSITIVE
    idx = np.flatnonzero(used)
    yi = y[idx]
    try:
        outcome = method.fit(law, logX[idx], yi, np.log(yi), w[idx], starts=starts)
        theta = law.to_natural(outcome.u)
        se = se_fn(law, logX[idx], yi, w[idx], outcome.u) if se_fn is not None else None
    except Exception as err:  # noqa: BLE001 - counted with its reason, not swallowed
        return None, None, _reason(err)
    if not np.all(np.isfinite(theta)):
        return None, None, NON_FINITE
    return theta, se, None


def _fit_chunk(method_name: str, law: Law, X: np.ndarray, Y: np.ndarray, W: np.ndarray,
               starts: np.ndarray, se_fn=None) -> Resamples:
    with blas_single_thread():
        method = METHODS[method_name]
        logX = np.log(X)
        out = np.full((W.shape[0], law.n_params), np.nan)
        ses = np.full((W.shape[0], law.n_params), np.nan) if se_fn is not None else None
        errors: list[str | None] = []
        for i in range(W.shape[0]):
            y = Y[i] if Y.ndim == 2 else Y
            theta, se, err = _fit_one(method, law, X, logX, y, W[i], starts, se_fn)
            errors.append(err)
            if err is None:
                out[i] = theta
                if ses is not None:
                    ses[i] = se
        return Resamples(out, errors, ses)


def _pool_context():
    # forkserver avoids forking a parent that may hold BLAS threads; spawn elsewhere.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


def fit_resamples(method_name: str, law: Law, X: np.ndarray, Y: np.ndarray, W: np.ndarray,
                  starts: np.ndarray, n_jobs: int | None = 1, se_fn=None) -> Resamples:
    """Fit each resample: row weights ``W`` (B, n) and losses ``Y`` ((B, n), or (n,) for all).

    ``se_fn(law, logX, y, w, u)``, when given, is evaluated at each resample's optimum (a
    module-level function, so that worker processes can run it)."""
    if n_jobs is None or n_jobs <= 0:
        n_jobs = usable_cpus()
    n_jobs = max(1, min(n_jobs, W.shape[0]))
    heard = _ON_RESAMPLES.get()
    if W.shape[0] < 2 or (heard is None and n_jobs == 1):
        return _fit_chunk(method_name, law, X, Y, W, starts, se_fn)
    splits = [s for s in np.array_split(np.arange(W.shape[0]), max(n_jobs * CHUNKS_PER_JOB,
                                                                    CHUNKS_REPORTED if heard else 1)) if s.size]
    jobs = [(method_name, law, X, Y[s] if Y.ndim == 2 else Y, W[s], starts, se_fn) for s in splits]
    hear = heard or (lambda done, total: None)
    done = 0
    if n_jobs == 1:
        parts = []
        for job, s in zip(jobs, splits):
            parts.append(_fit_chunk(*job))
            done += s.size
            hear(done, W.shape[0])
    else:
        with single_thread_env(), ProcessPoolExecutor(max_workers=n_jobs, mp_context=_pool_context()) as pool:
            futures = {pool.submit(_fit_chunk, *job): s.size for job, s in zip(jobs, splits)}
            for f in as_completed(futures):
                done += futures[f]
                hear(done, W.shape[0])
            parts = [f.result() for f in futures]  # in submission order: the resamples' own order
    extra = np.vstack([p.extra for p in parts]) if se_fn is not None else None
    return Resamples(np.vstack([p.samples for p in parts]), [e for p in parts for e in p.errors], extra)


def run_bootstrap(method_name: str, law: Law, X: np.ndarray, y: np.ndarray, base_w: np.ndarray,
                  W: np.ndarray, starts: np.ndarray, n_jobs: int | None = 1) -> Resamples:
    """Group resamples: row weights ``W * base_w`` on the observed losses."""
    return fit_resamples(method_name, law, X, y, W * base_w[None, :], starts, n_jobs=n_jobs)


def jackknife_weights(groups: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
    """(G, n) weights: row g leaves resampling unit g out."""
    n_groups = int(groups.max()) + 1
    W = np.ones((n_groups, groups.size))
    W[groups[None, :] == np.arange(n_groups)[:, None]] = 0.0
    return W


def jackknife_acceleration(jack: np.ndarray) -> float:
    """Efron's acceleration from leave-one-unit-out estimates of one parameter (finite ones)."""
    jack = jack[np.isfinite(jack)]
    if jack.size < 3:
        return 0.0
    d = jack.mean() - jack
    denom = np.sum(d * d) ** 1.5
    return float(np.sum(d**3) / (6 * denom)) if denom > 0 else 0.0


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
        accel = jackknife_acceleration(jack_ok[:, j]) if jack_ok.shape[0] >= 3 else 0.0
        zz = z0 + z_tail
        with np.errstate(divide="ignore", invalid="ignore"):
            probs = norm.cdf(z0 + zz / (1 - accel * zz))
        probs = np.where(np.isfinite(probs), probs, [0.0, 1.0])
        lo[j], hi[j] = np.percentile(ok[:, j], 100 * np.clip(probs, 0, 1))
    return lo, hi
