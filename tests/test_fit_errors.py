"""Degenerate input gets a one-line FitError naming the problem and the fix."""

import numpy as np
import pandas as pd
import pytest

from cellscale.errors import FitError
from cellscale.fit import fit_csv, fit_table


def table(**overrides):
    base = {
        "params": [1e3, 1e4, 1e5, 1e6, 1e7],
        "train_cells": [1e3, 2e3, 4e3, 8e3, 1.6e4],
        "best_val_mse": [2.0, 1.7, 1.55, 1.5, 1.48],
        "status": ["ok"] * 5,
    }
    base.update(overrides)
    return pd.DataFrame(base)


def check(message_start, df=None, **kwargs):
    kwargs.setdefault("law", "power-floor")
    kwargs.setdefault("bootstrap", 0)
    with pytest.raises(FitError) as info:
        fit_table(table() if df is None else df, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(message_start), message
    return message


def test_unknown_law():
    msg = check("unknown law 'powr' (available: chinchilla, data-constrained, power, power-floor)", law="powr")
    assert msg.endswith(")")


def test_unknown_method():
    check("unknown method 'lsq' (available: huber-log, ls-log, nls, paper)", method="lsq")


def test_paper_only_for_power_laws():
    check("method 'paper' fits only power and power-floor", law="chinchilla", method="paper")


def test_unknown_column():
    msg = check("column 'loss' not in the table (columns: params, train_cells, best_val_mse, status)", y="loss")
    assert "--x/--y" in msg


def test_nan():
    check("column 'best_val_mse' has NaN, inf or non-numeric values in 1 of 5 finished runs",
          table(best_val_mse=[2.0, np.nan, 1.55, 1.5, 1.48]))


def test_non_positive():
    check("column 'params' has non-positive values (min 0)", table(params=[0, 1e4, 1e5, 1e6, 1e7]))


def test_constant_x():
    check("column 'params' is constant (all 1000)", table(params=[1e3] * 5))


def test_constant_y():
    check("column 'best_val_mse' is constant (all 1.5)", table(best_val_mse=[1.5] * 5))


def test_fewer_points_than_parameters():
    df = table().iloc[:4]
    check("'chinchilla' has 5 parameters but the table has 4 distinct configuration(s) of params, train_cells",
          df, law="chinchilla")


def test_repeated_seeds_do_not_count_as_configurations():
    df = pd.DataFrame({"params": [1e3, 1e3, 1e4, 1e4], "best_val_mse": [2.0, 2.1, 1.6, 1.7]})
    check("'power-floor' has 3 parameters but the table has 2 distinct configuration(s)", df)


def test_no_finished_runs():
    check("no finished runs in the table (no row with status == 'ok')", table(status=["failed"] * 5))


def test_wrong_number_of_x_columns():
    check("law 'chinchilla' needs 2 x column(s) (N, D), got 1", law="chinchilla", x=["params"])


def test_unfinished_rows_are_ignored_not_fatal():
    df = table(status=["ok", "ok", "ok", "failed", "ok"], best_val_mse=[2.0, 1.7, 1.55, np.nan, 1.48])
    fit = fit_table(df, law="power-floor", bootstrap=0)
    assert fit.n_points == 4


def test_missing_csv(tmp_path):
    with pytest.raises(FitError, match=r"^results table not found: .*nothere\.csv; pass the path"):
        fit_csv(tmp_path / "nothere.csv", law="power-floor")


def test_csv_missing_column(tmp_path):
    path = tmp_path / "results.csv"
    table().drop(columns="best_val_mse").to_csv(path, index=False)
    with pytest.raises(FitError, match=r"^column 'best_val_mse' not in the table"):
        fit_csv(path, law="power-floor")
