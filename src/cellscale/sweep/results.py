"""Collect finished runs into results.csv (one row per run, written atomically)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from cellscale.io import atomic_write_text
from cellscale.train import RESULT_FIELDS


def result_columns() -> list[str]:
    """``RESULT_FIELDS`` with ``depth`` (the sweep's depth axis) right after ``train_cells``."""
    cols = list(RESULT_FIELDS)
    if "depth" not in cols:
        cols.insert(cols.index("train_cells") + 1 if "train_cells" in cols else len(cols), "depth")
    return cols


def collect_results(sweep_dir: Path, run_ids: list[str] | None = None,
                    depths: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Every run with a result.json, in plan order when ``run_ids`` is given.

    ``depths`` (run id -> depth fraction, from the plan) fills ``depth`` where a result.json
    does not record it; a run without either counts as full depth (1.0)."""
    runs_dir = Path(sweep_dir) / "runs"
    ids = run_ids if run_ids is not None else sorted(p.name for p in runs_dir.glob("*") if p.is_dir())
    rows = []
    for rid in ids:
        path = runs_dir / rid / "result.json"
        if path.is_file():
            row = json.loads(path.read_text())
            if row.get("depth") is None:
                row["depth"] = float((depths or {}).get(rid, 1.0))
            rows.append(row)
    frame = pd.DataFrame(rows)
    cols = result_columns()
    for col in cols:
        if col not in frame.columns:
            frame[col] = None
    return frame[cols]


def write_results(sweep_dir: Path, run_ids: list[str] | None = None,
                  depths: Mapping[str, float] | None = None) -> Path:
    frame = collect_results(sweep_dir, run_ids, depths)
    path = Path(sweep_dir) / "results.csv"
    atomic_write_text(path, frame.to_csv(index=False))
    return path
