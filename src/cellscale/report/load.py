"""Read a sweep directory (docs/INTERNALS.md) into a ``SweepData``.

Each reader fills one part and says in ``notes`` what is missing or unreadable; a path that
is no sweep directory at all raises. So does a damaged file that a rerun of ``cellscale sweep``
writes again (results.csv, against its checksum; sweep.json; the baselines.json files): one
line names it (``cellscale.runtime.io.DamagedFile``). A run's own logs (metrics.jsonl, per_gene.json),
which only training again would remake, are used as far as they read, with a note and a
warning line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from cellscale.config import ConfigError, FitConfig, StudyConfig, parse_config
from cellscale.data.manifest import Manifest
from cellscale.errors import DataError, RunError
from cellscale.report.records import SWEEP_BASELINES, PerGene, SweepData, scores
from cellscale.runtime.io import DamagedFile, read_json_checked, read_jsonl, verify_checksum, warn
from cellscale.schema import (
    BRANCH_FIELDS,
    DOWNSTREAM_FIELDS,
    NUMERIC_FIELDS,
    RESULT_FIELDS,
    RUNS_DIR,
    BranchRecord,
    fields_of,
)

# columns an older results.csv may lack without anything being missing: their value then
# (a sweep without a depth axis ran at full depth; one before the objectives trained on the MSE)
_OPTIONAL_DEFAULTS = {"depth": 1.0, "objective": "mse", "best_val_loss": np.nan, "test_loss": np.nan,
                      # before the plateau criterion every run had a fixed budget, its verdict unknown
                      "budget": "fixed", "converged": np.nan, "plateau_gain": np.nan, "plateau_gain_se": np.nan,
                      "dropout": np.nan,
                      "attention_dropout": np.nan, "attention_impl": np.nan, "lr_scale": 1.0,
                      # a sweep before the downstream step scored no embedding
                      **dict.fromkeys(DOWNSTREAM_FIELDS, np.nan)}
_METRIC_NUMBERS = ("step", "cells_seen", "lr", "loss", "val_mse", "val_bits", "wall")
# the branch columns read as numbers, from BranchRecord's types: converged (a bool) is kept as read
_BRANCH_NUMBERS = fields_of(BranchRecord, int, float)
REWRITE = "rerun `cellscale sweep` with the same config and --out to write it again"


def load_sweep(sweep_dir: str | os.PathLike) -> SweepData:
    """Read everything the report needs; record what is missing in ``notes``."""
    data = SweepData(sweep_dir=_sweep_path(sweep_dir))
    _read_config(data)
    _read_sweep_meta(data)
    _read_manifest(data)
    _read_results(data)
    _read_branches(data)
    runs_dir = data.sweep_dir / RUNS_DIR
    _read_all_metrics(data, runs_dir)
    _read_per_gene(data, runs_dir)
    _check_baselines(data.sweep_dir / "baselines.json")
    _read_depth_baselines(data)
    _name_orphans(data, runs_dir)
    return data


def _sweep_path(sweep_dir: str | os.PathLike) -> Path:
    sd = Path(sweep_dir)
    if not sd.is_dir():
        raise RunError(f"sweep directory not found: {sd}")
    known = [sd / n for n in ("config.yaml", "sweep.json", "results.csv", RUNS_DIR)]
    if not any(p.exists() for p in known):
        raise RunError(f"{sd} is not a sweep directory (no config.yaml, sweep.json, results.csv or runs/)")
    return sd


def _read_config(data: SweepData) -> None:
    path = data.sweep_dir / "config.yaml"
    if not path.is_file():
        d = FitConfig()
        data.notes.append("config.yaml is missing: training settings and fit settings are unknown "
                          f"(the fit uses the defaults {d.law} / {d.method} / {d.bootstrap} resamples / seed {d.seed}).")
        return
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError("not a mapping")
    except (yaml.YAMLError, ValueError) as err:
        data.notes.append(f"config.yaml could not be read ({str(err).splitlines()[0]}).")
        return
    try:  # validate and fill defaults; a config that no longer validates only degrades the text
        data.config = parse_config(StudyConfig, raw, origin=str(path)).model_dump(mode="json")
    except ConfigError as err:
        data.config = raw
        data.notes.append(f"config.yaml does not validate against this version's StudyConfig ({err}); "
                          "its raw values are used.")


def _read_sweep_meta(data: SweepData) -> None:
    path = data.sweep_dir / "sweep.json"
    if not path.is_file():
        data.notes.append("sweep.json is missing.")
        return
    data.sweep_meta = read_json_checked(path, fix=REWRITE)


def _read_manifest(data: SweepData) -> None:
    """The dataset manifest: sweep.json's dataset, else the config's, else SWEEP_DIR/dataset."""
    candidates = [Path(p) for p in ((data.sweep_meta or {}).get("dataset"), (data.config or {}).get("dataset")) if p]
    candidates.append(data.sweep_dir / "dataset")
    for cand in candidates:
        cand = cand if cand.is_absolute() else data.sweep_dir / cand
        if (cand / "manifest.json").is_file():
            data.dataset_dir = cand
            try:
                data.manifest = Manifest.read(cand / "manifest.json")
            except DataError as err:
                data.notes.append(f"{err}.")
            return
    data.notes.append("The dataset manifest was not found (looked in: "
                      + ", ".join(str(c) for c in candidates) + "): data facts and baselines may be missing.")


def _read_results(data: SweepData) -> None:
    path = data.sweep_dir / "results.csv"
    runs = pd.DataFrame(columns=list(RESULT_FIELDS))
    if not path.is_file():
        data.notes.append("results.csv is missing: no finished run to report yet.")
    else:
        verify_checksum(path, fix=REWRITE)
        try:
            runs = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
            raise DamagedFile(path, f"not a readable CSV: {str(err).splitlines()[0]}", REWRITE) from None
    missing = [c for c in RESULT_FIELDS if c not in runs.columns]
    lacking = [c for c in missing if c not in _OPTIONAL_DEFAULTS]
    if lacking and len(runs.columns):
        data.notes.append("results.csv lacks the columns " + ", ".join(lacking) + ".")
    # file order is kept, so that the fit sees exactly the rows a direct fit_table call on the csv sees
    data.runs = _typed_results(runs, missing).reset_index(drop=True)


def _read_branches(data: SweepData) -> None:
    """SWEEP_DIR/branches.csv (the cooldown branch points), checked against its checksum; None
    when the sweep took none."""
    path = data.sweep_dir / "branches.csv"
    if not path.is_file():
        return
    verify_checksum(path, fix=REWRITE)
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DamagedFile(path, f"not a readable CSV: {str(err).splitlines()[0]}", REWRITE) from None
    missing = [c for c in BRANCH_FIELDS if c not in frame.columns]
    if missing:
        data.notes.append("branches.csv lacks the columns " + ", ".join(missing) + ": the data axis is not fitted.")
        return
    for c in _BRANCH_NUMBERS:
        frame[c] = pd.to_numeric(frame[c], errors="coerce")
    frame["run_id"] = frame["run_id"].astype(str)
    frame["status"] = frame["status"].fillna("unknown").astype(str)
    data.branches = frame


def _typed_results(runs: pd.DataFrame, missing: list[str]) -> pd.DataFrame:
    """Every result column present, numbers numeric (``RunRecord``'s non-text fields), the text
    the report keys on normalised, optional defaults filled."""
    for c in missing:
        runs[c] = np.nan
    for c in NUMERIC_FIELDS:
        runs[c] = pd.to_numeric(runs[c], errors="coerce")
    for c, default in _OPTIONAL_DEFAULTS.items():
        if not (isinstance(default, float) and math.isnan(default)):
            runs[c] = runs[c].fillna(default)
    runs["run_id"] = runs["run_id"].astype(str)
    runs["size"] = runs["size"].fillna("?").astype(str)
    runs["status"] = runs["status"].fillna("unknown").astype(str).str.strip().str.lower()
    runs["error"] = runs["error"].fillna("").astype(str)
    return runs


def read_metrics(path: Path) -> tuple[pd.DataFrame | None, int]:
    """Parse metrics.jsonl, skipping unparseable lines (a run killed mid-write) and those a resume
    found damaged (``{"kind": "lost"}``); returns (frame, bad)."""
    rows, bad = read_jsonl(path)
    if not rows:
        return None, bad
    df = pd.DataFrame(rows)
    for c in _METRIC_NUMBERS:
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    if "kind" not in df:
        df["kind"] = np.where(df.get("val_mse", pd.Series(np.nan, index=df.index)).notna(), "eval", "train")
    return df, bad


def _read_all_metrics(data: SweepData, runs_dir: Path) -> None:
    no_metrics = []
    for rid in data.runs["run_id"]:
        path = runs_dir / rid / "metrics.jsonl"
        m, bad = read_metrics(path) if path.is_file() else (None, 0)
        if m is not None:
            data.metrics[rid] = m
        else:
            no_metrics.append(rid)
        if bad:
            data.notes.append(f"runs/{rid}/metrics.jsonl: {bad} unreadable line(s) skipped.")
            warn(f"{path} is damaged ({bad} unreadable line(s)): its learning curve is drawn without them")
    if no_metrics:
        status = dict(zip(data.runs["run_id"], data.runs["status"]))
        data.notes.append("No learning curve (metrics.jsonl missing or empty) for: "
                          + ", ".join(f"{r} ({status.get(r, '?')})" for r in no_metrics) + ".")


def _parse_per_gene(path: Path) -> PerGene:
    obj = json.loads(path.read_text())
    genes = [str(g) for g in obj["genes"]]
    mse = np.array([np.nan if v is None else float(v) for v in obj["test_mse"]], dtype=float)
    n = np.array([int(v) for v in obj.get("n_masked", [1] * len(genes))], dtype=np.int64)
    if not (len(genes) == mse.size == n.size) or mse.size == 0:
        raise ValueError("genes, test_mse and n_masked differ in length")
    mse[~np.isfinite(mse) | (n <= 0)] = np.nan
    return PerGene(genes, mse, n)


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
            data.per_gene[rid] = _parse_per_gene(path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            bad.append(f"{rid} ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
    if missing:
        data.notes.append("No per-gene test errors (per_gene.json missing: a run written by an older cellscale, "
                          "or one without a best checkpoint) for: " + ", ".join(missing) + ".")
    if bad:
        data.notes.append("Unreadable per_gene.json (skipped) for: " + ", ".join(bad) + ".")
        warn("damaged per_gene.json, left out of the per-gene figures: " + ", ".join(bad))


def _cached_baselines(obj: Any) -> dict[str, dict[str, float | None]]:
    """{name: {"val", "test"}} of a sweep's flat baselines.json, or of one entry of a dataset's
    ``load_or_compute_baselines`` cache (``{"format": "cellscale-baselines", "entries": {...}}``)."""
    if isinstance(obj, dict) and obj.get("format") == "cellscale-baselines":
        entries = [e for e in (obj.get("entries") or {}).values() if isinstance(e, dict)]
        obj = entries[0] if entries else {}
    if not isinstance(obj, dict):
        return {}
    return {name: scores(obj[name]) for name in ("gene_mean", *SWEEP_BASELINES) if isinstance(obj.get(name), dict)}


def _check_baselines(path: Path) -> None:
    """A baselines.json the sweep wrote (its own, or a thinned dataset's cache) must read."""
    if path.is_file():
        read_json_checked(path, fix=REWRITE)


def _read_json_or_none(path: Path) -> Any:
    return read_json_checked(path, fix=REWRITE) if path.is_file() else None


def _read_manifest_or_none(path: Path) -> Manifest | None:
    try:
        return Manifest.read(path)
    except DataError:
        return None


def _read_depth_baselines(data: SweepData) -> None:
    """Each depth's reference predictors: the thinned datasets' manifests (gene mean) and
    baselines.json (Bayes-linear, kNN), as listed in sweep.json (else SWEEP_DIR/datasets/depth-*);
    the full-depth dataset's from the manifest and baselines.json already read."""
    listed = (data.sweep_meta or {}).get("depth_datasets")
    dirs = [Path(p) for p in listed.values()] if isinstance(listed, dict) else sorted(
        (data.sweep_dir / "datasets").glob("depth-*"))
    sources: list[tuple[Manifest | None, Any]] = []
    if data.dataset_dir is not None and data.manifest is not None:
        sources.append((data.manifest, data.baselines_json))
    sources += [(_read_manifest_or_none(d / "manifest.json"), _read_json_or_none(d / "baselines.json")) for d in dirs]
    for man, cache in sources:
        if man is None or man.depth_fraction is None:
            continue
        gene_mean = man.baselines.get("gene_mean")
        entry = {**_cached_baselines(cache), **({"gene_mean": scores(gene_mean)} if gene_mean else {})}
        if entry:
            data.depth_baselines[man.depth_fraction] = entry


def _name_orphans(data: SweepData, runs_dir: Path) -> None:
    if not runs_dir.is_dir():
        return
    known = set(data.runs["run_id"])
    orphans = sorted(p.name for p in runs_dir.iterdir() if p.is_dir() and p.name not in known)
    if orphans:
        data.notes.append("Run directories without a row in results.csv (unfinished or not collected): "
                          + ", ".join(orphans) + ".")
