"""L = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022), in Besiroglu et al.'s LSE form.

``u = (a, b, e, alpha, beta)`` with A = exp(a), B = exp(b), E = exp(e):
log L = LSE(a - alpha log N, b - beta log D, e), exactly as the reference replication.
"""

from __future__ import annotations

import itertools

import numpy as np

from cellscale.fit.laws.base import Law, log_floor_bounds, softmax_terms


class Chinchilla(Law):
    variables = ("N", "D")
    default_x = ("params", "train_cells")

    def __init__(self, with_floor: bool = True):
        self.with_floor = with_floor
        if with_floor:
            self.name = "chinchilla"
            self.formula = "L = E + A/N^alpha + B/D^beta"
            self.param_names = ("A", "B", "E", "alpha", "beta")
            self.u_names = ("a", "b", "e", "alpha", "beta")
            self.floor = "E"
        else:
            self.name = "chinchilla-no-floor"
            self.formula = "L = A/N^alpha + B/D^beta"
            self.param_names = ("A", "B", "alpha", "beta")
            self.u_names = ("a", "b", "alpha", "beta")
            self.floor = None

    def __reduce__(self):
        return (Chinchilla, (self.with_floor,))

    def _split(self, u):
        if self.with_floor:
            return u[0], u[1], u[2], u[3], u[4]
        return u[0], u[1], None, u[2], u[3]

    def _terms(self, u, logX):
        a, b, e, alpha, beta = self._split(u)
        terms = [a - alpha * logX[:, 0], b - beta * logX[:, 1]]
        if e is not None:
            terms.append(e + np.zeros(logX.shape[0]))
        return terms

    def log_predict(self, u, logX):
        return softmax_terms(self._terms(u, logX))[0]

    def log_predict_many(self, U, logX):
        # Parameters as (k, S, 1) columns broadcast against the n rows: one pass per grid.
        return self.log_predict(np.asarray(U, float).T[:, :, None], logX)

    def log_jac(self, u, logX):
        return self.log_predict_jac(u, logX)[1]

    def log_predict_jac(self, u, logX):
        value, share = softmax_terms(self._terms(u, logX))
        cols = [share[0], share[1]]
        if self.with_floor:
            cols.append(share[2])
        cols += [-share[0] * logX[:, 0], -share[1] * logX[:, 1]]
        return value, np.column_stack(cols)

    def to_natural(self, u):
        t = np.array(u, dtype=float)
        n_amp = 3 if self.with_floor else 2
        t[:n_amp] = np.exp(t[:n_amp])
        return t

    def from_natural(self, theta):
        u = np.array(theta, dtype=float)
        n_amp = 3 if self.with_floor else 2
        with np.errstate(divide="ignore"):
            u[:n_amp] = np.log(u[:n_amp])
        return u

    def bounds(self, logy):
        amp = (-200.0, 300.0)
        expo = (0.0, 10.0)
        if self.with_floor:
            return [amp, amp, log_floor_bounds(logy), expo, expo]
        return [amp, amp, expo, expo]

    def start_grid(self, logX, logy):
        # Besiroglu et al.'s grid, with e clipped into its bound (E below the best loss).
        lo, hi = log_floor_bounds(logy)
        alphas = np.arange(0, 2.5, 0.5)
        es = np.arange(-1, 1.5, 0.5)
        amps = np.arange(0, 30, 5)
        if self.with_floor:
            grid = [
                (a, b, min(max(e, lo), hi), al, be)
                for al, be, e, a, b in itertools.product(alphas, alphas, es, amps, amps)
            ]
        else:
            grid = [(a, b, al, be) for al, be, a, b in itertools.product(alphas, alphas, amps, amps)]
        return np.array(grid, dtype=float)

    def no_floor(self):
        return Chinchilla(with_floor=False) if self.with_floor else None
