"""The bounds on a loss: the ranges the likelihood heads' second outputs are clamped to, the least
loss each objective can score, and whether a measured MSE lies below a known Bayes floor beyond
its sampling error (``check_not_below_floor``: leakage). Standard library only, so that the loss
(``objectives``, torch), the fit (numpy), the baselines and the report read the same numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass

# clamps keep a wild early prediction finite (exp of the raw output); far outside anything a
# fitted model uses: variances e^-12..e^12 of log1p values, inverse dispersions e^-12..e^12. A
# prediction that sits on one is reported (``clamp_share``): its bits are the clamp's, not the data's
LOG_VAR_RANGE = (-12.0, 12.0)
LOG_THETA_RANGE = (-12.0, 12.0)


def lowest_loss(objective: str, unit: str) -> float:
    """The least mean loss ``objective`` can score in the reported ``unit`` (``mse`` or ``bits``):
    0 for a squared error and for nb bits (minus the log of a probability); for gaussian-nll
    bits, 0.5 log2(2 pi e^s) at the clamp's least log-variance s (a perfect mean at the smallest
    variance the head can state: about -7.33 bits). A differential entropy has no lower bound of
    its own, so this is where a gaussian-nll floor's range starts (``cellscale.fit``)."""
    if unit == "bits" and objective == "gaussian-nll":
        return 0.5 * (math.log(2 * math.pi) + LOG_VAR_RANGE[0]) / math.log(2.0)
    return 0.0


@dataclass(frozen=True)
class FloorCheck:
    """Outcome of ``check_not_below_floor``; truthy when the MSE is NOT significantly below."""

    ok: bool
    mse: float
    floor: float
    se: float
    z: float
    threshold: float

    def __bool__(self) -> bool:
        return self.ok


def check_not_below_floor(
    mse: float, floor: float, n_masked: int, *, z: float = 4.0, design_effect: float = 2.0,
    floor_se: float = 0.0,
) -> FloorCheck:
    """Is ``mse`` (measured on ``n_masked`` masked positions) consistent with being at or
    above the Bayes floor ``floor``? An MSE significantly BELOW the Bayes-optimal MSE of the
    true generative model is impossible for an honest predictor: it means leakage (the model
    saw the masked values, or trained on the evaluation cells).

    Tolerance: at the floor, squared errors of Gaussian residuals have variance 2 v^2, so the
    MSE has standard error ``floor * sqrt(2 * design_effect / n_masked)``; ``design_effect``
    (default 2) allows for the correlation of errors within a cell (shared latent factors) and
    for heavier-than-Gaussian tails. ``floor_se`` (Monte-Carlo error of the floor) is added in
    quadrature. ``ok`` is False when ``mse < floor - z * se`` (default z = 4)."""
    if n_masked < 1:
        raise ValueError(f"n_masked must be >= 1, got {n_masked}")
    se = math.sqrt((floor * math.sqrt(2.0 * design_effect / n_masked)) ** 2 + float(floor_se) ** 2)
    threshold = floor - z * se
    score = (mse - floor) / se if se > 0 else (math.inf if mse >= floor else -math.inf)
    return FloorCheck(ok=bool(mse >= threshold), mse=float(mse), floor=float(floor), se=se, z=score, threshold=threshold)
