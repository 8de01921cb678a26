"""Goodness of fit and model comparison: R^2, AIC/BIC, and the leave-largest-out check."""

from __future__ import annotations

import numpy as np


def r_squared(y: np.ndarray, pred: np.ndarray) -> float:
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return float(1 - np.sum((y - pred) ** 2) / ss_tot) if ss_tot > 0 else float("nan")


def information_criteria(resid: np.ndarray, n_params: int) -> tuple[float, float]:
    """Gaussian AIC and BIC from residuals (the shared variance parameter cancels in differences)."""
    n = resid.size
    rss = float(np.sum(resid**2))
    if rss <= 0:
        return float("nan"), float("nan")
    base = n * np.log(rss / n)
    return float(base + 2 * n_params), float(base + n_params * np.log(n))


def residuals(space: str, y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return np.log(y) - np.log(pred) if space == "log" else y - pred
