"""Confidence intervals for a fitted law, by name (``fit_table(..., interval=NAME)``).

Measured against each other in ``docs/intervals.md`` (``benchmarks/interval_coverage.py``):

- ``profile``: profile likelihood of a Gaussian in the method's space (log L for huber-log,
  ls-log and paper, L for nls), calibrated by t on n - k degrees of freedom (Bates & Watts 1988,
  ch. 6: the profile-t interval; exact for a linear model). No resampling; follows the
  curvature of the law, so a floor or exponent that the data pin down only on one side gets
  a one-sided long interval, running to the bound where the data never exclude it.
- ``wald-t``: the same Gaussian fit, estimate +- t_{n-k} standard errors from
  s^2 (J'J)^-1 in the fitting parameterisation (log amplitudes), mapped to natural scale.
- ``residual-t``: studentized (percentile-t) residual bootstrap of the method's own
  estimator: leverage-adjusted residuals resampled onto the fitted curve (Davison &
  Hinkley 1997, alg. 6.3), each resample's estimate divided by its own standard error.
- ``residual``: percentile intervals of the same residual bootstrap.
- ``bca-groups``: the earlier default; BCa percentiles of a bootstrap over run groups
  (rows sharing x values resample together) with jackknife acceleration. With one seed
  per size it resamples the sizes themselves, and with a handful of sizes it over-covers.

Every method but the two Gaussian ones spends ``bootstrap`` resamples; those two still draw
a residual bootstrap of that size when ``bootstrap > 0``, for the prediction bands and the
compute-optimal intervals that need samples.

The evaluation cells' noise (``cell_shift``: (B, n) shifts of each point's loss on resamples of the
cells that every run was scored on; ``cellscale.fit.cells``) is a common shift of the ladder that no
residual shows. The bootstrap methods resample it jointly: the b-th resample's losses get the b-th
shift added (``residual``, ``residual-t``: onto the simulated losses; ``bca-groups``: onto the
observed losses under the group weights). The Gaussian methods do not resample, so the cell
resamples are fitted alone (the observed losses plus each shift) and each side of each interval is
widened by the cells' spread on that side, in quadrature, in the fitting parameterisation
(:func:`quadrature_widen`); their residual bootstrap gets the shifts added as well, so that every
resample a fit exposes holds the cells' noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import brentq, least_squares
from scipy.stats import t as student_t

from cellscale.errors import FitError
from cellscale.fit.bootstrap import (
    Resamples,
    bca_ci,
    fit_resamples,
    jackknife_weights,
    resample_weights,
    run_bootstrap,
)

# the interval methods' names, descriptions and default live in fit.defaults (stdlib, read by the command line)
from cellscale.fit.defaults import DEFAULT_INTERVAL, DESCRIPTIONS, INTERVALS, default_interval  # noqa: F401
from cellscale.fit.laws.base import Law
from cellscale.fit.methods import least_squares_from, residuals_jac, weighted_residuals

LEVEL = 0.95
# More failed resamples than this share marks a fit's intervals as unreliable.
FAILED_FRACTION_FLAG = 0.05


def check_interval(name: str) -> str:
    if name not in DESCRIPTIONS:
        raise FitError(f"unknown interval method '{name}' (available: {', '.join(INTERVALS)})")
    return name


# ---- the Gaussian fit in the method's space -------------------------------------------------

def _n_dof(law: Law, w) -> tuple[float, int]:
    """(effective n, residual degrees of freedom): the sum of the resampling counts/weights
    where they are counts, the number of used rows otherwise."""
    n = float(np.sum(w > 0))
    return n, int(n) - law.n_params


def standard_errors(law: Law, space: str, logX, y, w, u) -> np.ndarray:
    """s sqrt(diag (J'J)^-1) in u, with s^2 = RSS / (n - k); NaN where not identified."""
    r, J = residuals_jac(law, space, logX, y, w, u)
    _, dof = _n_dof(law, w)
    if dof <= 0:
        return np.full(law.n_params, np.nan)
    s2 = float(r @ r) / dof
    cov = np.linalg.pinv(J.T @ J) * s2
    return np.sqrt(np.clip(np.diag(cov), 0, None))


def se_log(law, logX, y, w, u):
    return standard_errors(law, "log", logX, y, w, u)


def se_linear(law, logX, y, w, u):
    return standard_errors(law, "linear", logX, y, w, u)


def _bounds_arrays(law: Law, y) -> tuple[np.ndarray, np.ndarray]:
    b = law.bounds(np.log(y))
    return np.array([x[0] for x in b], float), np.array([x[1] for x in b], float)


def gaussian_fit(law: Law, space: str, logX, y, w, starts) -> tuple[np.ndarray, float]:
    """Least squares in ``space`` from each start: (u, residual sum of squares)."""
    lo, hi = _bounds_arrays(law, y)
    best_u, best_s = None, np.inf
    for s in starts:
        u0 = np.clip(np.asarray(s, float), lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo))
        with np.errstate(all="ignore"):
            u, rss = least_squares_from(law, space, logX, y, w, u0, lo, hi)
        if np.isfinite(rss) and rss < best_s:
            best_u, best_s = u, rss
    if best_u is None:
        raise FitError("the least-squares fit behind the intervals found no finite solution")
    return best_u, best_s


# ---- profile-t --------------------------------------------------------------------------------

@dataclass
class _Profile:
    law: Law
    space: str
    logX: np.ndarray
    y: np.ndarray
    w: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    warm: np.ndarray = field(default_factory=lambda: np.empty(0))

    def rss(self, j: int, value: float) -> float:
        """The smallest RSS with u_j held at ``value`` (warm-started from the last one)."""
        free = np.arange(self.lo.size) != j
        law, space, logX, y, w = self.law, self.space, self.logX, self.y, self.w

        def full(v):
            u = np.empty(self.lo.size)
            u[free], u[j] = v, value
            return u

        v0 = np.clip(self.warm[free], self.lo[free] + 1e-12, self.hi[free] - 1e-12)
        with np.errstate(all="ignore"):
            res = least_squares(lambda v: weighted_residuals(law, space, logX, y, w, full(v)), v0,
                                jac=lambda v: residuals_jac(law, space, logX, y, w, full(v))[1][:, free],
                                bounds=(self.lo[free], self.hi[free]), method="trf",
                                ftol=1e-10, xtol=1e-10, gtol=1e-10, max_nfev=500)
        if np.isfinite(res.cost):
            self.warm = full(res.x)
        return 2 * float(res.cost) if np.isfinite(res.cost) else np.inf

    def side(self, j: int, u_hat: np.ndarray, rss_min: float, excess: float, step: float, sign: int) -> float:
        """Where the profile RSS first exceeds rss_min + excess on one side of u_hat[j]
        (the bound, where it never does)."""
        bound = self.hi[j] if sign > 0 else self.lo[j]
        self.warm = u_hat.copy()
        x_prev = float(u_hat[j])
        for _ in range(60):
            x = x_prev + sign * step
            if (x - bound) * sign >= 0:
                x = bound
            warm_prev = self.warm.copy()
            d = self.rss(j, x) - rss_min - excess
            if d >= 0:
                return self._root(j, x_prev, x, warm_prev, rss_min + excess, step)
            if x == bound:
                return bound
            x_prev, step = x, step * 1.6
        return bound

    def _root(self, j: int, inside: float, outside: float, warm: np.ndarray, level: float, step: float) -> float:
        """Where the profile RSS crosses ``level`` between ``inside`` and ``outside``, each
        evaluation warm-started from the solution at ``inside``. The nuisance fit is not convex,
        so a start can land elsewhere: where the ends do not bracket a crossing, the interval
        ends at the outer point (the wider, conservative choice)."""
        def g(z):
            self.warm = warm.copy()
            return self.rss(j, z) - level

        if inside == outside:
            return outside
        try:
            return brentq(g, inside, outside, xtol=1e-6 * max(step, 1e-12), maxiter=60)
        except ValueError:
            return outside


@dataclass(frozen=True)
class _GaussianFit:
    """What both Gaussian intervals start from: the least-squares fit in the fitting
    parameterisation, its residual sum of squares and degrees of freedom, standard errors, the
    t quantile of the level, and the parameters' bounds."""

    u_hat: np.ndarray
    rss_min: float
    dof: int
    se: np.ndarray
    tq: float
    lo_b: np.ndarray
    hi_b: np.ndarray


def _gaussian_fit_for(law: Law, space: str, logX, y, w, starts, level: float) -> _GaussianFit | None:
    """None when there are no degrees of freedom left (n <= k): no interval then."""
    _, dof = _n_dof(law, w)
    if dof <= 0:
        return None
    u_hat, rss_min = gaussian_fit(law, space, logX, y, w, starts)
    lo_b, hi_b = _bounds_arrays(law, y)
    return _GaussianFit(u_hat=u_hat, rss_min=rss_min, dof=dof, se=standard_errors(law, space, logX, y, w, u_hat),
                        tq=float(student_t.ppf(0.5 + level / 2, dof)), lo_b=lo_b, hi_b=hi_b)


def _no_interval(law: Law) -> tuple[np.ndarray, np.ndarray]:
    return np.full(law.n_params, np.nan), np.full(law.n_params, np.nan)


def profile_ci(law: Law, space: str, logX, y, w, starts, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Profile-t intervals in natural parameters (NaN when n <= k)."""
    g = _gaussian_fit_for(law, space, logX, y, w, starts, level)
    if g is None:
        return _no_interval(law)
    rise = g.tq * g.tq * (g.rss_min / g.dof)  # t^2 s^2
    prof = _Profile(law, space, logX, y, w, g.lo_b, g.hi_b)
    u_lo, u_hi = np.empty(law.n_params), np.empty(law.n_params)
    for j in range(law.n_params):
        step = float(g.se[j]) if np.isfinite(g.se[j]) and g.se[j] > 0 else 0.1 * (1 + abs(g.u_hat[j]))
        step = min(step, 0.5 * (g.hi_b[j] - g.lo_b[j]))
        u_lo[j] = prof.side(j, g.u_hat, g.rss_min, rise, step, -1)
        u_hi[j] = prof.side(j, g.u_hat, g.rss_min, rise, step, +1)
    return law.to_natural(u_lo), law.to_natural(u_hi)


def wald_t_ci(law: Law, space: str, logX, y, w, starts, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    g = _gaussian_fit_for(law, space, logX, y, w, starts, level)
    if g is None:
        return _no_interval(law)
    with np.errstate(invalid="ignore"):
        return (law.to_natural(np.clip(g.u_hat - g.tq * g.se, g.lo_b, g.hi_b)),
                law.to_natural(np.clip(g.u_hat + g.tq * g.se, g.lo_b, g.hi_b)))


# ---- the residual bootstrap -------------------------------------------------------------------

def residual_draws(law: Law, space: str, logX, y, w, u_hat, n_boot: int, seed: int,
                   blocks: np.ndarray | None = None) -> np.ndarray:
    """(n_boot, n) simulated losses: the fitted curve plus resampled residuals.

    Residuals are weighted (sqrt w), divided by sqrt(1 - leverage) so that they have the
    spread of the errors rather than of the fit's residuals, and centred. With ``blocks`` (a block
    id per row: the run a cooldown-branch point came from) the draw is two-level (Davison & Hinkley
    1997, sec. 3.8): each block's mean residual and the rows' deviations from it are resampled
    apart, so that the points of one run keep the offset they share."""
    used = w > 0
    rng = np.random.default_rng(seed)
    if blocks is None:
        r, J = residuals_jac(law, space, logX, y, w, u_hat)
        with np.errstate(all="ignore"):
            hat = np.einsum("ij,jk,ik->i", J, np.linalg.pinv(J.T @ J), J)
        e = -r[used] / np.sqrt(np.clip(1.0 - hat[used], 1e-3, None))
        draws = (e - e.mean())[rng.integers(0, e.size, size=(n_boot, int(used.sum())))]
    else:
        level, within = residual_levels(law, space, logX, y, w, u_hat, blocks)
        _, idx = np.unique(np.asarray(blocks)[used], return_inverse=True)
        shared = level[rng.integers(0, level.size, size=(n_boot, level.size))][:, idx]
        draws = shared + within[rng.integers(0, within.size, size=(n_boot, within.size))]
    lp = law.log_predict(u_hat, logX)
    noise = np.zeros((n_boot, y.size))
    noise[:, used] = draws / np.sqrt(w[used])
    if space == "log":
        return np.exp(lp[None, :] + noise)
    return np.exp(lp)[None, :] + noise


def residual_levels(law: Law, space: str, logX, y, w, u_hat, blocks) -> tuple[np.ndarray, np.ndarray]:
    """The fit's residuals (data minus fit, weighted, in ``space``) of the used rows in two levels,
    each centred: each block's mean, divided by sqrt(1 - its leverage) (the mean of the hat matrix
    over the block's pairs of rows: a fit with few blocks absorbs much of their shared offsets, and
    this gives them back their spread, as a row's leverage does for its residual); and each row's
    deviation from its block's mean."""
    r, J = residuals_jac(law, space, logX, y, w, u_hat)
    used = w > 0
    e, J = -r[used], J[used]
    with np.errstate(all="ignore"):
        hat = J @ np.linalg.pinv(J.T @ J) @ J.T
    _, idx = np.unique(np.asarray(blocks)[used], return_inverse=True)
    g = int(idx.max()) + 1
    size = np.bincount(idx, minlength=g)
    means = np.bincount(idx, weights=e, minlength=g) / size
    within = e - means[idx]
    member = (idx[None, :] == np.arange(g)[:, None]).astype(float)
    leverage = np.einsum("gi,ij,gj->g", member, hat, member) / size**2
    means = means / np.sqrt(np.clip(1.0 - leverage, 1e-3, None))
    return means - means.mean(), within - within.mean()


def studentized_ci(samples_u: np.ndarray, se_star: np.ndarray, u_hat: np.ndarray, se_hat: np.ndarray,
                   law: Law, y, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-t: u_hat - q(1 - tail) se .. u_hat - q(tail) se, q of (u* - u_hat) / se*."""
    k = law.n_params
    lo_b, hi_b = _bounds_arrays(law, y)
    u_lo, u_hi = np.full(k, np.nan), np.full(k, np.nan)
    tail = (1 - level) / 2
    for j in range(k):
        with np.errstate(all="ignore"):
            tj = (samples_u[:, j] - u_hat[j]) / se_star[:, j]
        tj = tj[np.isfinite(tj)]
        if tj.size < 10 or not np.isfinite(se_hat[j]):
            continue
        q_lo, q_hi = np.quantile(tj, [tail, 1 - tail])
        u_lo[j] = np.clip(u_hat[j] - q_hi * se_hat[j], lo_b[j], hi_b[j])
        u_hi[j] = np.clip(u_hat[j] - q_lo * se_hat[j], lo_b[j], hi_b[j])
    with np.errstate(invalid="ignore"):
        return law.to_natural(u_lo), law.to_natural(u_hi)


def percentile_ci(samples: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    ok = samples[np.all(np.isfinite(samples), axis=1)]
    k = samples.shape[1]
    if ok.shape[0] == 0:
        return np.full(k, np.nan), np.full(k, np.nan)
    tail = 100 * (1 - level) / 2
    return np.percentile(ok, tail, axis=0), np.percentile(ok, 100 - tail, axis=0)


# ---- one entry point --------------------------------------------------------------------------

@dataclass(frozen=True)
class CellNoise:
    """How the evaluation cells' noise entered the intervals: ``how``, over how many cell resamples,
    the intervals without it (natural parameters, before the floor is shifted back), the floor's
    standard deviation due to the cells (None for a law without a floor) and the cell resamples
    that could not be fitted (the Gaussian methods' cell-only refits; a joint resample that fails is
    counted with the bootstrap's failures)."""

    how: str
    resamples: int
    lo: np.ndarray
    hi: np.ndarray
    floor_sd: float | None = None
    failed: int = 0


@dataclass
class Intervals:
    lo: np.ndarray
    hi: np.ndarray
    boot: Resamples | None  # the resamples behind bands (None without a bootstrap)
    kind: str | None  # "run groups" or "residuals"
    jackknife_failed: int = 0
    centre: np.ndarray | None = None  # the Gaussian fit the profile / wald-t intervals are built on
    cells: CellNoise | None = None  # how the evaluation cells' noise entered (None: it did not)

    @property
    def samples(self) -> np.ndarray:
        return self.boot.samples if self.boot is not None else np.empty((0, self.lo.size))

    def outside(self, theta: np.ndarray, names) -> list[str]:
        """Parameters whose fitted value lies outside their own interval (a Gaussian interval is
        centred on the least-squares estimate, which outliers can pull away from a robust fit's)."""
        with np.errstate(invalid="ignore"):
            bad = (theta < self.lo) | (theta > self.hi)
        return [n for n, b in zip(names, bad) if b]

    def summary(self, name: str, n_boot: int, law: Law | None = None, theta: np.ndarray | None = None) -> dict:
        """The fit.json fields: method, resamples, failures and the > 5 % flag."""
        failed = self.boot.n_failed if self.boot is not None else 0
        frac = failed / n_boot if n_boot else 0.0
        extra = {}
        if law is not None and theta is not None:
            extra["estimate_outside_interval"] = self.outside(theta, law.param_names)
            if self.centre is not None:
                extra["interval_centre"] = {n: float(v) for n, v in zip(law.param_names, self.centre)}
        return {**extra,
            "interval": name,
            "ci_method": DESCRIPTIONS[name],
            "ci_level": LEVEL,
            "bootstrap": int(n_boot),
            "bootstrap_kind": self.kind,
            "bootstrap_failed": int(failed),
            "bootstrap_failed_fraction": frac,
            "bootstrap_failures": self.boot.failures() if self.boot is not None else {},
            "bootstrap_unreliable": bool(frac > FAILED_FRACTION_FLAG),
            "jackknife_failed": int(self.jackknife_failed),
        }


def _group_intervals(method, law, data, theta, starts, n_boot, seed, n_jobs, shift=None) -> Intervals:
    k = law.n_params
    if n_boot == 0:
        return Intervals(np.full(k, np.nan), np.full(k, np.nan), None, None)
    W = resample_weights(data.groups, n_boot, seed)
    Y = data.y if shift is None else data.y[None, :] + shift
    boot = run_bootstrap(method.name, law, data.X, Y, data.weights, W, starts, n_jobs=n_jobs)
    jack = run_bootstrap(method.name, law, data.X, data.y, data.weights, jackknife_weights(data.groups),
                         starts, n_jobs=n_jobs)
    lo, hi = bca_ci(boot.samples, theta, jack.samples)
    return Intervals(lo, hi, boot, "run groups", jack.n_failed)


def _residual_boot(method, law, data, u_hat, starts, n_boot, seed, n_jobs, studentize, blocks=None,
                   shift=None) -> Resamples:
    space = "linear" if method.space == "linear" else "log"
    Y = residual_draws(law, space, data.logX, data.y, data.weights, u_hat, n_boot, seed, blocks=blocks)
    if shift is not None:
        Y = Y + shift  # the b-th cell resample's shift onto the b-th simulated losses
    se_fn = (se_linear if space == "linear" else se_log) if studentize else None
    return fit_resamples(method.name, law, data.X, Y, np.broadcast_to(data.weights, Y.shape), starts,
                         n_jobs=n_jobs, se_fn=se_fn)


def _intervals(name: str, method, law: Law, data, u_hat: np.ndarray, starts: np.ndarray, *, n_boot: int,
               seed: int, n_jobs: int | None, blocked: bool, shift: np.ndarray | None) -> Intervals:
    """The intervals of ``name``; ``shift`` ((n_boot, n) or None) is added to the b-th resample's losses."""
    theta = law.to_natural(u_hat)
    if name == "bca-groups":
        return _group_intervals(method, law, data, theta, starts, n_boot, seed, n_jobs, shift=shift)
    space = "linear" if method.space == "linear" else "log"
    k = law.n_params
    boot = None
    if n_boot > 0:
        boot = _residual_boot(method, law, data, u_hat, starts, n_boot, seed, n_jobs, name == "residual-t",
                              blocks=data.groups if blocked else None, shift=shift)
    nan = np.full(k, np.nan)
    g_starts = np.vstack([u_hat[None, :], starts])
    centre = None
    if name in QUADRATURE:
        ci = profile_ci if name == "profile" else wald_t_ci
        lo, hi = ci(law, space, data.logX, data.y, data.weights, g_starts)
        if data.n > k:
            centre = law.to_natural(gaussian_fit(law, space, data.logX, data.y, data.weights, g_starts)[0])
    elif boot is None:
        lo, hi = nan, nan.copy()
    elif name == "residual":
        lo, hi = percentile_ci(boot.samples)
    else:
        se_hat = standard_errors(law, space, data.logX, data.y, data.weights, u_hat)
        with np.errstate(divide="ignore", invalid="ignore"):
            samples_u = np.array([law.from_natural(t) for t in boot.samples])
        lo, hi = studentized_ci(samples_u, boot.extra, u_hat, se_hat, law, data.y)
    return Intervals(lo, hi, boot, "residuals" if boot is not None else None, centre=centre)


# ---- the evaluation cells' noise (module doc) ---------------------------------------------------

QUADRATURE = ("profile", "wald-t")


def _check_shift(shift, n_boot: int, n: int) -> np.ndarray | None:
    """``shift`` as a (B, n) float array, or a one-line FitError; B >= n_boot when there is a bootstrap."""
    if shift is None:
        return None
    shift = np.asarray(shift, dtype=float)
    if shift.ndim != 2 or shift.shape[1] != n:
        raise FitError(f"the cell shifts must be (resamples, {n} fitted points), got {shift.shape}")
    if 0 < shift.shape[0] < n_boot or (shift.shape[0] == 0 and n_boot > 0):
        raise FitError(f"{shift.shape[0]} resamples of the evaluation cells, fewer than bootstrap = {n_boot}: "
                       "draw at least as many (cellscale.fit.cells.cell_draws(n_boot=...))")
    if not np.all(np.isfinite(shift)):
        raise FitError("the resamples of the evaluation cells hold NaN or inf for a fitted point "
                       "(a point with no masked position in its cells?)")
    return shift


def _floor_sd(law: Law, samples: np.ndarray) -> float | None:
    idx = law.floor_index()
    if idx is None:
        return None
    floor = samples[:, idx][np.isfinite(samples[:, idx])]
    return float(np.std(floor, ddof=1)) if floor.size >= 2 else None


def quadrature_widen(law: Law, y, lo, hi, u_centre, u_hat, cell_u, level: float = LEVEL
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Intervals ``lo``..``hi`` (natural, built around ``u_centre``) widened on each side by the cell
    refits' spread ``cell_u`` (fitting parameterisation, one row per refit) on that side of the
    method's estimate ``u_hat``, in quadrature, in the fitting parameterisation:
    u_lo' = u_c - sqrt((u_c - u_lo)^2 + h_lo^2), h_lo = max(u_hat - q_tail(cell_u), 0), and likewise
    above; clipped to the law's bounds. NaN stays NaN, and so does every interval when fewer than
    two refits are finite (the cells' spread is then unknown)."""
    lo_b, hi_b = _bounds_arrays(law, y)
    ok = cell_u[np.all(np.isfinite(cell_u), axis=1)]
    h_lo = h_hi = np.full(law.n_params, np.nan)
    if ok.shape[0] >= 2:
        tail = 100 * (1 - level) / 2
        q_lo, q_hi = np.percentile(ok, [tail, 100 - tail], axis=0)
        h_lo, h_hi = np.maximum(u_hat - q_lo, 0.0), np.maximum(q_hi - u_hat, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        u_lo, u_hi = law.from_natural(np.asarray(lo, float)), law.from_natural(np.asarray(hi, float))
        new_lo = np.clip(u_centre - np.hypot(u_centre - u_lo, h_lo), lo_b, hi_b)
        new_hi = np.clip(u_centre + np.hypot(u_hi - u_centre, h_hi), lo_b, hi_b)
        return law.to_natural(new_lo), law.to_natural(new_hi)


def _quadrature(out: Intervals, name: str, method, law: Law, data, u_hat, starts, shift, n_jobs) -> CellNoise:
    """Fit the cell resamples alone (the observed losses plus each shift, the data's weights) and
    widen ``out`` by their spread (:func:`quadrature_widen`); the record of it."""
    Y = data.y[None, :] + shift
    cells = fit_resamples(method.name, law, data.X, Y, np.broadcast_to(data.weights, Y.shape), starts,
                          n_jobs=n_jobs)
    with np.errstate(divide="ignore", invalid="ignore"):
        cell_u = np.array([law.from_natural(t) for t in cells.samples]).reshape(-1, law.n_params)
    u_centre = law.from_natural(out.centre) if out.centre is not None else u_hat
    record = CellNoise(how=f"quadrature with the {name} interval", resamples=int(shift.shape[0]), lo=out.lo,
                       hi=out.hi, floor_sd=_floor_sd(law, cells.samples), failed=cells.n_failed)
    out.lo, out.hi = quadrature_widen(law, data.y, out.lo, out.hi, u_centre, u_hat, cell_u)
    return record


def _joint_record(name: str, law: Law, joint: Intervals, plain: Intervals, n_boot: int) -> CellNoise:
    """The joint resamples against the same bootstrap without the cells (same seed, same draws):
    the floor's cell part is sqrt(var(joint) - var(without)), the two being drawn independently."""
    sd_joint, sd_plain = _floor_sd(law, joint.samples), _floor_sd(law, plain.samples)
    part = None if sd_joint is None or sd_plain is None else float(np.sqrt(max(sd_joint**2 - sd_plain**2, 0.0)))
    kind = "group" if name == "bca-groups" else "residual"
    return CellNoise(how=f"joint with the {kind} bootstrap", resamples=int(n_boot), lo=plain.lo, hi=plain.hi,
                     floor_sd=part)


def compute_intervals(name: str, method, law: Law, data, u_hat: np.ndarray, starts: np.ndarray, *,
                      n_boot: int, seed: int, n_jobs: int | None, blocked: bool = False,
                      cell_shift: np.ndarray | None = None) -> Intervals:
    """Intervals of ``name`` for the fit ``u_hat`` of ``method`` on ``data`` (a FitData); ``blocked``:
    the residual bootstrap draws two levels, the groups of ``data`` as blocks (:func:`residual_draws`).

    ``cell_shift``: (B, n) shifts of the fitted points' losses on B resamples of the evaluation
    cells (each resample's losses minus the losses on all the cells), or None. The bootstrap takes
    its first ``n_boot`` rows (a FitError when there are fewer); the Gaussian methods' cell refits
    take all B. How it entered is ``Intervals.cells`` (module doc)."""
    shift = _check_shift(cell_shift, n_boot, data.n)
    joint = shift[:n_boot] if shift is not None and n_boot > 0 else None
    kw = dict(n_boot=n_boot, seed=seed, n_jobs=n_jobs, blocked=blocked)
    out = _intervals(name, method, law, data, u_hat, starts, shift=joint, **kw)
    if shift is None:
        return out
    if shift.shape[0] == 0 or (joint is None and name not in QUADRATURE):
        out.cells = CellNoise(how="none: no resamples (bootstrap = 0)", resamples=0, lo=out.lo, hi=out.hi)
    elif name in QUADRATURE:
        out.cells = _quadrature(out, name, method, law, data, u_hat, starts, shift, n_jobs)
    else:
        out.cells = _joint_record(name, law, out, _intervals(name, method, law, data, u_hat, starts, shift=None, **kw),
                                  n_boot)
    return out
