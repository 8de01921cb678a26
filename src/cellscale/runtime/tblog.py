"""TensorBoard event files of a run's curves, written from ``metrics.jsonl``.

``metrics.jsonl`` stays the source of truth; ``RUN_DIR/tensorboard/`` is a view of it, rewritten
whole (into a temporary dir, then renamed) each time a run finishes, so a resumed run never
shows a curve twice. ``tensorboard --logdir SWEEP_DIR`` then lists every run of a sweep
(``runs/<id>/tensorboard``). Scalars: ``train/loss``, ``train/lr``, ``val/mse`` (and ``val/bits``
for a likelihood objective), each against **cells seen** as the step, so that runs of different
batch sizes line up; wall times are the run's own (``wall`` seconds after its start).

The writer is ``torch.utils.tensorboard`` (the ``tensorboard`` package: ``pip install
'cellscale[tensorboard]'``). Without it nothing is written and one line says so, once per process.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from cellscale.runtime.io import read_jsonl

__all__ = ["EVENTS_DIR", "SCALARS", "write_events"]

EVENTS_DIR = "tensorboard"
# metrics.jsonl kind -> {field: TensorBoard tag}
SCALARS = {"train": {"loss": "train/loss", "lr": "train/lr"},
           "eval": {"val_mse": "val/mse", "val_bits": "val/bits"}}
_NOTED: list[str] = []  # the one "not installed" line is printed once per process


def _note_once(text: str) -> None:
    if not _NOTED:
        _NOTED.append(text)
        from cellscale.runtime.progress import console

        console.print(text, highlight=False, markup=False, soft_wrap=True)


def _number(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and abs(f) != float("inf") else None


def _write(writer, rows: list[dict], start: float) -> int:
    n = 0
    for row in rows:
        step = _number(row.get("cells_seen"))
        wall = _number(row.get("wall")) or 0.0
        for field, tag in SCALARS.get(row.get("kind"), {}).items():
            value = _number(row.get(field))
            if value is not None and step is not None:
                writer.add_scalar(tag, value, global_step=int(step), walltime=start + wall)
                n += 1
    return n


def write_events(run_dir: str | os.PathLike) -> Path | None:
    """Write ``RUN_DIR/tensorboard/`` from ``RUN_DIR/metrics.jsonl``; its path, or None when the
    package is absent or there is nothing to write. Never raises: a log view must not fail a run."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        _note_once("TensorBoard logs skipped: the tensorboard package is not installed "
                   "(pip install 'cellscale[tensorboard]'); metrics.jsonl has the curves")
        return None
    if not metrics.is_file():
        return None
    tmp = run_dir / f".{EVENTS_DIR}.tmp-{os.getpid()}"
    target = run_dir / EVENTS_DIR
    try:
        rows, _ = read_jsonl(metrics)
        shutil.rmtree(tmp, ignore_errors=True)
        writer = SummaryWriter(log_dir=str(tmp))
        try:
            last = max((_number(r.get("wall")) or 0.0 for r in rows), default=0.0)
            _write(writer, rows, start=time.time() - last)
        finally:
            writer.close()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return target
    except Exception as err:  # noqa: BLE001 - the curves are in metrics.jsonl whatever happens here
        shutil.rmtree(tmp, ignore_errors=True)
        from cellscale.runtime.progress import console

        console.print(f"TensorBoard logs of {run_dir.name} not written ({type(err).__name__}: {err})",
                      highlight=False, markup=False, soft_wrap=True)
        return None
