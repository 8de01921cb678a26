"""The report's tables, as ``doc.Table``: the fit, the entropy, the depths, the compute-optimal
allocation, the per-gene errors and the runs. Cells are formatted text."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cellscale.config import depth_label
from cellscale.data.manifest import finite_or_none
from cellscale.report.doc import Table
from cellscale.report.fitting import FitOutcome, fitted_loss_column
from cellscale.report.fmt import floor_name, fmt_int, fmt_num, resample_failures
from cellscale.report.records import GeneBest, SweepData, gaussian_bits, weighted_bits

Row = list[str]

_QUANTITY = ["quantity", "value", "note"]
_RUN_COLUMNS = ["run_id", "size", "params", "train_cells", "depth", "seed", "cells_seen", "lr", "best_step",
                "best_val_mse", "test_mse", "wall_seconds", "status", "error"]
_RUN_NUMERIC = frozenset({"params", "train_cells", "depth", "seed", "cells_seen", "lr", "best_step", "best_val_mse",
                          "test_mse", "wall_seconds"})
_DEPTH_HEADER = ["depth", "runs fitted", "alpha", "alpha 95% CI", "floor", "floor 95% CI", "R^2",
                 "floor at bound", "gene-mean", "Bayes-linear", "best run on validation"]
_CO_HEADER = ["compute C", "N* (params)", "N* 95% CI", "D* (cells)", "D* 95% CI", "cells per param", "predicted loss"]
_GENE_HEADER = ["rank", "hardest gene", "test MSE", "masked", "easiest gene", "test MSE ", "masked "]
_GENE_RUN_HEADER = ["run_id", "size", "genes scored", "test MSE", "median gene MSE", "IQR", "std over genes",
                    "homoscedastic bits", "heteroscedastic bits"]
NOT_A_MEASUREMENT = "; the floor sits on its search bound, so this is NOT a measurement"


def compact(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}: {compact(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(compact(x) for x in v[:8]) + (", ..." if len(v) > 8 else "") + "]"
    if isinstance(v, float):
        return fmt_num(v)
    return str(v)


def _interval(lohi: Any) -> str | None:
    """"[lo, hi]" of a two-number interval, None when there is none."""
    ok = isinstance(lohi, list) and len(lohi) == 2 and None not in lohi
    return f"[{fmt_num(lohi[0])}, {fmt_num(lohi[1])}]" if ok else None


# ---------------------------------------------------------------------------------------------- runs


def _run_row(r: pd.Series, likelihood: bool) -> Row:
    row = [
        str(r["run_id"]), str(r["size"]), fmt_int(r["params"]),
        "all" if pd.isna(r["train_cells"]) else fmt_int(r["train_cells"]),
        "" if pd.isna(r["depth"]) else depth_label(r["depth"]),
        "" if pd.isna(r["seed"]) else fmt_int(r["seed"]), fmt_int(r["cells_seen"]), fmt_num(r["lr"], 3),
        fmt_int(r["best_step"]), fmt_num(r["best_val_mse"]), fmt_num(r["test_mse"]),
        fmt_num(r["wall_seconds"], 3), str(r["status"]), str(r["error"] or ""),
    ]
    if likelihood:
        row[9:9] = [str(r["objective"]), fmt_num(r["best_val_loss"]), fmt_num(r["test_loss"])]
    return row


def run_table(runs: pd.DataFrame) -> Table:
    """Every run, by size, training cells, depth (largest first) and seed; rows classed by status."""
    cols = list(_RUN_COLUMNS)
    likelihood = fitted_loss_column(runs).endswith("_loss")
    if likelihood:  # the objective's own numbers, in bits, before the MSEs of its point predictions
        cols[9:9] = ["objective", "best_val_loss (bits)", "test_loss (bits)"]
    runs = runs.sort_values(["params", "train_cells", "depth", "seed", "run_id"],
                            ascending=[True, True, False, True, True], na_position="last")
    rows = [_run_row(r, likelihood) for _, r in runs.iterrows()]
    return Table(cols, rows, row_classes=[str(s) for s in runs["status"]], numeric=_RUN_NUMERIC)


# ---------------------------------------------------------------------------------------------- the fit


def _param_rows(d: dict[str, Any]) -> list[Row]:
    ci = d.get("ci95") or {}
    rows = []
    for name, val in (d.get("params") or {}).items():
        lohi = ci.get(name)
        ci_txt = (f"[{fmt_num(lohi[0])}, {fmt_num(lohi[1])}]" if lohi and len(lohi) == 2 and lohi[0] is not None
                  else "n/a")
        rows.append([f"parameter {name}", fmt_num(val), f"95% CI {ci_txt}"])
    return rows


def _bootstrap_rows(d: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    if d.get("interval") or d.get("ci_method"):
        rows.append(["interval method", str(d.get("interval") or "n/a"), str(d.get("ci_method") or "")])
    if d.get("bootstrap") is None:
        return rows
    note = f"resamples of the {d['bootstrap_kind']}" if d.get("bootstrap_kind") else "bootstrap resamples"
    if d.get("bootstrap_units"):
        note += f"; units: runs grouped by {', '.join(map(str, d['bootstrap_units']))}"
    failures = resample_failures(d, int(d.get("bootstrap") or 0))
    if failures:
        note += f"; {failures}"
    if d.get("bootstrap_unreliable"):
        note += "; WARNING: more than 5% of the resamples failed, so the intervals that rest on them are unreliable"
    return rows + [["bootstrap resamples", fmt_int(d["bootstrap"]), note]]


def _boundary_row(d: dict[str, Any]) -> Row:
    fab, bounds = d.get("floor_at_boundary"), d.get("floor_bounds")
    btxt = f" (search range {fmt_num(bounds[0])} to {fmt_num(bounds[1])})" if bounds and len(bounds) == 2 else ""
    note = (("WARNING: the floor estimate touches its search bound" + btxt + "; it is an artefact of the "
             "bounds, not a measurement, and must not be quoted as the irreducible loss") if fab
            else "the floor lies inside its search range" + btxt)
    return ["floor_at_boundary", str(fab), note]


def _criterion_note(d: dict[str, Any], k: str) -> str:
    nf = d.get("no_floor") or {}
    if nf.get(k) is not None and d.get(k) is not None:
        diff = float(nf[k]) - float(d[k])
        return (f"law without a floor ({nf.get('law', 'power')}): {fmt_num(nf[k])}; difference "
                f"{diff:+.2f} ({'favours the floor' if diff > 0 else 'does not favour the floor'})")
    return "the law without a floor could not be fitted" if nf else ""


def _criteria_rows(d: dict[str, Any]) -> list[Row]:
    space = f" [{d['aic_space']}]" if d.get("aic_space") else ""
    return [[k.upper() + space, fmt_num(d.get(k)), _criterion_note(d, k)] for k in ("aic", "bic") if k in d]


def _leave_out_rows(d: dict[str, Any]) -> list[Row]:
    rows = []
    llo = d.get("leave_largest_out")
    if isinstance(llo, dict):
        if llo.get("predicted") is not None and llo.get("observed") is not None:
            val = f"{100 * float(llo.get('rel_error', 0.0)):+.2f}%"
            note = (f"fitted without the largest model (P = {fmt_int(llo.get('x'))}, {llo.get('n_heldout')} run(s)), "
                    f"predicted {fmt_num(llo['predicted'])}, observed {fmt_num(llo['observed'])}")
        else:
            val, note = "n/a", str(llo.get("note") or "could not be computed")
        rows.append(["leave-largest-out error", val, note])
    for k, v in d.items():
        if k != "leave_largest_out" and ("leave" in k.lower() or "largest" in k.lower()):
            rows.append([k.replace("_", " "), compact(v), ""])
    return rows


def _true_floor_rows(fit: FitOutcome, sd: SweepData) -> list[Row]:
    """The fitted floor beside the simulator's exact one, when the data have one."""
    true, d = sd.true_floor, fit.data or {}
    name = d.get("floor_param") or floor_name(d.get("params") or {})
    c = finite_or_none((d.get("params") or {}).get(name)) if name else None
    if true is None or c is None:
        return []
    lohi = (d.get("ci95") or {}).get(name) or [None, None]
    lo, hi = (finite_or_none(lohi[0]), finite_or_none(lohi[1])) if len(lohi) == 2 else (None, None)
    unit = " bits" if sd.objective != "mse" else ""
    if lo is None or hi is None:
        verdict = "no interval to compare (no bootstrap)"
    elif lo <= true <= hi:
        verdict = f"the true floor is inside the fitted floor's 95% interval [{fmt_num(lo)}, {fmt_num(hi)}]"
    else:
        verdict = (f"the true floor is OUTSIDE the fitted floor's 95% interval [{fmt_num(lo)}, {fmt_num(hi)}]: "
                   "the ladder has not reached the regime where the law pins the floor down")
    apart = f"{c - true:+.3f} bits" if unit else f"{100 * (c / true - 1):+.1f}%"
    return [[f"true Bayes floor (simulator, {sd.split})", f"{fmt_num(true)}{unit}",
             f"fitted {name} = {fmt_num(c)}{unit} ({apart}); {verdict}"]]


def fit_table(fit: FitOutcome, sd: SweepData) -> Table:
    """(quantity, value, note) rows summarising the fit."""
    d = fit.data or {}
    rows = [["law", str(d.get("law", fit.law)), str(d["formula"])]] if d.get("formula") else []
    rows.append(["method", str(d.get("method", fit.method)), str(d.get("method_description") or "")])
    rows += _param_rows(d) + _bootstrap_rows(d)
    rows.append(["R^2", fmt_num(d.get("r2")), str(d.get("r2_definition") or "")])
    rows.append(["points fitted (n)", fmt_int(d.get("n_points")), fit.note or ""])
    rows.append(_boundary_row(d))
    rows += _criteria_rows(d) + _leave_out_rows(d) + _true_floor_rows(fit, sd)
    return Table(_QUANTITY, rows)


# ---------------------------------------------------------------------------------------------- entropy


def _likelihood_rows(d: dict[str, Any], eb: dict[str, Any], sd: SweepData) -> list[Row]:
    ci = _interval(eb.get("ci95") or [None, None])
    rows = [[f"fitted floor of the {sd.objective} loss (measured)", f"{fmt_num(eb['likelihood'], 4)} bits",
             (f"95% CI {ci}" if ci else "no interval") + (NOT_A_MEASUREMENT if d.get("floor_at_boundary") else "")],
            ["label", str(eb.get("label") or ""), ""]]
    for k, v in sd.refs(sd.likelihood_refs).items():
        rows.append([f"{k.replace('_', '-')} ({sd.objective}, {sd.split})", f"{fmt_num(v, 4)} bits",
                     "exact, simulator" if k == "bayes_floor" else "baseline, same masks"])
    return rows


def _per_gene_fit_rows(pg: Any, best: GeneBest | None) -> list[Row]:
    if not isinstance(pg, dict) or pg.get("bits") is None:
        return []
    who = f" of {best.run_id} (test)" if best is not None else ""
    rows = [[f"per-gene (heteroscedastic) Gaussian{who}, unweighted mean over genes",
             f"{fmt_num(pg['bits'], 4)} bits", str(pg.get("label") or "")]]
    if pg.get("at_floor") is not None:
        rows.append(["per-gene (heteroscedastic) Gaussian at the fitted floor", f"{fmt_num(pg['at_floor'], 4)} bits",
                     "the floor shared across genes in proportion to the best run's per-gene errors"])
    return rows


def _gaussian_rows(d: dict[str, Any], eb: dict[str, Any], best: GeneBest | None) -> list[Row]:
    ci = eb.get("ci95")
    if eb.get("ci95_unbounded_below"):
        interval = f"95% CI (unbounded below, {fmt_num(ci[1], 4)}]: the floor's interval reaches 0"
    else:
        interval = f"95% CI [{fmt_num(ci[0], 4)}, {fmt_num(ci[1], 4)}]" if ci else "no interval"
    rows = [["fitted floor, homoscedastic Gaussian", f"{fmt_num(eb['gaussian'], 4)} bits", interval
             + (NOT_A_MEASUREMENT if d.get("floor_at_boundary") else "")]]
    if eb.get("label"):
        rows.append(["label", str(eb["label"]), ""])
    rows += _per_gene_fit_rows(eb.get("per_gene"), best)
    rows += [[k.replace("_", " "), compact(v), ""] for k, v in eb.items()
             if k not in ("gaussian", "ci95", "ci95_unbounded_below", "label", "per_gene")]
    return rows


def _fitted_entropy_rows(fit: FitOutcome, sd: SweepData, best: GeneBest | None) -> list[Row]:
    d = fit.data or {}
    eb = d.get("entropy_bits") or {}
    if not isinstance(eb, dict):
        return []
    judgement = d.get("judgement") or {}
    if judgement.get("floor_identified") is False and d.get("floor_param"):  # these points carry no floor
        why = ", ".join(judgement.get("flags") or []) or "its interval reaches the bottom of its range"
        return [["no entropy from these points", "n/a",
                 f"the floor is not identified ({why}), so its bits are not a measurement"]]
    if eb.get("likelihood") is not None:
        return _likelihood_rows(d, eb, sd)
    if eb.get("gaussian") is not None:
        return _gaussian_rows(d, eb, best)
    return [["no entropy from this law", "n/a", str(eb["note"])]] if eb.get("note") else []


def _best_run_rows(sd: SweepData, best: GeneBest | None) -> list[Row]:
    if best is not None and best.test_mse is not None:
        hb = weighted_bits(best.mse, best.n)
        return [[f"best run {best.run_id}, test MSE, homoscedastic", f"{fmt_num(gaussian_bits(best.test_mse), 4)} bits",
                 f"0.5 log2(2 pi e test_mse), test_mse = {fmt_num(best.test_mse)}"],
                [f"best run {best.run_id}, test, per-gene (heteroscedastic)",
                 "n/a" if hb is None else f"{fmt_num(hb, 4)} bits",
                 ("mean over masked positions (genes weighted by masked counts) of 0.5 log2(2 pi e mse_g); "
                  "never above the homoscedastic row (Jensen)")]]
    if not sd.per_gene:
        return [["per-gene (heteroscedastic) Gaussian", "n/a", "no run has per-gene errors (per_gene.json)"]]
    return []


def _reference_bits_rows(sd: SweepData) -> list[Row]:
    rows = []
    if sd.gene_mean is not None:
        rows.append([f"gene-mean baseline ({sd.split}), same formula", f"{fmt_num(gaussian_bits(sd.gene_mean), 4)} bits",
                     "for scale"])
    if sd.bayes_floor is not None:
        rows.append([f"true Bayes floor ({sd.split}), same formula", f"{fmt_num(gaussian_bits(sd.bayes_floor), 4)} bits",
                     "simulator"])
    return rows


def entropy_table(fit: FitOutcome, sd: SweepData, best: GeneBest | None = None) -> Table:
    rows = _fitted_entropy_rows(fit, sd, best) + _best_run_rows(sd, best) + _reference_bits_rows(sd)
    return Table(["quantity", "value", "interval / note"], rows)


# ---------------------------------------------------------------------------------------------- depths


def _depth_row(depth: float, fo: FitOutcome, sd: SweepData) -> Row:
    d = fo.data or {}
    params, cis = d.get("params") or {}, d.get("ci95") or {}
    fname = d.get("floor_param") or floor_name(params)
    base = sd.depth_baselines.get(depth, {})
    at = sd.runs[(sd.runs["depth"] == depth) & (sd.runs["status"] == "ok")]
    val = pd.to_numeric(at["best_val_mse"], errors="coerce")
    best = float(pd.to_numeric(at.loc[val.idxmin(), sd.loss_col])) if val.notna().any() else None
    return [
        depth_label(depth), fmt_int(0 if fo.used is None else len(fo.used)),
        fmt_num(params.get("alpha")) if "alpha" in params else "n/a", _interval(cis.get("alpha")) or "n/a",
        fmt_num(params.get(fname)) if fname in params else "n/a", (_interval(cis.get(fname)) if fname else None) or "n/a",
        fmt_num(d.get("r2")) if fo.data else f"no fit: {fo.error}",
        str(d.get("floor_at_boundary")) if fo.data else "",
        fmt_num((base.get("gene_mean") or {}).get(sd.split)), fmt_num((base.get("bayes_linear") or {}).get(sd.split)),
        fmt_num(best) if best is not None else "n/a",
    ]


def depth_table(depth_fits: dict[float, FitOutcome], sd: SweepData) -> Table:
    """One row per depth: the law's exponent and floor with their 95% intervals, R^2, runs
    fitted, that depth's baselines and best run."""
    rows = [_depth_row(depth, fo, sd) for depth, fo in depth_fits.items()]
    numeric = frozenset(_DEPTH_HEADER) - {"alpha 95% CI", "floor 95% CI", "floor at bound"}
    return Table(_DEPTH_HEADER, rows, numeric=numeric)


# ---------------------------------------------------------------------------------------------- compute-optimal


def compute_optimal(fit: FitOutcome) -> tuple[str, Table | None]:
    """(definition line, table) of the compute-optimal allocation of a two-variable law, if any."""
    co = (fit.data or {}).get("compute_optimal")
    if not isinstance(co, dict) or not isinstance(co.get("table"), list):
        return "", None

    def ci(v: Any) -> str:  # a bootstrap that failed throughout shows as [n/a, n/a]
        return f"[{fmt_num(v[0], 3)}, {fmt_num(v[1], 3)}]" if isinstance(v, list) and len(v) == 2 else ""

    rows = [[fmt_num(r.get("C"), 3), fmt_num(r.get("N_opt"), 3), ci(r.get("N_opt_ci95")), fmt_num(r.get("D_opt"), 3),
             ci(r.get("D_opt_ci95")), fmt_num(r.get("data_per_param"), 3), fmt_num(r.get("loss"))]
            for r in co["table"] if isinstance(r, dict)]
    parts = [str(co.get(k)) for k in ("C_definition", "k_source") if co.get(k)]
    parts += [f"{k.replace('_', ' ')} {fmt_num(co[k], 3)}" for k in ("N_opt_exponent", "D_opt_exponent")
              if co.get(k) is not None]
    return "; ".join(parts), Table(_CO_HEADER, rows) if rows else None


# ---------------------------------------------------------------------------------------------- per-gene


def hardest_easiest(best: GeneBest | None, n_named: int = 10) -> Table:
    """The best run's hardest and easiest genes, side by side."""
    rows: list[Row] = []
    if best is not None:
        ok = np.flatnonzero(np.isfinite(best.mse))
        order = ok[np.argsort(best.mse[ok], kind="stable")]
        k = min(n_named, len(order))
        for i, (h, e) in enumerate(zip(order[::-1][:k], order[:k])):
            rows.append([str(i + 1), best.genes[h], fmt_num(best.mse[h]), fmt_int(best.n[h]),
                         best.genes[e], fmt_num(best.mse[e]), fmt_int(best.n[e])])
    return Table(_GENE_HEADER, rows)


def gene_spread(sd: SweepData) -> Table:
    """Per run with per-gene errors (by size): the spread of its per-gene test MSE, and its bits."""
    info = sd.runs.set_index("run_id")

    def params(r: str) -> float:
        return float(info.loc[r, "params"]) if r in info.index and np.isfinite(info.loc[r, "params"]) else np.inf

    rows: list[Row] = []
    for rid in sorted(sd.per_gene, key=lambda r: (params(r), r)):
        pg = sd.per_gene[rid]
        seen = np.isfinite(pg.mse)
        fin = pg.mse[seen]
        if fin.size == 0:
            continue
        test = float(np.sum(fin * pg.n[seen]) / pg.n[seen].sum())
        q1, med, q3 = np.percentile(fin, [25, 50, 75])
        rows.append([rid, str(info.loc[rid, "size"]) if rid in info.index else "?", fmt_int(fin.size),
                     fmt_num(test), fmt_num(med), f"{fmt_num(q1)} to {fmt_num(q3)}", fmt_num(float(np.std(fin))),
                     fmt_num(gaussian_bits(test), 4), fmt_num(weighted_bits(pg.mse, pg.n), 4)])
    return Table(_GENE_RUN_HEADER, rows)
