"""Compute-optimal allocation under ``chinchilla``: how to split a compute budget C.

Minimising E + A/N^alpha + B/D^beta subject to C = k N D gives (Hoffmann et al. 2022)
    N*(C) = G (C/k)^(beta/(alpha+beta)),  D*(C) = (C/k)^(alpha/(alpha+beta)) / G,
    G = (alpha A / (beta B))^(1/(alpha+beta)).
k is 6 for the usual transformer estimate (2 forward + 4 backward FLOPs per parameter and
datum); cellscale runs record their actual training FLOPs, so when the table has a
``flops`` column k is the median of flops / (N D) over the fitted runs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DEFAULT_K = 6.0


def flops_constant(frame: pd.DataFrame, X: np.ndarray, x_cols: list[str]) -> tuple[float, str]:
    if "flops" in frame.columns:
        flops = pd.to_numeric(frame["flops"], errors="coerce").to_numpy(dtype=float)
        ratio = flops / (X[:, 0] * X[:, 1])
        ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
        if ratio.size:
            return float(np.median(ratio)), f"median(flops / ({x_cols[0]} * {x_cols[1]})) over the fitted runs"
    return DEFAULT_K, "6 (no usable 'flops' column: the standard 6 N D estimate)"


def scale_g(A, B, alpha, beta):
    """G of the module doc's closed form, elementwise."""
    return (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))


def allocation(A, B, alpha, beta, C, k: float):
    """(N*(C), D*(C)) of the module doc's closed form, elementwise (numpy broadcasting)."""
    G = scale_g(A, B, alpha, beta)
    return G * (C / k) ** (beta / (alpha + beta)), (C / k) ** (alpha / (alpha + beta)) / G


def _allocation(theta: np.ndarray, C: np.ndarray, k: float):
    A, B, _, alpha, beta = (theta[..., i, None] for i in range(5))
    return allocation(A, B, alpha, beta, C, k)


def _loss(theta: np.ndarray, N, D):
    A, B, E, alpha, beta = theta
    return E + A / N**alpha + B / D**beta


def sufficient_size(theta: np.ndarray, D: float, tol: float, unit: str = "mse") -> np.ndarray:
    """Smallest N at which doubling N gains less than tol, a gain read as the convergence rule
    reads one (``cellscale.rules.plateau.doubling_gain``).

    The fall of a doubling is A N^-alpha (1 - 2^-alpha). For an MSE, setting it equal to tol
    times the loss it falls towards gives N in closed form (NaN where every doubling already gains
    less). For bits the gain 2^(2 fall) - 1 is at most tol where the fall is at most
    0.5 log2(1 + tol), whatever the floor's sign: N = (A (1 - 2^-alpha) / that)^(1/alpha).
    """
    theta = np.atleast_2d(theta)
    A, B, E, alpha, beta = (theta[:, i] for i in range(5))
    with np.errstate(all="ignore"):
        if unit == "bits":
            return (A * (1 - 2.0 ** -alpha) / (0.5 * np.log2(1 + tol))) ** (1.0 / alpha)
        margin = (1 - 2.0 ** -alpha) - tol
        n = (A * margin / (tol * (E + B * D ** -beta))) ** (1.0 / alpha)
    return np.where(margin > 0, n, np.nan)


def _ci(values: np.ndarray) -> list:
    ok = values[np.isfinite(values)]
    if ok.size == 0:
        return [None, None]
    return [float(np.percentile(ok, 2.5)), float(np.percentile(ok, 97.5))]


def compute_optimal(theta: np.ndarray, samples: np.ndarray, *, X: np.ndarray, frame: pd.DataFrame,
                    x_cols: list[str], tolerance: float, unit: str = "mse") -> dict:
    k, k_source = flops_constant(frame, X, x_cols)
    C_runs = k * X[:, 0] * X[:, 1]
    lo = np.floor(np.log10(C_runs.min()))
    hi = np.ceil(np.log10(C_runs.max())) + 2
    step = max(1.0, np.ceil((hi - lo) / 11))
    C = 10.0 ** np.arange(lo, hi + step / 2, step)
    n_opt, d_opt = _allocation(theta, C, k)
    n_opt, d_opt = n_opt.ravel(), d_opt.ravel()
    ok = np.all(np.isfinite(samples), axis=1) if samples.size else np.zeros(0, bool)
    boot = samples[ok]
    if boot.shape[0]:
        n_s, d_s = _allocation(boot, C, k)
    rows = []
    for i, c in enumerate(C):
        row = {
            "C": float(c),
            "N_opt": float(n_opt[i]),
            "D_opt": float(d_opt[i]),
            "data_per_param": float(d_opt[i] / n_opt[i]),
            "loss": float(_loss(theta, n_opt[i], d_opt[i])),
        }
        if boot.shape[0]:
            row["N_opt_ci95"] = _ci(n_s[:, i])
            row["D_opt_ci95"] = _ci(d_s[:, i])
            row["data_per_param_ci95"] = _ci(d_s[:, i] / n_s[:, i])
        rows.append(row)
    A, B, E, alpha, beta = theta
    D_budget = float(X[:, 1].max())
    n_suff = sufficient_size(theta, D_budget, tolerance, unit)[0]
    fixed = {
        "D": D_budget,
        "tolerance": tolerance,
        "definition": (
            "smallest N where doubling N gains less than tolerance at this D (a gain as the convergence "
            "rule reads one: relative for an MSE, of the Gaussian-equivalent variance for bits); D is the "
            "largest data size in the table"
        ),
        "N_sufficient": None if not np.isfinite(n_suff) else float(n_suff),
        "N_sufficient_ci95": _ci(sufficient_size(boot, D_budget, tolerance, unit)) if boot.shape[0] else [None, None],
    }
    return {
        "C_definition": f"C = k * {x_cols[0]} * {x_cols[1]}, k = {k:.6g}",
        "k": k,
        "k_source": k_source,
        "N_opt_exponent": float(beta / (alpha + beta)),
        "D_opt_exponent": float(alpha / (alpha + beta)),
        "G": float(scale_g(A, B, alpha, beta)),
        "table": rows,
        "fixed_data": fixed,
    }
