"""Goodness of fit and model comparison: R^2, AIC/BIC, and how far a prediction missed."""

from __future__ import annotations

import numpy as np

from cellscale.rules.plateau import doubling_gain


def prediction_error(predicted: float, measured: float, unit: str = "mse") -> float:
    """How far a prediction missed, as a share: predicted / measured - 1 for an MSE, and for bits the
    same share of the variance a Gaussian of that entropy has (the convergence rule's measure of a
    change, ``rules.plateau.doubling_gain``, read from the prediction to the measurement, as the size
    law's leave-largest-out check reads it); NaN where it is not defined (an MSE not positive)."""
    g = doubling_gain(predicted, measured, unit)
    return float("nan") if g is None else g


def r_squared(y: np.ndarray, pred: np.ndarray) -> float:
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return float(1 - np.sum((y - pred) ** 2) / ss_tot) if ss_tot > 0 else float("nan")


def information_criteria(resid: np.ndarray, n_params: int, weights: np.ndarray | None = None) -> tuple[float, float]:
    """Gaussian AIC and BIC from residuals (the shared variance parameter cancels in differences).

    With row ``weights`` (each row's variance sigma^2 / w, as the fit weighs it) the residual sum
    of squares is weighted the same way, over the rows of positive weight; the sum of log w that
    the likelihood also holds is the same for every law fitted to these rows, so it cancels in the
    differences the criteria are read by."""
    w = np.ones_like(resid, dtype=float) if weights is None else np.asarray(weights, dtype=float)
    used = w > 0
    n = int(used.sum())
    rss = float(np.sum(w[used] * resid[used] ** 2))
    if rss <= 0 or n == 0:
        return float("nan"), float("nan")
    base = n * np.log(rss / n)
    return float(base + 2 * n_params), float(base + n_params * np.log(n))


def residuals(space: str, y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return np.log(y) - np.log(pred) if space == "log" else y - pred
