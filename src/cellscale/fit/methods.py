"""Fitting methods: each turns (law, data, row weights, starts) into one parameter vector.

Row weights carry both the user's weights and the bootstrap's resampling counts, so a
resample is a reweighting of the same rows: no copies of the table, and every method
sees exactly what a duplicated-rows fit would see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares, minimize

from cellscale.errors import FitError
from cellscale.fit.defaults import METHOD_DESCRIPTIONS, METHOD_NAMES
from cellscale.fit.laws.base import Law

HUBER_DELTA = 1e-3
# Local optimisations run from the best grid points only: the whole grid is scored in one
# cheap pass, and the optimiser is spent where the objective already looks promising.
N_LOCAL_STARTS = 8
PAPER_GRID = 1000


@dataclass(frozen=True)
class Outcome:
    u: np.ndarray
    objective: float
    candidates: np.ndarray  # distinct local optima, best first: warm starts for resamples


def _clip_inside(u: np.ndarray, bounds: list[tuple[float, float]]) -> np.ndarray:
    lo = np.array([b[0] for b in bounds])
    hi = np.array([b[1] for b in bounds])
    span = hi - lo
    return np.clip(u, lo + 1e-9 * span, hi - 1e-9 * span)


def _distinct(us: list[np.ndarray], objs: list[float]) -> tuple[np.ndarray, float, np.ndarray]:
    order = np.argsort(objs)
    kept: list[np.ndarray] = []
    for i in order:
        if not np.isfinite(objs[i]):
            continue
        if all(np.max(np.abs(us[i] - k)) > 1e-2 for k in kept):
            kept.append(us[i])
    if not kept:
        raise FitError("the optimiser found no finite solution; check the table for outliers")
    best = int(order[0])
    return us[best], float(objs[best]), np.array(kept[:2])


def _lo_hi(bounds) -> tuple[list[float], list[float]]:
    return [b[0] for b in bounds], [b[1] for b in bounds]


def weighted_residuals(law: Law, space: str, logX, y, w, u) -> np.ndarray:
    """sqrt(w) (f(u) - y) in ``space`` ("log": log L) without the Jacobian: what a trial step of the
    optimiser needs (a law whose Jacobian is numerical costs 2k + 1 predictions with it, one without)."""
    lp = law.log_predict(u, logX)
    sw = np.sqrt(w)
    return sw * (lp - np.log(y)) if space == "log" else sw * (np.exp(lp) - y)


def residuals_jac(law: Law, space: str, logX, y, w, u) -> tuple[np.ndarray, np.ndarray]:
    """Weighted residuals and their Jacobian in u: sqrt(w) (f(u) - y) in ``space`` ("log": log L)."""
    lp, J = law.log_predict_jac(u, logX)
    sw = np.sqrt(w)
    if space == "log":
        return sw * (lp - np.log(y)), sw[:, None] * J
    p = np.exp(lp)
    return sw * (p - y), (sw * p)[:, None] * J


def least_squares_from(law: Law, space: str, logX, y, w, u0, lo, hi) -> tuple[np.ndarray, float]:
    """The least-squares fit in ``space`` from ``u0`` within [lo, hi] (trust-region reflective):
    (u, residual sum of squares). The step every Gaussian fit here takes: ls-log, nls, the intervals."""
    res = least_squares(lambda u: weighted_residuals(law, space, logX, y, w, u), u0,
                        jac=lambda u: residuals_jac(law, space, logX, y, w, u)[1], bounds=(lo, hi), method="trf",
                        ftol=1e-12, xtol=1e-12, gtol=1e-12, max_nfev=2000)
    return res.x, float(2 * res.cost)


class Method:
    name = ""
    description = ""
    space = "log"  # where residuals, R^2 and AIC are measured

    def supports(self, law: Law) -> bool:
        return True

    def objective(self, law: Law, logX, y, logy, w, u) -> float:
        # methods that search their own way (the paper's grid) override ``fit`` instead
        raise TypeError(f"method '{self.name}' has no pointwise objective")

    def objective_many(self, law: Law, logX, y, logy, w, U) -> np.ndarray:
        return np.array([self.objective(law, logX, y, logy, w, u) for u in U])

    def local(self, law: Law, logX, y, logy, w, u0, bounds) -> tuple[np.ndarray, float]:
        raise TypeError(f"method '{self.name}' has no local optimiser")

    def fit(self, law: Law, logX, y, logy, w, starts: np.ndarray | None = None) -> Outcome:
        bounds = law.bounds(logy)
        if starts is None:
            grid = np.array([_clip_inside(s, bounds) for s in law.start_grid(logX, logy)])
            with np.errstate(all="ignore"):
                scores = self.objective_many(law, logX, y, logy, w, grid)
            scores = np.where(np.isfinite(scores), scores, np.inf)
            starts = grid[np.argsort(scores, kind="stable")[:N_LOCAL_STARTS]]
        us, objs = [], []
        for s in starts:
            with np.errstate(all="ignore"):
                u, obj = self.local(law, logX, y, logy, w, _clip_inside(np.asarray(s, float), bounds), bounds)
            us.append(u)
            objs.append(obj if np.isfinite(obj) else np.inf)
        return Outcome(*_distinct(us, objs))


class HuberLog(Method):
    name = "huber-log"
    description = METHOD_DESCRIPTIONS[name]

    def _value_grad(self, law, logX, logy, w, u):
        pred, jac = law.log_predict_jac(u, logX)
        r = pred - logy
        a = np.abs(r)
        # Divided by delta so the objective is O(sum |r|), where L-BFGS-B's tolerances bite.
        val = np.where(a <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (a - 0.5 * HUBER_DELTA))
        f = float(np.dot(w, val)) / HUBER_DELTA
        # einsum, not @: a BLAS call per step oversubscribes threads on a busy machine.
        g = np.einsum("ij,i->j", jac, w * np.clip(r, -HUBER_DELTA, HUBER_DELTA)) / HUBER_DELTA
        return f, g

    def objective(self, law, logX, y, logy, w, u):
        return float(self.objective_many(law, logX, y, logy, w, np.asarray(u, float)[None, :])[0])

    def objective_many(self, law, logX, y, logy, w, U):
        r = law.log_predict_many(U, logX) - logy
        a = np.abs(r)
        val = np.where(a <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (a - 0.5 * HUBER_DELTA))
        return (val * w).sum(axis=1) / HUBER_DELTA

    def local(self, law, logX, y, logy, w, u0, bounds):
        res = minimize(
            lambda u: self._value_grad(law, logX, logy, w, u),
            u0,
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 5000, "ftol": 1e-13, "gtol": 1e-10, "maxcor": 20},
        )
        return res.x, float(res.fun)


class _LeastSquares(Method):
    """A Gaussian fit in ``space``: the sum of squared weighted residuals, minimised from each start
    by :func:`least_squares_from`."""

    def residuals(self, law, logX, y, w, u):
        """sqrt(w) (f(u) - y) in ``space``: the residuals whose squares are summed."""
        return weighted_residuals(law, self.space, logX, y, w, u)

    def jacobian(self, law, logX, y, w, u):
        """d residuals / d u, shape (n, k)."""
        return residuals_jac(law, self.space, logX, y, w, u)[1]

    def local(self, law, logX, y, logy, w, u0, bounds):
        return least_squares_from(law, self.space, logX, y, w, u0, *_lo_hi(bounds))


class LSLog(_LeastSquares):
    """Least squares on log L: the Gaussian fit in log space that the profile and Wald intervals
    assume, so that the estimate and its interval come from one likelihood."""

    name = "ls-log"
    description = METHOD_DESCRIPTIONS[name]

    def objective_many(self, law, logX, y, logy, w, U):
        r = law.log_predict_many(U, logX) - logy
        return (r * r * w).sum(axis=1)


class NLS(_LeastSquares):
    name = "nls"
    description = METHOD_DESCRIPTIONS[name]
    space = "linear"

    def objective(self, law, logX, y, logy, w, u):
        return float(self.objective_many(law, logX, y, logy, w, np.asarray(u, float)[None, :])[0])

    def objective_many(self, law, logX, y, logy, w, U):
        r = np.exp(law.log_predict_many(U, logX)) - y
        return (r * r * w).sum(axis=1)


class Paper(Method):
    """The seed study's fit, for reproduction: it is biased towards the grid's upper edge."""

    name = "paper"
    description = METHOD_DESCRIPTIONS[name]

    def supports(self, law):
        return law.name in ("power", "power-floor")

    def fit(self, law, logX, y, logy, w, starts=None):
        u, r2 = paper_fit(law, logX[:, 0], y, w)
        return Outcome(u, -r2, u[None, :])


def paper_grid(y: np.ndarray) -> np.ndarray:
    return np.linspace(0.0, 0.99 * float(np.min(y)), PAPER_GRID)


def paper_fit(law: Law, logp: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float]:
    cs = paper_grid(y) if law.floor else np.zeros(1)
    z = np.log(y[None, :] - cs[:, None])
    sw = w.sum()
    xm = np.dot(w, logp) / sw
    zm = (z @ w) / sw
    dx = logp - xm
    dz = z - zm[:, None]
    sxx = np.dot(w, dx * dx)
    slope = (dz * (w * dx)).sum(axis=1) / sxx
    resid = dz - slope[:, None] * dx[None, :]
    ss_res = (resid * resid) @ w
    ss_tot = (dz * dz) @ w
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, -np.inf)
    best = int(np.argmax(r2))
    log_a = zm[best] - slope[best] * xm
    with np.errstate(divide="ignore"):
        if law.floor:
            u = np.array([log_a, -slope[best], np.log(cs[best])])
        else:
            u = np.array([log_a, -slope[best]])
    return u, float(r2[best])


def paper_on_edge(c: float, y: np.ndarray) -> bool:
    grid = paper_grid(y)
    return c <= grid[0] or c >= grid[-1]


# by name, in the order of cellscale.fit.defaults.METHOD_NAMES (where the command line reads the names)
METHODS: dict[str, Method] = dict(zip(METHOD_NAMES, (HuberLog(), LSLog(), NLS(), Paper())))
