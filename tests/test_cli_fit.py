"""`cellscale fit` on tables of known truth: the fitted law's parameters, the columns it was asked
for, and the interval method named in its JSON and its text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellscale.cli import main

P = np.logspace(3, 7, 9)  # 1e3 .. 1e7 parameters, a point per half decade
TEST_TRUTH = {"a": 2.0, "alpha": 0.3, "c": 0.05}  # test_mse = a P^-alpha + c, exact
VAL_TRUTH = {"a": 1.5, "alpha": 0.25, "c": 0.1}  # best_val_mse, another law on the same rows
# two variables: test_mse = E + A / N^alpha + B / D^beta on a 5 x 5 grid of (params, train_cells)
CHIN_TRUTH = {"A": 50.0, "B": 30.0, "E": 0.1, "alpha": 0.4, "beta": 0.3}


def _law(t: dict, p: np.ndarray) -> np.ndarray:
    return t["a"] * p ** -t["alpha"] + t["c"]


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fit")
    exact = d / "results.csv"
    pd.DataFrame({"size": [f"s{i}" for i in range(len(P))], "params": P, "status": "ok",
                  "test_mse": _law(TEST_TRUTH, P), "best_val_mse": _law(VAL_TRUTH, P)}).to_csv(exact, index=False)
    n, cells = np.meshgrid(np.logspace(3, 6, 5), np.logspace(3, 6, 5), indexing="ij")
    n, cells = n.ravel(), cells.ravel()
    t = CHIN_TRUTH
    chin = d / "chinchilla.csv"
    pd.DataFrame({"params": n, "train_cells": cells, "status": "ok",
                  "test_mse": t["E"] + t["A"] / n ** t["alpha"] + t["B"] / cells ** t["beta"]}).to_csv(chin, index=False)
    # 13 points with fixed multiplicative errors of up to 2%: intervals of non-zero width
    p13 = np.logspace(3, 7, 13)
    noisy = d / "noisy.csv"
    pd.DataFrame({"params": p13, "test_mse": _law(TEST_TRUTH, p13) * np.resize([1.02, 0.98, 1.0, 0.99, 1.01], 13)}
                 ).to_csv(noisy, index=False)
    return {"exact": exact, "chinchilla": chin, "noisy": noisy}


def cellscale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellscale.cli", *args], capture_output=True, text=True, timeout=120)


def fit_json(capsys, *args: str) -> dict:
    """`cellscale fit ... --json` in this process (no bootstrap unless asked, one process)."""
    assert main(["fit", *args, "--json", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1  # one JSON object on one line
    return json.loads(out)


def assert_params(got: dict, truth: dict, rel: float = 1e-3) -> None:
    assert set(got) == set(truth)
    for name, value in truth.items():
        assert got[name] == pytest.approx(value, rel=rel), name


def test_json_recovers_the_power_floor_truth(tables):
    proc = cellscale("fit", str(tables["exact"]), "--law", "power-floor", "--json", "--bootstrap", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    d = json.loads(proc.stdout)
    assert (d["law"], d["method"], d["x"], d["y"], d["n_points"]) == ("power-floor", "huber-log", ["params"],
                                                                       "test_mse", 9)
    assert_params(d["params"], TEST_TRUTH)
    assert d["floor_param"] == "c" and d["r2"] == pytest.approx(1.0, abs=1e-9)
    assert d["interval"] == "profile"  # the default for huber-log
    assert d["bootstrap"] == 0


def test_y_column_is_the_one_asked_for(tables, capsys):
    d = fit_json(capsys, str(tables["exact"]), "--x", "params", "--y", "best_val_mse", "--bootstrap", "0")
    assert (d["x"], d["y"], d["n_points"]) == (["params"], "best_val_mse", 9)
    assert_params(d["params"], VAL_TRUTH)


def test_two_variable_law(tables, capsys):
    d = fit_json(capsys, str(tables["chinchilla"]), "--law", "chinchilla", "--x", "params,train_cells",
                 "--bootstrap", "0")
    assert (d["law"], d["x"], d["y"], d["n_points"]) == ("chinchilla", ["params", "train_cells"], "test_mse", 25)
    assert_params(d["params"], CHIN_TRUTH)
    assert d["floor_param"] == "E"
    # the compute-optimal frontier of the truth: N_opt ~ C^(beta / (alpha + beta)), D_opt ~ C^(alpha / (alpha + beta))
    t = CHIN_TRUTH
    assert d["compute_optimal"]["N_opt_exponent"] == pytest.approx(t["beta"] / (t["alpha"] + t["beta"]), rel=1e-3)
    assert d["compute_optimal"]["D_opt_exponent"] == pytest.approx(t["alpha"] / (t["alpha"] + t["beta"]), rel=1e-3)


@pytest.mark.parametrize("args, method, interval", [
    (["--interval", "wald-t"], "huber-log", "wald-t"),
    (["--method", "nls"], "nls", "profile"),
    (["--method", "nls", "--interval", "wald-t"], "nls", "wald-t"),
    (["--interval", "residual-t", "--bootstrap", "200"], "huber-log", "residual-t"),
])
def test_interval_and_method_are_the_ones_asked_for(tables, capsys, args, method, interval):
    d = fit_json(capsys, str(tables["noisy"]), *(["--bootstrap", "0"] + args))
    assert (d["method"], d["interval"], d["n_points"]) == (method, interval, 13)
    assert d["bootstrap"] == (200 if "--bootstrap" in args else 0) and d["bootstrap_failed"] == 0
    # 2% errors: the estimates within 10% of the truth, each inside its own interval, and the truth too
    assert_params(d["params"], TEST_TRUTH, rel=0.1)
    assert d["estimate_outside_interval"] == []
    for name, (lo, hi) in d["ci95"].items():
        assert lo < d["params"][name] < hi, (name, lo, hi)
        assert lo < TEST_TRUTH[name] < hi, (name, lo, hi)


def test_text_output_names_the_interval_method(tables):
    proc = cellscale("fit", str(tables["noisy"]), "--method", "nls", "--interval", "wald-t", "--bootstrap", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("fit (power-floor, nls, n=13, R^2="), lines
    assert [ln for ln in lines if ln.startswith("intervals: wald-t (")], lines
