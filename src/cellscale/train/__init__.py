"""One training run: one model size on one training subset, resumable, with a result.json.

Batches are a pure function of (seed, step) (see ``data.loader``); the optimiser, schedule and
torch RNG state are checkpointed, so a run killed at any moment and started again with the same
call ends with the same numbers. The rooms:

- ``settings``: device, precision, optimiser, threads, gc (the rate: ``cellscale.rules.schedule``);
- ``spec``: one run of a study, resolved (``resolve_run``: its model and training settings, its id);
- ``rundir``: the run's identity hash and claiming its directory;
- ``setup``: the model, optimiser, loss and batches (``Run``), the loop state, resuming;
- ``step``: one optimiser step (clipping; the stable phase's and a cooldown branch's alike);
- ``budget``: when a run stops (fixed, or the plateau budget's verdict on its branches);
- ``branches``: the cooldown branches that give the data axis its points;
- ``ema``: the weights' moving average;
- ``loop``: the training loop and what it does when due (log, validate, checkpoint, branch);
- ``evaluate``: scores of a held-out split under the fixed evaluation mask (and per-cell sums);
- ``result``: the best checkpoint's final scores and the result record;
- ``run``: ``train_run``, which chains them.
"""

from cellscale.rules.schedule import lr_at, resolve_lr
from cellscale.train.evaluate import EvalResult, evaluate, per_gene_summary
from cellscale.train.run import train_run
from cellscale.train.settings import frozen_gc, run_threads, torch_threads

__all__ = ["train_run", "evaluate", "EvalResult", "per_gene_summary", "resolve_lr", "lr_at",
           "run_threads", "torch_threads", "frozen_gc"]
