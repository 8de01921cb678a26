"""kill -9 at any moment, then the same command: the run (or sweep) ends as if never killed.

Real subprocesses, real SIGKILLs. Kills sent from outside are timed by polling the run
directory (after the first checkpoint appears; mid-run between two checkpoints; when a
checkpoint temp dir is seen, if the poll catches one). Kills inside a checkpoint write or
just before result.json are made exact with ``CELLSCALE_CRASHPOINT`` (the process SIGKILLs
itself at that line, see ``cellscale.runtime.checkpoint.crashpoint``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cellscale.config import load_study_config
from cellscale.data.store import Dataset
from cellscale.model.ladder import get_size
from cellscale.schema import RESULT_FIELDS
from cellscale.sweep import run_sweep
from cellscale.train import train_run

STUDY = {"train": {"cells_seen": 32 * 40, "batch_size": 32, "eval_every": 8, "checkpoint_every": 8,
                   "eval_batch_size": 64, "num_threads": 1, "device": "cpu"}}
VOLATILE = {"wall_seconds", "total_wall_seconds", "resumed_at"}


def _env(crash: str | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CELLSCALE_CRASHPOINT", None)
    if crash:
        env["CELLSCALE_CRASHPOINT"] = crash
    return env


def _metric_lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("wall", None)
    return rows


def _kill_when(cmd: list[str], ready, *, timeout: float = 60.0) -> bool:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` is true; False if it ended first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    t0 = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.002)
        proc.wait(timeout=timeout)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _crash(cmd: list[str], point: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, check=False, text=True, env=_env(point), timeout=120)
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-2000:])


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    return path


def _train_cmd(dataset: Path, study: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "cellscale.cli", "train", "--data", str(dataset),
            "--size", "XS", "--seed", "2", "--config", str(study), "--out", str(run)]


def _ckpt_loop(run: Path) -> dict:
    """The loop state of the newest complete checkpoint (empty when none)."""
    for cand in (run / "checkpoint" / "state.json", run / "checkpoint.old" / "state.json"):
        try:
            return json.loads(cand.read_text())["loop"]
        except (OSError, ValueError, KeyError):
            continue
    return {}


def _finish_and_compare(cmd: list[str], run: Path, ref_dir: Path, ref: dict) -> dict:
    proc = subprocess.run(cmd, capture_output=True, check=False, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((run / "result.json").read_text())
    assert got["resumed_at"]  # the last command resumed from a checkpoint, it did not restart
    assert not list(run.glob(".checkpoint.*")) and not (run / "checkpoint.old").exists()
    _close(_metrics(run), _metrics(ref_dir))
    _same_result(got, ref)
    return got


def _same_result(got: dict, ref: dict) -> None:
    """A resumed run's result.json against an uninterrupted run's: equal but for wall time and ids."""
    for key, value in ref.items():
        if key in VOLATILE or key in ("run_id", "device"):
            continue
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-6, abs=0), key
        else:
            assert got[key] == value, key


@pytest.fixture()
def reference(tiny_dataset_dir: Path, study: Path, tmp_path: Path) -> tuple[Path, dict]:
    cfg = load_study_config(study)
    ds = Dataset.open(tiny_dataset_dir)
    ref = train_run(ds, get_size("XS", n_genes=ds.n_genes), cfg.train, out=tmp_path / "ref", seed=2)
    return tmp_path / "ref", ref


def test_train_killed_at_several_points_ends_identical(tiny_dataset_dir: Path, study: Path,
                                                       tmp_path: Path, reference):
    run = tmp_path / "run"
    cmd = _train_cmd(tiny_dataset_dir, study, run)
    # 1. right after the first checkpoint appears
    assert _kill_when(cmd, (run / "checkpoint" / "state.json").is_file)
    assert not (run / "result.json").exists()
    # 2. mid-run, between two checkpoints: more metric lines than the checkpoint knows of
    first = _ckpt_loop(run)["step"]

    def between_checkpoints() -> bool:
        loop = _ckpt_loop(run)
        return loop.get("step", 0) > first and (
            _metric_lines(run / "metrics.jsonl") >= loop["metric_lines"] + 3)

    assert _kill_when(cmd, between_checkpoints)
    assert _metric_lines(run / "metrics.jsonl") > _ckpt_loop(run)["metric_lines"]
    # 3. inside a checkpoint write: temp dir complete, nothing renamed (a stale temp dir stays)
    _crash(cmd, "checkpoint-written")
    assert list(run.glob(".checkpoint.*"))
    # 4. between the two renames: only checkpoint.old holds a complete checkpoint
    _crash(cmd, "checkpoint-swap")
    assert (run / "checkpoint.old").is_dir() and not (run / "checkpoint").exists()
    # the same command, to the end
    _finish_and_compare(cmd, run, *reference)


@pytest.mark.slow
def test_train_killed_late_and_at_random_ends_identical(tiny_dataset_dir: Path, study: Path,
                                                        tmp_path: Path, reference):
    run = tmp_path / "run"
    cmd = _train_cmd(tiny_dataset_dir, study, run)
    # outside kills whenever the poll sees a checkpoint temp dir (a write in flight)
    for _ in range(3):
        _kill_when(cmd, lambda: any(run.glob(".checkpoint.*")))
    # after training and the final evaluation, before result.json
    if not (run / "result.json").exists():
        _crash(cmd, "before-result")
        assert not (run / "result.json").exists()
    got = _finish_and_compare(cmd, run, *reference)
    assert got["resumed_at"][-1] == got["steps"]


def _close(a: list[dict], b: list[dict]) -> bool:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], rel=1e-6, abs=0), (k, x, y)
            else:
                assert x[k] == y[k], (k, x, y)
    return True


def _sweep_cfg(dataset: Path) -> dict:
    return {"name": "k", "dataset": str(dataset),
            "train": {"cells_seen": 32 * 40, "batch_size": 32, "eval_every": 8, "num_threads": 1,
                      "device": "cpu"},
            "sweep": {"sizes": ["TINY", "XS", "XXS"], "seeds": [0]}}


def test_killed_sweep_resumes_without_losing_or_duplicating_rows(tiny_dataset_dir: Path, tmp_path: Path):
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(_sweep_cfg(tiny_dataset_dir)))
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "cellscale.cli", "sweep", str(cfg_path), "--out", str(out)]
    csv = out / "results.csv"
    seen_tables: list[pd.DataFrame] = []

    def xs_mid_run() -> bool:
        # results.csv is read at every poll: it must always parse with whole rows
        if csv.is_file():
            table = pd.read_csv(csv)
            assert list(table.columns) == list(RESULT_FIELDS)
            assert table["run_id"].is_unique and table["status"].notna().all()
            seen_tables.append(table)
        return (out / "runs" / "XS-dall-s0" / "checkpoint" / "state.json").is_file()

    assert _kill_when(cmd, xs_mid_run)
    assert list(pd.read_csv(csv)["run_id"]) == ["TINY-dall-s0"]
    assert not (out / "runs" / "XS-dall-s0" / "result.json").exists()
    done_stamp = (out / "runs" / "TINY-dall-s0" / "result.json").stat().st_mtime_ns

    proc = subprocess.run(cmd, capture_output=True, check=False, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TINY-dall-s0: already finished, skipped" in proc.stderr
    assert (out / "runs" / "TINY-dall-s0" / "result.json").stat().st_mtime_ns == done_stamp
    table = pd.read_csv(csv)
    assert list(table["run_id"]) == ["TINY-dall-s0", "XS-dall-s0", "XXS-dall-s0"]
    assert (table["status"] == "ok").all()
    xs = json.loads((out / "runs" / "XS-dall-s0" / "result.json").read_text())
    assert xs["resumed_at"] and xs["resumed_at"][0] > 0  # resumed, not restarted

    # the same numbers as a sweep never killed
    ref = pd.read_csv(run_sweep(load_study_config(cfg_path), out=tmp_path / "ref", progress=False))
    num = ["best_val_mse", "test_mse"]
    exact = [c for c in RESULT_FIELDS if c not in num + ["wall_seconds"]]
    pd.testing.assert_frame_equal(table[exact], ref[exact])
    assert table[num].to_numpy() == pytest.approx(ref[num].to_numpy(), rel=1e-6, abs=0)
