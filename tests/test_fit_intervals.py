"""The interval machinery: BCa against scipy, the jackknife, failed resamples, group resampling,
the interval methods by name, and finite-difference checks of the fitting gradients."""

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

from cellscale.errors import FitError
from cellscale.fit import LAWS, METHODS, fit_table, simulate_table
from cellscale.fit.bootstrap import (
    TOO_FEW_CONFIGS,
    bca_ci,
    jackknife_acceleration,
    jackknife_weights,
    resample_weights,
    run_bootstrap,
)
from cellscale.fit.intervals import DEFAULT_INTERVAL, INTERVALS
from cellscale.fit.methods import HUBER_DELTA, HuberLog

TRUE_PF = {"a": 5.0, "alpha": 0.3, "c": 1.4}


@pytest.fixture(scope="module")
def pf_table():
    return simulate_table("power-floor", TRUE_PF, {"params": np.logspace(3, 9, 8)}, noise=0.01, seeds=2, seed=4)


def test_bca_equals_scipy_on_a_skewed_mean():
    x = np.random.default_rng(1).exponential(size=25)
    ref = st.bootstrap((x,), np.mean, method="BCa", n_resamples=4000, rng=np.random.default_rng(0))
    jack = np.array([np.delete(x, i).mean() for i in range(x.size)])[:, None]
    lo, hi = bca_ci(ref.bootstrap_distribution[:, None], np.array([x.mean()]), jack)
    assert lo[0] == pytest.approx(ref.confidence_interval.low, rel=1e-12)
    assert hi[0] == pytest.approx(ref.confidence_interval.high, rel=1e-12)
    # and BCa is not the plain percentile interval here (the mean of an exponential is skewed)
    assert abs(lo[0] - np.percentile(ref.bootstrap_distribution, 2.5)) > 0.02


def test_jackknife_acceleration_is_efrons_formula():
    x = np.random.default_rng(2).lognormal(size=30)
    jack = np.array([np.delete(x, i).mean() for i in range(x.size)])
    d = jack.mean() - jack
    assert jackknife_acceleration(jack) == pytest.approx(np.sum(d**3) / (6 * np.sum(d**2) ** 1.5), rel=1e-12)
    assert jackknife_acceleration(jack) > 0.01  # right-skewed data: positive acceleration
    assert jackknife_acceleration(np.array([1.0, 1.0, 1.0])) == 0.0
    assert jackknife_acceleration(np.array([1.0, np.nan])) == 0.0
    # The acceleration moves the interval: the same samples with the jackknife flattened differ.
    samples = np.random.default_rng(3).normal(size=(2000, 1))
    with_a = bca_ci(samples, np.array([0.0]), jack[:, None] - jack.mean())
    without = bca_ci(samples, np.array([0.0]), np.zeros((30, 1)))
    assert with_a[1][0] > without[1][0] + 0.05


def test_bca_all_failed_gives_nan_and_ignores_failed_rows():
    lo, hi = bca_ci(np.full((50, 2), np.nan), np.array([1.0, 2.0]), np.zeros((5, 2)))
    assert np.isnan(lo).all() and np.isnan(hi).all()
    rng = np.random.default_rng(0)
    good = rng.normal(size=(400, 1))
    some_failed = np.vstack([good, np.full((100, 1), np.nan)])
    assert bca_ci(some_failed, np.array([0.0]), good[:10]) == bca_ci(good, np.array([0.0]), good[:10])


def test_jackknife_and_resamples_move_whole_groups():
    groups = np.array([0, 0, 1, 1, 1, 2, 3, 3])
    J = jackknife_weights(groups)
    assert J.shape == (4, 8)
    for g in range(4):
        assert np.array_equal(J[g] == 0, groups == g)
    W = resample_weights(groups, 200, seed=0)
    for g in range(4):
        rows = W[:, groups == g]
        assert (rows == rows[:, :1]).all()  # every row of a group carries its group's draw count
    assert np.array_equal(W[:, groups == 0][:, 0] + W[:, groups == 1][:, 0] + W[:, groups == 2][:, 0]
                          + W[:, groups == 3][:, 0], np.full(200, 4.0))


def test_a_group_resample_is_the_fit_of_its_duplicated_rows(pf_table):
    law, method = LAWS["power-floor"], METHODS["huber-log"]
    X, y = pf_table[["params"]].to_numpy(), pf_table["best_val_mse"].to_numpy()
    groups = np.repeat(np.arange(8), 2)
    full = method.fit(law, np.log(X), y, np.log(y), np.ones(y.size))
    W = resample_weights(groups, 3, seed=5)
    boot = run_bootstrap("huber-log", law, X, y, np.ones(y.size), W, full.candidates[:1])
    for counts, theta in zip(W, boot.samples):
        rows = np.repeat(np.arange(y.size), counts.astype(int))
        dup = method.fit(law, np.log(X[rows]), y[rows], np.log(y[rows]), np.ones(rows.size),
                         starts=full.candidates[:1])
        assert np.allclose(law.to_natural(dup.u), theta, rtol=1e-6)


def test_unidentifiable_group_resamples_are_counted():
    # 3 sizes for 3 parameters: a resample that misses one size cannot be fitted
    df = simulate_table("power-floor", TRUE_PF, {"params": [1e3, 1e5, 1e7]}, noise=0.01, seeds=2, seed=0)
    out = fit_table(df, law="power-floor", bootstrap=40, interval="bca-groups").to_dict()
    missing = int(np.sum(np.all(resample_weights(np.repeat(np.arange(3), 2), 40, seed=0)[:, ::2] > 0, axis=1)))
    assert out["bootstrap_failed"] == 40 - missing > 0
    assert out["bootstrap_failures"] == {TOO_FEW_CONFIGS: 40 - missing}
    assert out["bootstrap_unreliable"] is True


@pytest.mark.parametrize("interval", ["residual", "bca-groups"])
def test_a_resample_that_raises_is_counted_not_swallowed(pf_table, monkeypatch, interval):
    real = HuberLog.fit

    def flaky(self, law, logX, y, logy, w, starts=None):
        if starts is not None:  # resamples are warm-started; the full-data fit is not
            raise RuntimeError("boom")
        return real(self, law, logX, y, logy, w, starts)

    monkeypatch.setattr(HuberLog, "fit", flaky)
    out = fit_table(pf_table, law="power-floor", bootstrap=30, interval=interval).to_dict()
    assert out["bootstrap_failed"] == 30
    assert out["bootstrap_failures"] == {"RuntimeError: boom": 30}
    assert out["bootstrap_failed_fraction"] == 1.0 and out["bootstrap_unreliable"] is True
    assert out["ci95"]["alpha"] == [None, None]  # a bootstrap interval needs resamples


def test_few_failures_are_not_flagged(pf_table):
    out = fit_table(pf_table, law="power-floor", bootstrap=60).to_dict()
    assert out["bootstrap_failed"] == 0 and out["bootstrap_failures"] == {}
    assert out["bootstrap_unreliable"] is False
    assert out["interval"] == DEFAULT_INTERVAL and out["ci_method"]
    fit = fit_table(pf_table, law="power-floor", bootstrap=20)
    assert fit.interval == DEFAULT_INTERVAL and fit.bootstrap_failed == 0


def test_interval_methods_by_name(pf_table):
    fits = {name: fit_table(pf_table, law="power-floor", bootstrap=100, interval=name) for name in INTERVALS}
    for name, fit in fits.items():
        d = fit.to_dict()
        assert d["interval"] == name
        for p, value in fit.params.items():
            lo, hi = fit.ci95[p]
            assert lo < value < hi, (name, p)
            assert lo <= TRUE_PF[p] <= hi, (name, p)
        assert d["bootstrap_kind"] == ("run groups" if name == "bca-groups" else "residuals")
        assert fit.samples.shape == (100, 3)
    # the two Gaussian intervals agree closely on a well-determined fit
    for p in TRUE_PF:
        assert fits["profile"].ci95[p] == pytest.approx(fits["wald-t"].ci95[p], rel=0.1)
    with pytest.raises(FitError, match="unknown interval method 'nope'"):
        fit_table(pf_table, law="power-floor", bootstrap=0, interval="nope")


def test_profile_interval_is_exact_for_a_line():
    # power is linear in (log a, alpha) in log space: the profile-t interval is the textbook one
    rng = np.random.default_rng(0)
    P = np.logspace(2, 8, 9)
    y = 3.0 * P ** -0.2 * np.exp(0.02 * rng.standard_normal(9))
    fit = fit_table(pd.DataFrame({"params": P, "best_val_mse": y}), law="power", bootstrap=0, interval="profile")
    ols = st.linregress(np.log(P), np.log(y))
    tq = st.t.ppf(0.975, 7)
    assert fit.ci95["alpha"] == pytest.approx([-ols.slope - tq * ols.stderr, -ols.slope + tq * ols.stderr],
                                              rel=1e-5)
    a_lo, a_hi = np.exp(ols.intercept - tq * ols.intercept_stderr), np.exp(ols.intercept + tq * ols.intercept_stderr)
    assert fit.ci95["a"] == pytest.approx([a_lo, a_hi], rel=1e-5)


def _fd_grad(f, u, h=1e-6):
    g = np.empty(u.size)
    for j in range(u.size):
        e = np.zeros(u.size)
        e[j] = h * max(1.0, abs(u[j]))
        g[j] = (f(u + e) - f(u - e)) / (2 * e[j])
    return g


@pytest.mark.parametrize("law_name", ["power-floor", "chinchilla"])
def test_huber_gradient_matches_finite_differences(law_name):
    law, huber = LAWS[law_name], METHODS["huber-log"]
    rng = np.random.default_rng(1)
    if law_name == "power-floor":
        theta = np.array([5.0, 0.3, 1.4])
        X = np.logspace(3, 9, 12)[:, None]
    else:
        theta = np.array([482.0, 2085.0, 1.817, 0.348, 0.366])
        n, d = np.meshgrid(np.logspace(6, 9, 4), np.logspace(7, 10, 3))
        X = np.column_stack([n.ravel(), d.ravel()])
    logX = np.log(X)
    # residuals on both sides of delta: half the rows inside the quadratic part, half outside
    scale = np.where(np.arange(X.shape[0]) % 2 == 0, 0.3 * HUBER_DELTA, 20 * HUBER_DELTA)
    logy = law.log_predict(law.from_natural(theta), logX) + scale * rng.standard_normal(X.shape[0])
    w = rng.uniform(0.5, 2.0, X.shape[0])
    u = law.from_natural(theta) + 1e-4 * rng.standard_normal(theta.size)
    f, g = huber._value_grad(law, logX, logy, w, u)
    assert f == pytest.approx(huber.objective(law, logX, np.exp(logy), logy, w, u), rel=1e-12)
    fd = _fd_grad(lambda v: huber._value_grad(law, logX, logy, w, v)[0], u, h=1e-8)
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-6 * np.abs(g).max())


@pytest.mark.parametrize("law_name", ["power-floor", "chinchilla", "power"])
def test_nls_jacobian_and_law_jacobians_match_finite_differences(law_name):
    law, nls = LAWS[law_name], METHODS["nls"]
    rng = np.random.default_rng(2)
    if law.n_vars == 1:
        X = np.logspace(3, 9, 10)[:, None]
        theta = np.array([5.0, 0.3, 1.4])[: law.n_params]
    else:
        n, d = np.meshgrid(np.logspace(6, 9, 4), np.logspace(7, 10, 3))
        X = np.column_stack([n.ravel(), d.ravel()])
        theta = np.array([482.0, 2085.0, 1.817, 0.348, 0.366])
    logX = np.log(X)
    u = law.from_natural(theta)
    y = law.predict(theta, X) * np.exp(0.01 * rng.standard_normal(X.shape[0]))
    w = rng.uniform(0.5, 2.0, X.shape[0])
    J = nls.jacobian(law, logX, y, w, u)
    for i in range(X.shape[0]):
        fd = _fd_grad(lambda v, i=i: nls.residuals(law, logX, y, w, v)[i], u)
        np.testing.assert_allclose(J[i], fd, rtol=1e-5, atol=1e-9)
    _, dlog = law.log_predict_jac(u, logX)
    for i in range(X.shape[0]):
        fd = _fd_grad(lambda v, i=i: law.log_predict(v, logX)[i], u)
        np.testing.assert_allclose(dlog[i], fd, rtol=1e-5, atol=1e-9)
    # the objective NLS minimises is the sum of these squared residuals
    r = nls.residuals(law, logX, y, w, u)
    assert float(r @ r) == pytest.approx(nls.objective(law, logX, y, np.log(y), w, u), rel=1e-12)


def test_printed_fit_names_the_interval_method_and_flags_failures():
    from cellscale.fit.text import format_fit

    base = {"law": "power-floor", "method": "huber-log", "n_points": 18, "r2": 0.9, "params": {"c": 1.4},
            "ci95": {"c": [1.3, 1.5]}, "interval": "residual-t", "ci_method": "studentized", "bootstrap": 100}
    lines = format_fit({**base, "bootstrap_failed": 0})
    assert "intervals: residual-t (studentized)" in lines and not any("warning" in ln for ln in lines)
    flagged = format_fit({**base, "bootstrap_failed": 7, "bootstrap_unreliable": True})
    assert "intervals: residual-t (studentized); 7 of 100 resamples failed to fit" in flagged
    assert any(ln.startswith("warning: more than 5% of the bootstrap resamples failed (7 of 100)") for ln in flagged)
