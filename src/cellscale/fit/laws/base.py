"""What every law provides to the fitting methods.

Laws are fitted in an unconstrained-ish parameterisation ``u`` in which the model is
written as ``log L = f(u, log X)``: positivity of the amplitudes and of the floor comes
from the exponentials, so one optimiser and one Jacobian serve every method. ``theta``
is the natural parameterisation that users read (a, alpha, c, ...).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

# Relative distance from a floor bound at which the estimate counts as "on the boundary".
BOUNDARY_RTOL = 1e-6
# The floor's lower bound in u-space sits this many nats below log(min L): close enough to
# zero that touching it means "no floor", far enough that LSE stays well conditioned.
# Its upper bound is the largest observed loss, not the smallest: with noisy runs the
# true floor can sit above the best observed loss, and capping it there (as the seed
# study's grid did) truncates the estimate and makes its intervals miss.
FLOOR_LOG_SPAN = 30.0


class Law(ABC):
    """A scaling law L(X; theta) with a log-space parameterisation for fitting."""

    name: str = ""
    formula: str = ""
    variables: tuple[str, ...] = ()
    default_x: tuple[str, ...] = ()
    param_names: tuple[str, ...] = ()
    u_names: tuple[str, ...] = ()
    floor: str | None = None

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    @property
    def n_vars(self) -> int:
        return len(self.variables)

    @abstractmethod
    def log_predict(self, u: np.ndarray, logX: np.ndarray) -> np.ndarray:
        ...

    def log_jac(self, u: np.ndarray, logX: np.ndarray) -> np.ndarray:
        """d log L / d u, shape (n, k); central differences unless a law knows better, the 2k shifted
        parameter vectors predicted in one ``log_predict_many`` call (one pass where a law vectorises it)."""
        u = np.asarray(u, dtype=float)
        h = 1e-6 * np.maximum(1.0, np.abs(u))
        shifted = np.repeat(u[None, :], 2 * u.size, axis=0)
        rows = np.arange(u.size)
        shifted[2 * rows, rows] += h
        shifted[2 * rows + 1, rows] -= h
        pred = self.log_predict_many(shifted, logX)
        return ((pred[0::2] - pred[1::2]) / (2 * h[:, None])).T

    def log_predict_many(self, U: np.ndarray, logX: np.ndarray) -> np.ndarray:
        """log L for every row of U at once, shape (S, n): scores a whole start grid."""
        return np.stack([self.log_predict(u, logX) for u in U])

    def log_predict_jac(self, u: np.ndarray, logX: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both at once; laws whose Jacobian reuses the prediction's work override this."""
        return self.log_predict(u, logX), self.log_jac(u, logX)

    @abstractmethod
    def to_natural(self, u: np.ndarray) -> np.ndarray:
        ...

    @abstractmethod
    def from_natural(self, theta: np.ndarray) -> np.ndarray:
        ...

    @abstractmethod
    def bounds(self, logy: np.ndarray) -> list[tuple[float, float]]:
        ...

    @abstractmethod
    def start_grid(self, logX: np.ndarray, logy: np.ndarray) -> np.ndarray:
        ...

    def no_floor(self) -> "Law | None":
        """The same law without its irreducible term, for AIC/BIC comparison."""
        return None

    def predict(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        """The law at X. Every floor here is an added constant: the rest is evaluated in log space
        and the floor added after, so that a floor of either sign predicts (a fit to the excess over
        an objective's least loss, ``cellscale.fit.core``, shifts it below zero)."""
        X = np.asarray(X, dtype=float)
        if X.ndim == 1:
            X = X[:, None]
        theta = np.array(theta, dtype=float, copy=True)
        idx = self.floor_index()
        floor = 0.0
        if idx is not None:
            floor, theta[idx] = float(theta[idx]), 0.0
        with np.errstate(divide="ignore"):
            return np.exp(self.log_predict(self.from_natural(theta), np.log(X))) + floor

    def floor_bounds(self, y: np.ndarray) -> tuple[float, float]:
        """Natural-scale bounds of the floor: 0 and the worst observed loss."""
        return 0.0, float(np.max(y))

    def floor_index(self) -> int | None:
        return None if self.floor is None else self.param_names.index(self.floor)

    def floor_on_bound(self, theta: np.ndarray, y: np.ndarray) -> bool:
        idx = self.floor_index()
        if idx is None:
            return False
        lo, hi = self.floor_bounds(y)
        c = float(theta[idx])
        return c <= lo + BOUNDARY_RTOL * hi or c >= hi * (1 - BOUNDARY_RTOL)


def log_floor_bounds(logy: np.ndarray) -> tuple[float, float]:
    return float(np.min(logy)) - FLOOR_LOG_SPAN, float(np.max(logy))


def softmax_terms(terms: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """log(sum exp(terms)) and the share of each term, stable for very negative terms."""
    stacked = np.stack(np.broadcast_arrays(*terms))
    top = np.max(stacked, axis=0)
    top = np.where(np.isfinite(top), top, 0.0)
    ex = np.exp(stacked - top)
    total = ex.sum(axis=0)
    return top + np.log(total), ex / total
