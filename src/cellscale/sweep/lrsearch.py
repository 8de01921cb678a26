"""The learning-rate search across seeds (``sweep.lr_search``).

"every-seed" trains every seed at every multiple of ``sweep.lr_multipliers``. "first-seed"
trains the first seed of ``sweep.seeds`` at every multiple, chooses each group's multiple (size,
training subset, depth) on those runs' validation losses with the report's own rule
(``cellscale.lrgrid.select_lr``), and then trains the other seeds at that multiple only. A group
whose first-seed runs left no choice (fewer than two finished ok) trains its other seeds at every
multiple. The choice is read again from the finished runs on every rerun, so a resumed sweep
trains the same later runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from cellscale.config import RunConfig
from cellscale.lrgrid import select_lr
from cellscale.sweep.plan import RunSpec

Group = tuple[str, int | None, float]


def searches_first_seed(cfg: RunConfig) -> bool:
    s = cfg.sweep
    return s.lr_search == "first-seed" and len(s.lr_multipliers) > 1 and len(s.seeds) > 1


def _group(spec: RunSpec) -> Group:
    return spec.size, spec.train_cells, float(spec.depth)


def search_runs(cfg: RunConfig, specs: Sequence[RunSpec]) -> list[RunSpec]:
    """The runs trained before any rate is chosen: all of them, or the first seed's."""
    if not searches_first_seed(cfg):
        return list(specs)
    return [s for s in specs if s.seed == cfg.sweep.seeds[0]]


def planned_count(cfg: RunConfig, specs: Sequence[RunSpec]) -> int:
    """How many runs the sweep trains in all (known before any is trained)."""
    if not searches_first_seed(cfg):
        return len(specs)
    return len(search_runs(cfg, specs)) + len({_group(s) for s in specs}) * (len(cfg.sweep.seeds) - 1)


def chosen_scales(specs: Sequence[RunSpec], results: Sequence[dict[str, Any]]) -> dict[Group, float]:
    """{group: the chosen run's lr_scale} from the first seed's finished results, grouped by their
    specs (a result's ``train_cells`` is the count trained on, not the spec's None for all)."""
    by_id = {s.run_id: s for s in specs}
    rows = [{"run_id": r["run_id"], "size": spec.size, "train_cells": str(spec.train_cells), "depth": spec.depth,
             "seed": spec.seed, "lr_scale": spec.train.lr_scale, "best_val_mse": r.get("best_val_mse")}
            for r in results if r.get("status") == "ok" and (spec := by_id.get(str(r.get("run_id")))) is not None]
    if not rows:
        return {}
    groups = {(s.size, str(s.train_cells), float(s.depth)): _group(s) for s in specs}
    return {groups[(c.size, str(c.train_cells), c.depth)]: c.best for c in select_lr(pd.DataFrame(rows)).choices}


def later_runs(cfg: RunConfig, specs: Sequence[RunSpec], results: Sequence[dict[str, Any]]) -> list[RunSpec]:
    """The other seeds' runs: at each group's chosen rate, or at every rate where none was chosen."""
    if not searches_first_seed(cfg):
        return []
    chosen = chosen_scales(specs, results)
    out = []
    for spec in specs:
        if spec.seed == cfg.sweep.seeds[0]:
            continue
        best = chosen.get(_group(spec))
        if best is None or math.isclose(spec.train.lr_scale, best, rel_tol=1e-9):
            out.append(spec)
    return out
