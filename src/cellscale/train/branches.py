"""Cooldown branches: the data axis, and the convergence verdict, from one run.

A plateau-budget run trains at its peak rate (warmup-stable-decay). At every doubling of cells
seen up to its maximum, D_max / 2^j (``cellscale.rules.schedule.plan_points``), it branches: the weights, optimiser state and
RNG are kept aside, a cooldown of ``cooldown_frac`` x the stable steps so far is trained on the
batches the stable phase would have drawn next (``cooldown_shape``), the cooled-down weights are
scored on the whole validation and test splits (totals and per-cell sums), the point is recorded,
and the stable phase goes on from the weights kept aside. A branch from stable step s ending at
step T is therefore exactly the end of a run scheduled to T with its cooldown at s (Hägele et al.
2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations").

The branch decides when it acts (``due``), as torchtitan's validator and checkpointer do; the loop
only asks. The run ends at a branch: the first at which ``cellscale.rules.plateau``'s rule calls it
converged (past ``plateau_min_cells``), or the last one, at the maximum. That branch's weights are
then the run's own: they are not put back.

Resume: the loop checkpoints just before a branch and just after it (the recorded point is part of
the loop state), so a kill inside a branch redoes that branch from the same state, batches and RNG,
to the same numbers; a stop signal inside one puts the stable weights back and checkpoints there.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cellscale.model import count_params, flops_per_cell
from cellscale.rules import objectives
from cellscale.rules.plateau import HALF, gains, ladder_converged_at, paired_gain_se
from cellscale.rules.schedule import BranchPoint, lr_at, run_branch_points
from cellscale.runtime.checkpoint import crashpoint, save_weights
from cellscale.runtime.io import atomic_write_json, atomic_write_with
from cellscale.runtime.preempt import StopFlag
from cellscale.schema import BRANCH_CELLS_DIR, BRANCH_TABLE, BranchRecord
from cellscale.train.evaluate import EvalResult, evaluate, write_cell_sums
from cellscale.train.setup import LoopState, Run
from cellscale.train.step import train_step


class BranchInterrupted(Exception):
    """A stop signal came inside a branch: the stable weights are back in place."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class Snapshot:
    """What a branch changes and must put back: weights, optimiser state, RNG."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    cpu_rng: torch.Tensor
    cuda_rng: torch.Tensor | None

    @classmethod
    def of(cls, run: Run) -> Snapshot:
        cuda = torch.cuda.get_rng_state() if run.device.type == "cuda" else None
        return cls(model={k: v.detach().clone() for k, v in run.model.state_dict().items()},
                   optimizer=copy.deepcopy(run.optimizer.state_dict()), cpu_rng=torch.get_rng_state(), cuda_rng=cuda)

    def restore(self, run: Run) -> None:
        run.model.load_state_dict(self.model)
        run.optimizer.load_state_dict(self.optimizer)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng)


@dataclass
class Brancher:
    """The cooldown branches of one plateau-budget run."""

    run: Run
    points: tuple[BranchPoint, ...]

    @classmethod
    def of(cls, run: Run) -> Brancher | None:
        cfg = run.cfg
        if cfg.budget != "plateau":
            return None
        return cls(run, run_branch_points(cfg))

    @property
    def final_stable(self) -> int:
        """The stable step of the last branch: the stable phase never goes past it."""
        return self.points[-1].stable

    def due(self, state: LoopState) -> BranchPoint | None:
        """The branch to take before step ``state.step``, if any."""
        if state.decay_start is not None:  # the run has ended at a branch
            return None
        done = {int(b["step"]) for b in state.branches}
        return next((p for p in self.points if p.stable == state.step and p.end not in done), None)

    def take(self, point: BranchPoint, state: LoopState, flag: StopFlag) -> bool:
        """Train the branch, score and record it; True when the run ends with it (its weights are
        then the run's), else the stable weights are put back. BranchInterrupted on a stop."""
        run, t0 = self.run, time.perf_counter()
        snap = Snapshot.of(run)
        losses = self._cooldown(point, flag, snap)
        finite = all(math.isfinite(v) for v, _ in losses)
        val = test = None
        if finite:
            val = evaluate(run.model, run.ds, "val", per_cell=True, **run.eval_kw())
            test = evaluate(run.model, run.ds, "test", per_cell=True, **run.eval_kw())
            finite = math.isfinite(val.loss) and math.isfinite(test.loss)
        row = self._row(point, state, val if finite else None, test if finite else None, losses, t0=t0)
        if finite:
            self._save_cells(row["cells_seen"], val, test)
        state.branches.append(row)
        state.branch_cells += (point.end - point.stable) * run.cfg.batch_size
        self._write_table(state)
        ends = point == self.points[-1] or row["converged"] or not finite
        if ends:
            self._end_here(point, state, row, losses)
        else:
            snap.restore(run)
        return ends

    def _cooldown(self, point: BranchPoint, flag: StopFlag, snap: Snapshot) -> list[tuple[float, int]]:
        """The branch's steps: (the global batch's mean train loss, its masked positions) each."""
        run = self.run
        pending: list[tuple[torch.Tensor, int, int]] = []
        items = run.batches.iterate(point.stable, point.end - point.stable, pin_memory=run.device.type == "cuda")
        for i, item in enumerate(items):
            lr = lr_at(point.stable + i, total_steps=run.cadence.total_steps, peak=run.peak_lr, cfg=run.cfg,
                       decay_start=point.stable, end=point.end)
            loss, n_local, n_global = train_step(run, item, lr)
            pending.append((loss.detach(), n_local, n_global))
            if i == 0:
                crashpoint("inside-branch")
            signum = flag.signum
            if run.dist.active:
                signum = run.dist.host_max([signum])[0]
            if signum:
                snap.restore(run)
                raise BranchInterrupted(signum)
        local = torch.stack([p[0] for p in pending]).double().cpu().tolist()
        sums = run.dist.all_reduce_sum([m * n for m, (_, n, _) in zip(local, pending)])
        return [(s / n_global, n_global) for s, (_, _, n_global) in zip(sums, pending)]

    def _row(self, point: BranchPoint, state: LoopState, val: EvalResult | None, test: EvalResult | None,
             losses: list[tuple[float, int]], *, t0: float) -> dict[str, Any]:
        """The branch's row of branches.json, a ``BranchRecord`` (validated) kept as the dict the
        loop state checkpoints; ``t0`` is when the branch began."""
        run, cfg, mcfg = self.run, self.run.cfg, self.run.model_cfg
        unit = objectives.loss_unit(mcfg.objective)
        cells = point.end * cfg.batch_size
        val_loss = val.loss if val is not None else None
        before = [b for b in state.branches if b["status"] == "ok"]
        se = self._gain_se(before, cells, val, unit)
        ladder = before + [{"cells_seen": cells, "val_loss": val_loss, "gain_se": se,
                            "val_mse": val.mse if val is not None else None}]
        at, vals = [b["cells_seen"] for b in ladder], [b["val_loss"] for b in ladder]
        gain = gains(at, vals, unit)[-1]
        gene_mean = (run.ds.manifest.get("baselines", {}).get("gene_mean") or {}).get("val")
        hit = ladder_converged_at(ladder, gene_mean, unit=unit, tol=cfg.plateau_tol, patience=cfg.plateau_patience,
                                  min_cells=cfg.plateau_min_cells)
        train_loss = sum(v for v, _ in losses) / max(1, len(losses))
        return BranchRecord.model_validate({
            "run_id": run.run_id, "size": mcfg.name, "params": count_params(mcfg), "seed": run.seed,
            "lr": run.peak_lr, "lr_scale": cfg.lr_scale, "train_cells": run.n_train,
            "depth": float(run.ds.manifest.get("depth_fraction", 1.0)), "objective": mcfg.objective,
            "loss_unit": unit, "step": point.end, "stable_step": point.stable, "cells_seen": cells,
            "stable_cells": point.stable * cfg.batch_size,
            "flops": flops_per_cell(mcfg, mask_prob=cfg.mask_prob)["train"] * cells,
            "val_loss": val_loss, "val_mse": val.mse if val is not None else None,
            "test_loss": test.loss if test is not None else None, "test_mse": test.mse if test is not None else None,
            "cooldown_train_loss": objectives.to_report_units(mcfg.objective, train_loss)
            if math.isfinite(train_loss) else None,
            "gain": gain, "gain_se": se, "converged": hit is not None,
            "status": "ok" if val is not None else "diverged", "wall": time.perf_counter() - t0,
        }).model_dump()

    def _gain_se(self, before: list[dict[str, Any]], cells: int, val: EvalResult | None, unit: str) -> float | None:
        """The standard error of this branch's gain over the validation cells, paired with the branch
        at half its cells (its per-cell sums, RUN_DIR/branches/<cells>.npz); None without one."""
        half = [b for b in before if b["cells_seen"] <= HALF * cells]
        if val is None or val.cells is None or not half:
            return None
        path = self.run.out / BRANCH_CELLS_DIR / f"{half[-1]['cells_seen']}.npz"
        try:
            with np.load(path) as saved:
                earlier = (saved["val_loss"], saved["val_n"])
        except (OSError, KeyError, ValueError):
            return None
        return paired_gain_se(earlier, (val.cells.loss, val.cells.n), unit)

    def _save_cells(self, cells: int, val: EvalResult, test: EvalResult) -> None:
        if self.run.dist.is_main:
            write_cell_sums(self.run.out / BRANCH_CELLS_DIR / f"{cells}.npz", val, test)

    def _write_table(self, state: LoopState) -> None:
        if self.run.dist.is_main:
            atomic_write_json(self.run.out / BRANCH_TABLE, {"branches": state.branches})

    def _end_here(self, point: BranchPoint, state: LoopState, row: dict[str, Any],
                  losses: list[tuple[float, int]]) -> None:
        """The run ends with this branch: its steps, weights and scores are the run's."""
        run = self.run
        state.step, state.decay_start, state.end_step = point.end, point.stable, point.end
        state.masked_tokens += sum(n for _, n in losses)
        state.branch_cells -= (point.end - point.stable) * run.cfg.batch_size  # trained for the run itself
        if row["status"] != "ok":
            state.status, state.diverged_at = "diverged", point.end
            return
        state.best_val, state.best_step = float(row["val_loss"]), point.end
        if run.dist.is_main:
            atomic_write_with(run.best_path, lambda p: save_weights(run.model, p))
