"""One optimiser step of a run: the stable phase's and a cooldown branch's alike."""

from __future__ import annotations

import torch

from cellscale.train.setup import Run


def train_step(run: Run, item: tuple, lr: float) -> tuple[torch.Tensor, int, int]:
    """One optimiser step; returns (this rank's mean loss, its masked positions, the global
    batch's masked positions). Each rank's mean loss over its masked positions is weighted by W x
    its share of the global batch's masked positions (exactly 1 on one process), and DDP's
    gradient average then gives the gradient of the global batch's mean loss."""
    *tensors, n_global = item
    n_local = int(tensors[1].sum())  # the host-side mask: no device read
    values, mask, *extra = (t.to(run.device, non_blocking=True) for t in tensors)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    with run.autocast():
        loss = run.loss_fn(values, mask, **dict(zip(("counts", "log_scale"), extra)))
    run.optimizer.zero_grad(set_to_none=True)
    (loss * (run.dist.world_size * n_local / n_global)).backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.optimizer.step()
    return loss, n_local, n_global
