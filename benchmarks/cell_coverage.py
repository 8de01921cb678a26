"""Does the floor's interval hold the evaluation cells' noise? Coverage on a real sweep's cells.

    python benchmarks/cell_coverage.py SWEEP_DIR --cells 500 --replicates 100     # ~3 minutes on 2 cores

Takes the runs the report fits (``cellscale.report.fitting.fit_subset``: each size's chosen rate) and
their per-cell test sums (``runs/<run_id>/cells.npz``): the sweep's test cells become the population,
and the size law fitted on all of them gives the population's floor, the number a smaller evaluation
split should cover. Each replicate draws ``--cells`` cells without replacement, scores every run on
that one draw (the cells every run of a sweep shares), fits the law as the report does with the cells'
noise in its interval (``cellscale.fit.cells``; ``--resamples`` cell resamples) and without it, and
records whether each 95% interval holds the population's floor. Prints both coverages and the mean
widths; coverage >= 0.90 with the cells, and well below without, is what the issue asks.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

from cellscale.config import load_study_config
from cellscale.fit import fit_table
from cellscale.fit.cells import CellDraws, cell_draws, observed, read_point_sums, sweep_cell_paths
from cellscale.report.fitting import fit_subset
from cellscale.report.load import load_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--cells", type=int, default=500, help="evaluation cells per replicate (default 500)")
    ap.add_argument("--replicates", type=int, default=100)
    ap.add_argument("--resamples", type=int, default=200, help="cell resamples per fit (default 200)")
    args = ap.parse_args()
    sd = load_sweep(args.sweep)
    law = load_study_config(args.sweep / "config.yaml").fit.law
    used, _ = fit_subset(sd.runs, law, sd.full_train, keep_unconverged=True)
    sums, counts = read_point_sums(sweep_cell_paths(args.sweep, used["run_id"]), "test")
    frame = used.assign(test_mse=observed(sums, counts))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        truth_fit = fit_table(frame, law=law, y="test_mse", bootstrap=0)
    truth = float(dict(zip(truth_fit.law.param_names, truth_fit.theta))[truth_fit.law.floor])
    n_pop = sums.shape[1]
    print(f"# {args.sweep}: {len(used)} runs, {n_pop} test cells; population floor {truth:.4f}")
    hits, widths, t0 = np.zeros((args.replicates, 2), bool), np.zeros((args.replicates, 2)), time.perf_counter()
    for r in range(args.replicates):
        rng = np.random.default_rng(10_000 + r)
        idx = rng.choice(n_pop, args.cells, replace=False)
        s, n = sums[:, idx], counts[:, idx]
        obs = observed(s, n)
        draws = CellDraws(cell_draws(s, n, n_boot=args.resamples, seed=r), obs, args.cells, "test")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = fit_table(used.assign(test_mse=obs), law=law, y="test_mse", bootstrap=0, cell_draws=draws)
        name = fit.law.floor
        lo0, hi0 = fit.extra["eval_cells"]["ci95_without_cells"][name]
        lo, hi = fit.ci95[name]
        hits[r] = lo0 <= truth <= hi0, lo <= truth <= hi
        widths[r] = hi0 - lo0, hi - lo
    fit_only, with_cells = hits.mean(axis=0)
    print(f"{args.replicates} replicates of {args.cells} cells ({time.perf_counter() - t0:.0f} s): coverage without "
          f"the cells {fit_only:.2f} (mean width {widths[:, 0].mean():.4f}), with the cells {with_cells:.2f} "
          f"(mean width {widths[:, 1].mean():.4f})")


if __name__ == "__main__":
    main()
