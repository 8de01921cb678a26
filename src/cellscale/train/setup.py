"""Everything a run needs before its first step: model, optimiser, loss, batches, cadence, and
the loop state, fresh or resumed from the run's checkpoint."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellscale.config import ModelConfig, TrainConfig
from cellscale.data.loader import RankBatches
from cellscale.data.store import Dataset
from cellscale.model import CellTransformer
from cellscale.rules import objectives
from cellscale.rules.schedule import resolve_lr
from cellscale.runtime.checkpoint import clean_stale, find_checkpoint, load_checkpoint
from cellscale.runtime.distributed import DistContext
from cellscale.train.ema import WeightAverage
from cellscale.train.rundir import truncate_lines
from cellscale.train.settings import autocast_for, make_optimizer


@dataclass
class LoopState:
    """What the loop carries from step to step; a checkpoint stores it (``state.json``)."""

    step: int = 0
    best_val: float = math.inf
    best_step: int = -1
    metric_lines: int = 0
    masked_tokens: int = 0
    wall: float = 0.0  # seconds of training before this process's part of the run
    run_loss: float = 0.0  # sum and count of the train losses since the last train log line
    run_n: int = 0
    last_loss: float | None = None  # the newest train loss read from the device
    status: str = "running"
    diverged_at: int | None = None
    resumes: list[int] = field(default_factory=list)
    evals: list[list[float]] = field(default_factory=list)  # [cells seen, validation loss] per eval
    # the step the run's own cooldown began and the step it ends (None: the cadence's maximum)
    decay_start: int | None = None
    end_step: int | None = None
    # the plateau budget's cooldown branches (cellscale.train.branches): one row per branch point,
    # and the cells trained in branches that were not the run's own end
    branches: list[dict[str, Any]] = field(default_factory=list)
    branch_cells: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> LoopState:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


@dataclass(frozen=True)
class Cadence:
    """When the loop logs, validates and checkpoints: every ``*_every`` steps and at the end."""

    total_steps: int
    log_every: int
    eval_every: int
    ckpt_every: int

    @classmethod
    def of(cls, cfg: TrainConfig) -> Cadence:
        total = max(1, math.ceil(cfg.cells_seen / cfg.batch_size))
        # a plateau run's points are its cooldown branches: its evaluations draw the curve between them
        eval_every = cfg.eval_every or max(1, total // 10)
        return cls(total_steps=total, log_every=max(1, min(eval_every, total // 50 or 1)),
                   eval_every=eval_every, ckpt_every=cfg.checkpoint_every or eval_every)

    def due(self, every: int, step: int, end: int | None = None) -> bool:
        return step % every == 0 or step == (end or self.total_steps)

    def any_due(self, step: int, end: int | None = None) -> bool:
        return any(self.due(e, step, end) for e in (self.log_every, self.eval_every, self.ckpt_every))


class _LossOf(torch.nn.Module):
    """The model's mean masked loss as a module's forward, so that DistributedDataParallel
    wraps the loss itself (its gradient hooks are armed by the wrapper's forward)."""

    def __init__(self, model: CellTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, values: torch.Tensor, mask: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        return self.model.loss(values, mask, **kw)


@dataclass
class Run:
    """One run's parts, built once by :func:`build_run`."""

    ds: Dataset
    model_cfg: ModelConfig
    cfg: TrainConfig
    model: CellTransformer
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[..., torch.Tensor]  # (values, mask, **counts) -> this rank's mean loss
    batches: RankBatches
    cadence: Cadence
    peak_lr: float
    device: torch.device
    dist: DistContext
    autocast: Callable
    out: Path
    seed: int
    n_train: int
    run_id: str
    ema: WeightAverage | None = None  # train.ema_decay: the weights that are evaluated

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoint"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def best_path(self) -> Path:
        return self.out / "best.safetensors"

    def eval_kw(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "device": self.device, "autocast": self.autocast, "dist": self.dist}


def _loss_fn(model: CellTransformer, cfg: TrainConfig, dist: DistContext, device: torch.device) -> Callable:
    if not dist.active:
        return torch.compile(model.loss) if cfg.compile else model.loss
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(_LossOf(model), device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(ddp) if cfg.compile else ddp


def build_run(ds: Dataset, model_cfg: ModelConfig, cfg: TrainConfig, *, out: Path, train_cells: int | None,
              seed: int, n_train: int, run_id: str, device: torch.device, dist: DistContext) -> Run:
    torch.manual_seed(seed)
    model = CellTransformer(model_cfg).to(device)
    if dist.rank > 0:
        # an independent dropout stream per rank; rank 0 keeps the single-process stream
        torch.manual_seed(int(np.random.SeedSequence([seed, dist.rank]).generate_state(1)[0]))
    peak_lr = resolve_lr(model_cfg, cfg)
    optimizer = make_optimizer(model, cfg, peak_lr)
    batches = RankBatches(ds, world_size=dist.world_size, rank=dist.rank, train_cells=train_cells,
                          batch_size=cfg.batch_size, seed=seed, mask_prob=cfg.mask_prob,
                          with_counts=objectives.needs_counts(model_cfg.objective))
    return Run(ds=ds, model_cfg=model_cfg, cfg=cfg, model=model, optimizer=optimizer,
               loss_fn=_loss_fn(model, cfg, dist, device), batches=batches, cadence=Cadence.of(cfg),
               peak_lr=peak_lr, device=device, dist=dist, autocast=autocast_for(device, cfg.precision),
               out=out, seed=seed, n_train=n_train, run_id=run_id,
               ema=WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None)


def resume(run: Run) -> LoopState:
    """The loop state of the run's newest checkpoint (model, optimiser and RNG restored with it),
    or a fresh one; the metrics log is cut back to match."""
    found = find_checkpoint(run.ckpt_dir)
    main = run.dist.is_main
    if main:
        clean_stale(run.ckpt_dir)  # temp dirs of checkpoint writes a kill interrupted
    if found is None:
        if main and run.metrics_path.exists():
            run.metrics_path.unlink()
        return LoopState()
    extras: dict[str, torch.Tensor] = {}
    saved = load_checkpoint(found, model=run.model, optimizer=run.optimizer, rank=run.dist.rank, extras_out=extras)
    if run.ema is not None:
        run.ema.load(extras)  # the identity hash holds ema_decay: a checkpoint of this run has them
    state = LoopState.from_json(saved)
    state.status = "running"  # a checkpoint saved on a stop signal says "interrupted"
    state.resumes.append(state.step)
    if main:
        truncate_lines(run.metrics_path, state.metric_lines)
    return state
