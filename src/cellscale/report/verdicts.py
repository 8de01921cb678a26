"""The verdict lines that open "What this means" (issue 26, part 5): at most five, one line each:
the best model against the baselines, whether the points are trained, whether the law fits its
points, whether a floor is identified, and the bits or why none are given. The prose follows."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from cellscale.report.fmt import floor_name, fmt_num
from cellscale.report.meaning import BASELINE_NAMES, best_model, chosen_runs, loss_words, worse_runs

__all__ = ["verdict_lines"]


def _best(best: dict[str, Any] | None, baselines: Mapping[str, float]) -> str:
    if best is None:
        return "Best model: none (no run finished with a finite validation loss)."
    known = {k: float(v) for k, v in baselines.items() if v is not None and math.isfinite(float(v))}
    beaten = [BASELINE_NAMES.get(k, k) for k, v in known.items() if best["mean"] < v]
    not_beaten = [BASELINE_NAMES.get(k, k) for k, v in known.items() if best["mean"] >= v]
    head = f"Best model: {best['size']}, {loss_words(str(best['column']))} {fmt_num(best['mean'])}"
    if not known:
        return head + "; no baseline was recorded."
    if not not_beaten:
        return head + ", below every baseline (" + ", ".join(beaten) + ")."
    return head + ", NOT below " + ", ".join(not_beaten) + (f" (below {', '.join(beaten)})" if beaten else "") + "."


def _trained(runs: pd.DataFrame) -> str:
    ok, dropped = chosen_runs(runs)
    at = " at their size's chosen rate" if dropped else ""
    flag = pd.to_numeric(ok["converged"], errors="coerce") if "converged" in ok else pd.Series(dtype=float)
    if flag.isna().all():
        return "Trained: not judged (convergence is read on the cooldown branches of the plateau budget)."
    n, conv = len(ok), int((flag == 1).sum())
    worse = len(worse_runs(ok))
    past = f", {worse} of them past their best (overfitting: their last doubling made them worse)" if worse else ""
    if conv == n:
        return (f"Trained: all {n} runs{at} converged (their last doublings of cells seen, cooled down, bought under the "
                f"tolerance; rule in the methods){past}.")
    return f"Trained: {conv} of {n} runs{at} converged{past}; the others were still improving when their budget ended."


def _law(fit: Mapping[str, Any]) -> str:
    judgement = fit.get("judgement") or {}
    flags = judgement.get("flags") or []
    r2 = fit.get("r2")
    r2_txt = f"R^2 {fmt_num(r2, 3)}" if r2 is not None and math.isfinite(float(r2)) else "R^2 n/a"
    if "lack_of_fit" in flags:
        return f"Law: misses its points by more than the seeds' own spread ({r2_txt}, lack-of-fit test)."
    if "not_falling" in flags:
        return f"Law: the loss does not fall with size ({r2_txt})."
    if "lack_of_fit" in (judgement.get("checked") or []):
        return f"Law: fits its points within the seeds' spread ({r2_txt})."
    if not judgement.get("n_replicated", 0):
        return f"Law: {r2_txt}; with one seed per size its fit cannot be tested against the seeds' spread."
    return (f"Law: {r2_txt}; with {judgement.get('n_configs')} sizes for its {len(fit.get('params') or {})} "
            "parameters its fit cannot be tested against the seeds' spread (it needs more sizes than parameters).")


def _floor_name(fit: Mapping[str, Any]) -> str | None:
    params = fit.get("params") or {}
    name = fit.get("floor_param") or floor_name(params)
    return name if name and name in params else None


def _not_identified(fit: Mapping[str, Any], name: str) -> str | None:
    """Why the fit's floor is no measurement (the fit's judgement), or None when it is one."""
    judgement = fit.get("judgement") or {}
    if fit.get("floor_at_boundary"):
        return "the estimate sits on the bound of its search range"
    if judgement.get("flags"):
        return ", ".join(f.replace("_", " ") for f in judgement["flags"])
    if judgement.get("floor_interval_reaches_bound"):
        lo, hi = (fit.get("ci95") or {}).get(name) or [None, None]
        return (f"{name} = {fmt_num(fit['params'][name])}, but its 95% interval runs from {fmt_num(lo)} to "
                f"{fmt_num(hi)}: down to the bottom of its range")
    return None


def _floor(fit: Mapping[str, Any]) -> str:
    name = _floor_name(fit)
    if name is None:
        return "Floor: none (this law has no floor)."
    why = _not_identified(fit, name)
    if why is not None:
        return f"Floor: not identified ({why})."
    lo, hi = (fit.get("ci95") or {}).get(name) or [None, None]
    unit = " bits" if fit.get("loss_unit") == "bits" else ""
    ci = f" [{fmt_num(lo)}, {fmt_num(hi)}]" if lo is not None and hi is not None else ""
    return f"Floor: {name} = {fmt_num(fit['params'][name])}{unit}{ci} (95%)."


def _bits(fit: Mapping[str, Any]) -> str:
    name = _floor_name(fit)
    if name is None or _not_identified(fit, name) is not None:
        return "Bits: none, as there is no identified floor to read them from."
    eb = fit.get("entropy_bits") or {}
    value = eb.get("likelihood") if eb.get("likelihood") is not None else eb.get("gaussian")
    if value is None:
        return "Bits: none (" + str(eb.get("note") or "no entropy from this fit") + ")."
    how = "the likelihood's floor, measured" if eb.get("likelihood") is not None else "a homoscedastic Gaussian reading"
    ci = eb.get("ci95") or [None, None]
    ci_txt = (f" [{fmt_num(ci[0], 3)}, {fmt_num(ci[1], 3)}]" if None not in ci
              else (f" [unbounded below, {fmt_num(ci[1], 3)}]" if ci[1] is not None else ""))
    return f"Bits: {fmt_num(value, 3)}{ci_txt} per masked gene ({how})."


def verdict_lines(runs: pd.DataFrame | None, fit: Mapping[str, Any] | None,
                  baselines: Mapping[str, float], *, prediction: str | None = None) -> list[str]:
    """The verdicts, in order (at most five); fewer when there is no run or no fit. ``baselines`` are on
    the cells and in the unit of the loss the best model is scored by (``best_model``). ``prediction``:
    how well the data axis's joint law predicts (``report.data_axis.prediction_clause``), said on the
    "Law:" line, as whether a law holds is one verdict."""
    best = best_model(runs) if runs is not None else None
    out = [_best(best, baselines)]
    if runs is not None and not runs.empty:
        out.append(_trained(runs))
    tail = f" {prediction}" if prediction else ""
    if not fit or fit.get("error") or not fit.get("params"):
        return out + ["Law: none fitted" + (f" ({fit['error']})" if fit and fit.get("error") else "") + "." + tail]
    return out + [_law(fit) + tail, _floor(fit), _bits(fit)]
