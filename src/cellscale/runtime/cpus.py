"""How many CPUs this process may use, and OpenMP threads that wait without spinning.

Two facts from measuring cellscale beside other work on a 2-core machine
(``benchmarks/contention.py``):

- torch, BLAS and the fused kernel's OpenMP each start one thread per *visible* core, not
  per core the process may use: a CPU affinity mask (``taskset``, Slurm's ``--cpus-per-task``)
  or a cgroup quota (Docker ``--cpus``, Kubernetes limits) is ignored, and the threads
  oversubscribe the cores they are given.
- libgomp's default wait spins: a thread that reaches a barrier burns its core for a while
  before it sleeps. Alone that costs nothing; beside a competitor every spinning thread steals
  the core the competitor, or its own straggling sibling, needs. An XS step of 64 cells took
  825 ms beside two competitors with spinning waits and 62 ms with passive ones.

So the command line, before torch is loaded, sets ``OMP_WAIT_POLICY=PASSIVE`` and caps the
thread count at the CPUs the process may use (or ``--threads``). A variable the user set
wins. torch-free: it must run before torch is imported to have any effect.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["usable_cpus", "cgroup_cpu_limit", "prepare_threads", "THREAD_VARS"]

# the thread pools torch and its BLAS read when they load
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def _quota(quota: float, period: float) -> float | None:
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v2 ``cpu.max``, else v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None when there is none or it cannot be read."""
    try:
        fields = (root / "cpu.max").read_text().split()
        if len(fields) == 2 and fields[0] != "max":
            return _quota(float(fields[0]), float(fields[1]))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = float((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = float((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _quota(quota, period)


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """The cores this process may use: its affinity mask, capped by a cgroup quota (rounded
    up: a quota of 1.5 cores keeps two threads busy), at least 1."""
    n = _affinity_cpus()
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    return max(1, n)


def prepare_threads(threads: int | None = None, *, environ: dict[str, str] | None = None) -> int:
    """Set the thread environment for torch before it loads: passive OpenMP waits, and
    ``threads`` (else the usable CPUs) threads per pool. A variable already in the environment
    is left as the user set it, except that ``threads`` given explicitly wins. Returns the
    thread count the pools will use."""
    env = os.environ if environ is None else environ
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    n = threads if threads is not None else usable_cpus()
    for var in THREAD_VARS:
        if threads is not None or var not in env:
            env[var] = str(n)
    _set_loaded_torch(threads)
    return int(env["OMP_NUM_THREADS"])


def _set_loaded_torch(threads: int | None) -> None:
    """A torch that is already loaded (the Python API, a test) read its environment at load
    time: an explicit count still reaches it."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and threads is not None:
        torch.set_num_threads(threads)
