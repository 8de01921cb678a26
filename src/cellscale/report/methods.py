"""The generated methods paragraph and the plain-language summary of a sweep.

Both are built from plain data (the dumped RunConfig as a dict, the dataset manifest, the
results table and the fit dictionary) and return plain text; the writer escapes it for HTML.
Every fact comes from those inputs: what is missing is said to be missing, never guessed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "methods_paragraph", "meaning_paragraph", "flat_manifest", "fmt_num", "fmt_int", "best_model", "floor_name",
]


def fmt_int(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return "n/a"
    return f"{int(round(f)):,}"


def fmt_num(v: Any, digits: int = 4) -> str:
    """Compact significant-digit formatting; 'n/a' for None/NaN."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a" if v is None else str(v)
    if not math.isfinite(f):
        return "n/a"
    if f != 0 and (abs(f) >= 1e6 or abs(f) < 1e-4):
        return f"{f:.{digits - 1}e}"
    return f"{f:.{digits}g}"


def _g(d: Mapping[str, Any] | None, *keys: str, default: Any = None) -> Any:
    cur: Any = d
    for k in keys:
        if not isinstance(cur, Mapping) or k not in cur:
            return default
        cur = cur[k]
    return cur


def floor_name(params: Mapping[str, Any]) -> str | None:
    """The name of the irreducible-loss parameter of a law (c for power-floor, E for chinchilla)."""
    for k in ("c", "E", "e_floor", "floor"):
        if k in params:
            return k
    return None


def _lr_text(train: Mapping[str, Any], runs: pd.DataFrame | None) -> str:
    lr = train.get("lr", "auto")
    scaling = train.get("lr_batch_scaling", "sqrt")
    if lr == "auto":
        text = (
            f"peak learning rate chosen per size as {fmt_num(train.get('lr_base'))} x sqrt(64 / d_model), "
            f"clipped to [{fmt_num(train.get('lr_min'))}, {fmt_num(train.get('lr_max'))}]"
        )
        if scaling != "none":
            text += f", then scaled ({scaling}) with batch size relative to 256"
    else:
        text = f"peak learning rate {fmt_num(lr)}"
        if scaling != "none":
            text += f" (scaled {scaling} with batch size relative to 256)"
    if runs is not None and "lr" in runs and "size" in runs:
        used = runs.dropna(subset=["lr"]).groupby("size")["lr"].first()
        if len(used):
            order = runs.groupby("size")["params"].median().sort_values().index
            used = used.reindex([s for s in order if s in used.index])
            text += "; rates used: " + ", ".join(f"{s} {fmt_num(v, 3)}" for s, v in used.items())
    return text


def _schedule_text(train: Mapping[str, Any]) -> str:
    if train.get("schedule", "cosine") == "constant":
        return "a constant learning rate (the seed study's schedule)"
    return (
        f"linear warm-up over the first {fmt_num(100 * float(train.get('warmup_frac', 0.05)), 3)}% of steps "
        f"then cosine decay to {fmt_num(100 * float(train.get('final_lr_frac', 0.1)), 3)}% of the peak"
    )


def _source_text(cfg_data: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    source = manifest.get("source") or cfg_data.get("source")
    census = manifest.get("census") if isinstance(manifest.get("census"), Mapping) else None
    if source == "census" or (not source and census):
        c = {**(cfg_data.get("census") or {}), **(census or {})}
        tissues = c.get("tissues")
        text = (
            f"Cells were drawn from the CELLxGENE Census, release {c.get('version', 'n/a')}, "
            f"organism {c.get('organism', 'n/a')}, raw counts, obs filter '{c.get('obs_filter', 'n/a')}'"
        )
        if tissues:
            text += f", tissues {', '.join(map(str, tissues))}"
        if c.get("per_tissue_cap"):
            text += f" (at most {fmt_int(c['per_tissue_cap'])} cells per tissue)"
        if c.get("uri"):
            text += f", read from {c['uri']}"
        return text + "."
    if source == "h5ad":
        path = manifest.get("input") or cfg_data.get("input") or "n/a"
        layer = manifest.get("layer") or cfg_data.get("layer")
        text = f"Cells were read from the AnnData file {path}"
        text += f" (layer '{layer}')" if layer else " (X)"
        return text + "."
    if source == "simulate":
        sim = {**(cfg_data.get("simulate") or {}), **(manifest.get("simulate") or {})}
        mode = sim.get("mode", "nb")
        if mode == "gaussian":
            kind = "a Gaussian latent-factor model on the log scale with a known Bayes-optimal error"
        else:
            kind = "a negative-binomial count simulator with latent cell types and continuous programs"
        text = f"Cells were simulated from {kind}"
        bits = []
        for key, label in (("n_genes", "genes"), ("n_types", "cell types"), ("n_programs", "programs")):
            if key in sim:
                bits.append(f"{fmt_int(sim[key])} {label}")
        if "library_median" in sim:
            bits.append(f"library size log-normal with median {fmt_int(sim['library_median'])}"
                        f" and sigma {fmt_num(sim.get('library_sigma'))}")
        if sim.get("params_file"):
            bits.append(f"parameters from {sim['params_file']}")
        if bits:
            text += " (" + "; ".join(bits) + ")"
        return text + "."
    return f"Data source: {source or 'not recorded'}."


def _preprocess_text(cfg_data: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    normalized = bool(manifest.get("normalized", cfg_data.get("normalized", False)))
    V = manifest.get("V", cfg_data.get("genes"))
    flavor = manifest.get("hvg_flavor", cfg_data.get("hvg_flavor", "seurat_v3"))
    batch_key = manifest.get("hvg_batch_key", cfg_data.get("hvg_batch_key"))
    target = manifest.get("target_sum", cfg_data.get("target_sum", 1e4))
    if normalized:
        text = ("The input already held normalised log values, so no count checks, normalisation "
                "or log1p were applied")
    else:
        qc = manifest.get("qc") if isinstance(manifest.get("qc"), Mapping) else {}
        qc_items = {k: v for k, v in {**qc, **{k: manifest[k] for k in ("min_counts", "min_genes", "max_pct_mito")
                                               if k in manifest}}.items() if not isinstance(v, (dict, list))}
        qc_text = "Cells with no counts were dropped (QC"
        if manifest.get("n_empty_cells_dropped") is not None:
            qc_text += f": {fmt_int(manifest['n_empty_cells_dropped'])} of {fmt_int(manifest.get('n_loaded_cells'))} cells"
        if qc_items:
            qc_text += "; " + ", ".join(f"{k} {v}" for k, v in qc_items.items())
        if manifest.get("subsampled"):
            qc_text += f"; then {fmt_int(manifest.get('D'))} cells drawn at random"
        text = (
            qc_text + "); each cell's library size was computed over ALL "
            f"genes before any gene selection; counts were normalised to {fmt_int(target)} per cell "
            "and log1p-transformed"
        )
    if manifest.get("n_source_genes"):
        text += f" (library size over all {fmt_int(manifest['n_source_genes'])} source genes)"
    if flavor == "all":
        text += f"; all {fmt_int(V)} genes were kept"
    elif flavor == "variance":
        text += f"; the V = {fmt_int(V)} genes of highest variance on the training cells were kept"
    else:
        text += (f"; V = {fmt_int(V)} highly variable genes were selected with scanpy's "
                 f"'{flavor}' method on the training cells' counts")
    if batch_key:
        text += f" (batch key '{batch_key}')"
    return text + "."


def _split_text(cfg_data: Mapping[str, Any], manifest: Mapping[str, Any]) -> str:
    D = manifest.get("D", cfg_data.get("cells"))
    sizes = manifest.get("split_sizes") or {}
    fr = manifest.get("split_fractions") or cfg_data.get("split")
    text = f"D = {fmt_int(D)} cells were split"
    if fr:
        text += " " + "/".join(f"{100 * float(f):g}" for f in fr) + " (train/validation/test)"
    if sizes:
        text += (f" into {fmt_int(sizes.get('train'))} training, {fmt_int(sizes.get('val'))} validation "
                 f"and {fmt_int(sizes.get('test'))} test cells")
    by = manifest.get("split_by", cfg_data.get("split_by"))
    if by:
        text += f", holding out whole groups of '{by}'"
    seed = manifest.get("split_seed", manifest.get("seed", cfg_data.get("seed")))
    text += f", disjoint and fixed by seed {seed}"
    text += "; only training cells were trained on, and HVGs were chosen on them alone."
    return text


def _ladder_text(runs: pd.DataFrame | None, model_defaults: Mapping[str, Any]) -> str:
    arch = (
        "Models are masked-reconstruction transformers as in the seed study: a learned gene-identity "
        "embedding plus a Linear(1, d) projection of the log1p value, a learned mask vector replacing "
        "the value embedding of masked genes, no positional encoding, a pre-LayerNorm encoder with GELU"
    )
    dropout = model_defaults.get("dropout", 0.1)
    ffn = model_defaults.get("ffn_ratio")
    arch += f" and dropout {fmt_num(dropout)}"
    if ffn:
        arch += f", FFN ratio {ffn}"
    arch += ", and a linear head predicting one value per gene; the loss is the MSE on masked positions."
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


def _budget_text(train: Mapping[str, Any], sweep: Mapping[str, Any], runs: pd.DataFrame | None,
                 manifest: Mapping[str, Any]) -> str:
    cells = None
    if runs is not None and "cells_seen" in runs:
        vals = sorted({int(v) for v in pd.to_numeric(runs["cells_seen"], errors="coerce").dropna()})
        if vals:
            cells = ", ".join(fmt_int(v) for v in vals)
    if cells is None:
        cells = fmt_int(train.get("cells_seen"))
    text = f"Each run trained for a budget of {cells} cells seen (cells drawn with repeats)"
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
    mask = manifest.get("mask_prob", train.get("mask_prob", 0.15))
    text += (f". Each gene was masked with probability {fmt_num(mask)}, resampled every time a cell was "
             "drawn; validation and test MSE use one fixed seeded evaluation mask")
    if manifest.get("eval_mask_seed") is not None:
        text += f" (seed {manifest['eval_mask_seed']})"
    text += (", so runs are comparable; the checkpoint with the best validation MSE is kept and its "
             "test MSE reported.")
    return text


def _optim_text(train: Mapping[str, Any], sweep: Mapping[str, Any], runs: pd.DataFrame | None) -> str:
    betas = train.get("betas", (0.9, 0.95))
    text = (
        f"Optimiser: AdamW (betas {tuple(betas)}, weight decay {fmt_num(train.get('weight_decay'))}), "
        f"gradient clipping at norm {fmt_num(train.get('grad_clip'))}, {_schedule_text(train)}; "
        f"{_lr_text(train, runs)}"
    )
    if sweep.get("overrides"):
        text += "; per-size overrides: " + "; ".join(
            f"{k}: " + ", ".join(f"{kk}={vv}" for kk, vv in v.items()) for k, v in sweep["overrides"].items()
        )
    prec = train.get("precision")
    if prec:
        text += f"; precision {prec}"
    return text + "."


def _fit_text(fitcfg: Mapping[str, Any], fit: Mapping[str, Any] | None, fit_note: str | None) -> str:
    law = fitcfg.get("law", "power-floor")
    method = fitcfg.get("method", "huber-log")
    lawdesc = {
        "power-floor": "L = a P^-alpha + c",
        "power": "L = a P^-alpha",
        "chinchilla": "L = E + A / N^alpha + B / D^beta",
    }.get(law, law)
    methdesc = {
        "huber-log": "Huber loss (delta 1e-3) on log-residuals minimised with L-BFGS from a grid of starts",
        "paper": "the seed study's grid over c with least squares of log(L - c) on log P (reproduction only)",
        "nls": "nonlinear least squares on L",
    }.get(method, method)
    if fit:
        lawdesc = str(fit.get("formula") or lawdesc).split("  (")[0]
        methdesc = str(fit.get("method_description") or methdesc)
    text = (
        f"The law {lawdesc} ('{law}') was fitted to the best validation MSE against total parameters P "
        f"of the finished runs by {methdesc}, with {fmt_int(fitcfg.get('bootstrap', 1000))} bootstrap "
        f"resamples over runs (seed {fitcfg.get('seed', 0)}) for 95% intervals"
    )
    if fit_note:
        text += f" ({fit_note})"
    text += (". Entropy per masked gene is 0.5 log2(2 pi e c) bits, the differential entropy of a "
             "homoscedastic Gaussian whose variance is the floor c.")
    return text


def flat_manifest(manifest: Mapping[str, Any] | None) -> dict[str, Any]:
    """One flat view of a dataset manifest, whether it keeps preprocessing facts at the top level
    or nested (``source: {kind, simulate|census...}``, ``preprocessing: {...}``, ``split: {...}``)."""
    man = dict(manifest or {})
    out: dict[str, Any] = {}
    cfg = man.get("config") if isinstance(man.get("config"), Mapping) else {}
    out.update({k: v for k, v in cfg.items() if k in ("input", "layer", "target_sum", "hvg_flavor", "hvg_batch_key",
                                                       "split_by", "simulate", "census")})
    if "normalized" in cfg:
        out["normalized"] = cfg["normalized"]
    if "split" in cfg and isinstance(cfg["split"], (list, tuple)):
        out["split_fractions"] = list(cfg["split"])
    src = man.get("source")
    if isinstance(src, Mapping):
        out["source"] = src.get("kind") or src.get("name")
        for k, v in src.items():
            if k in ("simulate", "census") and isinstance(v, Mapping):
                out[k] = {**(out.get(k) or {}), **v}
            elif k not in ("kind", "name"):
                out.setdefault("source_" + k, v)
        if out["source"] == "census":  # census facts may sit directly in the source block
            out["census"] = {**(out.get("census") or {}),
                             **{k: v for k, v in src.items() if k in ("version", "organism", "obs_filter",
                                                                       "tissues", "per_tissue_cap", "uri")}}
        if out["source"] == "h5ad":
            out.setdefault("input", src.get("path") or src.get("input"))
            out.setdefault("layer", src.get("layer"))
    pre = man.get("preprocessing")
    if isinstance(pre, Mapping):
        out.update(pre)
        if "normalized_input" in pre:
            out["normalized"] = pre["normalized_input"]
    split = man.get("split")
    if isinstance(split, Mapping):
        if split.get("fractions"):
            out["split_fractions"] = list(split["fractions"])
        if split.get("split_by") is not None:
            out["split_by"] = split["split_by"]
        if split.get("seed") is not None:
            out["split_seed"] = split["seed"]
    for k, v in man.items():  # flat keys win: they are what the manifest says directly
        if k in ("source", "preprocessing", "split", "config"):
            if k == "source" and not isinstance(v, Mapping):
                out["source"] = v
            continue
        if k == "census" and isinstance(v, Mapping):
            out["census"] = {**(out.get("census") or {}), **v}
        else:
            out[k] = v
    return out


def methods_paragraph(
    config: Mapping[str, Any] | None,
    manifest: Mapping[str, Any] | None,
    runs: pd.DataFrame | None,
    *,
    fit: Mapping[str, Any] | None = None,
    fit_note: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Methods text sufficient to reproduce the sweep, from the dumped RunConfig, the dataset
    manifest and the results table. Missing inputs are named as missing."""
    cfg = dict(config or {})
    man = flat_manifest(manifest)
    data = cfg.get("data") or {}
    train = cfg.get("train") or {}
    sweep = cfg.get("sweep") or {}
    fitcfg = cfg.get("fit") or {}
    sentences = []
    if not man:
        sentences.append("The dataset manifest was not found, so data facts below come from the config alone.")
    if not cfg:
        sentences.append("The sweep's config.yaml was not found, so training settings cannot be stated.")
    sentences.append(_source_text(data, man))
    sentences.append(_preprocess_text(data, man))
    sentences.append(_split_text(data, man))
    sentences.append(_ladder_text(runs, cfg.get("model") or {}))
    if cfg:
        sentences.append(_budget_text(train, sweep, runs, man))
        sentences.append(_optim_text(train, sweep, runs))
        sentences.append(_fit_text(fitcfg, fit, fit_note))
    tail = []
    if man.get("cellscale_version"):
        tail.append(f"dataset built with cellscale {man['cellscale_version']}")
    if man.get("created"):
        tail.append(f"on {man['created']}")
    for k, v in (extra or {}).items():
        if v:
            tail.append(f"{k} {v}")
    if tail:
        sentences.append("Provenance: " + ", ".join(tail) + ".")
    return " ".join(sentences)


def best_model(runs: pd.DataFrame) -> dict[str, Any] | None:
    """The size with the lowest mean best validation MSE over its ok runs (same train_cells)."""
    if runs is None or runs.empty:
        return None
    ok = runs[runs["status"] == "ok"].copy()
    ok["best_val_mse"] = pd.to_numeric(ok["best_val_mse"], errors="coerce")
    ok = ok[np.isfinite(ok["best_val_mse"])]
    if ok.empty:
        return None
    keys = ["size"] + (["train_cells"] if "train_cells" in ok else [])
    g = ok.groupby(keys, dropna=False).agg(
        params=("params", "median"), mean=("best_val_mse", "mean"), sd=("best_val_mse", "std"),
        n=("best_val_mse", "size"),
        test=("test_mse", "mean") if "test_mse" in ok else ("best_val_mse", "mean"),
    ).reset_index()
    row = g.loc[g["mean"].idxmin()]
    return {k: row[k] for k in g.columns}


def meaning_paragraph(
    runs: pd.DataFrame | None,
    fit: Mapping[str, Any] | None,
    *,
    baseline_val: float | None = None,
    bayes_floor: float | None = None,
    fit_error: str | None = None,
) -> str:
    """Plain-language reading: best model against the baseline, the floor, the bits."""
    out = []
    best = best_model(runs) if runs is not None else None
    if best is None:
        out.append("No run finished with a finite validation loss, so there is nothing to compare yet.")
    else:
        n = int(best["n"])
        s = (f"The best model size is {best['size']} ({fmt_int(best['params'])} parameters): validation MSE "
             f"{fmt_num(best['mean'])}" + (f" (mean of {n} seeds)" if n > 1 else ""))
        if baseline_val is not None and math.isfinite(baseline_val) and baseline_val > 0:
            rel = 100 * (1 - best["mean"] / baseline_val)
            if rel > 0:
                s += (f", {rel:.1f}% below the gene-mean baseline ({fmt_num(baseline_val)}), i.e. the "
                      "transformer uses information from the visible genes of the cell")
            else:
                s += (f", which is NOT better than the gene-mean baseline ({fmt_num(baseline_val)}): the "
                      "models have not learned anything beyond each gene's average - train longer or check the data")
        else:
            s += " (no gene-mean baseline recorded to compare with)"
        out.append(s + ".")
        if bayes_floor is not None and math.isfinite(bayes_floor):
            if best["mean"] < bayes_floor:
                out.append(f"The best model is BELOW the known Bayes-optimal error ({fmt_num(bayes_floor)}): "
                           "that is impossible without leakage between training and evaluation cells.")
            else:
                out.append(f"The known Bayes-optimal error of the simulator is {fmt_num(bayes_floor)}; the best "
                           f"model is {100 * (best['mean'] / bayes_floor - 1):.1f}% above it.")
    if fit is None:
        out.append("No scaling law was fitted" + (f": {fit_error}" if fit_error else "") + ".")
        return " ".join(out)
    params = fit.get("params") or {}
    ci = fit.get("ci95") or {}
    fname = fit.get("floor_param") or floor_name(params)
    if fname not in params:
        fname = None
    if "alpha" in params:
        a = params["alpha"]
        s = f"Loss falls with model size with exponent alpha = {fmt_num(a, 3)}"
        if "alpha" in ci:
            s += f" (95% CI {fmt_num(ci['alpha'][0], 3)} to {fmt_num(ci['alpha'][1], 3)})"
        if fname and a and math.isfinite(float(a)) and float(a) > 0:
            s += f"; each 10x more parameters shrinks the reducible part of the loss by a factor {10 ** float(a):.2f}"
        out.append(s + ".")
    at_boundary = bool(fit.get("floor_at_boundary"))
    if fname:
        c = float(params[fname])
        s = f"The fitted irreducible loss (floor {fname}) is {fmt_num(c)}"
        if fname in ci and ci[fname] and ci[fname][0] is not None:
            s += f" (95% CI {fmt_num(ci[fname][0])} to {fmt_num(ci[fname][1])})"
        if best is not None and c > 0 and not at_boundary:
            s += f"; the best model is {100 * (best['mean'] / c - 1):.1f}% above it"
        out.append(s + ".")
        if at_boundary:
            out.append("WARNING: the floor estimate sits on the edge of its search range, so it is an artefact "
                       "of the fitting bounds rather than a measurement; do not quote it as the irreducible "
                       "loss. Larger models or more data are needed to pin it down.")
    eb = fit.get("entropy_bits") or {}
    if isinstance(eb, Mapping) and eb.get("gaussian") is not None and at_boundary:
        out.append(f"The entropy computed from that floor ({fmt_num(eb['gaussian'], 3)} bits per masked gene) is "
                   "therefore not a measurement either.")
    elif isinstance(eb, Mapping) and eb.get("gaussian") is not None:
        s = f"Read as a Gaussian noise level, the floor corresponds to {fmt_num(eb['gaussian'], 3)} bits per masked gene"
        if eb.get("ci95"):
            s += f" (95% CI {fmt_num(eb['ci95'][0], 3)} to {fmt_num(eb['ci95'][1], 3)})"
        s += (": the differential entropy of log1p expression left unexplained by the cell's other genes, under "
              "a homoscedastic-Gaussian assumption (an upper bound on the per-gene heteroscedastic figure, and unit-"
              "dependent, so compare it only across runs on the same preprocessing).")
        out.append(s)
    return " ".join(out)
