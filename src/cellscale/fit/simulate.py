"""Tables of runs simulated from a known law, for recovery checks and benchmarks.

Noise is multiplicative (log-normal) because loss noise across seeds scales with the loss,
and because it keeps every simulated value positive as the log-space fit requires.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellscale.errors import FitError
from cellscale.fit.laws import LAWS


def simulate_table(law: str, params: dict[str, float], grid: dict[str, np.ndarray], *,
                   noise: float = 0.01, seeds: int = 1, seed: int = 0,
                   y: str = "best_val_mse") -> pd.DataFrame:
    """One row per (configuration, seed): the law's value times exp(noise * N(0, 1)).

    ``grid`` maps x column names (in the law's variable order) to equal-length arrays of
    configurations; ``seeds`` repeats each configuration, like training seeds do.
    """
    law_obj = LAWS[law]
    missing = set(law_obj.param_names) - set(params)
    if missing:
        raise FitError(f"simulate_table: missing parameters {sorted(missing)} for '{law}'")
    theta = np.array([params[n] for n in law_obj.param_names], dtype=float)
    cols = list(grid)
    X = np.column_stack([np.asarray(grid[c], float) for c in cols])
    X = np.repeat(X, seeds, axis=0)
    rng = np.random.default_rng(seed)
    clean = law_obj.predict(theta, X)
    frame = pd.DataFrame(X, columns=cols)
    frame["seed"] = np.tile(np.arange(seeds), X.shape[0] // seeds)
    frame[y] = clean * np.exp(noise * rng.standard_normal(clean.size))
    frame["status"] = "ok"
    return frame


def simulate_branches(law: str, params: dict[str, float], *, sizes: dict[str, float], cells: np.ndarray,
                      train_cells: float | dict[str, float] = 1e9, noise: float = 0.005, run_noise: float = 0.01,
                      seeds: int = 1, seed: int = 0, y: str = "test_loss") -> pd.DataFrame:
    """A branches.csv-like table from a known joint law: one run per (size, seed), one row per point
    of ``cells`` (cells seen) of each. A run's points share one log-normal offset (``run_noise``: a
    run that learned faster stays lower at every point, as real cooldown branches of one run do),
    and each point has its own (``noise``). ``train_cells``: every run's unique training cells, or
    one per size (``data-constrained`` reads it)."""
    law_obj = LAWS[law]
    theta = np.array([params[n] for n in law_obj.param_names], dtype=float)
    rng = np.random.default_rng(seed)
    rows = []
    for name, n in sizes.items():
        u = float(train_cells[name] if isinstance(train_cells, dict) else train_cells)
        for s in range(seeds):
            X = np.column_stack([np.full(len(cells), n), np.asarray(cells, float), np.full(len(cells), u)])
            clean = law_obj.predict(theta, X[:, : law_obj.n_vars])
            value = clean * np.exp(run_noise * rng.standard_normal() + noise * rng.standard_normal(len(cells)))
            rows += [{"run_id": f"{name}-s{s}", "size": name, "params": float(n), "seed": s, "train_cells": u,
                      "cells_seen": float(c), y: float(v), "status": "ok", "loss_unit": "mse", "objective": "mse"}
                     for c, v in zip(cells, value)]
    return pd.DataFrame(rows)
