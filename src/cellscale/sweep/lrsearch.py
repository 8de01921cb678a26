"""The learning-rate search across seeds (``sweep.lr_search``).

"every-seed" trains every seed at every multiple of ``sweep.lr_multipliers``. "first-seed"
trains the first seed of ``sweep.seeds`` at every multiple, chooses each group's multiple (size,
training subset, depth) on those runs' validation losses with the report's own rule and loss
column (``cellscale.rules.lrgrid``), and then trains the other seeds at that multiple only.

A group's choice is made once every one of its first-seed runs has finished (ok or diverged, which
no rerun changes), so a rerun makes the same choice; while one of them has failed (a rerun retries
it) its later seeds wait. A group whose first-seed runs all diverged has nothing to choose from and
trains its later seeds at every multiple.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pandas as pd

from cellscale.config import StudyConfig
from cellscale.rules.lrgrid import loss_column, select_lr
from cellscale.schema import FINISHED
from cellscale.sweep.plan import RunSpec

Group = tuple[str, int | None, float]


def searches_first_seed(cfg: StudyConfig) -> bool:
    s = cfg.sweep
    return s.lr_search == "first-seed" and len(s.lr_multipliers) > 1 and len(s.seeds) > 1


def _group(spec: RunSpec) -> Group:
    return spec.size, spec.train_cells, float(spec.depth)


def search_runs(cfg: StudyConfig, specs: Sequence[RunSpec]) -> list[RunSpec]:
    """The runs trained before any rate is chosen: all of them, or the first seed's."""
    if not searches_first_seed(cfg):
        return list(specs)
    return [s for s in specs if s.seed == cfg.sweep.seeds[0]]


def planned_count(cfg: StudyConfig, specs: Sequence[RunSpec]) -> int:
    """How many runs the sweep trains in all (known before any is trained)."""
    if not searches_first_seed(cfg):
        return len(specs)
    return len(search_runs(cfg, specs)) + len({_group(s) for s in specs}) * (len(cfg.sweep.seeds) - 1)


def _rows(specs: Sequence[RunSpec], results: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The first seed's ok results as select_lr reads them, grouped by their specs (a result's
    ``train_cells`` is the count trained on, not the spec's None for all)."""
    by_id = {s.run_id: s for s in specs}
    rows = [{"run_id": r["run_id"], "size": spec.size, "train_cells": str(spec.train_cells), "depth": spec.depth,
             "seed": spec.seed, "lr_scale": spec.train.lr_scale, "objective": spec.model.objective,
             "best_val_mse": r.get("best_val_mse"), "best_val_loss": r.get("best_val_loss")}
            for r in results if r.get("status") == "ok" and (spec := by_id.get(str(r.get("run_id")))) is not None]
    frame = pd.DataFrame(rows)
    for col in ("best_val_mse", "best_val_loss"):
        if col in frame:
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


def chosen_scales(specs: Sequence[RunSpec], results: Sequence[dict[str, Any]]) -> dict[Group, float]:
    """{group: the chosen run's lr_scale} from the first seed's ok results."""
    frame = _rows(specs, results)
    if frame.empty:
        return {}
    groups = {(s.size, str(s.train_cells), float(s.depth)): _group(s) for s in specs}
    choices = select_lr(frame, loss_col=loss_column(frame)).choices
    return {groups[(c.size, str(c.train_cells), c.depth)]: c.best for c in choices}


def _settled(cfg: StudyConfig, specs: Sequence[RunSpec], results: Sequence[dict[str, Any]]) -> set[Group]:
    """The groups whose first-seed runs have all finished for good."""
    final = {str(r.get("run_id")) for r in results if r.get("status") in FINISHED}
    first = [s for s in specs if s.seed == cfg.sweep.seeds[0]]
    open_groups = {_group(s) for s in first if s.run_id not in final}
    return {_group(s) for s in first} - open_groups


def later_runs(cfg: StudyConfig, specs: Sequence[RunSpec], results: Sequence[dict[str, Any]]) -> list[RunSpec]:
    """The other seeds' runs of each settled group: at its chosen rate, at every rate where it has
    nothing to choose from (no ok run, or a single one: that one's rate)."""
    if not searches_first_seed(cfg):
        return []
    settled, chosen = _settled(cfg, specs, results), chosen_scales(specs, results)
    ok = {str(r.get("run_id")) for r in results if r.get("status") == "ok"}
    ok_specs = [s for s in specs if s.run_id in ok]
    counts = Counter(_group(s) for s in ok_specs)
    single = {_group(s): s.train.lr_scale for s in ok_specs if counts[_group(s)] == 1}
    out = []
    for spec in specs:
        group = _group(spec)
        if spec.seed == cfg.sweep.seeds[0] or group not in settled:
            continue
        best = chosen.get(group, single.get(group))
        if best is None or math.isclose(spec.train.lr_scale, best, rel_tol=1e-9):
            out.append(spec)
    return out


def waiting_groups(cfg: StudyConfig, specs: Sequence[RunSpec], results: Sequence[dict[str, Any]]) -> list[str]:
    """The sizes whose later seeds wait for a first-seed run that failed."""
    if not searches_first_seed(cfg):
        return []
    settled = _settled(cfg, specs, results)
    return sorted({s.size for s in specs if _group(s) not in settled})
