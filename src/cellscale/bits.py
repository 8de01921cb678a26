"""The Gaussian reading of a squared error as information: the one place of its formula.

A masked log-expression value whose residual is Gaussian with variance ``var`` has differential
entropy 0.5 log2(2 pi e var) bits. numpy only, so that the simulator, the trainer, the fit and
the report all take it from here.
"""

from __future__ import annotations

import numpy as np


def gaussian_bits(var):
    """0.5 log2(2 pi e var); -inf at var = 0. Accepts scalars and arrays (returns an array)."""
    with np.errstate(divide="ignore"):
        return 0.5 * np.log2(2 * np.pi * np.e * np.asarray(var, dtype=float))
