"""Data-parallel training under ``torchrun``: process group, batch slicing, collectives.

``cellscale train`` started by ``torchrun`` (or ``python -m torch.distributed.run``) sees the
environment variables ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` and trains one model with
DistributedDataParallel (see ``docs/DISTRIBUTED.md``):

* the global batch is ``train.batch_size`` cells, exactly the single-process batch of the same
  step (rows and mask); rank ``r`` of ``W`` takes the contiguous rows ``[r*B/W, (r+1)*B/W)``;
* each rank's loss is its squared error summed over its masked positions, divided by the
  number of masked positions of the WHOLE global batch, times ``W``; DDP averages gradients
  over ranks, so the gradient is exactly the single-process one (up to float summation order);
* evaluation is sharded: rank ``r`` scores eval batches ``r, r+W, ...`` and the squared-error
  sums and counts are all-reduced (float64), so every rank holds the same validation MSE;
* only rank 0 writes ``metrics.jsonl``, checkpoints, ``best.safetensors`` and ``result.json``;
  every rank reads the checkpoint on resume (the run directory must be on a filesystem all
  nodes share);
* a stop signal (``cellscale.runtime.preempt``) is agreed at every step: the ranks all-reduce their
  stop flags on the CPU (gloo), so all of them save at the same step and exit together;
* gloo on CPU, nccl on CUDA (``cuda:LOCAL_RANK``).

With one process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) nothing here is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from cellscale.errors import RunError

__all__ = ["DistContext", "dist_env", "from_env"]


def dist_env() -> tuple[int, int, int] | None:
    """``(world_size, rank, local_rank)`` when launched by torchrun with more than one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise RunError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun") from None
    if world <= 1:
        return None
    try:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise RunError("WORLD_SIZE is set but RANK is missing or not an integer; launch with torchrun") from None
    return world, rank, local_rank


@dataclass
class DistContext:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False
    # a gloo group for the small host-side collectives of every step (the stop flag): under
    # nccl they would need a device tensor and a device sync each step; None means the world group
    host_group: Any = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def _tensor_device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over ranks (float64)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._tensor_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return [float(v) for v in t.cpu()]

    def all_reduce_array(self, values: np.ndarray) -> np.ndarray:
        """Sum a float64 array over ranks (counts up to 2^53 stay exact)."""
        if not self.active:
            return values
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(self._tensor_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t.cpu().numpy()

    def host_max(self, values: list[int]) -> list[int]:
        """The maximum over ranks of a few small integers, on the CPU: cheap enough for every step."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.host_group)
        return [int(v) for v in t]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            # tear down together: gloo aborts a rank whose peer is still using the group
            try:
                torch.distributed.barrier()
            except RuntimeError:
                pass  # a peer already failed; destroy what is left
            torch.distributed.destroy_process_group()
            self.owns_group = False


def from_env(device: torch.device) -> DistContext:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA); a no-op context otherwise.

    ``device`` is the device the run asked for; on CUDA each rank binds ``cuda:LOCAL_RANK``.
    The collective timeout is ``CELLSCALE_DIST_TIMEOUT`` seconds (default 1800).
    """
    env = dist_env()
    if env is None:
        return DistContext()
    world, rank, local_rank = env
    if not torch.distributed.is_available():
        raise RunError("this torch build has no torch.distributed; run without torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    owns = False
    if not torch.distributed.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("CELLSCALE_DIST_TIMEOUT", "1800")))
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
        owns = True
    # every rank creates the group here, at the same point (new_group is itself a collective)
    host = torch.distributed.new_group(backend="gloo") if backend == "nccl" else None
    return DistContext(world_size=world, rank=rank, local_rank=local_rank, backend=backend, owns_group=owns,
                       host_group=host)


def shard_device(device: torch.device, ctx: DistContext) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` under nccl, else ``device``."""
    if ctx.active and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device
