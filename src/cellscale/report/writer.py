"""Write a sweep's report: ``SWEEP_DIR/report.html`` (self-contained), ``report.md`` + ``figures/``,
and ``fit.json``.

``write_report(sweep_dir)`` reads the sweep directory described in docs/INTERNALS.md
(config.yaml, sweep.json, the dataset manifest, results.csv, runs/*/metrics.jsonl), fits the
config's law to the finished runs, draws the figures (``report.plots``) and writes both
documents. Missing optional pieces (no manifest, no metrics for a run, no baselines, a failed
fit) are reported in the document instead of raising. Every file is written atomically.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import html
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from cellscale.config import depth_label
from cellscale.errors import FitError, RunError
from cellscale.report import plots
from cellscale.report.methods import (
    flat_manifest,
    floor_name,
    fmt_int,
    fmt_num,
    meaning_paragraph,
    methods_paragraph,
)

__all__ = ["write_report", "load_sweep", "run_fit", "SweepData", "FitOutcome", "RESULT_COLUMNS"]

RESULT_COLUMNS = [
    "run_id", "size", "params", "non_embedding_params", "d_model", "n_layers", "n_heads", "n_genes",
    "objective", "train_cells", "depth", "seed", "steps", "cells_seen", "tokens_seen", "flops", "lr", "best_step",
    "best_val_mse", "test_mse", "best_val_loss", "test_loss", "gene_mean_val_mse", "gene_mean_test_mse",
    "wall_seconds", "status", "error",
]
_NUMERIC = [c for c in RESULT_COLUMNS if c not in ("run_id", "size", "objective", "status", "error")]
# columns an older results.csv may lack without anything being missing: their value then
# (a sweep without a depth axis ran at full depth; one before the objectives trained on the MSE)
_OPTIONAL_DEFAULTS = {"depth": 1.0, "objective": "mse", "best_val_loss": np.nan, "test_loss": np.nan}
# laws of model size alone: runs of different training-set sizes must not be mixed in them
_ONE_D_LAWS = {"power", "power-floor"}


# ----------------------------------------------------------------------------------------------
# reading


@dataclass
class SweepData:
    sweep_dir: Path
    config: dict[str, Any] | None = None
    sweep_meta: dict[str, Any] | None = None
    dataset_dir: Path | None = None
    manifest: dict[str, Any] | None = None
    runs: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=RESULT_COLUMNS))
    metrics: dict[str, pd.DataFrame] = field(default_factory=dict)
    # run_id -> {"genes": [...], "mse": float array (NaN: never masked), "n": int array}
    per_gene: dict[str, dict[str, Any]] = field(default_factory=dict)
    # depth fraction -> {"gene_mean"|"bayes_linear"|"knn": {"val", "test"}} of that depth's dataset
    depth_baselines: dict[float, dict[str, dict[str, float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def fit_config(self) -> dict[str, Any]:
        base = {"law": "power-floor", "method": "huber-log", "bootstrap": 1000, "seed": 0}
        base.update((self.config or {}).get("fit") or {})
        return base

    @functools.cached_property
    def baselines_json(self) -> dict[str, Any]:
        """SWEEP_DIR/baselines.json (written by the sweep, cellscale.baselines), read once; {}
        when missing or unreadable."""
        try:
            cached = json.loads((self.sweep_dir / "baselines.json").read_text())
        except (OSError, ValueError):
            return {}
        return cached if isinstance(cached, dict) else {}

    @property
    def baselines(self) -> dict[str, dict[str, float]]:
        """{name: {"val": mse, "test": mse}} from the manifest, else from results.csv."""
        out: dict[str, dict[str, float]] = {}
        man = (self.manifest or {}).get("baselines") or {}
        if isinstance(man, dict):
            for name, v in man.items():
                if isinstance(v, dict):
                    vals = {k: _float(v.get(k)) for k in ("val", "test")}
                    if any(x is not None for x in vals.values()):
                        out[name] = vals
        # Bayes-linear and kNN, written by the sweep (cellscale.baselines)
        for name, v in self.baselines_json.items():
            if name not in out and name in ("bayes_linear", "knn") and isinstance(v, dict):
                vals = {k: _float(v.get(k)) for k in ("val", "test")}
                if any(x is not None for x in vals.values()):
                    out[name] = vals
        if "gene_mean" not in out and not self.runs.empty:
            vals = {k: _first_finite(self.runs.get(f"gene_mean_{k}_mse")) for k in ("val", "test")}
            if any(x is not None for x in vals.values()):
                out["gene_mean"] = vals
        return out

    @property
    def objective(self) -> str:
        """The sweep's objective (cellscale.objectives): ``mse`` unless its runs say otherwise."""
        col = self.runs.get("objective") if not self.runs.empty else None
        names = sorted({str(o) for o in col.dropna().unique()}) if col is not None else []
        return names[0] if len(names) == 1 else "mse"

    @property
    def loss_col(self) -> str:
        """The results column the law is fitted to: the MSE, or a likelihood's bits."""
        return "best_val_mse" if self.objective == "mse" else "best_val_loss"

    @property
    def likelihood_refs(self) -> dict[str, dict[str, float]]:
        """{name: {"val", "test"}} in bits of the sweep objective's likelihood baselines
        (gene mean, Bayes-linear, and the exact floor of gaussian-mode data); empty for mse."""
        if self.objective == "mse":
            return {}
        block = (self.baselines_json.get("likelihood") or {}).get(self.objective) or {}
        return {k: {s: _float(v.get(s)) for s in ("val", "test")} for k, v in block.items() if isinstance(v, dict)}

    @property
    def true_floor(self) -> float | None:
        """The exact Bayes floor (validation) in the unit of the fitted loss, when known."""
        if self.objective == "mse":
            return self.bayes_floor
        return (self.likelihood_refs.get("bayes_floor") or {}).get("val")

    @property
    def bayes_floor(self) -> float | None:
        man = self.manifest or {}
        flat = flat_manifest(man)
        v = _float(flat.get("bayes_floor_mse", flat.get("source_bayes_floor_mse")))
        if v is None:
            v = _float(((man.get("baselines") or {}).get("bayes_floor") or {}).get("val")) if isinstance(
                (man.get("baselines") or {}).get("bayes_floor"), dict) else None
        return v


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _first_finite(col: pd.Series | None) -> float | None:
    if col is None:
        return None
    vals = pd.to_numeric(col, errors="coerce").dropna()
    vals = vals[np.isfinite(vals)]
    return float(vals.iloc[0]) if len(vals) else None


def _read_metrics(path: Path) -> tuple[pd.DataFrame | None, int]:
    """Parse metrics.jsonl, skipping unparseable lines (a run killed mid-write); returns (frame, bad)."""
    rows, bad = [], 0
    with path.open() as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(obj, dict):
                rows.append(obj)
    if not rows:
        return None, bad
    df = pd.DataFrame(rows)
    for c in ("step", "cells_seen", "lr", "loss", "val_mse", "val_bits", "wall"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    if "kind" not in df:
        df["kind"] = np.where(df.get("val_mse", pd.Series(np.nan, index=df.index)).notna(), "eval", "train")
    return df, bad


def load_sweep(sweep_dir: str | os.PathLike) -> SweepData:
    """Read everything the report needs; record what is missing in ``notes``."""
    sd = Path(sweep_dir)
    if not sd.is_dir():
        raise RunError(f"sweep directory not found: {sd}")
    known = [sd / n for n in ("config.yaml", "sweep.json", "results.csv", "runs")]
    if not any(p.exists() for p in known):
        raise RunError(f"{sd} is not a sweep directory (no config.yaml, sweep.json, results.csv or runs/)")
    data = SweepData(sweep_dir=sd)

    cfg_path = sd / "config.yaml"
    if cfg_path.is_file():
        try:
            raw = yaml.safe_load(cfg_path.read_text()) or {}
            if not isinstance(raw, dict):
                raise ValueError("not a mapping")
            try:  # validate and fill defaults; fall back to the raw mapping if it no longer validates
                from cellscale.config import RunConfig, parse_config

                data.config = parse_config(RunConfig, raw, origin=str(cfg_path)).model_dump(mode="json")
            except Exception as err:  # noqa: BLE001 - any validation problem only degrades the text
                data.config = raw
                data.notes.append(f"config.yaml does not validate against this version's RunConfig ({err}); "
                                  "its raw values are used.")
        except (yaml.YAMLError, ValueError) as err:
            data.notes.append(f"config.yaml could not be read ({str(err).splitlines()[0]}).")
    else:
        data.notes.append("config.yaml is missing: training settings and fit settings are unknown "
                          "(the fit uses the defaults power-floor / huber-log / 1000 resamples / seed 0).")

    meta_path = sd / "sweep.json"
    if meta_path.is_file():
        try:
            data.sweep_meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            data.notes.append(f"sweep.json is not valid JSON ({err}).")
    else:
        data.notes.append("sweep.json is missing.")

    candidates = []
    if data.sweep_meta and data.sweep_meta.get("dataset"):
        candidates.append(Path(data.sweep_meta["dataset"]))
    if data.config and data.config.get("dataset"):
        candidates.append(Path(data.config["dataset"]))
    candidates.append(sd / "dataset")
    for cand in candidates:
        cand = cand if cand.is_absolute() else sd / cand
        if (cand / "manifest.json").is_file():
            data.dataset_dir = cand
            try:
                data.manifest = json.loads((cand / "manifest.json").read_text())
            except json.JSONDecodeError as err:
                data.notes.append(f"{cand / 'manifest.json'} is not valid JSON ({err}).")
            break
    else:
        data.notes.append("The dataset manifest was not found (looked in: "
                          + ", ".join(str(c) for c in candidates) + "): data facts and baselines may be missing.")

    res_path = sd / "results.csv"
    if res_path.is_file():
        try:
            runs = pd.read_csv(res_path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
            runs = pd.DataFrame(columns=RESULT_COLUMNS)
            data.notes.append(f"results.csv could not be parsed ({str(err).splitlines()[0]}).")
    else:
        runs = pd.DataFrame(columns=RESULT_COLUMNS)
        data.notes.append("results.csv is missing: no finished run to report yet.")
    missing_cols = [c for c in RESULT_COLUMNS if c not in runs.columns]
    lacking = [c for c in missing_cols if c not in _OPTIONAL_DEFAULTS]
    if lacking and len(runs.columns):
        data.notes.append("results.csv lacks the columns " + ", ".join(lacking) + ".")
    for c in missing_cols:
        runs[c] = np.nan
    for c in _NUMERIC:
        runs[c] = pd.to_numeric(runs[c], errors="coerce")
    for c, default in _OPTIONAL_DEFAULTS.items():
        if not (isinstance(default, float) and math.isnan(default)):
            runs[c] = runs[c].fillna(default)
    runs["run_id"] = runs["run_id"].astype(str)
    runs["size"] = runs["size"].fillna("?").astype(str)
    runs["status"] = runs["status"].fillna("unknown").astype(str).str.strip().str.lower()
    runs["error"] = runs["error"].fillna("").astype(str)
    # file order is kept, so that the fit sees exactly the rows a direct fit_table call on the csv sees
    data.runs = runs.reset_index(drop=True)

    runs_dir = sd / "runs"
    no_metrics = []
    for rid in runs["run_id"]:
        path = runs_dir / rid / "metrics.jsonl"
        if path.is_file():
            m, bad = _read_metrics(path)
            if m is not None:
                data.metrics[rid] = m
            else:
                no_metrics.append(rid)
            if bad:
                data.notes.append(f"runs/{rid}/metrics.jsonl: {bad} unreadable line(s) skipped.")
        else:
            no_metrics.append(rid)
    if no_metrics:
        status = dict(zip(runs["run_id"], runs["status"]))
        data.notes.append("No learning curve (metrics.jsonl missing or empty) for: "
                          + ", ".join(f"{r} ({status.get(r, '?')})" for r in no_metrics) + ".")
    _read_per_gene(data, runs_dir)
    _read_depth_baselines(data)
    if runs_dir.is_dir():
        orphans = sorted(p.name for p in runs_dir.iterdir() if p.is_dir() and p.name not in set(runs["run_id"]))
        if orphans:
            data.notes.append("Run directories without a row in results.csv (unfinished or not collected): "
                              + ", ".join(orphans) + ".")
    return data


def _baseline_entry(obj: Any) -> dict[str, dict[str, float]]:
    """{name: {"val", "test"}} of a sweep's flat baselines.json, or of one entry of a dataset's
    ``load_or_compute_baselines`` cache (``{"format": "cellscale-baselines", "entries": {...}}``)."""
    if isinstance(obj, dict) and obj.get("format") == "cellscale-baselines":
        entries = [e for e in (obj.get("entries") or {}).values() if isinstance(e, dict)]
        obj = entries[0] if entries else {}
    out = {}
    for name in ("gene_mean", "bayes_linear", "knn"):
        v = obj.get(name) if isinstance(obj, dict) else None
        if isinstance(v, dict):
            out[name] = {k: _float(v.get(k)) for k in ("val", "test")}
    return out


def _read_depth_baselines(data: SweepData) -> None:
    """Each depth's reference predictors: the thinned datasets' manifests (gene mean) and
    baselines.json (Bayes-linear, kNN), as listed in sweep.json (else SWEEP_DIR/datasets/depth-*);
    the full-depth dataset's from the manifest and baselines.json already read."""
    listed = (data.sweep_meta or {}).get("depth_datasets")
    dirs = [Path(p) for p in listed.values()] if isinstance(listed, dict) else sorted(
        (data.sweep_dir / "datasets").glob("depth-*"))
    sources: list[tuple[Any, Any]] = []
    if data.dataset_dir is not None and data.manifest is not None:
        sources.append((data.manifest, data.baselines_json))
    for d in dirs:
        sources.append((_read_json_or_none(d / "manifest.json"), _read_json_or_none(d / "baselines.json")))
    for man, cache in sources:
        if not isinstance(man, dict):
            continue
        depth = _float(man.get("depth_fraction", 1.0))
        entry = {**_baseline_entry(cache), **_baseline_entry({"gene_mean": (man.get("baselines") or {}).get("gene_mean")})}
        if depth is not None and entry:
            data.depth_baselines[depth] = entry


def _read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_per_gene(data: SweepData, runs_dir: Path) -> None:
    """Read ``runs/<id>/per_gene.json`` of every run; name the finished runs without one."""
    missing, bad = [], []
    for rid, status in zip(data.runs["run_id"], data.runs["status"]):
        path = runs_dir / rid / "per_gene.json"
        if not path.is_file():
            if status in ("ok", "diverged"):
                missing.append(rid)
            continue
        try:
            obj = json.loads(path.read_text())
            genes = [str(g) for g in obj["genes"]]
            mse = np.array([np.nan if v is None else float(v) for v in obj["test_mse"]], dtype=float)
            n = np.array([int(v) for v in obj.get("n_masked", [1] * len(genes))], dtype=np.int64)
            if not (len(genes) == mse.size == n.size) or mse.size == 0:
                raise ValueError("genes, test_mse and n_masked differ in length")
        except (OSError, ValueError, KeyError, TypeError) as err:
            bad.append(f"{rid} ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
            continue
        mse[~np.isfinite(mse) | (n <= 0)] = np.nan
        data.per_gene[rid] = {"genes": genes, "mse": mse, "n": n}
    if missing:
        data.notes.append("No per-gene test errors (per_gene.json missing: a run written by an older cellscale, "
                          "or one without a best checkpoint) for: " + ", ".join(missing) + ".")
    if bad:
        data.notes.append("Unreadable per_gene.json (skipped) for: " + ", ".join(bad) + ".")


def _bits_weighted(mse: np.ndarray, n: np.ndarray) -> float | None:
    """Count-weighted mean over genes of 0.5 log2(2 pi e mse_g) (the run's result.json figure)."""
    ok = np.isfinite(mse) & (mse > 0) & (n > 0)
    if not ok.any():
        return None
    w = n[ok].astype(float)
    return float(np.sum(w * 0.5 * np.log2(2 * np.pi * np.e * mse[ok])) / w.sum())


@dataclass
class _GeneBest:
    """The run whose per-gene errors the report describes: the best ok run by validation MSE."""

    run_id: str
    size: str
    genes: list[str]
    mse: np.ndarray
    n: np.ndarray
    note: str = ""

    @property
    def test_mse(self) -> float | None:
        ok = np.isfinite(self.mse) & (self.n > 0)
        return float(np.sum(self.mse[ok] * self.n[ok]) / self.n[ok].sum()) if ok.any() else None

    @property
    def positive(self) -> np.ndarray:
        ok = np.isfinite(self.mse) & (self.mse > 0)
        return self.mse[ok]


def _gene_best(sd: SweepData) -> _GeneBest | None:
    ok = sd.runs[(sd.runs["status"] == "ok") & np.isfinite(sd.runs["best_val_mse"])]
    ok = ok.sort_values(["best_val_mse", "run_id"])
    if ok.empty:
        return None
    with_pg = ok[ok["run_id"].isin(sd.per_gene)]
    if with_pg.empty:
        return None
    r = with_pg.iloc[0]
    note = ""
    if r["run_id"] != ok.iloc[0]["run_id"]:
        note = (f"the best run by validation MSE, {ok.iloc[0]['run_id']}, has no per-gene errors; "
                f"{r['run_id']} is the best run that has them")
    pg = sd.per_gene[str(r["run_id"])]
    return _GeneBest(str(r["run_id"]), str(r["size"]), pg["genes"], pg["mse"], pg["n"], note)


def _gene_tables(sd: SweepData, best: _GeneBest | None, n_named: int = 10) -> tuple[list[list[str]], list[list[str]]]:
    """(hardest/easiest rows of the best run, per-run spread rows)."""
    gene_rows: list[list[str]] = []
    if best is not None:
        ok = np.flatnonzero(np.isfinite(best.mse))
        order = ok[np.argsort(best.mse[ok], kind="stable")]
        k = min(n_named, len(order))
        hard, easy = order[::-1][:k], order[:k]
        for i in range(k):
            h, e = hard[i], easy[i]
            gene_rows.append([str(i + 1), best.genes[h], fmt_num(best.mse[h]), fmt_int(best.n[h]),
                              best.genes[e], fmt_num(best.mse[e]), fmt_int(best.n[e])])
    run_rows: list[list[str]] = []
    info = sd.runs.set_index("run_id")
    rids = sorted(sd.per_gene, key=lambda r: (float(info.loc[r, "params"]) if r in info.index
                                              and np.isfinite(info.loc[r, "params"]) else np.inf, r))
    for rid in rids:
        pg = sd.per_gene[rid]
        mse, n = pg["mse"], pg["n"]
        fin = mse[np.isfinite(mse)]
        if fin.size == 0:
            continue
        test = float(np.sum(fin * n[np.isfinite(mse)]) / n[np.isfinite(mse)].sum())
        q1, med, q3 = np.percentile(fin, [25, 50, 75])
        run_rows.append([rid, str(info.loc[rid, "size"]) if rid in info.index else "?", fmt_int(fin.size),
                         fmt_num(test), fmt_num(med), f"{fmt_num(q1)} to {fmt_num(q3)}", fmt_num(float(np.std(fin))),
                         fmt_num(_bits(test), 4), fmt_num(_bits_weighted(mse, n), 4)])
    return gene_rows, run_rows


_GENE_HEADER = ["rank", "hardest gene", "test MSE", "masked", "easiest gene", "test MSE ", "masked "]
_GENE_RUN_HEADER = ["run_id", "size", "genes scored", "test MSE", "median gene MSE", "IQR", "std over genes",
                    "homoscedastic bits", "heteroscedastic bits"]


# ----------------------------------------------------------------------------------------------
# fitting


@dataclass
class FitOutcome:
    law: str
    method: str
    result: Any = None  # the FitResult, when the fit succeeded
    data: dict[str, Any] | None = None  # FitResult.to_dict()
    error: str | None = None
    note: str | None = None  # which runs were used, when not all finished ones
    used: pd.DataFrame | None = None
    no_floor: dict[str, Any] | None = None  # the law without a floor, for AIC/BIC
    curve: plots.Curve | None = None
    curve_error: str | None = None


def headline_depth(runs: pd.DataFrame) -> float | None:
    """The depth the headline fit uses when the ok runs span several: 1.0, else the largest;
    None when there is a single depth (or no depth column)."""
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    if "depth" not in ok or ok["depth"].nunique() < 2:
        return None
    depths = pd.to_numeric(ok["depth"], errors="coerce").dropna()
    return 1.0 if (depths == 1.0).any() else float(depths.max())


def run_depth_fits(runs: pd.DataFrame, fit_config: dict[str, Any], *, full_train: float | None = None,
                   headline: "FitOutcome | None" = None) -> dict[float, "FitOutcome"]:
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
            out[float(d)] = run_fit(runs[runs["depth"] == d], fit_config, full_train=full_train)
    return out


def fitted_loss_column(runs: pd.DataFrame) -> str:
    """The results column a sweep's law is fitted to and its best run is chosen by: the MSE, or
    ``best_val_loss`` (bits) when any run has a likelihood objective."""
    likelihood = "objective" in runs and runs["objective"].fillna("mse").ne("mse").any()
    return "best_val_loss" if likelihood else "best_val_mse"


def _fit_subset(runs: pd.DataFrame, law: str, full_train: float | None = None) -> tuple[pd.DataFrame, str | None]:
    ok = runs[runs["status"] == "ok"]
    y = fitted_loss_column(ok)
    usable = np.isfinite(ok[y]) & (ok[y] > 0) & np.isfinite(ok["params"]) & (ok["params"] > 0)
    note = None
    if not usable.all():
        note = ("runs marked ok without a positive finite loss or parameter count were left out: "
                + ", ".join(ok.loc[~usable, "run_id"].astype(str)))
    ok = ok[usable]
    head = headline_depth(ok)
    if head is not None:  # no law here has a depth term: mixing depths would bend the fit
        keep = ok[ok["depth"] == head]
        note = ((note + "; ") if note else "") + (
            f"the runs span {ok['depth'].nunique()} sequencing depths, so only the {len(keep)} runs at "
            f"{'full depth (1)' if head == 1.0 else f'the largest depth, {head:g}'} were fitted here; "
            "each depth has its own fit in the depth table")
        ok = keep
    if law in _ONE_D_LAWS and ok["train_cells"].nunique(dropna=False) > 1:
        tc = ok["train_cells"]
        if tc.isna().any():  # NaN means "all training cells": the largest subset
            keep = ok[tc.isna()]
            label = "all training cells"
        else:
            keep = ok[tc == tc.max()]
            label = f"{fmt_int(tc.max())} training cells"
        note = ((note + "; ") if note else "") + (
            f"the law depends on model size only, so only the {len(keep)} runs on the largest training set "
            f"({label}) were fitted; the others appear in the data figure")
        ok = keep
    elif law not in _ONE_D_LAWS and ok["train_cells"].isna().any() and full_train is not None:
        # laws of data size need a number where the sweep says "all training cells"
        ok = ok.assign(train_cells=ok["train_cells"].fillna(full_train))
        note = ((note + "; ") if note else "") + (
            f"runs on all training cells counted as {fmt_int(full_train)} cells (the train split)")
    return ok.reset_index(drop=True), note


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def _eval_curve(result: Any, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """predict/band on a grid of parameter counts, accepting an array or a one-column frame API."""
    last: Exception | None = None
    args = (xs,) if xs.ndim == 2 else (xs, xs.reshape(-1, 1), {"params": xs})
    for arg in args:
        try:
            y = np.asarray(result.predict(arg), dtype=float).reshape(-1)
        except Exception as err:  # noqa: BLE001 - try the next calling convention
            last = err
            continue
        lo = hi = None
        try:
            lo, hi = result.band(arg, level=0.95)
            lo, hi = np.asarray(lo, float).reshape(-1), np.asarray(hi, float).reshape(-1)
        except Exception:  # noqa: BLE001 - no band (e.g. no bootstrap): draw the curve alone
            lo = hi = None
        return y, lo, hi
    raise RuntimeError(f"cannot evaluate the fitted law on a grid: {last}")


def _one_blas_thread():
    """Limit BLAS to one thread during the fit: its many tiny L-BFGS problems run ~10x slower when
    OpenBLAS threads compete for busy cores, and the numbers do not depend on the thread count."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def run_fit(runs: pd.DataFrame, fit_config: dict[str, Any], *, full_train: float | None = None,
            per_gene_mse=None) -> FitOutcome:
    """Fit the configured law to the finished runs; never raises for a fit problem.

    ``full_train`` (the train split's size) stands in for an empty ``train_cells`` in laws of data.
    ``per_gene_mse`` (the best run's positive per-gene test MSEs) adds fit.json's
    ``entropy_bits.per_gene`` block (heteroscedastic entropy, unweighted mean over genes).
    """
    law, method = str(fit_config.get("law", "power-floor")), str(fit_config.get("method", "huber-log"))
    out = FitOutcome(law=law, method=method)
    used, out.note = _fit_subset(runs, law, full_train)
    out.used = used
    if used.empty:
        n_bad = int((runs["status"] != "ok").sum())
        out.error = ("no finished run with a finite validation loss" +
                     (f" ({n_bad} run(s) diverged or failed)" if n_bad else ""))
        return out
    try:
        from cellscale.fit import fit_table
    except ImportError as err:
        out.error = f"the fitting module is not available ({err})"
        return out
    kw = dict(law=law, method=method, bootstrap=int(fit_config.get("bootstrap", 1000)),
              seed=int(fit_config.get("seed", 0)))
    if per_gene_mse is not None and len(per_gene_mse):
        kw["per_gene_mse"] = np.asarray(per_gene_mse, dtype=float)
    try:
        with warnings.catch_warnings(), _one_blas_thread():
            warnings.simplefilter("ignore")
            out.result = fit_table(used, **kw)
        out.data = _to_jsonable(out.result.to_dict())
    except FitError as err:
        out.error = str(err)
        out.result = None
        return out
    except Exception as err:  # noqa: BLE001 - a bug in the fit must not cost the user the report
        out.error = f"the fit raised {type(err).__name__}: {err}"
        out.result = None
        return out

    if law == "power-floor" and "no_floor" not in (out.data or {}):  # older fit modules lack the comparison
        try:
            with warnings.catch_warnings(), _one_blas_thread():
                warnings.simplefilter("ignore")
                nf = fit_table(used, law="power", method=method, bootstrap=0, seed=kw["seed"])
            nfd = _to_jsonable(nf.to_dict())
            out.no_floor = {k: nfd.get(k) for k in ("law", "params", "r2", "aic", "bic", "n_points")}
        except Exception:  # noqa: BLE001 - the comparison is optional
            out.no_floor = None

    n_x = len((out.data or {}).get("x") or ["params"])
    if n_x == 1 and list((out.data or {}).get("x") or ["params"]) == ["params"]:
        p = used["params"].to_numpy(float)
        xs = np.logspace(np.log10(p.min()) - 0.3, np.log10(p.max()) + 0.5, 200)
        try:
            y, lo, hi = _eval_curve(out.result, xs)
            label = f"fit: {law} ({method})"
            out.curve = plots.Curve(xs, y, lo, hi, label=label)
        except Exception as err:  # noqa: BLE001
            out.curve_error = str(err)
    elif n_x > 1:
        out.curve_error = f"the '{law}' law depends on more than model size; its curve is not drawn against parameters"
    else:
        out.curve_error = f"the law was fitted against {out.data.get('x')}, not total parameters"
    return out


# ----------------------------------------------------------------------------------------------
# writing helpers


def _atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _bits(mse: float | None) -> float | None:
    if mse is None or not (mse > 0):
        return None
    return 0.5 * math.log2(2 * math.pi * math.e * mse)


@dataclass
class _Figure:
    key: str
    title: str
    caption: str
    png: bytes


def _make_figures(sd: SweepData, fit: FitOutcome, gene_best: _GeneBest | None = None) -> list[_Figure]:
    figs: list[_Figure] = []
    runs = sd.runs
    fd = fit.data or {}
    params, ci = fd.get("params") or {}, fd.get("ci95") or {}
    fname = fd.get("floor_param") or floor_name(params)
    floor = None
    if fname and _float(params.get(fname)) is not None:
        lohi = ci.get(fname) or [None, None]
        if len(lohi) != 2:
            lohi = [None, None]
        floor = plots.Floor(float(params[fname]), _float(lohi[0]), _float(lohi[1]),
                            label=f"fitted floor {fname} = {fmt_num(params[fname])}",
                            at_boundary=bool(fd.get("floor_at_boundary")))
    refs = []
    palette = {"gene_mean": "#ff7f0e", "bayes_linear": "#2ca02c", "knn": "#8c564b"}
    for name, vals in sd.baselines.items():
        if vals.get("val") is not None:
            refs.append(plots.RefLine(vals["val"], f"{name.replace('_', '-')} baseline (val) = {fmt_num(vals['val'])}",
                                      color=palette.get(name, "#7f7f7f")))
    if sd.bayes_floor is not None:
        refs.append(plots.RefLine(sd.bayes_floor, f"true Bayes floor = {fmt_num(sd.bayes_floor)}",
                                  color="#d62728", style=":"))
    loss_refs = refs  # drawn with the fitted loss: the same MSE lines, or the likelihood's bits
    if sd.objective != "mse":
        loss_refs = [plots.RefLine(v["val"], f"{k.replace('_', '-')} {'' if k == 'bayes_floor' else 'baseline '}"
                                   f"(val) = {fmt_num(v['val'])} bits",
                                   color=palette.get(k, "#d62728"), style=":" if k == "bayes_floor" else "--")
                     for k, v in sd.likelihood_refs.items() if v.get("val") is not None]

    def add(key: str, title: str, caption: str, fig) -> None:
        figs.append(_Figure(key, title, caption, plots.figure_png(fig)))

    cap = ("One point per run (seeds of a size jittered horizontally); black bars: mean and min-max over seeds. "
           "Blue: the fitted law with its 95% bootstrap band. Purple: the fitted floor with its 95% interval. "
           "Dashed: baselines on the validation cells.")
    if fit.error:
        cap += f" No law drawn: {fit.error}."
    elif fit.curve_error:
        cap += f" No curve drawn: {fit.curve_error}."
    if fit.note:
        cap += f" Note: {fit.note}."
    fig_runs = runs
    if fit.note and fit.used is not None:  # show the fitted subset against its own law
        fig_runs = pd.concat([fit.used, runs[runs["status"] != "ok"]], ignore_index=True)
    if sd.objective != "mse":
        cap += (f" Loss: the {sd.objective} objective's validation loss in bits per masked gene (its floor is the "
                "entropy itself); the learning curves below are in bits too.")
    add("loss_vs_params", "Validation loss against parameters", cap,
        plots.loss_vs_params(fig_runs, curve=fit.curve, floor=floor, refs=loss_refs, y=sd.loss_col))
    if sd.objective == "mse":
        add("learning_curves", "Learning curves", "Validation MSE (solid, markers) and training loss (faint) against "
            "cells seen, every run; dotted curves are runs that did not finish ok.",
            plots.learning_curves(sd.metrics, runs, refs=[r for r in refs if "baseline" in r.label]))
    else:
        add("learning_curves", "Learning curves", f"Validation loss of the {sd.objective} objective in bits per "
            "masked gene (solid, markers) and training loss in bits (faint) against cells seen, every run; dotted "
            "curves are runs that did not finish ok.",
            plots.learning_curves(sd.metrics, runs, refs=[r for r in loss_refs if "baseline" in r.label],
                                  val="val_bits", ylabel="bits per masked gene",
                                  title="Learning curves (validation bits solid, training loss faint)"))
    ok = runs[runs["status"] == "ok"]
    head = headline_depth(runs)
    if head is not None:
        ok = ok[ok["depth"] == head]
    if ok["train_cells"].nunique(dropna=False) > 1:
        data_runs = (runs if head is None else runs[runs["depth"] == head]).copy()
        full = _float(((sd.manifest or {}).get("split_sizes") or {}).get("train"))
        if full is not None:
            data_runs["train_cells"] = data_runs["train_cells"].fillna(full)
        curves = _data_curves(fit, data_runs) if fit.result is not None and fit.law not in _ONE_D_LAWS else {}
        add("loss_vs_data", "Validation loss against training cells", "Best validation MSE against the number of "
            "unique training cells, one line per model size (mean over seeds; dots are runs)"
            + ("; dashed: the fitted L(N, D) law for each size with its 95% band." if curves else "."),
            plots.loss_vs_data(data_runs, refs=refs, curves=curves))
    if head is not None:
        names = {"gene_mean": "gene-mean baseline (val) of each depth", "bayes_linear": "Bayes-linear (val) of each depth"}
        drefs = {label: {d: (b.get(key) or {}).get("val") for d, b in sd.depth_baselines.items()}
                 for key, label in names.items()}
        add("loss_vs_depth", "Validation loss against sequencing depth",
            "Best validation MSE against the fraction of the sequencing depth kept by binomial thinning (log axis), "
            "one line per model size (mean over seeds; dots are runs). Dashed: each thinned dataset's own "
            "baselines on its validation cells.",
            plots.loss_vs_depth(runs, refs={k: v for k, v in drefs.items() if any(x is not None for x in v.values())}))
    co = fd.get("compute_optimal")
    if isinstance(co, dict) and isinstance(co.get("table"), list) and co["table"]:
        iso = _isoflop(fit, co)
        cap = ("Model size N* and training cells D* that minimise the fitted L(N, D) at each compute budget, with "
               "95% bootstrap bands. " + str(co.get("C_definition", "")))
        if iso is not None:
            cap += (". Right: iso-FLOP profiles, the predicted loss against N along D = C / (k N) for "
                    f"{len(iso.budgets)} budgets log-spaced across the runs' compute range (C = k N D), "
                    "the compute-optimal N*(C) starred")
        add("compute_frontier", "Compute-optimal frontier" + (" and iso-FLOP profiles" if iso is not None else ""),
            cap, plots.compute_frontier(co["table"], isoflop=iso))
    eb = fd.get("entropy_bits") or {}
    erefs = {}
    gm = sd.baselines.get("gene_mean", {}).get("val")
    if gm is not None:
        erefs["gene-mean baseline"] = _bits(gm)
    if sd.bayes_floor is not None:
        erefs["true Bayes floor"] = _bits(sd.bayes_floor)
    best = ok["best_val_mse"].min() if len(ok) else None
    if best is not None and np.isfinite(best):
        erefs["best run (val MSE)"] = _bits(float(best))
    if gene_best is not None:
        erefs[f"{gene_best.run_id} test, homoscedastic"] = _bits(gene_best.test_mse)
        erefs[f"{gene_best.run_id} test, per-gene"] = _bits_weighted(gene_best.mse, gene_best.n)
    ent = _float(eb.get("gaussian")) if isinstance(eb, dict) else None
    add("entropy", "Entropy per masked gene", "Homoscedastic-Gaussian entropy 0.5 log2(2 pi e MSE) in bits per "
        "masked gene: the fitted floor with its 95% interval, and for scale the same figure for reference MSEs.",
        plots.entropy_summary(ent, eb.get("ci95") if isinstance(eb, dict) else None, refs=erefs))
    if sd.per_gene:
        info = runs.set_index("run_id")
        per_run = []
        for rid, pg in sd.per_gene.items():
            size = str(info.loc[rid, "size"]) if rid in info.index else "?"
            par = _float(info.loc[rid, "params"]) if rid in info.index else None
            per_run.append(plots.GeneErrors(rid, size, par if par is not None else np.inf, pg["genes"], pg["mse"]))
        best_ge = None if gene_best is None else plots.GeneErrors(
            gene_best.run_id, gene_best.size, np.nan, gene_best.genes, gene_best.mse)
        add("per_gene", "Per-gene test error", "Left: the per-gene test MSE of the best run by validation MSE"
            + (f" ({gene_best.run_id})" if gene_best else "") + ", sorted from the easiest to the hardest gene to "
            "reconstruct, the 10 hardest (red) and 10 easiest (green) named. Right: the spread of per-gene test MSE "
            "of every run with per-gene errors (box: quartiles, whiskers 1.5 IQR), ordered and coloured by size.",
            plots.per_gene_errors(best_ge, per_run))
    return figs


def _isoflop(fit: FitOutcome, co: dict[str, Any]) -> plots.IsoFlop | None:
    """Iso-FLOP profiles of a chinchilla fit: budgets log-spaced over the fitted runs' C = k N D."""
    params = (fit.data or {}).get("params") or {}
    theta = {k: _float(params.get(k)) for k in ("A", "B", "E", "alpha", "beta")}
    k = _float(co.get("k"))
    if fit.law != "chinchilla" or any(v is None for v in theta.values()) or k is None or k <= 0:
        return None
    if theta["alpha"] <= 0 or theta["beta"] <= 0 or theta["A"] <= 0 or theta["B"] <= 0:
        return None
    used = fit.used if fit.used is not None else pd.DataFrame()
    x = list((fit.data or {}).get("x") or ["params", "train_cells"])
    C = np.array([])
    if len(x) == 2 and all(c in used for c in x):
        C = k * used[x[0]].to_numpy(float) * used[x[1]].to_numpy(float)
        C = C[np.isfinite(C) & (C > 0)]
    if C.size == 0:
        C = np.array([float(r["C"]) for r in co.get("table") or [] if isinstance(r, dict) and _float(r.get("C"))])
    if C.size == 0:
        return None
    lo, hi = np.log10(C.min()), np.log10(C.max())
    budgets = [float(10 ** lo)] if hi - lo < 1e-9 else [float(v) for v in np.logspace(lo, hi, 4)]
    return plots.IsoFlop(k=k, budgets=budgets, **theta)


def _data_curves(fit: FitOutcome, data_runs: pd.DataFrame) -> dict[str, plots.Curve]:
    """The fitted two-variable law along training cells, one curve per model size."""
    ok = data_runs[(data_runs["status"] == "ok") & np.isfinite(data_runs["train_cells"])]
    if ok.empty:
        return {}
    d = ok["train_cells"].to_numpy(float)
    grid = np.logspace(np.log10(d.min()) - 0.2, np.log10(d.max()) + 0.2, 60)
    out = {}
    for size, p in ok.groupby("size")["params"].median().items():
        try:
            X = np.column_stack([np.full_like(grid, float(p)), grid])
            y, lo, hi = _eval_curve(fit.result, X)
        except Exception:  # noqa: BLE001 - a law whose predict takes other inputs: no curves
            return {}
        out[str(size)] = plots.Curve(grid, y, lo, hi)
    return out


def _run_table_rows(runs: pd.DataFrame) -> tuple[list[str], list[list[str]], list[str]]:
    cols = ["run_id", "size", "params", "train_cells", "depth", "seed", "cells_seen", "lr", "best_step",
            "best_val_mse", "test_mse", "wall_seconds", "status", "error"]
    likelihood = fitted_loss_column(runs) == "best_val_loss"
    if likelihood:  # the objective's own numbers, in bits, before the MSEs of its point predictions
        cols[9:9] = ["objective", "best_val_loss (bits)", "test_loss (bits)"]
    rows, statuses = [], []
    runs = runs.sort_values(["params", "train_cells", "depth", "seed", "run_id"], ascending=[True, True, False, True, True],
                            na_position="last")
    for _, r in runs.iterrows():
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
        rows.append(row)
        statuses.append(str(r["status"]))
    return cols, rows, statuses


def _fit_rows(fit: FitOutcome) -> list[tuple[str, str, str]]:
    """(quantity, value, note) rows summarising the fit."""
    d = fit.data or {}
    rows = []
    if d.get("formula"):
        rows.append(("law", str(d.get("law", fit.law)), str(d["formula"])))
    rows.append(("method", str(d.get("method", fit.method)), str(d.get("method_description") or "")))
    ci = d.get("ci95") or {}
    for name, val in (d.get("params") or {}).items():
        lohi = ci.get(name)
        ci_txt = (f"[{fmt_num(lohi[0])}, {fmt_num(lohi[1])}]" if lohi and len(lohi) == 2 and lohi[0] is not None
                  else "n/a (no bootstrap)")
        rows.append((f"parameter {name}", fmt_num(val), f"95% CI {ci_txt}"))
    if d.get("bootstrap") is not None:
        note = str(d.get("ci_method") or "percentile bootstrap")
        if d.get("bootstrap_units"):
            note += f"; units: runs grouped by {', '.join(map(str, d['bootstrap_units']))}"
        if d.get("bootstrap_failed"):
            note += f"; {d['bootstrap_failed']} resample(s) failed to fit"
        rows.append(("bootstrap resamples", fmt_int(d["bootstrap"]), note))
    rows.append(("R^2", fmt_num(d.get("r2")), str(d.get("r2_definition") or "")))
    rows.append(("points fitted (n)", fmt_int(d.get("n_points")), fit.note or ""))
    fab = d.get("floor_at_boundary")
    bounds = d.get("floor_bounds")
    btxt = f" (search range {fmt_num(bounds[0])} to {fmt_num(bounds[1])})" if bounds and len(bounds) == 2 else ""
    rows.append(("floor_at_boundary", str(fab),
                 ("WARNING: the floor estimate touches its search bound" + btxt + "; it is an artefact of the "
                  "bounds, not a measurement, and must not be quoted as the irreducible loss") if fab
                 else "the floor lies inside its search range" + btxt))
    nf = d.get("no_floor") or fit.no_floor or {}
    for k in ("aic", "bic"):
        if k in d:
            note = ""
            if nf.get(k) is not None and d.get(k) is not None:
                diff = float(nf[k]) - float(d[k])
                note = (f"law without a floor ({nf.get('law', 'power')}): {fmt_num(nf[k])}; difference "
                        f"{diff:+.2f} ({'favours the floor' if diff > 0 else 'does not favour the floor'})")
            elif nf:
                note = "the law without a floor could not be fitted"
            space = f" [{d['aic_space']}]" if d.get("aic_space") else ""
            rows.append((k.upper() + space, fmt_num(d.get(k)), note))
    llo = d.get("leave_largest_out")
    if isinstance(llo, dict):
        if llo.get("predicted") is not None and llo.get("observed") is not None:
            val = f"{100 * float(llo.get('rel_error', 0.0)):+.2f}%"
            note = (f"fitted without the largest model (P = {fmt_int(llo.get('x'))}, {llo.get('n_heldout')} run(s)), "
                    f"predicted {fmt_num(llo['predicted'])}, observed {fmt_num(llo['observed'])}")
        else:
            val, note = "n/a", str(llo.get("note") or "could not be computed")
        rows.append(("leave-largest-out error", val, note))
    for k, v in d.items():
        if k != "leave_largest_out" and ("leave" in k.lower() or "largest" in k.lower()):
            rows.append((k.replace("_", " "), _compact(v), ""))
    return rows


_DEPTH_HEADER = ["depth", "runs fitted", "alpha", "alpha 95% CI", "floor", "floor 95% CI", "R^2",
                 "floor at bound", "gene-mean (val)", "Bayes-linear (val)", "best run (val)"]


def _depth_fits_json(depth_fits: dict[float, FitOutcome], sd: SweepData) -> dict[str, Any]:
    """fit.json's ``by_depth``: {"1": fit, "0.25": fit, ...}, each the law's ``to_dict`` (or its
    error) plus the depth, the number of ok runs and that depth's baselines."""
    out = {}
    for depth, fo in depth_fits.items():
        entry = dict(fo.data) if fo.data is not None else {
            "law": fo.law, "method": fo.method, "error": fo.error,
            "n_points": 0 if fo.used is None else int(len(fo.used))}
        entry["depth"] = depth
        entry["n_runs_ok"] = int(((sd.runs["depth"] == depth) & (sd.runs["status"] == "ok")).sum())
        if sd.depth_baselines.get(depth):
            entry["baselines"] = sd.depth_baselines[depth]
        out[depth_label(depth)] = entry
    return out


def _depth_rows(depth_fits: dict[float, FitOutcome], sd: SweepData) -> list[list[str]]:
    """One row per depth: the law's exponent and floor with their 95% intervals, R^2, runs
    fitted, that depth's baselines and best run."""

    def ci(lohi: Any) -> str:
        ok = isinstance(lohi, list) and len(lohi) == 2 and None not in lohi
        return f"[{fmt_num(lohi[0])}, {fmt_num(lohi[1])}]" if ok else "n/a"

    rows = []
    for depth, fo in depth_fits.items():
        d = fo.data or {}
        params, cis = d.get("params") or {}, d.get("ci95") or {}
        fname = d.get("floor_param") or floor_name(params)
        base = sd.depth_baselines.get(depth, {})
        at = sd.runs[(sd.runs["depth"] == depth) & (sd.runs["status"] == "ok")]["best_val_mse"]
        rows.append([
            depth_label(depth), fmt_int(0 if fo.used is None else len(fo.used)),
            fmt_num(params.get("alpha")) if "alpha" in params else "n/a", ci(cis.get("alpha")),
            fmt_num(params.get(fname)) if fname in params else "n/a", ci(cis.get(fname)) if fname else "n/a",
            fmt_num(d.get("r2")) if fo.data else f"no fit: {fo.error}",
            str(d.get("floor_at_boundary")) if fo.data else "",
            fmt_num((base.get("gene_mean") or {}).get("val")), fmt_num((base.get("bayes_linear") or {}).get("val")),
            fmt_num(float(at.min())) if at.notna().any() else "n/a",
        ])
    return rows


def _depth_text(depth_fits: dict[float, FitOutcome], head: float | None) -> str:
    if not depth_fits:
        return ""
    law = next(iter(depth_fits.values())).law
    return ("Each depth is the dataset with every count binomially thinned to that fraction of the reads "
            "(library sizes thinned exactly over all genes, then renormalised), so a run at depth f is trained "
            "and scored on the noisier measurement, validation cells included; its baselines change with it. "
            f"The '{law}' law is fitted to each depth's runs on its own (rows below, fit.json 'by_depth'); the "
            f"headline fit above uses depth {depth_label(head if head is not None else 1.0)} only. A floor that "
            "rises as depth falls is measurement noise that no model size removes.")


def _compute_optimal_rows(fit: FitOutcome) -> tuple[str, list[list[str]]]:
    """(definition line, rows) of the compute-optimal table of a two-variable law, if any."""
    co = (fit.data or {}).get("compute_optimal")
    if not isinstance(co, dict) or not isinstance(co.get("table"), list):
        return "", []

    def ci(v: Any) -> str:
        return f"[{fmt_num(v[0], 3)}, {fmt_num(v[1], 3)}]" if isinstance(v, list) and len(v) == 2 else ""

    rows = []
    for r in co["table"]:
        if isinstance(r, dict):
            rows.append([fmt_num(r.get("C"), 3), fmt_num(r.get("N_opt"), 3), ci(r.get("N_opt_ci95")),
                         fmt_num(r.get("D_opt"), 3), ci(r.get("D_opt_ci95")), fmt_num(r.get("data_per_param"), 3),
                         fmt_num(r.get("loss"))])
    parts = [str(co.get(k)) for k in ("C_definition", "k_source") if co.get(k)]
    for k in ("N_opt_exponent", "D_opt_exponent"):
        if co.get(k) is not None:
            parts.append(f"{k.replace('_', ' ')} {fmt_num(co[k], 3)}")
    return "; ".join(parts), rows


_CO_HEADER = ["compute C", "N* (params)", "N* 95% CI", "D* (cells)", "D* 95% CI", "cells per param", "predicted loss"]


def _compact(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_compact(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_compact(x) for x in v[:8]) + (", ..." if len(v) > 8 else "") + "]"
    if isinstance(v, float):
        return fmt_num(v)
    return str(v)


def _true_floor_rows(fit: FitOutcome, sd: SweepData) -> list[tuple[str, str, str]]:
    """The fitted floor beside the simulator's exact one, when the data have one."""
    true = sd.true_floor
    d = fit.data or {}
    name = d.get("floor_param") or floor_name(d.get("params") or {})
    c = _float((d.get("params") or {}).get(name)) if name else None
    if true is None or c is None:
        return []
    lohi = (d.get("ci95") or {}).get(name) or [None, None]
    lo, hi = (_float(lohi[0]), _float(lohi[1])) if len(lohi) == 2 else (None, None)
    unit = " bits" if sd.objective != "mse" else ""
    if lo is None or hi is None:
        verdict = "no interval to compare (no bootstrap)"
    elif lo <= true <= hi:
        verdict = f"the true floor is inside the fitted floor's 95% interval [{fmt_num(lo)}, {fmt_num(hi)}]"
    else:
        verdict = (f"the true floor is OUTSIDE the fitted floor's 95% interval [{fmt_num(lo)}, {fmt_num(hi)}]: "
                   "the ladder has not reached the regime where the law pins the floor down")
    return [("true Bayes floor (simulator, val)", f"{fmt_num(true)}{unit}",
             f"fitted {name} = {fmt_num(c)}{unit} ({100 * (c / true - 1):+.1f}%); {verdict}")]


def _entropy_rows(fit: FitOutcome, sd: SweepData, gene_best: _GeneBest | None = None) -> list[tuple[str, str, str]]:
    d = fit.data or {}
    eb = d.get("entropy_bits") or {}
    rows = []
    if isinstance(eb, dict) and eb.get("likelihood") is not None:
        ci = eb.get("ci95") or [None, None]
        rows.append((f"fitted floor of the {sd.objective} loss (measured)", f"{fmt_num(eb['likelihood'], 4)} bits",
                     (f"95% CI [{fmt_num(ci[0], 4)}, {fmt_num(ci[1], 4)}]" if None not in ci else "no interval")
                     + ("; the floor sits on its search bound, so this is NOT a measurement"
                        if d.get("floor_at_boundary") else "")))
        rows.append(("label", str(eb.get("label") or ""), ""))
        for k, v in sd.likelihood_refs.items():
            if v.get("val") is not None:
                rows.append((f"{k.replace('_', '-')} ({sd.objective}, val)", f"{fmt_num(v['val'], 4)} bits",
                             "exact, simulator" if k == "bayes_floor" else "baseline, same masks"))
    elif isinstance(eb, dict) and eb.get("gaussian") is not None:
        ci = eb.get("ci95")
        rows.append(("fitted floor, homoscedastic Gaussian",
                     f"{fmt_num(eb['gaussian'], 4)} bits",
                     (f"95% CI [{fmt_num(ci[0], 4)}, {fmt_num(ci[1], 4)}]" if ci else "no interval")
                     + ("; the floor sits on its search bound, so this is NOT a measurement"
                        if d.get("floor_at_boundary") else "")))
        if eb.get("label"):
            rows.append(("label", str(eb["label"]), ""))
        pg = eb.get("per_gene")
        if isinstance(pg, dict) and pg.get("bits") is not None:
            who = f" of {gene_best.run_id} (test)" if gene_best is not None else ""
            rows.append((f"per-gene (heteroscedastic) Gaussian{who}, unweighted mean over genes",
                         f"{fmt_num(pg['bits'], 4)} bits", str(pg.get("label") or "")))
            if pg.get("at_floor") is not None:
                rows.append(("per-gene (heteroscedastic) Gaussian at the fitted floor",
                             f"{fmt_num(pg['at_floor'], 4)} bits",
                             "the floor shared across genes in proportion to the best run's per-gene errors"))
        for k, v in eb.items():
            if k not in ("gaussian", "ci95", "label", "per_gene"):
                rows.append((k.replace("_", " "), _compact(v), ""))
    elif isinstance(eb, dict) and eb.get("note"):
        rows.append(("no entropy from this law", "n/a", str(eb["note"])))
    if gene_best is not None and gene_best.test_mse is not None:
        rows.append((f"best run {gene_best.run_id}, test MSE, homoscedastic",
                     f"{fmt_num(_bits(gene_best.test_mse), 4)} bits",
                     f"0.5 log2(2 pi e test_mse), test_mse = {fmt_num(gene_best.test_mse)}"))
        hb = _bits_weighted(gene_best.mse, gene_best.n)
        rows.append((f"best run {gene_best.run_id}, test, per-gene (heteroscedastic)",
                     "n/a" if hb is None else f"{fmt_num(hb, 4)} bits",
                     ("mean over masked positions (genes weighted by masked counts) of 0.5 log2(2 pi e mse_g); "
                      "never above the homoscedastic row (Jensen)")))
    elif not sd.per_gene:
        rows.append(("per-gene (heteroscedastic) Gaussian", "n/a",
                     "no run has per-gene errors (per_gene.json)"))
    gm = sd.baselines.get("gene_mean", {}).get("val")
    if gm is not None:
        rows.append(("gene-mean baseline (val), same formula", f"{fmt_num(_bits(gm), 4)} bits", "for scale"))
    if sd.bayes_floor is not None:
        rows.append(("true Bayes floor, same formula", f"{fmt_num(_bits(sd.bayes_floor), 4)} bits", "simulator"))
    return rows


# ----------------------------------------------------------------------------------------------
# HTML and Markdown

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;
color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:0.2em} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.6em}
.meta{color:#666;font-size:0.9em} .box{background:#f5f8fc;border-left:4px solid #1f77b4;padding:10px 14px}
.warn{background:#fff4e5;border-left:4px solid #e67e22;padding:8px 14px;margin:8px 0}
.notes li{color:#8a5a00}
table{border-collapse:collapse;font-size:0.85em;margin:8px 0} th,td{border:1px solid #ddd;padding:3px 7px;
text-align:left;vertical-align:top} th{background:#f0f0f0} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.diverged td{background:#fde8e8} tr.failed td{background:#f3e6f7} tr.unknown td{background:#eee}
td.id{white-space:nowrap} td.err{max-width:360px;word-break:break-word;font-family:monospace;font-size:0.9em}
figure{margin:12px 0} figure img{max-width:100%;border:1px solid #eee} figcaption{font-size:0.85em;color:#555}
"""

_NUMCOLS = {"params", "train_cells", "depth", "seed", "cells_seen", "lr", "best_step", "best_val_mse", "test_mse",
            "wall_seconds"}


def _h(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _html_table(header: list[str], rows: list[list[str]] | list[tuple], classes: list[str] | None = None,
                numeric: set[str] = frozenset()) -> str:
    out = ["<table><thead><tr>" + "".join(f"<th>{_h(c)}</th>" for c in header) + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = f' class="{_h(classes[i])}"' if classes else ""
        cells = []
        for c, v in zip(header, row):
            tdc = (' class="num"' if c in numeric else ' class="err"' if c == "error"
                   else ' class="id"' if c in ("run_id", "quantity") else "")
            cells.append(f"<td{tdc}>{_h(v)}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ").strip()


def _md_table(header: list[str], rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    return "\n".join(lines)


@dataclass
class _Doc:
    title: str
    meta: list[str]
    meaning: str
    warnings: list[str]
    notes: list[str]
    figures: list[_Figure]
    fit: FitOutcome
    fit_rows: list[tuple[str, str, str]]
    entropy_rows: list[tuple[str, str, str]]
    run_cols: list[str]
    run_rows: list[list[str]]
    run_status: list[str]
    status_counts: dict[str, int]
    methods: str
    gene_text: str = ""
    gene_rows: list[list[str]] = field(default_factory=list)
    gene_run_rows: list[list[str]] = field(default_factory=list)
    depth_text: str = ""
    depth_rows: list[list[str]] = field(default_factory=list)


def _render_html(doc: _Doc) -> str:
    figs = {f.key: f for f in doc.figures}

    def fig_html(key: str) -> str:
        f = figs.get(key)
        if f is None:
            return ""
        b64 = base64.b64encode(f.png).decode("ascii")
        return (f'<figure id="fig-{_h(key)}"><img alt="{_h(f.title)}" src="data:image/png;base64,{b64}">'
                f"<figcaption><b>{_h(f.title)}.</b> {_h(f.caption)}</figcaption></figure>")

    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_h(doc.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_h(doc.title)}</h1>",
        '<p class="meta">' + "<br>".join(_h(m) for m in doc.meta) + "</p>",
        "<h2>What this means</h2>", f'<div class="box"><p>{_h(doc.meaning)}</p></div>',
    ]
    for w in doc.warnings:
        parts.append(f'<div class="warn"><b>Warning:</b> {_h(w)}</div>')
    if doc.notes:
        parts.append("<h3>Missing or incomplete inputs</h3><ul class=\"notes\">"
                     + "".join(f"<li>{_h(n)}</li>" for n in doc.notes) + "</ul>")
    parts.append("<h2>Scaling with model size</h2>")
    parts.append(fig_html("loss_vs_params"))
    parts.append("<h2>The fit</h2>")
    if doc.fit.error:
        parts.append(f'<div class="warn"><b>No fit:</b> {_h(doc.fit.error)}</div>')
    else:
        parts.append(f"<p>Law <code>{_h(doc.fit.law)}</code>, method <code>{_h(doc.fit.method)}</code>.</p>")
        parts.append(_html_table(["quantity", "value", "note"], doc.fit_rows))
    co_def, co_rows = _compute_optimal_rows(doc.fit)
    if co_rows:
        parts.append(f"<h3>Compute-optimal allocation</h3><p>{_h(co_def)}</p>")
        parts.append(_html_table(_CO_HEADER, co_rows))
    parts.append(fig_html("compute_frontier"))
    parts.append("<h2>Entropy per masked gene</h2>")
    if doc.entropy_rows:
        parts.append(_html_table(["quantity", "value", "interval / note"], doc.entropy_rows))
    else:
        parts.append("<p>No entropy estimate: there is no fit.</p>")
    parts.append("<p>Bits are the differential entropy of a Gaussian with variance equal to the MSE "
                 "(0.5 log2(2 pi e MSE)): the homoscedastic-Gaussian figure, which depends on the units of the "
                 "normalised log1p values and is an upper bound on a per-gene (heteroscedastic) figure.</p>")
    parts.append(fig_html("entropy"))
    parts.append("<h2>Learning curves</h2>")
    parts.append(fig_html("learning_curves"))
    if "loss_vs_data" in figs:
        parts.append("<h2>Scaling with data</h2>")
        parts.append(fig_html("loss_vs_data"))
    if doc.depth_rows:
        parts.append("<h2>Sequencing depth</h2>")
        parts.append(f"<p>{_h(doc.depth_text)}</p>")
        parts.append(fig_html("loss_vs_depth"))
        parts.append(_html_table(_DEPTH_HEADER, doc.depth_rows, numeric=set(_DEPTH_HEADER) - {"alpha 95% CI", "floor 95% CI", "floor at bound"}))
    parts.append("<h2>Per-gene error</h2>")
    parts.append(f"<p>{_h(doc.gene_text)}</p>")
    parts.append(fig_html("per_gene"))
    if doc.gene_rows:
        parts.append("<h3>Hardest and easiest genes</h3>")
        parts.append(_html_table(_GENE_HEADER, doc.gene_rows))
    if doc.gene_run_rows:
        parts.append("<h3>Spread of per-gene error by run</h3>")
        parts.append(_html_table(_GENE_RUN_HEADER, doc.gene_run_rows))
    counts = ", ".join(f"{v} {k}" for k, v in doc.status_counts.items())
    parts.append(f"<h2>Runs</h2><p>{_h(counts or 'no runs')}. Runs that diverged or failed are listed with "
                 "their error and are not fitted.</p>")
    parts.append(_html_table(doc.run_cols, doc.run_rows, doc.run_status, numeric=_NUMCOLS))
    parts.append("<h2>Methods</h2>")
    parts.append(f"<p>{_h(doc.methods)}</p>")
    parts.append('<p class="meta">Generated by cellscale; this file is self-contained (figures embedded).</p>')
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def _render_md(doc: _Doc, fig_rel: dict[str, str]) -> str:
    figs = {f.key: f for f in doc.figures}

    def fig_md(key: str) -> list[str]:
        f = figs.get(key)
        if f is None:
            return []
        return [f"![{f.title}]({fig_rel[key]})", "", f"*{f.title}.* {f.caption}", ""]

    L = [f"# {doc.title}", ""] + [f"{m}  " for m in doc.meta] + ["", "## What this means", "", doc.meaning, ""]
    for w in doc.warnings:
        L += [f"> **Warning:** {w}", ""]
    if doc.notes:
        L += ["### Missing or incomplete inputs", ""] + [f"- {n}" for n in doc.notes] + [""]
    L += ["## Scaling with model size", ""] + fig_md("loss_vs_params")
    L += ["## The fit", ""]
    if doc.fit.error:
        L += [f"**No fit:** {doc.fit.error}", ""]
    else:
        L += [f"Law `{doc.fit.law}`, method `{doc.fit.method}`.", "",
              _md_table(["quantity", "value", "note"], doc.fit_rows), ""]
    co_def, co_rows = _compute_optimal_rows(doc.fit)
    if co_rows:
        L += ["### Compute-optimal allocation", "", co_def, "", _md_table(_CO_HEADER, co_rows), ""]
    L += fig_md("compute_frontier")
    L += ["## Entropy per masked gene", ""]
    if doc.entropy_rows:
        L += [_md_table(["quantity", "value", "interval / note"], doc.entropy_rows), ""]
    else:
        L += ["No entropy estimate: there is no fit.", ""]
    L += ["Bits are the differential entropy of a Gaussian with variance equal to the MSE (0.5 log2(2 pi e MSE)): "
          "the homoscedastic-Gaussian figure, which depends on the units of the normalised log1p values and is an "
          "upper bound on a per-gene (heteroscedastic) figure.", ""] + fig_md("entropy")
    L += ["## Learning curves", ""] + fig_md("learning_curves")
    if "loss_vs_data" in figs:
        L += ["## Scaling with data", ""] + fig_md("loss_vs_data")
    if doc.depth_rows:
        L += ["## Sequencing depth", "", doc.depth_text, ""] + fig_md("loss_vs_depth")
        L += [_md_table(_DEPTH_HEADER, doc.depth_rows), ""]
    L += ["## Per-gene error", "", doc.gene_text, ""] + fig_md("per_gene")
    if doc.gene_rows:
        L += ["### Hardest and easiest genes", "", _md_table(_GENE_HEADER, doc.gene_rows), ""]
    if doc.gene_run_rows:
        L += ["### Spread of per-gene error by run", "", _md_table(_GENE_RUN_HEADER, doc.gene_run_rows), ""]
    counts = ", ".join(f"{v} {k}" for k, v in doc.status_counts.items())
    L += ["## Runs", "", f"{counts or 'no runs'}. Runs that diverged or failed are listed with their error and are "
          "not fitted.", "", _md_table(doc.run_cols, doc.run_rows), ""]
    L += ["## Methods", "", doc.methods, ""]
    return "\n".join(L)


def _gene_text(sd: SweepData, best: _GeneBest | None) -> str:
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


def write_report(sweep_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Fit, draw and write ``report.html``, ``report.md``, ``figures/*.png`` and ``fit.json`` into
    ``sweep_dir``; return ``(html_path, md_path)``.

    Raises ``RunError`` only when ``sweep_dir`` is not a sweep directory at all; everything that
    is merely missing (metrics, manifest, baselines) or unfittable is stated in the report.
    """
    sd = load_sweep(sweep_dir)
    root = sd.sweep_dir
    runs = sd.runs
    fcfg = sd.fit_config
    gene_best = _gene_best(sd)
    full_train = _float(((sd.manifest or {}).get("split_sizes") or {}).get("train"))
    fit = run_fit(runs, fcfg, full_train=full_train, per_gene_mse=None if gene_best is None else gene_best.positive)

    depth_fits = run_depth_fits(runs, fcfg, full_train=full_train, headline=fit)

    fit_json = fit.data if fit.data is not None else {
        "law": fit.law, "method": fit.method, "error": fit.error,
        "n_points": 0 if fit.used is None else int(len(fit.used)),
    }
    if depth_fits:
        fit_json = {**fit_json, "by_depth": _depth_fits_json(depth_fits, sd)}
    _atomic_write(root / "fit.json", json.dumps(_to_jsonable(fit_json), indent=2) + "\n")

    figures = _make_figures(sd, fit, gene_best)
    fig_rel = {}
    for f in figures:
        rel = f"figures/{f.key}.png"
        _atomic_write(root / rel, f.png)
        fig_rel[f.key] = rel

    status_counts = {k: int(v) for k, v in runs["status"].value_counts().items()} if len(runs) else {}
    warns = []
    if fit.data and fit.data.get("floor_at_boundary"):
        warns.append("The fitted floor sits on the boundary of its search range: it is set by the fitting bounds, "
                     "not by the data. Do not report it as the irreducible loss.")
    n_bad = sum(v for k, v in status_counts.items() if k != "ok")
    if n_bad:
        warns.append(f"{n_bad} of {len(runs)} runs did not finish ok ("
                     + ", ".join(f"{v} {k}" for k, v in status_counts.items() if k != "ok")
                     + "); they are listed in the run table and excluded from the fit.")
    if fit.error:
        warns.append(f"No scaling law was fitted: {fit.error}.")
    gm = sd.baselines.get("gene_mean", {})
    if not gm:
        sd.notes.append("No gene-mean baseline was recorded (manifest 'baselines' or results columns).")
    head = headline_depth(runs)  # the baseline and the fit are the headline depth's: so are the runs
    meaning = meaning_paragraph(runs if head is None else runs[runs["depth"] == head], fit.data,
                                baseline_val=gm.get("val"), bayes_floor=sd.bayes_floor, fit_error=fit.error)
    extra = {}
    if sd.sweep_meta and sd.sweep_meta.get("config_hash"):
        extra["config hash"] = sd.sweep_meta["config_hash"]
    if sd.dataset_dir:
        extra["dataset"] = str(sd.dataset_dir)
    methods = methods_paragraph(sd.config, sd.manifest, runs, fit=fit.data, fit_note=fit.note, extra=extra)

    cfg = sd.config or {}
    name = cfg.get("name") or root.name
    meta = [f"Sweep directory: {root.resolve()}",
            f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"]
    if cfg.get("description"):
        meta.insert(0, str(cfg["description"]))
    run_cols, run_rows, run_status = _run_table_rows(runs)
    gene_rows, gene_run_rows = _gene_tables(sd, gene_best)
    doc = _Doc(
        title=f"cellscale report: {name}", meta=meta, meaning=meaning, warnings=warns, notes=sd.notes,
        figures=figures, fit=fit, fit_rows=_fit_rows(fit) + _true_floor_rows(fit, sd), entropy_rows=_entropy_rows(fit, sd, gene_best),
        run_cols=run_cols, run_rows=run_rows, run_status=run_status, status_counts=status_counts,
        methods=methods, gene_text=_gene_text(sd, gene_best), gene_rows=gene_rows, gene_run_rows=gene_run_rows,
        depth_text=_depth_text(depth_fits, head), depth_rows=_depth_rows(depth_fits, sd),
    )
    html_path, md_path = root / "report.html", root / "report.md"
    _atomic_write(html_path, _render_html(doc))
    _atomic_write(md_path, _render_md(doc, fig_rel))
    return html_path, md_path
