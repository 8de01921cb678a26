"""The end of a run: the best checkpoint scored on the full validation and test splits, the
per-gene file, and the result record (``cellscale.schema.RunRecord``: its fields are the table's columns)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from cellscale.model import attention_impl, count_params, flops_per_cell, non_embedding_params
from cellscale.rules import objectives
from cellscale.runtime.checkpoint import crashpoint, load_weights
from cellscale.runtime.io import atomic_write_json
from cellscale.runtime.tblog import write_events
from cellscale.schema import RUN_CELLS, RunRecord
from cellscale.train.budget import end_step, verdict
from cellscale.train.evaluate import EvalResult, evaluate, per_gene_summary, write_cell_sums
from cellscale.train.loop import Clock
from cellscale.train.settings import compute_dtype
from cellscale.train.setup import LoopState, Run


@dataclass(frozen=True)
class FinalScores:
    """The chosen checkpoint's numbers; all None when no evaluation ever ran or was finite."""

    best_val: float | None = None  # the objective's own validation loss
    best_val_mse: float | None = None
    test_mse: float | None = None
    test_loss: float | None = None
    per_gene: dict[str, float | None] | None = None
    clamp_share: float | None = None  # of the test split's masked positions (objectives.at_clamp)


def _per_gene_doc(run: Run, test: EvalResult, per_gene_mse: list[float | None]) -> dict[str, Any]:
    doc = {"split": "test", "genes": [str(g) for g in run.ds.genes], "test_mse": per_gene_mse,
           "n_masked": [int(c) for c in test.n_g]}
    objective = run.model_cfg.objective
    if objective != "mse":
        doc["test_bits"] = [
            objectives.to_report_units(objective, float(v) / int(c)) if c > 0 else None
            for v, c in zip(test.nats_g, test.n_g)]
    return doc


def final_scores(run: Run, state: LoopState) -> FinalScores:
    best_val = state.best_val if math.isfinite(state.best_val) else None
    run.dist.barrier()  # rank 0 has written best.safetensors
    if best_val is None or not run.best_path.is_file():
        return FinalScores(best_val=best_val, best_val_mse=best_val if run.model_cfg.objective == "mse" else None)
    load_weights(run.model, run.best_path)
    run.model.to(run.device)
    # the full validation split scores the chosen checkpoint even when evals were capped
    val = evaluate(run.model, run.ds, "val", per_cell=True, **run.eval_kw())
    test = evaluate(run.model, run.ds, "test", per_gene=True, per_cell=True, **run.eval_kw())
    per_gene_mse, per_gene_stats = per_gene_summary(test.sse_g, test.n_g)
    if run.dist.is_main:  # written before result.json: a kill in between redoes them all
        atomic_write_json(run.out / "per_gene.json", _per_gene_doc(run, test, per_gene_mse))
        write_cell_sums(run.out / RUN_CELLS, val, test)
    return FinalScores(best_val=val.loss, best_val_mse=val.mse, test_mse=test.mse, test_loss=test.loss,
                       per_gene=per_gene_stats, clamp_share=test.clamp_share)


def choice_cells(run: Run) -> int:
    """How many validation cells the run's choices (its best checkpoint, or its stop) were made on."""
    n_val = int(run.ds.splits["val"].size)
    if run.cfg.budget == "plateau" or run.cfg.max_eval_cells is None:
        return n_val
    return min(n_val, int(run.cfg.max_eval_cells))


def result_record(run: Run, state: LoopState, scores: FinalScores, *, clock: Clock,
                  t_start: float) -> RunRecord:
    """result.json, validated: the schema's fields first, then the run's own details (its extra keys)."""
    cfg, mcfg = run.cfg, run.model_cfg
    status = "ok" if state.status == "running" else state.status
    baselines = run.ds.manifest.get("baselines", {}).get("gene_mean", {})
    cells = state.step * cfg.batch_size
    converged, gain, gain_se = verdict(run, state)
    per_gene = scores.per_gene or {"per_gene_mse_spread": None, "entropy_bits_per_gene": None}
    return RunRecord.model_validate({
        "run_id": run.run_id,
        "size": mcfg.name,
        "params": count_params(mcfg),
        "non_embedding_params": non_embedding_params(mcfg),
        "d_model": mcfg.d_model,
        "n_layers": mcfg.n_layers,
        "n_heads": mcfg.n_heads,
        "n_genes": mcfg.n_genes,
        "objective": mcfg.objective,
        "train_cells": run.n_train,
        "depth": float(run.ds.manifest.get("depth_fraction", 1.0)),
        "seed": run.seed,
        "steps": state.step,
        "cells_seen": cells,
        "tokens_seen": cells * mcfg.n_genes,
        "flops": flops_per_cell(mcfg, mask_prob=cfg.mask_prob)["train"] * cells,
        # the cooldown branches' own training, beyond the schedule that made the run's end point
        "branch_flops": flops_per_cell(mcfg, mask_prob=cfg.mask_prob)["train"] * state.branch_cells,
        "lr": run.peak_lr,
        "lr_scale": cfg.lr_scale,
        "best_step": state.best_step if scores.best_val is not None else None,
        # the validation cells the run's choices were made on: the branches score all of them; the best
        # checkpoint of a fixed budget is chosen on the fixed stratified subset of max_eval_cells
        "choice_cells": choice_cells(run),
        "best_val_mse": scores.best_val_mse,
        "test_mse": scores.test_mse,
        # the objective's own numbers: = the MSEs for mse, bits per masked gene for likelihoods
        "best_val_loss": scores.best_val,
        "test_loss": scores.test_loss,
        "clamp_share": scores.clamp_share,
        "gene_mean_val_mse": baselines.get("val"),
        "gene_mean_test_mse": baselines.get("test"),
        "wall_seconds": clock.elapsed(),
        "status": status,
        "error": f"non-finite loss at step {state.diverged_at}" if status == "diverged" else None,
        "budget": cfg.budget,
        "converged": converged,
        "plateau_gain": gain,
        "plateau_gain_se": gain_se,
        "dropout": mcfg.dropout,
        "attention_dropout": mcfg.attn_dropout,
        "attention_impl": attention_impl(mcfg, run.device, dtype=compute_dtype(run.device, cfg.precision)),
        "loss_unit": objectives.loss_unit(mcfg.objective),
        "masked_tokens_seen": state.masked_tokens,
        "plateau_tol": cfg.plateau_tol,
        "ema_decay": cfg.ema_decay,
        "decay_start": state.decay_start,
        "n_branches": len(state.branches),
        "diverged_at": state.diverged_at,
        **per_gene,
        "entropy_bits_per_gene_weighting": "masked-count",
        "batch_size": cfg.batch_size,
        "schedule": "wsd" if cfg.budget == "plateau" else cfg.schedule,
        "device": str(run.device),
        "world_size": run.dist.world_size,
        "resumed_at": state.resumes,
        "num_threads": torch.get_num_threads(),
        "total_wall_seconds": time.perf_counter() - t_start,
    })


def finalise(run: Run, state: LoopState, *, clock: Clock, t_start: float) -> dict[str, Any]:
    """Score the best checkpoint and write result.json (rank 0), or leave an unfinished run
    resumable (``stop_after_steps``)."""
    if state.status == "running" and state.step < end_step(run, state):
        return {"status": "incomplete", "step": state.step}
    scores = final_scores(run, state)
    # the fields a run sets, as a dict as a resumed call reads result.json back: the downstream
    # scores are the sweep's to add (cellscale.sweep.scoring), absent until then
    result = result_record(run, state, scores, clock=clock, t_start=t_start).model_dump(exclude_unset=True)
    if run.dist.is_main:
        write_events(run.out)  # the TensorBoard view of metrics.jsonl; one line and no files without the extra
        crashpoint("before-result")
        atomic_write_json(run.out / "result.json", result)
    run.dist.barrier()
    return result
