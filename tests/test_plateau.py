"""The plateau criterion on validation curves, and the plateau budget that trains until it."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cellscale.config import TrainConfig
from cellscale.data.store import Dataset
from cellscale.ladder import get_size
from cellscale.plateau import is_converged, last_doubling_gain
from cellscale.train import lr_at, train_run

CELLS = np.arange(1, 21) * 1000.0  # 20 evaluations, the last at 20k cells


def test_flat_curve_has_no_gain_and_is_converged():
    gain = last_doubling_gain(CELLS, np.full(20, 0.5))
    assert gain == 0.0 and is_converged(gain)


def test_still_falling_power_law_is_not_converged():
    # L = 0.3 + c^-0.5: from 10k to 20k cells the best loss falls from 0.31 to 0.30707
    losses = 0.3 + CELLS**-0.5
    gain = last_doubling_gain(CELLS, losses)
    assert gain == pytest.approx((0.3 + 10000**-0.5 - (0.3 + 20000**-0.5)) / (0.3 + 20000**-0.5))
    assert gain == pytest.approx(0.009534, rel=1e-3)
    assert is_converged(gain, tol=0.01) and not is_converged(gain, tol=0.005)
    steep = 0.1 + CELLS**-0.5 * 10
    assert last_doubling_gain(CELLS, steep) == pytest.approx((0.2 - (0.1 + 10 / 20000**0.5)) / (0.1 + 10 / 20000**0.5))
    assert not is_converged(last_doubling_gain(CELLS, steep))


def test_noise_on_a_flat_curve_errs_towards_not_converged():
    # best-so-far losses: noise can only add a gain (of about its own size), never hide one
    rng = np.random.default_rng(0)
    noisy = 0.5 * (1 + 0.02 * rng.standard_normal(20))
    gain = last_doubling_gain(CELLS, noisy)
    early, best = noisy[CELLS <= 10000].min(), noisy.min()
    assert gain == pytest.approx((early - best) / best) == pytest.approx(0.022226, rel=1e-4)
    assert not is_converged(gain, tol=0.02) and is_converged(gain, tol=0.03)
    falling = noisy * (1 + 0.2 * (CELLS <= 10000))  # a real 20% step down stays visible
    assert last_doubling_gain(CELLS, falling) > 0.2
    lucky = np.full(20, 0.5)
    lucky[3] = 0.45  # the best eval came early: nothing gained since
    assert last_doubling_gain(CELLS, lucky) == 0.0


def test_curves_too_short_or_broken_have_no_figure():
    assert last_doubling_gain([1000], [0.5]) is None
    assert last_doubling_gain([600, 1000], [0.6, 0.5]) is None  # no eval at or before half
    assert last_doubling_gain([500, 1000], [float("nan"), 0.5]) is None
    assert last_doubling_gain([500, 1000], [0.6, 0.5]) == pytest.approx(0.2)
    assert not is_converged(None)


def test_wsd_schedule_warms_up_holds_and_decays_to_its_end():
    cfg = TrainConfig(budget="plateau", warmup_frac=0.1, final_lr_frac=0.1)
    kw = {"total_steps": 100, "peak": 1.0, "cfg": cfg}
    assert [lr_at(s, **kw) for s in (0, 9)] == [pytest.approx(0.1), pytest.approx(1.0)]
    assert lr_at(60, **kw) == 1.0  # no plateau yet: the peak, whatever the maximum
    assert lr_at(50, decay_start=50, end=60, **kw) == pytest.approx(1.0 - 0.9 * 1 / 10)
    assert lr_at(59, decay_start=50, end=60, **kw) == pytest.approx(0.1)


PLATEAU = TrainConfig(cells_seen=32 * 400, batch_size=32, eval_every=10, eval_batch_size=64,
                      warmup_frac=0.05, num_threads=1, budget="plateau", plateau_tol=0.1,
                      plateau_patience=2, cooldown_frac=0.2)


def _evals(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["kind"] == "eval"]


def test_plateau_budget_stops_after_patience_plus_cooldown(tiny_dataset_dir: Path, tmp_path: Path):
    ds = Dataset.open(tiny_dataset_dir)
    res = train_run(ds, get_size("XXS", n_genes=ds.n_genes), PLATEAU, out=tmp_path / "p")
    assert res["status"] == "ok" and res["budget"] == "plateau" and res["schedule"] == "wsd"
    # 15 validation cells scatter by ~5%: a loose tolerance, so that this tiny run plateaus
    assert res["converged"] is True and res["plateau_gain"] <= 0.1
    start = res["decay_start"]
    assert start is not None and start % 10 == 0 and start < 400
    assert res["steps"] == start + math.ceil(0.2 * start) and res["steps"] < 400
    evals = _evals(tmp_path / "p")
    gains = [last_doubling_gain([e["cells_seen"] for e in evals[: i + 1]], [e["val_mse"] for e in evals[: i + 1]])
             for i in range(len(evals))]
    i = [e["step"] for e in evals].index(start)
    assert is_converged(gains[i], 0.1) and is_converged(gains[i - 1], 0.1)  # two in a row ...
    assert not is_converged(gains[i - 2], 0.1)  # ... and not three: it stopped at once
    assert res["plateau_gain"] == pytest.approx(gains[i])


def test_no_plateau_is_called_before_plateau_min_cells(tiny_dataset_dir: Path, tmp_path: Path):
    ds = Dataset.open(tiny_dataset_dir)
    model = get_size("XXS", n_genes=ds.n_genes)
    free = train_run(ds, model, PLATEAU, out=tmp_path / "free")
    least = free["decay_start"] * 32 + 32 * 50  # the same run may not stop where it did, nor just after
    held = train_run(ds, model, PLATEAU.model_copy(update={"plateau_min_cells": least}), out=tmp_path / "held")
    evals = _evals(tmp_path / "held")
    gains = [last_doubling_gain([e["cells_seen"] for e in evals[: i + 1]], [e["val_mse"] for e in evals[: i + 1]])
             for i in range(len(evals))]
    i = [e["step"] for e in evals].index(held["decay_start"])
    assert held["decay_start"] * 32 >= least > free["decay_start"] * 32
    assert held["converged"] is True and is_converged(gains[i], 0.1) and is_converged(gains[i - 1], 0.1)
    assert evals[i - 1]["cells_seen"] >= least  # both evaluations that counted are at or past the minimum


def test_plateau_budget_without_a_plateau_ends_at_its_maximum_unconverged(tiny_dataset_dir: Path, tmp_path: Path):
    ds = Dataset.open(tiny_dataset_dir)
    cfg = PLATEAU.model_copy(update={"plateau_tol": 1e-6, "cells_seen": 32 * 60})
    res = train_run(ds, get_size("XXS", n_genes=ds.n_genes), cfg, out=tmp_path / "q")
    assert res["converged"] is False
    assert res["decay_start"] == math.floor(60 / 1.2) == 50 and res["steps"] == 60


def test_fixed_budget_records_the_verdict_on_its_curve(tiny_dataset_dir: Path, tmp_path: Path):
    ds = Dataset.open(tiny_dataset_dir)
    cfg = TrainConfig(cells_seen=32 * 40, batch_size=32, eval_every=5, eval_batch_size=64, num_threads=1)
    res = train_run(ds, get_size("XXS", n_genes=ds.n_genes), cfg, out=tmp_path / "f")
    evals = _evals(tmp_path / "f")
    gain = last_doubling_gain([e["cells_seen"] for e in evals], [e["val_mse"] for e in evals])
    assert res["budget"] == "fixed" and res["plateau_gain"] == pytest.approx(gain)
    assert res["converged"] is is_converged(gain)
    assert res["attention_impl"] == "fused-cpu-kernel" or res["attention_impl"].startswith("sdpa")
    assert res["dropout"] == 0.0 and res["attention_dropout"] == 0.0


def test_plateau_run_killed_midway_resumes_to_the_same_numbers(tiny_dataset_dir: Path, tmp_path: Path):
    ds = Dataset.open(tiny_dataset_dir)
    model = get_size("XXS", n_genes=ds.n_genes)
    whole = train_run(ds, model, PLATEAU, out=tmp_path / "whole")
    part = train_run(ds, model, PLATEAU, out=tmp_path / "split", stop_after_steps=whole["decay_start"] + 3)
    assert part["status"] == "incomplete"
    again = train_run(ds, model, PLATEAU, out=tmp_path / "split")
    assert again["resumed_at"] == [whole["decay_start"]]  # the checkpoint at the cooldown's first eval
    for key in ("steps", "decay_start", "best_val_mse", "test_mse", "plateau_gain", "converged"):
        assert again[key] == whole[key], key
