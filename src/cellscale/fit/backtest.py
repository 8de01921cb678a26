"""The data axis judged on its own points: does the joint law, fitted without the last doubling of
cells seen, predict it?

The judge of a scaling law is prediction: a law fitted on a short ladder must predict a longer run
(``benchmarks/prediction_check.py`` trains that run). :func:`backtest` asks the same of the points a
sweep already has, at no training cost. The law is refitted to the points with at most ``HALF`` of
the largest cells seen (``rules.plateau.HALF``: where a doubling is read), and each point beyond that
is predicted with its 95% prediction interval (``DataAxisFit.prediction_interval``).

The refit has fewer points and a shorter ladder than the sweep's own law, so it tells how far a law
of this sweep's kind carries one doubling, not the error of the law the report states. Measured in
docs/ablations.md ("The judge on the sweep's own points"): the two agree in size on real PBMCs and
not on the demo.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cellscale.errors import FitError
from cellscale.fit import defaults
from cellscale.fit.compare import prediction_error
from cellscale.fit.data import finished_mask
from cellscale.fit.data_axis import Y_DATA, fit_data_axis, rows_of
from cellscale.rules.plateau import HALF


def held_out(points: pd.DataFrame) -> np.ndarray:
    """The points of the last doubling: more than ``HALF`` of the largest cells seen."""
    cells = points["cells_seen"].to_numpy(float)
    return cells > HALF * cells.max() if cells.size else np.zeros(0, bool)


def _size_key(frame: pd.DataFrame) -> pd.Series:
    """A size on its training set: what the refit must have seen for a point to be one doubling away."""
    u = frame["train_cells"] if "train_cells" in frame else pd.Series(np.nan, index=frame.index)
    return frame["params"].astype(float).astype(str) + "/" + u.astype(float).astype(str)


# The prediction intervals are read from the bootstrap's draws of the law, which every interval method
# but bca-groups draws alike (tested). The percentile residual bootstrap adds to them only a bootstrap
# without the cells (for its record of their share); the report's profile interval would add a profile
# likelihood and a refit of each cell resample (on the 8k-PBMC sweep: 58 s against 96 s, the same
# prediction intervals).
INTERVAL = "residual"


def backtest(points: pd.DataFrame, *, law: str, method: str = defaults.DATA_METHOD,
             bootstrap: int = defaults.BACKTEST_BOOTSTRAP, seed: int = defaults.SEED,
             n_jobs: int | None = 1, cell_draws=None) -> dict[str, Any]:
    """Refit ``law`` to ``points`` (the data axis's fitted branch points) without the last doubling and
    predict it (see the module doc): the record of ``data_fit.json``'s ``backtest``, or its ``error``
    when the shorter ladder cannot carry the law. ``cell_draws`` is aligned with ``points``. A held-out
    point whose size (on its training set) has no point in the refit is not judged: the refit would
    extrapolate in parameters as well; the record names those sizes (``not_in_refit``)."""
    ok = _finite_points(points)
    if cell_draws is not None:
        cell_draws = rows_of(cell_draws, ok)
    points = points[ok]
    held = held_out(points)
    short = points[~held]
    base = {"law": law, "fitted_up_to": float(short["cells_seen"].max()) if len(short) else None,
            "n_fitted": int(len(short)), "bootstrap": int(bootstrap)}
    if not held.any() or short.empty:
        return {**base, "error": "every point is in one doubling of cells seen: nothing to hold out"}
    judged = _size_key(points[held]).isin(set(_size_key(short)))
    not_in_refit = sorted(set(points[held][~judged.to_numpy()]["size"].astype(str)))
    if not judged.any():
        return {**base, "error": "no size of the last doubling has a point before it", "not_in_refit": not_in_refit}
    try:
        fit = fit_data_axis(short, law=law, method=method, bootstrap=bootstrap, seed=seed, interval=INTERVAL,
                            n_jobs=n_jobs, cell_draws=None if cell_draws is None else rows_of(cell_draws, ~held, bootstrap))
    except FitError as err:
        return {**base, "error": f"the law on the points up to {base['fitted_up_to']:,.0f} cells seen: {err}"}
    return {**base, **_judged(fit, points[held][judged.to_numpy()], seed), "not_in_refit": not_in_refit}


def _finite_points(points: pd.DataFrame) -> np.ndarray:
    """The finished points (``fit.data.finished_mask``, the rows every fit keeps) with a finite loss and
    cells seen."""
    ok = finished_mask(points)
    for col in (Y_DATA, "cells_seen"):
        ok &= np.isfinite(pd.to_numeric(points[col], errors="coerce").to_numpy(float))
    return ok


def _judged(fit, held: pd.DataFrame, seed: int) -> dict[str, Any]:
    cols = (held["params"], held["cells_seen"], held["train_cells"] if "train_cells" in held else None)
    predicted = fit.predict(*cols)
    lo, hi = fit.prediction_interval(*cols, seed=seed)
    has_interval = bool(np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)))  # none without a bootstrap
    rows = []
    for r, p, a, b in zip(held.itertuples(), predicted, lo, hi):
        got = float(getattr(r, Y_DATA))
        rows.append({"size": str(r.size), "run_id": str(r.run_id), "params": float(r.params),
                     "train_cells": float(getattr(r, "train_cells", np.nan)), "cells_seen": float(r.cells_seen),
                     "measured": got, "predicted": float(p), "ci95": [float(a), float(b)] if has_interval else None,
                     "error": prediction_error(float(p), got, fit.unit),
                     "inside": bool(a <= got <= b) if has_interval else None})
    errors = np.array([r["error"] for r in rows])
    if not np.isfinite(errors).any():
        return {"points": rows, "error": "the refitted law predicts no held-out point with a finite error"}
    worst = rows[int(np.nanargmax(np.abs(errors)))]
    return {"points": rows, "n": len(rows), "inside": sum(r["inside"] for r in rows) if has_interval else None,
            "rms_error": float(np.sqrt(np.nanmean(errors**2))), "largest_error": worst["error"],
            "largest_size": worst["size"]}
