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

A run is converged at D_k when gain_k plus its standard error over the evaluation cells is at most
``tol`` (1% by default) at ``patience`` points in a row (none counted before ``min_cells``, nor while
the run is still on the gene-mean plateau: ``has_learned``): each of its last ``patience`` doublings,
cooled down, bought less than that, by at least one standard error. The standard error (``paired_gain_se``) pairs the
two points cell by cell (the same cells and masks score both): on 2,000 validation cells it is
0.4-0.6% for a curve that has flattened (measured on the demo's MINI and TINY at 480k-960k cells), on
35 several percent, so that a flat-looking curve on a handful of cells is not called converged
(measured: on real PBMC counts with 35 validation cells the plain rule called TINY converged at 240k
cells, and its next doubling moved the validation loss by 7.9%). Two standard errors would ask more
than 2,000 cells can tell: a doubling would have to buy under 0.2%. A point without one at half its cells, or with a non-finite loss, has no figure (None) and is
not converged.

The standard error counts the evaluation cells only, not where each cooldown happens to land: a
run's gains past its takeoff wander by more than it (measured, 4 seeds each of MINI and TINY to
1.92M cells: successive gains of 0.46%, 1.46%, 0.84%, or 1.11%, 3.85%, 1.92%, against standard
errors of 0.4-0.7%), so one flat doubling is often a low draw. With ``patience`` 1 the rule stopped
7 of those 8 runs; of the 6 whose next doubling was measured, 4 then bought 1.16-1.46%. The
studies' default (``TrainConfig.plateau_patience``) is therefore two flat doublings in a row.

torch-free, so that the trainer, the sweep, the fit and the report all judge by this one rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PLATEAU_TOL = 0.01
Z = 1.0  # a doubling counts as flat when gain + Z x its standard error is at most the tolerance


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


def next_doubling(cells: Sequence[float], i: int) -> int | None:
    """Index of the first point after ``i`` with at least about twice its cells seen (``HALF``, as
    :func:`gains` reads a doubling): where what the next doubling bought is read; None without one."""
    later = [j for j in range(i + 1, len(cells)) if cells[i] <= HALF * cells[j]]
    return later[0] if later else None


def paired_gain_se(before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray],
                   unit: str = "mse") -> float | None:
    """The standard error of :func:`doubling_gain` over the evaluation cells, from each cell's loss
    sum and masked count at both points (``(loss, n)``: squared errors for an MSE, nats for a
    likelihood; the same cells and masks at both), by the delta method on the paired ratio; None
    when the arrays do not pair up or there are fewer than two cells."""
    a, n = (np.asarray(v, dtype=np.float64) for v in before)
    b, n_after = (np.asarray(v, dtype=np.float64) for v in after)
    m = a.size
    if m < 2 or b.size != m or not np.array_equal(n, n_after) or n.sum() <= 0:
        return None
    scale = m / (m - 1)
    if unit == "bits":  # a sum of nats may be of either sign
        delta = (a.sum() - b.sum()) / n.sum()  # nats per masked gene
        lin = ((a - b) - delta * n) / n.sum()
        return float(2.0 * 2.0 ** (2.0 * delta / math.log(2)) * math.sqrt(scale * np.sum(lin**2)))
    if b.sum() <= 0:
        return None
    ratio = a.sum() / b.sum()
    lin = (a - ratio * b) / b.sum()
    return float(math.sqrt(scale * np.sum(lin**2)))


def is_converged(gain: float | None, tol: float = PLATEAU_TOL, se: float | None = None) -> bool:
    """Did the doubling buy at most ``tol``, beyond ``Z`` standard errors ``se`` (None: none known)?"""
    return gain is not None and gain + Z * (se or 0.0) <= tol


def got_worse(gain: float | None, se: float | None = None) -> bool:
    """Did the doubling make the loss worse, beyond ``Z`` standard errors ``se``? A run that learned
    and then rose over a doubling has overfitted its training cells (measured: on 420 real PBMC
    training cells, XS and SMALL rose by 13% and 6% from 120k to 240k cells seen, some 500 epochs):
    it has finished, and a law in which every cell seen helps no longer describes it."""
    return gain is not None and gain + Z * (se or 0.0) < 0.0


def has_learned(mse: float | None, gene_mean: float | None, tol: float = PLATEAU_TOL) -> bool:
    """Is a point's validation MSE below the gene-mean baseline's by more than ``tol``? A run can sit
    on the gene-mean plateau for doublings before it starts to learn (measured: MINI on the
    compute-optimal data, gains 0.46% and 0.35% at 40k and 80k cells, then 5.4% over the next doubling),
    so no point there counts towards convergence, nor towards the data axis's law
    (``fit.data_axis.learned_points``). Without a baseline every point counts."""
    if gene_mean is None or not math.isfinite(gene_mean) or mse is None or not math.isfinite(mse):
        return True
    return mse < gene_mean * (1.0 - tol)


def converged_at(cells: Sequence[float], losses: Sequence[float | None], *, unit: str = "mse",
                 tol: float = PLATEAU_TOL, patience: int = 1, min_cells: float = 0,
                 ses: Sequence[float | None] | None = None, learned: Sequence[bool] | None = None) -> int | None:
    """Index of the first point at which the ladder counts as converged: ``patience`` points in a
    row at or past ``min_cells`` cells seen, past the gene-mean plateau (``learned``, from
    :func:`has_learned`), whose gains (plus ``Z`` x their standard errors ``ses``) are at most ``tol``;
    None when there is none."""
    run = 0
    ses = list(ses) if ses is not None else [None] * len(cells)
    learned = list(learned) if learned is not None else [True] * len(cells)
    for i, (c, g, se, ok) in enumerate(zip(cells, gains(cells, losses, unit), ses, learned)):
        run = run + 1 if ok and c >= min_cells and is_converged(g, tol, se) else 0
        if run >= patience:
            return i
    return None


def ladder_converged_at(ladder: Sequence[Mapping[str, Any]], gene_mean: float | None, *, unit: str = "mse",
                        tol: float = PLATEAU_TOL, patience: int = 1, min_cells: float = 0) -> int | None:
    """:func:`converged_at` on a run's branch rows, in order of cells seen (``cells_seen``,
    ``val_loss``, ``gain_se``, ``val_mse``: a ``BranchRecord``'s fields), with the gene-mean
    plateau read off ``val_mse`` (:func:`has_learned`)."""
    return converged_at([b["cells_seen"] for b in ladder], [b["val_loss"] for b in ladder], unit=unit, tol=tol,
                        patience=patience, min_cells=min_cells, ses=[b.get("gain_se") for b in ladder],
                        learned=[has_learned(b.get("val_mse"), gene_mean, tol) for b in ladder])


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
                f"{100 * tol:.3g}% over the doubling before it, by at least that gain's standard error over the "
                f"validation cells{row}{least}, with its validation MSE below the gene-mean baseline's by more "
                f"than {100 * tol:.3g}% (converged), or at its last branch, at most {max_cells:,} cells seen")
    return ("Runs trained for a fixed budget; convergence was not judged (it is read on cooldown branches, "
            "which only the plateau budget takes)")
