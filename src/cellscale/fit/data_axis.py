"""The data axis: a joint law L(N, D) on the cooled-down branch points of a sweep, and what it says.

``fit_data_axis(branches)`` fits ``chinchilla`` (L = E + A/N^alpha + B/D^beta on parameters and cells
seen) or, where runs differ in their unique training cells, ``data-constrained`` (which discounts
repeated epochs; Muennighoff et al. 2023) to every point, then reads from the fitted law:

- each size's **converged loss** L(N, D -> inf): what unlimited training on its data would reach,
  with a bootstrap percentile interval (under ``data-constrained``, at the size's own training set);
- the **size law on the converged losses**, L(N, D -> inf) as a function of N, whose floor (E, plus
  the data-limited term under ``data-constrained``) does not depend on where any budget ended;
- the **regime** of each size at its largest cells seen: the share by which 10x more cells seen, and
  10x more parameters, would lower its loss (``cellscale.rules.plateau.relative_fall``, so that a loss in
  bits is judged as an MSE is), each with an interval, and which is larger;
- a **prediction** at any (N, D) with an interval that holds both the law's uncertainty and the
  scatter of single runs about it (bootstrap draws of the law, times a resampled residual);
- the compute-optimal frontier (``chinchilla``: ``cellscale.fit.compute_optimal``).

numpy/scipy/pandas only, like the rest of ``cellscale.fit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from cellscale.errors import FitError
from cellscale.fit import defaults
from cellscale.fit.cells import CellDraws
from cellscale.fit.core import fit_table, floor_shifted
from cellscale.fit.data import finished_mask
from cellscale.fit.intervals import residual_levels
from cellscale.fit.methods import METHODS
from cellscale.fit.result import FitResult
from cellscale.rules.plateau import PLATEAU_TOL, gains, got_worse, has_learned, relative_fall
from cellscale.runtime.io import jsonable

Y_DATA = "test_loss"  # the branch column fitted by default: scored on cells that chose nothing
FACTOR = 10.0  # the regime's "more": 10x the cells seen, 10x the parameters
LEVEL = 0.95


def data_law(branches: pd.DataFrame) -> str:
    """``data-constrained`` when the points come from runs on more than one training-set size
    (unique cells, so that repeated epochs are separable), else ``chinchilla``."""
    return "data-constrained" if branches["train_cells"].nunique(dropna=True) > 1 else "chinchilla"


def law_x(law: str) -> list[str]:
    return ["params", "cells_seen", "train_cells"] if law == "data-constrained" else ["params", "cells_seen"]


def _pct(values: np.ndarray) -> list[float | None]:
    ok = values[np.isfinite(values)]
    if ok.size == 0:
        return [None, None]
    tail = 100 * (1 - LEVEL) / 2
    return [float(np.percentile(ok, tail)), float(np.percentile(ok, 100 - tail))]


@dataclass
class DataAxisFit:
    """A joint L(N, D) on branch points and the answers read from it (see the module doc)."""

    result: FitResult
    unit: str  # "mse" or "bits": how relative falls are read (cellscale.rules.plateau.relative_fall)
    sizes: pd.DataFrame  # one row per size: size, params, train_cells, last cells seen, last loss
    # the fit's log residuals in two levels: each run's mean (centred), and each point's deviation from it
    run_residuals: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))
    point_residuals: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))

    # ---- the law at new points -----------------------------------------------------------------
    @property
    def theta_draws(self) -> np.ndarray:
        s = self.result.samples
        return s[np.all(np.isfinite(s), axis=1)] if s.size else s

    def _X(self, params, cells, train_cells=None) -> np.ndarray:
        cols = [np.asarray(params, float), np.asarray(cells, float)]
        if self.result.law.name.startswith("data-constrained"):
            cols.append(np.asarray(train_cells, float))
        return np.column_stack(np.broadcast_arrays(*cols))

    def predict(self, params, cells, train_cells=None) -> np.ndarray:
        return np.asarray(self.result.predict(self._X(params, cells, train_cells)), float).reshape(-1)

    def prediction_interval(self, params, cells, train_cells=None, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Where a new run's loss at (N, D) falls with probability 0.95: each bootstrap law's
        prediction times a new run's offset and a point's deviation, both drawn from the fit's own
        log residuals (a run's mean, and the points' deviations from it)."""
        X = self._X(params, cells, train_cells)
        draws = self.theta_draws
        if draws.shape[0] == 0 or self.point_residuals.size == 0:
            nan = np.full(X.shape[0], np.nan)
            return nan, nan.copy()
        rng = np.random.default_rng(seed)
        preds = np.stack([self.result.law.predict(t, X) for t in draws])
        g, n = self.run_residuals.size, self.point_residuals.size
        s_run = np.sqrt(np.sum(self.run_residuals**2) / max(g - 1, 1))
        s_point = np.sqrt(np.sum(self.point_residuals**2) / max(n - g, 1))
        # Student t draws: the two spreads are estimated from few runs and points
        noise = (s_run * rng.standard_t(max(g - 1, 1), size=preds.shape)
                 + s_point * rng.standard_t(max(n - g, 1), size=preds.shape))
        # the residuals are of the excess over the objective's least loss (0 but for gaussian-nll bits)
        lowest = float(self.result.extra.get("lowest_loss") or 0.0)
        return _pct_rows(lowest + (preds - lowest) * np.exp(noise))

    # ---- converged losses and the size law ---------------------------------------------------
    def _converged(self, theta: np.ndarray, params, train_cells) -> np.ndarray:
        """L(N, D -> inf) under ``theta``: E + A/N^alpha for chinchilla; under data-constrained,
        the law at D = 1e6 x the training cells (where D' has reached its limit U (1 + R_D*))."""
        law = self.result.law
        params = np.asarray(params, float)
        if law.name.startswith("data-constrained"):
            u = np.asarray(train_cells, float)
            X = np.column_stack(np.broadcast_arrays(params, u * 1e6, u))
            return law.predict(theta, X)
        A, _, E, alpha, _ = theta
        return E + A / params**alpha

    def converged(self) -> list[dict[str, Any]]:
        """Each size's L(N, D -> inf), with its interval, beside its last observed point."""
        out = []
        draws = self.theta_draws
        for row in self.sizes.itertuples():
            est = float(self._converged(self.result.theta, [row.params], [row.train_cells])[0])
            ci = [None, None]
            if draws.shape[0]:
                ci = _pct(np.array([self._converged(t, [row.params], [row.train_cells])[0] for t in draws]))
            out.append({"size": row.size, "params": float(row.params), "train_cells": float(row.train_cells),
                        "loss": est, "ci95": ci, "last_cells_seen": float(row.cells_seen),
                        "last_loss": float(row.loss),
                        "still_to_fall": relative_fall(float(row.loss), est, self.unit)})
        return out

    def size_law(self) -> dict[str, Any]:
        """L(N, D -> inf) as a law of N: its floor (N -> inf as well) and exponent, with intervals.
        Under chinchilla the floor is E and its interval the joint fit's own (profile by default);
        under data-constrained it is E plus the data-limited term at the largest training set, with
        a bootstrap percentile interval."""
        law, theta, ci95 = self.result.law, self.result.theta, self.result.ci95
        names = dict(zip(law.param_names, theta))
        u = float(self.sizes["train_cells"].max())
        floor = float(self._converged(theta, [1e30], [u])[0])
        if law.name == "chinchilla":
            floor_ci, how = ci95["E"], f"the joint fit's {self.result.interval} interval of E"
        else:
            draws = self.theta_draws
            floor_ci = _pct(np.array([self._converged(t, [1e30], [u])[0] for t in draws])) if draws.shape[0] else [None, None]
            how = "bootstrap percentile over the joint fit's resamples"
        text = ("L(N, D -> inf) = A N^-alpha + E" if law.name == "chinchilla" else
                "L(N, D -> inf) = E + A/N'^alpha + B/(U (1 + R_D*))^beta at the largest training set U")
        return {"formula": text, "floor": floor, "floor_ci95": [_finite(v) for v in floor_ci], "floor_interval": how,
                "floor_at_boundary": bool(self.result.floor_at_boundary), "alpha": float(names["alpha"]),
                "alpha_ci95": [_finite(v) for v in ci95["alpha"]], "A": float(names["A"]), "train_cells": u}

    # ---- the regime ----------------------------------------------------------------------------
    def regime(self) -> list[dict[str, Any]]:
        """Per size at its largest cells seen: what 10x more cells seen, and what 10x more
        parameters, would buy (relative fall of the loss), with intervals, and which is larger."""
        out = []
        draws = self.theta_draws
        for row in self.sizes.itertuples():
            pts = dict(params=[row.params, row.params, row.params * FACTOR],
                       cells=[row.cells_seen, row.cells_seen * FACTOR, row.cells_seen],
                       train_cells=[row.train_cells] * 3)
            d, n = self._gains(self.result.theta, pts)
            dd = np.array([self._gains(t, pts) for t in draws]) if draws.shape[0] else np.empty((0, 2))
            d_ci = _pct(dd[:, 0]) if dd.size else [None, None]
            n_ci = _pct(dd[:, 1]) if dd.size else [None, None]
            out.append({"size": row.size, "params": float(row.params), "train_cells": float(row.train_cells),
                        "cells_seen": float(row.cells_seen),
                        "more_data": d, "more_data_ci95": d_ci, "more_params": n, "more_params_ci95": n_ci,
                        "limited_by": _limited_by(d, d_ci, n, n_ci)})
        return out

    def _gains(self, theta: np.ndarray, pts: dict[str, list]) -> tuple[float, float]:
        law = self.result.law
        X = self._X(pts["params"], pts["cells"], pts["train_cells"])
        here, more_d, more_n = law.predict(theta, X)
        falls = (relative_fall(float(here), float(v), self.unit) for v in (more_d, more_n))
        d, n = (np.nan if g is None else g for g in falls)
        return d, n

    def to_dict(self) -> dict[str, Any]:
        """data_fit.json: the joint fit (as fit.json: law, x, y, params, ci95, ...) and its answers."""
        return jsonable({**self.result.to_dict(), "converged": self.converged(), "size_law": self.size_law(),
                         "regime": self.regime(), "factor": FACTOR, "regime_unit": self.unit,
                         "prediction_interval": "bootstrap draws of the law times a resampled log residual"})


def _finite(v: Any) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def _pct_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tail = 100 * (1 - LEVEL) / 2
    return np.nanpercentile(values, tail, axis=0), np.nanpercentile(values, 100 - tail, axis=0)


def _limited_by(d: float, d_ci: list, n: float, n_ci: list) -> str:
    """"data" when 10x the cells seen buys more than 10x the parameters with the intervals apart,
    "parameters" the other way round, else "both" (their intervals overlap)."""
    if None in d_ci or None in n_ci:
        return "data" if d > n else "parameters"
    if d_ci[0] > n_ci[1]:
        return "data"
    if n_ci[0] > d_ci[1]:
        return "parameters"
    return "both"


def learned_points(branches: pd.DataFrame, *, gene_mean_mse: float | None = None, choose_on: str = "val_loss",
                   tol: float = PLATEAU_TOL) -> tuple[pd.DataFrame, list[str]]:
    """The branch points a law of cells seen describes, and what was left out and why. Read on
    validation cells (choices are made there): the gains on ``choose_on``, and whether a point has
    learned by ``rules.plateau.has_learned`` (its ``val_mse`` below ``gene_mean_mse``, the gene-mean
    baseline's validation MSE, by more than ``tol``, the study's ``plateau_tol``: the convergence
    rule's own test, at the tolerance the trainer read it at).

    - a run's points up to its steepest doubling are left out. A run starts on the gene-mean
      plateau and leaves it in a takeoff whose gains grow from doubling to doubling; a power law in
      cells seen has gains that shrink, so it describes a run from the doubling after its steepest
      one (measured on the demo: with the steepest point kept, the law bent to the takeoff and
      predicted 4x the cells 8% high; docs/ablations.md);
    - a run's points from the first doubling that made it worse (``rules.plateau.got_worse``: by more
      than the gain's standard error, ``gain_se``, after a point that had learned) are left out: the
      run has overfitted its training cells, and the laws, in which every cell seen helps, do not
      describe it there;
    - points that have not learned are left out: they sit on the gene-mean plateau (measured on 8k
      real PBMCs: XXS's points 0.1% below the baseline, kept by a bare "below", set the size term's
      exponent to 1.09 and left the law 7-9% above the largest size's own points; docs/ablations.md)."""
    keep, flat, early, worse = [], [], 0, []
    for _, run in branches.groupby("run_id", sort=False):
        run = run.sort_values("cells_seen")
        unit = str(run["loss_unit"].iloc[0]) if "loss_unit" in run else "mse"
        g = gains(run["cells_seen"].tolist(), run[choose_on].tolist(), unit)
        g = np.array([np.nan if v is None else v for v in g], dtype=float)
        start = int(np.nanargmax(g)) + 1 if np.isfinite(g).any() and np.nanmax(g) > 0 else 0
        learned = _learned(run, gene_mean_mse, choose_on, tol)
        stop = _first_worse(run, g, start, learned)
        early += start
        if stop < len(run):
            worse.append((str(run["size"].iloc[0]), len(run) - stop))
        keep.append(run.iloc[start:stop][learned[start:stop]])
        flat.append(run.iloc[start:stop][~learned[start:stop]])
    out = pd.concat(keep) if keep else branches.iloc[:0]
    return out.sort_index(), _left_out_notes(early, worse, pd.concat(flat) if flat else out.iloc[:0],
                                             gene_mean_mse, tol)


def _left_out_notes(early: int, worse: list[tuple[str, int]], flat: pd.DataFrame, gene_mean_mse: float | None,
                    tol: float) -> list[str]:
    notes = []
    if early:
        notes.append(f"{_points(early)} up to their run's steepest doubling (the takeoff from the gene-mean "
                     "plateau) left out")
    if worse:
        notes.append(f"{_points(sum(n for _, n in worse))} from the doubling that made their run worse "
                     f"(overfitting its training cells: {', '.join(sorted({s for s, _ in worse}))}) left out")
    if len(flat):
        names = sorted(set(flat["size"].astype(str)))
        notes.append(f"{_points(len(flat))} not below the gene-mean baseline ({gene_mean_mse:.4g}) by more "
                     f"than {100 * tol:g}% left out ({', '.join(names)})")
    return notes


def _learned(run: pd.DataFrame, gene_mean_mse: float | None, choose_on: str, tol: float) -> np.ndarray:
    """``has_learned`` of each point, on its validation MSE (``choose_on`` where the table has no
    ``val_mse``, as a table in MSE has none to add)."""
    mse = run["val_mse"] if "val_mse" in run else run[choose_on]
    return np.array([has_learned(float(m), gene_mean_mse, tol) for m in pd.to_numeric(mse, errors="coerce")],
                    dtype=bool)


def _first_worse(run: pd.DataFrame, g: np.ndarray, start: int, learned: np.ndarray) -> int:
    """Index of a run's first point past ``start`` whose doubling made it worse (``got_worse``) after
    a point that had ``learned``; the run's length when there is none."""
    ses = run["gain_se"].to_numpy(float) if "gain_se" in run else np.full(len(run), np.nan)
    for i in range(max(start, 1), len(run)):
        se = float(ses[i]) if np.isfinite(ses[i]) else None
        if learned[i - 1] and np.isfinite(g[i]) and got_worse(float(g[i]), se):
            return i
    return len(run)


def _points(n: int) -> str:
    return f"{n} point" + ("" if n == 1 else "s")


def _sizes(frame: pd.DataFrame, y: str) -> pd.DataFrame:
    """One row per (size, training set): its parameters, and the mean loss at its largest cells seen."""
    rows = []
    for (size, u), g in frame.groupby(["size", "train_cells"], sort=False):
        last = g[g["cells_seen"] == g["cells_seen"].max()]
        rows.append({"size": size, "params": float(g["params"].iloc[0]), "train_cells": float(u),
                     "cells_seen": float(last["cells_seen"].iloc[0]), "loss": float(last[y].mean())})
    return pd.DataFrame(rows).sort_values(["params", "train_cells"]).reset_index(drop=True)


def fit_data_axis(branches: pd.DataFrame, *, law: str | None = None, y: str = Y_DATA,
                  method: str = defaults.DATA_METHOD, bootstrap: int = defaults.BOOTSTRAP, seed: int = defaults.SEED,
                  interval: str | None = None, n_jobs: int | None = 1,
                  gain_tolerance: float = defaults.GAIN_TOLERANCE, cell_draws=None) -> DataAxisFit:
    """Fit the joint law to the ok branch points of ``branches`` (``cellscale.schema.BRANCH_FIELDS``
    columns); ``law`` None chooses by :func:`data_law`. FitError when they cannot carry it.
    ``cell_draws`` (aligned with the rows of ``branches``; ``fit_table``) puts the evaluation cells'
    noise into the resamples, and so into every interval read from them."""
    keep = finished_mask(branches)
    ok = branches[keep]
    if cell_draws is not None:  # aligned with the points kept
        cell_draws = rows_of(cell_draws, keep)
    if ok.empty:
        raise FitError("no cooldown branch point to fit (a plateau-budget sweep writes them to branches.csv)")
    law = law or data_law(ok)
    units = set(ok["loss_unit"].dropna().astype(str)) if "loss_unit" in ok else {"mse"}
    if len(units) > 1:
        raise FitError(f"the branch points mix loss units ({', '.join(sorted(units))}): fit each objective alone")
    if "run_id" not in ok:
        raise FitError("the branch points need a run_id column: the points of one run are resampled together")
    result = fit_table(ok, law=law, method=method, x=law_x(law), y=y, bootstrap=bootstrap, seed=seed,
                       groups=["run_id"], blocked=True, interval=interval, n_jobs=n_jobs,
                       gain_tolerance=gain_tolerance, cell_draws=cell_draws)
    used = ok.reset_index(drop=True)
    # the residuals of the fit as fitted: the excess over the objective's least loss
    lowest = float(result.extra.get("lowest_loss") or 0.0)
    X, yv = used[law_x(law)].to_numpy(float), used[y].to_numpy(float) - lowest
    space = "linear" if METHODS[method].space == "linear" else "log"
    theta = floor_shifted(result.law, result.theta, -lowest)
    runs, points = residual_levels(result.law, space, np.log(X), yv, np.ones(len(yv)),
                                   result.law.from_natural(theta), used["run_id"].astype(str).to_numpy())
    return DataAxisFit(result=result, unit=units.pop() if units else "mse", sizes=_sizes(used, y),
                       run_residuals=runs, point_residuals=points)


def rows_of(draws, keep: np.ndarray, resamples: int | None = None):
    """``draws`` (a (B, n) array or ``CellDraws``) at the rows ``keep``, and only its first ``resamples``
    resamples when given (the profile and wald-t intervals refit every resample of the cells they are handed)."""
    first = slice(None) if resamples is None else slice(0, resamples)
    if isinstance(draws, CellDraws):
        obs = None if draws.observed is None else np.asarray(draws.observed)[keep]
        return replace(draws, values=np.asarray(draws.values)[first][:, keep], observed=obs)
    return np.asarray(draws)[first][:, keep]


def predict_json(record: dict[str, Any], **columns: Any) -> np.ndarray:
    """Evaluate a fit.json or data_fit.json record at new points: ``columns`` are its x columns by
    name (``params=..., cells_seen=...``); broadcast like numpy."""
    from cellscale.fit.laws import LAWS

    name = record.get("law")
    if name not in LAWS:
        raise FitError(f"unknown law {name!r} in the record (available: {', '.join(sorted(LAWS))})")
    law = LAWS[name]
    missing = [c for c in record["x"] if c not in columns]
    if missing:
        raise FitError(f"predict_json needs {', '.join(record['x'])}; missing {', '.join(missing)}")
    X = np.column_stack(np.broadcast_arrays(*(np.asarray(columns[c], float) for c in record["x"])))
    theta = np.array([record["params"][p] for p in law.param_names], float)
    return law.predict(theta, X)
