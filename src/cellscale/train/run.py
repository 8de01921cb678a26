"""``train_run``: claim the run dir, build the run, resume, loop, finalise."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellscale.config import ModelConfig, TrainConfig, config_hash
from cellscale.data.loader import CountsView
from cellscale.data.store import Dataset
from cellscale.rules import objectives
from cellscale.runtime.distributed import from_env, shard_device
from cellscale.runtime.preempt import stop_on_signals
from cellscale.train.loop import train_loop
from cellscale.train.result import finalise
from cellscale.train.rundir import claim_shared, run_identity
from cellscale.train.settings import frozen_gc, pick_device, run_threads, torch_threads
from cellscale.train.setup import build_run, resume


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
    now: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Train one model and write ``out/result.json``; rerunning the same call resumes.

    ``overwrite`` replaces an ``out`` that holds something else or a run with other settings
    (a run with the same settings is still resumed or returned).

    ``on_step`` receives a small dict after every optimiser step (for progress bars; its
    ``loss`` is the newest train loss read from the device, None before the first);
    ``stop_after_steps`` ends the process's work early without finishing the run (tests).
    SIGTERM or SIGINT during the run ends it at the next step boundary, with a checkpoint at
    that step, by raising ``cellscale.runtime.preempt.Preempted``. If the signal comes during the
    final scoring, the run is finished first. ``now`` is the clock for the run's wall times
    and ``train.checkpoint_minutes``; the default is ``time.perf_counter``, and tests pass a fake.
    Launched by torchrun (``WORLD_SIZE`` > 1) the run is data parallel (``cellscale.runtime.distributed``).
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
    # the signal handlers only once there is work to save (before, a signal ends the process),
    # and until the process group is closed: under torchrun a peer's exit makes torchrun signal this rank
    with stop_on_signals() as stop:
        try:
            with torch_threads(run_threads(model_cfg, train_cfg, device)), frozen_gc():
                prev = claim_shared(out, identity, ident_hash, overwrite=overwrite, dist=dist,
                                    registry=ds.registry())
                if prev is not None:
                    return prev
                run = build_run(ds, model_cfg, train_cfg, out=out, train_cells=train_cells, seed=seed,
                                n_train=n_train, run_id=run_id or out.name,
                                device=shard_device(device, dist), dist=dist)
                state = resume(run)
                clock = train_loop(run, state, on_step=on_step, stop_after_steps=stop_after_steps,
                                   now=now or time.perf_counter, stop=stop)
                return finalise(run, state, clock=clock, t_start=t_start)
        finally:
            dist.close()
