"""Differential entropy, in bits, of the Gaussian whose variance is a masked-gene MSE.

If the residual of a masked log-expression value is Gaussian with variance c, its
entropy is 0.5 log2(2 pi e c). With one variance per gene the per-gene figure is the
mean of the per-gene entropies, which by Jensen's inequality (log is concave) is never
larger than the figure computed from the mean variance.
"""

from __future__ import annotations

import math

import numpy as np

from cellscale.errors import FitError
from cellscale.rules.bits import gaussian_bits

HOMOSCEDASTIC_LABEL = "homoscedastic Gaussian: 0.5 log2(2 pi e c) bits per masked gene, c = fitted floor"
PER_GENE_LABEL = (
    "heteroscedastic Gaussian: mean over genes of 0.5 log2(2 pi e mse_g); never larger "
    "than the homoscedastic figure at the same mean error (Jensen)"
)


def entropy_bits(c):
    """0.5 log2(2 pi e c) (:func:`cellscale.rules.bits.gaussian_bits`); -inf at c = 0. Accepts
    scalars (returns a float) and arrays."""
    h = gaussian_bits(c)
    return float(h) if np.ndim(h) == 0 else h


def entropy_bits_per_gene(mse_per_gene) -> float:
    mse = np.asarray(mse_per_gene, dtype=float).ravel()
    if mse.size == 0 or not np.all(np.isfinite(mse)) or np.any(mse <= 0):
        raise FitError("per-gene MSEs must be a non-empty list of finite positive numbers")
    return float(np.mean(entropy_bits(mse)))


LIKELIHOOD_LABEL = (
    "measured: the floor of a likelihood loss (gaussian-nll or nb objective) is itself bits per "
    "masked gene, no Gaussian reading of an MSE needed"
)


def reaches_zero(interval) -> bool:
    """Whether a floor's interval runs down to 0: its lower end at or below zero, or more than six
    decades under its upper end (a fit that pinned the floor to its bound of 0)."""
    lo, hi = (float("nan") if v is None else float(v) for v in interval)
    return math.isfinite(lo) and math.isfinite(hi) and hi > 0 and lo <= 1e-6 * hi


def entropy_summary(floor: float | None, floor_ci: tuple[float, float] | None, per_gene_mse=None, *,
                    loss_unit: str = "mse") -> dict:
    """The fit's ``entropy_bits`` block. For a loss in bits (``loss_unit="bits"``) the floor is
    the entropy itself (``likelihood``); for an MSE it is read through a Gaussian (``gaussian``)."""
    if loss_unit == "bits":
        out = {"label": LIKELIHOOD_LABEL, "unit_of_fit": "bits", "gaussian": None, "likelihood": floor,
               "ci95": list(floor_ci) if floor_ci is not None else [None, None]}
        if floor is None:
            out["note"] = "this law has no floor; fit a law with one (power-floor, chinchilla) for the entropy"
        return out
    out: dict = {"label": HOMOSCEDASTIC_LABEL}
    if floor is None:
        out.update(gaussian=None, ci95=[None, None],
                   note="this law has no floor; fit a law with one (power-floor, chinchilla) for the entropy")
    else:
        # entropy is monotone in c, so the percentile interval of c maps straight across; a floor
        # interval that reaches 0 has no lower entropy bound (log of ~0 is a number of no meaning)
        out["gaussian"] = entropy_bits(floor)
        out["ci95"] = [entropy_bits(v) for v in floor_ci] if floor_ci is not None else [None, None]
        if floor_ci is not None and reaches_zero(floor_ci):
            out["ci95"][0] = None
            out["ci95_unbounded_below"] = True
    if per_gene_mse is not None:
        mse = np.asarray(per_gene_mse, dtype=float).ravel()
        per_gene = entropy_bits_per_gene(mse)
        block = {
            "bits": per_gene,
            "homoscedastic_same_errors": entropy_bits(float(mse.mean())),
            "n_genes": int(mse.size),
            "label": PER_GENE_LABEL,
        }
        if floor is not None and floor > 0:
            # The floor shared across genes in proportion to the given per-gene errors.
            block["at_floor"] = entropy_bits_per_gene(mse * (floor / mse.mean()))
        out["per_gene"] = block
    return out
