"""Run a planned sweep, locally one run after another or fanned out on Ray.

A run that raises is recorded with status ``failed`` and its error, and the sweep goes on;
finished runs (``ok`` or ``diverged``) are never redone; an interrupted run resumes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

from cellscale.errors import CellscaleError, RunError
from cellscale.io import atomic_write_json, read_json
from cellscale.sweep.plan import RunSpec
from cellscale.train import FINISHED, train_run


def finished_result(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "result.json"
    if path.is_file():
        result = read_json(path)
        if result.get("status") in FINISHED:
            return result
    return None


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
        result = {
            "run_id": spec.run_id, "size": spec.size, "seed": spec.seed,
            "train_cells": spec.train_cells, "status": "failed", "error": detail,
            "traceback": traceback.format_exc(limit=8),
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "result.json", result)
        return result


def run_local(
    specs: list[RunSpec], *, dataset: str, sweep_dir: str, progress: Any | None = None
) -> list[dict[str, Any]]:
    results = []
    for spec in specs:
        done = finished_result(Path(sweep_dir) / "runs" / spec.run_id)
        if done is not None:
            results.append(done)
            if progress is not None:
                progress.run_skipped(spec)
            continue
        hook = progress.run_started(spec) if progress is not None else None
        result = execute_run(spec, dataset, sweep_dir, on_step=hook)
        if progress is not None:
            progress.run_finished(spec, result)
        results.append(result)
    return results


def run_ray(
    specs: list[RunSpec], *, dataset: str, sweep_dir: str, address: str | None = None,
    num_cpus_per_run: float = 1.0, num_gpus_per_run: float = 0.0, num_cpus: int | None = None,
    progress: Any | None = None,
) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise RunError("the ray backend needs Ray: pip install 'cellscale[ray]'") from None

    todo = []
    results: dict[str, dict[str, Any]] = {}
    for spec in specs:
        done = finished_result(Path(sweep_dir) / "runs" / spec.run_id)
        if done is not None:
            results[spec.run_id] = done
            if progress is not None:
                progress.run_skipped(spec)
        else:
            todo.append(spec)

    started_here = not ray.is_initialized()
    tmp_dir = None
    if started_here:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
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
        ray.init(**kwargs)
    try:
        remote = ray.remote(execute_run).options(
            num_cpus=num_cpus_per_run, num_gpus=num_gpus_per_run, max_retries=0
        )
        pending = {remote.remote(spec, dataset, sweep_dir): spec for spec in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as err:  # the worker itself died
                result = {"run_id": spec.run_id, "size": spec.size, "seed": spec.seed,
                          "train_cells": spec.train_cells, "status": "failed",
                          "error": f"ray worker failed: {type(err).__name__}"}
                atomic_write_json(Path(sweep_dir) / "runs" / spec.run_id / "result.json", result)
            results[spec.run_id] = result
            if progress is not None:
                progress.run_finished(spec, result)
    finally:
        if started_here:
            ray.shutdown()
            if tmp_dir:
                shutil.rmtree(tmp_dir, ignore_errors=True)
    return [results[s.run_id] for s in specs]
