"""Has a run finished learning? The plateau criterion on its validation curve.

The figure is the *gain over the last doubling*: the relative improvement of the best
validation loss between half the cells seen and all of them,

    gain = (best loss up to c/2 - best loss up to c) / best loss up to c,

where c is the number of cells seen at the last evaluation. It reads as "what the second half
of the training budget bought", a slope per doubling of cells seen measured without a model of
the curve. It is never negative, and noise errs towards "not converged": on a flat curve whose
evaluations scatter by s (relative), the best of the second half beats the best of the first
by about s, so a plateau reads as a gain of that size; a real fall is never hidden by it. A run whose gain is at most ``tol`` (1% by default) counts as
converged: doubling its budget again is expected to buy less than that. A curve with no
evaluation at or before half its cells has no figure (None) and is not converged.

numpy-free and torch-free, so the trainer, the sweep and the report all judge by this one rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

PLATEAU_TOL = 0.01


def last_doubling_gain(cells: Sequence[float], losses: Sequence[float]) -> float | None:
    """Relative improvement of the best loss over the last doubling of cells seen (see the module
    doc); None without an evaluation at or before half the final cells or without a finite loss."""
    pairs = sorted((float(c), float(v)) for c, v in zip(cells, losses) if math.isfinite(float(v)))
    if len(pairs) < 2:
        return None
    end = pairs[-1][0]
    early = [v for c, v in pairs if c <= end / 2]
    if not early:
        return None
    best_early, best = min(early), min(v for _, v in pairs)
    if best <= 0:
        return None
    return (best_early - best) / best


def is_converged(gain: float | None, tol: float = PLATEAU_TOL) -> bool:
    return gain is not None and gain <= tol


def criterion_text(tol: float) -> str:
    """The plateau criterion in words, for the methods paragraph."""
    return (f"a run counts as trained to its plateau when the best validation loss improved by at most "
            f"{100 * tol:.3g}% over the last doubling of its cells seen (from half its cells to all of them)")


def budget_text(*, budget: str, tol: float, patience: int, cooldown_frac: float, max_cells: int,
                min_cells: int = 0) -> str:
    """How long runs trained, in words: the fixed budget or the plateau budget's rule."""
    if budget == "plateau":
        least = f", and no plateau was called before {min_cells:,} cells seen" if min_cells else ""
        return (f"Runs trained until their validation curve plateaued: once the best validation loss had "
                f"improved by at most {100 * tol:.3g}% over the last doubling of cells seen at {patience} "
                f"evaluation(s) in a row{least}, the rate was cooled down over {100 * cooldown_frac:.3g}% of "
                f"the steps so far and the run ended; at most {max_cells:,} cells seen")
    return f"Runs trained for a fixed budget; {criterion_text(tol)}"
