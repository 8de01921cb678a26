"""L = a P^-alpha + c: the seed study's law, with c the irreducible loss."""

from __future__ import annotations

import numpy as np

from cellscale.fit.laws.base import Law, log_floor_bounds, softmax_terms
from cellscale.fit.laws.power import Power


class PowerFloor(Law):
    name = "power-floor"
    formula = "L = a * P^-alpha + c  (fitted as log L = LSE(log_a - alpha log P, log_c))"
    variables = ("P",)
    default_x = ("params",)
    param_names = ("a", "alpha", "c")
    u_names = ("log_a", "alpha", "log_c")
    floor = "c"

    def log_predict(self, u, logX):
        return softmax_terms([u[0] - u[1] * logX[:, 0], u[2] + np.zeros(logX.shape[0])])[0]

    def log_predict_many(self, U, logX):
        return self.log_predict(np.asarray(U, float).T[:, :, None], logX)

    def log_jac(self, u, logX):
        return self.log_predict_jac(u, logX)[1]

    def log_predict_jac(self, u, logX):
        value, share = softmax_terms([u[0] - u[1] * logX[:, 0], np.full(logX.shape[0], u[2])])
        return value, np.column_stack([share[0], -share[0] * logX[:, 0], share[1]])

    def to_natural(self, u):
        return np.array([np.exp(u[0]), u[1], np.exp(u[2])])

    def from_natural(self, theta):
        with np.errstate(divide="ignore"):
            return np.array([np.log(theta[0]), theta[1], np.log(theta[2])])

    def bounds(self, logy):
        return [(-200.0, 300.0), (0.0, 10.0), log_floor_bounds(logy)]

    def start_grid(self, logX, logy):
        # Data-adaptive: for each (alpha, c) the best log_a is a mean, so the grid spans
        # the shape of the curve rather than guessing the amplitude's scale.
        y = np.exp(logy)
        lo, hi = log_floor_bounds(logy)
        starts = []
        for frac in (0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.99):
            c = frac * y.min()
            log_c = np.log(c) if c > 0 else lo + 1.0
            for alpha in (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0):
                log_a = float(np.mean(np.log(y - c) + alpha * logX[:, 0]))
                starts.append([log_a, alpha, min(log_c, hi)])
        return np.array(starts)

    def no_floor(self):
        return Power()
