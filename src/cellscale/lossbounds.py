"""The ranges the likelihood heads' second outputs are clamped to, and the least loss each
objective can score. Standard library only, so that the loss (``objectives``, torch), the fit
(numpy) and the report read the same numbers."""

from __future__ import annotations

import math

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
