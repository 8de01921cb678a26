"""ls-log, least squares on log L: the data axis's fitting method (cellscale.fit.defaults.DATA_METHOD)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from cellscale.config import FitConfig
from cellscale.fit import fit_data_axis, fit_table, simulate_branches
from cellscale.fit.methods import METHODS


def _noisy_power_table() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    p = np.geomspace(500, 3e6, 9)
    loss = 2.5 * p ** -0.21 * np.exp(0.03 * rng.standard_normal(p.size))
    return pd.DataFrame({"params": p, "test_mse": loss, "status": "ok", "size": [f"s{i}" for i in range(p.size)]})


def test_a_power_law_by_ls_log_is_ordinary_least_squares_in_log_space():
    table = _noisy_power_table()
    slope, intercept = np.polyfit(np.log(table["params"]), np.log(table["test_mse"]), 1)
    fit = fit_table(table, law="power", method="ls-log", bootstrap=0)
    assert fit.params["alpha"] == pytest.approx(-slope, rel=1e-7)
    assert fit.params["a"] == pytest.approx(np.exp(intercept), rel=1e-7)
    # Huber's delta of 1e-3 is far below this noise (3%): it lands elsewhere
    huber = fit_table(table, law="power", method="huber-log", bootstrap=0)
    assert abs(huber.params["alpha"] + slope) > 1e-4


def test_ls_log_minimises_the_sum_of_squared_log_residuals():
    table = _noisy_power_table()
    fits = {m: fit_table(table, law="power-floor", method=m, bootstrap=0) for m in ("ls-log", "huber-log")}

    def sse(fit):
        return float(np.sum(np.log(table["test_mse"] / fit.predict(table["params"].to_numpy())) ** 2))

    assert sse(fits["ls-log"]) < sse(fits["huber-log"])
    assert METHODS["ls-log"].space == "log"


def test_the_data_axis_is_fitted_by_ls_log_and_recovers_an_exact_law():
    truth = {"A": 1.9, "B": 40.0, "E": 0.35, "alpha": 0.15, "beta": 0.45}
    sizes = {"MINI": 317.0, "TINY": 2273.0, "SMALL": 26561.0, "XS": 102273.0}
    table = simulate_branches("chinchilla", truth, sizes=sizes, cells=60000 * 2.0 ** np.arange(4), noise=0.0,
                              run_noise=0.0)
    fit = fit_data_axis(table, bootstrap=0)
    assert fit.result.method == "ls-log"
    for name, value in truth.items():
        assert fit.result.params[name] == pytest.approx(value, rel=1e-4), name


def test_the_data_method_is_a_choice_of_the_config():
    assert FitConfig().data_method == "ls-log"
    assert FitConfig(data_method="huber-log").data_method == "huber-log"
    with pytest.raises(ValidationError):  # the seed study's grid fits a power law in P only
        FitConfig(data_method="paper")


def test_the_report_fits_the_data_axis_with_the_configured_method(tmp_path):
    import json

    import yaml
    from fixtures_report import add_branches, make_sweep

    from cellscale.report import write_report

    sweep = make_sweep(tmp_path, sizes=("XXS", "TINY", "XS", "S", "M"), seeds=(0,), diverged=None, failed=None)
    add_branches(sweep)
    cfg = yaml.safe_load((sweep / "config.yaml").read_text())
    cfg.setdefault("fit", {})["data_method"] = "huber-log"
    cfg["fit"]["bootstrap"] = 50  # the method is what is checked; Huber's resamples of the backtest's refit are slow
    (sweep / "config.yaml").write_text(yaml.safe_dump(cfg))
    write_report(sweep)
    rec = json.loads((sweep / "data_fit.json").read_text())
    assert rec["method"] == "huber-log"
    assert "('chinchilla', method huber-log)" in (sweep / "report.md").read_text()
