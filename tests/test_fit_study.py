"""The seed study's per-size means (reference README, V = 512, D = 200k)."""

import numpy as np
import pandas as pd
import pytest

from cellscale.fit import fit_table

STUDY = pd.DataFrame({
    "size": ["XXS", "TINY", "XS", "S", "M", "L"],
    "params": [533, 9953, 132993, 859137, 19178497, 100510801],
    "best_val_mse": [2.101, 1.600, 1.515, 1.482, 1.462, 1.477],
})


def test_paper_method_lands_on_grid_edge():
    fit = fit_table(STUDY, law="power-floor", method="paper", bootstrap=100)
    out = fit.to_dict()
    assert out["floor_at_boundary"] is True
    assert out["params"]["c"] == pytest.approx(0.99 * 1.462, rel=1e-12)
    assert out["params"]["c"] == pytest.approx(1.44738, abs=1e-5)
    # The study's own fit on its 18 runs: alpha 0.266, R^2 0.858; the means land close.
    assert out["params"]["alpha"] == pytest.approx(0.27, abs=0.02)
    assert out["r2"] == pytest.approx(0.86, abs=0.02)
    # Its intervals: a group bootstrap (a grid search has no standard error to studentize or
    # profile), 3 of 100 resamples without 3 sizes counted as failed. The floor's interval runs
    # from the grid's lower edge (c = 0: the six means do not pin the floor down) to just under
    # the worst best-run loss; alpha's is finite and holds the estimate.
    assert out["interval"] == "bca-groups" and out["bootstrap_failed"] == 3
    lo, hi = out["ci95"]["c"]
    assert lo == pytest.approx(0.0, abs=1e-12) and out["params"]["c"] < hi < 1.477
    lo, hi = out["ci95"]["alpha"]
    assert 0.0 < lo < out["params"]["alpha"] < hi < 0.6


@pytest.mark.parametrize("method", ["huber-log", "nls"])
def test_proper_methods_report_an_interval_for_the_floor(method):
    out = fit_table(STUDY, law="power-floor", method=method, bootstrap=200).to_dict()
    lo, hi = out["ci95"]["c"]
    c = out["params"]["c"]
    assert np.isfinite([lo, hi, c]).all()
    assert lo <= c <= hi
    assert hi > lo
    # The floor may sit above the best observed run (M, 1.462, beats L, 1.477 by noise):
    # its search range runs to the worst loss, so the estimate is not pinned to min L.
    assert out["floor_bounds"] == [0.0, 2.101]
    assert out["floor_at_boundary"] is False
    assert 1.44 < c < 1.50
    assert out["entropy_bits"]["ci95"][0] <= out["entropy_bits"]["gaussian"] <= out["entropy_bits"]["ci95"][1]
