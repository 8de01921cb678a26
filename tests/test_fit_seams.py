"""The facts the fit and the report share: the fitted column's unit and least loss, and the evaluation
cells' draws of a sweep's runs and branches. Each is pinned to the numbers the two copies gave before
they became one."""

import math

import numpy as np
import pandas as pd
import pytest

import cellscale.fit.core as core
from cellscale.errors import FitError
from cellscale.fit import fit_csv, fit_table
from cellscale.fit.cells import run_cell_draws, sweep_cell_draws
from cellscale.fit.core import fitted_unit
from cellscale.report.fitting import eval_cell_draws, lowest_of

GAUSS_LOWEST = -7.330422180597622  # 0.5 log2(2 pi e^-12): a perfect mean at the clamp's least variance
SETTINGS = {"bootstrap": 40, "seed": 5}
N_RUNS, N_CELLS = 5, 60


def _table(objective, **cols):
    n = 4
    base = {"run_id": [f"r{i}" for i in range(n)], "params": [1e4, 1e5, 1e6, 1e7], "status": "ok",
            "best_val_mse": [0.9, 0.8, 0.7, 0.65], "test_mse": [0.91, 0.81, 0.72, 0.66],
            "best_val_loss": [3.0, 2.5, 2.2, 2.1], "test_loss": [3.1, 2.6, 2.3, 2.2], "objective": objective}
    base.update(cols)
    return pd.DataFrame(base)


UNIT_CASES = [
    (_table("mse"), None, ("test_mse", "mse", 0.0)),
    (_table("mse").drop(columns="objective"), None, ("test_mse", "mse", 0.0)),
    (_table("nb"), None, ("test_loss", "bits", 0.0)),
    (_table("gaussian-nll"), None, ("test_loss", "bits", GAUSS_LOWEST)),
    # no finite test loss on every finished row: the validation column
    (_table("mse").drop(columns="test_mse"), None, ("best_val_mse", "mse", 0.0)),
    (_table("nb", test_loss=[3.1, np.nan, 2.3, 2.2]), None, ("best_val_loss", "bits", 0.0)),
    (_table("gaussian-nll").drop(columns="test_loss"), None, ("best_val_loss", "bits", GAUSS_LOWEST)),
    # a failed row's missing test loss does not count
    (_table("nb", test_loss=[3.1, np.nan, 2.3, 2.2], status=["ok", "failed", "ok", "ok"]), None,
     ("test_loss", "bits", 0.0)),
    # a column named by the caller: an MSE column of a likelihood table is an MSE
    (_table("gaussian-nll"), "test_mse", ("test_mse", "mse", 0.0)),
    (_table("gaussian-nll"), "best_val_loss", ("best_val_loss", "bits", GAUSS_LOWEST)),
    (_table("mse"), "test_loss", ("test_loss", "mse", 0.0)),
]


@pytest.mark.parametrize(("df", "y", "expected"), UNIT_CASES)
def test_the_unit_rule(df, y, expected):
    for got in (fitted_unit(df, y), core._resolve_y(df, y)):
        assert got[:2] == expected[:2] and got[2] == pytest.approx(expected[2], abs=1e-12)
    assert GAUSS_LOWEST == pytest.approx(0.5 * (math.log(2 * math.pi) - 12) / math.log(2), abs=1e-12)


@pytest.mark.parametrize(("df", "y", "expected"), [c for c in UNIT_CASES if c[1] is None])
def test_lowest_of_agrees_with_the_unit_rule(df, y, expected):
    assert lowest_of(df) == pytest.approx(expected[2], abs=1e-12) and lowest_of(df) == fitted_unit(df)[2]


def test_lowest_of_takes_tables_the_fit_refuses():
    """The report asks for the least loss before it keeps one depth: it must not raise where the fit
    refuses, and it reads the first row's objective where they are mixed."""
    depths = _table("gaussian-nll", depth=[1.0, 1.0, 0.5, 0.5])
    with pytest.raises(FitError, match="mixes sequencing depths"):
        core._resolve_y(depths, None)
    with pytest.raises(FitError, match="mixes objectives"):
        core._resolve_y(_table(["nb", "gaussian-nll", "nb", "nb"]), None)
    assert lowest_of(depths) == pytest.approx(GAUSS_LOWEST, abs=1e-12)
    assert lowest_of(_table(["gaussian-nll", "nb", "nb", "nb"])) == pytest.approx(GAUSS_LOWEST, abs=1e-12)
    assert lowest_of(_table(["nb", "gaussian-nll", "nb", "nb"])) == 0.0
    assert lowest_of(_table([None, "gaussian-nll", "nb", "nb"])) == pytest.approx(GAUSS_LOWEST, abs=1e-12)
    assert lowest_of(_table(["mse", "gaussian-nll", "nb", "nb"])) == 0.0
    assert lowest_of(_table("mse").iloc[:0]) == 0.0


# ---- the evaluation cells' draws -----------------------------------------------------------------

def _npz(path, rng, scale):
    path.parent.mkdir(parents=True, exist_ok=True)
    n = rng.integers(5, 15, N_CELLS).astype(float)
    np.savez(path, **{f"{s}_{k}": (scale + rng.random(N_CELLS)) * n for s in ("val", "test") for k in ("sse", "loss")},
             val_n=n, test_n=n)


@pytest.fixture
def sweep(tmp_path):
    """A sweep of nb runs, each with its own cells.npz and two cooldown branches' sums, and a failed
    run without any (fit_csv leaves its row out of the draws)."""
    rng = np.random.default_rng(2024)
    ids = [f"r{i}" for i in range(N_RUNS)]
    for i, rid in enumerate(ids):
        _npz(tmp_path / "runs" / rid / "cells.npz", rng, 2.0 / (i + 1))
        for seen in (1000, 2000):
            _npz(tmp_path / "runs" / rid / "branches" / f"{seen}.npz", rng, 3.0 / (i + 1) + 1000 / seen)
    runs = pd.DataFrame({"run_id": ids + ["r-failed"], "params": np.logspace(4, 8, N_RUNS + 1),
                         "test_loss": np.append(2.0 / np.arange(1, N_RUNS + 1) + 0.5, np.nan),
                         "best_val_loss": np.append(2.0 / np.arange(1, N_RUNS + 1) + 0.6, np.nan),
                         "objective": "nb", "status": ["ok"] * N_RUNS + ["failed"]})
    runs.to_csv(tmp_path / "results.csv", index=False)
    branches = pd.DataFrame({"run_id": np.repeat(ids, 2), "cells_seen": [1000, 2000] * N_RUNS,
                             "test_loss": 1.0, "objective": "nb", "status": "ok"})
    return tmp_path, runs, branches


def _checksum(draws):
    return float(np.nansum(draws.values * np.arange(1, draws.values.shape[1] + 1)[None, :]))


# recorded from the two builders before they became one (fit_csv's and the report's): shape, a
# column-weighted sum of the draws and the sum of the observed losses
EXPECTED = {
    "fit_csv": ((40, N_RUNS + 1), 1007.82886581819, 10.241651001745453),
    "report": ((40, N_RUNS), 1007.8288658181901, 10.241651001745453),
    "branches": ((40, 2 * N_RUNS), 6909.82079363439, 37.770607975765685),
}


def _check(draws, name):
    shape, checksum, observed = EXPECTED[name]
    assert draws.values.shape == shape and draws.n_cells == N_CELLS and draws.split == "test"
    assert _checksum(draws) == pytest.approx(checksum, rel=1e-12)
    assert float(np.nansum(draws.observed)) == pytest.approx(observed, rel=1e-12)


def test_the_draws_of_a_sweeps_runs_and_branches(sweep):
    path, runs, branches = sweep
    ok = runs[runs.status == "ok"].reset_index(drop=True)
    csv = sweep_cell_draws(path, runs, y=None, n_boot=40, seed=5)
    _check(csv, "fit_csv")
    assert np.isnan(csv.values[:, -1]).all() and np.isnan(csv.observed[-1])  # the failed run
    rep, why = eval_cell_draws(ok, path, SETTINGS, "test_loss")
    assert why is None
    _check(rep, "report")
    assert np.array_equal(rep.values, sweep_cell_draws(path, ok, y="test_loss", n_boot=40, seed=5).values)
    assert np.array_equal(rep.values, csv.values[:, :N_RUNS]) and np.array_equal(rep.observed, csv.observed[:N_RUNS])
    br, why = eval_cell_draws(branches, path, SETTINGS, "test_loss", branches=True)
    assert why is None
    _check(br, "branches")
    assert np.array_equal(br.values, sweep_cell_draws(path, branches, y="test_loss", n_boot=40, seed=5,
                                                      branches=True).values)
    # by hand: the same paths, bits (nb), the settings' resamples and seed
    paths = [path / "runs" / r / "cells.npz" for r in ok.run_id]
    by_hand = run_cell_draws(paths + [None], y="test_loss", unit="bits", n_boot=40, seed=5)
    assert np.array_equal(csv.values, by_hand.values, equal_nan=True)
    bpaths = [path / "runs" / r / "branches" / f"{c}.npz" for r, c in zip(branches.run_id, branches.cells_seen)]
    assert np.array_equal(br.values, run_cell_draws(bpaths, y="test_loss", unit="bits", n_boot=40, seed=5).values)


def test_fit_csv_fits_with_the_draws_of_the_one_builder(sweep):
    path, _, _ = sweep
    kw = dict(law="power-floor", bootstrap=40, seed=5)
    fit = fit_csv(path / "results.csv", **kw)
    assert fit.extra["eval_cells"]["n_cells"] == N_CELLS and fit.extra["loss_unit"] == "bits"
    runs = pd.read_csv(path / "results.csv")  # as fit_csv reads it
    draws = sweep_cell_draws(path, runs, y=None, n_boot=40, seed=5)
    assert fit.ci95 == fit_table(runs, cell_draws=draws, **kw).ci95


def test_a_mixed_table_still_draws_its_cells(sweep):
    """The refusal of mixed depths is the fit's: the draws of such a table are still had (fit_csv
    then fails on the fit itself, as it did)."""
    path, runs, _ = sweep
    mixed = runs.assign(depth=[1.0, 0.5] * 3)
    _check(sweep_cell_draws(path, mixed, y=None, n_boot=40, seed=5), "fit_csv")
    mixed.to_csv(path / "results.csv", index=False)
    with pytest.raises(FitError, match="mixes sequencing depths"):
        fit_csv(path / "results.csv", law="power-floor", bootstrap=40, seed=5)


def _break(path, rid="r2", how="missing"):
    f = path / "runs" / rid / "cells.npz"
    if how == "missing":
        f.unlink()
    else:
        f.write_text("not an npz")


ONLY = "only best_val_mse, test_mse, best_val_loss, test_loss"
LEFT_OUT = "the intervals leave out the evaluation cells' noise"
# (the report's why, fit_csv's reason) as the two builders gave them; <SWEEP> is the sweep directory
WHY = {
    "boot0": (f"{LEFT_OUT}: fit.bootstrap is 0", "bootstrap = 0: the evaluation cells were not resampled"),
    "missing": (f"{LEFT_OUT}: 1 of 5 points have no per-cell sums (e.g. runs/r2/cells.npz)",
                "per-cell sums not found: <SWEEP>/runs/r2/cells.npz"),
    "corrupt": (f"{LEFT_OUT} (<SWEEP>/runs/r2/cells.npz: not a readable .npz (ValueError))",
                "<SWEEP>/runs/r2/cells.npz: not a readable .npz (ValueError)"),
    "bad_y": (f"{LEFT_OUT} ('params' is not scored from per-cell sums ({ONLY}))",
              f"'params' is not scored from per-cell sums ({ONLY})"),
    # both now name the missing file first; fit_csv's builder named the unreadable one, read before it
    "corrupt_then_missing": (f"{LEFT_OUT}: 1 of 5 points have no per-cell sums (e.g. runs/r3/cells.npz)",
                             "per-cell sums not found: <SWEEP>/runs/r3/cells.npz"),
}


@pytest.mark.parametrize("case", sorted(WHY))
def test_why_there_are_no_draws(sweep, case):
    path, runs, _ = sweep
    ok = runs[runs.status == "ok"].reset_index(drop=True)
    settings, y = dict(SETTINGS), "test_loss"
    if case == "boot0":
        settings["bootstrap"] = 0
    elif case == "bad_y":
        y = "params"
    elif case == "corrupt_then_missing":
        _break(path, "r1", "corrupt")
        _break(path, "r3")
    else:
        _break(path, how=case)
    draws, why = eval_cell_draws(ok, path, settings, y)
    assert draws is None and why.replace(str(path), "<SWEEP>") == WHY[case][0]
    with pytest.raises(FitError) as err:
        sweep_cell_draws(path, runs, y=None if y == "test_loss" else y, n_boot=settings["bootstrap"], seed=5)
    assert str(err.value).replace(str(path), "<SWEEP>") == WHY[case][1]
    if y == "test_loss":  # fit_csv cannot be asked for a column it then fits on
        note = fit_csv(path / "results.csv", law="power-floor", bootstrap=settings["bootstrap"]).extra["eval_cells"]
        assert note == {"note": "fitted without the evaluation cells' noise: "
                                + WHY[case][1].replace("<SWEEP>", str(path))}


def test_no_sweep_no_run_id():
    frame = pd.DataFrame({"params": [1.0], "test_loss": [1.0]})
    assert eval_cell_draws(frame, None, SETTINGS, "test_loss") == (None, None)
    with pytest.raises(FitError, match="the table has no run_id column to find each run's cells"):
        sweep_cell_draws(".", frame, y="test_loss", n_boot=4, seed=0)


def test_fit_table_is_one_function_with_its_signature():
    import inspect

    params = list(inspect.signature(fit_table).parameters)
    assert params == ["df", "law", "method", "x", "y", "bootstrap", "seed", "groups", "per_gene_mse", "weights",
                      "gain_tolerance", "n_jobs", "interval", "blocked", "cell_draws"]
    assert fit_table.__doc__.startswith("Fit ``law`` to the finished runs of ``df``")
    assert not hasattr(core, "_fit_table") and not hasattr(core, "_sweep_cell_draws")
