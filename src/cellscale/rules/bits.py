"""The Gaussian reading of a squared error as information: the one place of its formula.

A masked log-expression value whose residual is Gaussian with variance ``var`` has differential
entropy 0.5 log2(2 pi e var) bits. numpy only, so that the simulator, the trainer, the fit and
the report all take it from here, and the count-weighted mean of the per-gene figures too.
"""

from __future__ import annotations

import numpy as np


def gaussian_bits(var):
    """0.5 log2(2 pi e var); -inf at var = 0. Accepts scalars and arrays (returns an array)."""
    with np.errstate(divide="ignore"):
        return 0.5 * np.log2(2 * np.pi * np.e * np.asarray(var, dtype=float))


def count_weighted_bits(mse, counts, *, partial: bool = False) -> float | None:
    """The heteroscedastic Gaussian entropy weighted by masked counts: sum_g n_g 0.5 log2(2 pi e mse_g)
    / sum_g n_g over the genes masked at least once (``counts`` n_g > 0), i.e. the mean over masked
    positions of the entropy of that position's gene.

    A masked gene whose MSE is not a finite positive number has no Gaussian entropy: the figure is
    then None (the run's ``entropy_bits_per_gene`` in result.json), or with ``partial`` the mean over
    the other masked genes (the report's reading of the best run's per-gene errors). None when no
    gene is left."""
    mse = np.asarray(mse, dtype=float)
    counts = np.asarray(counts)
    seen = counts > 0
    ok = seen & np.isfinite(mse) & (mse > 0)
    if not ok.any() or (not partial and not np.array_equal(ok, seen)):
        return None
    w = counts[ok].astype(np.float64)
    return float(np.sum(w * gaussian_bits(mse[ok])) / np.sum(w))
