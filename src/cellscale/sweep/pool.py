"""A local sweep on several processes at once (``sweep.workers``), each run in its own process.

Why: the ladder's small models cannot use two cores in one process. Their tensors are too small
for torch to split an op across threads, so a second thread only adds start-up and waiting.
Two single-thread processes, one run each, keep both cores busy. Measured on this 2-core VM, a
demo-sized training step on one thread beside a second one lost no speed (benchmarks/README.md).

Each worker is a fresh ``spawn`` process with ``threads`` torch threads. It keeps one stop flag
for its whole life (``cellscale.runtime.preempt.hold_stop_flag``), so a signal that reaches it between
two runs is kept for the next one and does not kill it. The parent's SIGTERM or SIGINT is also
passed on through an event, for a ``kill`` that only reaches the parent. Each running run then
checkpoints and stops, a queued run does not start, and ``Preempted`` is raised once all of
them are done. A worker that dies (out of memory, segfault) breaks the pool: its run, and every
run not finished then, gets a failure record (a dead Ray worker's run gets one too), and a rerun
resumes each from its last checkpoint.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from cellscale.model import flops_per_cell
from cellscale.runtime.cpus import usable_cpus
from cellscale.runtime.io import read_jsonl
from cellscale.runtime.preempt import Preempted, StopFlag, hold_stop_flag, stop_on_signals
from cellscale.schema import RUNS_DIR
from cellscale.sweep.plan import RunSpec
from cellscale.sweep.runner import dataset_for, execute_run, finished_and_todo, record_failure, threads_per_run

PROGRESS_SECONDS = 5.0  # how often the runs' metrics files are read for the progress display
_flag: StopFlag | None = None  # the worker's stop flag, set up by _init_worker


def worker_count(workers: int | str, num_cpus_per_run: float) -> int:
    """Processes for a local sweep: ``workers``, or for "auto" as many runs of
    ``num_cpus_per_run`` threads as this process has usable CPUs (at least 1)."""
    if workers == "auto":
        return max(1, usable_cpus() // threads_per_run(num_cpus_per_run))
    return int(workers)


def longest_first(specs: list[RunSpec]) -> list[RunSpec]:
    """The runs by their training FLOPs at the most cells they may see, largest first: the longest
    run starts at once instead of last, so it does not run on alone at the end (the
    longest-processing-time order of list scheduling)."""
    def cost(spec: RunSpec) -> float:
        return flops_per_cell(spec.model, mask_prob=spec.train.mask_prob)["train"] * spec.train.cells_seen

    return sorted(specs, key=cost, reverse=True)


def _init_worker(threads: int, stop_event: Any) -> None:
    global _flag
    import torch

    torch.set_num_threads(threads)
    _flag = hold_stop_flag()

    def relay() -> None:  # the parent's stop, for a signal that reached the parent only
        stop_event.wait()
        if not _flag.signum:
            _flag.signum = int(signal.SIGTERM)

    threading.Thread(target=relay, daemon=True).start()


def _run_in_worker(spec: RunSpec, dataset: str, sweep_dir: str,
                   finish: Callable[[Path], dict[str, Any] | None] | None) -> dict[str, Any]:
    if _flag is not None and _flag.signum:
        raise Preempted(_flag.signum, f"the sweep stopped before run {spec.run_id}")
    result = execute_run(spec, dataset, sweep_dir)
    if finish is not None and result.get("status") == "ok":
        result = finish(Path(sweep_dir) / RUNS_DIR / spec.run_id) or result
    return result


def run_pool(
    specs: list[RunSpec], *, dataset: str | Mapping[float, str], sweep_dir: str, workers: int, threads: int,
    progress: Any | None = None, on_result: Callable[[dict[str, Any]], None] | None = None,
    finish: Callable[[Path], dict[str, Any] | None] | None = None,
) -> list[dict[str, Any]]:
    """The unfinished runs of ``specs`` on ``workers`` processes of ``threads`` threads each;
    ``on_result`` is called (in this process) after each new result, in the order they end.
    ``finish`` (picklable: it goes to the workers) is called in the worker on the run dir of each
    run that ended ok, and returns its new result or None; the sweep scores runs downstream there,
    so that this process does not compete with the workers for the cores."""
    results, todo = finished_and_todo(specs, sweep_dir, progress)
    if not todo:
        return [results[s.run_id] for s in specs]
    workers = min(workers, len(todo))
    if progress is not None:
        progress.say(f"{len(todo)} runs on {workers} local processes of {threads} thread(s) each")
    ctx = multiprocessing.get_context("spawn")
    stop_event = ctx.Event()
    with stop_on_signals() as stop, ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_init_worker,
            initargs=(threads, stop_event)) as pool:
        pending = {pool.submit(_run_in_worker, s, dataset_for(s, dataset), sweep_dir, finish): s
                   for s in longest_first(todo)}
        stopped = _collect(pending, sweep_dir, stop, stop_event, results, progress, on_result)
    if stopped:
        raise Preempted(stop.signum or signal.SIGTERM,
                        f"the sweep stopped runs {', '.join(stopped)} (checkpointed if they were training)")
    return [results[s.run_id] for s in specs]


def _collect(pending: dict[Future, RunSpec], sweep_dir: str, stop: StopFlag, stop_event: Any,
             results: dict[str, dict[str, Any]], progress: Any | None,
             on_result: Callable[[dict[str, Any]], None] | None) -> list[str]:
    """Wait for every run; returns the ids of the runs a stop signal ended or kept from starting."""
    stopped: list[str] = []
    shown = 0.0
    while pending:
        if progress is not None and time.monotonic() - shown >= PROGRESS_SECONDS:
            shown = time.monotonic()
            for spec in pending.values():
                _show_progress(progress, spec, sweep_dir)
        if stop.signum and not stop_event.is_set():
            stop_event.set()
            for future, spec in list(pending.items()):
                if future.cancel():  # never started: it resumes on the rerun
                    stopped.append(spec.run_id)
                    del pending[future]
        done, _ = wait(list(pending), timeout=0.2, return_when=FIRST_COMPLETED)  # a timeout, to see the flag
        for future in done:
            spec = pending.pop(future)
            result = _future_result(future, spec, sweep_dir)
            if result is None:
                stopped.append(spec.run_id)
                continue
            results[spec.run_id] = result
            if progress is not None:
                progress.run_finished(spec, result)
            if on_result is not None:
                on_result(result)
    return stopped


def _show_progress(progress: Any, spec: RunSpec, sweep_dir: str) -> None:
    """The run's newest train line (its metrics.jsonl, written by the worker) on the progress display."""
    path = Path(sweep_dir) / RUNS_DIR / spec.run_id / "metrics.jsonl"
    if not path.is_file():
        return  # queued, or building its model
    lines, _ = read_jsonl(path)
    train = [m for m in lines if m.get("kind") == "train"]
    if train:
        total = max(1, spec.train.cells_seen // spec.train.batch_size)
        progress.run_progress(spec, int(train[-1]["step"]), total, train[-1].get("loss"))


def _future_result(future: Future, spec: RunSpec, sweep_dir: str) -> dict[str, Any] | None:
    """The run's result; None for a run a stop signal ended; a failure record (written) for a
    worker that died."""
    try:
        return future.result()
    except Preempted:
        return None
    except Exception as err:  # noqa: BLE001 - the worker process died (BrokenProcessPool) or could not start
        return record_failure(spec, sweep_dir, f"worker process failed: {type(err).__name__}: {err}"[:400]
                              + "; a rerun resumes it from its last checkpoint")
