"""Collect finished runs into results.csv (one row per run, written atomically)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cellscale.io import atomic_write_text
from cellscale.schema import RESULT_FIELDS


def collect_results(sweep_dir: Path, run_ids: list[str] | None = None) -> pd.DataFrame:
    """Every run with a result.json, in plan order when ``run_ids`` is given. A result.json of a
    cellscale before the depth axis has no ``depth``: it ran at full depth (1.0)."""
    runs_dir = Path(sweep_dir) / "runs"
    ids = run_ids if run_ids is not None else sorted(p.name for p in runs_dir.glob("*") if p.is_dir())
    rows = []
    for rid in ids:
        path = runs_dir / rid / "result.json"
        if path.is_file():
            row = json.loads(path.read_text())
            if row.get("depth") is None:
                row["depth"] = 1.0
            rows.append(row)
    frame = pd.DataFrame(rows)
    for col in RESULT_FIELDS:
        if col not in frame.columns:
            frame[col] = None
    return frame[list(RESULT_FIELDS)]


def write_results(sweep_dir: Path, run_ids: list[str] | None = None) -> Path:
    frame = collect_results(sweep_dir, run_ids)
    path = Path(sweep_dir) / "results.csv"
    atomic_write_text(path, frame.to_csv(index=False))
    return path
