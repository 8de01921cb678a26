"""Coverage of the data axis's intervals (``cellscale.fit.data_axis``) on simulated branch points.

    python benchmarks/data_axis_coverage.py                        # 200 replicates, about 10 minutes on 2 cores
    python benchmarks/data_axis_coverage.py --replicates 40 --run-noise 0.02
    python benchmarks/data_axis_coverage.py --method huber-log    # another fitting method
    python benchmarks/data_axis_coverage.py --backtest --replicates 100   # the report's backtest instead

Each replicate simulates a branches table from a known chinchilla law (``simulate_branches``: one run
per size, a point at every doubling of cells seen; each run's points share a log-normal offset,
``--run-noise``, and each point has its own, ``--noise``), fits it as the report does
(``fit_data_axis``: its default method, ls-log, profile intervals, a run-blocked residual
bootstrap) and checks three intervals against the truth:

- the size law's floor E (the joint fit's profile interval);
- the largest size's converged loss L(N, D -> inf) (bootstrap percentile);
- the prediction interval of a new run of the largest size at 4x the largest cells seen, against a
  fresh draw of that run (its own run offset and point noise): the check the demo is held to.

The design mirrors the demo's fitted points (four sizes from 317 to 102,273 parameters, cells seen
60k to 240k after the takeoff) with a law of the demo's shape. Prints one markdown row per interval:
coverage, its Monte Carlo standard error, the median width; then the error of the point prediction
of the new run (root mean square, mean, and the share beyond 3%): the judge's measure. Deterministic
(seed = replicate).

``--backtest`` asks instead whether the report's backtest (``cellscale.fit.backtest``: the law refitted
without the last doubling, 240k, predicting it) is a judge to trust: how often the held-out points fall
inside their 95% prediction intervals, the backtest's rms error against the 4x prediction's error of
the law of all points, and their rank correlation across replicates (does a replicate whose backtest
misses more also predict worse?).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cellscale.fit import fit_data_axis, simulate_branches
from cellscale.fit.backtest import backtest
from cellscale.fit.defaults import DATA_METHOD, DATA_METHOD_NAMES

TRUTH = {"A": 1.9, "B": 40.0, "E": 0.35, "alpha": 0.15, "beta": 0.45}
SIZES = {"MINI": 317.0, "TINY": 2273.0, "SMALL": 26561.0, "XS": 102273.0}
CELLS = 60000 * 2.0 ** np.arange(3)


def law(n: float, d: float) -> float:
    return TRUTH["E"] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]


def replicate(r: int, *, noise: float, run_noise: float, bootstrap: int,
              method: str = DATA_METHOD) -> dict[str, tuple[bool, float]]:
    """Each interval's (holds the truth, width); under "prediction error", (False, predicted / new - 1)."""
    table = simulate_branches("chinchilla", TRUTH, sizes=SIZES, cells=CELLS, noise=noise, run_noise=run_noise, seed=r)
    fit = fit_data_axis(table, bootstrap=bootstrap, seed=r, method=method)
    top = max(SIZES.values())
    floor = fit.size_law()["floor_ci95"]
    conv = fit.converged()[-1]["ci95"]
    rng = np.random.default_rng(10_000 + r)
    new = law(top, 4 * CELLS[-1]) * np.exp(run_noise * rng.standard_normal() + noise * rng.standard_normal())
    lo, hi = fit.prediction_interval([top], [4 * CELLS[-1]], seed=r)

    def hit(ci, value) -> tuple[bool, float]:
        ok = ci[0] is not None and ci[1] is not None and ci[0] <= value <= ci[1]
        return ok, (ci[1] - ci[0]) if ci[0] is not None and ci[1] is not None else np.nan

    return {"floor E": hit(floor, TRUTH["E"]), "converged loss of XS": hit(conv, law(top, np.inf)),
            "a new XS run at 4x the cells": hit([lo[0], hi[0]], new),
            "prediction error": (False, float(fit.predict([top], [4 * CELLS[-1]])[0] / new - 1))}


def backtest_replicate(r: int, *, noise: float, run_noise: float, bootstrap: int,
                       method: str = DATA_METHOD) -> tuple[int, int, float, float]:
    """(held-out points inside their intervals, held-out points, the backtest's rms error, the error of
    the law of all points at 4x against a fresh run there)."""
    table = simulate_branches("chinchilla", TRUTH, sizes=SIZES, cells=CELLS, noise=noise, run_noise=run_noise, seed=r)
    bt = backtest(table, law="chinchilla", method=method, bootstrap=bootstrap, seed=r)
    top = max(SIZES.values())
    rng = np.random.default_rng(10_000 + r)
    new = law(top, 4 * CELLS[-1]) * np.exp(run_noise * rng.standard_normal() + noise * rng.standard_normal())
    forward = float(fit_data_axis(table, bootstrap=0, method=method).predict([top], [4 * CELLS[-1]])[0] / new - 1)
    return int(bt.get("inside") or 0), int(bt.get("n") or 0), float(bt.get("rms_error", np.nan)), forward


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(v)) for v in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def backtest_main(a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    rows = np.array([backtest_replicate(r, noise=a.noise, run_noise=a.run_noise, bootstrap=a.bootstrap,
                                        method=a.method) for r in range(a.replicates)])
    inside, n, rms, forward = rows.T
    ok = np.isfinite(rms)
    share = inside[ok].sum() / n[ok].sum()
    print(f"{a.replicates} replicates, {a.method}, point noise {a.noise}, run noise {a.run_noise}, "
          f"{a.bootstrap} resamples ({time.perf_counter() - t0:.0f} s)\n")
    print(f"backtest (refit to 60k-120k, the 240k points held out): {int(ok.sum())} of {a.replicates} made; "
          f"held-out points inside their 95% prediction intervals: {share:.3f} "
          f"(MC s.e. {np.sqrt(share * (1 - share) / n[ok].sum()):.3f}, {int(n[ok].sum())} points); rms error "
          f"median {100 * np.median(rms[ok]):.2f}%, root mean square {100 * np.sqrt(np.mean(rms[ok] ** 2)):.2f}%")
    print(f"the law of all points at 4x against a fresh run: rms error {100 * np.sqrt(np.mean(forward ** 2)):.2f}%; "
          f"rank correlation of the backtest's rms with |that error| across replicates: "
          f"{_spearman(rms[ok], np.abs(forward[ok])):+.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicates", type=int, default=200)
    ap.add_argument("--noise", type=float, default=0.005, help="each point's log-normal noise")
    ap.add_argument("--run-noise", type=float, default=0.01, help="each run's shared log-normal offset")
    ap.add_argument("--bootstrap", type=int, default=300)
    ap.add_argument("--method", choices=DATA_METHOD_NAMES, default=DATA_METHOD)
    ap.add_argument("--backtest", action="store_true", help="judge the report's backtest instead (module doc)")
    a = ap.parse_args()
    if a.backtest:
        return backtest_main(a)
    t0 = time.perf_counter()
    rows = [replicate(r, noise=a.noise, run_noise=a.run_noise, bootstrap=a.bootstrap, method=a.method)
            for r in range(a.replicates)]
    errors = np.array([row.pop("prediction error")[1] for row in rows])
    print(f"{a.replicates} replicates, {a.method}, point noise {a.noise}, run noise {a.run_noise}, "
          f"{a.bootstrap} resamples ({time.perf_counter() - t0:.0f} s)\n")
    print("| interval | coverage | MC s.e. | median width |\n|---|---|---|---|")
    for key in rows[0]:
        hits = np.array([r[key][0] for r in rows], float)
        widths = np.array([r[key][1] for r in rows], float)
        cov = hits.mean()
        print(f"| {key} | {cov:.3f} | {np.sqrt(cov * (1 - cov) / len(rows)):.3f} | {np.nanmedian(widths):.4g} |")
    print(f"\nprediction of the new XS run at 4x: rms error {100 * np.sqrt(np.mean(errors ** 2)):.2f}%, mean "
          f"{100 * errors.mean():+.2f}%, beyond 3% in {100 * np.mean(np.abs(errors) > 0.03):.0f}% of replicates")


if __name__ == "__main__":
    main()
