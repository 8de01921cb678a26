"""The run record: the fields of ``result.json`` and the columns of ``results.csv``.

Torch-free, so that the sweep's table writer and the report read the schema without importing
the trainer. One fact, one place: a new result field is added to ``RunRecord`` here (a branch
field to ``BranchRecord``); results.csv, result.json and the report follow, since the column
lists below are read off the models' fields and types.
"""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict


class _Trained(BaseModel):
    """What training records of a run (``cellscale.train.result.result_record``): the columns,
    then the run's own details (``plateau_tol``, ``batch_size``, ...) as extra keys, kept as given.
    Checked in pydantic's lax mode, which keeps an int an int and a bool a bool (only an int given for
    a float field is written as a float); a value of the wrong kind (text for a number) raises."""

    model_config = ConfigDict(extra="allow")

    run_id: str
    size: str
    params: int | None = None
    non_embedding_params: int | None = None
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_genes: int | None = None
    objective: str | None = None
    train_cells: int | None = None
    depth: float | None = None
    seed: int
    steps: int | None = None
    cells_seen: int | None = None
    tokens_seen: int | None = None
    flops: float | None = None
    branch_flops: float | None = None
    lr: float | None = None
    lr_scale: float | None = None
    best_step: int | None = None
    # how many validation cells the run's choices were made on (train/result.py, choice_cells)
    choice_cells: int | None = None
    best_val_mse: float | None = None
    test_mse: float | None = None
    best_val_loss: float | None = None
    test_loss: float | None = None
    # the share of the test split's masked positions whose predicted variance (dispersion) sits on
    # the head's clamp (cellscale.rules.lossbounds): the bits there are the clamp's; empty for mse
    clamp_share: float | None = None
    gene_mean_val_mse: float | None = None
    gene_mean_test_mse: float | None = None
    wall_seconds: float | None = None
    status: str
    error: str | None = None
    budget: str | None = None
    # was the run converged (cellscale.rules.plateau, on its cooled-down branches), the gain behind the verdict
    # and its standard error over the validation cells (with the gain: did the last doubling make it worse?)
    converged: bool | None = None
    plateau_gain: float | None = None
    plateau_gain_se: float | None = None
    dropout: float | None = None
    attention_dropout: float | None = None
    attention_impl: str | None = None


class RunRecord(_Trained):
    """One run's result: its fields, in order, are the columns of results.csv. The downstream step
    (cellscale.downstream, a sweep step) adds the best checkpoint's cell embedding's scores: probe
    and kNN macro-F1, batch mixing, on the validation and test cells; the label and batch key they
    used, or why they are missing."""

    probe_val_f1: float | None = None
    probe_val_accuracy: float | None = None
    knn_val_f1: float | None = None
    batch_mixing_val: float | None = None
    probe_test_f1: float | None = None
    probe_test_accuracy: float | None = None
    knn_test_f1: float | None = None
    batch_mixing_test: float | None = None
    downstream_label: str | None = None
    downstream_batch_key: str | None = None
    downstream_note: str | None = None


class BranchRecord(BaseModel):
    """One cooldown branch of a plateau-budget run (cellscale.train.branches): RUN_DIR/branches.json
    has its run's rows, SWEEP_DIR/branches.csv every run's, its fields the columns in order."""

    # a row is exactly the columns: a key added in train/branches.py and not here fails there
    model_config = ConfigDict(extra="forbid")

    # the run's identity
    run_id: str
    size: str
    params: int | None = None
    seed: int
    lr: float | None = None
    lr_scale: float | None = None
    train_cells: int | None = None
    depth: float | None = None
    objective: str | None = None
    loss_unit: str | None = None
    # the point: the step its cooldown ended at and the one it left the stable phase at, the cells
    # seen at its end (the data axis), the training FLOPs of a run scheduled to end there
    step: int | None = None
    stable_step: int | None = None
    cells_seen: int | None = None
    stable_cells: int | None = None
    flops: float | None = None
    # the cooled-down weights' validation and test scores (loss in the objective's unit, and MSE)
    val_loss: float | None = None
    val_mse: float | None = None
    test_loss: float | None = None
    test_mse: float | None = None
    # the cooldown's mean train loss, the gain over the branch at half its cells and that gain's
    # standard error over the validation cells (cellscale.rules.plateau)
    cooldown_train_loss: float | None = None
    gain: float | None = None
    gain_se: float | None = None
    # whether the run counts as converged there, its status and seconds
    converged: bool | None = None
    status: str
    wall: float | None = None


def fields_of(model: type[BaseModel], *kinds: type) -> tuple[str, ...]:
    """The fields of ``model``, in order, whose type (None aside) is one of ``kinds``."""
    def kind(annotation: Any) -> Any:
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return tuple(n for n, f in model.model_fields.items() if kind(f.annotation) in kinds)


RESULT_FIELDS = tuple(RunRecord.model_fields)
DOWNSTREAM_FIELDS = tuple(c for c in RESULT_FIELDS if c not in _Trained.model_fields)
# the text columns; every other field is a number (or missing; converged a bool, read as a number)
TEXT_FIELDS = fields_of(RunRecord, str)
NUMERIC_FIELDS = tuple(c for c in RESULT_FIELDS if c not in TEXT_FIELDS)
BRANCH_FIELDS = tuple(BranchRecord.model_fields)
BRANCH_TEXT_FIELDS = fields_of(BranchRecord, str)
RUNS_DIR = "runs"  # SWEEP_DIR/runs/<run_id>/: one folder per run
BRANCH_TABLE = "branches.json"  # RUN_DIR/branches.json: {"branches": [row, ...]}
BRANCH_CELLS_DIR = "branches"  # RUN_DIR/branches/<cells seen>.npz: a branch's per-cell error sums
RUN_REGISTRY = "registry.json"  # RUN_DIR/registry.json: the genes and preprocessing a run's model needs (Dataset.registry)
RUN_CELLS = "cells.npz"  # RUN_DIR/cells.npz: the run's own weights' per-cell error sums (val and test)
# a run with one of these statuses is never trained again
FINISHED = ("ok", "diverged")


def failed_record(*, run_id: str, size: str, seed: int, train_cells: int | None, depth: float,
                  error: str, **extra: Any) -> dict[str, Any]:
    """The result.json of a run that raised: enough to name it in results.csv, and its error."""
    return {"run_id": run_id, "size": size, "seed": seed, "train_cells": train_cells,
            "depth": depth, "status": "failed", "error": error, **extra}


def sweep_datasets(meta: dict[str, Any]) -> dict[float, str]:
    """{depth: dataset dir} that a sweep's ``sweep.json`` names: ``dataset`` at full depth (1.0)
    and ``depth_datasets`` ({depth label: dir}) for the thinned ones."""
    out = {1.0: str(meta["dataset"])} if meta.get("dataset") else {}
    out.update({float(k): str(v) for k, v in (meta.get("depth_datasets") or {}).items()})
    return out
