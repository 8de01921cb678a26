"""The report's downstream room: the runs' embedding scores (results.csv's ``probe_*``, ``knn_*``,
``batch_mixing_*``; written by the sweep's downstream step), the reference embeddings'
(``SWEEP_DIR/downstream.json``), a law fitted to the downstream error against parameters, its
figures, its section, and the sentence "What this means" says about it.

The downstream error is ``1 - probe macro-F1`` on the validation cells (the loss law is fitted on
validation too; test scores are shown, never fitted). A perfect probe (error 0) is counted as
``ERROR_FLOOR`` so that the log-space fit is defined. The law is ``power-floor`` (the floor is
where downstream saturates) with the sweep's fit method, bootstrap and interval settings, on
the runs the loss law uses (``fitting.fit_subset``).

Whether downstream tracks the loss is read off the numbers (``tracking_sentence``): the smallest
size whose mean macro-F1 is within ``SATURATION_TOL`` of the best size's is where downstream
saturates; if every larger size stays that close and the validation loss still falls by more than
``LOSS_STILL_FALLING`` from there on, downstream saturated first; otherwise, the Spearman correlation of loss and
downstream error says whether it tracks (>= ``TRACKS_RHO``) or not.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cellscale.config import FitConfig, depth_label
from cellscale.report import plots, plots_downstream
from cellscale.report.doc import Fig, Figure, Para, Section, Table
from cellscale.report.fitting import FitOutcome, fit_into, fit_subset, headline_depth
from cellscale.report.fmt import fmt_int, fmt_num
from cellscale.report.meaning import LOSS_WORDS, best_model
from cellscale.report.records import SweepData
from cellscale.rules.lrgrid import loss_column, select_lr

REFS_FILE = "downstream.json"  # written by cellscale.sweep.scoring
ERROR_FLOOR = 1e-3
SATURATION_TOL = 0.01  # macro-F1 points
LOSS_STILL_FALLING = 0.02  # relative
TRACKS_RHO = 0.5
REF_NAMES = {"pca50": "PCA-50 of the log values", "hvg": "the HVG log values"}
_REF_COLORS = {"pca50": "#ff7f0e", "hvg": "#2ca02c"}


@dataclass
class Downstream:
    """What the downstream section shows; ``skipped`` says why it shows nothing."""

    skipped: str | None = None
    scored: pd.DataFrame = field(default_factory=pd.DataFrame)  # ok runs at the headline depth with scores
    used: pd.DataFrame = field(default_factory=pd.DataFrame)  # the runs the law is fitted to
    refs: dict[str, dict[str, Any]] = field(default_factory=dict)
    fit: FitOutcome | None = None
    note: str | None = None
    label: str | None = None
    batch_key: str | None = None


def _read_refs(sd: SweepData, depth: float) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads((sd.sweep_dir / REFS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    block = ((doc or {}).get("references") or {}).get(depth_label(depth)) or {}
    return {k: v for k, v in block.items() if isinstance(v, dict) and v.get("probe_val_f1") is not None}


def _skip_reason(ok: pd.DataFrame) -> str:
    notes = [str(n) for n in ok.get("downstream_note", pd.Series(dtype=object)).dropna().unique() if str(n)]
    if notes:
        return notes[0].removeprefix("skipped: ") + (f" (and {len(notes) - 1} other reason(s))" if len(notes) > 1 else "")
    return ("no run has downstream scores (a sweep written before cellscale scored embeddings): run "
            "`cellscale downstream SWEEP_DIR`, then the report again")


def _fit_error_law(used: pd.DataFrame, fc: dict[str, Any]) -> FitOutcome:
    method = str(fc["method"])
    return fit_into(FitOutcome(law="power-floor", method=method, used=used), law="power-floor", method=method,
                    x=["params"], y="downstream_error", bootstrap=int(fc["bootstrap"]), seed=int(fc["seed"]),
                    interval=fc.get("interval"))


def analyse(sd: SweepData) -> Downstream:
    """The downstream scores of the sweep's finished runs at the headline depth, and their law."""
    runs = sd.runs
    ok = runs[runs["status"] == "ok"] if len(runs) else runs
    if ok.empty:
        return Downstream(skipped="no run finished ok")
    head = headline_depth(runs)
    at_head = ok if head is None else ok[ok["depth"] == head]
    f1 = pd.to_numeric(at_head.get("probe_val_f1", pd.Series(np.nan, index=at_head.index)), errors="coerce")
    scored = at_head[np.isfinite(f1)].copy()
    if scored.empty:
        return Downstream(skipped=_skip_reason(at_head))
    scored["downstream_error"] = np.maximum(1.0 - scored["probe_val_f1"].astype(float), ERROR_FLOOR)
    fc = {**FitConfig().model_dump(), **sd.fit_config}
    used, note = fit_subset(scored, "power-floor", sd.full_train, keep_unconverged=bool(fc["keep_unconverged"]))
    first = scored.iloc[0]
    out = Downstream(scored=scored, used=used, refs=_read_refs(sd, head if head is not None else 1.0), note=note,
                     label=str(first.get("downstream_label")), batch_key=_text(first.get("downstream_batch_key")))
    out.fit = _fit_error_law(used, fc) if len(used) else FitOutcome("power-floor", str(fc["method"]),
                                                                      error="no run to fit")
    return out


def _text(v: Any) -> str | None:
    return None if v is None or (isinstance(v, float) and not np.isfinite(v)) or str(v) == "" else str(v)


# ------------------------------------------------------------------------------------------ the sentence
def _by_size(used: pd.DataFrame, loss_col: str) -> pd.DataFrame:
    return (used.groupby("size").agg(params=("params", "median"), loss=(loss_col, "mean"),
                                     f1=("probe_val_f1", "mean")).sort_values("params"))


def tracking_sentence(d: Downstream, loss_col: str) -> str:
    """One sentence, from the numbers: does the downstream score track the loss or saturate first."""
    if d.skipped or d.used.empty:
        return ""
    sizes = _by_size(d.used, loss_col)
    if len(sizes) < 2:
        return "With one model size scored downstream there is no trend to compare with the loss."
    from scipy.stats import spearmanr

    with warnings.catch_warnings():  # a constant column: no rank correlation (nan)
        warnings.simplefilter("ignore")
        rho = float(spearmanr(d.used[loss_col], 1.0 - d.used["probe_val_f1"]).statistic)
    r = f"{rho:+.2f}" if np.isfinite(rho) else "n/a"
    what = LOSS_WORDS.get(loss_col, loss_col)
    best = sizes["f1"].max()
    star = sizes.index[sizes["f1"] >= best - SATURATION_TOL][0]
    after = sizes.loc[star:]
    falling = (after["loss"].iloc[0] - after["loss"].min()) / after["loss"].iloc[0]
    small, large = sizes.iloc[0], sizes.iloc[-1]
    plateau = bool((after["f1"] >= best - SATURATION_TOL).all())  # it stays there: a decline is no plateau
    if star != sizes.index[-1] and plateau and falling > LOSS_STILL_FALLING:
        return (f"Downstream saturates before the loss: the probe's macro-F1 on {d.label} is within "
                f"{SATURATION_TOL:g} of its best ({best:.3f}) from {star} ({fmt_int(sizes.loc[star, 'params'])} "
                f"parameters) on, while the {what} falls a further {falling:.0%} beyond it (Spearman "
                f"rho of loss and probe error {r}).")
    if np.isfinite(rho) and rho >= TRACKS_RHO:
        return (f"Downstream tracks the loss: the probe's macro-F1 on {d.label} goes from {small['f1']:.3f} "
                f"({small.name}) to {large['f1']:.3f} ({large.name}) as the {what} goes from "
                f"{fmt_num(small['loss'])} to {fmt_num(large['loss'])} (Spearman rho of loss and probe error "
                f"{r}), with no plateau of the probe before the loss's.")
    return (f"Downstream does not follow the loss: the probe's macro-F1 on {d.label} goes from {small['f1']:.3f} "
            f"({small.name}) to {large['f1']:.3f} ({large.name}) while the {what} goes from "
            f"{fmt_num(small['loss'])} to {fmt_num(large['loss'])} (Spearman rho of loss and probe error {r}).")


def reference_sentence(d: Downstream) -> str:
    """Whether the best model's embedding beats the reference embeddings on the probe: the best size
    chosen on validation loss (``meaning.best_model``, as every other sentence names it), its mean
    probe macro-F1 over its seeds; not the highest F1 of any run, which would be a choice on the
    very score it reports."""
    if d.skipped or d.scored.empty or not d.refs:
        return ""
    best = best_model(d.scored)
    if best is None:
        return ""
    chosen = select_lr(d.scored, loss_col=loss_column(d.scored))  # its seeds at its chosen rate
    kept = chosen.kept if chosen.choices else d.scored
    mine = kept[kept["size"].astype(str) == str(best["size"])]
    if "train_cells" in mine and "train_cells" in best:
        mine = mine[(mine["train_cells"] == best["train_cells"]) | (mine["train_cells"].isna() & pd.isna(best["train_cells"]))]
    f1 = float(pd.to_numeric(mine["probe_val_f1"], errors="coerce").mean())
    parts = [f"{REF_NAMES.get(k, k)} ({float(v['probe_val_f1']):.3f})" for k, v in d.refs.items()]
    beaten = [k for k, v in d.refs.items() if f1 > float(v["probe_val_f1"])]
    if len(beaten) == len(d.refs):
        verdict = "beats"
    elif beaten:
        verdict = "beats only some of"
    else:
        verdict = "does not beat"
    seeds = f", mean of {len(mine)} seeds" if len(mine) > 1 else ""
    return (f"The best model's embedding ({best['size']}, chosen on validation loss; probe macro-F1 {f1:.3f}{seeds}) "
            f"{verdict} the reference embeddings: " + ", ".join(parts) + ".")


def meaning_text(d: Downstream, loss_col: str) -> str:
    """The downstream sentences of "What this means" ("" when there are no scores)."""
    return " ".join(t for t in (tracking_sentence(d, loss_col), reference_sentence(d)) if t)


# ------------------------------------------------------------------------------------------ figures
def _refs(d: Downstream, key: str, transform) -> list[plots.RefLine]:
    return [plots.RefLine(transform(float(v[key])), f"{REF_NAMES.get(k, k)}: probe macro-F1 {float(v[key]):.3f}",
                          color=_REF_COLORS.get(k, "#7f7f7f"))
            for k, v in d.refs.items() if v.get(key) is not None]


def figures(d: Downstream, sd: SweepData, loss_fit: FitOutcome, loss_refs: list[plots.RefLine]) -> list[Figure]:
    """The loss law beside the downstream law, and the downstream score against the loss."""
    if d.skipped:
        return []
    loss_label = plots.loss_label(sd.loss_col)
    fit = d.fit or FitOutcome("power-floor", "")
    cap = ("Left: the fitted loss against parameters with its fitted law (as above). Right: the downstream "
           f"error, 1 - macro-F1 of a logistic-regression probe on '{d.label}' fitted on the training cells' "
           "embeddings and scored on the validation cells, with the power-floor law fitted to it and its 95% "
           "bootstrap band; horizontal lines: the same probe on the reference embeddings.")
    if fit.error:
        cap += f" No downstream law drawn: {fit.error}."
    used = d.used if len(d.used) else d.scored
    pair = plots_downstream.loss_and_downstream(
        used, loss_col=sd.loss_col, loss_curve=loss_fit.curve, error_curve=fit.curve, loss_refs=loss_refs,
        error_refs=_refs(d, "probe_val_f1", lambda f1: max(1.0 - f1, ERROR_FLOOR)), loss_label=loss_label)
    scatter = plots_downstream.downstream_vs_loss(d.scored, loss_col=sd.loss_col,
                                                  refs=_refs(d, "probe_val_f1", lambda f1: f1), loss_label=loss_label)
    return [Figure("downstream_vs_params", "Loss and downstream error against model size", cap,
                   plots.figure_png(pair)),
            Figure("downstream_vs_loss", "Downstream score against validation loss",
                   "One point per finished run: the probe's macro-F1 on the validation cells against the run's best "
                   "validation loss (lower loss to the right); open triangles: kNN label transfer's macro-F1. "
                   "Horizontal lines: the probe on the reference embeddings.", plots.figure_png(scatter))]


# ------------------------------------------------------------------------------------------ section
_SCORE_COLS = ("probe_val_f1", "probe_test_f1", "knn_val_f1", "knn_test_f1", "batch_mixing_val",
               "batch_mixing_test")
_HEADER = ["embedding", "size", "params", "val loss", "probe F1 val", "probe F1 test", "kNN F1 val",
           "kNN F1 test", "batch mixing val", "batch mixing test"]


def _cell(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return f"{f:.3f}" if np.isfinite(f) else "n/a"


def score_table(d: Downstream, loss_col: str) -> Table:
    runs = d.scored.sort_values(["params", "seed", "run_id"])
    rows = [[str(r["run_id"]), str(r["size"]), fmt_int(r["params"]), fmt_num(r[loss_col]),
             *(_cell(r.get(c)) for c in _SCORE_COLS)] for _, r in runs.iterrows()]
    rows += [[f"{REF_NAMES.get(k, k)} (reference)", "", "", "", *(_cell(v.get(c)) for c in _SCORE_COLS)]
             for k, v in d.refs.items()]
    return Table(_HEADER, rows, numeric=frozenset(_HEADER[2:]))


def _law_text(fit: FitOutcome | None) -> str:
    if fit is None or fit.error:
        return f"No downstream law was fitted: {fit.error if fit else 'no fit'}."
    fd = fit.data or {}
    params, ci = fd.get("params") or {}, fd.get("ci95") or {}

    def with_ci(name: str) -> str:
        lohi = ci.get(name) or [None, None]
        return f"{fmt_num(params.get(name))} [{fmt_num(lohi[0])}, {fmt_num(lohi[1])}]"

    text = (f"Downstream law (power-floor, {fit.method}, on {fd.get('n_points')} runs; 95% intervals, "
            f"{fd.get('interval') or 'default'} method over {fmt_int(fd.get('bootstrap'))} bootstrap resamples): "
            f"exponent alpha = {with_ci('alpha')}, floor c = {with_ci('c')} (the downstream error no model size removes).")
    if fd.get("floor_at_boundary"):
        text += " The floor sits on the bound of its search range: the runs do not pin it down."
    nf = fd.get("no_floor") or {}
    if nf.get("delta_aic") is not None:
        text += (f" AIC favours {'the floor' if nf['delta_aic'] > 0 else 'a plain power law without a floor'} "
                 f"(delta AIC {fmt_num(nf['delta_aic'], 3)}).")
    return text


def _protocol(d: Downstream) -> str:
    batch = (f"batch mixing on '{d.batch_key}': kNN batch entropy over the entropy with batch labels permuted "
             "(1 = as mixed as chance, 0 = every neighbourhood one batch)") if d.batch_key else \
        "no batch mixing (no batch column with two values or more)"
    return (f"Each finished run's best checkpoint embeds every cell (the mean over its genes of the final hidden "
            f"state, nothing masked). On '{d.label}', a logistic-regression probe and 15-nearest-neighbour label "
            "transfer are fitted on the training cells' embeddings only and scored on the validation and test cells "
            f"(macro-F1); {batch}. The same for two reference embeddings: PCA-50 of the log1p values and the HVG "
            "values themselves (SWEEP_DIR/downstream.json).")


def sections(d: Downstream, loss_col: str) -> list[Section]:
    heading = "Downstream: does a lower loss buy better cell embeddings?"
    if d.skipped:
        return [Section(heading, [Para(f"Skipped: {d.skipped}.")])]
    blocks = [Para(_protocol(d)), Para(_law_text(d.fit) + (f" Note: {d.note}." if d.note else "")),
              Fig("downstream_vs_params"), Fig("downstream_vs_loss"), score_table(d, loss_col)]
    return [Section(heading, blocks)]


def fit_record(d: Downstream) -> dict[str, Any]:
    """downstream_fit.json: the downstream law's fit object, or why there is none."""
    if d.skipped:
        return {"skipped": d.skipped}
    rec = d.fit.record if d.fit is not None else {"error": "no fit"}
    return {**rec, "y_definition": f"1 - probe macro-F1 on the validation cells ('{d.label}'), at least {ERROR_FLOOR:g}",
            "references": d.refs}
