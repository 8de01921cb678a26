"""The whole flow: dataset -> sweep of trainings -> results.csv -> fit -> report.

``format_fit`` (from ``cellscale.fit.text``) stays importable from here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from cellscale.config import StudyConfig, load_study_config, preset_path
from cellscale.fit.text import format_fit
from cellscale.report.writer import write_report
from cellscale.rules.lrgrid import loss_column
from cellscale.runtime.io import read_json
from cellscale.runtime.progress import ResampleProgress, console
from cellscale.sweep import run_sweep

__all__ = ["format_fit", "print_summary", "resolve_config", "run_study", "summarize"]


def resolve_config(*, preset: str | None = None, config: str | Path | None = None) -> StudyConfig:
    """The study config of a YAML file, else of a named preset (default ``demo``)."""
    if config is not None:
        return load_study_config(config)
    return load_study_config(preset_path(preset or "demo"))


def run_study(
    cfg: StudyConfig, *, out: str | Path, backend: str | None = None, ray_address: str | None = None,
    overwrite: bool = False, progress: bool = True, workers: int | str | None = None,
) -> dict[str, Any]:
    """The whole flow into ``out``: dataset, sweep, ``results.csv``, fit, report; returns a
    summary (best run, baseline, fit) that ``print_summary`` renders. Rerunning resumes."""
    out = Path(out)
    results = run_sweep(cfg, out=out, backend=backend, ray_address=ray_address,
                        overwrite=overwrite, progress=progress, workers=workers)
    with ResampleProgress(enabled=progress) as bar:
        html, md = write_report(out, progress=bar)
    summary = summarize(out, results)
    summary.update({"report_html": str(html), "report_md": str(md), "results": str(results)})
    return summary


def summarize(out: Path, results_csv: Path) -> dict[str, Any]:
    table = pd.read_csv(results_csv)
    ok = table[table["status"] == "ok"]
    summary: dict[str, Any] = {
        "runs": int(len(table)),
        "finished": int(len(ok)),
        "failed_or_diverged": int(len(table) - len(ok)),
    }
    if len(ok):
        key = loss_column(ok)  # the best run is a choice: made on validation
        best = ok.loc[ok[key].idxmin()]
        summary.update({
            "best_run": str(best["run_id"]),
            "best_val_mse": float(best["best_val_mse"]),
            "gene_mean_val_mse": float(best["gene_mean_val_mse"]),
        })
        if key == "best_val_loss":
            summary.update({"objective": str(best["objective"]), "best_val_bits": float(best["best_val_loss"])})
    fit_path = out / "fit.json"
    if fit_path.is_file():
        summary["fit"] = read_json(fit_path)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    console.print(
        f"runs: {summary['finished']}/{summary['runs']} finished"
        + (f", {summary['failed_or_diverged']} failed or diverged" if summary["failed_or_diverged"] else "")
    )
    if "best_val_bits" in summary:
        console.print(f"best: {summary['best_run']}  validation loss {summary['best_val_bits']:.4f} bits per "
                      f"masked gene ({summary['objective']}); its MSE {summary['best_val_mse']:.4f}"
                      f"  (gene-mean baseline {summary['gene_mean_val_mse']:.4f})")
    elif "best_val_mse" in summary:
        console.print(
            f"best: {summary['best_run']}  validation MSE {summary['best_val_mse']:.4f}"
            f"  (gene-mean baseline {summary['gene_mean_val_mse']:.4f})"
        )
    for line in format_fit(summary.get("fit") or {}):
        console.print(line, highlight=False)
    console.print(f"report: {summary['report_html']}")
