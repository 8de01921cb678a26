"""Cooldown branches: where they are taken, that each is exactly a run scheduled to end there, that
the stable phase goes on untouched, that the run ends where the rule says, and that a kill or a
stop inside a branch resumes to the same numbers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cellscale.config import TrainConfig
from cellscale.data.store import Dataset
from cellscale.model.ladder import get_size
from cellscale.rules.plateau import converged_at, gains
from cellscale.rules.schedule import BranchPoint, plan_points
from cellscale.schema import BRANCH_FIELDS
from cellscale.train import train_run

B = 32
# a warmup in cells: a branch's schedule up to its end is then exactly that of a run scheduled to end there
BRANCHED = TrainConfig(cells_seen=B * 160, batch_size=B, eval_every=10, eval_batch_size=64, num_threads=1,
                       budget="plateau", warmup_cells=B * 8, cooldown_frac=0.25, plateau_min_cells=10**9,
                       branch_min_cells=B * 20, device="cpu")


def test_branch_points_are_doublings_ending_at_the_maximum():
    pts = plan_points(160, batch_size=B, cooldown_frac=0.25, warmup=0, min_cells=B * 20)
    assert pts == (BranchPoint(16, 20), BranchPoint(32, 40), BranchPoint(64, 80), BranchPoint(128, 160))
    # no branch inside the warmup (5% of 1,000 steps = 50): the next doubling down would start at 25
    pts = plan_points(1000, batch_size=B, cooldown_frac=0.2, warmup=50)
    assert [p.end for p in pts] == [62, 125, 250, 500, 1000]
    assert [p.stable for p in pts] == [51, 104, 208, 416, 833]
    assert plan_points(10, batch_size=B, cooldown_frac=0.2, warmup=5) == (BranchPoint(8, 10),)
    # a first branch asked for past the maximum: the run's own cooldown is its one branch
    assert plan_points(10, batch_size=B, cooldown_frac=0.2, warmup=0, min_cells=B * 100) == (
        BranchPoint(8, 10),)
    # twice per doubling: total / sqrt(2)^j
    pts = plan_points(1000, batch_size=B, cooldown_frac=0.2, warmup=50, every=2**0.5)
    assert [p.end for p in pts] == [62, 88, 125, 177, 250, 354, 500, 707, 1000]


def _branches(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "branches.json").read_text())["branches"]


@pytest.fixture(scope="module")
def branched(tiny_dataset_dir: Path, tmp_path_factory) -> tuple[dict, Path]:
    ds = Dataset.open(tiny_dataset_dir)
    out = tmp_path_factory.mktemp("branched") / "run"
    return train_run(ds, get_size("TINY", n_genes=ds.n_genes), BRANCHED, out=out), out


def test_a_branch_is_exactly_a_run_scheduled_to_end_there(tiny_dataset_dir: Path, tmp_path: Path, branched):
    ds = Dataset.open(tiny_dataset_dir)
    _, out = branched
    mid = next(b for b in _branches(out) if b["step"] == 80)
    alone = train_run(ds, get_size("TINY", n_genes=ds.n_genes),
                      BRANCHED.model_copy(update={"cells_seen": B * 80, "branch_min_cells": B * 80}),
                      out=tmp_path / "to80")
    assert alone["steps"] == 80 and alone["n_branches"] == 1 and alone["decay_start"] == 64
    own = _branches(tmp_path / "to80")[-1]
    assert (mid["val_loss"], mid["test_loss"], mid["cooldown_train_loss"]) == (
        own["val_loss"], own["test_loss"], own["cooldown_train_loss"])
    assert alone["test_mse"] == pytest.approx(mid["test_mse"], rel=1e-9)  # re-scored per gene: another sum order


def test_the_stable_phase_goes_on_as_if_no_branch_was_taken(tiny_dataset_dir: Path, tmp_path: Path, branched):
    ds = Dataset.open(tiny_dataset_dir)
    res, out = branched
    last_only = train_run(ds, get_size("TINY", n_genes=ds.n_genes),
                          BRANCHED.model_copy(update={"branch_min_cells": B * 160}), out=tmp_path / "one")
    assert last_only["n_branches"] == 1 and res["n_branches"] == 4
    assert (res["best_val_mse"], res["test_mse"]) == (last_only["best_val_mse"], last_only["test_mse"])
    assert _branches(out)[-1]["test_loss"] == _branches(tmp_path / "one")[-1]["test_loss"]
    assert res["steps"] == 160 and res["decay_start"] == 128
    assert res["branch_flops"] == pytest.approx(res["flops"] * (4 + 8 + 16) / 160)  # the other three cooldowns


def test_the_run_records_its_branches_and_ends_with_its_last(branched):
    res, out = branched
    rows = _branches(out)
    assert [list(r) for r in rows] == [list(BRANCH_FIELDS)] * 4
    assert [(r["stable_step"], r["step"], r["cells_seen"]) for r in rows] == [
        (16, 20, 640), (32, 40, 1280), (64, 80, 2560), (128, 160, 5120)]
    assert [r["gain"] for r in rows] == pytest.approx(gains([r["cells_seen"] for r in rows],
                                                            [r["val_loss"] for r in rows]), nan_ok=True)
    assert rows[0]["gain_se"] is None and all(r["gain_se"] > 0 for r in rows[1:])  # paired with the point at half
    assert not any(r["converged"] for r in rows) and res["converged"] is False  # plateau_min_cells: never
    assert res["plateau_gain"] == rows[-1]["gain"] and res["plateau_gain_se"] == rows[-1]["gain_se"]
    assert res["best_val_mse"] == pytest.approx(rows[-1]["val_mse"], rel=1e-9)
    assert res["test_mse"] == pytest.approx(rows[-1]["test_mse"], rel=1e-9)
    cells = np.load(out / "branches" / "2560.npz")
    assert cells["val_sse"].shape == (15,) and cells["test_n"].sum() > 0
    assert cells["val_loss"].sum() / cells["val_n"].sum() == pytest.approx(rows[2]["val_loss"], rel=1e-9)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["cells_seen"] for x in lines if x["kind"] == "branch"] == [640, 1280, 2560, 5120]


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> Dataset:
    """Gaussian latent-factor data: a TINY model leaves the gene-mean baseline within a few hundred cells."""
    from cellscale.config import DataConfig, SimulateConfig
    from cellscale.data.build import build_dataset

    cfg = DataConfig(source="simulate", genes=16, cells=2000, seed=0,
                     simulate=SimulateConfig(mode="gaussian", n_genes=16, n_programs=3))
    return Dataset.open(build_dataset(cfg, out=tmp_path_factory.mktemp("learnable") / "ds", progress=False))


def test_the_run_stops_at_the_first_branch_the_rule_calls_converged(learnable: Dataset, tmp_path: Path):
    from cellscale.rules.plateau import has_learned

    cfg = BRANCHED.model_copy(update={"plateau_min_cells": 0, "plateau_tol": 0.3, "branch_min_cells": 0,
                                      "plateau_patience": 1, "cells_seen": B * 640})
    res = train_run(learnable, get_size("TINY", n_genes=learnable.n_genes), cfg, out=tmp_path / "early")
    rows = _branches(tmp_path / "early")
    gene_mean = learnable.manifest["baselines"]["gene_mean"]["val"]
    learned = [has_learned(r["val_mse"], gene_mean, 0.3) for r in rows]
    hit = converged_at([r["cells_seen"] for r in rows], [r["val_loss"] for r in rows], tol=0.3, patience=1,
                       ses=[r["gain_se"] for r in rows], learned=learned)
    assert hit == len(rows) - 1 and rows[-1]["converged"] is True and res["converged"] is True
    assert learned[-1] and res["steps"] == rows[-1]["step"] < 640 and res["cells_seen"] == rows[-1]["cells_seen"]


def _cmd(dataset: Path, study: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "cellscale.cli", "train", "--data", str(dataset), "--size", "TINY",
            "--config", str(study), "--out", str(run)]


def _env(crash: str | None) -> dict[str, str]:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CELLSCALE_CRASHPOINT", None)
    if crash:
        env["CELLSCALE_CRASHPOINT"] = crash
    return env


@pytest.mark.parametrize("crash, code", [("inside-branch", -signal.SIGKILL), ("after-branch", -signal.SIGKILL),
                                         ("inside-branch:TERM", 143)])
def test_a_kill_or_stop_inside_a_branch_resumes_to_the_same_numbers(tiny_dataset_dir: Path, tmp_path: Path,
                                                                     branched, crash, code):
    ref, ref_dir = branched
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"train": BRANCHED.model_dump(mode="json")}))
    run = tmp_path / "run"
    cmd = _cmd(tiny_dataset_dir, study, run)
    first = subprocess.run(cmd, capture_output=True, text=True, env=_env(crash), timeout=120)
    assert first.returncode == code, first.stderr[-2000:]
    assert not (run / "result.json").exists()
    state = json.loads((run / "checkpoint" / "state.json").read_text())["loop"]
    if crash == "after-branch":  # the branch was recorded, its checkpoint not written: it is redone
        assert len(_branches(run)) == 1 and state["branches"] == []
    else:  # the checkpoint at the branch's start: nothing of the branch in it
        assert state["step"] == 16 and state["branches"] == []
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(None), timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    got = json.loads((run / "result.json").read_text())
    assert got["resumed_at"] == [16]
    for key in ("steps", "best_val_mse", "test_mse", "converged", "plateau_gain", "n_branches", "branch_flops"):
        assert got[key] == ref[key], key
    strip = [{k: v for k, v in r.items() if k not in ("wall", "run_id")} for r in _branches(run)]
    assert strip == [{k: v for k, v in r.items() if k not in ("wall", "run_id")} for r in _branches(ref_dir)]
