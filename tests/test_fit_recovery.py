"""Recovery: points simulated from known laws, fitted back, intervals checked for coverage.

Designs: power-floor on 20 sizes over 6 decades, 2 seeds each (resampled together);
chinchilla on a 6 x 6 grid of (N, D) over 3 decades each, one seed. Both with 1%
multiplicative noise. The default suite runs a handful of replicates as a smoke check
(a 95% interval should rarely miss in so few); the acceptance numbers, 100 replicates
each with coverage >= 90%, are the ``slow`` tests. Both bound the width too: the median
width may be at most WIDTH_MARGIN x the narrowest any interval method reached here, so an
interval of (-inf, inf) fails.
"""

import numpy as np
import pytest

from cellscale.fit import fit_table, simulate_table

POWER_FLOOR = {"a": 5.0, "alpha": 0.3, "c": 1.4}
CHINCHILLA = {"A": 482.0, "B": 2085.0, "E": 1.817, "alpha": 0.348, "beta": 0.366}


def simulated(law: str, seed: int, noise: float = 0.01):
    if law == "power-floor":
        return simulate_table(law, POWER_FLOOR, {"params": np.logspace(3, 9, 20)}, noise=noise, seeds=2, seed=seed)
    n, d = np.meshgrid(np.logspace(6, 9, 6), np.logspace(7, 10, 6))
    return simulate_table(law, CHINCHILLA, {"params": n.ravel(), "train_cells": d.ravel()}, noise=noise, seed=seed)


# The narrowest median 95% width any of the five interval methods reached on these designs
# (per parameter; 1% noise, 100 resamples; 30 replicates of power-floor, 12 of chinchilla, the
# benchmark's replicate seeds; see docs/intervals.md), and how much wider the default may be.
# BCa over run groups, the earlier default, is 1.24-1.42x these in the smoke test.
BEST_MEDIAN_WIDTH = {
    "power-floor": {"a": 1.727, "alpha": 0.04414, "c": 0.02088},
    "chinchilla": {"A": 184.1, "B": 834.1, "E": 0.1646, "alpha": 0.03165, "beta": 0.02209},
}
WIDTH_MARGIN = 1.25


def coverage(law: str, replicates: int, bootstrap: int) -> tuple[dict[str, float], dict[str, float]]:
    """(coverage, median width) of the default intervals per parameter."""
    truth = POWER_FLOOR if law == "power-floor" else CHINCHILLA
    hits = dict.fromkeys(truth, 0)
    widths: dict[str, list[float]] = {name: [] for name in truth}
    for rep in range(replicates):
        fit = fit_table(simulated(law, seed=1000 + rep), law=law, bootstrap=bootstrap, seed=rep)
        for name, value in truth.items():
            lo, hi = fit.ci95[name]
            hits[name] += int(lo <= value <= hi)
            widths[name].append(hi - lo)
    return ({name: h / replicates for name, h in hits.items()},
            {name: float(np.median(w)) for name, w in widths.items()})


def assert_narrow(law: str, width: dict[str, float]) -> None:
    for name, w in width.items():
        best = BEST_MEDIAN_WIDTH[law][name]
        assert w <= WIDTH_MARGIN * best, f"{name}: median width {w:.4g} > {WIDTH_MARGIN} x best {best:.4g}"


@pytest.mark.parametrize("law, replicates", [("power-floor", 12), ("chinchilla", 6)])
def test_coverage_smoke(law, replicates):
    cov, width = coverage(law, replicates, bootstrap=100)
    # At a true 95% the chance of 3+ misses out of 12 (2+ of 6) per parameter is ~2-3%.
    floor = 0.75 if replicates >= 12 else 4 / 6
    assert all(c >= floor for c in cov.values()), cov
    assert_narrow(law, width)


@pytest.mark.slow
@pytest.mark.parametrize("law", ["power-floor", "chinchilla"])
def test_coverage_100_replicates(law):
    cov, width = coverage(law, 100, bootstrap=300)
    print(law, cov, width)
    assert all(c >= 0.90 for c in cov.values()), cov
    assert_narrow(law, width)


@pytest.mark.parametrize("method", ["huber-log", "nls"])
def test_noiseless_power_floor_recovers_exactly(method):
    df = simulated("power-floor", seed=0, noise=1e-7)
    fit = fit_table(df, law="power-floor", method=method, bootstrap=0)
    assert fit.params["a"] == pytest.approx(POWER_FLOOR["a"], rel=1e-3)
    assert fit.params["alpha"] == pytest.approx(POWER_FLOOR["alpha"], rel=1e-4)
    assert fit.params["c"] == pytest.approx(POWER_FLOOR["c"], rel=1e-5)
    assert fit.floor_at_boundary is False
    assert fit.r2 > 0.999999


def test_noiseless_chinchilla_recovers_exactly():
    df = simulated("chinchilla", seed=0, noise=1e-7)
    fit = fit_table(df, law="chinchilla", bootstrap=0)
    for name, value in CHINCHILLA.items():
        assert fit.params[name] == pytest.approx(value, rel=1e-3), name


def test_paper_method_is_biased_where_proper_fits_are_not():
    # With a true floor well inside (0, min L), the grid method still drifts to its edge
    # or away from the truth; this is why it is kept for reproduction only.
    df = simulated("power-floor", seed=0, noise=1e-7)
    proper = fit_table(df, law="power-floor", method="huber-log", bootstrap=0)
    assert proper.params["c"] == pytest.approx(1.4, rel=1e-4)
    paper = fit_table(df, law="power-floor", method="paper", bootstrap=0)
    assert paper.floor_at_boundary is True
    assert paper.params["c"] == pytest.approx(0.99 * df["best_val_mse"].min(), rel=1e-12)
    assert abs(paper.params["c"] - 1.4) > 100 * abs(proper.params["c"] - 1.4)
