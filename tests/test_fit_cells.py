"""The evaluation cells' noise in the fit's intervals (cellscale.fit.cells): the draws share one
resample of the cells across points, score it exactly from the per-cell sums, and widen the
intervals (jointly with the bootstrap, in quadrature with the Gaussian intervals); fit_csv finds
the sums of a sweep's runs."""

import json
import math

import numpy as np
import pandas as pd
import pytest

import cellscale.fit.core as core
from cellscale.errors import FitError
from cellscale.fit import fit_csv, fit_table
from cellscale.fit.cells import (
    CELL_STREAM,
    CellDraws,
    cell_draws,
    cell_shift,
    observed,
    read_point_sums,
    run_cell_draws,
)

A, ALPHA, C = 5.0, 0.3, 1.4
SIZES = np.logspace(4, 9, 6)


def _sums(rng, n_cells, *, noise=0.05, sizes=SIZES, d=None, e=None, n=None):
    """Per-cell loss sums and counts of a power-floor ladder whose points share the cells: cell i
    costs C d_i + A P^-alpha e_i per masked position (d: the cell's difficulty, the floor's share;
    e: how much of it a larger model learns), times a little noise of each point's own."""
    d = rng.gamma(4, 0.25, n_cells) if d is None else d
    e = rng.gamma(2, 0.5, n_cells) if e is None else e
    n = rng.integers(20, 60, n_cells).astype(float) if n is None else n
    per_cell = C * d[None, :] + A * sizes[:, None] ** -ALPHA * e[None, :]
    sums = per_cell * (1 + noise * rng.standard_normal((sizes.size, n_cells))) * n[None, :]
    return sums, np.tile(n, (sizes.size, 1))


@pytest.fixture(scope="module")
def ladder():
    sums, counts = _sums(np.random.default_rng(7), 300)
    obs = observed(sums, counts)
    df = pd.DataFrame({"params": SIZES, "best_val_mse": obs, "status": "ok"})
    draws = CellDraws(cell_draws(sums, counts, n_boot=120, seed=3), obs, 300, "val")
    return df, draws


def _write_npz(path, n_cells, rng, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{s}_{k}": rng.random(n_cells) + 0.5 for s in ("val", "test") for k in ("sse", "loss")}
    arrays.update(val_n=np.full(n_cells, 10.0), test_n=np.full(n_cells, 10.0), **extra)
    np.savez(path, **arrays)
    return arrays


# ---- the draws ---------------------------------------------------------------------------------

def test_every_point_is_scored_on_the_same_draw_of_cells():
    rng = np.random.default_rng(0)
    base = rng.random(50) * 3
    counts = rng.integers(1, 9, 50).astype(float)
    sums = np.vstack([base, base, 2.5 * base, rng.random(50)])
    draws = cell_draws(sums, np.tile(counts, (4, 1)), n_boot=300, seed=1)
    assert draws.shape == (300, 4)
    assert np.array_equal(draws[:, 0], draws[:, 1])  # identical points: identical in every resample
    np.testing.assert_allclose(draws[:, 2], 2.5 * draws[:, 0], rtol=1e-12)  # a multiple stays that multiple
    assert np.std(draws[:, 0]) > 0 and not np.allclose(draws[:, 3] / draws[:, 0], draws[0, 3] / draws[0, 0])
    # one resample by hand: the same multinomial counts score every point
    W = np.random.default_rng([CELL_STREAM, 1]).multinomial(50, np.full(50, 1 / 50), size=1)[0]
    np.testing.assert_allclose(draws[0], (sums @ W) / (counts @ W), rtol=1e-12)


def test_draws_centre_on_the_observed_loss_with_the_spread_of_a_mean():
    rng = np.random.default_rng(1)
    n_cells, n_boot = 200, 4000
    per_cell = rng.gamma(2, 0.5, n_cells)
    counts = np.full((1, n_cells), 8.0)  # equal counts: each draw is a plain mean of resampled cells
    draws = cell_draws(per_cell[None, :] * 8.0, counts, n_boot=n_boot, seed=2)[:, 0]
    obs = observed(per_cell[None, :] * 8.0, counts)[0]
    assert obs == pytest.approx(per_cell.mean(), rel=1e-12)
    sd = per_cell.std() / math.sqrt(n_cells)  # the bootstrap's sd of a mean (population sd of the cells)
    assert abs(draws.mean() - obs) < 4 * sd / math.sqrt(n_boot)
    assert draws.std() == pytest.approx(sd, rel=0.05)  # sd of an sd estimate: 1/sqrt(2B) ~ 1%


def test_bits_divide_by_ln2_and_seeds_give_their_own_stream():
    rng = np.random.default_rng(3)
    sums, counts = rng.random((3, 40)) * 5, rng.integers(1, 9, (3, 40)).astype(float)
    mse = cell_draws(sums, counts, unit="mse", n_boot=50, seed=4)
    bits = cell_draws(sums, counts, unit="bits", n_boot=50, seed=4)
    np.testing.assert_allclose(bits, mse / np.log(2), rtol=1e-12)
    np.testing.assert_allclose(observed(sums, counts, "bits"), sums.sum(1) / counts.sum(1) / np.log(2), rtol=1e-12)
    assert np.array_equal(mse, cell_draws(sums, counts, n_boot=50, seed=4))
    assert not np.allclose(mse, cell_draws(sums, counts, n_boot=50, seed=5))
    # more resamples extend the same sequence (drawn in chunks of one stream)
    np.testing.assert_allclose(cell_draws(sums, counts, n_boot=600, seed=4)[:50], mse, rtol=1e-12)
    assert cell_draws(sums, counts, n_boot=0, seed=4).shape == (0, 3)


def test_shape_and_unit_errors():
    with pytest.raises(FitError, match="differ in shape"):
        cell_draws(np.ones((2, 5)), np.ones((2, 4)), n_boot=3, seed=0)
    with pytest.raises(FitError, match="unit"):
        cell_draws(np.ones((2, 5)), np.ones((2, 5)), unit="nats", n_boot=3, seed=0)
    with pytest.raises(FitError, match="no evaluation cells"):
        observed(np.ones((2, 0)), np.ones((2, 0)))
    with pytest.raises(FitError, match=r"\(resamples, 3 rows"):
        cell_shift(np.ones((4, 2)), np.ones(3, bool), np.ones(3))
    with pytest.raises(FitError, match="observed"):
        cell_shift(CellDraws(np.ones((4, 3)), observed=np.ones(2)), np.ones(3, bool), np.ones(3))


def test_read_point_sums_and_its_errors(tmp_path):
    rng = np.random.default_rng(5)
    a = _write_npz(tmp_path / "a.npz", 30, rng)
    b = _write_npz(tmp_path / "b.npz", 30, rng)
    sums, counts = read_point_sums([tmp_path / "a.npz", tmp_path / "b.npz"], "test")
    assert sums.shape == counts.shape == (2, 30) and sums.dtype == np.float64
    assert np.array_equal(sums, np.vstack([a["test_loss"], b["test_loss"]]))
    sse, _ = read_point_sums([tmp_path / "a.npz"], "val", "sse")
    assert np.array_equal(sse[0], a["val_sse"])
    _write_npz(tmp_path / "short.npz", 29, rng)
    with pytest.raises(FitError, match=r"different numbers of val cells \(29, 30\).*share the evaluation cells"):
        read_point_sums([tmp_path / "a.npz", tmp_path / "short.npz"], "val")
    with pytest.raises(FitError, match="per-cell sums not found"):
        read_point_sums([tmp_path / "a.npz", tmp_path / "nothere.npz"], "val")
    np.savez(tmp_path / "nosplit.npz", val_loss=np.ones(30), val_n=np.ones(30))
    with pytest.raises(FitError, match="no test_loss, test_n"):
        read_point_sums([tmp_path / "nosplit.npz"], "test")
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(FitError, match="not a readable .npz"):
        read_point_sums([tmp_path / "junk.npz"], "val")
    with pytest.raises(FitError, match="split"):
        read_point_sums([tmp_path / "a.npz"], "train")


# ---- in the fit --------------------------------------------------------------------------------

def test_profile_interval_widens_around_the_fit_only_interval(ladder):
    df, draws = ladder
    plain = fit_table(df, law="power-floor", bootstrap=0)
    fit = fit_table(df, law="power-floor", bootstrap=0, cell_draws=draws)
    assert fit.params == plain.params
    rec = fit.extra["eval_cells"]
    assert rec["n_cells"] == 300 and rec["split"] == "val" and rec["resamples"] == 120
    assert rec["how"] == "quadrature with the profile interval"
    assert rec["ci95_without_cells"] == plain.ci95
    for name in ("a", "alpha", "c"):
        (lo0, hi0), (lo, hi) = plain.ci95[name], fit.ci95[name]
        assert lo <= lo0 and hi >= hi0, name
    (lo0, hi0), (lo, hi) = plain.ci95["c"], fit.ci95["c"]
    assert hi - lo > 2 * (hi0 - lo0)  # the cells dominate the floor here
    # the cells' floor sd: C sd(d) / sqrt(300) = 1.4 * 0.5 / 17.3 ~ 0.04 (d: mean 1, sd 0.5)
    assert 0.025 < rec["floor_sd"] < 0.06
    assert plain.extra["eval_cells"] is None
    json.dumps(fit.to_dict(), allow_nan=False)


def test_quadrature_is_the_formula_in_the_fitting_parameterisation(ladder, monkeypatch):
    """u_lo' = u_c - sqrt((u_c - u_lo)^2 + h_lo^2), h_lo = u_hat - q2.5 of the cell refits."""
    from cellscale.fit import intervals

    df, draws = ladder
    seen = {}
    real = intervals.quadrature_widen

    def spy(law, y, lo, hi, u_centre, u_hat, cell_u, level=0.95):
        seen.update(lo=lo, hi=hi, u_centre=u_centre, u_hat=u_hat, cell_u=cell_u)
        return real(law, y, lo, hi, u_centre, u_hat, cell_u, level)

    monkeypatch.setattr(intervals, "quadrature_widen", spy)
    fit = fit_table(df, law="power-floor", bootstrap=0, interval="wald-t", cell_draws=draws)
    assert fit.extra["eval_cells"]["how"] == "quadrature with the wald-t interval"
    q_lo, q_hi = np.percentile(seen["cell_u"], [2.5, 97.5], axis=0)
    j = 2  # log c
    u_c, u_hat = seen["u_centre"][j], seen["u_hat"][j]
    expect_lo = u_c - math.hypot(u_c - math.log(seen["lo"][j]), max(u_hat - q_lo[j], 0))
    expect_hi = u_c + math.hypot(math.log(seen["hi"][j]) - u_c, max(q_hi[j] - u_hat, 0))
    assert math.log(fit.ci_lo[j]) == pytest.approx(expect_lo, rel=1e-12)
    assert math.log(fit.ci_hi[j]) == pytest.approx(expect_hi, rel=1e-12)


def test_nan_stays_nan_and_failed_refits_leave_the_spread_unknown():
    from cellscale.fit import LAWS
    from cellscale.fit.intervals import quadrature_widen

    law = LAWS["power-floor"]
    y = np.array([2.0, 1.8, 1.6, 1.5])
    u = np.array([1.0, 0.3, np.log(1.4)])
    lo, hi = np.array([np.nan, 0.2, 1.3]), np.array([np.nan, 0.4, 1.5])  # natural: a, alpha, c
    cells = u + np.random.default_rng(0).normal(0, 0.01, (50, 3))
    new_lo, new_hi = quadrature_widen(law, y, lo, hi, u, u, cells)
    assert np.isnan(new_lo[0]) and np.isnan(new_hi[0])
    assert new_lo[1] <= 0.2 and new_hi[1] >= 0.4 and new_lo[2] <= 1.3 and new_hi[2] >= 1.5
    none_lo, none_hi = quadrature_widen(law, y, lo, hi, u, u, np.full((50, 3), np.nan))
    assert np.isnan(none_lo).all() and np.isnan(none_hi).all()


def test_residual_interval_resamples_jointly(ladder):
    df, draws = ladder
    plain = fit_table(df, law="power-floor", bootstrap=100, interval="residual", seed=2)
    fit = fit_table(df, law="power-floor", bootstrap=100, interval="residual", seed=2, cell_draws=draws)
    rec = fit.extra["eval_cells"]
    assert rec["how"] == "joint with the residual bootstrap" and rec["resamples"] == 100
    assert rec["ci95_without_cells"] == plain.ci95  # the same residual draws, without the cells
    (lo0, hi0), (lo, hi) = plain.ci95["c"], fit.ci95["c"]
    assert hi - lo > 2 * (hi0 - lo0)
    assert np.nanstd(fit.samples[:, 2]) > 2 * np.nanstd(plain.samples[:, 2])
    assert 0.025 < rec["floor_sd"] < 0.06
    # the first bootstrap rows of the draws are the ones used: extra rows change nothing
    head = CellDraws(draws.values[:100], draws.observed, 300, "val")
    assert fit_table(df, law="power-floor", bootstrap=100, interval="residual", seed=2, cell_draws=head).ci95 == fit.ci95
    with pytest.raises(FitError, match="fewer than bootstrap = 150"):
        fit_table(df, law="power-floor", bootstrap=150, interval="residual", cell_draws=draws)


def test_group_bootstrap_adds_the_cells_to_the_observed_losses(ladder):
    df, draws = ladder
    plain = fit_table(df, law="power-floor", bootstrap=40, interval="bca-groups", seed=1)
    fit = fit_table(df, law="power-floor", bootstrap=40, interval="bca-groups", seed=1, cell_draws=draws)
    rec = fit.extra["eval_cells"]
    assert rec["how"] == "joint with the group bootstrap" and rec["resamples"] == 40
    assert rec["ci95_without_cells"] == plain.ci95
    assert not np.allclose(fit.samples, plain.samples, equal_nan=True)


def test_profile_samples_hold_the_cells_too(ladder):
    df, draws = ladder
    plain = fit_table(df, law="power-floor", bootstrap=60, seed=1)
    fit = fit_table(df, law="power-floor", bootstrap=60, seed=1, cell_draws=draws)
    assert np.nanstd(fit.samples[:, 2]) > 2 * np.nanstd(plain.samples[:, 2])


def test_judgement_sees_the_widened_floor_interval(ladder, monkeypatch):
    df, draws = ladder
    seen = []
    real = core.reaches_zero
    monkeypatch.setattr(core, "reaches_zero", lambda ci: seen.append(tuple(ci)) or real(ci))
    fit = fit_table(df, law="power-floor", bootstrap=0, cell_draws=draws)
    assert seen and seen[0] == pytest.approx(tuple(fit.ci95["c"]), rel=1e-12)  # lowest = 0 here


def test_draws_align_with_the_rows_as_passed_and_shift_with_lowest():
    rng = np.random.default_rng(11)
    sums, counts = _sums(rng, 200)
    obs = observed(sums, counts)
    values = cell_draws(sums, counts, n_boot=40, seed=0)
    # a failed run in the middle of the table: its column of draws is ignored whatever it holds
    df = pd.DataFrame({"params": np.insert(SIZES, 3, 3e6), "best_val_mse": np.insert(obs, 3, np.nan),
                       "status": ["ok"] * 3 + ["failed"] + ["ok"] * 3})
    full = np.insert(values, 3, np.nan, axis=1)
    with_failed = fit_table(df, law="power-floor", bootstrap=0, cell_draws=full)
    clean = fit_table(df[df.status == "ok"], law="power-floor", bootstrap=0, cell_draws=values)
    assert with_failed.ci95 == clean.ci95
    with pytest.raises(FitError, match=r"\(resamples, 7 rows"):
        fit_table(df, law="power-floor", bootstrap=0, cell_draws=values)
    with pytest.raises(FitError, match="NaN or inf"):
        fit_table(df[df.status == "ok"], law="power-floor", bootstrap=0, cell_draws=values * np.nan)
    # a bare array is centred on the table's y; the same draws as CellDraws centred on their observed
    both = fit_table(df[df.status == "ok"], law="power-floor", bootstrap=0, cell_draws=CellDraws(values, obs))
    assert both.ci95 == clean.ci95 and both.extra["eval_cells"]["n_cells"] is None


def test_a_likelihood_ladder_in_bits_shifts_the_uncelled_interval_back(monkeypatch):
    rng = np.random.default_rng(12)
    sums, counts = _sums(rng, 200)
    bits = observed(sums, counts, "bits")
    monkeypatch.setattr(core, "lowest_loss", lambda objective, unit: -0.5)
    df = pd.DataFrame({"params": SIZES, "best_val_loss": bits, "objective": "nb", "status": "ok"})
    plain = fit_table(df, law="power-floor", y="best_val_loss", bootstrap=0)
    draws = cell_draws(sums, counts, unit="bits", n_boot=80, seed=1)
    fit = fit_table(df, law="power-floor", y="best_val_loss", bootstrap=0, cell_draws=draws)
    assert fit.extra["lowest_loss"] == -0.5 and fit.extra["loss_unit"] == "bits"
    np.testing.assert_allclose(fit.extra["eval_cells"]["ci95_without_cells"]["c"], plain.ci95["c"], rtol=1e-12)
    assert fit.ci95["c"][0] < plain.ci95["c"][0] and fit.ci95["c"][1] > plain.ci95["c"][1]


# ---- fit_csv in a sweep directory ---------------------------------------------------------------

def _sweep(tmp_path, rng):
    sums, counts = _sums(rng, 150)
    test_sums, _ = _sums(rng, 150, n=counts[0])
    ids = [f"r{i}" for i in range(SIZES.size)]
    for i, rid in enumerate(ids):
        (tmp_path / "runs" / rid).mkdir(parents=True)
        np.savez(tmp_path / "runs" / rid / "cells.npz", val_sse=sums[i], val_loss=sums[i], val_n=counts[i],
                 test_sse=test_sums[i], test_loss=test_sums[i], test_n=counts[i])
    df = pd.DataFrame({"run_id": ids + ["r-failed"], "params": np.append(SIZES, 1e5),
                       "best_val_mse": np.append(observed(sums, counts), np.nan),
                       "test_mse": np.append(observed(test_sums, counts), np.nan),
                       "objective": "mse", "status": ["ok"] * SIZES.size + ["failed"]})
    df.to_csv(tmp_path / "results.csv", index=False)
    return df


def test_fit_csv_reads_the_runs_cells(tmp_path):
    df = _sweep(tmp_path, np.random.default_rng(13))
    kw = dict(law="power-floor", bootstrap=50, seed=4, y="test_mse")
    fit = fit_csv(tmp_path / "results.csv", **kw)
    rec = fit.extra["eval_cells"]
    assert rec["n_cells"] == 150 and rec["split"] == "test" and rec["resamples"] == 50
    paths = [tmp_path / "runs" / r / "cells.npz" if s == "ok" else None for r, s in zip(df.run_id, df.status)]
    df = pd.read_csv(tmp_path / "results.csv")  # as fit_csv reads it
    by_hand = fit_table(df, cell_draws=run_cell_draws(paths, y="test_mse", unit="mse", n_boot=50, seed=4), **kw)
    assert by_hand.ci95 == fit.ci95
    val = fit_csv(tmp_path / "results.csv", law="power-floor", bootstrap=50, y="best_val_mse")
    assert val.extra["eval_cells"]["split"] == "val"
    assert fit_csv(tmp_path / "results.csv", cells=False, **kw).extra["eval_cells"] is None
    assert fit_csv(tmp_path / "results.csv", **{**kw, "bootstrap": 0}).extra["eval_cells"] == {
        "note": "fitted without the evaluation cells' noise: bootstrap = 0: the evaluation cells were not resampled"}


def test_fit_csv_without_a_runs_file_fits_and_says_why(tmp_path):
    _sweep(tmp_path, np.random.default_rng(14))
    (tmp_path / "runs" / "r2" / "cells.npz").unlink()
    fit = fit_csv(tmp_path / "results.csv", law="power-floor", bootstrap=20, y="test_mse")
    note = fit.extra["eval_cells"]["note"]
    assert note.startswith("fitted without the evaluation cells' noise: per-cell sums not found")
    assert "r2" in note and "\n" not in note
    assert fit.ci95 == fit_csv(tmp_path / "results.csv", law="power-floor", bootstrap=20, y="test_mse",
                               cells=False).ci95
    val = fit_csv(tmp_path / "results.csv", law="power-floor", bootstrap=20, y="best_val_mse").extra["eval_cells"]
    assert "not found" in val["note"]


def test_a_table_outside_a_sweep_has_no_cells(tmp_path):
    df = _sweep(tmp_path, np.random.default_rng(15))
    other = tmp_path / "elsewhere"
    other.mkdir()
    df.to_csv(other / "results.csv", index=False)
    assert fit_csv(other / "results.csv", law="power-floor", bootstrap=10).extra["eval_cells"] is None
    df.drop(columns="run_id").to_csv(tmp_path / "results.csv", index=False)
    assert "run_id" in fit_csv(tmp_path / "results.csv", law="power-floor", bootstrap=10).extra["eval_cells"]["note"]


# ---- coverage --------------------------------------------------------------------------------

@pytest.mark.slow  # a coverage study (40 replicates, ~15 s): `pytest -m slow tests/test_fit_cells.py`
def test_widened_profile_interval_covers_the_population_floor():
    """A population of cells with per-cell difficulty; the true floor is the population's (count
    weighted) mean difficulty times C. Each replicate scores every size on the same 300 cells drawn
    from it: the fit-only interval misses the split's shift, the widened one holds it."""
    pop = np.random.default_rng(123)
    n_pop = 20000
    d, e, n = pop.gamma(4, 0.25, n_pop), pop.gamma(2, 0.5, n_pop), pop.integers(20, 60, n_pop).astype(float)
    true_c = C * np.sum(d * n) / np.sum(n)
    covered = np.zeros((40, 2), bool)
    for r in range(40):
        rng = np.random.default_rng(1000 + r)
        idx = rng.choice(n_pop, 300, replace=False)
        sums, counts = _sums(rng, 300, d=d[idx], e=e[idx], n=n[idx])
        sums *= np.exp(0.002 * rng.standard_normal((SIZES.size, 1)))  # each run's own noise
        obs = observed(sums, counts)
        df = pd.DataFrame({"params": SIZES, "best_val_mse": obs})
        draws = CellDraws(cell_draws(sums, counts, n_boot=80, seed=r), obs, 300, "val")
        fit = fit_table(df, law="power-floor", bootstrap=0, cell_draws=draws)
        lo0, hi0 = fit.extra["eval_cells"]["ci95_without_cells"]["c"]
        lo, hi = fit.ci95["c"]
        covered[r] = lo0 <= true_c <= hi0, lo <= true_c <= hi
    fit_only, widened = covered.mean(axis=0)
    assert widened >= 0.85
    assert fit_only <= 0.6
