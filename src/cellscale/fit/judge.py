"""Can the points carry the law's floor? The fit's judgement of the points it was handed.

A fit's interval measures how well the law passes through its points, not whether the points
can carry a floor: a ladder whose top stopped falling (an under-trained largest size, say) gets a
floor a third of a percent wide that excludes every value a better-trained top could reach. So
the fit names what it sees (``fit.json`` ``judgement``), and with any flag the floor and its bits
are not given as a measurement (``floor_identified`` false; ``cellscale fit`` and the report say
why instead). Refusing rather than widening: the example of issue 26 (six sizes, three seeds, the
largest 0.6% worse than the one before it) fits c = 1.565 [1.556, 1.567] above the second-largest
size's mean, 1.558; an interval widened for lack of fit is still centred on a floor the points
bend towards, and under-training biases it, which no width of the interval repairs.

Flags (each computed where the table can tell; ``checked`` lists those that were):

- ``lack_of_fit``: with replicate seeds, the law's residuals against the seeds' own (pure) error,
  F = (SS_lof / df_lof) / (SS_pe / df_pe) in the fit's space; flagged at p < ``LOF_P``.
- ``top_not_falling``: a larger size's mean loss above a smaller size's by more than ``SPREAD_Z``
  standard errors of the difference (seed spread; one-variable laws, sizes with two seeds or more).
- ``not_falling``: the exponent at or below ``ALPHA_FLAT``, R^2 below ``R2_FLAT``, or the size means
  rising with size (Spearman rho > 0).
- ``floor_above_best``: the floor above the best configuration's mean loss.
"""

from __future__ import annotations

import numpy as np
import scipy.stats

LOF_P = 0.01
SPREAD_Z = 2.0
ALPHA_FLAT = 0.01
R2_FLAT = 0.1

FLAG_TEXT = {
    "lack_of_fit": "the law misses its points by more than the seeds' own spread (lack-of-fit F test)",
    "top_not_falling": "a larger size is worse than a smaller one beyond their seed spread: the top of the "
                       "ladder stopped falling (under-trained, or a rate off its optimum)",
    "not_falling": "the loss does not fall with size (exponent at 0, R^2 near 0, or the means rising)",
    "floor_above_best": "the floor lies above the best size's mean loss",
}


def _groups(X: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(configuration, its rows) per distinct row of X, in order of the first column."""
    keys, inverse = np.unique(X, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    order = np.argsort(keys[:, 0], kind="stable")
    return [(keys[g], inverse == g) for g in order]


def lack_of_fit(groups_space: list[np.ndarray], residuals: np.ndarray, n_params: int) -> dict | None:
    """The F test of the law against the pure error of replicates (values in the fit's space);
    None when the table has no replicates or no degrees of freedom for the lack of fit."""
    n, g = int(residuals.size), len(groups_space)
    df_pe, df_lof = n - g, g - n_params
    if df_pe <= 0 or df_lof <= 0:
        return None
    ss_pe = float(sum(((v - v.mean()) ** 2).sum() for v in groups_space))
    ss_lof = max(float((residuals**2).sum()) - ss_pe, 0.0)
    if ss_pe <= 0:
        return None
    f = (ss_lof / df_lof) / (ss_pe / df_pe)
    return {"F": f, "df": [df_lof, df_pe], "p": float(scipy.stats.f.sf(f, df_lof, df_pe))}


def rising_pairs(groups: list[tuple[np.ndarray, np.ndarray]]) -> list[list[float]]:
    """[smaller x, larger x] of the size pairs whose larger size is worse beyond ``SPREAD_Z``
    standard errors of the difference; sizes with fewer than two seeds are not judged."""
    stats = [(float(x[0]), v.mean(), v.std(ddof=1) / np.sqrt(v.size)) for x, v in groups if v.size >= 2]
    out = []
    for i, (xi, mi, si) in enumerate(stats):
        for xj, mj, sj in stats[i + 1:]:
            if mj - mi > SPREAD_Z * np.hypot(si, sj):
                out.append([xi, xj])
    return out


def judge(X: np.ndarray, y: np.ndarray, *, space_y: np.ndarray, residuals: np.ndarray, n_params: int,
          one_variable: bool, alpha: float | None, r2: float, floor: float | None) -> dict:
    """The ``judgement`` block. ``y`` and ``floor`` on one scale (the fitted one); ``space_y`` and
    ``residuals`` in the method's space (log y for a log-space method), for the lack-of-fit test."""
    rows = _groups(X)
    groups = [(x, y[r]) for x, r in rows]
    out: dict = {"flags": [], "checked": [], "lack_of_fit": None, "rising_pairs": None, "spearman_rho": None,
                 # what the lack-of-fit test needs: configurations with two rows or more, and more
                 # configurations than the law has parameters
                 "n_configs": len(rows), "n_replicated": sum(int(r.sum()) >= 2 for _, r in rows)}
    lof = lack_of_fit([space_y[r] for _, r in rows], residuals, n_params)
    if lof is not None:
        out["checked"].append("lack_of_fit")
        out["lack_of_fit"] = lof
        if lof["p"] < LOF_P:
            out["flags"].append("lack_of_fit")
    if one_variable and any(v.size >= 2 for _, v in groups):
        out["checked"].append("top_not_falling")
        out["rising_pairs"] = rising_pairs(groups)
        if out["rising_pairs"]:
            out["flags"].append("top_not_falling")
    out["checked"].append("not_falling")
    means = np.array([v.mean() for _, v in groups])
    if one_variable and means.size >= 3:
        out["spearman_rho"] = float(scipy.stats.spearmanr([float(x[0]) for x, _ in groups], means).statistic)
    flat = (alpha is not None and alpha <= ALPHA_FLAT) or not (r2 >= R2_FLAT)
    if flat or (out["spearman_rho"] is not None and out["spearman_rho"] > 0):
        out["flags"].append("not_falling")
    if floor is not None:
        out["checked"].append("floor_above_best")
        if floor > means.min():
            out["flags"].append("floor_above_best")
    # the fit adds two more reasons: the floor on its bound, its interval down to the bottom of its range
    out["floor_identified"] = floor is not None and not out["flags"]
    return out


def flag_lines(judgement: dict | None) -> list[str]:
    """One line per flag, in words."""
    return [FLAG_TEXT[f] for f in (judgement or {}).get("flags", [])]
