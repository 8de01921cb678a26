"""The sweep's downstream step: after a run finishes, its best checkpoint's cell embedding is
scored (``cellscale.downstream``) and the scores are added to its ``result.json``; the two
reference embeddings (PCA-50, the HVG values) are scored once per dataset into
``SWEEP_DIR/downstream.json``. Training stays model-only: nothing here runs inside ``train_run``.

A run already scored (its result.json has ``downstream_label``) is left as it is, unless
``force`` (``cellscale downstream --label ...`` rescoring with another label). A scoring problem
never fails the run or the sweep: it becomes the run's ``downstream_note``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cellscale import schema
from cellscale.config import depth_label
from cellscale.data.store import Dataset
from cellscale.downstream import scores as dn
from cellscale.errors import CellscaleError, RunError
from cellscale.runtime.io import atomic_write_json, read_json, read_json_checked
from cellscale.schema import DOWNSTREAM_FIELDS, RUNS_DIR

__all__ = ["REFS_FILE", "score_run", "score_result", "score_sweep", "sweep_datasets", "read_references",
           "rewrite_results"]

REFS_FILE = "downstream.json"
FORMAT = "cellscale-downstream"


def _empty(note: str, *, label: str | None = None, batch_key: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys(DOWNSTREAM_FIELDS)
    out.update({"downstream_label": label, "downstream_batch_key": batch_key, "downstream_note": note})
    return out


def _scores(emb_all: np.ndarray, cells: dn.ProbeCells) -> dict[str, Any]:
    return {**dn.score_embedding(dn.split_rows(cells, emb_all), cells), **dn.describe(cells),
            "downstream_note": None}


def score_run(run_dir: str | os.PathLike, ds: Dataset, *, label: str = dn.LABEL_DEFAULT,
              batch_key: str | None = None) -> dict[str, Any]:
    """The downstream fields of one run: its best checkpoint's embedding of the probed cells of
    ``ds`` (the dataset it was trained on), scored. Never raises for a scoring problem."""
    cells = dn.probe_cells(ds.obs, ds.splits, label=label, batch_key=batch_key)
    if isinstance(cells, str):
        return _empty(f"skipped: {cells}", label=label)
    try:
        from cellscale.downstream.embedding import embed_dataset, load_run_model

        rm = load_run_model(run_dir)
        return _scores(embed_dataset(rm, ds, cells.all_rows), cells)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - recorded on the run, the sweep goes on
        what = str(err) if isinstance(err, CellscaleError) else f"{type(err).__name__}: {err}"
        return _empty(f"scoring failed: {what}"[:500], label=label, batch_key=cells.batch_key)


def reference_scores(ds: Dataset, *, label: str = dn.LABEL_DEFAULT,
                     batch_key: str | None = None) -> dict[str, Any]:
    """{"pca50": fields, "hvg": fields} of a dataset's reference embeddings, or {"note": why not}."""
    cells = dn.probe_cells(ds.obs, ds.splits, label=label, batch_key=batch_key)
    if isinstance(cells, str):
        return {"note": f"skipped: {cells}"}
    values = dn.split_rows(cells, np.asarray(ds.values[cells.all_rows], dtype=np.float32))
    refs = dn.reference_embeddings(values)
    return {name: _scores(np.concatenate([emb[s] for s in ("train", *dn.SPLITS)]), cells)
            for name, emb in refs.items()}


def sweep_datasets(sweep_dir: str | os.PathLike) -> dict[float, str]:
    """{depth: dataset dir} of a sweep, from its sweep.json."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.is_file():
        raise RunError(f"{sweep_dir} is not a sweep directory (no sweep.json): pass a sweep or a run directory")
    return schema.sweep_datasets(read_json_checked(path, fix="rerun the sweep's command to rewrite it"))


def read_references(sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """SWEEP_DIR/downstream.json ({} when absent or unreadable)."""
    path = Path(sweep_dir) / REFS_FILE
    try:
        obj = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) and obj.get("format") == FORMAT else {}


def _update_references(sweep_dir: Path, datasets: Mapping[float, str], *, label: str, batch_key: str | None,
                       force: bool, cache: dict[float, Dataset]) -> None:
    doc = read_references(sweep_dir)
    same = doc.get("label") == label and doc.get("batch_key_asked") == batch_key
    refs = dict(doc.get("references") or {}) if same and not force else {}
    todo = [d for d in datasets if depth_label(d) not in refs]
    if not todo:
        return
    for depth in todo:
        refs[depth_label(depth)] = reference_scores(_open(datasets, depth, cache), label=label, batch_key=batch_key)
    atomic_write_json(sweep_dir / REFS_FILE, {"format": FORMAT, "label": label, "batch_key_asked": batch_key,
                                              "references": refs})


def _open(datasets: Mapping[float, str], depth: float, cache: dict[float, Dataset]) -> Dataset:
    if depth not in cache:
        if depth not in datasets:
            raise RunError(f"no dataset for depth {depth:g} in the sweep")
        cache[depth] = Dataset.open(datasets[depth], verify="none")  # the sweep verified it
    return cache[depth]


def score_result(run_dir: Path, datasets: Mapping[float, str], *, label: str = dn.LABEL_DEFAULT,
                 batch_key: str | None = None, force: bool = False,
                 cache: dict[float, Dataset] | None = None) -> dict[str, Any] | None:
    """Score one run of a sweep and add the fields to its result.json (rewritten atomically);
    returns the new result, or None when the run is not finished ok or is already scored."""
    path = run_dir / "result.json"
    try:
        result = read_json(path) if path.is_file() else {}
    except (OSError, ValueError):  # a damaged result.json is the sweep's to report, not this step's
        return None
    if result.get("status") != "ok":  # a diverged run has no usable best checkpoint to probe
        return None
    if "downstream_label" in result and not force:
        return None
    depth = float(result.get("depth") or 1.0)
    try:
        ds = _open(datasets, depth, cache if cache is not None else {})
        fields = score_run(run_dir, ds, label=label, batch_key=batch_key)
    except CellscaleError as err:
        fields = _empty(f"scoring failed: {err}", label=label)
    result = {**result, **fields}
    atomic_write_json(path, result)
    return result


def score_sweep(sweep_dir: str | os.PathLike, datasets: Mapping[float, str] | None = None, *,
                run_ids: list[str] | None = None, label: str = dn.LABEL_DEFAULT, batch_key: str | None = None,
                force: bool = False) -> list[str]:
    """Score every finished ok run of a sweep not yet scored (all with ``force``) and the reference
    embeddings of each of its datasets; returns the ids of the runs scored now."""
    sweep_dir = Path(sweep_dir)
    datasets = dict(datasets) if datasets is not None else sweep_datasets(sweep_dir)
    cache: dict[float, Dataset] = {}
    runs = sweep_dir / RUNS_DIR
    ids = run_ids if run_ids is not None else sorted(p.name for p in runs.glob("*") if p.is_dir())
    done = [rid for rid in ids
            if score_result(runs / rid, datasets, label=label, batch_key=batch_key, force=force, cache=cache)]
    _update_references(sweep_dir, datasets, label=label, batch_key=batch_key, force=force, cache=cache)
    return done


def rewrite_results(sweep_dir: str | os.PathLike) -> Path:
    """results.csv again, its rows in the order they had (the plan's), new scores included."""
    import pandas as pd

    from cellscale.sweep.results import write_results

    csv = Path(sweep_dir) / "results.csv"
    try:
        ids = [str(r) for r in pd.read_csv(csv)["run_id"]] if csv.is_file() else None
    except (ValueError, KeyError, pd.errors.ParserError):
        ids = None  # an unreadable table is rebuilt from the run dirs, in name order
    return write_results(Path(sweep_dir), ids)
