"""The Ray backend: the same table as the local backend, failures recorded, nothing left behind.

One local 2-CPU Ray session (started and shut down by ``run_sweep``) runs 2 sizes x 2 seeds
on two train-set sizes, one of which is larger than the train split, so those runs fail in
their Ray task; the local backend runs the same config.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch

# skipped without ray, failed under CI (conftest.require)
pytestmark = pytest.mark.needs("ray")

from cellscale.config import StudyConfig, parse_config
from cellscale.schema import RESULT_FIELDS
from cellscale.sweep import run_sweep

WALL = ["wall_seconds"]
NUMERIC = ["best_val_mse", "test_mse"]


def _cfg(dataset: Path) -> StudyConfig:
    return parse_config(StudyConfig, {
        "name": "ray", "dataset": str(dataset),
        "train": {"cells_seen": 128, "batch_size": 32, "eval_every": 2, "device": "cpu"},
        "sweep": {"sizes": ["XXS", "TINY"], "seeds": [0, 1], "train_cells": [None, 100000],
                  "num_cpus_per_run": 1},
    })


def _listing(path: Path) -> set[str]:
    return set(os.listdir(path)) if path.is_dir() else set()


def test_ray_matches_local(tiny_dataset_dir: Path, tmp_path: Path):
    cfg = _cfg(tiny_dataset_dir)
    tmp_ray, home_ray = Path("/tmp/ray"), Path.home() / ".ray"
    tmp_root = Path(tempfile.gettempdir())
    before = (_listing(tmp_ray), _listing(home_ray), tmp_ray.exists(), home_ray.exists(),
              os.environ.get("RAY_AUTH_MODE"))
    private_before = set(tmp_root.glob("csray*"))

    ray_csv = run_sweep(cfg, out=tmp_path / "ray", backend="ray", ray_num_cpus=2, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the local backend in this process, like one Ray task of 1 CPU
    try:
        local_csv = run_sweep(cfg, out=tmp_path / "local", backend="local", progress=False)
    finally:
        torch.set_num_threads(threads)

    # no session files, logs or token files left in the default places
    assert (_listing(tmp_ray), _listing(home_ray), tmp_ray.exists(), home_ray.exists(),
            os.environ.get("RAY_AUTH_MODE")) == before
    assert set(tmp_root.glob("csray*")) <= private_before  # the private session dir is gone

    r, loc = pd.read_csv(ray_csv), pd.read_csv(local_csv)
    assert list(r.columns) == list(RESULT_FIELDS)
    assert list(r["run_id"]) == list(loc["run_id"]) == [
        "XXS-dall-s0", "XXS-dall-s1", "XXS-d100000-s0", "XXS-d100000-s1",
        "TINY-dall-s0", "TINY-dall-s1", "TINY-d100000-s0", "TINY-d100000-s1",
    ]
    status = dict(zip(r["run_id"], r["status"]))
    assert {k: v for k, v in status.items() if "d100000" in k} == dict.fromkeys(
        [k for k in status if "d100000" in k], "failed")
    assert {v for k, v in status.items() if "dall" in k} == {"ok"}
    assert r["error"][r["status"] == "failed"].str.contains("train_cells=100000").all()

    exact = [c for c in RESULT_FIELDS if c not in WALL + NUMERIC]
    pd.testing.assert_frame_equal(r[exact], loc[exact])
    ok = r["status"] == "ok"
    for col in NUMERIC:
        assert r.loc[ok, col].to_numpy() == pytest.approx(loc.loc[ok, col].to_numpy(), rel=1e-6, abs=0)

    # each Ray task ran torch on the one CPU it was given (num_cpus_per_run)
    res = json.loads((tmp_path / "ray" / "runs" / "TINY-dall-s0" / "result.json").read_text())
    assert res["num_threads"] == 1


@pytest.mark.slow
def test_ray_worker_killed_mid_run_is_recorded(tiny_dataset_dir: Path, tmp_path: Path, monkeypatch):
    """A task whose worker process dies (here: SIGKILL before result.json) is recorded as
    failed with the Ray error; the rerun (without the kill) resumes it from its checkpoint."""
    cfg = parse_config(StudyConfig, {
        "name": "ray-kill", "dataset": str(tiny_dataset_dir),
        "train": {"cells_seen": 128, "batch_size": 32, "eval_every": 2, "device": "cpu"},
        "sweep": {"sizes": ["XXS"], "seeds": [0, 1]},
    })
    monkeypatch.setenv("CELLSCALE_CRASHPOINT", "before-result")  # inherited by the Ray workers
    table = pd.read_csv(run_sweep(cfg, out=tmp_path / "sw", backend="ray", ray_num_cpus=2, progress=False))
    assert list(table["status"]) == ["failed", "failed"]
    assert table["error"].str.startswith("ray worker failed").all()
    monkeypatch.delenv("CELLSCALE_CRASHPOINT")
    table = pd.read_csv(run_sweep(cfg, out=tmp_path / "sw", backend="ray", ray_num_cpus=2, progress=False))
    assert list(table["status"]) == ["ok", "ok"]
    for rid in table["run_id"]:
        res = json.loads((tmp_path / "sw" / "runs" / rid / "result.json").read_text())
        assert res["resumed_at"] == [res["steps"]]  # the final checkpoint was reused


def _branch_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, comment="#").sort_values(["run_id", "cells_seen"]).reset_index(drop=True)


@pytest.mark.parametrize("backend", ["ray", "pool"])
def test_plateau_runs_take_the_same_branches_on_every_backend(tiny_dataset_dir: Path, tmp_path: Path, backend):
    """A plateau-budget sweep on Ray (one task per run) and in the local process pool writes the same
    cooldown branches as one run after another in this process."""
    from cellscale.schema import BRANCH_FIELDS

    base = {"name": "branches", "dataset": str(tiny_dataset_dir),
            "train": {"cells_seen": 512, "batch_size": 32, "budget": "plateau", "branch_min_cells": 128,
                      "warmup_cells": 64, "device": "cpu"},
            "sweep": {"sizes": ["XXS", "TINY"], "seeds": [0], "num_cpus_per_run": 1}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like one Ray task, or one pool worker, of 1 CPU
    try:
        local = run_sweep(parse_config(StudyConfig, base), out=tmp_path / "local", backend="local", progress=False)
    finally:
        torch.set_num_threads(threads)
    if backend == "ray":
        other = run_sweep(parse_config(StudyConfig, base), out=tmp_path / "ray", backend="ray", ray_num_cpus=2,
                          progress=False)
    else:
        cfg = parse_config(StudyConfig, {**base, "sweep": {**base["sweep"], "workers": 2}})
        other = run_sweep(cfg, out=tmp_path / "pool", progress=False)
    a, b = _branch_table(local.parent / "branches.csv"), _branch_table(other.parent / "branches.csv")
    assert list(a["cells_seen"]) == [128, 256, 512] * 2 and list(a.columns) == list(BRANCH_FIELDS)
    exact = [c for c in BRANCH_FIELDS if c not in ("wall", "val_loss", "val_mse", "test_loss", "test_mse",
                                                   "cooldown_train_loss", "gain", "gain_se")]
    pd.testing.assert_frame_equal(a[exact], b[exact])
    for col in ("val_loss", "test_loss", "gain"):
        assert b[col].to_numpy() == pytest.approx(a[col].to_numpy(), rel=1e-6, abs=1e-12, nan_ok=True)
