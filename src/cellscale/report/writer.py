"""Write a sweep's report: ``SWEEP_DIR/report.html`` (self-contained), ``report.md`` + ``figures/``,
``fit.json``, and ``data_fit.json`` when the runs took cooldown branches.

``write_report`` reads the sweep (``load``), fits the config's law (``fitting``), draws the
figures (``figures``), lays out the sections (``sections``) and writes both documents
(``render``). Missing optional pieces are stated in the report instead of raising. Every file
is written atomically.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from cellscale.fit.bootstrap import on_resamples
from cellscale.report import data_axis, downstream, render
from cellscale.report.figures import loss_refs, make_figures
from cellscale.report.fitting import (
    FitOutcome,
    fit_json,
    fit_subset,
    fitted_loss_column,
    headline_depth,
    run_depth_fits,
    run_fit,
)
from cellscale.report.load import load_sweep
from cellscale.report.records import SweepData, gene_best
from cellscale.report.sections import Findings, document
from cellscale.runtime.io import atomic_write_bytes, atomic_write_json, atomic_write_text

# callers import these from here too (cellscale.pipeline, the report tests)
__all__ = ["write_report", "load_sweep", "run_fit", "run_depth_fits", "SweepData", "FitOutcome",
           "fitted_loss_column", "headline_depth", "fit_subset"]

_fit_subset = fit_subset  # the name the report tests use


def write_report(sweep_dir: str | os.PathLike, *, progress: Callable[[int, int], None] | None = None
                 ) -> tuple[Path, Path]:
    """Fit, draw and write ``report.html``, ``report.md``, ``figures/*.png`` and ``fit.json`` into
    ``sweep_dir``; return ``(html_path, md_path)``. ``progress(done, total)`` hears each batch of
    the fits' bootstrap resamples as it goes (``cellscale.fit.bootstrap.on_resamples``; the data
    axis's joint law on a real sweep takes minutes).

    Raises ``RunError`` only when ``sweep_dir`` is not a sweep directory at all; everything that
    is merely missing (metrics, manifest, baselines) or unfittable is stated in the report.
    """
    with on_resamples(progress) if progress is not None else contextlib.nullcontext():
        return _write_report(sweep_dir)


def _write_report(sweep_dir: str | os.PathLike) -> tuple[Path, Path]:
    sd = load_sweep(sweep_dir)
    root = sd.sweep_dir
    best = gene_best(sd)
    fit = run_fit(sd.runs, sd.fit_config, full_train=sd.full_train,
                  per_gene_mse=None if best is None else best.positive, sweep_dir=root)
    depth_fits = run_depth_fits(sd.runs, sd.fit_config, full_train=sd.full_train, headline=fit, sweep_dir=root)
    atomic_write_json(root / "fit.json", fit_json(fit, depth_fits, sd))

    data = data_axis.run_data_fit(sd)  # the joint L(N, D) on the cooldown branches (report/data_axis.py)
    if data is not None:
        atomic_write_json(root / data_axis.DATA_FILE, data.json)
    down = downstream.analyse(sd)  # the embeddings' scores and their law (report/downstream.py)
    atomic_write_json(root / "downstream_fit.json", downstream.fit_record(down))

    figures = (make_figures(sd, fit, best) + data_axis.figures(data, sd)
               + downstream.figures(down, sd, fit, loss_refs(sd)))
    fig_paths = {f.key: f"figures/{f.key}.png" for f in figures}
    for f in figures:
        atomic_write_bytes(root / fig_paths[f.key], f.png)

    if "gene_mean" not in sd.baselines:
        sd.notes.append("No gene-mean baseline was recorded (manifest 'baselines' or results columns).")
    doc = document(Findings(sd, fit, depth_fits, best, {f.key: f for f in figures}, downstream=down, data=data))
    html_path, md_path = root / "report.html", root / "report.md"
    atomic_write_text(html_path, render.to_html(doc))
    atomic_write_text(md_path, render.to_markdown(doc, fig_paths))
    return html_path, md_path
