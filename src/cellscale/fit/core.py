"""fit_table / fit_csv: one call from a table of runs to a fitted law with intervals."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd

from cellscale.errors import FitError
from cellscale.fit import defaults
from cellscale.fit.cells import CellDraws, cell_shift, sweep_cell_draws
from cellscale.fit.compare import information_criteria, r_squared, residuals
from cellscale.fit.compute_optimal import compute_optimal
from cellscale.fit.data import FitData, finished_mask, n_distinct_rows, prepare
from cellscale.fit.entropy import entropy_summary, reaches_zero
from cellscale.fit.intervals import Intervals, check_interval, compute_intervals, default_interval
from cellscale.fit.judge import judge
from cellscale.fit.laws import LAWS
from cellscale.fit.laws.base import Law
from cellscale.fit.methods import METHODS, Method, paper_fit, paper_on_edge
from cellscale.fit.result import FitResult
from cellscale.fit.threads import blas_single_thread
from cellscale.rules.lossbounds import lowest_loss
from cellscale.rules.lrgrid import CHOICE_COLUMN, FITTED_COLUMN, fitted_column
from cellscale.rules.plateau import doubling_gain
from cellscale.runtime.io import verify_checksum
from cellscale.schema import RUNS_DIR


def _lookup(law: str, method: str) -> tuple[Law, Method]:
    if law not in LAWS:
        raise FitError(f"unknown law '{law}' (available: {', '.join(sorted(LAWS))})")
    if method not in METHODS:
        raise FitError(f"unknown method '{method}' (available: {', '.join(sorted(METHODS))})")
    law_obj, method_obj = LAWS[law], METHODS[method]
    if not method_obj.supports(law_obj):
        raise FitError(
            f"method '{method}' fits only power and power-floor (it reproduces the seed study); "
            f"use --method huber-log or nls for '{law}'"
        )
    return law_obj, method_obj


def _fit(law: Law, method: Method, data: FitData, w: np.ndarray | None = None):
    w = data.weights if w is None else w
    return method.fit(law, data.logX, data.y, data.logy, w)


def _criteria(law: Law, method: Method, data: FitData, theta: np.ndarray) -> tuple[float, float]:
    pred = law.predict(theta, data.X)
    return information_criteria(residuals(method.space, data.y, pred), law.n_params, data.weights)


def _no_floor(law: Law, method: Method, data: FitData, aic: float, bic: float) -> dict | None:
    """The same law without its floor, fitted to the same points, and its criteria against the law's
    own (``aic``, ``bic``)."""
    partner = law.no_floor()
    if partner is None:
        return None
    if data.n <= partner.n_params or n_distinct_rows(data.X) < partner.n_params:
        return {"law": partner.name, "aic": None, "bic": None, "params": None}
    method_used = method if method.supports(partner) else METHODS["huber-log"]
    outcome = _fit(partner, method_used, data)
    theta = partner.to_natural(outcome.u)
    p_aic, p_bic = _criteria(partner, method_used, data, theta)
    out = {
        "law": partner.name,
        "method": method_used.name,
        "aic": p_aic,
        "bic": p_bic,
        "params": {n: float(v) for n, v in zip(partner.param_names, theta)},
    }
    if p_aic is not None and np.isfinite(aic):
        out.update(delta_aic=p_aic - aic, delta_bic=p_bic - bic,
                   note="delta = no-floor minus with-floor; positive favours the floor")
    return out


def _leave_largest_out(law: Law, method: Method, data: FitData, unit: str = "mse", lowest: float = 0.0) -> dict:
    """Refit without the largest x and predict it. The errors are read as the convergence rule reads
    a change (``cellscale.rules.plateau.doubling_gain``): relative for an MSE, sign-free for bits;
    ``lowest`` (subtracted from the fitted y) is added back to the numbers shown."""
    largest = data.X[:, 0].max()
    held = data.X[:, 0] == largest
    rest = data.subset(~held)
    base = {"x": float(largest), "n_heldout": int(held.sum())}
    if n_distinct_rows(rest.X) < law.n_params or np.ptp(rest.X, axis=0).min() == 0:
        return {**base, "predicted": None, "observed": None, "rel_error": None,
                "note": "too few configurations left without the largest model"}
    outcome = _fit(law, method, rest)
    pred = law.predict(law.to_natural(outcome.u), data.X[held]) + lowest
    obs = data.y[held] + lowest
    errors = [doubling_gain(float(p), float(o), unit) for p, o in zip(pred, obs)]
    return {
        **base,
        "predicted": float(pred.mean()),
        "observed": float(obs.mean()),
        "rel_error": doubling_gain(float(pred.mean()), float(obs.mean()), unit),
        "mean_abs_rel_error": float(np.mean(np.abs(errors))),
    }


def _goodness(law: Law, method: Method, data: FitData, theta: np.ndarray, pred: np.ndarray,
              lowest: float) -> tuple[float, str, bool, list[float]]:
    """(R^2, its definition, whether the floor is on its bound, the floor's bounds shifted back by
    ``lowest``) on the fitted scale."""
    if method.name == "paper":
        _, r2 = paper_fit(law, data.logX[:, 0], data.y, data.weights)
        fidx = law.floor_index()
        at_boundary = fidx is not None and paper_on_edge(float(theta[fidx]), data.y)
        return (r2, "R^2 of the least-squares line log(L - c) on log P (the seed study's)", bool(at_boundary),
                [lowest, lowest + 0.99 * float(data.y.min())])
    return (r_squared(data.y, pred), "1 - SS_res / SS_tot of y on the linear scale",
            bool(law.floor_on_bound(theta, data.y)), [lowest + b for b in law.floor_bounds(data.y)])


def _judgement(law: Law, method: Method, data: FitData, theta: np.ndarray, pred: np.ndarray, r2: float,
               at_boundary: bool, floor_ci: tuple[float, float] | None) -> dict:
    """``judge`` on the fitted scale (``theta``, ``pred`` and the floor's interval ``floor_ci`` before
    the floor is shifted back). The floor is not identified either on its bound or when its interval
    runs down to the bottom of its range (unbounded below: no measurement)."""
    space_y = np.log(data.y) if method.space == "log" else data.y
    with np.errstate(divide="ignore", invalid="ignore"):
        res = residuals(method.space, data.y, pred)
    names = list(law.param_names)
    fidx = law.floor_index()
    out = judge(data.X, data.y, space_y=space_y, residuals=res, n_params=law.n_params,
                one_variable=law.n_vars == 1, alpha=float(theta[names.index("alpha")]) if "alpha" in names else None,
                r2=r2, floor=float(theta[fidx]) if fidx is not None else None)
    out["floor_interval_reaches_bound"] = bool(floor_ci is not None and reaches_zero(floor_ci))
    out["floor_identified"] = bool(out["floor_identified"] and not at_boundary
                                   and not out["floor_interval_reaches_bound"])
    return out


# the likelihood objectives' loss columns, in bits per masked gene; their MSE columns stay an MSE
LIKELIHOOD_Y = tuple(c for c in (*CHOICE_COLUMN.values(), *FITTED_COLUMN.values()) if c.endswith("_loss"))


def _objectives(df: pd.DataFrame) -> list[str]:
    """The table's objectives (its ``objective`` column), in the order of their first rows."""
    if "objective" not in df.columns:
        return []
    return list(dict.fromkeys(str(o) for o in df["objective"].dropna()))


def fitted_unit(df: pd.DataFrame, y: str | None = None) -> tuple[str, str, float]:
    """The loss column a table is fitted on, its unit and the least loss the objective can score
    there (``cellscale.rules.lossbounds.lowest_loss``). ``y`` defaults to the test loss at the
    validation-chosen checkpoint, which chose nothing (``cellscale.rules.lrgrid.fitted_column``). A
    likelihood objective's ``*_loss`` column is in bits per masked gene, anything else an MSE. The
    objective is the first row's: refusing a table that mixes objectives is ``fit_table``'s, so
    that the report can ask before it has split its runs by depth (``cellscale.report.fitting``)."""
    objectives = _objectives(df)
    if y is None:
        y = fitted_column(df)
    likelihood = any(o != "mse" for o in objectives)
    unit = "bits" if likelihood and y in LIKELIHOOD_Y else "mse"
    return y, unit, lowest_loss(objectives[0] if objectives else "mse", unit)


def _resolve_y(df: pd.DataFrame, y: str | None) -> tuple[str, str, float]:
    """:func:`fitted_unit` for a table the fit takes whole: rows of different objectives are refused
    (their losses are in different units), and so are rows of different sequencing depths."""
    objectives = _objectives(df)
    if len(objectives) > 1:
        raise FitError(f"the table mixes objectives ({', '.join(sorted(objectives))}): "
                       "fit each objective's rows on their own")
    depths = sorted(pd.to_numeric(df["depth"], errors="coerce").dropna().unique()) if "depth" in df.columns else []
    if len(depths) > 1:
        raise FitError(f"the table mixes sequencing depths ({', '.join(f'{d:g}' for d in depths)}): no law here "
                       "has a depth term, so fit "
                       "each depth's rows on their own (the report's fit.json has them under by_depth)")
    return fitted_unit(df, y)


def _excess(df: pd.DataFrame, y: str, lowest: float) -> pd.DataFrame:
    """The table with ``y`` measured from the objective's least loss: the laws are fitted in log
    space, and a gaussian-nll loss in bits (a differential entropy) may be of either sign."""
    if not lowest or y not in df.columns:
        return df
    return df.assign(**{y: pd.to_numeric(df[y], errors="coerce") - lowest})


def floor_shifted(law: Law, arr: np.ndarray, delta: float) -> np.ndarray:
    """``arr`` (parameters, or rows of them) with ``delta`` added to the floor's column."""
    idx = law.floor_index()
    if not delta or idx is None:
        return arr
    out = np.array(arr, dtype=float, copy=True)
    out[..., idx] += delta
    return out


def _one_blas_thread(fit):
    """``fit`` with BLAS held to one thread (``cellscale.fit.threads``): a fit is thousands of tiny
    LAPACK calls, which a multi-threaded BLAS on busy cores turns from milliseconds into seconds."""

    @functools.wraps(fit)
    def wrapped(*args, **kwargs):
        with blas_single_thread():
            return fit(*args, **kwargs)

    return wrapped


def _eval_cells(law: Law, noise, draws, lowest: float) -> dict | None:
    """fit.json's ``eval_cells``: how the evaluation cells' noise entered the intervals
    (``cellscale.fit.intervals.CellNoise``), the floor's sd due to it and the intervals without it."""
    if draws is None or noise is None:
        return None
    meta = draws if isinstance(draws, CellDraws) else CellDraws(values=np.empty((0, 0)))
    lo, hi = (floor_shifted(law, a, lowest) for a in (noise.lo, noise.hi))
    out = {"n_cells": meta.n_cells, "split": meta.split, "resamples": int(noise.resamples), "how": noise.how,
           "floor_sd": noise.floor_sd,
           "ci95_without_cells": {n: [float(a), float(b)] for n, a, b in zip(law.param_names, lo, hi)}}
    if noise.failed:
        out["cell_refits_failed"] = int(noise.failed)
    return out


def _quality(law: Law, method: Method, data: FitData, theta: np.ndarray, ivals: Intervals, lowest: float,
             unit: str, objective: float) -> tuple[float, bool, dict]:
    """R^2, whether the floor is on its bound, and fit.json's blocks on how well the law fits
    (``r2_definition`` to ``leave_largest_out``), from the fit on the excess over ``lowest`` and its
    intervals ``ivals``: the floor's bounds and the losses shown are shifted back by ``lowest``."""
    pred = law.predict(theta, data.X)
    r2, r2_definition, at_boundary, floor_bounds = _goodness(law, method, data, theta, pred, lowest)
    fidx = law.floor_index()
    judgement = _judgement(law, method, data, theta, pred, r2, at_boundary,
                           None if fidx is None else (ivals.lo[fidx], ivals.hi[fidx]))
    aic, bic = _criteria(law, method, data, theta)
    return r2, at_boundary, {
        "r2_definition": r2_definition,
        "floor_bounds": floor_bounds if fidx is not None else None,
        # both measured from lowest_loss
        "floor_over_best_loss": float(theta[fidx]) / float(data.y.min()) if fidx is not None else None,
        "lowest_loss": lowest,
        "objective": objective,
        "method_description": method.description,
        "aic": aic,
        "bic": bic,
        "aic_space": "log(y)" if method.space == "log" else "y",
        "no_floor": _no_floor(law, method, data, aic, bic),
        "judgement": judgement,
        "leave_largest_out": _leave_largest_out(law, method, data, unit, lowest),
    }


def _frontier(law: Law, theta: np.ndarray, samples: np.ndarray, data: FitData, x: list[str], tolerance: float,
              unit: str) -> dict:
    """fit.json's ``compute_optimal`` for a law of model and data size ({} for the others)."""
    if law.name not in ("chinchilla", "data-constrained"):
        return {}
    # data-constrained shares chinchilla's (A, B, E, alpha, beta): its frontier is chinchilla's
    # with fresh cells (no epoch repeated), on the (N, D) columns
    out = compute_optimal(theta[:5], samples[:, :5], X=data.X[:, :2], frame=data.frame, x_cols=x[:2],
                          tolerance=tolerance, unit=unit)
    if law.name == "data-constrained":
        out["note"] = "with fresh cells: no training cell seen twice (R_D = 0)"
    return {"compute_optimal": out}


@_one_blas_thread
def fit_table(
    df: pd.DataFrame,
    *,
    law: str,
    method: str = defaults.METHOD,
    x: list[str] | None = None,
    y: str | None = None,
    bootstrap: int = defaults.BOOTSTRAP,
    seed: int = defaults.SEED,
    groups: list[str] | None = None,
    per_gene_mse=None,
    weights: str | None = None,
    gain_tolerance: float = defaults.GAIN_TOLERANCE,
    n_jobs: int | None = 1,
    interval: str | None = None,
    blocked: bool = False,
    cell_draws: np.ndarray | CellDraws | None = None,
) -> FitResult:
    """Fit ``law`` to the finished runs of ``df`` with ``method`` and a grouped bootstrap.

    ``y`` is the loss column: by default the test loss at the validation-chosen checkpoint
    (``test_mse``; ``test_loss``, bits per masked gene, for a likelihood objective, whose floor is
    then itself the entropy), the validation column where a table has no test loss.
    ``weights`` names a column of row weights (used by every method; meant for ``nls``).
    ``per_gene_mse`` (per-gene errors, e.g. of the best model) adds the heteroscedastic
    entropy. ``gain_tolerance`` is the relative gain per doubling of N below which the
    compute-optimal block calls a model size sufficient. ``n_jobs`` processes fit the
    resamples (None: one per CPU); the numbers do not depend on it. ``interval`` names the
    interval method (``cellscale.fit.intervals.INTERVALS``; default ``default_interval(method)``,
    chosen by coverage in docs/intervals.md); ``bootstrap`` resamples feed it and the
    prediction bands, and each one that fails is counted in the result. ``blocked``: the residual
    bootstrap keeps the rows of one group (``groups``: e.g. the run each cooldown-branch point
    came from) together, drawing a shared group-level residual and row-level deviations apart.
    ``cell_draws``: each row's loss on resamples of the evaluation cells every run was scored on,
    (B, len(df)) aligned with the rows of ``df`` as passed (a bare array, centred on the table's
    y, or a ``cellscale.fit.cells.CellDraws``, centred on its ``observed``): their noise, a shift
    shared by every point that the residuals never show, enters the intervals (``bootstrap`` of
    them for the bootstrap intervals; ``cellscale.fit.intervals``) and ``extra["eval_cells"]``
    records how (None without them).
    """
    interval = check_interval(interval or default_interval(method))
    law_obj, method_obj = _lookup(law, method)
    if bootstrap < 0:
        raise FitError(f"bootstrap must be >= 0, got {bootstrap}")
    x = list(x) if x is not None else list(law_obj.default_x)
    y, loss_unit, lowest = _resolve_y(df, y)
    if lowest and law_obj.floor is None:
        raise FitError(f"law '{law}' has no floor, and a gaussian-nll loss in bits may fall below zero (it is a "
                       "differential entropy): fit a law with a floor (power-floor, chinchilla)")
    # fitted as the excess over the least loss the objective can score; the floor is shifted back
    data = prepare(_excess(df, y, lowest), law_name=law, n_params=law_obj.n_params, variables=law_obj.variables,
                   x=x, y=y, groups=groups, weights=weights)
    shift = None if cell_draws is None else cell_shift(cell_draws, finished_mask(df), data.y, lowest)
    outcome = _fit(law_obj, method_obj, data)
    theta = law_obj.to_natural(outcome.u)
    ivals = compute_intervals(interval, method_obj, law_obj, data, outcome.u, outcome.candidates[:1],
                              n_boot=bootstrap, seed=seed, n_jobs=n_jobs, blocked=blocked, cell_shift=shift)
    interval_fields = ivals.summary(interval, bootstrap, law_obj, theta)
    r2, at_boundary, quality = _quality(law_obj, method_obj, data, theta, ivals, lowest, loss_unit, outcome.objective)
    theta, samples, ci_lo, ci_hi = (floor_shifted(law_obj, a, lowest) for a in (theta, ivals.samples, ivals.lo, ivals.hi))
    if lowest and "interval_centre" in interval_fields:
        interval_fields["interval_centre"][law_obj.floor] += lowest
    fidx = law_obj.floor_index()
    floor = float(theta[fidx]) if fidx is not None else None
    floor_ci = (float(ci_lo[fidx]), float(ci_hi[fidx])) if fidx is not None and np.isfinite(ci_lo[fidx]) else None
    extra = {
        **quality,
        "loss_unit": loss_unit,
        "entropy_bits": entropy_summary(floor, floor_ci, None if loss_unit == "bits" else per_gene_mse,
                                        loss_unit=loss_unit),
        **interval_fields,
        "bootstrap_units": (groups if groups is not None else x) if interval == "bca-groups" or blocked else None,
        "bootstrap_blocked": bool(blocked),
        "n_units": int(data.groups.max()) + 1,
        "seed": int(seed),
        "eval_cells": _eval_cells(law_obj, ivals.cells, cell_draws, lowest),
        **_frontier(law_obj, theta, samples, data, x, gain_tolerance, loss_unit),
    }
    return FitResult(law=law_obj, method=method_obj.name, x=x, y=y, theta=theta, samples=samples, ci_lo=ci_lo,
                     ci_hi=ci_hi, n_points=data.n, r2=r2, floor_at_boundary=at_boundary, extra=extra)


def fit_csv(path, *, cells: bool = True, **kwargs) -> FitResult:
    """fit_table on a CSV file (e.g. a sweep's results.csv). ``cells``: in a sweep directory (a
    ``runs/`` folder beside the table, rows with ``run_id``) the intervals hold the evaluation
    cells' noise, drawn from each fitted run's ``runs/<run_id>/cells.npz`` (``cellscale.fit.cells``;
    ``bootstrap`` resamples, seeded by ``seed``). Where they cannot be had (a file missing, no
    resamples) the fit goes on without them and ``extra["eval_cells"]["note"]`` says why."""
    path = Path(path)
    if not path.is_file():
        raise FitError(f"results table not found: {path}; pass the path of a CSV such as SWEEP_DIR/results.csv")
    # a sweep's results.csv carries a checksum: lost rows still parse, so only it can tell
    verify_checksum(path, fix="rerun `cellscale sweep` with the same config and --out to write it again")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise FitError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    note = None
    # a sweep directory has runs/ beside its table; elsewhere there are no cells to look for
    if cells and kwargs.get("cell_draws") is None and (path.parent / RUNS_DIR).is_dir():
        try:
            kwargs["cell_draws"] = sweep_cell_draws(path.parent, df, y=kwargs.get("y"),
                                                    n_boot=int(kwargs.get("bootstrap", defaults.BOOTSTRAP)),
                                                    seed=int(kwargs.get("seed", defaults.SEED)))
        except FitError as err:
            note = f"fitted without the evaluation cells' noise: {err}"
    fit = fit_table(df, **kwargs)
    if note is not None:
        fit.extra["eval_cells"] = {"note": note}
    return fit
