"""Collect finished runs into results.csv (one row per run) and their cooldown branches into
branches.csv (one row per branch point), each written atomically with its checksum in
``<name>.sha256.json`` (``cellscale.runtime.io.verify_checksum``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cellscale.runtime.io import DamagedFile, atomic_write_text_checked, read_json_checked
from cellscale.schema import BRANCH_FIELDS, BRANCH_TABLE, RESULT_FIELDS, RUNS_DIR


def collect_results(sweep_dir: Path, run_ids: list[str] | None = None) -> pd.DataFrame:
    """Every run with a result.json, in plan order when ``run_ids`` is given. A result.json of a
    cellscale before the depth axis has no ``depth``: it ran at full depth (1.0). A damaged one
    is left out: its run is unfinished (the sweep redoes it, and says so)."""
    runs_dir = Path(sweep_dir) / RUNS_DIR
    ids = run_ids if run_ids is not None else sorted(p.name for p in runs_dir.glob("*") if p.is_dir())
    rows = []
    for rid in ids:
        path = runs_dir / rid / "result.json"
        if path.is_file():
            try:
                row = read_json_checked(path, keys=("status",))
            except DamagedFile:
                continue
            if row.get("depth") is None:
                row["depth"] = 1.0
            rows.append(row)
    frame = pd.DataFrame(rows)
    for col in RESULT_FIELDS:
        if col not in frame.columns:
            frame[col] = None
    return frame[list(RESULT_FIELDS)]


def collect_branches(sweep_dir: Path, run_ids: list[str]) -> pd.DataFrame:
    """The branch points of the runs ``run_ids`` (in that order, each run's in order of cells seen)
    that have a readable branches.json; a damaged one is left out (its run redoes or rewrites it)."""
    rows = []
    for rid in run_ids:
        path = Path(sweep_dir) / RUNS_DIR / rid / BRANCH_TABLE
        if path.is_file():
            try:
                rows += read_json_checked(path, keys=("branches",))["branches"]
            except DamagedFile:
                continue
    frame = pd.DataFrame(rows, columns=list(BRANCH_FIELDS))
    return frame[list(BRANCH_FIELDS)]


def write_results(sweep_dir: Path, run_ids: list[str] | None = None) -> Path:
    """results.csv (and branches.csv, when a run has branch points); returns results.csv's path."""
    frame = collect_results(sweep_dir, run_ids)
    path = Path(sweep_dir) / "results.csv"
    branches = collect_branches(sweep_dir, frame["run_id"].astype(str).tolist())
    if len(branches):
        atomic_write_text_checked(Path(sweep_dir) / "branches.csv", branches.to_csv(index=False))
    atomic_write_text_checked(path, frame.to_csv(index=False))
    return path
