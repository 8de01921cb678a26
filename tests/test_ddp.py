"""DDP: 2 CPU processes (gloo) under torchrun give the loss curve of 1 process, and resume.

Dropout is set to 0 through the study YAML (``model: {dropout: 0.0}``): with dropout each rank
draws its own masks for its slice, which is statistically but not numerically the
single-process run. Without dropout the two runs compute the same function of the same global
batches; they differ only in float summation order (the gradient all-reduce, the sharded
evaluation), so losses and MSEs are compared to rel 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cellscale.config import load_study_config
from cellscale.data.loader import RankBatches, TrainBatches
from cellscale.data.store import Dataset
from cellscale.errors import RunError
from cellscale.model.ladder import get_size
from cellscale.train import train_run

REL = 1e-4
STUDY = {
    "model": {"dropout": 0.0},
    "train": {"cells_seen": 32 * 12, "batch_size": 32, "eval_every": 4, "eval_batch_size": 4,
              "warmup_frac": 0.1, "num_threads": 1, "device": "cpu"},
}


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("wall", None)
    return rows


def _torchrun(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "cellscale.cli", "train", *args]
    return subprocess.run(cmd, capture_output=True, check=False, text=True, env=env, timeout=timeout)


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert [(m["kind"], m["step"]) for m in ma] == [(m["kind"], m["step"]) for m in mb]
    for x, y in zip(ma, mb):
        key = "loss" if x["kind"] == "train" else "val_mse"
        assert y[key] == pytest.approx(x[key], rel=REL), (x, y)
    ra = json.loads((a / "result.json").read_text())
    rb = json.loads((b / "result.json").read_text())
    for key in ("steps", "cells_seen", "masked_tokens_seen", "best_step"):
        assert ra[key] == rb[key], key
    for key in ("best_val_mse", "test_mse"):
        assert rb[key] == pytest.approx(ra[key], rel=REL), key


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    return path


def _single(tiny_dataset_dir: Path, study: Path, out: Path, **kw) -> dict:
    cfg = load_study_config(study)
    ds = Dataset.open(tiny_dataset_dir)
    model = get_size("TINY", n_genes=ds.n_genes, **cfg.model)
    return train_run(ds, model, cfg.train, out=out, seed=1, **kw)


def test_rank_slices_tile_the_global_batch(tiny_dataset_dir: Path):
    ds = Dataset.open(tiny_dataset_dir)
    full = TrainBatches(ds, batch_size=32, seed=1)
    parts = [RankBatches(ds, world_size=4, rank=r, batch_size=32, seed=1) for r in range(4)]
    for step in (0, 7, 8, 30):  # 270 cells -> 8 steps per epoch: crosses epochs
        values, mask = full.batch(step)
        got = [p.batch(step) for p in parts]
        assert all(n == int(mask.sum()) for _, _, n in got)
        assert (values == torch.cat([v for v, _, _ in got])).all()
        assert (mask == torch.cat([m for _, m, _ in got])).all()


def test_ddp_two_processes_match_one(tiny_dataset_dir: Path, study: Path, tmp_path: Path):
    _single(tiny_dataset_dir, study, tmp_path / "one")
    proc = _torchrun("--data", str(tiny_dataset_dir), "--size", "TINY", "--seed", "1",
                     "--config", str(study), "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    res = json.loads((tmp_path / "two" / "result.json").read_text())
    assert res["world_size"] == 2 and res["status"] == "ok"
    # only rank 0 wrote: one metrics line per event, no stray temp files
    assert not list((tmp_path / "two").glob(".*"))


def test_ddp_takes_the_branches_of_one_process(tiny_dataset_dir: Path, tmp_path: Path):
    """Cooldown branches under torchrun: the same points, scores and per-cell sums as one process."""
    plateau = {**STUDY, "train": {**STUDY["train"], "cells_seen": 32 * 24, "budget": "plateau", "warmup_cells": 32,
                                  "plateau_min_cells": 10**9}}
    path = tmp_path / "plateau.yaml"
    path.write_text(yaml.safe_dump(plateau))
    one = _single(tiny_dataset_dir, path, tmp_path / "one")
    proc = _torchrun("--data", str(tiny_dataset_dir), "--size", "TINY", "--seed", "1",
                     "--config", str(path), "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads((tmp_path / d / "branches.json").read_text())["branches"] for d in ("one", "two")]
    assert one["n_branches"] == len(rows[0]) == len(rows[1]) >= 3
    for a, b in zip(*rows):
        assert (a["stable_step"], a["step"]) == (b["stable_step"], b["step"])
        for key in ("val_loss", "test_loss", "cooldown_train_loss"):
            assert b[key] == pytest.approx(a[key], rel=REL), key
    cells = [np.load(tmp_path / d / "branches" / f"{rows[0][-1]['cells_seen']}.npz") for d in ("one", "two")]
    assert (cells[0]["test_n"] == cells[1]["test_n"]).all()
    assert cells[1]["test_sse"] == pytest.approx(cells[0]["test_sse"], rel=REL)


@pytest.mark.slow
def test_ddp_resumes_a_checkpoint(tiny_dataset_dir: Path, study: Path, tmp_path: Path):
    """A run stopped after 6 steps (checkpoint at step 4) is finished by 2 DDP processes."""
    _single(tiny_dataset_dir, study, tmp_path / "one")
    part = _single(tiny_dataset_dir, study, tmp_path / "two", stop_after_steps=6)
    assert part["status"] == "incomplete" and (tmp_path / "two" / "checkpoint").is_dir()
    proc = _torchrun("--data", str(tiny_dataset_dir), "--size", "TINY", "--seed", "1",
                     "--config", str(study), "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    # resumed from the step-4 checkpoint, not restarted from step 0 (which would match too)
    resumed = json.loads((tmp_path / "two" / "result.json").read_text())
    assert resumed["resumed_at"] == [4] and resumed["world_size"] == 2
    assert json.loads((tmp_path / "one" / "result.json").read_text())["resumed_at"] == []


def test_batch_not_divisible_by_world_is_refused(tiny_dataset_dir: Path, tmp_path: Path):
    with pytest.raises(RunError, match="not divisible by the 3 processes"):
        RankBatches(Dataset.open(tiny_dataset_dir), world_size=3, rank=0, batch_size=32, seed=0)
