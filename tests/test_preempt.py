"""SIGTERM and SIGINT stop a run or a sweep after a checkpoint, and the same command resumes it.

These tests use real subprocesses and real signals. A signal is sent when the run's
metrics.jsonl reaches a line count that a seeded RNG draws. The process must then exit with
128 + the signal, leave a checkpoint whose loop state says ``status: interrupted``, and write
no result.json. Finished, the run must give the metrics and result of a run that was never
stopped, to the tolerance of the kill -9 tests (``test_kill_resume``, whose helpers these
tests reuse). A signal sent in the middle of a checkpoint write is timed exactly, from inside
the process: its safetensors writes and renames are wrapped. The wall-clock checkpoint runs
under a fake clock.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import test_kill_resume
import yaml
from test_kill_resume import _ckpt_loop, _close, _env, _metric_lines, _metrics, _same_result, _train_cmd

from cellscale.config import StudyConfig, TrainConfig, load_study_config, parse_config
from cellscale.data.store import Dataset
from cellscale.model import CellTransformer
from cellscale.model.ladder import get_size
from cellscale.runtime.checkpoint import find_checkpoint, load_checkpoint
from cellscale.runtime.preempt import Preempted, stop_on_signals
from cellscale.schema import RESULT_FIELDS
from cellscale.sweep import run_sweep
from cellscale.sweep import runner as sweep_runner
from cellscale.train import loop as train_loop_mod
from cellscale.train import train_run
from cellscale.train.settings import make_optimizer

study, reference = test_kill_resume.study, test_kill_resume.reference  # the kill tests' fixtures
TOTAL_LINES = 45  # the kill tests' study: 40 steps, a train line each, and 5 evaluations


def _default_sigint() -> None:
    # a job started in the background by a non-interactive shell ignores SIGINT, and Python
    # keeps ignoring it; the child under test must start with the default
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_when(cmd: list[str], ready, sig: int, *, timeout: float = 60.0) -> tuple[int, str]:
    """Start ``cmd`` and send it ``sig`` as soon as ``ready()`` is true; (exit code, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=_default_sigint)
    try:
        sent = False
        while proc.poll() is None and not sent:
            if ready():
                proc.send_signal(sig)
                sent = True
            time.sleep(0.002)
        _, err = proc.communicate(timeout=timeout)
        assert sent, f"the process ended before the signal: {err[-2000:]}"
        return proc.returncode, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _lines_at_least(path: Path, n: int):
    return lambda: _metric_lines(path) >= n


def _assert_interrupted(run: Path, rc: int, err: str, sig: int) -> dict:
    assert rc == 128 + sig, (rc, err[-2000:])
    assert f"interrupted by {signal.Signals(sig).name}" in err and "rerun the same command" in err
    assert "Traceback" not in err
    assert not (run / "result.json").exists()
    loop = _ckpt_loop(run)
    assert loop["status"] == "interrupted"
    # every line written is in the checkpoint: nothing is cut off or redone on resume
    assert loop["metric_lines"] == _metric_lines(run / "metrics.jsonl")
    return loop


def test_sigterm_and_sigint_at_random_points_resume_identical(tiny_dataset_dir: Path, study: Path,
                                                              tmp_path: Path, reference):
    ref_dir, ref = reference
    assert _metric_lines(ref_dir / "metrics.jsonl") == TOTAL_LINES
    run, rng = tmp_path / "run", random.Random(17)
    cmd = _train_cmd(tiny_dataset_dir, study, run)
    steps = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        # a few lines past those the resumed process starts from, and well before the end
        at = _metric_lines(run / "metrics.jsonl") + rng.randint(2, 12)
        rc, err = _signal_when(cmd, _lines_at_least(run / "metrics.jsonl", at), sig)
        steps.append(_assert_interrupted(run, rc, err, sig)["step"])
    assert 0 < steps[0] < steps[1] < 40
    proc = subprocess.run(cmd, capture_output=True, check=False, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((run / "result.json").read_text())
    assert got["resumed_at"] == steps and got["status"] == "ok"
    _close(_metrics(run), _metrics(ref_dir))
    _same_result(got, ref)


_WRAP_WRITES = """
import os, signal, sys
import cellscale.runtime.checkpoint as ck
from cellscale.cli import main

real_save, real_replace = ck.save_file, os.replace

def save_file(tensors, path, *a, **kw):
    # each file of a checkpoint's temp dir gets a SIGTERM just before it is written
    if "/.checkpoint." in str(path):
        os.kill(os.getpid(), signal.SIGTERM)
    return real_save(tensors, path, *a, **kw)

def replace(src, dst, *a, **kw):
    # and so does each rename that swaps a checkpoint in
    if os.path.basename(str(dst)).startswith("checkpoint"):
        os.kill(os.getpid(), signal.SIGTERM)
    return real_replace(src, dst, *a, **kw)

ck.save_file, os.replace = save_file, replace
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_checkpoint_writes_leaves_a_loadable_checkpoint(tiny_dataset_dir: Path, study: Path,
                                                                       tmp_path: Path, reference):
    ref_dir, ref = reference
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", _WRAP_WRITES, *_train_cmd(tiny_dataset_dir, study, run)[3:]]
    proc = subprocess.run(cmd, capture_output=True, check=False, text=True, env=_env(), timeout=120)
    # the first checkpoint (step 8) is written whole, and the run stops one step later. The
    # signals that land inside that second write don't harm it either
    loop = _assert_interrupted(run, proc.returncode, proc.stderr, signal.SIGTERM)
    assert loop["step"] == 9
    assert not list(run.glob(".checkpoint.*")) and not (run / "checkpoint.old").exists()
    ds = Dataset.open(tiny_dataset_dir)
    cfg = load_study_config(study)
    model = CellTransformer(get_size("XS", n_genes=ds.n_genes))
    saved = load_checkpoint(find_checkpoint(run / "checkpoint"), model=model,
                            optimizer=make_optimizer(model, cfg.train, 1e-3))
    assert saved["step"] == 9
    # finished in this process, it ends as the run that was never stopped
    got = train_run(ds, get_size("XS", n_genes=ds.n_genes), cfg.train, out=run, seed=2)
    assert got["resumed_at"] == [9]
    _close(_metrics(run), _metrics(ref_dir))
    _same_result(got, ref)


def _two_size_sweep(dataset: Path) -> dict:
    return {"name": "p", "dataset": str(dataset),
            "train": {"cells_seen": 32 * 40, "batch_size": 32, "eval_every": 8, "num_threads": 1,
                      "device": "cpu"},
            "sweep": {"sizes": ["TINY", "XXS"], "seeds": [0]}}


def test_sweep_sigterm_checkpoints_its_run_and_resumes(tiny_dataset_dir: Path, tmp_path: Path):
    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(_two_size_sweep(tiny_dataset_dir)))
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "cellscale.cli", "sweep", str(cfg_path), "--out", str(out)]
    tiny = out / "runs" / "TINY-dall-s0"
    at = random.Random(5).randint(3, 25)  # of 45 lines: the signal comes well before the run ends
    rc, err = _signal_when(cmd, _lines_at_least(tiny / "metrics.jsonl", at), signal.SIGTERM)
    loop = _assert_interrupted(tiny, rc, err, signal.SIGTERM)
    assert "TINY-dall-s0" in err
    assert not (out / "runs" / "XXS-dall-s0").exists()  # no run starts after the signal
    assert not (out / "results.csv").exists() or pd.read_csv(out / "results.csv").empty

    table = pd.read_csv(run_sweep(load_study_config(cfg_path), out=out, progress=False))
    assert list(table["run_id"]) == ["TINY-dall-s0", "XXS-dall-s0"] and (table["status"] == "ok").all()
    assert json.loads((tiny / "result.json").read_text())["resumed_at"] == [loop["step"]]
    ref = pd.read_csv(run_sweep(load_study_config(cfg_path), out=tmp_path / "ref", progress=False))
    num = ["best_val_mse", "test_mse"]
    exact = [c for c in RESULT_FIELDS if c not in num + ["wall_seconds"]]
    pd.testing.assert_frame_equal(table[exact], ref[exact])
    assert table[num].to_numpy() == pytest.approx(ref[num].to_numpy(), rel=1e-6, abs=0)


def test_sweep_signal_while_a_run_is_scored_stops_before_the_next(monkeypatch, tmp_path: Path):
    """A signal that comes after a run's last step (its final scoring) lets that run finish;
    the sweep records it and starts no other."""
    specs = [type("Spec", (), {"run_id": rid, "depth": 1.0})() for rid in ("a", "b")]
    started = []

    def fake_execute(spec, dataset, sweep_dir, on_step=None):
        started.append(spec.run_id)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler of run_local's block only sets the flag
        return {"run_id": spec.run_id, "status": "ok"}

    monkeypatch.setattr(sweep_runner, "execute_run", fake_execute)
    recorded = []
    with pytest.raises(Preempted, match="stopped before run b") as caught:
        sweep_runner.run_local(specs, dataset="/ds", sweep_dir=str(tmp_path), on_result=recorded.append)
    assert started == ["a"] and [r["run_id"] for r in recorded] == ["a"]
    assert caught.value.exit_code == 143


def test_wall_clock_checkpoint_fires_under_a_fake_clock(tiny_dataset_dir: Path, tmp_path: Path, monkeypatch):
    """25 fake seconds a step, a checkpoint at least every minute: saved at steps 4, 7, 10, ...
    (a save is due once 60 s have passed since the last one). A run stopped at step 9 resumes
    from the wall-clock checkpoint at step 7, and it ends as a run without wall-clock checkpoints."""
    ds = Dataset.open(tiny_dataset_dir)
    base = TrainConfig(cells_seen=32 * 20, batch_size=32, eval_every=20, eval_batch_size=64, num_threads=1,
                       device="cpu")
    timed = base.model_copy(update={"checkpoint_minutes": 1.0})
    model = get_size("XXS", n_genes=ds.n_genes)
    saved_at, real_save = [], train_loop_mod.save_checkpoint

    def save(ckpt_dir, **kw):
        saved_at.append(kw["loop_state"]["step"])
        real_save(ckpt_dir, **kw)

    monkeypatch.setattr(train_loop_mod, "save_checkpoint", save)
    fake = {"t": 0.0}

    def tick(info: dict) -> None:
        fake["t"] += 25.0

    run = tmp_path / "timed"
    part = train_run(ds, model, timed, out=run, seed=3, now=lambda: fake["t"], on_step=tick, stop_after_steps=9)
    assert part["status"] == "incomplete" and saved_at == [4, 7]
    # resumed without the setting (the real clock: no minute passes): the same run, not "other settings"
    got = train_run(ds, model, base, out=run, seed=3)
    assert got["resumed_at"] == [7] and saved_at == [4, 7, 20]
    ref = train_run(ds, model, base, out=tmp_path / "plain", seed=3)
    _close(_metrics(run), _metrics(tmp_path / "plain"))
    _same_result(got, ref)


def test_checkpoint_minutes_config_and_flag():
    assert TrainConfig().checkpoint_minutes is None
    assert TrainConfig(checkpoint_minutes=0).checkpoint_minutes is None  # off, with the hash of off
    from cellscale.config import ConfigError, identity_dump

    # never part of a run's identity: it changes when checkpoints are written, not the numbers
    assert identity_dump("train", TrainConfig(checkpoint_minutes=5)) == identity_dump("train", TrainConfig())
    with pytest.raises(ConfigError, match="checkpoint_minutes"):
        parse_config(StudyConfig, {"train": {"checkpoint_minutes": -1}})
    from cellscale.cli import _train_flags, build_parser

    args = build_parser().parse_args(["train", "--data", "d", "--size", "XS", "--out", "o",
                                      "--checkpoint-minutes", "2.5"])
    assert _train_flags(args)["checkpoint_minutes"] == 2.5


_FLAG_ONLY = """
import os, pickle, signal
from cellscale.runtime.preempt import Preempted, stop_on_signals
before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
with stop_on_signals() as flag:
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.signum == signal.SIGTERM  # delivered, and the process lives on
    with stop_on_signals() as inner:  # a sweep's run shares the sweep's flag
        assert inner is flag
        os.kill(os.getpid(), signal.SIGINT)
    assert flag.signum == signal.SIGINT
assert {s: signal.getsignal(s) for s in before} == before
err = pickle.loads(pickle.dumps(Preempted(signal.SIGINT, "x")))
assert err.exit_code == 130 and str(err).startswith("interrupted by SIGINT: x") and not isinstance(err, Exception)
print("ok")
"""


def test_stop_on_signals_only_sets_a_flag_and_restores_handlers():
    """In a fresh interpreter with SIGINT at Python's default, as the command line starts: the
    test process itself has handlers from the libraries earlier tests loaded (it crashed on a
    self-sent SIGINT after the whole suite, under setsid)."""
    proc = subprocess.run([sys.executable, "-c", _FLAG_ONLY], capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_on_signals() as flag:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert flag.signum == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


class _FakeRay:
    """ray.wait/get/cancel over refs that end when told: enough for the sweep's wait loop."""

    def __init__(self, outcomes: dict[str, object]):
        self.outcomes, self.cancelled, self.done = outcomes, [], []

    def wait(self, refs, num_returns=1, timeout=None):
        ready = [r for r in refs if r in self.done][:num_returns]
        return ready, [r for r in refs if r not in ready]

    def get(self, ref):
        out = self.outcomes[ref]
        if isinstance(out, Exception):
            raise out
        return out

    def cancel(self, ref):
        self.cancelled.append(ref)
        self.outcomes[ref] = RuntimeError("TaskCancelledError")
        self.done.append(ref)


def test_ray_sweep_cancels_its_tasks_on_a_signal_and_records_nothing(tmp_path: Path):
    specs = {r: type("Spec", (), {"run_id": r})() for r in ("a", "b", "c")}
    ray = _FakeRay({"a": {"run_id": "a", "status": "ok"}, "b": None, "c": None})
    ray.done.append("a")
    with stop_on_signals() as flag:
        got = []
        with pytest.raises(Preempted, match="SIGTERM"):
            for spec, result in sweep_runner._as_completed(ray, dict(specs), str(tmp_path), flag):
                got.append(result["run_id"])
                os.kill(os.getpid(), signal.SIGTERM)
    assert got == ["a"] and sorted(ray.cancelled) == ["b", "c"]
    assert not list(tmp_path.rglob("result.json"))  # a cancelled run is not a failed one


def _torchrun_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
            "-m", "cellscale.cli", "train", *args]


def _torchrun_env() -> dict[str, str]:
    env = _env()
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.mark.slow
def test_ddp_sigterm_to_one_rank_stops_both_at_one_step(tiny_dataset_dir: Path, tmp_path: Path):
    """SIGTERM to rank 1 alone: the ranks agree on the step, rank 0 saves, and both exit 143.
    Two processes then finish the run with the numbers of one uninterrupted process."""
    import psutil
    from test_ddp import STUDY as DDP_STUDY
    from test_ddp import _assert_same_run

    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump({**DDP_STUDY, "train": {**DDP_STUDY["train"], "cells_seen": 32 * 24}}))
    cfg = load_study_config(study_path)
    ds = Dataset.open(tiny_dataset_dir)
    train_run(ds, get_size("TINY", n_genes=ds.n_genes, **cfg.model), cfg.train, out=tmp_path / "one", seed=1)
    run = tmp_path / "two"
    args = ("--data", str(tiny_dataset_dir), "--size", "TINY", "--seed", "1", "--config", str(study_path),
            "--out", str(run))
    agent = subprocess.Popen(_torchrun_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=_torchrun_env())
    try:
        while agent.poll() is None and _metric_lines(run / "metrics.jsonl") < 6:
            time.sleep(0.002)
        ranks = {p.environ()["RANK"]: p for p in psutil.Process(agent.pid).children()}
        ranks["1"].send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    # both ranks exit 143 (torchrun's report of failed children names their codes); rank 0
    # alone says so, and no rank prints a traceback (torchrun prints its own)
    codes = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", err))
    assert codes == {"0": "143", "1": "143"}, err[-3000:]
    assert err.count("interrupted by SIGTERM: run two checkpointed at step") == 1
    assert "KeyboardInterrupt" not in err and "Preempted" not in err
    assert _ckpt_loop(run)["status"] == "interrupted" and not (run / "result.json").exists()
    step = _ckpt_loop(run)["step"]
    env = _torchrun_env()
    proc = subprocess.run(_torchrun_cmd(*args), capture_output=True, check=False, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(tmp_path / "one", run)
    assert json.loads((run / "result.json").read_text())["resumed_at"] == [step]
