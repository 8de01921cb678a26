"""FitResult's contract with the CLI and the report: JSON, predict, band, determinism."""

import json

import numpy as np
import pandas as pd
import pytest

from cellscale.fit import LAWS, METHODS, FitResult, fit_csv, fit_table, simulate_table

TRUE_PF = {"a": 5.0, "alpha": 0.3, "c": 1.4}


@pytest.fixture(scope="module")
def pf_table():
    return simulate_table("power-floor", TRUE_PF, {"params": np.logspace(3, 9, 12)}, noise=0.01, seeds=2, seed=1)


@pytest.fixture(scope="module")
def pf_fit(pf_table):
    return fit_table(pf_table, law="power-floor", bootstrap=100, seed=3, per_gene_mse=[1.0, 1.5, 2.5])


def test_registries():
    assert set(LAWS) == {"power", "power-floor", "chinchilla", "data-constrained"}
    assert set(METHODS) == {"paper", "huber-log", "ls-log", "nls"}


def test_to_dict_is_plain_json(pf_fit):
    out = pf_fit.to_dict()
    text = json.dumps(out, allow_nan=False)
    back = json.loads(text)
    for key in ("law", "method", "x", "y", "params", "ci95", "n_points", "r2", "floor_at_boundary",
                "aic", "bic", "no_floor", "leave_largest_out", "entropy_bits", "bootstrap"):
        assert key in back, key
    assert back["x"] == ["params"] and back["y"] == "best_val_mse"
    assert back["n_points"] == 24 and back["bootstrap"] == 100
    assert set(back["ci95"]) == {"a", "alpha", "c"}
    assert back["floor_at_boundary"] is False
    assert back["no_floor"]["law"] == "power"
    assert back["no_floor"]["delta_aic"] > 10  # the floor is real in this table
    lo_out = back["leave_largest_out"]
    assert lo_out["x"] == pytest.approx(1e9) and lo_out["n_heldout"] == 2
    assert abs(lo_out["rel_error"]) < 0.02
    ent = back["entropy_bits"]
    assert ent["ci95"][0] <= ent["gaussian"] <= ent["ci95"][1]
    assert ent["per_gene"]["bits"] <= ent["per_gene"]["homoscedastic_same_errors"]
    assert all(type(v) is float for v in back["params"].values())


def test_nan_becomes_null():
    df = pd.DataFrame({"params": [1e3, 1e4, 1e5, 1e6], "best_val_mse": [2.0, 1.7, 1.55, 1.5]})
    out = fit_table(df, law="power-floor", bootstrap=0, interval="bca-groups").to_dict()
    assert out["ci95"]["c"] == [None, None]
    json.dumps(out, allow_nan=False)


def test_predict_and_band(pf_fit, pf_table):
    grid = np.logspace(3, 10, 15)
    pred = pf_fit.predict(grid)
    p = pf_fit.params
    assert np.allclose(pred, p["a"] * grid ** -p["alpha"] + p["c"])
    assert np.allclose(pf_fit.predict({"params": grid}), pred)
    assert np.allclose(pf_fit.predict(grid[:, None]), pred)
    lo, hi = pf_fit.band(grid)
    assert lo.shape == hi.shape == grid.shape
    assert np.all(lo <= hi)
    truth = TRUE_PF["a"] * grid ** -TRUE_PF["alpha"] + TRUE_PF["c"]
    assert np.mean((lo <= truth) & (truth <= hi)) >= 0.8
    # and not wide: inside the data's range the median band is at most 1.25 x the delta-method
    # band (+-1.96 s.e. of the log prediction, s^2 (J'J)^-1); the group-bootstrap band was ~1.5 x
    law, u = LAWS["power-floor"], LAWS["power-floor"].from_natural(pf_fit.theta)
    X, y = np.log(pf_table[["params"]].to_numpy()), np.log(pf_table["best_val_mse"].to_numpy())
    fitted, J = law.log_predict_jac(u, X)
    cov = np.linalg.inv(J.T @ J) * np.sum((fitted - y) ** 2) / (y.size - 3)
    inside = np.logspace(3, 9, 13)
    _, Jg = law.log_predict_jac(u, np.log(inside)[:, None])
    delta = 2 * 1.96 * np.sqrt(np.einsum("ij,jk,ik->i", Jg, cov, Jg)) * pf_fit.predict(inside)
    blo, bhi = pf_fit.band(inside)
    assert np.median((bhi - blo) / delta) <= 1.25


def test_seeded_and_independent_of_process_count(pf_table):
    one = fit_table(pf_table, law="power-floor", bootstrap=40, seed=7, n_jobs=1)
    again = fit_table(pf_table, law="power-floor", bootstrap=40, seed=7, n_jobs=1)
    two = fit_table(pf_table, law="power-floor", bootstrap=40, seed=7, n_jobs=2)
    other = fit_table(pf_table, law="power-floor", bootstrap=40, seed=8, n_jobs=1)
    assert np.array_equal(one.samples, again.samples)
    assert np.allclose(one.samples, two.samples, rtol=1e-9, atol=0)
    assert not np.array_equal(one.samples, other.samples)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_a_batch_of_resamples_reports_how_it_stands_and_fits_the_same(pf_table, n_jobs):
    from cellscale.fit.bootstrap import CHUNKS_REPORTED, on_resamples

    plain = fit_table(pf_table, law="power-floor", bootstrap=40, seed=7, n_jobs=n_jobs)
    heard = []
    with on_resamples(lambda done, total: heard.append((done, total))):
        watched = fit_table(pf_table, law="power-floor", bootstrap=40, seed=7, n_jobs=n_jobs)
    assert np.array_equal(plain.samples, watched.samples)
    run = [d for d, t in heard if t == 40][:CHUNKS_REPORTED]  # the bootstrap's batch, chunk by chunk to its end
    assert run == sorted(run) and run[-1] == 40 and len(run) == CHUNKS_REPORTED
    heard.clear()
    fit_table(pf_table, law="power-floor", bootstrap=40, seed=7, n_jobs=n_jobs)  # outside the block: no one hears
    assert heard == []


def test_seeds_of_one_configuration_resample_together(pf_table):
    from cellscale.fit.bootstrap import resample_weights

    groups = np.repeat(np.arange(12), 2)
    W = resample_weights(groups, 50, seed=0)
    assert np.array_equal(W[:, 0::2], W[:, 1::2])
    assert np.allclose(W.sum(axis=1), 24)


def test_fit_csv_matches_fit_table(tmp_path, pf_table):
    path = tmp_path / "results.csv"
    pf_table.assign(status=["ok"] * 23 + ["failed"]).to_csv(path, index=False)
    fit = fit_csv(path, law="power-floor", bootstrap=0)
    assert isinstance(fit, FitResult)
    assert fit.n_points == 23


def test_nls_weights_column(pf_table):
    weighted = pf_table.assign(w=np.where(pf_table["params"] > 1e8, 1e-6, 1.0))
    a = fit_table(weighted, law="power-floor", method="nls", weights="w", bootstrap=0)
    b = fit_table(weighted[weighted["params"] <= 1e8], law="power-floor", method="nls", bootstrap=0)
    for name in ("a", "alpha", "c"):
        assert a.params[name] == pytest.approx(b.params[name], rel=1e-3)


def test_chinchilla_defaults_and_flops_constant():
    grid_n, grid_d = np.meshgrid(np.logspace(4, 7, 5), np.logspace(4, 6, 4))
    truth = {"A": 50.0, "B": 80.0, "E": 1.3, "alpha": 0.4, "beta": 0.35}
    df = simulate_table("chinchilla", truth, {"params": grid_n.ravel(), "train_cells": grid_d.ravel()},
                        noise=0.003, seed=2)
    df["flops"] = 9.0 * df["params"] * df["train_cells"]
    out = fit_table(df, law="chinchilla", bootstrap=50).to_dict()
    assert out["x"] == ["params", "train_cells"]
    co = out["compute_optimal"]
    assert co["k"] == pytest.approx(9.0)
    assert co["C_definition"].startswith("C = k * params * train_cells")
    for row in co["table"]:
        assert row["data_per_param"] == pytest.approx(row["D_opt"] / row["N_opt"])
        assert row["N_opt_ci95"][0] <= row["N_opt"] <= row["N_opt_ci95"][1]
    assert out["no_floor"]["law"] == "chinchilla-no-floor"
    for name, value in truth.items():
        assert out["params"][name] == pytest.approx(value, rel=0.15)


def test_data_constrained_reduces_to_chinchilla_without_repeats():
    dc, ch = LAWS["data-constrained"], LAWS["chinchilla"]
    theta_ch = np.array([50.0, 80.0, 1.3, 0.4, 0.35])
    theta_dc = np.concatenate([theta_ch, [15.0, 5.0]])
    N = np.logspace(3, 5, 6)
    # Large enough U that no size exceeds N_opt(U): N' = N and D' = U.
    U = np.full(6, 1e9)
    X = np.column_stack([N, U, U])
    assert np.allclose(dc.predict(theta_dc, X), ch.predict(theta_ch, X[:, [0, 2]]))
    # Repeating data is worth less than fresh data, and never worth less than none.
    rep = np.column_stack([N, U * 8, U])
    fresh = np.column_stack([N, U * 8, U * 8])
    assert np.all(dc.predict(theta_dc, rep) > dc.predict(theta_dc, fresh))
    assert np.all(dc.predict(theta_dc, rep) < dc.predict(theta_dc, X))


def test_data_constrained_predicts_a_batch_of_parameters_as_it_predicts_each():
    # the start grid and the numerical Jacobian predict many parameter vectors in one broadcast pass
    # (benchmarks/bench_data_fit.py: 3.3x on a real sweep's fit); it must be each vector's prediction
    law = LAWS["data-constrained"]
    rng = np.random.default_rng(0)
    logX = np.log(np.column_stack([np.logspace(2, 5, 12), np.logspace(4, 6, 12), np.repeat([1600.0, 6400.0], 6)]))
    U = np.column_stack([rng.uniform(-2, 10, 9), rng.uniform(-2, 10, 9), rng.uniform(-3, 0, 9),
                         rng.uniform(0.05, 1, 9), rng.uniform(0.05, 1, 9), rng.uniform(-4, 9, 9), rng.uniform(-4, 9, 9)])
    many = law.log_predict_many(U, logX)
    assert many.shape == (9, 12)
    np.testing.assert_allclose(many, np.stack([law.log_predict(u, logX) for u in U]), rtol=1e-13, atol=0)
    u = U[0]
    one_at_a_time = np.empty((12, 7))
    for j in range(7):
        h = 1e-6 * max(1.0, abs(u[j]))
        step = np.eye(7)[j] * h
        one_at_a_time[:, j] = (law.log_predict(u + step, logX) - law.log_predict(u - step, logX)) / (2 * h)
    np.testing.assert_allclose(law.log_jac(u, logX), one_at_a_time, rtol=1e-9, atol=1e-12)


def test_data_constrained_fit_recovers_decay():
    truth = {"A": 50.0, "B": 80.0, "E": 1.3, "alpha": 0.4, "beta": 0.35, "R_D_star": 10.0, "R_N_star": 5.0}
    n, u, epochs = np.meshgrid(np.logspace(3, 5, 4), np.logspace(3, 5, 4), [1, 4, 16, 64])
    grid = {"params": n.ravel(), "cells_seen": (u * epochs).ravel(), "train_cells": u.ravel()}
    df = simulate_table("data-constrained", truth, grid, noise=0.002, seed=0)
    fit = fit_table(df, law="data-constrained", bootstrap=0, interval="profile")
    assert fit.x == ["params", "cells_seen", "train_cells"]
    # 0.2% noise on 64 runs: every parameter within a few percent (seeds 0-2 land within 3%)
    for name, rel in {"A": 0.01, "B": 0.02, "E": 0.01, "alpha": 0.01, "beta": 0.01,
                      "R_D_star": 0.03, "R_N_star": 0.03}.items():
        assert fit.params[name] == pytest.approx(truth[name], rel=rel), name
    for name in ("R_D_star", "R_N_star"):  # both decay constants are identified: finite, covering intervals
        lo, hi = fit.ci95[name]
        assert lo <= truth[name] <= hi and hi < 1.2 * truth[name] and lo > 0.8 * truth[name], (name, lo, hi)
    assert fit.r2 > 0.999


def test_fit_imports_no_torch_and_no_other_cellscale_module():
    import subprocess
    import sys

    # the torch-free bottom of the package: errors, JSON writing (stdlib), the entropy formula (numpy),
    # the usable-CPU count (stdlib), the convergence rule's gain (stdlib), the objectives' least losses (stdlib),
    # which column chooses and which is fitted (pandas), the run record's file names (stdlib); the two
    # packages' own __init__ are docstrings
    code = (
        "import sys, cellscale.fit.core, cellscale.fit.data_axis, cellscale.fit.cells; LOW = {'cellscale.errors', "
        "'cellscale.runtime', 'cellscale.runtime.io', 'cellscale.runtime.cpus', 'cellscale.rules', "
        "'cellscale.rules.bits', 'cellscale.rules.plateau', 'cellscale.rules.lossbounds', 'cellscale.rules.lrgrid', "
        "'cellscale.schema'}; "
        "bad = [m for m in sys.modules if m == 'torch' or (m.startswith('cellscale.') and "
        "not m.startswith('cellscale.fit') and m not in LOW)]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
