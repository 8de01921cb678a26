"""The report's fits: the configured law on the finished runs (``run_fit``), one fit per
sequencing depth (``run_depth_fits``), and the fit.json they make. A fit problem never raises:
it becomes the outcome's ``error``, stated in the report."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import cellscale.fit  # called as cellscale.fit.fit_table, so that a test may stand in for it
from cellscale.config import FitConfig, depth_label
from cellscale.errors import FitError
from cellscale.fit.cells import CellDraws, CellsMissing, NotResampled, sweep_cell_draws
from cellscale.fit.core import fitted_unit
from cellscale.fit.result import FitResult
from cellscale.report import plots
from cellscale.report.fmt import fmt_int
from cellscale.report.records import SweepData
from cellscale.rules.lrgrid import fitted_column, loss_column, select_lr

# laws of model size alone: runs of different training-set sizes must not be mixed in them
ONE_D_LAWS = {"power", "power-floor"}


@dataclass
class FitOutcome:
    law: str
    method: str
    result: FitResult | None = None  # when the fit succeeded
    data: dict[str, Any] | None = None  # FitResult.to_dict()
    error: str | None = None
    note: str | None = None  # which runs were used, when not all finished ones
    used: pd.DataFrame | None = None
    curve: plots.Curve | None = None  # the law against parameters, for one-variable laws
    curve_error: str | None = None

    @property
    def record(self) -> dict[str, Any]:
        """The fit's fit.json object: ``to_dict()``, or why there is none."""
        if self.data is not None:
            return self.data
        return {"law": self.law, "method": self.method, "error": self.error,
                "n_points": 0 if self.used is None else int(len(self.used))}


def headline_depth(runs: pd.DataFrame) -> float | None:
    """The depth the headline fit uses when the ok runs span several: 1.0, else the largest;
    None when there is a single depth (or no depth column)."""
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    if "depth" not in ok or ok["depth"].nunique() < 2:
        return None
    depths = pd.to_numeric(ok["depth"], errors="coerce").dropna()
    return 1.0 if (depths == 1.0).any() else float(depths.max())


fitted_loss_column = fitted_column  # the one rule (cellscale.rules.lrgrid), under the report's name


def _and(note: str | None, more: str) -> str:
    return ((note + "; ") if note else "") + more


def _usable(ok: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    y = fitted_loss_column(ok)
    lowest = lowest_of(ok)
    usable = np.isfinite(ok[y]) & (ok[y] > lowest) & np.isfinite(ok["params"]) & (ok["params"] > 0)
    if usable.all():
        return ok, None
    return ok[usable], (f"runs marked ok without a finite loss above {lowest:g} or a positive parameter count "
                        "were left out: " + ", ".join(ok.loc[~usable, "run_id"].astype(str)))


def lowest_of(runs: pd.DataFrame) -> float:
    """The least loss the runs' objective can score in the fitted column's unit (0 but for
    gaussian-nll bits, which may be negative): the laws are fitted to the excess over it
    (``cellscale.fit.core.fitted_unit``, which refuses nothing: the runs may still span depths)."""
    return fitted_unit(runs)[2]


def _headline_only(ok: pd.DataFrame, note: str | None) -> tuple[pd.DataFrame, str | None]:
    head = headline_depth(ok)
    if head is None:
        return ok, note
    # no law here has a depth term: mixing depths would bend the fit
    keep = ok[ok["depth"] == head]
    where = "full depth (1)" if head == 1.0 else f"the largest depth, {head:g}"
    return keep, _and(note, f"the runs span {ok['depth'].nunique()} sequencing depths, so only the {len(keep)} "
                            f"runs at {where} were fitted here; each depth has its own fit in the depth table")


def _largest_data_only(ok: pd.DataFrame, note: str | None) -> tuple[pd.DataFrame, str | None]:
    tc = ok["train_cells"]
    if tc.isna().any():  # NaN means "all training cells": the largest subset
        keep, label = ok[tc.isna()], "all training cells"
    else:
        keep, label = ok[tc == tc.max()], f"{fmt_int(tc.max())} training cells"
    return keep, _and(note, f"the law depends on model size only, so only the {len(keep)} runs on the largest "
                            f"training set ({label}) were fitted; the others appear in the data figure")


def unconverged_ids(runs: pd.DataFrame) -> list[str]:
    """Run ids whose result says they did not converge (a result without the verdict, from a fixed
    budget or an older cellscale, is not counted: it cannot be judged)."""
    if "converged" not in runs:
        return []
    flag = pd.to_numeric(runs["converged"], errors="coerce")
    return runs.loc[flag == 0, "run_id"].astype(str).tolist()


def _converged_only(ok: pd.DataFrame, note: str | None, keep: bool) -> tuple[pd.DataFrame, str | None]:
    left = unconverged_ids(ok)
    if not left:
        return ok, note
    if keep:
        return ok, _and(note, "fitted although not converged (fit.keep_unconverged): " + ", ".join(left))
    return (ok[~ok["run_id"].astype(str).isin(left)],
            _and(note, "left out as not converged (fit.keep_unconverged: true keeps them): "
                 + ", ".join(left)))


def _best_lr_only(ok: pd.DataFrame, note: str | None) -> tuple[pd.DataFrame, str | None]:
    sel = select_lr(ok, loss_col=loss_column(ok))
    if not sel.choices:
        return ok, note
    note = _and(note, f"fitted to each size's best learning rate on validation loss ({len(sel.dropped)} runs at "
                      "other rates left out)")
    if sel.at_edge:
        note = _and(note, "best rate at the edge of its grid for " + ", ".join(c.size for c in sel.at_edge)
                    + ": a better rate may lie beyond it")
    return sel.kept, note


def fit_subset(runs: pd.DataFrame, law: str, full_train: float | None = None, *,
               keep_unconverged: bool = False) -> tuple[pd.DataFrame, str | None]:
    """The runs the law is fitted to, and a note saying which were left out and why."""
    ok, note = _usable(runs[runs["status"] == "ok"])
    ok, note = _best_lr_only(ok, note)  # before the plateau check: a worse rate never stands in
    ok, note = _converged_only(ok, note, keep_unconverged)
    ok, note = _headline_only(ok, note)
    if law in ONE_D_LAWS and ok["train_cells"].nunique(dropna=False) > 1:
        ok, note = _largest_data_only(ok, note)
    elif law not in ONE_D_LAWS and ok["train_cells"].isna().any() and full_train is not None:
        # laws of data size need a number where the sweep says "all training cells"
        ok = ok.assign(train_cells=ok["train_cells"].fillna(full_train))
        note = _and(note, f"runs on all training cells counted as {fmt_int(full_train)} cells (the train split)")
    return ok.reset_index(drop=True), note


def eval_curve(result: FitResult, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fitted law and its 95% bootstrap band at X (parameter counts, or one row per point)."""
    y = np.asarray(result.predict(X), dtype=float).reshape(-1)
    lo, hi = (np.asarray(v, dtype=float).reshape(-1) for v in result.band(X, level=0.95))
    return y, lo, hi


def _curve_against_params(out: FitOutcome) -> None:
    x = list(out.data.get("x") or ["params"])
    if len(x) > 1:
        out.curve_error = f"the '{out.law}' law depends on more than model size; its curve is not drawn against parameters"
    elif x != ["params"]:
        out.curve_error = f"the law was fitted against {out.data.get('x')}, not total parameters"
    else:
        p = out.used["params"].to_numpy(float)
        xs = np.logspace(np.log10(p.min()) - 0.3, np.log10(p.max()) + 0.5, 200)
        try:
            out.curve = plots.Curve(xs, *eval_curve(out.result, xs), label=f"fit: {out.law} ({out.method})")
        except FitError as err:
            out.curve_error = str(err)


def _fit_table(used: pd.DataFrame, **kw: Any) -> FitResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cellscale.fit.fit_table(used, **kw)


def eval_cell_draws(frame: pd.DataFrame, sweep_dir: Path | None, settings: Mapping[str, Any], y: str, *,
                    branches: bool = False) -> tuple[CellDraws | None, str | None]:
    """The evaluation cells' resamples for the fitted rows of ``frame`` (their runs', or with
    ``branches`` their cooldown branches', per-cell sums in ``sweep_dir``; ``cellscale.fit.cells``),
    drawn ``bootstrap`` times with the fit's seed; or None and why not (the fit goes on without)."""
    if sweep_dir is None:
        return None, None
    left_out = "the intervals leave out the evaluation cells' noise"
    try:
        return sweep_cell_draws(sweep_dir, frame, y=y, n_boot=int(settings["bootstrap"]), seed=int(settings["seed"]),
                                branches=branches), None
    except NotResampled:
        return None, f"{left_out}: fit.bootstrap is 0"  # the report's setting, by its name in config.yaml
    except CellsMissing as err:
        return None, (f"{left_out}: {len(err.missing)} of {err.n_points} points have no per-cell sums "
                      f"(e.g. {err.missing[0].relative_to(sweep_dir)})")
    except FitError as err:
        return None, f"{left_out} ({err})"


def run_fit(runs: pd.DataFrame, fit_config: dict[str, Any], *, full_train: float | None = None,
            per_gene_mse=None, sweep_dir: Path | None = None) -> FitOutcome:
    """Fit the configured law to the finished runs; never raises for a fit problem.

    ``full_train`` (the train split's size) stands in for an empty ``train_cells`` in laws of data.
    ``per_gene_mse`` (the best run's positive per-gene test MSEs) adds fit.json's
    ``entropy_bits.per_gene`` block (heteroscedastic entropy, unweighted mean over genes).
    ``sweep_dir``: the sweep whose runs' per-cell sums put the evaluation cells' noise into the
    intervals (:func:`eval_cell_draws`).
    """
    settings = {**FitConfig().model_dump(), **fit_config}
    out = FitOutcome(law=str(settings["law"]), method=str(settings["method"]))
    out.used, out.note = fit_subset(runs, out.law, full_train, keep_unconverged=bool(settings["keep_unconverged"]))
    if out.used.empty:
        n_bad = int((runs["status"] != "ok").sum())
        left = unconverged_ids(runs[runs["status"] == "ok"])
        what = "no converged run" if left else "no finished run with a finite validation loss"
        out.error = (what + (f" ({n_bad} run(s) diverged or failed)" if n_bad else "")
                     + (f"; {len(left)} finished run(s) were still improving when their budget ended: raise "
                        "their budget, or set fit.keep_unconverged: true" if left else ""))
        return out
    y = fitted_loss_column(out.used)
    kw = dict(law=out.law, method=out.method, bootstrap=int(settings["bootstrap"]), seed=int(settings["seed"]),
              interval=settings["interval"], y=y)  # interval None: the fit's default
    kw["cell_draws"], why = eval_cell_draws(out.used, sweep_dir, settings, y)
    if why:
        out.note = _and(out.note, why)
    if per_gene_mse is not None and len(per_gene_mse):
        kw["per_gene_mse"] = np.asarray(per_gene_mse, dtype=float)
    return fit_into(out, **kw)


def fit_into(out: FitOutcome, **kw: Any) -> FitOutcome:
    """``cellscale.fit.fit_table(out.used, **kw)`` into ``out``: its result, its record and its
    curve against parameters, or why there is none; never raises for a fit problem."""
    try:
        out.result = _fit_table(out.used, **kw)
        out.data = out.result.to_dict()
    except FitError as err:
        out.result, out.error = None, str(err)
        return out
    except Exception as err:  # a bug in the fit must not cost the user the report
        out.result, out.error = None, f"the fit raised {type(err).__name__}: {err}"
        return out
    _curve_against_params(out)
    return out


def run_depth_fits(runs: pd.DataFrame, fit_config: dict[str, Any], *, full_train: float | None = None,
                   headline: FitOutcome | None = None, sweep_dir: Path | None = None) -> dict[float, FitOutcome]:
    """The configured law fitted to each sequencing depth's runs on its own ({} for one depth),
    largest depth first; ``headline`` (already fitted to the headline depth) is reused for it."""
    head = headline_depth(runs)
    if head is None:
        return {}
    ok_depths = sorted(runs.loc[runs["status"] == "ok", "depth"].dropna().unique(), reverse=True)
    out = {}
    for d in ok_depths:
        if headline is not None and float(d) == head and headline.used is not None:
            out[float(d)] = headline
        else:
            out[float(d)] = run_fit(runs[runs["depth"] == d], fit_config, full_train=full_train, sweep_dir=sweep_dir)
    return out


def fit_json(fit: FitOutcome, depth_fits: dict[float, FitOutcome], sd: SweepData) -> dict[str, Any]:
    """fit.json: the headline fit, and with several depths ``by_depth``: {"1": fit, "0.25": fit,
    ...}, each with its depth, its number of ok runs and that depth's baselines."""
    if not depth_fits:
        return fit.record
    by_depth = {}
    for depth, fo in depth_fits.items():
        entry = {**fo.record, "depth": depth,
                 "n_runs_ok": int(((sd.runs["depth"] == depth) & (sd.runs["status"] == "ok")).sum())}
        if sd.depth_baselines.get(depth):
            entry["baselines"] = sd.depth_baselines[depth]
        by_depth[depth_label(depth)] = entry
    return {**fit.record, "by_depth": by_depth}
