"""Turn a results table into validated arrays, or a one-line FitError saying what to fix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellscale.errors import FitError


@dataclass(frozen=True)
class FitData:
    X: np.ndarray  # (n, m) positive
    y: np.ndarray  # (n,) positive
    weights: np.ndarray  # (n,) user weights, ones unless given
    groups: np.ndarray  # (n,) resampling unit of each row, 0..G-1
    frame: pd.DataFrame  # the fitted rows, for columns the fit itself does not use

    @property
    def logX(self) -> np.ndarray:
        return np.log(self.X)

    @property
    def logy(self) -> np.ndarray:
        return np.log(self.y)

    @property
    def n(self) -> int:
        return int(self.y.size)

    def subset(self, keep: np.ndarray) -> "FitData":
        _, groups = np.unique(self.groups[keep], return_inverse=True)
        return FitData(self.X[keep], self.y[keep], self.weights[keep], groups, self.frame.iloc[np.flatnonzero(keep)])


def finished_mask(df: pd.DataFrame) -> np.ndarray:
    """Which rows of ``df`` are fitted: those with status == "ok" where the table has a status
    column, every row otherwise (one rule for ``prepare`` and for arrays aligned with the table's
    rows, such as ``fit_table``'s ``cell_draws``)."""
    if "status" not in df.columns:
        return np.ones(len(df), dtype=bool)
    return (df["status"].astype(str) == "ok").to_numpy()


def n_distinct_rows(X: np.ndarray) -> int:
    return int(np.unique(X, axis=0).shape[0])


def _numeric(frame: pd.DataFrame, col: str, n_all: int) -> np.ndarray:
    values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values)
    if bad.any():
        raise FitError(
            f"column '{col}' has NaN, inf or non-numeric values in {int(bad.sum())} of {n_all} "
            "finished runs; drop or fix those rows"
        )
    if (values <= 0).any():
        raise FitError(
            f"column '{col}' has non-positive values (min {values.min():g}); scaling laws are "
            "fitted in log space, so every value must be > 0"
        )
    return values


def prepare(
    df: pd.DataFrame,
    *,
    law_name: str,
    n_params: int,
    variables: tuple[str, ...],
    x: list[str],
    y: str,
    groups: list[str] | None,
    weights: str | None,
) -> FitData:
    if len(x) != len(variables):
        names = ", ".join(variables)
        raise FitError(
            f"law '{law_name}' needs {len(variables)} x column(s) ({names}), got {len(x)}: "
            f"pass them with --x COL[,COL]"
        )
    if y in x:
        raise FitError(f"column '{y}' is both x and y; choose a different --y")
    needed = list(dict.fromkeys([*x, y, *(groups or []), *([weights] if weights else [])]))
    for col in needed:
        if col not in df.columns:
            shown = ", ".join(map(str, df.columns[:12])) + (", ..." if len(df.columns) > 12 else "")
            raise FitError(f"column '{col}' not in the table (columns: {shown}); name it with --x/--y")
    frame = df[finished_mask(df)]
    if len(frame) == 0:
        raise FitError(
            "no finished runs in the table (no row with status == 'ok'); "
            "wait for runs to finish or look at their 'error' column"
        )
    frame = frame.reset_index(drop=True)
    n_all = len(frame)
    X = np.column_stack([_numeric(frame, col, n_all) for col in x])
    yv = _numeric(frame, y, n_all)
    w = _numeric(frame, weights, n_all) if weights else np.ones(n_all)
    for j, col in enumerate(x):
        if np.ptp(X[:, j]) == 0:
            raise FitError(
                f"column '{col}' is constant (all {X[0, j]:g}); a scaling law needs at least "
                "two different values"
            )
    if np.ptp(yv) == 0:
        raise FitError(f"column '{y}' is constant (all {yv[0]:g}); there is nothing to fit")
    distinct = n_distinct_rows(X)
    if distinct < n_params:
        raise FitError(
            f"'{law_name}' has {n_params} parameters but the table has {distinct} distinct "
            f"configuration(s) of {', '.join(x)}; run at least {n_params} different sizes"
        )
    group_cols = list(groups) if groups is not None else list(x)
    if group_cols:
        keys = frame[group_cols].astype(str).agg("\x1f".join, axis=1)
        _, gid = np.unique(keys.to_numpy(), return_inverse=True)
    else:
        gid = np.arange(n_all)
    return FitData(X=X, y=yv, weights=w, groups=gid.astype(int), frame=frame)
