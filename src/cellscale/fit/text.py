"""A fit as lines for people: what ``cellscale fit`` and ``cellscale run`` print.

Needs nothing but the ``FitResult.to_dict()`` (or a ``fit.json``), so printing a fit imports
neither torch nor the report.
"""

from __future__ import annotations

from typing import Any

from cellscale.fit.judge import flag_lines

__all__ = ["format_fit"]


def format_fit(fit: dict[str, Any]) -> list[str]:
    """Human-readable lines for a ``FitResult.to_dict()`` (or a fit.json with an error)."""
    if fit.get("error"):
        return [f"fit: not possible ({fit['error']})"]
    if not fit.get("params"):
        return []
    parts = []
    for name, value in fit["params"].items():
        lo, hi = (fit.get("ci95") or {}).get(name) or (None, None)
        ci = f" [{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None else ""
        parts.append(f"{name}={value:.4g}{ci}")
    lines = [f"fit ({fit.get('law')}, {fit.get('method')}, n={fit.get('n_points')}, "
             f"R^2={fit.get('r2', float('nan')):.3f}): " + ", ".join(parts)]
    lines += _interval_lines(fit)
    judgement = fit.get("judgement") or {}
    lines += [f"warning: {text}" for text in flag_lines(judgement)]
    if fit.get("floor_at_boundary"):
        lines.append("warning: the floor estimate sits on its bound: the data do not pin it down")
    elif judgement.get("floor_identified") is False and fit.get("floor_param"):
        why = "" if judgement.get("flags") else " (its 95% interval reaches the bottom of its range)"
        lines.append(f"floor: not identified by these points{why}, so neither {fit['floor_param']} nor its bits are a "
                     "measurement (its bracket above is the law's through them)")
    else:
        lines += _entropy_lines(fit.get("entropy_bits") or {})
    return lines


# the entropy a fitted floor implies, by what it is measured under: the first one present is shown
_ENTROPY_KINDS = (("likelihood", "likelihood floor, measured"), ("gaussian", "homoscedastic Gaussian"))


def _entropy_lines(ent: dict[str, Any]) -> list[str]:
    for key, what in _ENTROPY_KINDS:
        if ent.get(key) is not None:
            ci = ent.get("ci95") or [None, None]
            ci_txt = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if None not in ci else ""
            return [f"entropy per masked gene ({what}): {ent[key]:.3f} bits{ci_txt}"]
    return []


def _interval_lines(fit: dict[str, Any]) -> list[str]:
    """Which interval method gave the brackets, and the resamples that failed (flagged past 5%)."""
    if not fit.get("interval"):
        return []
    line = f"intervals: {fit['interval']} ({fit.get('ci_method', '')})"
    failed, n = fit.get("bootstrap_failed") or 0, fit.get("bootstrap") or 0
    if failed:
        line += f"; {failed} of {n} resamples failed to fit"
    out = [line]
    off = fit.get("estimate_outside_interval") or []
    if off:
        out.append(f"warning: the estimate of {', '.join(off)} lies outside its interval: the interval is the "
                   "Gaussian fit's (centred on least squares), and outliers pull that fit away from this one; "
                   "refit with interval='residual-t' (cellscale.fit.fit_table)")
    if fit.get("bootstrap_unreliable"):
        out.append(f"warning: more than 5% of the bootstrap resamples failed ({failed} of {n}): "
                   "the intervals that rest on them are unreliable")
    return out
