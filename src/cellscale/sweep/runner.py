"""Run a planned sweep, locally one run after another or fanned out on Ray.

A run that raises is recorded with status ``failed`` and its error, and the sweep goes on;
finished runs (``ok`` or ``diverged``) are never redone; an interrupted run resumes. SIGTERM or
SIGINT (``cellscale.runtime.preempt``) stops the sweep once its current run is checkpointed, and no run
starts after one: ``Preempted`` is raised, and nothing is recorded for the stopped run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from cellscale.errors import CellscaleError, RunError
from cellscale.runtime.io import atomic_write_json
from cellscale.runtime.preempt import Preempted, StopFlag, stop_on_signals
from cellscale.schema import RUNS_DIR, failed_record
from cellscale.sweep.plan import RunSpec
from cellscale.train import train_run
from cellscale.train.rundir import finished_result as rundir_finished_result


def finished_result(run_dir: Path) -> dict[str, Any] | None:
    """The run's result when it finished; None to (re)do it: no result, a failure, or a damaged
    result.json (one line says so; ``execute_run`` removes it, the run resumes or is re-scored)."""
    return rundir_finished_result(run_dir / "result.json")


def dataset_for(spec: RunSpec, dataset: str | Mapping[float, str]) -> str:
    """The dataset dir ``spec`` trains on: one dir for every run, or one per depth."""
    if isinstance(dataset, Mapping):
        if spec.depth not in dataset:
            raise RunError(f"run {spec.run_id}: no dataset for depth {spec.depth:g}")
        return str(dataset[spec.depth])
    if spec.depth != 1.0:
        raise RunError(f"run {spec.run_id} needs the dataset thinned to depth {spec.depth:g}, "
                       "but the sweep passed one dataset")
    return str(dataset)


def record_failure(spec: RunSpec, sweep_dir: str, error: str, **extra: Any) -> dict[str, Any]:
    """Write and return the failure record of ``spec`` (its run dir's result.json), which the
    next sweep redoes: a run that raised, or one whose worker died."""
    result = failed_record(run_id=spec.run_id, size=spec.size, seed=spec.seed,
                           train_cells=spec.train_cells, depth=spec.depth, error=error, **extra)
    run_dir = Path(sweep_dir) / RUNS_DIR / spec.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "result.json", result)
    return result


def threads_per_run(num_cpus_per_run: float) -> int:
    """torch's threads in a run given ``num_cpus_per_run`` CPUs (a Ray task, a pool worker)."""
    return max(1, int(num_cpus_per_run))


def execute_run(
    spec: RunSpec, dataset: str, sweep_dir: str, on_step: Callable[[dict], None] | None = None
) -> dict[str, Any]:
    """Train one spec; never raises for a failure of the run itself."""
    run_dir = Path(sweep_dir) / RUNS_DIR / spec.run_id
    # a failure record is the sweep's, not the run's: drop it so the retry starts clean
    (run_dir / "result.json").unlink(missing_ok=True)
    try:
        return train_run(
            dataset, spec.model, spec.train, out=run_dir, train_cells=spec.train_cells,
            seed=spec.seed, run_id=spec.run_id, on_step=on_step,
        )
    except KeyboardInterrupt:
        raise
    except Exception as err:  # recorded, not swallowed: the row carries the error
        detail = str(err) if isinstance(err, CellscaleError) else f"{type(err).__name__}: {err}"
        return record_failure(spec, sweep_dir, detail, traceback=traceback.format_exc(limit=8))


def run_local(
    specs: list[RunSpec], *, dataset: str | Mapping[float, str], sweep_dir: str, progress: Any | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One run after another in this process; ``on_result`` is called after each new result.
    ``dataset``: one dataset dir, or {depth: dir} for a sweep with a depth axis."""
    with stop_on_signals() as stop:
        return _run_local(specs, dataset=dataset, sweep_dir=sweep_dir, progress=progress, on_result=on_result,
                          stop=stop)


def _run_local(
    specs: list[RunSpec], *, dataset: str | Mapping[float, str], sweep_dir: str, progress: Any | None,
    on_result: Callable[[dict[str, Any]], None] | None, stop: StopFlag,
) -> list[dict[str, Any]]:
    results = []
    for spec in specs:
        done = finished_result(Path(sweep_dir) / RUNS_DIR / spec.run_id)
        if done is not None:
            results.append(done)
            if progress is not None:
                progress.run_skipped(spec)
            continue
        if stop.signum:  # it came while the last run was scored: that run is finished
            raise Preempted(stop.signum, f"the sweep stopped before run {spec.run_id}")
        hook = progress.run_started(spec) if progress is not None else None
        result = execute_run(spec, dataset_for(spec, dataset), sweep_dir, on_step=hook)
        if progress is not None:
            progress.run_finished(spec, result)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _ray_task(spec: RunSpec, dataset: str, sweep_dir: str, num_threads: int) -> dict[str, Any]:
    """The body of one Ray task: torch uses the CPUs Ray gave the task, not the whole node
    (``train.num_threads``, when set, still wins inside ``train_run``)."""
    import torch

    torch.set_num_threads(num_threads)
    with _cancellable():
        return execute_run(spec, dataset, sweep_dir)


@contextlib.contextmanager
def _cancellable() -> Iterator[None]:
    """SIGINT handled for the task's block, so that ``ray.cancel`` works (it raises SIGINT in the
    task, and the run's own stop flag catches that). A worker started from a background job of a
    batch script inherits an ignored SIGINT, and there ``ray.cancel`` would do nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_ray(
    specs: list[RunSpec], *, dataset: str | Mapping[float, str], sweep_dir: str, address: str | None = None,
    num_cpus_per_run: float = 1.0, num_gpus_per_run: float = 0.0, num_cpus: int | None = None,
    progress: Any | None = None, on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Each unfinished run is one Ray task with ``num_cpus_per_run`` CPUs and
    ``num_gpus_per_run`` GPUs. Without ``address`` a private local Ray is started (no
    dashboard, session files in a temp dir removed afterwards, no auth token written to
    ~/.ray) and shut down at the end; with ``address`` the sweep joins that cluster, whose
    workers must see ``dataset`` and ``sweep_dir`` at the same paths (a shared filesystem).
    ``dataset``: one dataset dir, or {depth: dir} for a sweep with a depth axis."""
    try:
        import ray
    except ImportError:
        raise RunError("the ray backend needs Ray: pip install 'cellscale[ray]'") from None

    results, todo = finished_and_todo(specs, sweep_dir, progress)
    if todo:
        # the handlers go in after ray.init, which sets a SIGTERM handler of its own
        with _ray_session(ray, address=address, num_cpus=num_cpus), stop_on_signals() as stop:
            remote = ray.remote(_ray_task).options(
                num_cpus=num_cpus_per_run, num_gpus=num_gpus_per_run, max_retries=0
            )
            threads = threads_per_run(num_cpus_per_run)
            pending = {remote.remote(spec, dataset_for(spec, dataset), sweep_dir, threads): spec for spec in todo}
            for spec, result in _as_completed(ray, pending, sweep_dir, stop):
                results[spec.run_id] = result
                if progress is not None:
                    progress.run_finished(spec, result)
                if on_result is not None:
                    on_result(result)
    return [results[s.run_id] for s in specs]


def finished_and_todo(
    specs: list[RunSpec], sweep_dir: str, progress: Any | None
) -> tuple[dict[str, dict[str, Any]], list[RunSpec]]:
    """({run id: result} of the finished runs, reported as skipped; the specs still to run)."""
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for spec in specs:
        done = finished_result(Path(sweep_dir) / RUNS_DIR / spec.run_id)
        if done is None:
            todo.append(spec)
            continue
        results[spec.run_id] = done
        if progress is not None:
            progress.run_skipped(spec)
    return results, todo


def _as_completed(ray: Any, pending: dict[Any, RunSpec], sweep_dir: str,
                  stop: StopFlag | None = None) -> Iterator[tuple[RunSpec, dict[str, Any]]]:
    """(spec, result) of each task as it ends; a task whose worker died yields a failure
    record, written to its run dir as the worker would have.

    Once ``stop`` is set, every task is cancelled. Ray raises KeyboardInterrupt in a running
    task, which reaches the run's own stop flag, so a run in training checkpoints and stops.
    The tasks' ends are awaited, and a cancelled task records nothing. Preempted is raised
    unless every task finished all the same."""
    cancelled, stopped = 0, []
    while pending:
        if stop is not None and stop.signum and not cancelled:
            cancelled = stop.signum
            for ref in pending:
                ray.cancel(ref)
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # a timeout, to see the flag
        if not ready:
            continue
        spec = pending.pop(ready[0])
        result = _task_result(ray, ready[0], spec, sweep_dir, cancelled=bool(cancelled))
        if result is None:
            stopped.append(spec.run_id)
        else:
            yield spec, result
    if stopped:
        raise Preempted(cancelled, f"the sweep stopped runs {', '.join(stopped)} (checkpointed if they were training)")


def _task_result(ray: Any, ref: Any, spec: RunSpec, sweep_dir: str, *, cancelled: bool) -> dict[str, Any] | None:
    """The task's result; a failure record (written) for a dead worker; None for a task the sweep cancelled."""
    try:
        return ray.get(ref)
    except Exception as err:  # noqa: BLE001 - the worker died (OOM, segfault, node lost), or was cancelled
        if cancelled:
            return None  # stopped by the sweep's signal: it resumes on the rerun, it did not fail
        return record_failure(spec, sweep_dir, f"ray worker failed: {type(err).__name__}: {_first_line(err)}"[:500])


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else ""


@contextlib.contextmanager
def _ray_session(ray: Any, *, address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Ray for the sweep: the one already running in this process, else join ``address``, else
    start a private local one. What is started here is shut down (and its temp dir and
    environment undone) at the end."""
    if ray.is_initialized():
        yield
        return
    saved_env = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE",)}
    tmp_dir = None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        kwargs["address"] = address
    else:
        # a private session dir, removed afterwards: nothing is left in /tmp/ray; a
        # loopback-only local cluster needs no auth token file in ~/.ray
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        tmp_dir = tempfile.mkdtemp(prefix="csray")
        kwargs["_temp_dir"] = tmp_dir
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**kwargs)
    except Exception as err:  # noqa: BLE001 - a cluster we cannot reach is a user problem
        _undo(saved_env, tmp_dir)
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise RunError(f"could not start or join {where} ({type(err).__name__}: {_first_line(err)}); "
                       "check --ray-address or use --backend local") from None
    try:
        yield
    finally:
        ray.shutdown()
        _undo(saved_env, tmp_dir)


def _undo(saved_env: dict[str, str | None], tmp_dir: str | None) -> None:
    """Put back the environment saved before a local Ray was started, and remove its temp dir."""
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if tmp_dir:
        shutil.rmtree(tmp_dir, ignore_errors=True)
