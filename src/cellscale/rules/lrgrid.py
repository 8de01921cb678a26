"""The learning-rate axis of a sweep: each size is trained at several multiples of its rule's
peak rate (``sweep.lr_multipliers``), and the law is fitted to the best rate's runs only.

The choice is made on validation loss alone (the mean over seeds of each run's best validation
loss), per size, training subset and depth; test loss is never looked at. The multiples are
compared on the seeds they all have: every seed for a full grid, the first seed alone when the
later seeds trained at the chosen multiple only (``sweep.lr_search: first-seed``). A choice on the first
or last multiple of a grid of three or more is flagged: the best rate may lie beyond the grid,
as a floor on the edge of its bounds may (``floor_at_boundary``).

pandas only, so the report and the fit's callers use the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

GROUP = ("size", "train_cells", "depth")


@dataclass(frozen=True)
class LRChoice:
    """One group's learning-rate grid: the mean validation loss per multiple, and the choice."""

    size: str
    train_cells: float | None
    depth: float
    losses: dict[float, float]  # multiple -> mean best validation loss over seeds
    best: float
    at_edge: bool


@dataclass
class LRSelection:
    kept: pd.DataFrame  # the rows at each group's chosen multiple (every row without a grid)
    dropped: list[str] = field(default_factory=list)  # run ids at other multiples
    choices: list[LRChoice] = field(default_factory=list)  # groups with two or more multiples

    @property
    def at_edge(self) -> list[LRChoice]:
        return [c for c in self.choices if c.at_edge]


def _keys(runs: pd.DataFrame) -> list[str]:
    return [c for c in GROUP if c in runs]


# the column that makes the choices (validation), and the one that made none (test), by loss unit
CHOICE_COLUMN = {"mse": "best_val_mse", "bits": "best_val_loss"}
FITTED_COLUMN = {"mse": "test_mse", "bits": "test_loss"}


def loss_unit(runs: pd.DataFrame) -> str:
    """"bits" when any run has a likelihood objective (its losses are bits per masked gene), else "mse"."""
    likelihood = "objective" in runs and runs["objective"].fillna("mse").ne("mse").any()
    return "bits" if likelihood else "mse"


def loss_column(runs: pd.DataFrame) -> str:
    """The results column a sweep's choices are made on (its rates, its best size): the validation
    MSE, or ``best_val_loss`` (bits) when any run has a likelihood objective."""
    return CHOICE_COLUMN[loss_unit(runs)]


def fitted_column(runs: pd.DataFrame) -> str:
    """The results column a law is fitted to and a loss is reported in: the test loss at the
    validation-chosen checkpoint and rate, which chose nothing (a validation loss that chose the
    checkpoint, the rate and the stop is biased low; docs/intervals.md, "Points that chose
    nothing"). A table without a finite test loss on every finished row (one written by hand, or
    by another tool) is fitted on its validation column."""
    col = FITTED_COLUMN[loss_unit(runs)]
    ok = runs[runs["status"].astype(str) == "ok"] if "status" in runs else runs
    if col in ok and len(ok) and pd.to_numeric(ok[col], errors="coerce").notna().all():
        return col
    return loss_column(runs)


def _on_common_seeds(group: pd.DataFrame, loss_col: str) -> pd.DataFrame:
    """The rows of the seeds every multiple of ``group`` has a loss for (all rows when that is none)."""
    if "seed" not in group:
        return group
    scored = group[pd.to_numeric(group[loss_col], errors="coerce").notna()]
    seeds = [set(s) for _, s in scored.groupby("lr_scale")["seed"]]
    common = set.intersection(*seeds) if seeds else set()
    return group[group["seed"].isin(common)] if common else group


def select_lr(runs: pd.DataFrame, *, loss_col: str = "best_val_mse") -> LRSelection:
    """The best multiple of each group's grid, chosen on ``loss_col`` (a validation column)."""
    if not loss_col.startswith("best_val"):
        raise ValueError(f"the learning rate is chosen on validation loss, not on '{loss_col}'")
    if "lr_scale" not in runs or runs.empty:
        return LRSelection(kept=runs)
    frame = runs.assign(lr_scale=pd.to_numeric(runs["lr_scale"], errors="coerce").fillna(1.0))
    keys = _keys(frame)
    keep = pd.Series(True, index=frame.index)
    out = LRSelection(kept=frame)
    for key, group in frame.groupby(keys, dropna=False, sort=False):
        means = _on_common_seeds(group, loss_col).groupby("lr_scale")[loss_col].mean().dropna()
        if len(means) < 2:
            continue
        best = float(means.idxmin())
        grid = sorted(means.index)
        values = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        out.choices.append(LRChoice(
            size=str(values.get("size")), train_cells=values.get("train_cells"), depth=float(values.get("depth", 1.0)),
            losses={float(m): float(v) for m, v in means.items()}, best=best,
            at_edge=len(grid) >= 3 and best in (grid[0], grid[-1])))
        keep[group.index] = group["lr_scale"] == best
    out.kept = frame[keep]
    out.dropped = frame.loc[~keep, "run_id"].astype(str).tolist()
    return out
