"""The run record (``cellscale.schema.RunRecord``, ``BranchRecord``) is the one list of result fields:
the column tuples are read off it, the trainer writes it, the report types its columns from it."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

import cellscale.schema as schema
from cellscale.config import TrainConfig
from cellscale.data.store import Dataset
from cellscale.model.ladder import get_size
from cellscale.report.load import load_sweep
from cellscale.schema import (
    BRANCH_FIELDS,
    BRANCH_TEXT_FIELDS,
    DOWNSTREAM_FIELDS,
    NUMERIC_FIELDS,
    RESULT_FIELDS,
    TEXT_FIELDS,
    BranchRecord,
    RunRecord,
    fields_of,
)
from cellscale.train import train_run

# the tuples as they were written by hand before RunRecord: a reorder, a lost or a retyped field fails here
# (a new field is added to these too, on purpose: results.csv's columns are a format)
OLD_DOWNSTREAM = (
    "probe_val_f1", "probe_val_accuracy", "knn_val_f1", "batch_mixing_val",
    "probe_test_f1", "probe_test_accuracy", "knn_test_f1", "batch_mixing_test",
    "downstream_label", "downstream_batch_key", "downstream_note",
)
OLD_RESULT = (
    "run_id", "size", "params", "non_embedding_params", "d_model", "n_layers", "n_heads",
    "n_genes", "objective", "train_cells", "depth", "seed", "steps", "cells_seen", "tokens_seen",
    "flops", "branch_flops", "lr", "lr_scale", "best_step",
    "choice_cells", "best_val_mse", "test_mse", "best_val_loss", "test_loss",
    "clamp_share",
    "gene_mean_val_mse", "gene_mean_test_mse", "wall_seconds", "status", "error",
    "budget", "converged", "plateau_gain", "plateau_gain_se", "dropout", "attention_dropout", "attention_impl",
    *OLD_DOWNSTREAM,
)
OLD_TEXT = ("run_id", "size", "objective", "status", "error", "budget", "attention_impl",
            "downstream_label", "downstream_batch_key", "downstream_note")
OLD_NUMERIC = tuple(c for c in OLD_RESULT if c not in OLD_TEXT)
OLD_BRANCH = (
    "run_id", "size", "params", "seed", "lr", "lr_scale", "train_cells", "depth", "objective", "loss_unit",
    "step", "stable_step", "cells_seen", "stable_cells", "flops", "val_loss", "val_mse", "test_loss", "test_mse",
    "cooldown_train_loss", "gain", "gain_se", "converged", "status", "wall",
)
OLD_BRANCH_TEXT = ("run_id", "size", "objective", "loss_unit", "status")


def test_the_derived_tuples_are_the_old_ones():
    assert RESULT_FIELDS == OLD_RESULT
    assert DOWNSTREAM_FIELDS == OLD_DOWNSTREAM
    assert TEXT_FIELDS == OLD_TEXT
    assert NUMERIC_FIELDS == OLD_NUMERIC
    assert BRANCH_FIELDS == OLD_BRANCH
    assert BRANCH_TEXT_FIELDS == OLD_BRANCH_TEXT
    assert tuple(RunRecord.model_fields) == RESULT_FIELDS and tuple(BranchRecord.model_fields) == BRANCH_FIELDS


def _schema_with(monkeypatch, after: str, line: str) -> types.ModuleType:
    """cellscale.schema as it would be with ``line`` added to its source after the line ``after``:
    the one edit a new field takes."""
    source = Path(schema.__file__).read_text(encoding="utf-8")
    assert source.count(after + "\n") == 1, after
    edited = source.replace(after + "\n", f"{after}\n{line}\n")
    module = types.ModuleType("cellscale_schema_edited")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # pydantic resolves the annotations there
    exec(compile(edited, schema.__file__, "exec"), module.__dict__)
    return module


def test_a_field_added_to_the_record_is_a_column_of_its_kind(monkeypatch):
    text = _schema_with(monkeypatch, "    downstream_note: str | None = None", "    downstream_model: str | None = None")
    assert text.RESULT_FIELDS == (*OLD_RESULT, "downstream_model")
    assert text.TEXT_FIELDS == (*OLD_TEXT, "downstream_model") and text.NUMERIC_FIELDS == OLD_NUMERIC
    assert text.DOWNSTREAM_FIELDS == (*OLD_DOWNSTREAM, "downstream_model")
    # a training field lands before the downstream ones, a number
    number = _schema_with(monkeypatch, "    attention_impl: str | None = None", "    grad_norm: float | None = None")
    at = OLD_RESULT.index("attention_impl") + 1
    assert number.RESULT_FIELDS == (*OLD_RESULT[:at], "grad_norm", *OLD_RESULT[at:])
    assert "grad_norm" in number.NUMERIC_FIELDS and number.TEXT_FIELDS == OLD_TEXT
    assert number.DOWNSTREAM_FIELDS == OLD_DOWNSTREAM
    branch = _schema_with(monkeypatch, "    wall: float | None = None", "    note: str | None = None")
    assert branch.BRANCH_FIELDS == (*OLD_BRANCH, "note") and branch.BRANCH_TEXT_FIELDS == (*OLD_BRANCH_TEXT, "note")


def test_fields_of_reads_the_type_without_none():
    assert fields_of(BranchRecord, bool) == ("converged",)
    assert fields_of(RunRecord, bool) == ("converged",)
    assert set(fields_of(RunRecord, int, float, bool)) == set(NUMERIC_FIELDS)


def test_the_record_keeps_types_and_refuses_wrong_ones():
    rec = RunRecord(run_id="r", size="XS", seed=0, status="ok", params=53, converged=False, lr=0.01,
                    batch_size=32, resumed_at=[])
    dumped = rec.model_dump(exclude_unset=True)
    assert dumped == {"run_id": "r", "size": "XS", "params": 53, "seed": 0, "lr": 0.01, "status": "ok",
                      "converged": False, "batch_size": 32, "resumed_at": []}
    assert type(dumped["params"]) is int and dumped["converged"] is False
    assert list(dumped)[-2:] == ["batch_size", "resumed_at"]  # the run's own details after the fields
    with pytest.raises(ValidationError, match="params"):
        RunRecord(run_id="r", size="XS", seed=0, status="ok", params="many")
    with pytest.raises(ValidationError, match="status"):
        RunRecord(run_id="r", size="XS", seed=0)
    with pytest.raises(ValidationError, match="extra"):  # a branch row has exactly the columns
        BranchRecord(run_id="r", size="XS", seed=0, status="ok", bogus=1)


B = 32
PLATEAU = TrainConfig(cells_seen=B * 80, batch_size=B, eval_every=10, eval_batch_size=64, num_threads=1,
                      budget="plateau", warmup_cells=B * 8, cooldown_frac=0.25, plateau_min_cells=10**9,
                      branch_min_cells=B * 20, device="cpu")


def test_a_trained_run_writes_its_record(tiny_dataset_dir: Path, tmp_path: Path):
    ds = Dataset.open(tiny_dataset_dir)
    result = train_run(ds, get_size("TINY", n_genes=ds.n_genes), PLATEAU, out=tmp_path / "run", seed=1)
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result == saved and list(result) == list(saved)
    trained = [c for c in RESULT_FIELDS if c not in DOWNSTREAM_FIELDS]
    assert list(saved)[:len(trained)] == trained  # every training field, in order, then the run's details
    assert not set(DOWNSTREAM_FIELDS) & set(saved)  # the sweep's downstream step adds those
    assert {"loss_unit", "masked_tokens_seen", "plateau_tol", "batch_size", "total_wall_seconds"} <= set(saved)
    assert saved["converged"] is False and type(saved["params"]) is int and type(saved["flops"]) is float
    # the record reads back to the same JSON: nothing coerced on the way
    back = RunRecord.model_validate(saved).model_dump(exclude_unset=True)
    assert back == saved and list(back) == list(saved)
    assert all(type(back[k]) is type(saved[k]) for k in saved)
    rows = json.loads((tmp_path / "run" / "branches.json").read_text())["branches"]
    assert len(rows) >= 2 and all(list(r) == list(BRANCH_FIELDS) for r in rows)
    assert all(BranchRecord.model_validate(r).model_dump() == r and type(r["converged"]) is bool for r in rows)


def _write_csv(sweep: Path, name: str, rows: list[dict], columns: tuple[str, ...]) -> None:
    sweep.mkdir(exist_ok=True)
    pd.DataFrame(rows, columns=list(columns)).to_csv(sweep / name, index=False)


def test_the_report_types_the_columns_from_the_schema(tmp_path: Path):
    sweep = tmp_path / "sweep"
    base = {"run_id": "007", "size": "XS", "seed": 0, "status": " OK ", "objective": "mse", "budget": "plateau",
            "converged": True, "attention_impl": "sdpa", "downstream_note": "no labels", "depth": 1.0}
    _write_csv(sweep, "results.csv", [{**base, "params": 53, "best_val_mse": 1.5},
                                      {**base, "run_id": "r2", "params": "lots", "best_val_mse": "n/a",
                                       "converged": None, "status": None}], RESULT_FIELDS)
    branch = {"run_id": "r1", "size": "XS", "seed": 0, "objective": "mse", "loss_unit": "mse", "status": "ok",
              "step": 10, "cells_seen": 320, "converged": False}
    _write_csv(sweep, "branches.csv", [{**branch, "val_loss": 1.2}, {**branch, "val_loss": "oops", "converged": True}],
               BRANCH_FIELDS)
    data = load_sweep(sweep)
    runs = data.runs
    assert list(runs.columns) == list(RESULT_FIELDS)
    for c in NUMERIC_FIELDS:  # every number column numeric; text in one is missing
        assert pd.api.types.is_numeric_dtype(runs[c]) or runs[c].isna().all(), c
    assert runs["params"].iloc[0] == 53 and pd.isna(runs["params"].iloc[1]) and pd.isna(runs["best_val_mse"].iloc[1])
    assert list(runs["converged"].iloc[:1]) == [1.0] and pd.isna(runs["converged"].iloc[1])
    assert list(runs["run_id"]) == ["007", "r2"]  # text, as written
    assert list(runs["status"]) == ["ok", "unknown"] and list(runs["error"]) == ["", ""]
    assert list(runs["objective"]) == ["mse", "mse"] and list(runs["attention_impl"]) == ["sdpa", "sdpa"]
    assert list(runs["downstream_note"]) == ["no labels", "no labels"] and list(runs["budget"]) == ["plateau"] * 2
    br = data.branches
    assert br is not None and list(br.columns) == list(BRANCH_FIELDS)
    assert br["val_loss"].iloc[0] == 1.2 and pd.isna(br["val_loss"].iloc[1])
    assert list(br["converged"]) == [False, True] and br["converged"].dtype == bool  # kept as read
    assert list(br["loss_unit"]) == ["mse", "mse"] and list(br["run_id"]) == ["r1", "r1"]
