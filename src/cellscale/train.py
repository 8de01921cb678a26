"""One training run: one model size on one training subset, resumable, with a result.json.

The loop is deliberately short. Batches are a pure function of (seed, step) (see
``data.loader``), the optimiser, schedule and torch RNG state are checkpointed, so a run killed
at any moment and started again with the same call ends with the same numbers.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellscale import __version__
from cellscale import objectives
from cellscale.checkpoint import (
    clean_stale,
    crashpoint,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    rng_key,
    save_checkpoint,
    save_weights,
)
from cellscale.config import ModelConfig, TrainConfig, config_hash
from cellscale.data.loader import CountsView, TrainBatches, eval_batches
from cellscale.data.store import Dataset
from cellscale.distributed import DistContext, from_env, shard_device
from cellscale.errors import RunError
from cellscale.io import atomic_write_json, atomic_write_with, read_json, to_json
from cellscale.model import (
    CellTransformer,
    count_params,
    flops_per_cell,
    non_embedding_params,
)

RESULT_FIELDS = (
    "run_id", "size", "params", "non_embedding_params", "d_model", "n_layers", "n_heads",
    "n_genes", "objective", "train_cells", "depth", "seed", "steps", "cells_seen", "tokens_seen",
    "flops", "lr", "best_step", "best_val_mse", "test_mse", "best_val_loss", "test_loss",
    "gene_mean_val_mse", "gene_mean_test_mse", "wall_seconds", "status", "error",
)
FINISHED = ("ok", "diverged")


# ----------------------------------------------------------------------------- settings


# below this many FLOPs per step a CPU step runs on one thread (thread start-up and barriers
# cost more than they save). Measured with the fused kernels, batch 32, V = 64, 1 vs 2 threads:
# 4.4e7 (TINY) 6.8 vs 6.9 ms, 4.0e8 (SMALL) 21.5 vs 17.9 ms, 1.4e9 (XS) 58.4 vs 38.5 ms
SMALL_STEP_FLOPS = 1e8


def _flops_per_step(model_cfg: ModelConfig, train_cfg: TrainConfig) -> float:
    return flops_per_cell(model_cfg, mask_prob=train_cfg.mask_prob)["train"] * train_cfg.batch_size


def resolve_lr(model_cfg: ModelConfig, train_cfg: TrainConfig) -> float:
    """Peak learning rate. "auto" shrinks with width (wider models need smaller steps, the
    reason one rate for all sizes under-trained the study's large models) and grows with batch."""
    if train_cfg.lr == "auto":
        lr = train_cfg.lr_base * 64.0 / model_cfg.d_model
        lr = min(max(lr, train_cfg.lr_min), train_cfg.lr_max)
    else:
        lr = float(train_cfg.lr)
    ratio = train_cfg.batch_size / train_cfg.lr_batch_ref
    scale = {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[train_cfg.lr_batch_scaling]
    return lr * scale


def lr_at(step: int, *, total_steps: int, peak: float, cfg: TrainConfig) -> float:
    if cfg.schedule == "constant":
        return peak
    warmup = int(cfg.warmup_frac * total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    floor = cfg.final_lr_frac * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device 'cuda' requested but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str):
    # bf16 autocast keeps fp32 master weights; on CPU bf16 matmuls are slower here, so fp32
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    # decay matrices only: biases, LayerNorm gains and the mask vector are not shrunk to zero
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=1e-8)


# ----------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalResult:
    """Scores of one split under the fixed evaluation mask.

    ``loss``: the objective's number (the MSE for ``mse``; bits per masked gene for the
    likelihoods); ``mse``: the MSE of the point prediction (``objectives.point_prediction``) of
    the log1p values, comparable across objectives. With ``per_gene``: float64 per-gene sums of
    squared errors (``sse_g``) and of the loss in nats (``nats_g``; squared errors again for mse)
    and masked counts (``n_g``)."""

    loss: float
    mse: float
    sse_g: np.ndarray | None = None
    nats_g: np.ndarray | None = None
    n_g: np.ndarray | None = None


@torch.no_grad()
def evaluate(
    model: CellTransformer, ds: Dataset, split: str, *, cfg: TrainConfig, device: torch.device,
    autocast=nullcontext, max_cells: int | None = None, dist: DistContext | None = None,
    per_gene: bool = False,
) -> EvalResult:
    """Score every masked position of the split under the dataset's fixed evaluation mask.

    Under DDP (``dist`` active) rank ``r`` scores eval batches ``r, r+W, ...`` and the sums are
    all-reduced, so every rank returns the same numbers. With ``per_gene`` the split totals are
    the ratios of the per-gene sums, so the count-weighted mean of the per-gene errors equals
    them exactly."""
    was_training = model.training
    model.eval()
    objective = model.cfg.objective
    loss_sum, sq, n = 0.0, 0.0, 0
    n_genes = ds.n_genes
    # per-gene sums are accumulated on the host with bincount: a fixed summation order on any device
    sq_g = np.zeros(n_genes, dtype=np.float64)
    nats_g = np.zeros(n_genes, dtype=np.float64)
    n_g = np.zeros(n_genes, dtype=np.int64)
    world = dist.world_size if dist is not None and dist.active else 1
    rank = dist.rank if world > 1 else 0
    batches = eval_batches(ds, split, batch_size=cfg.eval_batch_size, max_cells=max_cells,
                           with_counts=objectives.needs_counts(objective))
    for i, item in enumerate(batches):
        if i % world != rank:
            continue
        values, mask, *extra = (t.to(device, non_blocking=True) for t in item)
        with autocast():
            out = model(values, mask)
        # the masked positions' targets (and counts, scales), gathered once for both numbers
        target = values[mask]
        kw = {}
        if extra:
            counts, log_scale = extra
            kw = {"counts": counts[mask], "log_scale": objectives.at_positions(log_scale, mask)}
        diff = objectives.point_prediction(objective, out, log_scale=kw.get("log_scale")) - target
        err = diff**2
        pos = err if objective == "mse" else objectives.position_loss(objective, out, target, **kw)
        if per_gene:
            # outputs are in mask.nonzero() order: column 1 of nonzero() is the gene of each entry
            genes = mask.nonzero()[:, 1].cpu().numpy()
            sq = np.bincount(genes, weights=(diff.double() ** 2).cpu().numpy(), minlength=n_genes)
            sq_g += sq
            nats_g += sq if objective == "mse" else np.bincount(
                genes, weights=pos.double().cpu().numpy(), minlength=n_genes)
            n_g += np.bincount(genes, minlength=n_genes)
            continue
        sq += float(err.sum())
        loss_sum += float(pos.sum())
        n += int(mask.sum())
    model.train(was_training)
    if per_gene:
        if world > 1:  # float64 sums; counts are exact in float64 (< 2^53)
            reduced = np.asarray(dist.all_reduce_sum(
                [*sq_g.tolist(), *nats_g.tolist(), *n_g.astype(np.float64).tolist()]))
            sq_g, nats_g = reduced[:n_genes], reduced[n_genes : 2 * n_genes]
            n_g = np.rint(reduced[2 * n_genes :]).astype(np.int64)
        total = max(int(n_g.sum()), 1)
        return EvalResult(
            loss=objectives.to_report_units(objective, float(nats_g.sum()) / total),
            mse=float(sq_g.sum()) / total, sse_g=sq_g, nats_g=nats_g, n_g=n_g)
    if world > 1:
        sq, loss_sum, n = dist.all_reduce_sum([sq, loss_sum, float(n)])
        n = int(round(n))
    return EvalResult(loss=objectives.to_report_units(objective, loss_sum / max(n, 1)),
                      mse=sq / max(n, 1))


def per_gene_summary(sse: np.ndarray, counts: np.ndarray) -> tuple[list[float | None], dict[str, float | None]]:
    """Per-gene MSE (None for a gene never masked) and the run-level numbers of result.json.

    ``entropy_bits_per_gene`` is the heteroscedastic Gaussian entropy WEIGHTED BY MASKED COUNTS:
    sum_g n_g 0.5 log2(2 pi e mse_g) / sum_g n_g, i.e. the mean over masked positions of the
    entropy of that position's gene. With the same weights the test MSE is the count-weighted
    mean of the mse_g, so by Jensen (log is concave) it is never above 0.5 log2(2 pi e test_mse).
    ``per_gene_mse_spread`` is the (unweighted, population) standard deviation of mse_g over the
    genes that were masked at least once."""
    seen = counts > 0
    mse = np.full(sse.shape, np.nan)
    mse[seen] = sse[seen] / counts[seen]
    values = [float(v) if s else None for v, s in zip(mse, seen)]
    out: dict[str, float | None] = {"per_gene_mse_spread": None, "entropy_bits_per_gene": None}
    if seen.any():
        out["per_gene_mse_spread"] = float(np.std(mse[seen]))
        m, w = mse[seen], counts[seen].astype(np.float64)
        if np.all(m > 0) and np.all(np.isfinite(m)):
            bits = 0.5 * np.log2(2 * np.pi * np.e * m)
            out["entropy_bits_per_gene"] = float(np.sum(w * bits) / np.sum(w))
    return values, out


class RankBatches(TrainBatches):
    """Rank ``rank``'s contiguous slice of each global batch of :class:`TrainBatches`.

    ``batch(step)`` returns ``(values[B/W, V], mask[B/W, V], n_masked_global)`` (with
    ``counts`` and ``log_scale`` before the count under ``with_counts``): the rows and mask are
    exactly the single-process batch's rows ``[rank*B/W, (rank+1)*B/W)``, and
    ``n_masked_global`` counts the masked positions of the whole global batch."""

    def __init__(self, ds: Dataset, *, world_size: int, rank: int, **kw: Any) -> None:
        super().__init__(ds, **kw)
        if self.batch_size % world_size:
            raise RunError(
                f"train batch_size {self.batch_size} is not divisible by the {world_size} "
                f"processes: use a batch size that is a multiple of {world_size}"
            )
        self.world_size, self.rank = int(world_size), int(rank)
        self.local_size = self.batch_size // self.world_size

    def batch(self, step: int) -> tuple[Any, ...]:  # type: ignore[override]
        rows = self.rows(step)
        mask = self.mask(step)
        lo, hi = self.rank * self.local_size, (self.rank + 1) * self.local_size
        values = np.asarray(self._values[rows[lo:hi]], dtype=np.float32)
        item: tuple[Any, ...] = (torch.from_numpy(values), torch.from_numpy(mask[lo:hi].copy()))
        if self._counts is not None:
            item += self._counts.rows(rows[lo:hi])
        return (*item, int(mask.sum()))


# ----------------------------------------------------------------------------- the run


def run_identity(
    model_cfg: ModelConfig, train_cfg: TrainConfig, *, dataset: Dataset, train_cells: int | None, seed: int
) -> dict[str, Any]:
    return {
        "model": model_cfg.model_dump(mode="json"),
        "train": train_cfg.model_dump(mode="json"),
        "dataset_checksum": dataset.manifest.get("checksums", {}).get("values.npy"),
        "train_cells": train_cells,
        "seed": seed,
    }


def _claim_run_dir(
    out: Path, identity: dict[str, Any], ident_hash: str, *, overwrite: bool = False
) -> dict[str, Any] | None:
    """Check ``out`` for this run: the finished result (returned), a resumable or new run
    (None, config.json written), or a RunError for a directory that holds something else
    (replaced instead when ``overwrite``)."""
    result_path = out / "result.json"
    config_path = out / "config.json"
    if overwrite and (out.exists() or out.is_symlink()):
        same = False
        if config_path.is_file():
            try:
                same = read_json(config_path).get("hash") == ident_hash
            except ValueError:
                same = False
        if not same:
            if out.is_dir() and not out.is_symlink():
                shutil.rmtree(out)
            else:
                out.unlink()
    if config_path.is_file():
        try:
            old = read_json(config_path)
        except ValueError:
            old = {}
        if old.get("hash") != ident_hash:
            raise RunError(
                f"{out} holds a run with other settings; choose another --out, or --overwrite"
            )
        if result_path.is_file():
            prev = read_json(result_path)
            if prev.get("status") in FINISHED:
                return prev
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"{out} is not empty and holds no cellscale run; choose another --out, or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config_path, {"hash": ident_hash, **identity, "cellscale_version": __version__})
    return None


def run_threads(model_cfg: ModelConfig, train_cfg: TrainConfig, device: torch.device) -> int | None:
    """torch's intra-op thread count for a run: ``train.num_threads``, else 1 for a CPU step
    under ``SMALL_STEP_FLOPS`` (thread start-up and synchronisation would dominate it), else
    None (the process's count)."""
    if train_cfg.num_threads:
        return int(train_cfg.num_threads)
    if device.type == "cpu" and _flops_per_step(model_cfg, train_cfg) < SMALL_STEP_FLOPS:
        return 1
    return None


@contextmanager
def torch_threads(n: int | None):
    """torch's intra-op thread count set to ``n`` (unchanged when None) for the block, and the
    caller's count restored after it: a run's choice is its own, so the next run in this process
    (a local sweep) does not inherit a small run's single thread."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def frozen_gc():
    """Python's cyclic collector leaves the objects alive at entry (model, data, libraries)
    alone until exit: its full passes over them were ~2% of an S training step on CPU. A
    caller that froze objects itself keeps control (nothing is done then)."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def train_run(
    dataset: str | Path | Dataset,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    out: str | Path,
    train_cells: int | None = None,
    seed: int = 0,
    run_id: str | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    stop_after_steps: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train one model and write ``out/result.json``; rerunning the same call resumes.

    ``overwrite`` replaces an ``out`` that holds something else or a run with other settings
    (a run with the same settings is still resumed or returned).

    ``on_step`` receives a small dict after every optimiser step (for progress bars);
    ``stop_after_steps`` ends the process's work early without finishing the run (tests).
    Launched by torchrun (``WORLD_SIZE`` > 1) the run is data parallel (``cellscale.distributed``).
    """
    t_start = time.perf_counter()
    ds = dataset if isinstance(dataset, Dataset) else Dataset.open(dataset)
    out = Path(out)
    model_cfg = model_cfg.model_copy(update={"n_genes": ds.n_genes})
    if objectives.needs_counts(model_cfg.objective):
        CountsView(ds)  # refuses a dataset without raw counts before anything is written
    n_train = len(ds.train_indices(train_cells))
    identity = run_identity(model_cfg, train_cfg, dataset=ds, train_cells=n_train, seed=seed)
    ident_hash = config_hash(identity)

    device = pick_device(train_cfg.device)
    dist = from_env(device)
    try:
        with torch_threads(run_threads(model_cfg, train_cfg, device)), frozen_gc():
            return _train(
                ds, model_cfg, train_cfg, out=out, train_cells=train_cells, seed=seed, run_id=run_id,
                on_step=on_step, stop_after_steps=stop_after_steps, identity=identity,
                ident_hash=ident_hash, n_train=n_train, device=shard_device(device, dist), dist=dist,
                t_start=t_start, overwrite=overwrite,
            )
    finally:
        dist.close()


def _train(
    ds: Dataset, model_cfg: ModelConfig, train_cfg: TrainConfig, *, out: Path,
    train_cells: int | None, seed: int, run_id: str | None,
    on_step: Callable[[dict[str, Any]], None] | None, stop_after_steps: int | None,
    identity: dict[str, Any], ident_hash: str, n_train: int, device: torch.device,
    dist: DistContext, t_start: float, overwrite: bool = False,
) -> dict[str, Any]:
    main = dist.is_main
    result_path = out / "result.json"
    # rank 0 alone inspects and claims the run dir; the others follow its verdict
    if dist.active:
        verdict: tuple[str, Any] = ("go", None)
        if main:
            try:
                prev = _claim_run_dir(out, identity, ident_hash, overwrite=overwrite)
                verdict = ("done", prev) if prev is not None else ("go", None)
            except RunError as err:
                verdict = ("error", str(err))
        verdict = dist.broadcast_object(verdict)
        if verdict[0] == "error":
            raise RunError(verdict[1])
        if verdict[0] == "done":
            return verdict[1]
    else:
        prev = _claim_run_dir(out, identity, ident_hash, overwrite=overwrite)
        if prev is not None:
            return prev

    autocast = autocast_for(device, train_cfg.precision)

    torch.manual_seed(seed)
    model = CellTransformer(model_cfg).to(device)
    if dist.rank > 0:
        # an independent dropout stream per rank; rank 0 keeps the single-process stream
        torch.manual_seed(int(np.random.SeedSequence([seed, dist.rank]).generate_state(1)[0]))
    peak_lr = resolve_lr(model_cfg, train_cfg)
    optimizer = make_optimizer(model, train_cfg, peak_lr)

    objective = model_cfg.objective
    with_counts = objectives.needs_counts(objective)
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
        )
        forward = torch.compile(ddp) if train_cfg.compile else ddp
        batches: TrainBatches = RankBatches(
            ds, world_size=dist.world_size, rank=dist.rank, train_cells=train_cells,
            batch_size=train_cfg.batch_size, seed=seed, mask_prob=train_cfg.mask_prob,
            with_counts=with_counts,
        )
    else:
        loss_fn = torch.compile(model.loss) if train_cfg.compile else model.loss
        batches = TrainBatches(
            ds, train_cells=train_cells, batch_size=train_cfg.batch_size, seed=seed,
            mask_prob=train_cfg.mask_prob, with_counts=with_counts,
        )
    total_steps = max(1, math.ceil(train_cfg.cells_seen / train_cfg.batch_size))
    eval_every = train_cfg.eval_every or max(1, total_steps // 10)
    ckpt_every = train_cfg.checkpoint_every or eval_every
    log_every = max(1, min(eval_every, total_steps // 50 or 1))

    ckpt_dir = out / "checkpoint"
    metrics_path = out / "metrics.jsonl"
    best_path = out / "best.safetensors"
    state = {"step": 0, "best_val": math.inf, "best_step": -1, "metric_lines": 0,
             "masked_tokens": 0, "wall": 0.0, "run_loss": 0.0, "run_n": 0, "status": "running", "diverged_at": None}
    found = find_checkpoint(ckpt_dir)
    if main:
        clean_stale(ckpt_dir)  # temp dirs of checkpoint writes a kill interrupted
    if found is not None:
        state = load_checkpoint(found, model=model, optimizer=optimizer, rank=dist.rank)
        state["resumes"] = [*state.get("resumes", []), int(state["step"])]
        if main:
            _truncate_lines(metrics_path, state["metric_lines"])
    elif main and metrics_path.exists():
        metrics_path.unlink()

    def log(record: dict[str, Any]) -> None:
        if main:
            with open(metrics_path, "a") as fh:
                fh.write(to_json(record, indent=None) + "\n")
        state["metric_lines"] += 1

    def checkpoint() -> None:
        state["wall"] = wall_before + (time.perf_counter() - t_loop)
        extra: dict[str, torch.Tensor] = {}
        if dist.active:  # every rank's RNG state, so that a resumed run draws the same dropout
            cuda = torch.cuda.get_rng_state() if device.type == "cuda" else None
            for r, (cpu_rng, cuda_rng) in enumerate(dist.all_gather_object((torch.get_rng_state(), cuda))):
                if r > 0:
                    extra[rng_key(r)] = cpu_rng
                    if cuda_rng is not None:
                        extra[rng_key(r, "cuda")] = cuda_rng
        if main:
            save_checkpoint(ckpt_dir, model=model, optimizer=optimizer, loop_state=state,
                            extra_tensors=extra)

    def train_loss(item: tuple) -> tuple[torch.Tensor, float, int]:
        """(loss to backpropagate, the global batch's mean loss, masked positions)."""
        if dist.active:
            *item, n_global = item
        values, mask, *extra = (t.to(device, non_blocking=True) for t in item)
        kw = dict(zip(("counts", "log_scale"), extra))
        if not dist.active:
            with autocast():
                loss = loss_fn(values, mask, **kw)
            return loss, float(loss.detach()), int(mask.sum())
        with autocast():
            out = forward(values, mask)
        total_loss = objectives.masked_position_loss(objective, out, values, mask, **kw).sum()
        # DDP averages gradients over W ranks: W * (local sum) / (global count) makes the
        # average the gradient of the global batch's mean loss
        loss = total_loss * (dist.world_size / n_global)
        (total,) = dist.all_reduce_sum([float(total_loss.detach())])
        return loss, total / n_global, n_global

    wall_before = float(state["wall"])
    t_loop = time.perf_counter()
    model.train()
    step = int(state["step"])
    steps_this_call = 0
    eval_kw = {"cfg": train_cfg, "device": device, "autocast": autocast, "dist": dist}
    for item in batches.iterate(step, total_steps - step, pin_memory=device.type == "cuda"):
        if stop_after_steps is not None and steps_this_call >= stop_after_steps:
            break
        lr = lr_at(step, total_steps=total_steps, peak=peak_lr, cfg=train_cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, loss_value, n_masked = train_loss(item)
        if not math.isfinite(loss_value):
            state["status"], state["diverged_at"] = "diverged", step
            log({"kind": "diverged", "step": step, "loss": None})
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        step += 1
        steps_this_call += 1
        state["step"] = step
        state["masked_tokens"] += n_masked
        state["run_loss"] += loss_value
        state["run_n"] += 1
        if step % log_every == 0 or step == total_steps:
            log({"kind": "train", "step": step, "cells_seen": step * train_cfg.batch_size,
                 "lr": lr, "loss": objectives.to_report_units(objective, state["run_loss"] / state["run_n"]),
                 "wall": _elapsed(wall_before, t_loop)})
            state["run_loss"], state["run_n"] = 0.0, 0
        if step % eval_every == 0 or step == total_steps:
            scores = evaluate(model, ds, "val", max_cells=train_cfg.max_eval_cells, **eval_kw)
            val = scores.loss  # checkpoints are chosen by the objective's own loss
            record = {"kind": "eval", "step": step, "cells_seen": step * train_cfg.batch_size,
                      "val_mse": scores.mse}
            if objective != "mse":
                record["val_bits"] = val
            log({**record, "wall": _elapsed(wall_before, t_loop)})
            if val < state["best_val"]:
                state["best_val"], state["best_step"] = val, step
                if main:
                    atomic_write_with(best_path, lambda p: save_weights(model, p))
            if not math.isfinite(val):
                state["status"], state["diverged_at"] = "diverged", step
                break
        if step % ckpt_every == 0 or step == total_steps:
            checkpoint()
        if on_step is not None:
            on_step({"step": step, "total": total_steps, "loss": loss_value, "lr": lr,
                     "batch_size": train_cfg.batch_size})

    if state["status"] == "running" and step < total_steps:
        return {"status": "incomplete", "step": step}  # stop_after_steps: leave it resumable

    status = "ok" if state["status"] == "running" else state["status"]
    best_val_mse = test_mse = test_loss = None
    per_gene_stats: dict[str, float | None] = {"per_gene_mse_spread": None, "entropy_bits_per_gene": None}
    best_val = state["best_val"] if math.isfinite(state["best_val"]) else None
    dist.barrier()  # rank 0 has written best.safetensors
    if best_val is not None and best_path.is_file():
        load_weights(model, best_path)
        model.to(device)
        # the full validation split scores the chosen checkpoint even when evals were capped
        val_scores = evaluate(model, ds, "val", **eval_kw)
        best_val, best_val_mse = val_scores.loss, val_scores.mse
        test = evaluate(model, ds, "test", per_gene=True, **eval_kw)
        test_mse, test_loss = test.mse, test.loss
        per_gene_mse, per_gene_stats = per_gene_summary(test.sse_g, test.n_g)
        per_gene_doc = {"split": "test", "genes": [str(g) for g in ds.genes], "test_mse": per_gene_mse,
                        "n_masked": [int(c) for c in test.n_g]}
        if objective != "mse":
            seen = test.n_g > 0
            per_gene_doc["test_bits"] = [
                objectives.to_report_units(objective, float(v) / int(c)) if s else None
                for v, c, s in zip(test.nats_g, test.n_g, seen)]
        if main:  # written before result.json: a kill in between redoes both
            atomic_write_json(out / "per_gene.json", per_gene_doc)
    if best_val_mse is None and objective == "mse":
        best_val_mse = best_val

    baselines = ds.manifest.get("baselines", {}).get("gene_mean", {})
    per_cell = flops_per_cell(model_cfg, mask_prob=train_cfg.mask_prob)["train"]
    cells = step * train_cfg.batch_size
    result = {
        "run_id": run_id or out.name,
        "size": model_cfg.name,
        "params": count_params(model_cfg),
        "non_embedding_params": non_embedding_params(model_cfg),
        "d_model": model_cfg.d_model,
        "n_layers": model_cfg.n_layers,
        "n_heads": model_cfg.n_heads,
        "n_genes": model_cfg.n_genes,
        "objective": objective,
        "loss_unit": objectives.loss_unit(objective),
        "train_cells": n_train,
        "depth": float(ds.manifest.get("depth_fraction", 1.0)),
        "seed": seed,
        "steps": step,
        "cells_seen": cells,
        "tokens_seen": cells * model_cfg.n_genes,
        "masked_tokens_seen": state["masked_tokens"],
        "flops": per_cell * cells,
        "lr": peak_lr,
        "best_step": state["best_step"] if best_val is not None else None,
        "best_val_mse": best_val_mse,
        "test_mse": test_mse,
        # the objective's own numbers: = the MSEs for mse, bits per masked gene for likelihoods
        "best_val_loss": best_val,
        "test_loss": test_loss,
        "gene_mean_val_mse": baselines.get("val"),
        "gene_mean_test_mse": baselines.get("test"),
        "wall_seconds": _elapsed(wall_before, t_loop),
        "status": status,
        "error": f"non-finite loss at step {state['diverged_at']}" if status == "diverged" else None,
        "diverged_at": state["diverged_at"],
        **per_gene_stats,
        "entropy_bits_per_gene_weighting": "masked-count",
        "batch_size": train_cfg.batch_size,
        "schedule": train_cfg.schedule,
        "device": str(device),
        "world_size": dist.world_size,
        "resumed_at": state.get("resumes", []),
        "num_threads": torch.get_num_threads(),
        "total_wall_seconds": time.perf_counter() - t_start,
    }
    if main:
        crashpoint("before-result")
        atomic_write_json(result_path, result)
    dist.barrier()
    return result


def _elapsed(before: float, t0: float) -> float:
    return before + (time.perf_counter() - t0)


def _truncate_lines(path: Path, n: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) != n:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(lines[:n]))
        os.replace(tmp, path)
