"""The local process pool (``sweep.workers``): the same table as one run after another, a
thread count per worker, a dead worker recorded, and a parent's SIGTERM that checkpoints every
running run and resumes."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from test_preempt import _assert_interrupted, _lines_at_least, _signal_when

from cellscale.config import ConfigError, StudyConfig, load_study_config, parse_config
from cellscale.runtime import cpus
from cellscale.schema import RESULT_FIELDS
from cellscale.sweep import run_sweep
from cellscale.sweep.plan import plan_runs
from cellscale.sweep.pool import longest_first, worker_count
from cellscale.sweep.runner import threads_per_run

NUMERIC = ["best_val_mse", "test_mse"]


def _cfg(dataset: Path, **sweep) -> dict:
    return {"name": "pool", "dataset": str(dataset),
            "train": {"cells_seen": 128, "batch_size": 32, "eval_every": 2, "device": "cpu"},
            "sweep": {"sizes": ["XXS", "TINY"], "seeds": [0, 1], "train_cells": [None, 100000], **sweep}}


def test_worker_count_and_threads(monkeypatch):
    monkeypatch.setattr("cellscale.sweep.pool.usable_cpus", lambda: 8)
    assert worker_count("auto", 1.0) == 8
    assert worker_count("auto", 3.0) == 2  # 3 threads each: two runs fit in 8 CPUs
    assert worker_count("auto", 16.0) == 1
    assert worker_count(3, 1.0) == 3
    assert (threads_per_run(0.5), threads_per_run(2.0)) == (1, 2)
    assert cpus.usable_cpus() >= 1


def test_the_longest_run_is_submitted_first(tiny_dataset_dir: Path):
    cfg = parse_config(StudyConfig, {**_cfg(tiny_dataset_dir), "sweep": {
        "sizes": ["XXS", "XS", "TINY"], "seeds": [0], "overrides": {"TINY": {"cells_seen": 10**7}}}})
    specs = plan_runs(cfg, n_genes=64)
    # TINY's budget x FLOPs per cell outweighs XS's; XXS is cheapest
    assert [s.size for s in longest_first(specs)] == ["TINY", "XS", "XXS"]


def test_workers_config_is_checked_and_not_part_of_the_sweep_identity(tiny_dataset_dir: Path):
    from cellscale.sweep.study import sweep_hash

    with pytest.raises(ConfigError, match="workers"):
        parse_config(StudyConfig, _cfg(tiny_dataset_dir, workers=0))
    with pytest.raises(ConfigError, match="workers"):
        parse_config(StudyConfig, _cfg(tiny_dataset_dir, workers="many"))
    one, auto = (parse_config(StudyConfig, _cfg(tiny_dataset_dir, workers=w)) for w in (1, "auto"))
    assert sweep_hash(one) == sweep_hash(auto)  # a sweep resumes with another worker count


def test_pool_matches_one_after_another(tiny_dataset_dir: Path, tmp_path: Path):
    cfg = parse_config(StudyConfig, _cfg(tiny_dataset_dir, workers=2))
    pool_csv = run_sweep(cfg, out=tmp_path / "pool", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one after another in this process, on one thread like each worker
    try:
        local_csv = run_sweep(cfg, out=tmp_path / "local", progress=False, workers=1)
    finally:
        torch.set_num_threads(threads)
    p, loc = pd.read_csv(pool_csv), pd.read_csv(local_csv)
    assert list(p["run_id"]) == list(loc["run_id"])  # plan order, whatever order the runs ended in
    assert list(p["status"]) == ["ok", "ok", "failed", "failed"] * 2
    exact = [c for c in RESULT_FIELDS if c not in NUMERIC + ["wall_seconds"]]
    pd.testing.assert_frame_equal(p[exact], loc[exact])
    ok = p["status"] == "ok"
    for col in NUMERIC:
        assert p.loc[ok, col].to_numpy() == pytest.approx(loc.loc[ok, col].to_numpy(), rel=1e-6, abs=0)
    res = json.loads((tmp_path / "pool" / "runs" / "TINY-dall-s0" / "result.json").read_text())
    assert res["num_threads"] == 1


@pytest.mark.slow
def test_a_dead_worker_is_recorded_and_the_rerun_resumes(tiny_dataset_dir: Path, tmp_path: Path, monkeypatch):
    cfg = parse_config(StudyConfig, {**_cfg(tiny_dataset_dir, workers=2),
                                   "sweep": {"sizes": ["XXS"], "seeds": [0, 1], "workers": 2}})
    monkeypatch.setenv("CELLSCALE_CRASHPOINT", "before-result")  # the workers inherit it and die
    table = pd.read_csv(run_sweep(cfg, out=tmp_path / "sw", progress=False))
    assert list(table["status"]) == ["failed", "failed"]
    assert table["error"].str.startswith("worker process failed: BrokenProcessPool").all()
    assert "resumes" in table["error"].iloc[0]
    monkeypatch.delenv("CELLSCALE_CRASHPOINT")
    table = pd.read_csv(run_sweep(cfg, out=tmp_path / "sw", progress=False))
    assert list(table["status"]) == ["ok", "ok"]
    resumed = [json.loads((tmp_path / "sw" / "runs" / rid / "result.json").read_text())
               for rid in table["run_id"]]
    # the first worker to die breaks the pool, which ends the other one wherever it was: at
    # least one run resumes from its final checkpoint, every one from some checkpoint
    assert any(r["resumed_at"] == [r["steps"]] for r in resumed)
    assert all(len(r["resumed_at"]) == 1 and 0 < r["resumed_at"][0] <= r["steps"] for r in resumed)


@pytest.mark.slow
def test_sigterm_to_the_parent_checkpoints_every_running_run(tiny_dataset_dir: Path, tmp_path: Path):
    """Only the parent gets the signal (``kill PID``): it passes the stop on, both running runs
    checkpoint and stop, the queued run never starts, and the rerun resumes them (that a resumed
    run gives the numbers of one never stopped is test_preempt's)."""
    cfg = {"name": "p", "dataset": str(tiny_dataset_dir),
           "train": {"cells_seen": 32 * 200, "batch_size": 32, "eval_every": 10, "device": "cpu"},
           "sweep": {"sizes": ["TINY"], "seeds": [0, 1, 2], "workers": 2}}
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sw"
    runs = [out / "runs" / f"TINY-dall-s{s}" for s in range(3)]
    cmd = [sys.executable, "-m", "cellscale.cli", "sweep", str(cfg_path), "--out", str(out)]
    both = (_lines_at_least(runs[0] / "metrics.jsonl", 3), _lines_at_least(runs[1] / "metrics.jsonl", 3))
    rc, err = _signal_when(cmd, lambda: all(r() for r in both), signal.SIGTERM)
    loops = [_assert_interrupted(r, rc, err, signal.SIGTERM) for r in runs[:2]]
    assert not runs[2].exists()
    assert "the sweep stopped runs" in err

    table = pd.read_csv(run_sweep(load_study_config(cfg_path), out=out, progress=False))
    assert (table["status"] == "ok").all()
    for run, loop in zip(runs, loops):
        assert json.loads((run / "result.json").read_text())["resumed_at"] == [loop["step"]]
