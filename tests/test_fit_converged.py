"""The report's fit uses only converged runs, names the others, and can keep them."""

import numpy as np
import pandas as pd

from cellscale.report.fitting import fit_subset, run_fit, unconverged_ids


def _runs(converged) -> pd.DataFrame:
    params = [100, 1_000, 10_000, 100_000, 1_000_000]
    return pd.DataFrame({
        "run_id": [f"r{i}" for i in range(5)], "size": list("ABCDE"), "status": "ok",
        "params": params, "best_val_mse": [1.0 + 2.0 * p**-0.3 for p in params],
        "train_cells": np.nan, "depth": 1.0, "objective": "mse", "converged": converged,
    })


def test_unconverged_runs_are_left_out_and_named():
    runs = _runs([True, True, False, True, False])
    assert unconverged_ids(runs) == ["r2", "r4"]
    used, note = fit_subset(runs, "power-floor")
    assert used["run_id"].tolist() == ["r0", "r1", "r3"]
    assert note == "left out as not converged (fit.keep_unconverged: true keeps them): r2, r4"


def test_keep_unconverged_fits_them_and_still_names_them():
    used, note = fit_subset(_runs([True, True, False, True, False]), "power-floor", keep_unconverged=True)
    assert len(used) == 5
    assert note == "fitted although not converged (fit.keep_unconverged): r2, r4"


def test_results_without_a_verdict_are_kept():
    # an older results.csv (no converged column, or an empty cell) cannot be judged
    runs = _runs([np.nan] * 5)
    assert unconverged_ids(runs) == [] and len(fit_subset(runs, "power-floor")[0]) == 5
    assert unconverged_ids(runs.drop(columns="converged")) == []


def test_no_converged_run_is_an_error_that_says_what_to_do():
    out = run_fit(_runs([False] * 5), {"bootstrap": 0})
    assert out.result is None
    assert out.error == ("no converged run; 5 finished run(s) were still improving when their "
                         "budget ended: raise their budget, or set fit.keep_unconverged: true")
    kept = run_fit(_runs([False] * 5), {"bootstrap": 0, "keep_unconverged": True})
    assert kept.error is None and kept.data["n_points"] == 5


def test_the_fit_uses_each_sizes_best_learning_rate_and_flags_the_edge():
    runs = pd.concat([_runs([True] * 5).assign(lr_scale=m, run_id=lambda d, m=m: d["run_id"] + f"-lr{m}",
                                                best_val_mse=lambda d, k=k: d["best_val_mse"] * k)
                      for m, k in ((0.5, 1.1), (1.0, 1.0), (2.0, 1.05))], ignore_index=True)
    runs.loc[runs["run_id"] == "r4-lr2.0", "best_val_mse"] *= 0.5  # E's best rate is 2.0, the grid's edge
    used, note = fit_subset(runs, "power-floor")
    assert sorted(used["run_id"]) == ["r0-lr1.0", "r1-lr1.0", "r2-lr1.0", "r3-lr1.0", "r4-lr2.0"]
    assert note == ("fitted to each size's best learning rate on validation loss (10 runs at other rates left out); "
                    "best rate at the edge of its grid for E: a better rate may lie beyond it")
