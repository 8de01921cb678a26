"""Shared benchmark helpers: thread setup, measured matmul peak, time-boxed timing loops."""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import torch


def setup_threads(n: int | None = None) -> int:
    """Use every core (or ``n``) for intra-op work; returns the thread count."""
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def device_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def matmul_peak_gflops(n: int = 2048, *, dtype: torch.dtype = torch.float32, seconds: float = 3.0,
                       device: str = "cpu") -> float:
    """Measured throughput of a large square matrix product (GFLOP/s), best of a few repeats."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    torch.mm(a, b, out=c)
    best = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        if device != "cpu":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        best = max(best, 2.0 * n**3 / dt / 1e9)
    return best


def time_steps(step: Callable[[], int], *, seconds: float, warmup: int = 1, min_steps: int = 2,
               max_steps: int = 10_000) -> tuple[float, int, int]:
    """Run ``step`` (returns cells processed) for about ``seconds`` after warmup.

    Returns (cells per second, steps, cells).
    """
    for _ in range(warmup):
        step()
    cells = steps = 0
    t0 = time.perf_counter()
    while steps < max_steps and (steps < min_steps or time.perf_counter() - t0 < seconds):
        cells += step()
        steps += 1
    dt = time.perf_counter() - t0
    return cells / dt, steps, cells
