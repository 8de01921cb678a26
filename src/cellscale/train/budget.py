"""How long a run trains: a fixed budget, or until its validation curve plateaus.

Budget "plateau" (warmup-stable-decay): at the peak rate the run is evaluated often; once the
gain over its last doubling of cells seen (``cellscale.plateau``) has been at most
``plateau_tol`` for ``plateau_patience`` evaluations in a row (none counted before
``plateau_min_cells``), a linear cooldown over
``cooldown_frac`` of the steps so far begins, and the run ends with it. The maximum
``cells_seen`` is never passed: the cooldown starts early enough to end there, and a run that
gets there without a plateau is not converged. A fixed-budget run's verdict is the same
criterion read on its whole curve at the end.
"""

from __future__ import annotations

import math

from cellscale.plateau import is_converged, last_doubling_gain
from cellscale.train.setup import LoopState, Run


def end_step(run: Run, state: LoopState) -> int:
    """The step the run ends at, as planned now."""
    return state.end_step or run.cadence.total_steps


def _latest_decay_start(run: Run) -> int:
    return math.floor(run.cadence.total_steps / (1.0 + run.cfg.cooldown_frac))


def _start_cooldown(run: Run, state: LoopState) -> None:
    state.decay_start = state.step
    cooldown = max(1, math.ceil(run.cfg.cooldown_frac * state.step))
    state.end_step = min(run.cadence.total_steps, state.step + cooldown)


def on_eval(run: Run, state: LoopState) -> None:
    """After an evaluation at the peak rate: count plateau evaluations, start the cooldown
    once there are enough of them."""
    if run.cfg.budget != "plateau" or state.decay_start is not None:
        return
    cells, losses = zip(*state.evals)
    state.plateau_gain = last_doubling_gain(cells, losses)
    on_plateau = cells[-1] >= run.cfg.plateau_min_cells and is_converged(state.plateau_gain, run.cfg.plateau_tol)
    state.plateau_hits = state.plateau_hits + 1 if on_plateau else 0
    if state.plateau_hits >= run.cfg.plateau_patience:
        _start_cooldown(run, state)


def on_step(run: Run, state: LoopState) -> None:
    """Before each step: a plateau run with no plateau yet starts its cooldown when only the
    cooldown is left of its maximum."""
    if run.cfg.budget == "plateau" and state.decay_start is None and state.step >= _latest_decay_start(run):
        _start_cooldown(run, state)


def verdict(run: Run, state: LoopState) -> tuple[bool, float | None]:
    """(converged, the gain over the last doubling behind it): for a plateau run, whether the
    plateau was reached before the maximum and the figure when its cooldown began; for a fixed
    budget, the criterion on the whole validation curve."""
    if run.cfg.budget == "plateau":
        return state.plateau_hits >= run.cfg.plateau_patience, state.plateau_gain
    if not state.evals:
        return False, None
    cells, losses = zip(*state.evals)
    gain = last_doubling_gain(cells, losses)
    return is_converged(gain, run.cfg.plateau_tol), gain
