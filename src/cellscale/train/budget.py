"""How long a run trains, and whether it was trained to convergence.

Budget "fixed": exactly ``cells_seen``, on ``train.schedule``; its convergence is not judged
(the rule reads cooled-down points, which a fixed schedule has one of). Budget "plateau":
warmup-stable-decay with cooldown branches (``cellscale.train.branches``), ending at the first
branch that ``cellscale.rules.plateau``'s rule calls converged, or at the last one, at the maximum.
"""

from __future__ import annotations

from cellscale.train.setup import LoopState, Run


def end_step(run: Run, state: LoopState) -> int:
    """The step the run ends at, as planned now."""
    return state.end_step or run.cadence.total_steps


def verdict(run: Run, state: LoopState) -> tuple[bool | None, float | None, float | None]:
    """(converged, the gain over the last doubling behind it, that gain's standard error): for a
    plateau run, the verdict of the branch it ended at; for a fixed budget (None, None, None): not judged."""
    if run.cfg.budget != "plateau" or not state.branches:
        return None, None, None
    last = state.branches[-1]
    return bool(last["converged"]), last["gain"], last.get("gain_se")
