"""The data axis's joint fit on a sweep's branch points: time, against the optimiser asking for the
Jacobian with every residual.

    python benchmarks/bench_data_fit.py SWEEP_DIR [--bootstrap 200]

Ours: ``least_squares`` evaluates the residuals alone at each trial step
(``fit.methods.weighted_residuals``: one prediction) and the Jacobian only where it asks for it, and a
numerical Jacobian (``Law.log_jac``: central differences, as ``data-constrained`` has) predicts its
2k shifted parameter vectors in one ``log_predict_many`` pass. Reference (the code before
2026-12-07): every residual evaluation also computed the Jacobian (``residuals_jac``), and the
Jacobian predicted its 2k shifted vectors one at a time, so a trial step of ``data-constrained``
cost 15 passes. Both fit the same points with the same seed in one process (the report fits with
every core; the ratio does not depend on it), the evaluation cells' resamples included as the report
draws them, and must agree on every parameter (the predictions are bit-identical).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from cellscale.fit import methods
from cellscale.fit.data_axis import fit_data_axis
from cellscale.fit.laws.base import Law
from cellscale.report.data_axis import branch_points
from cellscale.report.fitting import eval_cell_draws
from cellscale.report.load import load_sweep


def _reference_residuals(law, space, logX, y, w, u):
    return methods.residuals_jac(law, space, logX, y, w, u)[0]


def _looped_jac(self, u, logX):
    """The numerical Jacobian one shifted parameter vector at a time."""
    u = np.asarray(u, dtype=float)
    jac = np.empty((logX.shape[0], u.size))
    for j in range(u.size):
        h = 1e-6 * max(1.0, abs(u[j]))
        up, dn = u.copy(), u.copy()
        up[j] += h
        dn[j] -= h
        jac[:, j] = (self.log_predict(up, logX) - self.log_predict(dn, logX)) / (2 * h)
    return jac


def timed_fit(pts, draws, settings: dict, *, bootstrap: int) -> tuple[float, dict[str, float]]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_data_axis(pts, method=str(settings["data_method"]), bootstrap=bootstrap,
                            seed=int(settings["seed"]), interval=settings.get("interval"), n_jobs=1, cell_draws=draws)
    return time.perf_counter() - t0, fit.result.params


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--bootstrap", type=int, default=200)
    a = ap.parse_args()
    sd = load_sweep(a.sweep)
    if sd.branches is None or sd.branches.empty:
        print(f"error: {a.sweep} has no branches.csv (a plateau-budget sweep writes one)")
        return 1
    pts, _, _ = branch_points(sd)
    settings = {**sd.fit_config, "bootstrap": a.bootstrap}
    draws, why = eval_cell_draws(pts, sd.sweep_dir, settings, "test_loss", branches=True)
    ours_s, ours = timed_fit(pts, draws, settings, bootstrap=a.bootstrap)
    fast, vectorised = methods.weighted_residuals, Law.log_jac
    methods.weighted_residuals, Law.log_jac = _reference_residuals, _looped_jac
    try:
        ref_s, ref = timed_fit(pts, draws, settings, bootstrap=a.bootstrap)
    finally:
        methods.weighted_residuals, Law.log_jac = fast, vectorised
    worst = max(abs(ours[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in ref)
    print(f"{len(pts)} points, law fitted with {a.bootstrap} resamples, 1 process"
          + (f" ({why})" if why else ", the evaluation cells' resamples included"))
    print(f"ours:      {ours_s:.1f} s")
    print(f"reference: {ref_s:.1f} s (the Jacobian with every residual, one shifted vector at a time)")
    print(f"ratio reference / ours: {ref_s / ours_s:.2f}x; largest relative difference in a parameter: {worst:.1e}")
    print(f"load average during the run: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0 if np.isfinite(worst) else 1


if __name__ == "__main__":
    sys.exit(main())
