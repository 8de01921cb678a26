"""Report figures: pure functions from data to a matplotlib ``Figure``.

Nothing here reads or writes files, and nothing touches pyplot's global state: every figure
is a ``matplotlib.figure.Figure`` with an Agg canvas, so the functions are safe headless and
in threads. ``figure_png(fig)`` turns a figure into PNG bytes for the writer.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

from cellscale.fit.compute_optimal import allocation

__all__ = [
    "Curve",
    "Floor",
    "RefLine",
    "loss_vs_params",
    "learning_curves",
    "loss_vs_data",
    "loss_vs_depth",
    "compute_frontier",
    "IsoFlop",
    "isoflop_profiles",
    "figure_png",
    "size_colors",
    "loss_vs_lr",
]

_STATUS_STYLE = {
    "diverged": dict(marker="x", color="#d62728", s=60, linewidths=2, zorder=5),
}


@dataclass(frozen=True)
class Curve:
    """A fitted law evaluated on a grid, with an optional pointwise band."""

    x: np.ndarray
    y: np.ndarray
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    label: str = "fit"


@dataclass(frozen=True)
class Floor:
    """An irreducible-loss estimate with its interval (lo/hi may be None)."""

    value: float
    lo: float | None = None
    hi: float | None = None
    label: str = "fitted floor c"
    at_boundary: bool = False


@dataclass(frozen=True)
class RefLine:
    """A horizontal reference line, e.g. the gene-mean baseline."""

    value: float
    label: str
    color: str = "#444444"
    style: str = "--"


# how a results column reads on an axis
_LOSS_LABELS = {"best_val_mse": "best validation MSE (masked genes)",
                "best_val_loss": "best validation loss (bits per masked gene)",
                "test_mse": "test MSE (masked genes; checkpoint and rate chosen on validation)",
                "test_loss": "test loss (bits per masked gene; chosen on validation)"}


def loss_label(column: str) -> str:
    return _LOSS_LABELS.get(column, column)


def _new_figure(w: float = 9.0, h: float = 4.8) -> tuple[Figure, object]:
    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    return fig, ax


def _plain_log_y(ax, lo: float, hi: float) -> None:
    """Log y axis with a handful of plain-number ticks (losses span well under a decade)."""
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    if hi / lo < 20:
        ticks = [t for t in MaxNLocator(nbins=7).tick_values(lo, hi) if lo <= t <= hi and t > 0]
        if len(ticks) >= 2:
            ax.yaxis.set_major_locator(FixedLocator(ticks))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())


def _loss_y(ax, values, pad: float) -> None:
    """The loss axis over the finite ``values``: log with plain ticks when all are positive, linear
    when any is not (a gaussian-nll loss in bits is a differential entropy and may be negative)."""
    ys = np.asarray(values, dtype=float)
    ys = ys[np.isfinite(ys)]
    if not ys.size:
        return
    if ys.min() > 0:
        _plain_log_y(ax, ys.min() / pad, ys.max() * pad)
        return
    margin = (pad - 1.0) * max(float(np.ptp(ys)), abs(float(ys.max())), 1e-9)
    ax.set_ylim(ys.min() - margin, ys.max() + margin)


def _legend_outside(ax, **kw) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0.0, framealpha=0.9, **kw)


def figure_png(fig: Figure, *, dpi: int = 110) -> bytes:
    """PNG bytes of ``fig`` (white background, no file I/O)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def size_colors(params: Mapping[str, float]) -> dict[str, tuple]:
    """One colour per size name, ordered along viridis by (log) parameter count."""
    names = sorted(params, key=lambda k: params[k])
    cmap = colormaps["viridis"]
    n = len(names)
    return {name: cmap(0.9 * i / max(n - 1, 1)) for i, name in enumerate(names)}


def _message(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes,
            fontsize=11, color="#555555", wrap=True)


def _ref_lines(ax, refs: Sequence[RefLine], **style: Any) -> list[float]:
    """Draw the finite reference lines (``style``: line width, z-order); return their values."""
    drawn = []
    for ref in refs:
        if ref.value is not None and np.isfinite(ref.value):
            ax.axhline(ref.value, color=ref.color, ls=ref.style, label=ref.label, **style)
            drawn.append(ref.value)
    return drawn


def _finished_and_not(runs: pd.DataFrame, x: str, y: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ok runs, other runs), each with a positive finite ``x`` and a finite ``y``."""
    df = runs.copy()
    if "status" not in df:
        df["status"] = "ok"
    df[x] = pd.to_numeric(df.get(x), errors="coerce")
    df[y] = pd.to_numeric(df.get(y), errors="coerce")
    finite = np.isfinite(df[x]) & np.isfinite(df[y]) & (df[x] > 0)
    return df[(df["status"] == "ok") & finite], df[(df["status"] != "ok") & finite]


def _visible_floor(ax, floor: Floor | None, data_min: float) -> Floor | None:
    """The floor when it lies near the runs (above 0.3 x the least loss; for losses that reach 0 or
    below, within one unit of it); far below them it is named in a corner instead, so that an
    undetermined floor does not flatten the plot."""
    near = 0.3 * data_min if data_min > 0 else data_min - 1.0
    if floor is None or (np.isfinite(floor.value) and floor.value > near):
        return floor
    ax.text(0.01, 0.02, f"{floor.label}: below the plotted range", transform=ax.transAxes,
            fontsize=8, color="#9467bd")
    return None


def _run_points(ax, good: pd.DataFrame, bad: pd.DataFrame, x: str, y: str) -> None:
    """A dot per ok run (seeds of a size jittered), the per-size mean and range, failed runs as crosses."""
    colors = size_colors(good.groupby("size")[x].median().to_dict() if not good.empty else {})
    rng = np.random.default_rng(0)
    for name, grp in good.groupby("size", sort=False):
        # a small horizontal jitter so that seeds of one size do not hide each other
        jitter = 10 ** rng.uniform(-0.02, 0.02, len(grp)) if len(grp) > 1 else np.ones(1)
        ax.scatter(grp[x] * jitter, grp[y], s=28, color=colors[name], edgecolor="black",
                   linewidths=0.4, alpha=0.85, zorder=4, label=str(name))
    if not good.empty:
        stats = good.groupby("size").agg(px=(x, "median"), mean=(y, "mean"), lo=(y, "min"),
                                         hi=(y, "max"), n=(y, "size")).sort_values("px")
        ax.errorbar(stats["px"], stats["mean"],
                    yerr=[stats["mean"] - stats["lo"], stats["hi"] - stats["mean"]],
                    fmt="_", color="black", ms=14, capsize=4, lw=1.2, zorder=3,
                    label="mean over seeds (bar: min-max)")
    if not bad.empty:
        ax.scatter(bad[x], bad[y], label="diverged / failed (not fitted)", **_STATUS_STYLE["diverged"])


def _law_curve(ax, curve: Curve) -> None:
    if curve.lo is not None and curve.hi is not None:
        ax.fill_between(curve.x, curve.lo, curve.hi, color="#1f77b4", alpha=0.18, lw=0,
                        label="95% band of the fit", zorder=1)
    ax.plot(curve.x, curve.y, color="#1f77b4", lw=2, label=curve.label, zorder=2)


def _floor_band(ax, floor: Floor) -> None:
    ax.axhline(floor.value, color="#9467bd", lw=1.5, ls="-.", zorder=2,
               label=floor.label + (" (at search bound!)" if floor.at_boundary else ""))
    if floor.lo is not None and floor.hi is not None:
        # a positive floor is drawn on a log axis: its interval is cut at a tiny positive number
        lo = max(floor.lo, 1e-12) if floor.value > 0 else floor.lo
        ax.axhspan(lo, floor.hi, color="#9467bd", alpha=0.15, lw=0,
                   label="floor 95% interval", zorder=0)


def _empty_log_log(fig: Figure, ax, text: str, title: str) -> Figure:
    _message(ax, text)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(title)
    return fig


def loss_vs_params(
    runs: pd.DataFrame,
    *,
    curve: Curve | None = None,
    floor: Floor | None = None,
    refs: Sequence[RefLine] = (),
    x: str = "params",
    y: str = "best_val_mse",
    title: str = "Validation loss against model size",
) -> Figure:
    """Log-log loss against parameters: one point per run, per-size seed spread, the fitted law
    with its band, the floor with its interval, and horizontal reference lines.

    ``runs`` needs columns ``x``, ``y``, ``size`` and ``status``; runs whose status is not
    ``ok`` are drawn as red crosses when they have a finite loss (they are not fitted).
    """
    fig, ax = _new_figure()
    good, bad = _finished_and_not(runs, x, y)
    # the view is set by the runs, the references and the floor estimate
    all_y = list(good[y]) + list(bad[y]) + [r.value for r in refs]
    floor = _visible_floor(ax, floor, min(list(good[y]) + list(bad[y]), default=np.nan))
    if floor is not None:
        all_y.append(floor.value)
    if good.empty and bad.empty:
        return _empty_log_log(fig, ax, "no finished run with a finite validation loss", title)
    _run_points(ax, good, bad, x, y)
    xs_all = np.concatenate([good[x].to_numpy(), bad[x].to_numpy()])
    xlo, xhi = xs_all.min() / 2.0, xs_all.max() * 2.0
    if curve is not None and len(curve.x):
        _law_curve(ax, curve)
        all_y += list(curve.y)
        xlo, xhi = min(xlo, np.min(curve.x)), max(xhi, np.max(curve.x))
    if floor is not None and np.isfinite(floor.value):
        _floor_band(ax, floor)
    _ref_lines(ax, refs, lw=1.3, zorder=2)
    ax.set_xscale("log")
    ax.set_xlim(xlo, xhi)
    _loss_y(ax, all_y, 1.06)
    ax.set_xlabel("parameters (total, incl. gene embeddings)" if x == "params" else x)
    ax.set_ylabel(loss_label(y))
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", axis="x", alpha=0.12)
    _legend_outside(ax)
    return fig


def _train_points(m: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """The training-loss points of one run, averaged down to at most ``max_points``."""
    tr = m[(m["kind"] == "train")]
    if "loss" not in tr or "cells_seen" not in tr:
        return tr.iloc[:0]
    tr = tr[np.isfinite(pd.to_numeric(tr["loss"], errors="coerce")) & (tr["cells_seen"] > 0)]
    if len(tr) > max_points:  # average consecutive steps: a readable faint curve, a small PNG
        chunks = np.array_split(np.arange(len(tr)), max_points)
        tr = pd.DataFrame({"cells_seen": [tr["cells_seen"].iloc[c].mean() for c in chunks],
                           "loss": [tr["loss"].iloc[c].mean() for c in chunks]})
    return tr


def _eval_points(m: pd.DataFrame, val: str) -> pd.DataFrame:
    ev = m[(m["kind"] == "eval")]
    if val not in ev or "cells_seen" not in ev:
        return ev.iloc[:0]
    return ev[np.isfinite(pd.to_numeric(ev[val], errors="coerce")) & (ev["cells_seen"] > 0)]


@dataclass
class _Run:
    size: str
    status: str
    color: Any


def _run_info(rid: str, info: pd.DataFrame, colors: Mapping[str, Any]) -> _Run:
    size = str(info.loc[rid, "size"]) if rid in info.index else rid
    status = str(info.loc[rid, "status"]) if rid in info.index and "status" in info else "ok"
    return _Run(size, status, colors.get(size, "#777777"))


def _size_legend(ax, params: Mapping[str, float]) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        order = sorted(range(len(labels)), key=lambda i: params.get(labels[i], float("inf")))
        ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8,
                  title="size (dotted: not ok)", title_fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def learning_curves(
    metrics: Mapping[str, pd.DataFrame],
    runs: pd.DataFrame,
    *,
    refs: Sequence[RefLine] = (),
    max_points: int = 300,
    val: str = "val_mse",
    ylabel: str = "MSE on masked genes",
    title: str = "Learning curves (validation MSE solid, training loss faint)",
) -> Figure:
    """Validation loss (column ``val``) against cells seen for every run, training loss faint.

    ``metrics`` maps run_id to a frame of ``metrics.jsonl`` lines (columns ``kind``,
    ``cells_seen``, ``loss``, and ``val``: ``val_mse``, or ``val_bits`` for a likelihood
    objective, whose training loss is in bits too); ``runs`` supplies ``run_id``, ``size``,
    ``params`` and ``status`` for colours and labels.
    """
    fig, ax = _new_figure()
    info = runs.set_index("run_id") if "run_id" in runs else pd.DataFrame()
    params = {str(info.loc[rid, "size"]): float(pd.to_numeric(info.loc[rid, "params"], errors="coerce") or 0)
              for rid in metrics if rid in info.index}
    colors = size_colors(params)
    seen_labels: set[str] = set()
    ys_all: list[float] = []
    for rid, m in metrics.items():
        if m is None or m.empty or "kind" not in m:
            continue
        run = _run_info(rid, info, colors)
        tr = _train_points(m, max_points)
        if len(tr):
            ax.plot(tr["cells_seen"], tr["loss"], color=run.color, alpha=0.22, lw=0.8)
            ys_all += list(tr["loss"])
        ev = _eval_points(m, val)
        if len(ev):
            ax.plot(ev["cells_seen"], ev[val], color=run.color, lw=1.6, ls="-" if run.status == "ok" else ":",
                    marker="o", ms=2.5, label=run.size if run.size not in seen_labels else None)
            seen_labels.add(run.size)
            ys_all += list(ev[val])
    if not ys_all:
        _message(ax, "no learning curves recorded (no metrics.jsonl found)")
    else:
        ys_all += _ref_lines(ax, refs, lw=1.2)
        ax.set_xscale("log")
        _loss_y(ax, ys_all, 1.04)
        ax.grid(True, which="major", alpha=0.3)
        _size_legend(ax, params)
    ax.set_xlabel("cells seen")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


def _size_lines(ax, runs: pd.DataFrame, x: str, y: str, *, dots: dict[str, Any],
                line_z: float | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The finished runs with finite ``x > 0`` and a finite ``y``: a dot per run
    and, per model size, a line through its mean ``y`` at each ``x``. Returns the runs drawn
    (empty: nothing drawn) and the size colours."""
    df = runs.copy()
    df[x] = pd.to_numeric(df.get(x), errors="coerce")
    df[y] = pd.to_numeric(df.get(y), errors="coerce")
    keep = (df.get("status", "ok") == "ok") & np.isfinite(df[x]) & np.isfinite(df[y]) & (df[x] > 0)
    df = df[keep]
    if df.empty:
        return df, {}
    params = df.groupby("size")["params"].median().to_dict()
    colors = size_colors(params)
    for name in sorted(params, key=params.get):
        grp = df[df["size"] == name]
        ax.scatter(grp[x], grp[y], color=colors[name], zorder=3, **dots)
        mean = grp.groupby(x)[y].mean().sort_index()
        ax.plot(mean.index, mean.to_numpy(), color=colors[name], lw=1.8, marker="o", ms=4,
                label=f"{name} ({params[name]:,.0f} params)", **({} if line_z is None else {"zorder": line_z}))
    return df, colors


def _size_curves(ax, colors: Mapping[str, Any], curves: Mapping[str, Curve], limits: Mapping[str, float], *,
                 x_max: float) -> None:
    """Each size's fitted curve (dashed, with its band) and its limit as D grows (dotted, at the right)."""
    for name, color in colors.items():
        cv = curves.get(name)
        if cv is not None and len(cv.x):
            if cv.lo is not None and cv.hi is not None:
                ax.fill_between(cv.x, cv.lo, cv.hi, color=color, alpha=0.08, lw=0)
            ax.plot(cv.x, cv.y, color=color, lw=1.2, ls="--")
    x_right = max([x_max] + [float(np.max(c.x)) for c in curves.values() if len(c.x)])
    for name, value in limits.items():
        if name in colors and np.isfinite(value) and value > 0:
            ax.plot([x_right / 2.5, x_right], [value, value], color=colors[name], lw=2.0, ls=":")


def loss_vs_data(
    runs: pd.DataFrame,
    *,
    x: str = "train_cells",
    y: str = "best_val_mse",
    refs: Sequence[RefLine] = (),
    curves: Mapping[str, Curve] | None = None,
    title: str = "Validation loss against training cells, per model size",
    xlabel: str = "training cells (unique)",
    ylabel: str = "best validation MSE",
    limits: Mapping[str, float] | None = None,
    left_out: pd.DataFrame | None = None,
) -> Figure:
    """Loss against training-set size (or any data column ``x``), one line per model size (mean over
    seeds, runs as dots); ``curves`` maps a size name to its fitted L(N, D) curve, drawn dashed in the
    size's colour, ``limits`` to the law's limit as D grows (a short dotted line at the right), and
    ``left_out`` holds points not fitted, drawn hollow in their size's colour."""
    fig, ax = _new_figure()
    df, colors = _size_lines(ax, runs, x, y, dots={"s": 16, "alpha": 0.7})
    if left_out is not None and len(left_out) and colors:
        for name, grp in left_out.groupby("size"):
            if name in colors:
                ax.scatter(grp[x], grp[y], facecolors="none", edgecolors=[colors[name]], s=28, zorder=3)
        ax.scatter([], [], facecolors="none", edgecolors="#555555", s=28, label="not fitted (see the note)")
        df = pd.concat([df, left_out[left_out["size"].isin(list(colors))]], ignore_index=True)
    if df.empty:
        _message(ax, "no finished runs with a training-set size")
        ax.set_title(title)
        return fig
    _size_curves(ax, colors, curves or {}, limits or {}, x_max=float(df[x].max()))
    _ref_lines(ax, refs, lw=1.3)
    ax.set_xscale("log")
    if curves:
        ax.plot([], [], color="#555555", ls="--", lw=1.2, label="fitted L(N, D) (band: 95%)")
    if limits:
        ax.plot([], [], color="#555555", ls=":", lw=2.0, label="its limit L(N, D -> inf)")
    _loss_y(ax, list(df[y]) + [r.value for r in refs] + list((limits or {}).values()), 1.04)
    xt = np.unique(df[x].to_numpy(float))
    if len(xt) <= 12:  # label the training-set sizes actually used, as plain numbers
        ax.xaxis.set_major_locator(FixedLocator(xt))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend_outside(ax)
    return fig


def loss_vs_depth(
    runs: pd.DataFrame,
    *,
    x: str = "depth",
    y: str = "best_val_mse",
    refs: Mapping[str, Mapping[float, float]] | None = None,
    title: str = "Validation loss against sequencing depth, per model size",
) -> Figure:
    """Loss against the fraction of the sequencing depth (log axis), one line per model size
    (mean over seeds), every run a dot. ``refs`` maps a label to {depth: value}: a reference
    that changes with depth (e.g. each thinned dataset's gene-mean baseline), drawn dashed."""
    fig, ax = _new_figure()
    df, colors = _size_lines(ax, runs, x, y, line_z=2,
                             dots={"s": 18, "edgecolor": "black", "linewidths": 0.3, "alpha": 0.8})
    if df.empty:
        _message(ax, "no finished runs with a sequencing depth")
        ax.set_title(title)
        return fig
    ys = list(df[y])
    palette = ["#ff7f0e", "#2ca02c", "#8c564b", "#7f7f7f"]
    for i, (label, by_depth) in enumerate((refs or {}).items()):
        pts = sorted((float(d), float(v)) for d, v in by_depth.items()
                     if v is not None and np.isfinite(v) and np.isfinite(d) and d > 0)
        if pts:
            ax.plot([d for d, _ in pts], [v for _, v in pts], color=palette[i % len(palette)], ls="--", lw=1.3,
                    marker="s", ms=3, label=label, zorder=1)
            ys += [v for _, v in pts]
    ax.set_xscale("log")
    _loss_y(ax, ys, 1.04)
    xt = np.unique(df[x].to_numpy(float))
    ax.set_xlim(xt.min() / 1.25, xt.max() * 1.25)
    if len(xt) <= 12:  # label the depths actually used, as plain fractions
        ax.xaxis.set_major_locator(FixedLocator(xt))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel("fraction of the sequencing depth (binomially thinned counts)")
    ax.set_ylabel(loss_label(y))
    ax.set_title(title)
    _legend_outside(ax)
    return fig


@dataclass(frozen=True)
class IsoFlop:
    """A fitted L(N, D) = E + A/N^alpha + B/D^beta with C = k N D, and the budgets to profile."""

    A: float
    B: float
    E: float
    alpha: float
    beta: float
    k: float
    budgets: Sequence[float]
    span: float = 2.0  # decades of N drawn either side of N*(C)

    def optimum(self, C: float) -> tuple[float, float, float]:
        """(N*, D*, L*) at budget C (Hoffmann et al. 2022, closed form); NaNs when the law has no
        finite optimum (a fit whose size term vanishes, alpha or A near 0, puts N* at 0 or infinity)."""
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            n, d = allocation(np.float64(self.A), self.B, self.alpha, self.beta, C, self.k)
        if not (math.isfinite(n) and n > 0 and math.isfinite(d) and d > 0):
            return math.nan, math.nan, math.nan
        return float(n), float(d), self.loss(n, d)

    def loss(self, N, D):
        N, D = np.asarray(N, float), np.asarray(D, float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta


def isoflop_profiles(iso: IsoFlop, *, ax=None, title: str = "IsoFLOP profiles of the fitted L(N, D)") -> Figure:
    """Predicted loss against N along D = C / (k N) for each budget C, with N*(C) marked.

    Draws on ``ax`` (of a figure made here when None) and returns the figure."""
    if ax is None:
        fig, ax = _new_figure()
    else:
        fig = ax.figure
    budgets = sorted(float(c) for c in iso.budgets if c and np.isfinite(c) and c > 0)
    if not budgets:
        _message(ax, "no compute budget to profile")
        ax.set_title(title)
        return fig
    cmap = colormaps["plasma"]
    ys: list[float] = []
    for i, C in enumerate(budgets):
        n_opt, _, l_opt = iso.optimum(C)
        if not (np.isfinite(n_opt) and n_opt > 0 and np.isfinite(l_opt)):
            continue
        N = np.logspace(np.log10(n_opt) - iso.span, np.log10(n_opt) + iso.span, 160)
        L = iso.loss(N, C / (iso.k * N))
        color = cmap(0.85 * i / max(len(budgets) - 1, 1))
        ax.plot(N, L, color=color, lw=1.8, label=f"C = {C:.2g} FLOPs")
        ax.plot([n_opt], [l_opt], marker="*", ms=12, color=color, markeredgecolor="black", zorder=5)
        ys += list(L[np.isfinite(L)]) + [l_opt]
    if not ys:
        _message(ax, "the fitted law gives no finite compute-optimal size")
        ax.set_title(title)
        return fig
    ax.plot([], [], ls="none", marker="*", ms=10, color="#777777", markeredgecolor="black",
            label="compute-optimal N*(C)")
    ax.set_xscale("log")
    ys_arr = np.asarray(ys)
    lo, hi = ys_arr.min(), np.percentile(ys_arr, 90)  # the far arms climb steeply: keep the valleys readable
    _loss_y(ax, [lo, max(hi, lo * 1.05)], 1.03)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel("parameters N (D = C / (k N) training cells)")
    ax.set_ylabel("predicted loss")
    ax.set_title(title, fontsize=10)
    _legend_outside(ax)
    return fig


def compute_frontier(table: Sequence[Mapping[str, object]], *, isoflop: IsoFlop | None = None,
                     title: str = "Compute-optimal allocation") -> Figure:
    """N*(C) and D*(C) of a fitted L(N, D) law against compute, log-log, with 95% bands.

    ``table`` rows carry ``C``, ``N_opt``, ``D_opt`` and optionally ``N_opt_ci95``/``D_opt_ci95``.
    ``isoflop`` adds a second panel: the law's IsoFLOP profiles (:func:`isoflop_profiles`).
    """
    if isoflop is None:
        fig, ax = _new_figure()
    else:
        fig = Figure(figsize=(12.0, 4.8), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        ax, ax_iso = fig.subplots(1, 2)
        isoflop_profiles(isoflop, ax=ax_iso)
    rows = [r for r in table if isinstance(r, Mapping) and r.get("C")]
    if not rows:
        _message(ax, "no compute-optimal table")
        ax.set_title(title)
        return fig
    C = np.array([float(r["C"]) for r in rows])
    for key, label, color in (("N_opt", "N* (parameters)", "#1f77b4"), ("D_opt", "D* (training cells)", "#ff7f0e")):
        v = np.array([float(r.get(key) or np.nan) for r in rows])
        ci = [r.get(f"{key}_ci95") for r in rows]
        if all(isinstance(c, (list, tuple)) and len(c) == 2 and c[0] and c[1] for c in ci):
            ax.fill_between(C, [c[0] for c in ci], [c[1] for c in ci], color=color, alpha=0.18, lw=0)
        ax.plot(C, v, color=color, lw=2, marker="o", ms=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("compute-optimal size")
    if isoflop is None:
        ax.set_title(title)
        _legend_outside(ax)
    else:
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    return fig


def loss_vs_lr(runs: pd.DataFrame, *, chosen: Mapping[str, float], edge: Sequence[str] = (), y: str = "best_val_mse",
               title: str = "Validation loss against peak learning rate, per model size") -> Figure:
    """Loss against the peak learning rate (log axis), a line per size through the mean over seeds;
    ``chosen`` (size -> the chosen rate) is ringed, and sizes in ``edge`` (chosen rate on the edge of
    the grid) are named in the title."""
    fig, ax = _new_figure()
    df, colors = _size_lines(ax, runs, "lr", y,
                             dots={"s": 16, "edgecolor": "black", "linewidths": 0.3, "alpha": 0.8})
    if df.empty:
        _message(ax, "no finished runs with a learning rate")
        ax.set_title(title)
        return fig
    for size, lr in chosen.items():
        at = df[(df["size"] == size) & np.isclose(df["lr"], lr)]
        if len(at):
            ax.scatter([lr], [at[y].mean()], s=160, facecolors="none", edgecolors=colors.get(size, "black"),
                       linewidths=1.8, zorder=4)
    ax.set_xscale("log")
    _loss_y(ax, df[y], 1.03)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(loss_label(y))
    ax.set_title(title + (f"\nbest rate at the edge of its grid: {', '.join(edge)}" if edge else ""))
    _legend_outside(ax)
    return fig
