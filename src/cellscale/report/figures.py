"""The report's figures: one function per figure, from the sweep and its fit to a titled,
captioned PNG (``doc.Figure``), or None when the sweep has nothing to draw. ``plots`` draws."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cellscale.data.manifest import finite_or_none
from cellscale.errors import FitError
from cellscale.report import plots, plots_genes
from cellscale.report.doc import Figure
from cellscale.report.fitting import ONE_D_LAWS, FitOutcome, eval_curve, headline_depth
from cellscale.report.fmt import floor_name, fmt_num
from cellscale.report.records import GeneBest, SweepData, gaussian_bits, weighted_bits
from cellscale.rules.lrgrid import select_lr

_PALETTE = {"gene_mean": "#ff7f0e", "bayes_linear": "#2ca02c", "knn": "#8c564b"}
_FLOOR_COLOR = "#d62728"


def _figure(key: str, title: str, caption: str, fig) -> Figure:
    return Figure(key, title, caption, plots.figure_png(fig))


def _headline_ok(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished runs at the headline depth (the depth of the fit and the baselines)."""
    ok = runs[runs["status"] == "ok"]
    head = headline_depth(runs)
    return ok if head is None else ok[ok["depth"] == head]


def _floor(fit: FitOutcome) -> plots.Floor | None:
    fd = fit.data or {}
    params, ci = fd.get("params") or {}, fd.get("ci95") or {}
    name = fd.get("floor_param") or floor_name(params)
    if not name or finite_or_none(params.get(name)) is None:
        return None
    lohi = ci.get(name) or [None, None]
    lo, hi = (finite_or_none(lohi[0]), finite_or_none(lohi[1])) if len(lohi) == 2 else (None, None)
    return plots.Floor(float(params[name]), lo, hi, label=f"fitted floor {name} = {fmt_num(params[name])}",
                       at_boundary=bool(fd.get("floor_at_boundary")))


def mse_refs(sd: SweepData) -> list[plots.RefLine]:
    """The baselines' MSEs on the fitted loss's cells (``SweepData.split``), and the simulator's
    Bayes floor when known."""
    where = sd.split
    refs = [plots.RefLine(v, f"{name.replace('_', '-')} baseline ({where}) = {fmt_num(v)}",
                          color=_PALETTE.get(name, "#7f7f7f"))
            for name, v in sd.refs(sd.baselines).items()]
    if sd.bayes_floor is not None:
        refs.append(plots.RefLine(sd.bayes_floor, f"true Bayes floor ({where}) = {fmt_num(sd.bayes_floor)}",
                                  color=_FLOOR_COLOR, style=":"))
    return refs


def loss_refs(sd: SweepData) -> list[plots.RefLine]:
    """The reference lines in the unit of the fitted loss: the MSE lines, or the likelihood's bits."""
    if sd.objective == "mse":
        return mse_refs(sd)
    return [plots.RefLine(v, f"{k.replace('_', '-')} {'' if k == 'bayes_floor' else 'baseline '}"
                          f"({sd.split}) = {fmt_num(v)} bits",
                          color=_PALETTE.get(k, _FLOOR_COLOR), style=":" if k == "bayes_floor" else "--")
            for k, v in sd.refs(sd.likelihood_refs).items()]


def loss_vs_params(sd: SweepData, fit: FitOutcome) -> Figure:
    cap = ("One point per run (seeds of a size jittered horizontally); black bars: mean and min-max over seeds. "
           "Blue: the fitted law with its 95% bootstrap band. Purple: the fitted floor with its 95% interval. "
           "Dashed: baselines on the validation cells.")
    if fit.error:
        cap += f" No law drawn: {fit.error}."
    elif fit.curve_error:
        cap += f" No curve drawn: {fit.curve_error}."
    if fit.note:
        cap += f" Note: {fit.note}."
    runs = sd.runs
    if fit.note and fit.used is not None:  # show the fitted subset against its own law
        runs = pd.concat([fit.used, runs[runs["status"] != "ok"]], ignore_index=True)
    if sd.objective != "mse":
        cap += (f" Loss: the {sd.objective} objective's validation loss in bits per masked gene (its floor is the "
                "entropy itself); the learning curves below are in bits too.")
    return _figure("loss_vs_params", "Validation loss against parameters", cap,
                   plots.loss_vs_params(runs, curve=fit.curve, floor=_floor(fit), refs=loss_refs(sd), y=sd.loss_col))


def learning_curves(sd: SweepData) -> Figure:
    baselines = [r for r in loss_refs(sd) if "baseline" in r.label]
    if sd.objective == "mse":
        return _figure("learning_curves", "Learning curves", "Validation MSE (solid, markers) and training loss "
                       "(faint) against cells seen, every run; dotted curves are runs that did not finish ok.",
                       plots.learning_curves(sd.metrics, sd.runs, refs=baselines))
    return _figure("learning_curves", "Learning curves", f"Validation loss of the {sd.objective} objective in bits "
                   "per masked gene (solid, markers) and training loss in bits (faint) against cells seen, every run; "
                   "dotted curves are runs that did not finish ok.",
                   plots.learning_curves(sd.metrics, sd.runs, refs=baselines, val="val_bits",
                                         ylabel="bits per masked gene",
                                         title="Learning curves (validation bits solid, training loss faint)"))


def _data_curves(fit: FitOutcome, data_runs: pd.DataFrame) -> dict[str, plots.Curve]:
    """The fitted two-variable law along training cells, one curve per model size."""
    ok = data_runs[(data_runs["status"] == "ok") & np.isfinite(data_runs["train_cells"])]
    if ok.empty or fit.result is None or fit.law in ONE_D_LAWS:
        return {}
    d = ok["train_cells"].to_numpy(float)
    grid = np.logspace(np.log10(d.min()) - 0.2, np.log10(d.max()) + 0.2, 60)
    out = {}
    for size, p in ok.groupby("size")["params"].median().items():
        try:
            y, lo, hi = eval_curve(fit.result, np.column_stack([np.full_like(grid, float(p)), grid]))
        except FitError:  # a law of other inputs (e.g. cells seen too): no curves
            return {}
        out[str(size)] = plots.Curve(grid, y, lo, hi)
    return out


def loss_vs_data(sd: SweepData, fit: FitOutcome) -> Figure | None:
    if _headline_ok(sd.runs)["train_cells"].nunique(dropna=False) <= 1:
        return None
    head = headline_depth(sd.runs)
    data_runs = (sd.runs if head is None else sd.runs[sd.runs["depth"] == head]).copy()
    if sd.full_train is not None:
        data_runs["train_cells"] = data_runs["train_cells"].fillna(sd.full_train)
    curves = _data_curves(fit, data_runs)
    return _figure("loss_vs_data", "Loss against training cells", f"{plots.loss_label(sd.loss_col)} against the "
                   "number of unique training cells, one line per model size (mean over seeds; dots are runs)"
                   + ("; dashed: the fitted L(N, D) law for each size with its 95% band." if curves else "."),
                   plots.loss_vs_data(data_runs, refs=loss_refs(sd), curves=curves, y=sd.loss_col,
                                      title="Loss against training cells, per model size",
                                      ylabel=plots.loss_label(sd.loss_col)))


def loss_vs_depth(sd: SweepData) -> Figure | None:
    if headline_depth(sd.runs) is None:
        return None
    y = "test_mse" if sd.split == "test" else "best_val_mse"  # the depth fits are of MSE tables
    names = {"gene_mean": f"gene-mean baseline ({sd.split}) of each depth",
             "bayes_linear": f"Bayes-linear ({sd.split}) of each depth"}
    refs = {label: {d: (b.get(key) or {}).get(sd.split) for d, b in sd.depth_baselines.items()}
            for key, label in names.items()}
    return _figure("loss_vs_depth", "Loss against sequencing depth",
                   f"{plots.loss_label(y)} against the fraction of the sequencing depth kept by binomial thinning (log "
                   "axis), one line per model size (mean over seeds; dots are runs). Dashed: each thinned dataset's "
                   f"own baselines on its {'test' if sd.split == 'test' else 'validation'} cells.",
                   plots.loss_vs_depth(sd.runs, refs={k: v for k, v in refs.items()
                                                      if any(x is not None for x in v.values())}, y=y))


def _isoflop(fit: FitOutcome, co: dict[str, Any]) -> plots.IsoFlop | None:
    """Iso-FLOP profiles of a chinchilla fit: budgets log-spaced over the fitted runs' C = k N D."""
    params = (fit.data or {}).get("params") or {}
    theta = {k: finite_or_none(params.get(k)) for k in ("A", "B", "E", "alpha", "beta")}
    k = finite_or_none(co.get("k"))
    if fit.law != "chinchilla" or any(v is None for v in theta.values()) or k is None or k <= 0:
        return None
    if min(theta["alpha"], theta["beta"], theta["A"], theta["B"]) <= 0:
        return None
    C = _fitted_compute(fit, k)
    if C.size == 0:
        C = np.array([float(r["C"]) for r in co.get("table") or [] if isinstance(r, dict) and finite_or_none(r.get("C"))])
    if C.size == 0:
        return None
    lo, hi = np.log10(C.min()), np.log10(C.max())
    budgets = [float(10 ** lo)] if hi - lo < 1e-9 else [float(v) for v in np.logspace(lo, hi, 4)]
    return plots.IsoFlop(k=k, budgets=budgets, **theta)


def _fitted_compute(fit: FitOutcome, k: float) -> np.ndarray:
    """C = k N D of the fitted runs (empty when the law was not fitted against two columns)."""
    used = fit.used if fit.used is not None else pd.DataFrame()
    x = list((fit.data or {}).get("x") or ["params", "train_cells"])
    if len(x) != 2 or not all(c in used for c in x):
        return np.array([])
    C = k * used[x[0]].to_numpy(float) * used[x[1]].to_numpy(float)
    return C[np.isfinite(C) & (C > 0)]


def compute_frontier(fit: FitOutcome) -> Figure | None:
    co = (fit.data or {}).get("compute_optimal")
    if not (isinstance(co, dict) and isinstance(co.get("table"), list) and co["table"]):
        return None
    iso = _isoflop(fit, co)
    cap = ("Model size N* and training cells D* that minimise the fitted L(N, D) at each compute budget, with "
           "95% bootstrap bands. " + str(co.get("C_definition", "")))
    if iso is not None:
        cap += (". Right: iso-FLOP profiles, the predicted loss against N along D = C / (k N) for "
                f"{len(iso.budgets)} budgets log-spaced across the runs' compute range (C = k N D), "
                "the compute-optimal N*(C) starred")
    return _figure("compute_frontier", "Compute-optimal frontier" + (" and iso-FLOP profiles" if iso is not None else ""),
                   cap, plots.compute_frontier(co["table"], isoflop=iso))


def _entropy_refs(sd: SweepData, best: GeneBest | None) -> dict[str, float | None]:
    """For scale: the same Gaussian reading of the baseline, the true floor and the best runs."""
    refs = {}
    if sd.gene_mean is not None:
        refs[f"gene-mean baseline ({sd.split})"] = gaussian_bits(sd.gene_mean)
    if sd.bayes_floor is not None:
        refs[f"true Bayes floor ({sd.split})"] = gaussian_bits(sd.bayes_floor)
    ok = _headline_ok(sd.runs)
    mse = "test_mse" if sd.split == "test" else "best_val_mse"
    ok = ok[np.isfinite(pd.to_numeric(ok["best_val_mse"], errors="coerce"))] if len(ok) else ok
    if len(ok):  # the run chosen on validation, scored on the fitted loss's cells
        chosen = float(ok.loc[pd.to_numeric(ok["best_val_mse"]).idxmin(), mse])
        if np.isfinite(chosen):
            refs[f"best run on validation ({sd.split} MSE)"] = gaussian_bits(chosen)
    if best is not None:
        refs[f"{best.run_id} test, homoscedastic"] = gaussian_bits(best.test_mse)
        refs[f"{best.run_id} test, per-gene"] = weighted_bits(best.mse, best.n)
    return refs


def entropy(sd: SweepData, fit: FitOutcome, best: GeneBest | None) -> Figure:
    eb = (fit.data or {}).get("entropy_bits") or {}
    eb = eb if isinstance(eb, dict) else {}
    return _figure("entropy", "Entropy per masked gene", "Homoscedastic-Gaussian entropy 0.5 log2(2 pi e MSE) in bits "
                   "per masked gene: the fitted floor with its 95% interval, and for scale the same figure for "
                   "reference MSEs.",
                   plots_genes.entropy_summary(finite_or_none(eb.get("gaussian")), eb.get("ci95"),
                                         refs=_entropy_refs(sd, best)))


def per_gene(sd: SweepData, best: GeneBest | None) -> Figure | None:
    if not sd.per_gene:
        return None
    info = sd.runs.set_index("run_id")
    per_run = []
    for rid, pg in sd.per_gene.items():
        size = str(info.loc[rid, "size"]) if rid in info.index else "?"
        par = finite_or_none(info.loc[rid, "params"]) if rid in info.index else None
        per_run.append(plots_genes.GeneErrors(rid, size, par if par is not None else np.inf, pg.genes, pg.mse))
    best_errors = None if best is None else plots_genes.GeneErrors(best.run_id, best.size, np.nan, best.genes, best.mse)
    return _figure("per_gene", "Per-gene test error", "Left: the per-gene test MSE of the best run by validation MSE"
                   + (f" ({best.run_id})" if best else "") + ", sorted from the easiest to the hardest gene to "
                   "reconstruct, the 10 hardest (red) and 10 easiest (green) named. Right: the spread of per-gene "
                   "test MSE of every run with per-gene errors (box: quartiles, whiskers 1.5 IQR), ordered and "
                   "coloured by size.", plots_genes.per_gene_errors(best_errors, per_run))


def loss_vs_lr(sd: SweepData) -> Figure | None:
    ok = _headline_ok(sd.runs)
    sel = select_lr(ok, loss_col=sd.choice_col)
    if not sel.choices:
        return None
    chosen = {c.size: float(sel.kept.loc[sel.kept["size"] == c.size, "lr"].iloc[0]) for c in sel.choices}
    edge = [c.size for c in sel.at_edge]
    cap = ("One point per run; lines: the mean over seeds per size; ringed: each size's rate chosen on validation "
           "loss (the law is fitted to those runs only; test loss is never used for the choice).")
    if edge:
        cap += (f" For {', '.join(edge)} the best rate is the first or last of its grid: a better one may lie "
                "beyond it, so widen sweep.lr_multipliers.")
    return _figure("loss_vs_lr", "Learning-rate search", cap, plots.loss_vs_lr(ok, chosen=chosen, edge=edge,
                                                                                   y=sd.loss_col))


def make_figures(sd: SweepData, fit: FitOutcome, best: GeneBest | None = None) -> list[Figure]:
    """Every figure the sweep has, in the order the report shows them."""
    figures = [loss_vs_params(sd, fit), loss_vs_lr(sd), learning_curves(sd), loss_vs_data(sd, fit),
               loss_vs_depth(sd), compute_frontier(fit), entropy(sd, fit, best), per_gene(sd, best)]
    return [f for f in figures if f is not None]
