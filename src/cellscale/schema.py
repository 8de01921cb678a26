"""The run record: the fields of ``result.json`` and the columns of ``results.csv``.

Torch-free, so that the sweep's table writer and the report read the schema without importing
the trainer. One fact, one place: a new result field is added here and nowhere else.
"""

from __future__ import annotations

from typing import Any

# the downstream scores of a run (cellscale.downstream): probe and kNN macro-F1, batch mixing,
# on the validation and test cells; the label and batch key they used, or why they are missing
DOWNSTREAM_FIELDS = (
    "probe_val_f1", "probe_val_accuracy", "knn_val_f1", "batch_mixing_val",
    "probe_test_f1", "probe_test_accuracy", "knn_test_f1", "batch_mixing_test",
    "downstream_label", "downstream_batch_key", "downstream_note",
)
RESULT_FIELDS = (
    "run_id", "size", "params", "non_embedding_params", "d_model", "n_layers", "n_heads",
    "n_genes", "objective", "train_cells", "depth", "seed", "steps", "cells_seen", "tokens_seen",
    "flops", "branch_flops", "lr", "lr_scale", "best_step",
    # how many validation cells the run's choices were made on (train/result.py, choice_cells)
    "choice_cells", "best_val_mse", "test_mse", "best_val_loss", "test_loss",
    # the share of the test split's masked positions whose predicted variance (dispersion) sits on
    # the head's clamp (cellscale.rules.lossbounds): the bits there are the clamp's; empty for mse
    "clamp_share",
    "gene_mean_val_mse", "gene_mean_test_mse", "wall_seconds", "status", "error",
    # was the run converged (cellscale.rules.plateau, on its cooled-down branches), and the gain behind the verdict
    "budget", "converged", "plateau_gain", "dropout", "attention_dropout", "attention_impl",
    # the best checkpoint's cell embedding scored downstream (cellscale.downstream; a sweep step)
    *DOWNSTREAM_FIELDS,
)
# the text columns; every other field is a number (or missing)
TEXT_FIELDS = ("run_id", "size", "objective", "status", "error", "budget", "attention_impl",
               "downstream_label", "downstream_batch_key", "downstream_note")
NUMERIC_FIELDS = tuple(c for c in RESULT_FIELDS if c not in TEXT_FIELDS)
# one cooldown branch of a plateau-budget run (cellscale.train.branches): RUN_DIR/branches.json has
# its run's rows, SWEEP_DIR/branches.csv every run's. The run's identity, then the point: the step
# its cooldown ended at and the one it left the stable phase at, the cells seen at its end (the data
# axis), the training FLOPs of a run scheduled to end there, the cooled-down weights' validation and
# test scores (loss in the objective's unit, and MSE), the cooldown's mean train loss, the gain over
# the branch at half its cells and that gain's standard error over the validation cells
# (cellscale.rules.plateau), whether the run counts as converged there, its status and seconds
BRANCH_FIELDS = (
    "run_id", "size", "params", "seed", "lr", "lr_scale", "train_cells", "depth", "objective", "loss_unit",
    "step", "stable_step", "cells_seen", "stable_cells", "flops", "val_loss", "val_mse", "test_loss", "test_mse",
    "cooldown_train_loss", "gain", "gain_se", "converged", "status", "wall",
)
BRANCH_TEXT_FIELDS = ("run_id", "size", "objective", "loss_unit", "status")
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
