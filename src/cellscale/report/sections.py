"""The report's one list of sections: every heading, sentence, table and figure reference, in
order. Both backends (``render``) draw this list; no prose is written anywhere else but in
``methods`` (the generated paragraphs) and the figure captions (``figures``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from cellscale.config import depth_label
from cellscale.report import data_axis, downstream, tables
from cellscale.report.data_axis import DataOutcome
from cellscale.report.doc import Bullets, Callout, Code, Document, Fig, Figure, Para, Section
from cellscale.report.downstream import Downstream
from cellscale.report.fitting import FitOutcome, headline_depth
from cellscale.report.meaning import meaning_paragraph
from cellscale.report.methods import methods_paragraph
from cellscale.report.records import GeneBest, SweepData
from cellscale.report.verdicts import verdict_lines
from cellscale.rules.lossbounds import LOG_VAR_RANGE
from cellscale.rules.lrgrid import select_lr

BITS_NOTE = ("Bits are the differential entropy of a Gaussian with variance equal to the MSE (0.5 log2(2 pi e MSE)): "
             "the homoscedastic-Gaussian figure, which depends on the units of the normalised log1p values and is an "
             "upper bound on a per-gene (heteroscedastic) figure.")
BITS_LIKELIHOOD_NOTE = ("Bits here are the likelihood objective's own loss, its nats per masked gene divided by ln 2: the "
                        "fitted floor is then the entropy itself, with no Gaussian reading of an MSE; the figure's "
                        "Gaussian reading of the MSEs is for scale only.")


@dataclass
class Findings:
    """What the sections describe: the sweep, its fits and the best run's per-gene errors."""

    sd: SweepData
    fit: FitOutcome
    depth_fits: dict[float, FitOutcome]
    best: GeneBest | None
    figures: dict[str, Figure]
    downstream: Downstream | None = None  # the embeddings' scores (report/downstream.py)
    data: DataOutcome | None = None  # the joint L(N, D) on the cooldown branches (report/data_axis.py)

    @property
    def status_counts(self) -> dict[str, int]:
        runs = self.sd.runs
        return {k: int(v) for k, v in runs["status"].value_counts().items()} if len(runs) else {}


def _warnings(f: Findings) -> list[str]:
    out = []
    if f.fit.data and f.fit.data.get("floor_at_boundary"):
        out.append("The fitted floor sits on the boundary of its search range: it is set by the fitting bounds, "
                   "not by the data. Do not report it as the irreducible loss.")
    bad = {k: v for k, v in f.status_counts.items() if k != "ok"}
    if bad:
        out.append(f"{sum(bad.values())} of {len(f.sd.runs)} runs did not finish ok ("
                   + ", ".join(f"{v} {k}" for k, v in bad.items())
                   + "); they are listed in the run table and excluded from the fit.")
    if f.fit.error:
        out.append(f"No scaling law was fitted: {f.fit.error}.")
    man = f.sd.manifest
    if man is not None and man.preprocessing.leaks_masked_total:
        share = man.preprocessing.kept_count_share
        out.append(f"The kept genes hold {100 * share['median']:.1f}% of a median cell's counts (at least "
                   f"{100 * share['min']:.1f}%): the values are normalised by the library size over all genes, so the "
                   "visible genes give away the masked genes' total and every loss here is lower than on data "
                   "that keeps fewer genes (docs/own-data.md, \"Keeping every gene\").")
    out += _clamp_warning(f.sd.runs)
    edge = select_lr(f.sd.runs[f.sd.runs["status"] == "ok"], loss_col=f.sd.choice_col).at_edge
    if edge:
        out.append("The best learning rate sits on the edge of its grid for " + ", ".join(c.size for c in edge)
                   + ": those points may not be at their optimum; widen sweep.lr_multipliers.")
    return out


CLAMP_WARN = 0.01  # a share of masked positions on the head's clamp worth a warning


def _clamp_warning(runs: pd.DataFrame) -> list[str]:
    """Runs whose likelihood head puts more than ``CLAMP_WARN`` of the test split's masked positions
    on its clamp (``cellscale.rules.lossbounds``): their bits report the clamp there, not the data."""
    if "clamp_share" not in runs:
        return []
    share = pd.to_numeric(runs["clamp_share"], errors="coerce")
    hit = runs[share > CLAMP_WARN]
    if hit.empty:
        return []
    named = ", ".join(f"{r.run_id} ({100 * s:.1f}%)" for r, s in zip(hit.itertuples(), share[hit.index]))
    return [f"{len(hit)} run(s) predict the variance (or dispersion) of more than {100 * CLAMP_WARN:g}% of the "
            f"masked test positions on the head's clamp: {named}. There the loss is set by the clamp (a log-variance, "
            f"or log inverse dispersion, held to {LOG_VAR_RANGE[0]:g}..{LOG_VAR_RANGE[1]:g}), not by the data, so their bits are not the data's entropy "
            "(docs/objectives.md, \"Negative bits and the clamp\")."]


def _headline(f: Findings) -> tuple[pd.DataFrame, dict[str, float]]:
    """The runs of the headline depth (the fit's), and the baselines beside them: on the fitted
    loss's cells (``SweepData.split``) and in its unit (MSE, or the likelihood's bits)."""
    sd, runs = f.sd, f.sd.runs
    head = headline_depth(runs)  # the baseline and the fit are the headline depth's: so are the runs
    if head not in (None, 1.0):
        return runs[runs["depth"] == head], {}
    if sd.unit == "bits":
        refs = sd.refs({k: v for k, v in sd.likelihood_refs.items() if k != "bayes_floor"})
    else:
        refs = sd.refs(sd.baselines)
    return (runs if head is None else runs[runs["depth"] == head]), refs


def _verdicts(f: Findings) -> Bullets:
    runs, baselines = _headline(f)
    fit = f.fit.data if f.fit.data is not None else {"error": f.fit.error or "no fit"}
    return Bullets(verdict_lines(runs, fit, baselines, prediction=data_axis.prediction_clause(f.data)))


def _meaning(f: Findings) -> str:
    runs, baselines = _headline(f)
    text = meaning_paragraph(runs, f.fit.data, bayes_floor=f.sd.true_floor, fit_error=f.fit.error,
                             n_masked=f.sd.n_masked, baselines=baselines)
    extra = [data_axis.meaning_text(f.data)]
    extra.append(downstream.meaning_text(f.downstream, f.sd.loss_col) if f.downstream is not None else "")
    return " ".join([text, *(e for e in extra if e)])


def _methods(f: Findings) -> str:
    sd = f.sd
    extra = {}
    if sd.sweep_meta and sd.sweep_meta.get("config_hash"):
        extra["config hash"] = sd.sweep_meta["config_hash"]
    if sd.dataset_dir:
        extra["dataset"] = str(sd.dataset_dir)
    text = methods_paragraph(sd.config, sd.manifest, sd.runs, fit=f.fit.data, fit_note=f.fit.note, extra=extra)
    data = data_axis.methods_text(f.data)
    return f"{text} {data}" if data else text


def _gene_text(sd: SweepData, best: GeneBest | None) -> str:
    if not sd.per_gene:
        return ("No per-gene errors: no run has a per_gene.json (runs written by an older cellscale, or runs "
                "that failed before a best checkpoint).")
    text = ("Test MSE of each gene over its masked positions under the fixed evaluation mask, at each run's best "
            "checkpoint (runs/<id>/per_gene.json).")
    if best is None:
        return text + " No finished ok run has per-gene errors, so no best run is described."
    n = int(np.isfinite(best.mse).sum())
    text += (f" Best run by validation MSE: {best.run_id} ({best.size}); {n} of {len(best.genes)} genes scored"
             + (f", {len(best.genes) - n} never masked on the test split" if n < len(best.genes) else "") + ".")
    if best.note:
        text += f" Note: {best.note}."
    return text


def _depth_text(f: Findings) -> str:
    law = next(iter(f.depth_fits.values())).law
    head = headline_depth(f.sd.runs)
    return ("Each depth is the dataset with every count binomially thinned to that fraction of the reads "
            "(library sizes thinned exactly over all genes, then renormalised), so a run at depth f is trained "
            "and scored on the noisier measurement, validation cells included; its baselines change with it. "
            f"The '{law}' law is fitted to each depth's runs on its own (rows below, fit.json 'by_depth'); the "
            f"headline fit above uses depth {depth_label(head if head is not None else 1.0)} only. A floor that "
            "rises as depth falls is measurement noise that no model size removes.")


def _fit_sections(f: Findings) -> list[Section]:
    fit = f.fit
    if fit.error:
        blocks = [Callout("No fit:", fit.error, quote=False)]
    else:
        blocks = [Para(["Law ", Code(fit.law), ", method ", Code(fit.method), "."]), tables.fit_table(fit, f.sd)]
    out = [Section("The fit", blocks)]
    definition, co_table = tables.compute_optimal(fit)
    if co_table is not None:
        out.append(Section("Compute-optimal allocation", [Para(definition), co_table], level=3, joined=True))
    out.append(Section(None, [Fig("compute_frontier")]))
    return out


def _entropy_section(f: Findings) -> Section:
    table = tables.entropy_table(f.fit, f.sd, f.best)
    first = table if table.rows else Para("No entropy estimate: there is no fit.")
    note = BITS_LIKELIHOOD_NOTE if (f.fit.data or {}).get("loss_unit") == "bits" else BITS_NOTE
    return Section("Entropy per masked gene", [first, Para(note), Fig("entropy")])


def _depth_sections(f: Findings) -> list[Section]:
    table = tables.depth_table(f.depth_fits, f.sd)
    if not table.rows:
        return []
    return [Section("Sequencing depth", [Para(_depth_text(f)), Fig("loss_vs_depth"), table])]


def _gene_sections(f: Findings) -> list[Section]:
    out = [Section("Per-gene error", [Para(_gene_text(f.sd, f.best)), Fig("per_gene")])]
    hardest = tables.hardest_easiest(f.best)
    if hardest.rows:
        out.append(Section("Hardest and easiest genes", [hardest], level=3))
    spread = tables.gene_spread(f.sd)
    if spread.rows:
        out.append(Section("Spread of per-gene error by run", [spread], level=3))
    return out


def _runs_section(f: Findings) -> Section:
    counts = ", ".join(f"{v} {k}" for k, v in f.status_counts.items())
    return Section("Runs", [Para(f"{counts or 'no runs'}. Runs that diverged or failed are listed with their error "
                                 "and are not fitted."), tables.run_table(f.sd.runs)], joined=True)


def sections(f: Findings) -> list[Section]:
    out = [Section("What this means", [_verdicts(f), Para(_meaning(f), box=True),
                                       *(Callout("Warning:", w) for w in _warnings(f))])]
    if f.sd.notes:
        out.append(Section("Missing or incomplete inputs", [Bullets(list(f.sd.notes))], level=3, joined=True))
    out.append(Section("Scaling with model size", [Fig("loss_vs_params")]))
    if "loss_vs_lr" in f.figures:
        out.append(Section("Learning-rate search", [Fig("loss_vs_lr")]))
    if f.downstream is not None:
        out += downstream.sections(f.downstream, f.sd.loss_col)
    out += _fit_sections(f)
    out.append(_entropy_section(f))
    out += data_axis.sections(f.data)
    out.append(Section("Learning curves", [Fig("learning_curves")]))
    if "loss_vs_data" in f.figures:
        out.append(Section("Scaling with data", [Fig("loss_vs_data")]))
    out += _depth_sections(f) + _gene_sections(f)
    out.append(_runs_section(f))
    out.append(Section("Methods", [Para(_methods(f))]))
    return out


def document(f: Findings) -> Document:
    """The whole report: title, provenance lines and the sections."""
    cfg = f.sd.config or {}
    meta = [f"Sweep directory: {f.sd.sweep_dir.resolve()}",
            f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"]
    if cfg.get("description"):
        meta.insert(0, str(cfg["description"]))
    return Document(title=f"cellscale report: {cfg.get('name') or f.sd.sweep_dir.name}", meta=meta,
                    sections=sections(f), figures=f.figures)
