"""The learning rate of a run: its peak (``resolve_lr``), its schedule (``lr_at``), where a
plateau-budget run takes its cooldown branches (``plan_points``), and the words that describe them
(``lr_rule_text``, ``schedule_text``).

Torch-free, so that the trainer and the report's methods paragraph use the same functions: the
text is written next to the formula it describes, and its worked numbers come from the formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cellscale.config import ModelConfig, TrainConfig


def resolve_lr(model_cfg: ModelConfig, train_cfg: TrainConfig) -> float:
    """Peak learning rate. "auto" shrinks with width (wider models need smaller steps, the
    reason one rate for all sizes under-trained the study's large models) and grows with batch."""
    if train_cfg.lr == "auto":
        lr = train_cfg.lr_base * 64.0 / model_cfg.d_model
        lr = min(max(lr, train_cfg.lr_min), train_cfg.lr_max)
    else:
        lr = float(train_cfg.lr)
    return lr * _batch_factor(train_cfg) * train_cfg.lr_scale


def _batch_factor(cfg: TrainConfig) -> float:
    ratio = cfg.batch_size / cfg.lr_batch_ref
    return {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[cfg.lr_batch_scaling]


def lr_at(step: int, *, total_steps: int, peak: float, cfg: TrainConfig, decay_start: int | None = None,
          end: int | None = None) -> float:
    """The rate of ``step``. Budget "fixed": linear warmup then ``cfg.schedule`` over
    ``total_steps``. Budget "plateau" (warmup-stable-decay): linear warmup over warmup_frac of
    the maximum ``total_steps``, the peak until ``decay_start`` (None: not decided yet), then a
    linear decay to final_lr_frac x peak at ``end`` (the run's planned end; default the maximum)."""
    warmup = warmup_steps(cfg, total_steps)
    if cfg.budget == "plateau":
        return _wsd(step, warmup=warmup, decay_start=decay_start, end=end or total_steps, peak=peak, cfg=cfg)
    if cfg.schedule == "constant":
        return peak
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    floor = cfg.final_lr_frac * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """The warmup's length in steps: ``warmup_cells`` when set, else ``warmup_frac`` of ``total_steps``."""
    if cfg.warmup_cells:
        return math.ceil(cfg.warmup_cells / cfg.batch_size)
    return int(cfg.warmup_frac * total_steps)


def _wsd(step: int, *, warmup: int, decay_start: int | None, end: int, peak: float, cfg: TrainConfig) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if decay_start is None or step < decay_start:
        return peak
    floor = cfg.final_lr_frac * peak
    progress = min(1.0, (step - decay_start + 1) / max(1, end - decay_start))
    return peak + (floor - peak) * cooldown_share(progress, cfg.cooldown_shape)


def cooldown_share(progress: float, shape: str) -> float:
    """How far a cooldown has taken the rate from the peak towards its final value, at ``progress``
    (0 to 1) of the cooldown's steps: "linear" in proportion; "1-sqrt" as the square root, so that the
    rate falls fast at first and slowly at the end (Hagele et al. 2024)."""
    return progress if shape == "linear" else math.sqrt(progress)


def cooldown_steps(stable_steps: int, cfg: TrainConfig) -> int:
    """A cooldown's length after ``stable_steps`` steps: ``cooldown_frac`` of them, at least one."""
    return max(1, math.ceil(cfg.cooldown_frac * stable_steps))


@dataclass(frozen=True)
class BranchPoint:
    """A cooldown branch: it leaves the stable phase at step ``stable`` and cools down until ``end``."""

    stable: int  # the stable-phase step it branches from
    end: int  # the step its cooldown ends at: cells seen = end x batch size


def plan_points(total_steps: int, *, batch_size: int, cooldown_frac: float, warmup: int,
                min_cells: int = 0, every: float = 2.0) -> tuple[BranchPoint, ...]:
    """Where a plateau-budget run takes its cooldown branches (``cellscale.train.branches``), for a
    run of at most ``total_steps`` steps, in order: cooldowns ending at total / every^j steps (j = 0,
    1, ...; ``every`` 2: at every doubling), each starting at 1 / (1 + cooldown_frac) of its end, for as
    long as that start is past the ``warmup`` steps and the end reaches ``min_cells`` cells seen."""
    points: list[BranchPoint] = []
    j = 0
    while True:
        end = round(total_steps / every**j)
        stable = math.floor(end / (1.0 + cooldown_frac))
        if end * batch_size < min_cells or stable < max(1, warmup) or stable >= end:
            break
        if points and end >= points[-1].end:
            break
        points.append(BranchPoint(stable=stable, end=end))
        j += 1
    if not points:  # a maximum too short for any: the run's own cooldown is its one branch
        stable = min(total_steps - 1, max(1, math.floor(total_steps / (1.0 + cooldown_frac))))
        points.append(BranchPoint(stable=max(0, stable), end=total_steps))
    return tuple(reversed(points))


def run_branch_points(cfg: TrainConfig) -> tuple[BranchPoint, ...]:
    """The branch points of a plateau-budget run under ``cfg`` (none for a fixed budget)."""
    if cfg.budget != "plateau":
        return ()
    total = max(1, math.ceil(cfg.cells_seen / cfg.batch_size))
    return plan_points(total, batch_size=cfg.batch_size, cooldown_frac=cfg.cooldown_frac,
                       warmup=warmup_steps(cfg, total), min_cells=cfg.branch_min_cells, every=cfg.branch_every)


def _num(x: float) -> str:
    return f"{x:.3g}"


def lr_rule_text(cfg: TrainConfig) -> str:
    """How ``resolve_lr`` sets the peak rate under ``cfg``, in words."""
    if cfg.lr == "auto":
        text = (f"peak learning rate per size {_num(cfg.lr_base)} x 64 / d_model, clipped to "
                f"[{_num(cfg.lr_min)}, {_num(cfg.lr_max)}]")
    else:
        text = f"peak learning rate {_num(float(cfg.lr))} for every size"
    if cfg.lr_batch_scaling == "sqrt":
        text += f", times sqrt(batch / {cfg.lr_batch_ref})"
    elif cfg.lr_batch_scaling == "linear":
        text += f", times batch / {cfg.lr_batch_ref}"
    factor = _batch_factor(cfg)
    if factor != 1.0:
        text += f" (x{_num(factor)} at batch {cfg.batch_size})"
    if cfg.lr_scale != 1.0:
        text += f", times {_num(cfg.lr_scale)}"
    return text


def lr_grid_text(multipliers: list[float], *, first_seed: int | None = None) -> str:
    """The learning-rate axis in words ("" without one); ``first_seed``: the rate was searched on
    that seed alone and the others trained at its choice (``sweep.lr_search: first-seed``)."""
    if len(multipliers) < 2:
        return ""
    grid = ", ".join(f"{_num(m)}x" for m in sorted(multipliers))
    if first_seed is None:
        return (f"; each size was trained at {grid} that rate and the law fitted to the multiple with the lowest mean "
                "validation loss per size (test loss never used for the choice; a choice on the first or last "
                "multiple of three or more is flagged as at the edge of the grid)")
    return (f"; each size was trained with seed {first_seed} at {grid} that rate, the multiple with the lowest "
            f"validation loss chosen per size, and the other seeds trained at the chosen multiple only (so the choice "
            "rests on one seed; test loss never used for it; a choice on the first or last multiple of three or more "
            "is flagged as at the edge of the grid); the law is fitted to the chosen multiple's runs")


def schedule_text(cfg: TrainConfig) -> str:
    """The shape ``lr_at`` gives the rate under ``cfg``, in words."""
    warm = f"linear warm-up over the first {_num(100 * cfg.warmup_frac)}% of steps"
    if cfg.warmup_cells:
        warm = f"linear warm-up over the first {cfg.warmup_cells:,} cells seen"
    floor = f"{_num(100 * cfg.final_lr_frac)}% of the peak"
    if cfg.budget == "plateau":
        shape = "linear" if cfg.cooldown_shape == "linear" else "1-sqrt (the rate falls as the square root of its progress)"
        return (f"{warm} of the maximum, then the peak rate, with cooldown branches taken off it; the run's own "
                f"end is its last branch: a {shape} cooldown to {floor} over {_num(100 * cfg.cooldown_frac)}% of "
                "the steps before it")
    if cfg.schedule == "constant":
        return "a constant learning rate (the seed study's schedule)"
    return f"{warm}, then cosine decay to {floor}"


def warm_decay(decay: float, updates: int) -> float:
    """The weight average's decay at update number ``updates`` (1-based; ``cellscale.train.ema``):
    short early, so that the random initial weights fade fast."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def averaging_text(decay: float | None) -> str:
    """What the runs evaluated (``train.ema_decay``, ``cellscale.train.ema``), in words ("" without it)."""
    if not decay:
        return ""
    horizon = 1.0 / (1.0 - decay)
    return (f"; every evaluation, the choice of each run's best checkpoint, its test score and the plateau "
            f"criterion used an exponential moving average of the weights (decay {_num(decay)}, about the last "
            f"{horizon:,.0f} steps; warmed up as min(decay, (1 + t) / (10 + t)) after t steps), not the raw weights")
