"""L = a P^-alpha: a pure power law, and the floor-less partner of ``power-floor``."""

from __future__ import annotations

import numpy as np

from cellscale.fit.laws.base import Law


class Power(Law):
    name = "power"
    formula = "L = a * P^-alpha"
    variables = ("P",)
    default_x = ("params",)
    param_names = ("a", "alpha")
    u_names = ("log_a", "alpha")

    def log_predict(self, u, logX):
        return u[0] - u[1] * logX[:, 0]

    def log_jac(self, u, logX):
        return np.column_stack([np.ones(logX.shape[0]), -logX[:, 0]])

    def to_natural(self, u):
        return np.array([np.exp(u[0]), u[1]])

    def from_natural(self, theta):
        with np.errstate(divide="ignore"):
            return np.array([np.log(theta[0]), theta[1]])

    def bounds(self, logy):
        return [(-200.0, 200.0), (-10.0, 10.0)]

    def start_grid(self, logX, logy):
        # The model is linear in u, so least squares gives the one start worth having.
        slope, intercept = np.polyfit(logX[:, 0], logy, 1)
        return np.array([[intercept, float(np.clip(-slope, -10, 10))]])
