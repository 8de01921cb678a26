"""Grids of runs: plan, run (local or Ray), collect."""

from cellscale.sweep.plan import RunSpec, plan_runs
from cellscale.sweep.study import run_sweep

__all__ = ["RunSpec", "plan_runs", "run_sweep"]
