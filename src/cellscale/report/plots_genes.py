"""Report figures in bits and per gene: the entropy estimate with its interval, and each run's
per-gene test errors. Pure functions to a matplotlib ``Figure``, as in ``plots``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from cellscale.report.plots import _message, size_colors

__all__ = ["entropy_summary", "GeneErrors", "per_gene_errors"]


def entropy_summary(
    bits: float | None,
    ci95: Sequence[float] | None = None,
    *,
    refs: Mapping[str, float] | None = None,
    title: str = "Entropy per masked gene (homoscedastic Gaussian)",
) -> Figure:
    """A one-row dot-and-interval chart of the entropy estimate, with optional reference values
    in bits (e.g. the gene-mean baseline's or the Bayes floor's Gaussian entropy)."""
    fig = Figure(figsize=(9.0, 2.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rows: list[tuple[str, float, Sequence[float] | None]] = []
    if bits is not None and np.isfinite(bits):
        rows.append(("fitted floor c", float(bits), ci95))
    for name, val in (refs or {}).items():
        if val is not None and np.isfinite(val):
            rows.append((name, float(val), None))
    if not rows:
        _message(ax, "no entropy estimate (no fit)")
        ax.set_axis_off()
        return fig
    cmap = colormaps["tab10"]
    for i, (name, val, ci) in enumerate(rows):
        color = cmap(i)
        _interval_bar(ax, val, ci, i, color)
        ax.plot([val], [i], "o", color=color, ms=8)
        ax.annotate(f"{val:.3f} bits", (val, i), textcoords="offset points", xytext=(8, 6), fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("bits per masked gene, 0.5 log2(2 pi e MSE)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", alpha=0.25)
    return fig


def _interval_bar(ax, val: float, ci: Sequence[float | None] | None, row: int, color) -> None:
    """The interval as a bar; one with no lower end (a floor interval reaching 0) runs off to the
    left with an arrow, labelled unbounded."""
    if ci is None or len(ci) != 2:
        return
    lo, hi = (np.nan if v is None else float(v) for v in ci)
    if np.isfinite(lo) and np.isfinite(hi):
        ax.plot([lo, hi], [row, row], color=color, lw=4, alpha=0.5, solid_capstyle="butt")
    elif np.isfinite(hi):
        left = val - 2.0 * max(hi - val, 0.25)
        ax.plot([left, hi], [row, row], color=color, lw=4, alpha=0.5, solid_capstyle="butt")
        ax.plot([left], [row], "<", color=color, ms=9)
        ax.annotate("95% CI unbounded below", (left, row), textcoords="offset points", xytext=(4, -12), fontsize=7)


@dataclass(frozen=True)
class GeneErrors:
    """One run's per-gene test MSEs (NaN where a gene was never masked)."""

    run_id: str
    size: str
    params: float
    genes: Sequence[str]
    mse: np.ndarray


def _log_y_plain(ax) -> None:
    """Log y axis ticked at 1, 2 and 5 per decade, labelled as plain numbers."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _named_genes(ax, best: GeneErrors, order: np.ndarray, rank: np.ndarray, vals: np.ndarray, k: int) -> None:
    """Mark the ``k`` hardest and easiest genes and list their names."""
    for idx, color, label, side in ((slice(len(order) - k, None), "#d62728", "hardest", "right"),
                                    (slice(0, k), "#2ca02c", "easiest", "left")):
        ax.scatter(rank[idx], vals[idx], color=color, s=22, zorder=4, label=f"{k} {label}")
        names = [str(best.genes[g]) for g in order[idx]]
        if label == "hardest":
            names = names[::-1]  # hardest first
        text = f"{label}:\n" + "\n".join(names)
        x = 0.98 if side == "right" else 0.02
        y, va = (0.5, "center") if side == "right" else (0.97, "top")
        ax.text(x, y, text, transform=ax.transAxes, ha=side, va=va, fontsize=7, color=color,
                family="monospace", bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})


def _sorted_genes_panel(ax, best: GeneErrors | None, n_named: int) -> None:
    if best is None:
        _message(ax, "no per-gene errors recorded (per_gene.json)")
        ax.set_axis_off()
        return
    mse = np.asarray(best.mse, float)
    ok = np.flatnonzero(np.isfinite(mse))
    order = ok[np.argsort(mse[ok], kind="stable")]
    vals = mse[order]
    rank = np.arange(1, len(order) + 1)
    ax.plot(rank, vals, color="#1f77b4", lw=1.6, label=f"{best.run_id} ({len(order)} genes)")
    _named_genes(ax, best, order, rank, vals, min(n_named, len(order) // 2) if len(order) > 1 else len(order))
    if len(vals) and np.all(vals > 0):
        _log_y_plain(ax)
    ax.set_xlabel("gene rank (easiest to hardest)")
    ax.set_ylabel("test MSE of the gene (masked positions)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"best run {best.run_id}: sorted per-gene test MSE", fontsize=10)


def _spread_panel(ax, runs: Sequence[GeneErrors]) -> bool:
    """A box of per-gene MSE per run, by size; False when no run has per-gene errors."""
    usable = [r for r in runs if np.isfinite(np.asarray(r.mse, float)).any()]
    if not usable:
        _message(ax, "no run with per-gene errors")
        ax.set_axis_off()
        return False
    usable = sorted(usable, key=lambda r: (r.params, r.run_id))
    colors = size_colors({r.size: r.params for r in usable})
    data = [np.asarray(r.mse, float)[np.isfinite(np.asarray(r.mse, float))] for r in usable]
    box = ax.boxplot(data, vert=True, patch_artist=True, showfliers=True, widths=0.6,
                     flierprops={"markersize": 2, "alpha": 0.5}, medianprops={"color": "black"})
    for patch, r in zip(box["boxes"], usable):
        patch.set_facecolor(colors[r.size])
        patch.set_alpha(0.75)
    ax.set_xticks(range(1, len(usable) + 1), [r.run_id for r in usable], rotation=60, ha="right", fontsize=7)
    allv = np.concatenate(data)
    if allv.size and np.all(allv > 0):
        _log_y_plain(ax)
    ax.set_ylabel("per-gene test MSE")
    ax.set_title("spread of per-gene test MSE, every run (by size)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    return True


def per_gene_errors(best: GeneErrors | None, runs: Sequence[GeneErrors] = (), *, n_named: int = 10,
                    title: str = "Per-gene test error") -> Figure:
    """Left: the best run's per-gene test MSE sorted from easiest to hardest, the ``n_named``
    hardest and easiest genes marked and named. Right: the spread of per-gene MSE of every run
    (a box per run, ordered by size, coloured by size)."""
    fig = Figure(figsize=(12.0, 5.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_runs = fig.subplots(1, 2, width_ratios=[1.15, 1.0])
    _sorted_genes_panel(ax, best, n_named)
    if _spread_panel(ax_runs, runs):
        fig.suptitle(title)
    return fig
