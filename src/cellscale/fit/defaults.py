"""The fit's defaults, in one place: ``fit_table``, ``fit_data_axis`` and a study's fit section
(``cellscale.config.FitConfig``, and through it ``cellscale fit``) all read them from here.

The fit package imports no configuration (it runs on any machine that has a results table), so the
configuration reads the fit's defaults, never the other way round. Stdlib only: the command line
reads these to build its help without loading numpy, scipy or pandas.
"""

from __future__ import annotations

# the laws and the fitting methods by name (cellscale.fit.laws.LAWS, cellscale.fit.methods.METHODS are
# built from these, in this order)
LAW_NAMES = ("power", "power-floor", "chinchilla", "data-constrained")
METHOD_DESCRIPTIONS = {
    "huber-log": ("Huber loss (delta 1e-3) on log-residuals, L-BFGS-B from the best points of a start grid "
                  "(Hoffmann et al. 2022; Besiroglu et al. 2024)"),
    "ls-log": "least squares on log-residuals (the Gaussian likelihood in log L), trust-region reflective from "
              "the best points of a start grid",
    "nls": "least squares on L itself (optionally weighted), trust-region reflective from several starts",
    "paper": ("seed study's method: grid of 1000 floors c in [0, 0.99 min L], least squares of log(L - c) on "
              "log P for each, keep the best R^2 (reproduction only)"),
}
METHOD_NAMES = tuple(METHOD_DESCRIPTIONS)
METHOD = "huber-log"  # the fitting method of a size law
# The data axis's joint law is judged by prediction (a law fitted on a short ladder must predict a
# longer run), and least squares in log space predicts better there: its 10 to 30 cooled-down points
# carry Gaussian-like noise of about 1% and no outliers, where Huber's delta of 1e-3 acts as least
# absolute deviations and, with 5 parameters, lets a handful of points decide. Measured in
# docs/ablations.md ("Which fit predicts"): simulated, the rms error of a 4x prediction falls from
# 2.43% to 2.06%; against a longer run, the 4x error falls on three of the four sweeps checked
# (the shipped demo's from -3.0% to -2.0%).
DATA_METHOD = "ls-log"
# the methods that fit the joint laws (the seed study's grid fits a power law in P only)
DATA_METHOD_NAMES = tuple(m for m in METHOD_NAMES if m != "paper")
BOOTSTRAP = 1000  # resamples behind the intervals and prediction bands
# resamples behind the data axis's backtest (cellscale.fit.backtest): its intervals are read only as
# "inside or not" at one held-out doubling, and at 200 the backtest's refit already takes 57 s of the
# 8k-PBMC report (data-constrained law, numerical Jacobian); a report's full 1000 would take minutes
BACKTEST_BOOTSTRAP = 200
SEED = 0  # of the resamples
# the relative gain per doubling of N below which the compute-optimal block calls a size sufficient
GAIN_TOLERANCE = 0.01

# the interval methods (cellscale.fit.intervals), by name, with what each is; measured in docs/intervals.md
DESCRIPTIONS = {
    "profile": "profile likelihood of a Gaussian in the method's space, t_{n-k} calibrated (Bates & Watts 1988)",
    "wald-t": "estimate +- t_{n-k} asymptotic standard errors (log amplitudes), Gaussian in the method's space",
    "residual-t": "studentized (percentile-t) residual bootstrap of the method's estimator (Davison & Hinkley 1997)",
    "residual": "percentile residual bootstrap of the method's estimator (leverage-adjusted residuals)",
    "bca-groups": "BCa bootstrap over resampling units (bias-corrected, jackknife acceleration)",
}
INTERVALS = tuple(DESCRIPTIONS)
DEFAULT_INTERVAL = "profile"


def default_interval(method_name: str) -> str:
    """The interval used when none is named: ``DEFAULT_INTERVAL``, except for the seed study's
    ``paper`` method. Its estimate is a grid search that lands on the grid's edge, not a smooth
    optimum: no standard error or likelihood profile describes it, so its intervals are the
    group bootstrap's (BCa), as before."""
    return "bca-groups" if method_name == "paper" else DEFAULT_INTERVAL
