"""A run's process knobs: device, precision, optimiser, torch's thread count, the garbage
collector (the learning rate and its schedule are ``cellscale.rules.schedule``'s)."""

from __future__ import annotations

import gc
from contextlib import contextmanager, nullcontext

import torch

from cellscale.config import ModelConfig, TrainConfig
from cellscale.errors import RunError
from cellscale.model import flops_per_cell

# below this many FLOPs per step a CPU step runs on one thread (thread start-up and barriers
# cost more than they save), with and without dropout. Measured on 2 cores, batch 32, V = 64,
# 1 vs 2 threads (passive waits). With dropout 0.1 (the fused kernels, which split well):
# 4.4e7 (TINY) 6.8 vs 6.9 ms, 4.0e8 (SMALL) 21.5 vs 17.9 ms, 1.4e9 (XS) 58.4 vs 38.5 ms.
# Without dropout (2026-12-02): TINY 6.2 vs 11.0 ms, SMALL 17.1 vs 25.9, XS 39.5 vs 47.2; XS at
# batch 64 (2.8e9) trains 1.6x faster on 2 threads (benchmarks/contention.py: 13.0 vs 20.5 s)
SMALL_STEP_FLOPS = {"dropout": 1e8, "no dropout": 2e9}


def _flops_per_step(model_cfg: ModelConfig, train_cfg: TrainConfig) -> float:
    return flops_per_cell(model_cfg, mask_prob=train_cfg.mask_prob)["train"] * train_cfg.batch_size


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device 'cuda' requested but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    # bf16 autocast keeps fp32 master weights; on CPU bf16 matmuls are slower here, so fp32
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if use_bf16 else torch.float32


def autocast_for(device: torch.device, precision: str):
    if compute_dtype(device, precision) == torch.bfloat16:
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


def run_threads(model_cfg: ModelConfig, train_cfg: TrainConfig, device: torch.device) -> int | None:
    """torch's intra-op thread count for a run: ``train.num_threads``, else 1 for a CPU step
    under ``SMALL_STEP_FLOPS`` (thread start-up and synchronisation would dominate it), else
    None (the process's count)."""
    if train_cfg.num_threads:
        return int(train_cfg.num_threads)
    small = SMALL_STEP_FLOPS["dropout" if model_cfg.dropout or model_cfg.attn_dropout else "no dropout"]
    if device.type == "cpu" and _flops_per_step(model_cfg, train_cfg) < small:
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
