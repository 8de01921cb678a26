"""The generated methods paragraph of a sweep (its plain-language summary is ``report.meaning``).

It is built from the dumped StudyConfig (a dict), the dataset manifest (``Manifest``, or its
dict), the results table and the fit dictionary, and returns plain text; the renderers escape it.
Every fact comes from those inputs: what is missing is said to be missing, never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from cellscale.config import FitConfig, ModelConfig, TrainConfig
from cellscale.data.manifest import Manifest
from cellscale.fit.defaults import METHOD_DESCRIPTIONS
from cellscale.fit.intervals import DESCRIPTIONS, default_interval
from cellscale.fit.laws import LAWS
from cellscale.report.fmt import fmt_int, fmt_num, resample_failures
from cellscale.rules.lrgrid import FITTED_COLUMN
from cellscale.rules.plateau import budget_text
from cellscale.rules.schedule import averaging_text, lr_grid_text, lr_rule_text, schedule_text

__all__ = ["methods_paragraph"]


def _given(value: Any, fallback: Any) -> Any:
    """The manifest's value when it records one, else the sweep config's."""
    return fallback if value is None else value


def _train_config(train: Mapping[str, Any]) -> TrainConfig | None:
    """The sweep's TrainConfig (its defaults where the dump is silent); None if it does not parse."""
    try:
        return TrainConfig(**train)
    except ValueError:
        return None


def _lr_text(train: Mapping[str, Any], runs: pd.DataFrame | None) -> str:
    cfg = _train_config(train)
    text = lr_rule_text(cfg) if cfg is not None else "peak learning rate as configured (the config does not parse)"
    if runs is not None and "lr" in runs and "size" in runs:
        used = runs.dropna(subset=["lr"]).groupby("size")["lr"].first()
        if len(used):
            order = runs.groupby("size")["params"].median().sort_values().index
            used = used.reindex([s for s in order if s in used.index])
            text += "; rates used: " + ", ".join(f"{s} {fmt_num(v, 3)}" for s, v in used.items())
    return text


def _schedule_text(train: Mapping[str, Any]) -> str:
    cfg = _train_config(train)
    return schedule_text(cfg) if cfg is not None else "the configured schedule"


def _census_text(c: Mapping[str, Any]) -> str:
    text = (
        f"Cells were drawn from the CELLxGENE Census, release {c.get('version', 'n/a')}, "
        f"organism {c.get('organism', 'n/a')}, raw counts, obs filter '{c.get('obs_filter', 'n/a')}'"
    )
    if c.get("tissues"):
        text += f", tissues {', '.join(map(str, c['tissues']))}"
    if c.get("per_tissue_cap"):
        text += f" (at most {fmt_int(c['per_tissue_cap'])} cells per tissue)"
    if c.get("uri"):
        text += f", read from {c['uri']}"
    return text + "."


def _simulate_text(sim: Mapping[str, Any]) -> str:
    if sim.get("mode", "nb") == "gaussian":
        kind = "a Gaussian latent-factor model on the log scale with a known Bayes-optimal error"
    else:
        kind = "a negative-binomial count simulator with latent cell types and continuous programs"
    bits = [f"{fmt_int(sim[key])} {label}" for key, label in
            (("n_genes", "genes"), ("n_types", "cell types"), ("n_programs", "programs")) if key in sim]
    if "library_median" in sim:
        bits.append(f"library size log-normal with median {fmt_int(sim['library_median'])}"
                    f" and sigma {fmt_num(sim.get('library_sigma'))}")
    if sim.get("params_file"):
        bits.append(f"parameters from {sim['params_file']}")
    return f"Cells were simulated from {kind}" + (" (" + "; ".join(bits) + ")" if bits else "") + "."


def _source_text(cfg_data: Mapping[str, Any], man: Manifest) -> str:
    source = man.source_kind or cfg_data.get("source")
    if source == "census" or (not source and man.census):
        return _census_text({**(cfg_data.get("census") or {}), **man.census})
    if source == "h5ad":
        path = man.input or cfg_data.get("input") or "n/a"
        layer = man.layer or cfg_data.get("layer")
        return f"Cells were read from the AnnData file {path}" + (f" (layer '{layer}')" if layer else " (X)") + "."
    if source == "simulate":
        return _simulate_text({**(cfg_data.get("simulate") or {}), **man.simulate})
    return f"Data source: {source or 'not recorded'}."


def _qc_text(man: Manifest) -> str:
    pre = man.preprocessing
    text = "Cells with no counts were dropped (QC"
    if pre.n_empty_cells_dropped is not None:
        text += f": {fmt_int(pre.n_empty_cells_dropped)} of {fmt_int(pre.n_loaded_cells)} cells"
    if pre.qc_items:
        text += "; " + ", ".join(f"{k} {v}" for k, v in pre.qc_items.items())
    if pre.subsampled:
        text += f"; then {fmt_int(man.D)} cells drawn at random"
    return text + ")"


def _genes_text(flavor: str, V: Any) -> str:
    if flavor == "all":
        return f"; all {fmt_int(V)} genes were kept"
    if flavor == "variance":
        return f"; the V = {fmt_int(V)} genes of highest variance on the training cells were kept"
    return (f"; V = {fmt_int(V)} highly variable genes were selected with scanpy's "
            f"'{flavor}' method on the training cells' counts")


def _preprocess_text(cfg_data: Mapping[str, Any], man: Manifest) -> str:
    if bool(_given(man.normalized, cfg_data.get("normalized", False))):
        text = ("The input already held normalised log values, so no count checks, normalisation "
                "or log1p were applied")
    else:
        target = _given(man.target_sum, cfg_data.get("target_sum", 1e4))
        text = (_qc_text(man) + "; each cell's library size was computed over ALL "
                f"genes before any gene selection; counts were normalised to {fmt_int(target)} per cell "
                "and log1p-transformed")
    if man.preprocessing.n_source_genes:
        text += f" (library size over all {fmt_int(man.preprocessing.n_source_genes)} source genes)"
    text += _genes_text(_given(man.hvg_flavor, cfg_data.get("hvg_flavor", "seurat_v3")),
                        _given(man.V, cfg_data.get("genes")))
    batch_key = _given(man.hvg_batch_key, cfg_data.get("hvg_batch_key"))
    if batch_key:
        text += f" (batch key '{batch_key}')"
    return text + "."


def _split_text(cfg_data: Mapping[str, Any], man: Manifest) -> str:
    text = f"D = {fmt_int(_given(man.D, cfg_data.get('cells')))} cells were split"
    fr = man.split_fractions or cfg_data.get("split")
    if fr:
        text += " " + "/".join(f"{100 * float(f):g}" for f in fr) + " (train/validation/test)"
    sizes = man.split_sizes
    if sizes:
        text += (f" into {fmt_int(sizes.get('train'))} training, {fmt_int(sizes.get('val'))} validation "
                 f"and {fmt_int(sizes.get('test'))} test cells")
    by = _given(man.split_by, cfg_data.get("split_by"))
    if by:
        text += f", holding out whole groups of '{by}'"
    text += f", disjoint and fixed by seed {_given(man.split_seed, cfg_data.get('seed'))}"
    text += "; only training cells were trained on, and HVGs were chosen on them alone."
    return text


def _rates_used(runs: pd.DataFrame | None, col: str) -> list[float]:
    if runs is None or col not in runs:
        return []
    return sorted({float(v) for v in pd.to_numeric(runs[col], errors="coerce").dropna()})


def _dropout_text(runs: pd.DataFrame | None, model_defaults: Mapping[str, Any]) -> str:
    """The dropout the runs record (residual/FFN and attention), else the model config's."""
    res, att = _rates_used(runs, "dropout"), _rates_used(runs, "attention_dropout")
    if not res:
        fields = ModelConfig.model_fields
        res = [float(model_defaults.get("dropout", fields["dropout"].default))]
        a = model_defaults.get("attention_dropout", fields["attention_dropout"].default)
        att = res if a is None else [float(a)]
    res_t, att_t = (" or ".join(fmt_num(v) for v in r) for r in (res, att))
    if att == res:
        return f"dropout {res_t} (residual branches, FFN and attention probabilities)"
    return f"dropout {res_t} on the residual branches and FFN and {att_t} on the attention probabilities"


# what the head predicts and what it is scored by, per training objective (cellscale.rules.objectives)
_OBJECTIVE_TEXT = {
    "mse": "a linear head predicting one value per gene; the loss is the MSE on masked positions",
    "gaussian-nll": ("a linear head predicting a mean and a log-variance of each gene's log1p value; the loss "
                     "is the Gaussian negative log-likelihood on masked positions, reported in bits per masked gene"),
    "nb": ("a linear head predicting the log mean count (relative to the cell's library size) and the "
           "inverse dispersion of a negative binomial over each masked gene's raw count; the loss is its "
           "negative log-likelihood, reported in bits per masked gene"),
}


def _objectives(runs: pd.DataFrame | None, model_defaults: Mapping[str, Any]) -> list[str]:
    """The objectives the runs trained with (results.csv), else the config's."""
    if runs is not None and "objective" in runs:
        seen = sorted({str(o) for o in runs["objective"].dropna()})
        if seen:
            return seen
    return [str(model_defaults.get("objective") or ModelConfig.model_fields["objective"].default)]


def _objective_text(objectives: list[str]) -> str:
    parts = [_OBJECTIVE_TEXT.get(o, f"the '{o}' objective") for o in objectives]
    if len(parts) == 1:
        return parts[0]
    return "by objective: " + "; ".join(f"{o}: {t}" for o, t in zip(objectives, parts))


def _ladder_text(runs: pd.DataFrame | None, model_defaults: Mapping[str, Any]) -> str:
    arch = (
        "Models are masked-reconstruction transformers as in the seed study: a learned gene-identity "
        "embedding plus a Linear(1, d) projection of the log1p value, a learned mask vector replacing "
        "the value embedding of masked genes, no positional encoding, a pre-LayerNorm encoder with GELU"
    )
    ffn = model_defaults.get("ffn_ratio")
    arch += f" and {_dropout_text(runs, model_defaults)}"
    if ffn:
        arch += f", FFN ratio {ffn}"
    arch += f", and {_objective_text(_objectives(runs, model_defaults))}."
    if runs is None or runs.empty or "size" not in runs:
        return arch + " The ladder of sizes is not known (no results)."
    cols = [c for c in ("params", "non_embedding_params", "d_model", "n_layers", "n_heads") if c in runs]
    lad = runs.groupby("size")[cols].first()
    if "params" in lad:
        lad = lad.sort_values("params")
    parts = []
    for name, row in lad.iterrows():
        shape = "/".join(fmt_int(row[c]) for c in ("d_model", "n_layers", "n_heads") if c in row)
        p = f"{name} ({shape}: {fmt_int(row.get('params'))} parameters"
        if "non_embedding_params" in row and pd.notna(row["non_embedding_params"]):
            p += f", {fmt_int(row['non_embedding_params'])} non-embedding"
        parts.append(p + ")")
    return arch + f" Sizes (d_model/layers/heads): {'; '.join(parts)}."


def _verdicts(runs: pd.DataFrame | None) -> str:
    """How many finished runs the convergence rule called converged, from their own verdicts."""
    if runs is None or "converged" not in runs or "status" not in runs:
        return ""
    ok = runs[runs["status"] == "ok"]
    flag = pd.to_numeric(ok["converged"], errors="coerce")
    if flag.isna().all():
        return ""
    text = f"; {int((flag == 1).sum())} of {len(ok)} finished runs were converged"
    left = ok.loc[flag == 0, "run_id"].astype(str).tolist()
    return text + (f" (not: {', '.join(left)})" if left else "")


def _budget_text(train: Mapping[str, Any], sweep: Mapping[str, Any], runs: pd.DataFrame | None,
                 man: Manifest) -> str:
    cells = None
    if runs is not None and "cells_seen" in runs:
        vals = sorted({int(v) for v in pd.to_numeric(runs["cells_seen"], errors="coerce").dropna()})
        if vals:
            cells = ", ".join(fmt_int(v) for v in vals)
    if cells is None:
        cells = fmt_int(train.get("cells_seen"))
    cfg = _train_config(train)
    text = ""
    if cfg is not None:
        text = budget_text(budget=cfg.budget, tol=cfg.plateau_tol, patience=cfg.plateau_patience,
                           cooldown_frac=cfg.cooldown_frac, max_cells=cfg.cells_seen,
                           min_cells=cfg.plateau_min_cells, cooldown_shape=cfg.cooldown_shape) + _verdicts(runs) + ". "
    text += f"Each run trained for a budget of {cells} cells seen (cells drawn with repeats)"
    if sweep.get("epochs"):
        text += f", {fmt_num(sweep['epochs'])} epochs of its own training cells (cells seen = epochs x training cells)"
    text += f" in batches of {fmt_int(train.get('batch_size'))}"
    tc = sweep.get("train_cells") or [None]
    if list(tc) == [None]:
        text += ", on all training cells"
    else:
        labels = ["all training cells" if v is None else fmt_int(v) for v in tc]
        text += f", on nested training subsets of {', '.join(labels)} cells (each inside the next)"
    depths = [float(d) for d in (sweep.get("depths") or [1.0])]
    if depths != [1.0]:
        text += (f", at sequencing depths {', '.join(f'{d:g}' for d in depths)} of the reads (every count "
                 "binomially thinned to that fraction, seeded; library sizes thinned over all genes; each depth a "
                 "dataset of its own with the same cells, genes, splits and evaluation mask)")
    seeds = sweep.get("seeds") or []
    if seeds:
        text += f", with seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    # training masks come from the train config; the evaluation mask is the dataset's own (manifest)
    mask = train.get("mask_prob", TrainConfig.model_fields["mask_prob"].default)
    text += (f". During training each gene was masked with probability {fmt_num(mask)}, resampled every time "
             "a cell was drawn; validation and test scores use one fixed seeded evaluation mask")
    ev = [f"probability {fmt_num(man.mask_prob)}"] if man.mask_prob is not None else []
    if man.eval_mask_seed is not None:
        ev.append(f"seed {man.eval_mask_seed}")
    text += f" ({', '.join(ev)})" if ev else " (its probability is not recorded in the manifest)"
    if train.get("budget") == "plateau":
        text += (", so runs are comparable; each run's own weights are those of the cooldown branch it ended at, "
                 "and its test score is reported")
    else:
        text += ", so runs are comparable; the checkpoint with the best validation loss is kept and its test score reported"
    return text + _choice_cells_text(runs, train) + "."


def _choice_cells_text(runs: pd.DataFrame | None, train: Mapping[str, Any]) -> str:
    """How many validation cells the choices were made on, from the runs' own records."""
    n = sorted({int(v) for v in pd.to_numeric(runs["choice_cells"], errors="coerce").dropna()}) \
        if runs is not None and "choice_cells" in runs else []
    if not n:
        return ""
    cap = train.get("max_eval_cells")
    subset = (f"; evaluations during training scored a fixed subset of {fmt_int(cap)} validation cells drawn across "
              "the split in proportion to its tissues or datasets, the same for every evaluation and run") if cap else ""
    return f"; choices were made on {' / '.join(fmt_int(v) for v in n)} validation cells{subset}"


def _lr_search_seed(sweep: Mapping[str, Any]) -> int | None:
    """The seed the learning rate was searched on alone (``sweep.lr_search: first-seed``), else None."""
    seeds = list(sweep.get("seeds") or [0])
    return int(seeds[0]) if sweep.get("lr_search") == "first-seed" and len(seeds) > 1 else None


def _optim_text(train: Mapping[str, Any], sweep: Mapping[str, Any], runs: pd.DataFrame | None) -> str:
    betas = train.get("betas", (0.9, 0.95))
    text = (
        f"Optimiser: AdamW (betas {tuple(betas)}, weight decay {fmt_num(train.get('weight_decay'))} on the parameters "
        "of two or more dimensions: the weight matrices, the gene embedding and the head; none on biases, LayerNorms "
        "or the mask embedding), "
        f"gradient clipping at norm {fmt_num(train.get('grad_clip'))}, {_schedule_text(train)}; "
        f"{_lr_text(train, runs)}{lr_grid_text(list(sweep.get('lr_multipliers') or [1.0]), first_seed=_lr_search_seed(sweep))}"
        f"{averaging_text(train.get('ema_decay'))}"
    )
    if sweep.get("overrides"):
        text += "; per-size overrides: " + "; ".join(
            f"{k}: " + ", ".join(f"{kk}={vv}" for kk, vv in v.items()) for k, v in sweep["overrides"].items()
        )
    prec = train.get("precision")
    if prec:
        text += f"; precision {prec}"
    return text + "."


# how the fit's columns read in a sentence
_X_TEXT = {"params": "total parameters P", "non_embedding_params": "non-embedding parameters",
           "train_cells": "training cells D", "cells_seen": "cells seen", "tokens": "tokens D",
           "tokens_seen": "tokens seen", "flops": "training FLOPs"}
_Y_TEXT = {"best_val_mse": "the best validation MSE", "test_mse": "the test MSE",
           "best_val_loss": "the best validation loss", "test_loss": "the test loss"}
_CHOSE = {"test": " at the validation-chosen checkpoint and rate (a loss that chose nothing)",
          "best_val": ", the loss that chose each point's checkpoint and rate (biased low)"}


def _fit_axes(law: str, fit: Mapping[str, Any] | None) -> str:
    """'the test MSE at the validation-chosen ... against total parameters P' for what this fit used."""
    x = list((fit or {}).get("x") or (LAWS[law].default_x if law in LAWS else ["params"]))
    y = str((fit or {}).get("y") or FITTED_COLUMN["mse"])
    ytext = _Y_TEXT.get(y, f"'{y}'")
    if (fit or {}).get("loss_unit") == "bits":
        ytext += " (bits per masked gene)"
    ytext += next((v for k, v in _CHOSE.items() if y.startswith(k)), "")
    xs = [_X_TEXT.get(c, f"'{c}'") for c in x]
    return f"{ytext} against {' and '.join(xs)}"


def _interval_text(fitcfg: Mapping[str, Any], fit: Mapping[str, Any] | None) -> str:
    """Which interval method, how many resamples, how many failed, and the > 5% flag."""
    fit = fit or {}
    name = str(fit.get("interval") or fitcfg.get("interval") or default_interval(str(fitcfg.get("method"))))
    how = str(fit.get("ci_method") or DESCRIPTIONS.get(name, name))
    text = f"95% intervals by {how} (interval method '{name}')"
    n_boot = int(fit.get("bootstrap", fitcfg.get("bootstrap") or 0) or 0)
    if n_boot:
        kind = fit.get("bootstrap_kind") or ("run groups" if name == "bca-groups" else "residuals")
        text += (f"; {fmt_int(n_boot)} bootstrap resamples of the {kind} (seed {fitcfg.get('seed', 0)}) "
                 "give the prediction bands")
        failures = resample_failures(fit, n_boot)
        if failures:
            text += f"; {failures}"
        if fit.get("bootstrap_unreliable"):
            text += ", MORE THAN 5%: the intervals that rest on them are unreliable"
    cells = fit.get("eval_cells") or {}
    if cells.get("how"):
        text += (f"; they hold the evaluation cells' sampling error: {fmt_int(cells.get('resamples'))} resamples of the "
                 f"{fmt_int(cells.get('n_cells'))} {cells.get('split') or ''} cells every run was scored on, one shared "
                 f"draw per resample ({cells['how']})")
    elif cells.get("note"):
        text += f"; {cells['note']}"
    off = fit.get("estimate_outside_interval") or []
    if off:
        text += (f"; WARNING: the estimate of {', '.join(off)} lies outside its interval (the interval is "
                 "centred on the least-squares fit, which outliers pull away from this fit)")
    return text


def _fit_text(fitcfg: Mapping[str, Any], fit: Mapping[str, Any] | None, fit_note: str | None) -> str:
    fitcfg = {**FitConfig().model_dump(), **fitcfg}
    law, method = fitcfg["law"], fitcfg["method"]
    lawdesc = {
        "power-floor": "L = a P^-alpha + c",
        "power": "L = a P^-alpha",
        "chinchilla": "L = E + A / N^alpha + B / D^beta",
    }.get(law, law)
    methdesc = METHOD_DESCRIPTIONS.get(method, method)
    if fit:
        lawdesc = str(fit.get("formula") or lawdesc).split("  (")[0]
        methdesc = str(fit.get("method_description") or methdesc)
    text = (f"The law {lawdesc} ('{law}') was fitted to {_fit_axes(law, fit)} of the finished runs by "
            f"{methdesc}, with {_interval_text(fitcfg, fit)}")
    if fit_note:
        text += f" ({fit_note})"
    return text + ". " + _entropy_text(fit)


def _entropy_text(fit: Mapping[str, Any] | None) -> str:
    """How the bits are read from this fit: the floor itself for a likelihood's bits, the Gaussian
    reading of an MSE floor, or none for a law without a floor."""
    fit = fit or {}
    if fit.get("params") and not fit.get("floor_param") and "c" not in fit["params"] and "E" not in fit["params"]:
        return "This law has no floor, so no entropy is read from it."
    if fit.get("loss_unit") == "bits":
        return "The floor of a loss in bits per masked gene is itself the entropy per masked gene, measured."
    return ("Entropy per masked gene is 0.5 log2(2 pi e c) bits, the differential entropy of a homoscedastic "
            "Gaussian whose variance is the floor c.")


def _manifest(manifest: Manifest | Mapping[str, Any] | None) -> Manifest | None:
    if manifest is None or isinstance(manifest, Manifest):
        return manifest
    return Manifest.parse(dict(manifest))


def _provenance(man: Manifest, extra: Mapping[str, Any] | None) -> str | None:
    tail = []
    if man.cellscale_version:
        tail.append(f"dataset built with cellscale {man.cellscale_version}")
    if man.created:
        tail.append(f"on {man.created}")
    tail += [f"{k} {v}" for k, v in (extra or {}).items() if v]
    return "Provenance: " + ", ".join(tail) + "." if tail else None


def methods_paragraph(
    config: Mapping[str, Any] | None,
    manifest: Manifest | Mapping[str, Any] | None,
    runs: pd.DataFrame | None,
    *,
    fit: Mapping[str, Any] | None = None,
    fit_note: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Methods text sufficient to reproduce the sweep, from the dumped StudyConfig, the dataset
    manifest and the results table. Missing inputs are named as missing."""
    cfg = dict(config or {})
    man = _manifest(manifest)
    data = cfg.get("data") or {}
    train = cfg.get("train") or {}
    sweep = cfg.get("sweep") or {}
    sentences = []
    if man is None:
        sentences.append("The dataset manifest was not found, so data facts below come from the config alone.")
        man = Manifest()
    if not cfg:
        sentences.append("The sweep's config.yaml was not found, so training settings cannot be stated.")
    sentences += [_source_text(data, man), _preprocess_text(data, man), _split_text(data, man),
                  _ladder_text(runs, cfg.get("model") or {})]
    if cfg:
        sentences += [_budget_text(train, sweep, runs, man), _optim_text(train, sweep, runs),
                      _fit_text(cfg.get("fit") or {}, fit, fit_note)]
    provenance = _provenance(man, extra)
    if provenance:
        sentences.append(provenance)
    return " ".join(sentences)
