"""Data-constrained scaling (Muennighoff et al. 2023, "Scaling Data-Constrained LMs").

Variables: N parameters, D data seen (cells_seen, or tokens), U unique data (train_cells).
Repeated epochs are worth less than fresh data, and parameters beyond what U unique
cells can use are worth less than parameters that can:

    R_D = max(D/U - 1, 0)                      (repetitions of the unique data)
    D'  = U + U R_D* (1 - exp(-R_D / R_D*))    (effective data)
    U_N = min(N, N_opt(U)),  N_opt(U) = (alpha A / (beta B))^(1/alpha) U^(beta/alpha)
    R_N = max(N/U_N - 1, 0)
    N'  = U_N + U_N R_N* (1 - exp(-R_N / R_N*))
    L   = E + A/N'^alpha + B/D'^beta

Muennighoff et al. fit (E, A, B, alpha, beta) on single-epoch runs first and then the
decay constants; here all seven are fitted jointly in the same LSE form as ``chinchilla``
(u = a, b, e, alpha, beta, log R_D*, log R_N*), so a table needs runs that repeat data
(D > U) and runs that do not. With no repetition the law equals ``chinchilla`` on (N, U).
"""

from __future__ import annotations

import itertools

import numpy as np

from cellscale.fit.laws.base import Law, log_floor_bounds, softmax_terms


def _effective(log_unique: np.ndarray, log_total: np.ndarray, log_rstar: float) -> np.ndarray:
    """log of U (1 + R* (1 - exp(-R/R*))) with R = max(total/unique - 1, 0)."""
    rep = np.maximum(np.exp(log_total - log_unique) - 1.0, 0.0)
    rstar = np.exp(log_rstar)
    return log_unique + np.log1p(rstar * -np.expm1(-rep / rstar))


class DataConstrained(Law):
    variables = ("N", "D", "U")
    default_x = ("params", "cells_seen", "train_cells")

    def __init__(self, with_floor: bool = True):
        self.with_floor = with_floor
        core = ("A", "B", "E", "alpha", "beta") if with_floor else ("A", "B", "alpha", "beta")
        ucore = ("a", "b", "e", "alpha", "beta") if with_floor else ("a", "b", "alpha", "beta")
        self.param_names = core + ("R_D_star", "R_N_star")
        self.u_names = ucore + ("log_R_D_star", "log_R_N_star")
        self.floor = "E" if with_floor else None
        self.name = "data-constrained" if with_floor else "data-constrained-no-floor"
        self.formula = "L = E + A/N'^alpha + B/D'^beta (Muennighoff et al. 2023)"
        if not with_floor:
            self.formula = "L = A/N'^alpha + B/D'^beta (Muennighoff et al. 2023, no floor)"

    def __reduce__(self):
        return (DataConstrained, (self.with_floor,))

    def _split(self, u):
        if self.with_floor:
            a, b, e, alpha, beta, lrd, lrn = u
        else:
            a, b, alpha, beta, lrd, lrn = u
            e = None
        return a, b, e, alpha, beta, lrd, lrn

    def log_predict(self, u, logX):
        return self.log_predict_many(np.asarray(u, dtype=float)[None, :], logX)[0]

    def log_predict_many(self, U, logX):
        """log L for every row of ``U`` in one broadcast pass (S, n): the start grid, and the 2k
        shifted rows of the numerical Jacobian (``Law.log_jac``), cost one pass instead of S."""
        U = np.asarray(U, dtype=float)
        cols = [U[:, i:i + 1] for i in range(U.shape[1])]
        a, b, e, alpha, beta, lrd, lrn = self._split(cols)
        log_n, log_d, log_u = logX[:, 0], logX[:, 1], logX[:, 2]
        log_d_eff = _effective(log_u, log_d, lrd)
        log_n_opt = (np.log(alpha) + a - np.log(beta) - b) / alpha + (beta / alpha) * log_u
        log_un = np.minimum(log_n, log_n_opt)
        log_n_eff = _effective(log_un, log_n, lrn)
        terms = [a - alpha * log_n_eff, b - beta * log_d_eff]
        if e is not None:
            terms.append(e)
        return softmax_terms(terms)[0]

    def to_natural(self, u):
        t = np.array(u, dtype=float)
        n_amp = 3 if self.with_floor else 2
        t[:n_amp] = np.exp(t[:n_amp])
        t[-2:] = np.exp(t[-2:])
        return t

    def from_natural(self, theta):
        u = np.array(theta, dtype=float)
        n_amp = 3 if self.with_floor else 2
        with np.errstate(divide="ignore"):
            u[:n_amp] = np.log(u[:n_amp])
            u[-2:] = np.log(u[-2:])
        return u

    def bounds(self, logy):
        amp = (-200.0, 300.0)
        # alpha, beta > 0 strictly: N_opt(U) divides by alpha.
        expo = (1e-3, 10.0)
        rstar = (np.log(1e-2), np.log(1e4))
        core = [amp, amp, log_floor_bounds(logy), expo, expo] if self.with_floor else [amp, amp, expo, expo]
        return core + [rstar, rstar]

    def start_grid(self, logX, logy):
        lo, hi = log_floor_bounds(logy)
        es = [min(max(e, lo), hi) for e in (hi - 2.0, hi - 0.5, hi - 0.1)]
        exps = (0.25, 0.5, 1.0)
        amps = (0.0, 5.0, 10.0, 20.0)
        rs = (np.log(5.0), np.log(15.0), np.log(50.0))
        grid = []
        for al, be, a, b, rd, rn in itertools.product(exps, exps, amps, amps, rs, rs):
            if self.with_floor:
                grid.extend([a, b, e, al, be, rd, rn] for e in es)
            else:
                grid.append([a, b, al, be, rd, rn])
        return np.array(grid, dtype=float)

    def no_floor(self):
        return DataConstrained(with_floor=False) if self.with_floor else None
