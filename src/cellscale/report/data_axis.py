"""The report's data axis: the joint L(N, D) fitted to the sweep's cooldown branch points
(``cellscale.fit.data_axis``) and checked on them (``cellscale.fit.backtest``: the last doubling
predicted by the law of the rest), written to ``data_fit.json``, drawn (loss against cells seen, the
compute-optimal frontier), tabled (each size's converged loss and regime) and put in words.

A sweep without branch points (a fixed-budget sweep) has no data axis: ``run_data_fit`` returns
None and nothing here is shown. A fit problem never raises: it becomes the outcome's ``error``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cellscale.errors import FitError
from cellscale.fit.backtest import backtest
from cellscale.fit.core import fitted_unit
from cellscale.fit.data_axis import Y_DATA, DataAxisFit, fit_data_axis, law_x, learned_points
from cellscale.fit.defaults import BACKTEST_BOOTSTRAP
from cellscale.report import plots
from cellscale.report.doc import Callout, Fig, Figure, Para, Section, Table
from cellscale.report.fitting import FitOutcome, eval_cell_draws, headline_depth
from cellscale.report.fmt import fmt_int, fmt_num
from cellscale.report.records import SweepData
from cellscale.rules.lrgrid import select_lr
from cellscale.runtime.io import jsonable

DATA_FILE = "data_fit.json"
_CONVERGED_HEADER = ["size", "params", "cells seen (last)", "loss there", "L(N, D -> inf)", "95% CI",
                     "10x cells seen: loss falls", "95% CI ", "10x parameters: loss falls", "95% CI  ", "limited by"]


@dataclass
class DataOutcome:
    """The data axis of a sweep: the fit (or why there is none) and the points behind it."""

    fit: DataAxisFit | None = None
    record: dict[str, Any] | None = None
    error: str | None = None
    note: str | None = None
    used: pd.DataFrame | None = None  # the points fitted
    left_out: pd.DataFrame | None = None  # the chosen runs' other points (the takeoff, no learning yet)
    unit: str = "mse"

    @property
    def json(self) -> dict[str, Any]:
        if self.record is not None:
            return {**self.record, "note": self.note}
        return {"error": self.error, "note": self.note, "n_points": 0 if self.used is None else int(len(self.used))}

    def as_fit_outcome(self) -> FitOutcome:
        """The joint fit in the shape of the report's other fits (for the frontier figure and table)."""
        law = str((self.record or {}).get("law") or "chinchilla")
        return FitOutcome(law=law, method=str((self.record or {}).get("method") or ""), data=self.record,
                          used=self.used, error=self.error)


def branch_points(sd: SweepData) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The branch points the law is fitted to, the chosen runs' points left out, and why."""
    notes = []
    b = sd.branches
    ok_runs = sd.runs[sd.runs["status"] == "ok"]
    head = headline_depth(sd.runs)
    if head is not None:
        ok_runs = ok_runs[ok_runs["depth"] == head]
        notes.append(f"only the runs at depth {head:g} are fitted")
    sel = select_lr(ok_runs, loss_col=sd.choice_col)
    kept = sel.kept if sel.choices else ok_runs
    if sel.choices and len(sel.dropped):
        notes.append(f"the branches of each size's chosen learning rate only ({len(sel.dropped)} runs at other "
                     "rates left out)")
    chosen = b[b["run_id"].isin(set(kept["run_id"].astype(str))) & (b["status"] == "ok")]
    y = pd.to_numeric(chosen[Y_DATA], errors="coerce")
    lowest = fitted_unit(chosen, Y_DATA)[2]  # the fit's own rule: it fits the excess over this
    bad = ~np.isfinite(y) | (y <= lowest)  # the laws are fitted in log space, to the excess over it
    if bad.any():
        notes.append(f"{int(bad.sum())} points without a finite loss above {lowest:g} left out")
    pts, learned = learned_points(chosen[~bad], gene_mean_mse=sd.gene_mean_val, tol=sd.plateau_tol)
    notes += learned
    full = sd.full_train
    if pts["train_cells"].isna().any() and full is not None:
        pts = pts.assign(train_cells=pts["train_cells"].fillna(full))
    return pts.reset_index(drop=True), chosen[~bad & ~chosen.index.isin(pts.index)], notes


def run_data_fit(sd: SweepData) -> DataOutcome | None:
    """Fit the joint law to the sweep's branch points; None when the sweep took none."""
    if sd.branches is None or sd.branches.empty:
        return None
    pts, left_out, notes = branch_points(sd)
    cfg = sd.fit_config
    out = DataOutcome(used=pts, left_out=left_out, note="; ".join(notes) or None,
                      unit=str(pts["loss_unit"].iloc[0]) if len(pts) else "mse")
    if pts.empty:
        out.error = "no branch point of a finished run at its chosen learning rate"
        return out
    law = None if cfg["data_law"] == "auto" else str(cfg["data_law"])  # sd.fit_config holds every default
    draws = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # every usable core: the joint law's resamples are the report's longest step (the numbers
            # do not depend on how many processes fit them)
            draws, why = eval_cell_draws(pts, sd.sweep_dir, cfg, Y_DATA, branches=True)
            if why:
                out.note = "; ".join(n for n in (out.note, why) if n)
            out.fit = fit_data_axis(pts, law=law, method=str(cfg["data_method"]), bootstrap=int(cfg["bootstrap"]),
                                    seed=int(cfg["seed"]),
                                    interval=cfg.get("interval"), n_jobs=None, cell_draws=draws)
        out.record = out.fit.to_dict()
    except FitError as err:
        out.error = str(err)
    except Exception as err:  # a bug in the fit must not cost the user the report
        out.error = f"the data fit raised {type(err).__name__}: {err}"
    if out.record is not None:
        out.record["backtest"] = _checked(pts, out.fit, cfg, draws)
    return out


def _checked(pts: pd.DataFrame, fit: DataAxisFit, cfg: dict[str, Any], draws) -> dict[str, Any]:
    """The fitted law's backtest (``cellscale.fit.backtest``); a bug in it costs only its own record."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return jsonable(backtest(pts, law=fit.result.law.name, method=str(cfg["data_method"]),
                                     bootstrap=min(int(cfg["bootstrap"]), BACKTEST_BOOTSTRAP), seed=int(cfg["seed"]),
                                     n_jobs=None, cell_draws=draws))
    except Exception as err:
        return {"error": f"the backtest raised {type(err).__name__}: {err}"}


# ------------------------------------------------------------------------------------------ figures


def _curves(out: DataOutcome) -> dict[str, plots.Curve]:
    fit, pts = out.fit, out.used
    lo, hi = float(pts["cells_seen"].min()), float(pts["cells_seen"].max())
    grid = np.logspace(np.log10(lo) - 0.15, np.log10(hi) + 0.6, 60)
    curves = {}
    for row in fit.sizes.itertuples():
        if row.size in curves:  # one curve per size: its largest training set
            continue
        X = fit._X(np.full_like(grid, row.params), grid, np.full_like(grid, row.train_cells))
        y = fit.result.predict(X).reshape(-1)
        band_lo, band_hi = fit.result.band(X)
        curves[str(row.size)] = plots.Curve(grid, y, band_lo, band_hi)
    return curves


def _test_refs(sd: SweepData, unit: str) -> list[plots.RefLine]:
    """The baselines on the test cells, in the fitted loss's unit (the figure draws test losses)."""
    refs = sd.baselines if unit == "mse" else sd.likelihood_refs
    colors = {"gene_mean": "#ff7f0e", "bayes_linear": "#2ca02c", "knn": "#8c564b"}
    return [plots.RefLine(v["test"], f"{k.replace('_', '-')} (test) = {fmt_num(v['test'])}",
                          color=colors.get(k, "#d62728"), style=":" if k == "bayes_floor" else "--")
            for k, v in refs.items() if v.get("test") is not None]


def figures(out: DataOutcome | None, sd: SweepData) -> list[Figure]:
    if out is None or out.used is None or (out.used.empty and (out.left_out is None or out.left_out.empty)):
        return []
    curves = _curves(out) if out.fit is not None else {}
    limits = {str(c["size"]): c["loss"] for c in out.record["converged"]} if out.record else {}
    unit = "bits per masked gene" if out.unit == "bits" else "MSE"
    cap = (f"Each dot is a cooldown branch: the test {unit} of a run's weights cooled down at that many cells seen "
           "(test cells chose nothing); hollow: points not fitted. Lines: the mean over seeds per size. Dashed: the "
           "fitted L(N, D) per size with its 95% band; dotted at the right: each size's converged loss L(N, D -> inf). "
           "Horizontal: baselines on the test cells.")
    if out.error:
        cap += f" No law drawn: {out.error}."
    if out.note:
        cap += f" Note: {out.note}."
    figs = [Figure("loss_vs_cells", "Loss against cells seen (cooldown branches)", cap,
                   plots.figure_png(plots.loss_vs_data(out.used, x="cells_seen", y=Y_DATA, refs=_test_refs(sd, out.unit),
                                                       curves=curves, limits=limits, left_out=out.left_out,
                                                       xlabel="cells seen (cooled down)", ylabel=f"test {unit}",
                                                       title="Loss against cells seen, per model size")))]
    from cellscale.report.figures import compute_frontier

    frontier = compute_frontier(out.as_fit_outcome()) if out.record else None
    if frontier is not None:
        figs.append(Figure("data_frontier", "Compute-optimal frontier of the branch points", frontier.caption,
                           frontier.png))
    return figs


# ------------------------------------------------------------------------------------------ words


def _ci(lohi: Any, digits: int = 4) -> str:
    if isinstance(lohi, list) and len(lohi) == 2 and None not in lohi:
        return f"[{fmt_num(lohi[0], digits)}, {fmt_num(lohi[1], digits)}]"
    return "n/a"


def _pct(v: Any) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.1f}%"


def _pct_ci(lohi: Any) -> str:
    if isinstance(lohi, list) and len(lohi) == 2 and None not in lohi:
        return f"[{100 * lohi[0]:.1f}%, {100 * lohi[1]:.1f}%]"
    return "n/a"


def _label(entry: dict[str, Any], several: bool) -> str:
    """A size's name, with its training set when the points come from more than one."""
    return f"{entry['size']} ({fmt_int(entry['train_cells'])} cells)" if several else str(entry["size"])


def _several_sets(out: DataOutcome) -> bool:
    return len({c["train_cells"] for c in out.record["converged"]}) > 1


def converged_table(out: DataOutcome) -> Table:
    rows = []
    several = _several_sets(out)
    regime = {(r["size"], r.get("train_cells")): r for r in out.record["regime"]}
    for c in out.record["converged"]:
        r = regime.get((c["size"], c["train_cells"]), {})
        rows.append([_label(c, several), fmt_int(c["params"]), fmt_int(c["last_cells_seen"]), fmt_num(c["last_loss"]),
                     fmt_num(c["loss"]), _ci(c["ci95"]), _pct(r.get("more_data")), _pct_ci(r.get("more_data_ci95")),
                     _pct(r.get("more_params")), _pct_ci(r.get("more_params_ci95")), str(r.get("limited_by", ""))])
    return Table(_CONVERGED_HEADER, rows, numeric=frozenset(_CONVERGED_HEADER[1:10]))


def size_law_sentence(out: DataOutcome) -> str:
    sl = out.record["size_law"]
    unit = " bits" if out.unit == "bits" else ""
    head = (f"The size law on the converged losses, {sl['formula']}, has exponent alpha = {fmt_num(sl['alpha'], 3)} "
            f"({_ci(sl['alpha_ci95'], 3)})")
    if sl.get("floor_at_boundary"):
        return (head + f"; its floor sits on the bound of its range ({fmt_num(sl['floor'])}{unit}, 95% CI "
                f"{_ci(sl['floor_ci95'])}): these points do not identify a floor, so none is given.")
    return (head + f" and its floor at {fmt_num(sl['floor'])}{unit} (95% CI {_ci(sl['floor_ci95'])}): a floor read "
            "where every size has been trained without limit, so it does not depend on where any run's budget ended.")


def regime_sentence(out: DataOutcome) -> str:
    """The seed study's data-rich against data-limited question, per size, in numbers."""
    parts = []
    several = _several_sets(out)
    for r in out.record["regime"]:
        parts.append(f"{_label(r, several)} at {fmt_int(r['cells_seen'])} cells seen: 10x the cells seen lowers its loss by "
                     f"{_pct(r['more_data'])} ({_pct_ci(r['more_data_ci95'])}), 10x the parameters by "
                     f"{_pct(r['more_params'])} ({_pct_ci(r['more_params_ci95'])})")
    limited = [r["limited_by"] for r in out.record["regime"]]
    if all(x == "data" for x in limited):
        verdict = "every size is limited by the cells it has seen, not by its parameters"
    elif all(x == "parameters" for x in limited):
        verdict = "every size is limited by its parameters, not by the cells it has seen"
    else:
        named = {k: [_label(r, several) for r in out.record["regime"] if r["limited_by"] == k]
                 for k in ("data", "parameters", "both")}
        verdict = "; ".join(f"limited by {'data' if k == 'data' else k}: {', '.join(v)}" if k != "both" else
                            f"no clear limit (intervals overlap): {', '.join(v)}" for k, v in named.items() if v)
    return "Regime, from the joint law: " + "; ".join(parts) + f". So {verdict}." + _floor_caveat(out)


def _floor_caveat(out: DataOutcome) -> str:
    """Where the law levels off is what a longer run would meet; unidentified, it is the fit's guess."""
    judgement = out.record.get("judgement") or {}
    if not (out.record.get("floor_at_boundary") or judgement.get("floor_interval_reaches_bound")):
        return ""
    return (" These points do not identify where the law levels off (its floor E), so what more cells seen would "
            "buy, and each size's converged loss, extend the fitted curve past the points rather than measure its "
            "level: a run that flattens sooner falls short of them (measured on real PBMCs, docs/ablations.md).")


def converged_sentence(out: DataOutcome) -> str:
    conv = out.record["converged"]
    far = [c for c in conv if c.get("still_to_fall") is not None and c["still_to_fall"] > 0.01]
    several = _several_sets(out)
    text = ("Each size's converged loss L(N, D -> inf), what unlimited training on its data would reach: "
            + "; ".join(f"{_label(c, several)} {fmt_num(c['loss'])} {_ci(c['ci95'])}" for c in conv) + ".")
    if far:
        text += (" By the law, " + ", ".join(f"{_label(c, several)} {_pct(c['still_to_fall'])}" for c in far)
                 + " below their last point: more than 1% that training longer would still buy.")
    return text


def _backtest(out: DataOutcome | None) -> dict[str, Any] | None:
    return None if out is None or out.record is None else out.record.get("backtest")


def _inside(bt: dict[str, Any]) -> str:
    """How many held-out points the refit's intervals held, with how far such intervals can be trusted."""
    if bt.get("inside") is None:
        return "no prediction intervals (fit.bootstrap is 0)"
    return (f"{bt['inside']} of {bt['n']} inside their 95% prediction intervals (a refit on few points per run "
            "draws them too narrow: on simulated sweeps like the demo they held 56% of the held-out points, "
            "docs/ablations.md)")


def backtest_sentence(out: DataOutcome | None) -> str:
    """How far the law carries one doubling of cells seen, measured on the sweep's own points
    (``cellscale.fit.backtest``)."""
    bt = _backtest(out)
    if not bt:
        return ""
    if bt.get("error"):
        return f"The law was not checked on its own points: {bt['error']}."
    return (f"Checked on its own points: refitted to the {bt['n_fitted']} points up to {fmt_int(bt['fitted_up_to'])} "
            f"cells seen, the law predicts the {bt['n']} points of the last doubling with an rms error of "
            f"{_pct(bt['rms_error'])} (largest: {bt['largest_size']}, {100 * bt['largest_error']:+.1f}%), "
            f"{_inside(bt)}. That is how far a law of this sweep's points carried one doubling of cells seen; the "
            f"law above rests on all {out.record['n_points']} points, and a prediction further out is less certain.")


def prediction_clause(out: DataOutcome | None) -> str | None:
    """The backtest as the "Law:" verdict's last clause: how far the joint law predicts; None without one
    (a backtest that could not be made is said in the data-axis section, not in the verdicts)."""
    bt = _backtest(out)
    if not bt or bt.get("error"):
        return None
    return (f"The joint law L(N, D), refitted without the last doubling of cells seen, predicts it within "
            f"{_pct(bt['rms_error'])} rms (largest miss {100 * bt['largest_error']:+.1f}%, {bt['largest_size']}).")


def meaning_text(out: DataOutcome | None) -> str:
    """The data axis in "What this means": the regime and the converged losses, or why not."""
    if out is None:
        return ""
    if out.record is None:
        return f"No law of cells seen was fitted to the cooldown branches: {out.error}."
    return " ".join([regime_sentence(out), converged_sentence(out), size_law_sentence(out)])


def methods_text(out: DataOutcome | None) -> str:
    """The data fit in the methods paragraph, from the values that did the work."""
    if out is None or out.record is None:
        return ""
    rec = out.record
    x = ", ".join(rec.get("x") or law_x(rec["law"]))
    factor = f"{float(rec['factor']):g}x"
    return (f"The law {rec['formula']} ('{rec['law']}', method {rec['method']}) was fitted to {rec['n_points']} "
            f"cooldown-branch points ({x} against the test loss of the cooled-down weights); each size's converged "
            "loss is the law at D -> inf, and intervals of derived numbers are bootstrap percentiles over "
            f"{fmt_int(rec.get('bootstrap', 0))} resamples of the fit. The regime compares the loss at {factor} "
            f"the cells seen, and at {factor} the parameters, with the loss at each size's last point."
            + _backtest_method(rec.get("backtest")))


def _backtest_method(bt: dict[str, Any] | None) -> str:
    if not bt or bt.get("error"):
        return ""
    return (f" To check it, the same law was refitted to the {bt['n_fitted']} points up to "
            f"{fmt_int(bt['fitted_up_to'])} cells seen ({fmt_int(bt['bootstrap'])} resamples) and its predictions, "
            "with their 95% prediction intervals, set against the measured points of the last doubling.")


def sections(out: DataOutcome | None) -> list[Section]:
    if out is None:
        return []
    blocks: list = [Para("Every plateau-budget run took a cooldown branch at each doubling of its cells seen; the "
                         f"branches are the data axis, fitted here by one law of parameters and cells seen ({DATA_FILE}: "
                         "evaluate it at new points with cellscale.fit.predict_json)."),
                    Fig("loss_vs_cells")]
    if out.record is None:
        blocks.append(Callout("No data fit:", str(out.error), quote=False))
        return [Section("Scaling with cells seen", blocks)]
    blocks += [Para(converged_sentence(out)), converged_table(out), Para(regime_sentence(out)),
               Para(size_law_sentence(out))]
    checked = backtest_sentence(out)
    if checked:
        blocks.append(Para(checked))
    out_sections = [Section("Scaling with cells seen", blocks)]
    if "compute_optimal" in out.record:
        from cellscale.report import tables

        definition, table = tables.compute_optimal(out.as_fit_outcome())
        if table is not None:
            out_sections.append(Section("Compute-optimal frontier of the branch points",
                                        [Para(definition), table, Fig("data_frontier")], level=3))
    return out_sections
