"""The training loop: set the rate, step, and when due log, validate, checkpoint; before a step,
take the cooldown branch due there (``cellscale.train.branches`` decides when, and whether the run
ends with it; ``budget`` says where a run ends).

Train losses stay on the device between the loop's due points (log, eval, checkpoint): they are
read there, all at once, and a non-finite one ends the run as diverged at its own step. At
every step boundary the loop also polls a stop flag (``cellscale.runtime.preempt``) and the wall clock
(``train.checkpoint_minutes``); either one writes a checkpoint there, after the pending losses
have been read into the loop state, and a stop raises ``Preempted`` after it. One step
(``cellscale.train.step``) serves one process and W ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from cellscale.rules import objectives
from cellscale.rules.schedule import lr_at
from cellscale.runtime.checkpoint import crashpoint, rng_key, save_checkpoint, save_weights
from cellscale.runtime.io import atomic_write_with, to_json
from cellscale.runtime.preempt import Preempted, StopFlag
from cellscale.train import budget
from cellscale.train.branches import Brancher, BranchInterrupted, BranchPoint
from cellscale.train.evaluate import evaluate
from cellscale.train.setup import LoopState, Run
from cellscale.train.step import train_step


@dataclass
class Clock:
    """Training seconds: those of earlier processes of the run plus this one's."""

    before: float
    now: Callable[[], float] = time.perf_counter  # seconds; injectable, so tests can fake the clock
    t0: float = field(init=False)

    def __post_init__(self) -> None:
        self.t0 = self.now()

    def elapsed(self) -> float:
        return self.before + (self.now() - self.t0)


@dataclass
class StopWatch:
    """Asked at each step boundary: did a stop signal come, and is a wall-clock checkpoint due
    (``train.checkpoint_minutes`` since this process's last checkpoint)? Under DDP, one
    host-side all-reduce per step gives every rank the same answer, so that all ranks save at
    the same step and stop there."""

    run: Run
    clock: Clock
    flag: StopFlag
    last_save: float = field(init=False)

    def __post_init__(self) -> None:
        self.last_save = self.clock.elapsed()

    def poll(self) -> tuple[int, bool]:
        """(the stop signal or 0, whether a wall-clock checkpoint is due)"""
        minutes = self.run.cfg.checkpoint_minutes
        wall_due = bool(minutes) and self.clock.elapsed() - self.last_save >= 60.0 * minutes
        signum = self.flag.signum
        if self.run.dist.active:
            signum, wall_due = self.run.dist.host_max([signum, int(wall_due)])
        return signum, bool(wall_due)

    def saved(self) -> None:
        self.last_save = self.clock.elapsed()


@dataclass
class PendingLosses:
    """Train losses of the steps since the last read: device tensors, host-side counts."""

    losses: list[torch.Tensor] = field(default_factory=list)
    n_local: list[int] = field(default_factory=list)
    n_global: list[int] = field(default_factory=list)

    def add(self, loss: torch.Tensor, n_local: int, n_global: int) -> None:
        self.losses.append(loss.detach())
        self.n_local.append(n_local)
        self.n_global.append(n_global)

    def read(self, run: Run) -> list[tuple[float, int]]:
        """(the global batch's mean loss, its masked positions) of each pending step, in step
        order: one device read and, under DDP, one all-reduce for all of them."""
        if not self.losses:
            return []
        local = torch.stack(self.losses).double().cpu().tolist()
        sums = run.dist.all_reduce_sum([m * n for m, n in zip(local, self.n_local)])
        read = [(s / n, n) for s, n in zip(sums, self.n_global)]
        self.losses, self.n_local, self.n_global = [], [], []
        return read


def absorb(state: LoopState, read: list[tuple[float, int]]) -> bool:
    """Add the losses read (of the steps before ``state.step``) to the running sums; False,
    with the state marked diverged and set back to the step that blew up, at a non-finite one."""
    first = state.step - len(read)
    for i, (value, n_masked) in enumerate(read):
        if not math.isfinite(value):
            state.status, state.diverged_at, state.step = "diverged", first + i, first + i
            return False
        state.masked_tokens += n_masked
        state.run_loss += value
        state.run_n += 1
        state.last_loss = value
    return True


@dataclass
class MetricsLog:
    """metrics.jsonl: rank 0 writes, every rank counts lines (a resume cuts the file back)."""

    run: Run
    state: LoopState
    clock: Clock

    def write(self, record: dict[str, Any]) -> None:
        if self.run.dist.is_main:
            with open(self.run.metrics_path, "a") as fh:
                fh.write(to_json(record, indent=None) + "\n")
        self.state.metric_lines += 1

    def train(self, lr: float) -> None:
        state = self.state
        loss = objectives.to_report_units(self.run.model_cfg.objective, state.run_loss / state.run_n)
        self.write({"kind": "train", "step": state.step, "cells_seen": state.step * self.run.cfg.batch_size,
                    "lr": lr, "loss": loss, "wall": self.clock.elapsed()})
        state.run_loss, state.run_n = 0.0, 0


def validate(run: Run, state: LoopState, log: MetricsLog) -> bool:
    """Score the validation split (capped at ``max_eval_cells``) and keep the best weights, both on
    the weight average when ``train.ema_decay`` is set; False when the loss is not finite (the run
    diverged)."""
    with run.ema.applied() if run.ema is not None else nullcontext():
        return _validate(run, state, log)


def _validate(run: Run, state: LoopState, log: MetricsLog) -> bool:
    scores = evaluate(run.model, run.ds, "val", max_cells=run.cfg.max_eval_cells, **run.eval_kw())
    val = scores.loss  # checkpoints are chosen by the objective's own loss
    record = {"kind": "eval", "step": state.step, "cells_seen": state.step * run.cfg.batch_size,
              "val_mse": scores.mse}
    if run.model_cfg.objective != "mse":
        record["val_bits"] = val
    log.write({**record, "wall": log.clock.elapsed()})
    # a plateau run's weights are those of the branch it ends at: its evaluations draw the curve only
    if run.cfg.budget != "plateau" and val < state.best_val:
        state.best_val, state.best_step = val, state.step
        if run.dist.is_main:
            atomic_write_with(run.best_path, lambda p: save_weights(run.model, p))
    if not math.isfinite(val):
        state.status, state.diverged_at = "diverged", state.step
        return False
    state.evals.append([state.step * run.cfg.batch_size, val])
    return True


def checkpoint(run: Run, state: LoopState, clock: Clock, *, interrupted: bool = False) -> None:
    """Save the run at ``state.step``. When ``interrupted``, the saved loop state says
    ``status: interrupted``, and ``resume`` sets it back to running."""
    state.wall = clock.elapsed()
    extra: dict[str, torch.Tensor] = {}
    if run.dist.active:  # every rank's RNG state, so that a resumed run draws the same dropout
        cuda = torch.cuda.get_rng_state() if run.device.type == "cuda" else None
        for r, (cpu_rng, cuda_rng) in enumerate(run.dist.all_gather_object((torch.get_rng_state(), cuda))):
            if r > 0:
                extra[rng_key(r)] = cpu_rng
                if cuda_rng is not None:
                    extra[rng_key(r, "cuda")] = cuda_rng
    if run.ema is not None:
        extra.update(run.ema.tensors())
    saved = state.to_json()
    if interrupted:
        saved["status"] = "interrupted"
    if run.dist.is_main:
        save_checkpoint(run.ckpt_dir, model=run.model, optimizer=run.optimizer, loop_state=saved,
                        extra_tensors=extra)


def _read_losses(run: Run, state: LoopState, pending: PendingLosses, log: MetricsLog) -> bool:
    """Move the pending losses into the state. Returns False, with a 'diverged' line written,
    when one of them is not finite."""
    if absorb(state, pending.read(run)):
        return True
    log.write({"kind": "diverged", "step": state.step, "loss": None})
    return False


def _due_work(run: Run, state: LoopState, log: MetricsLog, pending: PendingLosses, lr: float, end: int) -> bool:
    """Read the losses, log and validate, each when due. Returns False when the run diverged."""
    c = run.cadence
    if c.any_due(state.step, end) and not _read_losses(run, state, pending, log):
        return False
    if c.due(c.log_every, state.step, end):
        log.train(lr)
    return not c.due(c.eval_every, state.step, end) or validate(run, state, log)


def _save_when_due(run: Run, state: LoopState, log: MetricsLog, pending: PendingLosses, watch: StopWatch,
                   end: int) -> bool:
    """Checkpoint when it is due by steps or by the wall clock, or when a stop signal came. A
    stop raises Preempted once the checkpoint is in place. Returns False when the losses read
    for the checkpoint show that the run diverged."""
    signum, wall_due = watch.poll()
    if not (signum or wall_due or run.cadence.due(run.cadence.ckpt_every, state.step, end)):
        return True
    # a checkpoint holds the losses of every step before it. Off a due point they must be read
    # now, or a resume would lose them; at a due point they have just been read
    if pending.losses and not _read_losses(run, state, pending, log):
        return False
    checkpoint(run, state, log.clock, interrupted=bool(signum))
    watch.saved()
    if signum:
        raise Preempted(signum, f"run {run.run_id} checkpointed at step {state.step}")
    return True


BRANCH_LINE = ("step", "stable_step", "cells_seen", "val_loss", "val_mse", "test_loss", "test_mse", "gain",
               "gain_se", "converged", "status")


def _branch(run: Run, state: LoopState, log: MetricsLog, pending: PendingLosses, watch: StopWatch,
            brancher: Brancher, point: BranchPoint) -> bool:
    """Take the cooldown branch due now, between checkpoints at its start and after it (so a kill
    inside it redoes it from the same state). True when the run ends with it, or diverged before."""
    if pending.losses and not _read_losses(run, state, pending, log):
        return True
    checkpoint(run, state, log.clock)
    try:
        ended = brancher.take(point, state, watch.flag)
    except BranchInterrupted as stop:
        checkpoint(run, state, log.clock, interrupted=True)
        watch.saved()
        raise Preempted(stop.signum, f"run {run.run_id} checkpointed at step {state.step}, before a branch") from None
    row = state.branches[-1]
    log.write({"kind": "branch", **{k: row[k] for k in BRANCH_LINE}, "wall": log.clock.elapsed()})
    crashpoint("after-branch")
    checkpoint(run, state, log.clock)
    watch.saved()
    return ended


def train_loop(run: Run, state: LoopState, *, on_step: Callable[[dict[str, Any]], None] | None = None,
               stop_after_steps: int | None = None, now: Callable[[], float] = time.perf_counter,
               stop: StopFlag | None = None) -> Clock:
    """Train from ``state.step`` to the end of the budget, updating ``state``, and return the
    run's clock. Training ends early after ``stop_after_steps`` steps or at divergence. When
    ``stop`` is set, training ends at the next step boundary with a checkpoint there, and
    Preempted is raised. ``now`` is the clock that the wall times and
    ``train.checkpoint_minutes`` are read from."""
    c, clock, pending = run.cadence, Clock(state.wall, now=now), PendingLosses()
    log = MetricsLog(run, state, clock)
    watch = StopWatch(run, clock, stop if stop is not None else StopFlag())
    run.model.train()
    start = state.step
    brancher = Brancher.of(run)
    for item in run.batches.iterate(start, c.total_steps - start, pin_memory=run.device.type == "cuda"):
        end = budget.end_step(run, state)
        if state.step >= end or (stop_after_steps is not None and state.step - start >= stop_after_steps):
            break
        point = brancher.due(state) if brancher is not None else None
        if point is not None and _branch(run, state, log, pending, watch, brancher, point):
            break
        lr = lr_at(state.step, total_steps=c.total_steps, peak=run.peak_lr, cfg=run.cfg,
                   decay_start=state.decay_start, end=end)
        pending.add(*train_step(run, item, lr))
        state.step += 1
        if run.ema is not None:
            run.ema.update(state.step)
        if not (_due_work(run, state, log, pending, lr, end)
                and _save_when_due(run, state, log, pending, watch, end)):
            break
        if on_step is not None:
            on_step({"step": state.step, "total": budget.end_step(run, state), "loss": state.last_loss,
                     "lr": lr, "batch_size": run.cfg.batch_size})
    return clock
