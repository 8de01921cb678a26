"""Report figures of the downstream scores: the loss law beside the downstream law, and the
downstream score against the validation loss. Pure functions to a matplotlib ``Figure``, as in
``plots``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from cellscale.report.plots import (
    Curve,
    RefLine,
    _finished_and_not,
    _law_curve,
    _loss_y,
    _message,
    _ref_lines,
    _run_points,
    size_colors,
)

__all__ = ["loss_and_downstream", "downstream_vs_loss"]


def _panel(ax, runs: pd.DataFrame, *, y: str, curve: Curve | None, refs: Sequence[RefLine], ylabel: str,
           title: str, log_y: bool = True) -> None:
    """One panel against log parameters: the runs, the law's curve and band, reference lines; a
    log y axis, or (``log_y`` False, for an error in [0, 1]) a linear one from 0."""
    good, bad = _finished_and_not(runs, "params", y)
    if good.empty:
        _message(ax, "no finished run with this score")
        ax.set_title(title, fontsize=10)
        return
    _run_points(ax, good, bad, "params", y)
    ys = list(good[y]) + [r.value for r in refs if r.value is not None and np.isfinite(r.value)]
    xlo, xhi = good["params"].min() / 2.0, good["params"].max() * 2.0
    if curve is not None and len(curve.x):
        _law_curve(ax, curve)
        ys += [v for v in curve.y if np.isfinite(v)]
        xlo, xhi = min(xlo, float(np.min(curve.x))), max(xhi, float(np.max(curve.x)))
    _ref_lines(ax, refs, lw=1.3, zorder=2)
    ax.set_xscale("log")
    ax.set_xlim(xlo, xhi)
    ys = np.asarray(ys, dtype=float)
    if ys.size and log_y:
        _loss_y(ax, ys, 1.1)  # log, or linear for a loss in bits below zero
    elif ys.size:
        ax.set_ylim(0.0, min(1.05, ys.max() * 1.1))
    ax.set_xlabel("parameters (total, incl. gene embeddings)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.85)


def loss_and_downstream(runs: pd.DataFrame, *, loss_col: str, loss_curve: Curve | None, error_curve: Curve | None,
                        loss_refs: Sequence[RefLine] = (), error_refs: Sequence[RefLine] = (),
                        loss_label: str = "best validation MSE (masked genes)") -> Figure:
    """Left: the validation loss against parameters with its law; right: the downstream error
    (1 - probe macro-F1 on the validation cells, column ``downstream_error``) with its law."""
    fig = Figure(figsize=(12.0, 4.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    _panel(left, runs, y=loss_col, curve=loss_curve, refs=loss_refs, ylabel=loss_label,
           title="Validation loss against model size")
    _panel(right, runs, y="downstream_error", curve=error_curve, refs=error_refs,
           ylabel="downstream error, 1 - probe macro-F1 (val)", title="Downstream error against model size",
           log_y=False)
    return fig


def downstream_vs_loss(runs: pd.DataFrame, *, loss_col: str, refs: Sequence[RefLine] = (),
                       loss_label: str = "best validation MSE (masked genes)") -> Figure:
    """Probe macro-F1 (validation) against the run's validation loss, one point per run, coloured
    by size; horizontal lines: the reference embeddings' macro-F1."""
    fig = Figure(figsize=(9.0, 4.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    df = runs.copy()
    df[loss_col] = pd.to_numeric(df[loss_col], errors="coerce")
    df["probe_val_f1"] = pd.to_numeric(df["probe_val_f1"], errors="coerce")
    df = df[np.isfinite(df[loss_col]) & np.isfinite(df["probe_val_f1"])]
    if df.empty:
        _message(ax, "no run with both a validation loss and a probe score")
        return fig
    colors = size_colors(df.groupby("size")["params"].median().to_dict())
    for name, grp in df.groupby("size", sort=False):
        ax.scatter(grp[loss_col], grp["probe_val_f1"], s=36, color=colors[str(name)], edgecolor="black",
                   linewidths=0.4, zorder=4, label=str(name))
        if "knn_val_f1" in grp:
            ax.scatter(grp[loss_col], pd.to_numeric(grp["knn_val_f1"], errors="coerce"), s=30, marker="^",
                       facecolor="none", edgecolor=colors[str(name)], linewidths=1.0, zorder=3)
    for ref in refs:
        if ref.value is not None and np.isfinite(ref.value):
            ax.axhline(ref.value, color=ref.color, ls=ref.style, lw=1.3, label=ref.label, zorder=2)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))  # losses span well under a decade
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.invert_xaxis()  # lower loss to the right: "better" points the same way on both axes
    ax.set_xlabel(loss_label + " (log, decreasing to the right)")
    ax.set_ylabel("probe macro-F1 on the validation cells")
    ax.set_title("Downstream score against validation loss (dots: probe; open triangles: kNN transfer)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig
