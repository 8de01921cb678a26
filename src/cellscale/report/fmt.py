"""Number formatting shared by the report's text, tables and figure labels."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def fmt_int(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return "n/a"
    return f"{int(round(f)):,}"


def fmt_num(v: Any, digits: int = 4) -> str:
    """Compact significant-digit formatting; 'n/a' for None/NaN."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a" if v is None else str(v)
    if not math.isfinite(f):
        return "n/a"
    if f != 0 and (abs(f) >= 1e6 or abs(f) < 1e-4):
        return f"{f:.{digits - 1}e}"
    return f"{f:.{digits}g}"


def floor_name(params: Mapping[str, Any]) -> str | None:
    """The name of the irreducible-loss parameter of a law (c for power-floor, E for chinchilla)."""
    for k in ("c", "E", "e_floor", "floor"):
        if k in params:
            return k
    return None


def resample_failures(d: dict, n_boot: int) -> str:
    """How many of ``n_boot`` resamples failed to fit, and why, from a fit.json; "" when none failed."""
    failed = d.get("bootstrap_failed")
    if not failed:
        return ""
    text = f"{fmt_int(failed)} of {fmt_int(n_boot)} resamples failed to fit"
    reasons = d.get("bootstrap_failures") or {}
    if reasons:
        text += " (" + "; ".join(f"{r}: {fmt_int(c)}" for r, c in reasons.items()) + ")"
    return text
