"""Run a planned sweep, locally one run after another or fanned out on Ray.

A run that raises is recorded with status ``failed`` and its error, and the sweep goes on;
finished runs (``ok`` or ``diverged``) are never redone; an interrupted run resumes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from cellscale.errors import CellscaleError, RunError
from cellscale.io import atomic_write_json, read_json
from cellscale.schema import FINISHED, failed_record
from cellscale.sweep.plan import RunSpec
from cellscale.train import train_run


def finished_result(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "result.json"
    if path.is_file():
        result = read_json(path)
        if result.get("status") in FINISHED:
            return result
    return None


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


def _failed_record(spec: RunSpec, error: str, **extra: Any) -> dict[str, Any]:
    return failed_record(run_id=spec.run_id, size=spec.size, seed=spec.seed,
                         train_cells=spec.train_cells, depth=spec.depth, error=error, **extra)


def execute_run(
    spec: RunSpec, dataset: str, sweep_dir: str, on_step: Callable[[dict], None] | None = None
) -> dict[str, Any]:
    """Train one spec; never raises for a failure of the run itself."""
    run_dir = Path(sweep_dir) / "runs" / spec.run_id
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
        result = _failed_record(spec, detail, traceback=traceback.format_exc(limit=8))
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "result.json", result)
        return result


def run_local(
    specs: list[RunSpec], *, dataset: str | Mapping[float, str], sweep_dir: str, progress: Any | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One run after another in this process; ``on_result`` is called after each new result.
    ``dataset``: one dataset dir, or {depth: dir} for a sweep with a depth axis."""
    results = []
    for spec in specs:
        done = finished_result(Path(sweep_dir) / "runs" / spec.run_id)
        if done is not None:
            results.append(done)
            if progress is not None:
                progress.run_skipped(spec)
            continue
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
    return execute_run(spec, dataset, sweep_dir)


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

    results, todo = _finished_and_todo(specs, sweep_dir, progress)
    if todo:
        with _ray_session(ray, address=address, num_cpus=num_cpus):
            remote = ray.remote(_ray_task).options(
                num_cpus=num_cpus_per_run, num_gpus=num_gpus_per_run, max_retries=0
            )
            threads = max(1, int(num_cpus_per_run))
            pending = {remote.remote(spec, dataset_for(spec, dataset), sweep_dir, threads): spec for spec in todo}
            for spec, result in _as_completed(ray, pending, sweep_dir):
                results[spec.run_id] = result
                if progress is not None:
                    progress.run_finished(spec, result)
                if on_result is not None:
                    on_result(result)
    return [results[s.run_id] for s in specs]


def _finished_and_todo(
    specs: list[RunSpec], sweep_dir: str, progress: Any | None
) -> tuple[dict[str, dict[str, Any]], list[RunSpec]]:
    """({run id: result} of the finished runs, reported as skipped; the specs still to run)."""
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for spec in specs:
        done = finished_result(Path(sweep_dir) / "runs" / spec.run_id)
        if done is None:
            todo.append(spec)
            continue
        results[spec.run_id] = done
        if progress is not None:
            progress.run_skipped(spec)
    return results, todo


def _as_completed(ray: Any, pending: dict[Any, RunSpec], sweep_dir: str) -> Iterator[tuple[RunSpec, dict[str, Any]]]:
    """(spec, result) of each task as it ends; a task whose worker died yields a failure
    record, written to its run dir as the worker would have."""
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        spec = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as err:  # noqa: BLE001 - the worker died (OOM, segfault, node lost)
            result = _failed_record(spec, f"ray worker failed: {type(err).__name__}: "
                                    f"{_first_line(err)}"[:500])
            atomic_write_json(Path(sweep_dir) / "runs" / spec.run_id / "result.json", result)
        yield spec, result


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
