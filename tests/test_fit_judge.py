"""The fit judges the points it was handed (issue 26, part 1): named flags in fit.json, warning lines
from `cellscale fit`, and no floor or bits given as a measurement when the points cannot carry one."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from cellscale.fit import fit_table
from cellscale.fit.judge import lack_of_fit, rising_pairs
from cellscale.fit.text import format_fit

# the issue's table: six sizes, three seeds, the largest worse than the one before it by ~3 seed SDs
ISSUE_26 = """params,seed,best_val_mse
500,0,2.3006
500,1,2.3075
500,2,2.2944
10000,0,1.7560
10000,1,1.7484
10000,2,1.7484
120000,0,1.6314
120000,1,1.6209
120000,2,1.6197
900000,0,1.5894
900000,1,1.5918
900000,2,1.5848
20000000,0,1.5635
20000000,1,1.5542
20000000,2,1.5578
100000000,0,1.5754
100000000,1,1.5700
100000000,2,1.5689
"""


def _clean_ladder() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    P = np.repeat(np.logspace(3, 8, 6), 3)
    y = (2.0 * P**-0.3 + 1.0) * np.exp(0.003 * rng.standard_normal(P.size))
    return pd.DataFrame({"params": P, "seed": np.tile([0, 1, 2], 6), "best_val_mse": y})


def test_a_ladder_whose_top_stopped_falling_gets_no_floor():
    fit = fit_table(pd.read_csv(io.StringIO(ISSUE_26)), law="power-floor", bootstrap=100).to_dict()
    j = fit["judgement"]
    assert j["flags"] == ["lack_of_fit", "top_not_falling", "floor_above_best"] and j["floor_identified"] is False
    assert j["rising_pairs"] == [[2e7, 1e8]] and j["lack_of_fit"]["df"] == [3, 12] and j["lack_of_fit"]["p"] < 0.01
    lines = format_fit(fit)
    assert "warning: a larger size is worse than a smaller one beyond their seed spread: the top of the ladder " \
           "stopped falling (under-trained, or a rate off its optimum)" in lines
    assert "warning: the floor lies above the best size's mean loss" in lines
    assert lines[-1].startswith("floor: not identified by these points, so neither c nor its bits are a measurement")
    assert not any("entropy per masked gene" in line for line in lines)


def test_a_curve_that_rises_with_size_is_flagged_and_gets_no_bits():
    df = pd.DataFrame({"params": np.logspace(2, 6, 5), "best_val_mse": [1.0, 1.5, 2.0, 2.5, 3.0]})
    fit = fit_table(df, law="power-floor", bootstrap=50).to_dict()
    assert fit["judgement"]["flags"] == ["not_falling"] and fit["judgement"]["spearman_rho"] == pytest.approx(1.0)
    # one seed per size: the seed-spread checks are not made, and say so
    assert fit["judgement"]["checked"] == ["not_falling", "floor_above_best"]
    assert not any("entropy" in line for line in format_fit(fit))


def test_a_clean_ladder_is_not_flagged_and_keeps_its_bits():
    fit = fit_table(_clean_ladder(), law="power-floor", bootstrap=100).to_dict()
    j = fit["judgement"]
    assert j["flags"] == [] and j["floor_identified"] is True and j["lack_of_fit"]["p"] > 0.01
    assert j["checked"] == ["lack_of_fit", "top_not_falling", "not_falling", "floor_above_best"]
    assert any(line.startswith("entropy per masked gene (homoscedastic Gaussian)") for line in format_fit(fit))


def test_the_judgement_pieces():
    # the F test against replicates: a law through the group means has no lack of fit
    groups = [np.array([1.0, 1.2]), np.array([2.0, 2.2]), np.array([3.0, 3.4])]
    res = np.concatenate([g - g.mean() for g in groups])
    assert lack_of_fit(groups, res, n_params=2)["F"] == pytest.approx(0.0, abs=1e-12)
    assert lack_of_fit([np.array([1.0]), np.array([2.0])], np.zeros(2), n_params=1) is None  # no replicates
    # a larger size worse beyond two standard errors of the difference, and only then
    tight = [(np.array([1.0]), np.array([1.00, 1.01, 0.99])), (np.array([10.0]), np.array([1.05, 1.06, 1.04]))]
    loose = [(np.array([1.0]), np.array([1.0, 1.2, 0.8])), (np.array([10.0]), np.array([1.05, 1.25, 0.85]))]
    assert rising_pairs(tight) == [[1.0, 10.0]] and rising_pairs(loose) == []


def test_the_report_neither_states_the_floor_nor_its_bits_as_measured(tmp_path):
    from cellscale.report.meaning import meaning_paragraph

    runs = pd.read_csv(io.StringIO(ISSUE_26)).assign(
        status="ok", size=lambda f: "P" + f["params"].astype(str), run_id=lambda f: f["size"] + "-s" + f["seed"].astype(str),
        test_mse=lambda f: f["best_val_mse"])
    fit = fit_table(runs, law="power-floor", bootstrap=50).to_dict()
    text = meaning_paragraph(runs, json.loads(json.dumps(fit)))
    assert ("These points do not identify a floor (the law misses its points by more than the seeds' own spread "
            "(lack-of-fit F test); a larger size is worse") in text
    assert "so neither it nor its bits are a measurement." in text and "bits per masked gene" not in text


def _runs(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(status="ok", size=lambda f: "P" + f["params"].astype(int).astype(str),
                     run_id=lambda f: f["size"] + "-s" + f["seed"].astype(str), test_mse=lambda f: f["best_val_mse"],
                     converged=True)


def test_the_verdicts_open_with_at_most_five_lines():
    from cellscale.report.verdicts import verdict_lines

    issue = _runs(pd.read_csv(io.StringIO(ISSUE_26)))
    lines = verdict_lines(issue, fit_table(issue, law="power-floor", bootstrap=50).to_dict(), {"gene_mean": 2.5})
    assert lines == [
        "Best model: P20000000, test MSE 1.558, below every baseline (the gene-mean baseline).",
        "Trained: all 18 runs converged (their last doublings of cells seen, cooled down, bought under the "
        "tolerance; rule in the methods).",
        "Law: misses its points by more than the seeds' own spread (R^2 0.999, lack-of-fit test).",
        "Floor: not identified (lack of fit, top not falling, floor above best).",
        "Bits: none, as there is no identified floor to read them from.",
    ]
    clean = _runs(_clean_ladder())
    fit = fit_table(clean, law="power-floor", bootstrap=100).to_dict()
    lines = verdict_lines(clean.assign(converged=[True] * 9 + [False] * 9), fit, {"gene_mean": 1.0, "knn": 1.001})
    c, (lo, hi) = fit["params"]["c"], fit["ci95"]["c"]
    assert lines[0] == "Best model: P100000000, test MSE 1.008, NOT below the gene-mean baseline, kNN regression " \
                       "on the visible genes."
    assert lines[1] == "Trained: 9 of 18 runs converged; the others were still improving when their budget ended."
    assert lines[2].startswith("Law: fits its points within the seeds' spread (R^2 ")
    assert lines[3] == f"Floor: c = {c:.4g} [{lo:.4g}, {hi:.4g}] (95%)."
    assert lines[4].startswith(f"Bits: {0.5 * np.log2(2 * np.pi * np.e * c):.3g} [") and len(lines) == 5
    # a floor whose interval runs down to the bottom of its range is no measurement either
    wide = {**fit, "judgement": {**fit["judgement"], "floor_interval_reaches_bound": True, "floor_identified": False},
            "ci95": {**fit["ci95"], "c": [1e-13, hi]}}
    assert verdict_lines(clean, wide, {})[3].startswith(f"Floor: not identified (c = {c:.4g}, but its 95% interval")
    assert verdict_lines(clean, wide, {})[4] == "Bits: none, as there is no identified floor to read them from."
    # three sizes, two seeds each: replicates, but no degree of freedom for the lack-of-fit test
    three = clean[clean["params"].isin(sorted(clean["params"].unique())[:3])]
    three_fit = fit_table(three, law="power-floor", bootstrap=0).to_dict()
    assert verdict_lines(three, three_fit, {})[2].endswith(
        "with 3 sizes for its 3 parameters its fit cannot be tested against the seeds' spread (it needs more sizes "
        "than parameters).")
    assert verdict_lines(None, {"error": "too few sizes"}, {}) == [
        "Best model: none (no run finished with a finite validation loss).", "Law: none fitted (too few sizes)."]


def test_aic_and_bic_weigh_rows_as_the_fit_does():
    from cellscale.fit.compare import information_criteria

    r = np.array([0.1, -0.2, 0.3, 0.0])
    plain = information_criteria(r, 2)
    assert plain == pytest.approx((4 * np.log(0.14 / 4) + 4, 4 * np.log(0.14 / 4) + 2 * np.log(4)))
    # weight 2 on a row counts its squared residual twice; weight 0 drops the row from n
    aic, bic = information_criteria(r, 2, np.array([2.0, 1.0, 0.0, 1.0]))
    assert (aic, bic) == pytest.approx((3 * np.log(0.06 / 3) + 4, 3 * np.log(0.06 / 3) + 2 * np.log(3)))
    assert information_criteria(r, 2, np.ones(4)) == pytest.approx(plain)
