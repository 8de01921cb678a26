"""Has a run finished learning? One rule, read on cooled-down points.

A loss read at the peak learning rate says little about what training longer buys: the cooldown
that ends a warmup-stable-decay run takes a further 5-15% off it. So the rule is read on the
*cooldown branches* of a run (``cellscale.train.branches``): at geometric points D_1 < D_2 < ... of
cells seen (every doubling by default), the weights are cooled down and scored. The figure is what
the last doubling bought after cooling, from the point at D_k / 2 to D_k,

    gain_k = g(L(D_k / 2), L(D_k)),   g(before, after) = (before - after) / after for an MSE,
                                                         2^(2 (before - after)) - 1 for bits:

for an MSE the relative fall, and for a loss in bits (which may be negative: a differential entropy)
the relative fall of the variance a Gaussian of that entropy has, so that it is defined for losses
of either sign and is the same number for an MSE and a Gaussian likelihood of the same fit.

A run is converged at D_k when gain_k is at most ``tol`` (1% by default) at ``patience`` points in a
row (none counted before ``min_cells``): its last doubling, cooled down, bought less than that. A
rise (a negative gain) counts as converged. A point without one at half its cells, or with a
non-finite loss, has no figure (None) and is not converged.

numpy-free and torch-free, so that the trainer, the sweep, the fit and the report all judge by this
one rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

PLATEAU_TOL = 0.01


def doubling_gain(before: float | None, after: float | None, unit: str = "mse") -> float | None:
    """What a doubling of cells seen bought, from the cooled-down loss ``before`` to ``after``
    (see the module doc); None when either is missing or not finite, or an MSE is not positive."""
    if before is None or after is None or not (math.isfinite(before) and math.isfinite(after)):
        return None
    if unit == "bits":
        return 2.0 ** (2.0 * (before - after)) - 1.0
    if after <= 0 or before <= 0:
        return None
    return (before - after) / after


def relative_fall(before: float | None, after: float | None, unit: str = "mse") -> float | None:
    """How far the loss fell from ``before`` to ``after``, as a share of ``before``: (before - after) /
    before for an MSE, and for a loss in bits the same share of the variance a Gaussian of that
    entropy has (1 - 2^(-2 (before - after))). :func:`doubling_gain` is g, this is g / (1 + g)."""
    g = doubling_gain(before, after, unit)
    return None if g is None else g / (1.0 + g)


HALF = 0.6  # the point a doubling is read from: the last one at most this share of the cells seen


def gains(cells: Sequence[float], losses: Sequence[float | None], unit: str = "mse") -> list[float | None]:
    """The gain of each point of a ladder of cooled-down points (in order of cells seen) over its
    last doubling: against the last point with at most about half its cells seen (the one before it
    when the points double, two before when they are sqrt(2) apart); None without one."""
    out: list[float | None] = []
    for i, c in enumerate(cells):
        before = [j for j in range(i) if cells[j] <= HALF * c]
        out.append(doubling_gain(losses[before[-1]], losses[i], unit) if before else None)
    return out


def is_converged(gain: float | None, tol: float = PLATEAU_TOL) -> bool:
    return gain is not None and gain <= tol


def converged_at(cells: Sequence[float], losses: Sequence[float | None], *, unit: str = "mse",
                 tol: float = PLATEAU_TOL, patience: int = 1, min_cells: float = 0) -> int | None:
    """Index of the first point at which the ladder counts as converged: ``patience`` points in a
    row at or past ``min_cells`` cells seen with gains at most ``tol``; None when there is none."""
    run = 0
    for i, (c, g) in enumerate(zip(cells, gains(cells, losses, unit))):
        run = run + 1 if c >= min_cells and is_converged(g, tol) else 0
        if run >= patience:
            return i
    return None


def criterion_text(tol: float) -> str:
    """The convergence rule in words, for the methods paragraph."""
    return (f"a run counts as converged when its cooled-down loss improved by at most {100 * tol:.3g}% over "
            "its last doubling of cells seen (a cooldown branch at D against the one at D/2; for a loss in bits, "
            "the fall of the variance a Gaussian of that entropy has)")


def budget_text(*, budget: str, tol: float, patience: int, cooldown_frac: float, max_cells: int,
                min_cells: int = 0, cooldown_shape: str = "linear") -> str:
    """How long runs trained, in words: the fixed budget or the plateau budget's rule."""
    if budget == "plateau":
        least = f", none counted before {min_cells:,} cells seen" if min_cells else ""
        row = "" if patience == 1 else f", for {patience} doublings in a row"
        return (f"Runs trained at their peak rate with a cooldown branch at every doubling of cells seen (a "
                f"{cooldown_shape} cooldown over {100 * cooldown_frac:.3g}% of the steps before it, then the cooled-down "
                f"weights scored on the validation and test cells and training resumed from the stable phase); "
                f"a run ended at the first branch whose cooled-down validation loss had improved by at most "
                f"{100 * tol:.3g}% over the doubling before it{row}{least} (converged), or at its last branch, "
                f"at most {max_cells:,} cells seen")
    return ("Runs trained for a fixed budget; convergence was not judged (it is read on cooldown branches, "
            "which only the plateau budget takes)")
