"""The data axis judged on its own points (cellscale.fit.backtest): the joint law refitted without the last
doubling of cells seen predicts it, and the report states what that check found."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellscale.fit import fit_data_axis, simulate_branches
from cellscale.fit.backtest import backtest, held_out
from cellscale.fit.compare import prediction_error

TRUTH = {"A": 4.0, "B": 3000.0, "E": 0.7, "alpha": 0.35, "beta": 0.9}
SIZES = {"XXS": 50.0, "MINI": 400.0, "TINY": 2300.0, "SMALL": 26000.0, "XS": 102000.0}
CELLS = 7500 * 2.0 ** np.arange(5)  # 7,500 to 120,000 cells seen


@pytest.fixture(scope="module")
def table():
    return simulate_branches("chinchilla", TRUTH, sizes=SIZES, cells=CELLS, noise=0.003, run_noise=0.005, seed=0)


def test_the_last_doubling_is_held_out_and_predicted_by_the_law_of_the_rest(table):
    bt = backtest(table, law="chinchilla", bootstrap=100, seed=0)
    held = held_out(table)
    assert held.tolist() == (table["cells_seen"] == 120_000).tolist()
    assert (bt["law"], bt["n_fitted"], bt["fitted_up_to"], bt["n"], bt["bootstrap"]) == ("chinchilla", 20, 60_000.0, 5, 100)
    short = fit_data_axis(table[~held], law="chinchilla", bootstrap=0)  # the same point estimate, no resamples
    last = table[held]
    expected = short.predict(last["params"], last["cells_seen"]) / last["test_loss"].to_numpy() - 1
    got = np.array([p["error"] for p in bt["points"]])
    assert got == pytest.approx(expected, rel=1e-9)
    assert [p["size"] for p in bt["points"]] == list(SIZES)
    assert bt["rms_error"] == pytest.approx(np.sqrt(np.mean(expected**2)), rel=1e-12)
    worst = int(np.argmax(np.abs(expected)))
    assert (bt["largest_size"], bt["largest_error"]) == (list(SIZES)[worst], pytest.approx(expected[worst]))
    # a known law with 0.3% point noise and 0.5% run offsets: one doubling is predicted within 2%
    assert bt["rms_error"] < 0.02
    inside = [p["ci95"][0] <= p["measured"] <= p["ci95"][1] for p in bt["points"]]
    assert [p["inside"] for p in bt["points"]] == inside and bt["inside"] == sum(inside)


def test_without_resamples_the_backtest_has_errors_but_no_intervals(table):
    bt = backtest(table, law="chinchilla", bootstrap=0)
    assert bt["inside"] is None and all(p["ci95"] is None and p["inside"] is None for p in bt["points"])
    assert np.isfinite(bt["rms_error"])


def test_a_ladder_too_short_to_hold_a_doubling_out_gets_a_reason(table):
    one = table[table["cells_seen"] == 120_000]
    assert backtest(one, law="chinchilla", bootstrap=0)["error"] == (
        "every point is in one doubling of cells seen: nothing to hold out")
    two = table[table["cells_seen"] >= 60_000]  # what is left to fit: one cells seen, nothing to learn D's term from
    bt = backtest(two, law="chinchilla", bootstrap=0)
    assert bt["n_fitted"] == 5 and bt["error"] == (
        "the law on the points up to 60,000 cells seen: column 'cells_seen' is constant (all 60000); a scaling law "
        "needs at least two different values")


def test_the_error_is_the_share_a_prediction_missed_by_in_either_unit():
    assert prediction_error(0.25, 0.2) == pytest.approx(0.25)
    assert prediction_error(0.19, 0.2) == pytest.approx(-0.05)
    # bits: the share of the variance a Gaussian of that entropy has; 0.5 bits high is a variance 2x too large
    assert prediction_error(-0.5, -1.0, "bits") == pytest.approx(1.0)
    assert prediction_error(1.0, 1.0, "bits") == 0.0


def _outcome(bt, n_points=25):
    from cellscale.report.data_axis import DataOutcome

    return DataOutcome(record={"n_points": n_points, "backtest": bt})


def test_the_report_states_the_backtest_in_its_verdicts_and_its_data_section():
    from cellscale.report.data_axis import backtest_sentence, prediction_clause
    from cellscale.report.verdicts import verdict_lines

    bt = {"n_fitted": 20, "fitted_up_to": 60_000.0, "n": 5, "inside": 4, "rms_error": 0.0123,
          "largest_error": -0.0211, "largest_size": "XS"}
    clause = ("The joint law L(N, D), refitted without the last doubling of cells seen, predicts it within 1.2% rms "
              "(largest miss -2.1%, XS).")
    assert prediction_clause(_outcome(bt)) == clause
    # said on the "Law:" line: the verdicts stay at most five
    assert verdict_lines(None, {"error": "too few sizes"}, {}, prediction=clause) == [
        "Best model: none (no run finished with a finite validation loss).", f"Law: none fitted (too few sizes). {clause}"]
    assert backtest_sentence(_outcome(bt)) == (
        "Checked on its own points: refitted to the 20 points up to 60,000 cells seen, the law predicts the 5 points "
        "of the last doubling with an rms error of 1.2% (largest: XS, -2.1%), 4 of 5 inside their 95% prediction "
        "intervals (a refit on few points per run draws them too narrow: on simulated sweeps like the demo they held "
        "56% of the held-out points, docs/ablations.md). That is how far a law of this sweep's points carried one doubling of cells seen; the law above "
        "rests on all 25 points, and a prediction further out is less certain.")
    assert backtest_sentence(_outcome({**bt, "inside": None})).split("%), ")[1].startswith(
        "no prediction intervals (fit.bootstrap is 0). That is how far")
    failed = {"error": "every point is in one doubling of cells seen: nothing to hold out"}
    assert prediction_clause(_outcome(failed)) is None  # said in the section, not in the verdicts
    assert backtest_sentence(_outcome(failed)) == (
        "The law was not checked on its own points: every point is in one doubling of cells seen: nothing to hold out.")
    assert prediction_clause(None) is None and backtest_sentence(_outcome(None)) == ""


def test_the_methods_say_how_the_law_was_checked():
    from cellscale.report.data_axis import _backtest_method

    bt = {"n_fitted": 20, "fitted_up_to": 60_000.0, "bootstrap": 200, "n": 5}
    assert _backtest_method(bt) == (
        " To check it, the same law was refitted to the 20 points up to 60,000 cells seen (200 resamples) and its "
        "predictions, with their 95% prediction intervals, set against the measured points of the last doubling.")
    assert _backtest_method({"error": "nothing to hold out"}) == "" and _backtest_method(None) == ""


def test_the_refit_takes_the_evaluation_cells_draws_of_its_points_and_only_as_many_as_its_resamples(table, monkeypatch):
    import cellscale.fit.backtest as bt_module
    from cellscale.fit.cells import CellDraws

    seen = {}
    real = bt_module.fit_data_axis

    def spy(points, **kw):
        seen["rows"], seen["draws"] = len(points), kw["cell_draws"]
        return real(points, **kw)

    monkeypatch.setattr(bt_module, "fit_data_axis", spy)
    values = np.random.default_rng(0).normal(0.0, 1e-3, size=(300, len(table))) + table["test_loss"].to_numpy()
    draws = CellDraws(values=values, observed=table["test_loss"].to_numpy(), n_cells=500, split="test")
    backtest(table, law="chinchilla", bootstrap=40, cell_draws=draws)
    kept = ~held_out(table)
    assert seen["rows"] == 20 and seen["draws"].values.shape == (40, 20)
    assert np.array_equal(seen["draws"].values, values[:40][:, kept])
    assert np.array_equal(seen["draws"].observed, table["test_loss"].to_numpy()[kept])


def test_its_interval_method_draws_the_same_laws_as_the_reports_profile(table):
    from cellscale.fit.backtest import INTERVAL

    short = table[~held_out(table)]
    draws = {name: fit_data_axis(short, law="chinchilla", bootstrap=30, seed=3, interval=name).theta_draws
             for name in (INTERVAL, "profile")}
    assert draws[INTERVAL].shape == (30, 5) and np.array_equal(draws[INTERVAL], draws["profile"])


def test_a_size_the_refit_never_saw_is_not_judged_and_is_named(table):
    # SMALL's points before the last doubling are gone: the refit would predict it across parameters too
    late = table[~((table["size"] == "SMALL") & (table["cells_seen"] < 120_000))]
    bt = backtest(late, law="chinchilla", bootstrap=0)
    assert bt["not_in_refit"] == ["SMALL"] and bt["n"] == 4
    assert [p["size"] for p in bt["points"]] == ["XXS", "MINI", "TINY", "XS"]
    only = table[table["size"].isin(["XXS", "MINI"]) | (table["cells_seen"] == 120_000)]
    only = only[~((only["size"].isin(["XXS", "MINI"])) & (only["cells_seen"] == 120_000))]
    assert backtest(only, law="chinchilla", bootstrap=0)["error"] == "no size of the last doubling has a point before it"


def test_points_that_did_not_finish_are_neither_fitted_nor_judged(table):
    broken = table.copy()
    broken.loc[broken.index[4], "status"] = "diverged"  # XXS at 120k
    broken.loc[broken.index[9], "test_loss"] = np.nan  # MINI at 120k
    bt = backtest(broken, law="chinchilla", bootstrap=0)
    assert [p["size"] for p in bt["points"]] == ["TINY", "SMALL", "XS"] and bt["n_fitted"] == 20
    assert backtest(table.iloc[:0], law="chinchilla", bootstrap=0)["error"] == (
        "every point is in one doubling of cells seen: nothing to hold out")


def test_runs_on_several_training_sets_are_backtested_on_the_data_constrained_law():
    truth = {"A": 4.0, "B": 3000.0, "E": 0.7, "alpha": 0.35, "beta": 0.9, "R_D_star": 3.0, "R_N_star": 20.0}
    sizes = {"MINI": 400.0, "TINY": 2300.0, "SMALL": 26000.0, "XS": 102000.0}
    small = simulate_branches("data-constrained", truth, sizes=sizes, cells=CELLS, train_cells=4000.0, noise=0.003, seed=1)
    big = simulate_branches("data-constrained", truth, sizes=sizes, cells=CELLS, train_cells=60000.0, noise=0.003, seed=2)
    both = pd.concat([small, big.assign(run_id=big["run_id"] + "-u60k")], ignore_index=True)
    bt = backtest(both, law="data-constrained", bootstrap=0)
    assert bt["n"] == 8 and bt["n_fitted"] == 32 and bt["not_in_refit"] == []
    short = fit_data_axis(both[~held_out(both)], law="data-constrained", bootstrap=0)
    last = both[held_out(both)]
    expected = short.predict(last["params"], last["cells_seen"], last["train_cells"]) / last["test_loss"].to_numpy() - 1
    assert [p["error"] for p in bt["points"]] == pytest.approx(expected, rel=1e-9)
    assert sorted({p["train_cells"] for p in bt["points"]}) == [4000.0, 60000.0] and bt["rms_error"] < 0.03


def test_a_backtest_that_raises_costs_only_its_own_record(tmp_path, monkeypatch):
    from fixtures_report import add_branches, make_sweep

    import cellscale.report.data_axis as report_axis
    from cellscale.report.load import load_sweep

    sweep = make_sweep(tmp_path, sizes=("XXS", "TINY", "XS", "S", "M"), seeds=(0,), diverged=None, failed=None)
    add_branches(sweep)

    def broken(*args, **kwargs):
        raise IndexError("a bug")

    monkeypatch.setattr(report_axis, "backtest", broken)
    out = report_axis.run_data_fit(load_sweep(sweep))
    assert out.error is None and out.record["n_points"] == 18 and "converged" in out.record
    assert out.record["backtest"] == {"error": "the backtest raised IndexError: a bug"}
    assert report_axis.prediction_clause(out) is None
    assert report_axis.backtest_sentence(out) == "The law was not checked on its own points: the backtest raised IndexError: a bug."
