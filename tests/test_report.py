"""The report: write_report on fabricated sweep directories, the plots, the generated text."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import missing
from fixtures_report import DIVERGED_ERROR, FAILED_ERROR, LADDER_512, make_sweep
from matplotlib.figure import Figure
from PIL import Image
from threadpoolctl import threadpool_limits

import cellscale.fit
import cellscale.fit.intervals
from cellscale.report import plots, plots_genes
from cellscale.report.meaning import meaning_paragraph
from cellscale.report.methods import methods_paragraph
from cellscale.report.writer import load_sweep, write_report

BOOT = 50  # bootstrap resamples in the fabricated configs: enough for a band, quick to fit
IMG_RE = re.compile(r'<img[^>]*\ssrc="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A sweep of 5 sizes x 2 seeds (+ L and XL with one diverged and one failed seed), reported once."""
    sweep = make_sweep(tmp_path_factory.mktemp("report"), bootstrap=BOOT)
    html_path, md_path = write_report(sweep)
    return sweep, html_path, md_path


def test_write_report_writes_both_documents_figures_and_fit(report):
    sweep, html_path, md_path = report
    assert html_path == sweep / "report.html" and md_path == sweep / "report.md"
    assert html_path.stat().st_size > 10_000 and md_path.stat().st_size > 1_000
    for name in ("loss_vs_params", "learning_curves", "entropy"):
        png = sweep / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(figures/{name}.png)" in md_path.read_text()
    assert not (sweep / "figures" / "loss_vs_data.png").exists()  # one data size only
    fit = json.loads((sweep / "fit.json").read_text())
    assert fit["law"] == "power-floor" and fit["n_points"] == 12
    assert set(fit["params"]) == {"a", "alpha", "c"}
    assert not list(sweep.glob("**/*.tmp"))  # atomic writes leave no temp files


def test_html_is_self_contained_and_figures_decode_as_png(report):
    _, html_path, _ = report
    text = html_path.read_text()
    # nothing fetched from anywhere: no http(s) or protocol-relative src/href, no scripts or stylesheets
    assert not re.search(r'(?:src|href)\s*=\s*["\']?\s*(?:https?:)?//', text, re.I)
    assert not re.search(r"<script|<link|@import|url\(", text, re.I)
    images = IMG_RE.findall(text)
    assert len(images) >= 3
    for b64 in images:
        raw = base64.b64decode(b64, validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        img = Image.open(io.BytesIO(raw))
        img.verify()
        assert img.format == "PNG" and img.size[0] >= 400 and img.size[1] >= 150
    assert len(re.findall(r"<img\b", text)) == len(images)  # every image is an embedded PNG


def test_diverged_and_failed_runs_are_shown_with_their_errors(report):
    sweep, html_path, md_path = report
    html, md = html_path.read_text(), md_path.read_text()
    for doc in (html, md):
        for rid in ("L-dall-s0", "XL-dall-s0", "L-dall-s1", "XXS-dall-s0"):
            assert rid in doc
        assert DIVERGED_ERROR in doc and FAILED_ERROR in doc
        assert "diverged" in doc and "failed" in doc
        assert "2 of 14 runs did not finish ok" in doc
    assert '<tr class="diverged">' in html and '<tr class="failed">' in html
    # every row of results.csv has a row in each table
    n = len(pd.read_csv(sweep / "results.csv"))
    assert md.count("| ok |") + md.count("| diverged |") + md.count("| failed |") == n


def test_fit_json_matches_a_direct_fit_table_call(report):
    sweep, _, _ = report
    stored = json.loads((sweep / "fit.json").read_text())
    with threadpool_limits(limits=1, user_api="blas"):  # as the writer does; only the speed depends on it
        direct = cellscale.fit.fit_table(pd.read_csv(sweep / "results.csv"), law="power-floor",
                                         method="huber-log", bootstrap=BOOT, seed=0).to_dict()
    assert stored["n_points"] == direct["n_points"]
    assert stored["floor_at_boundary"] == direct["floor_at_boundary"]
    assert stored["r2"] == pytest.approx(direct["r2"], rel=1e-9)
    for name, value in direct["params"].items():
        assert stored["params"][name] == pytest.approx(value, rel=1e-9)
        assert stored["ci95"][name] == pytest.approx(direct["ci95"][name], rel=1e-9)
    assert stored["entropy_bits"]["gaussian"] == pytest.approx(direct["entropy_bits"]["gaussian"], rel=1e-9)
    # the fabricated law is recovered, and the report prints the same numbers
    assert stored["params"]["c"] == pytest.approx(1.4, abs=0.03)
    html = (sweep / "report.html").read_text()
    assert f"{stored['params']['c']:.4g}" in html and f"{stored['params']['alpha']:.4g}" in html


def test_report_text_covers_baseline_floor_bits_and_methods(report):
    _, html_path, md_path = report
    md = md_path.read_text()
    assert "below the gene-mean baseline (1.862)" in md  # on the test cells, where the fitted loss is
    assert "floor c" in md and "bits per masked gene" in md
    assert "homoscedastic" in md.lower()
    assert "AdamW" in md and "weight decay 0.01" in md and "cosine" in md
    assert "XXS (1/1/1: 533 parameters" in md and "S (128/4/8: 859,137 parameters" in md
    assert "1,800 training, 100 validation and 100 test cells" in md
    assert "leave-largest-out" in md and "AIC" in md and "law without a floor" in md


def test_only_failed_runs_still_writes_a_report_that_says_no_fit(tmp_path):
    sweep = make_sweep(tmp_path, only_failed=True, bootstrap=BOOT)
    html_path, md_path = write_report(sweep)
    html, md = html_path.read_text(), md_path.read_text()
    fit = json.loads((sweep / "fit.json").read_text())
    assert "error" in fit and "no finished run" in fit["error"]
    for doc in (html, md):
        assert "No fit" in doc and "No scaling law was fitted" in doc
        assert FAILED_ERROR in doc and "XXS-dall-s0" in doc
    assert len(IMG_RE.findall(html)) >= 2


def test_fit_error_is_shown_not_raised(tmp_path):
    # two sizes cannot determine three parameters: the fit module raises FitError
    sweep = make_sweep(tmp_path, sizes=("XXS", "TINY"), diverged=None, failed=None, bootstrap=BOOT)
    html_path, md_path = write_report(sweep)
    reason = json.loads((sweep / "fit.json").read_text())["error"]
    assert "parameters" in reason
    assert reason in md_path.read_text()
    assert "No fit" in html_path.read_text()


def test_missing_optional_pieces_are_named_not_fatal(tmp_path):
    sweep = make_sweep(tmp_path, with_manifest=False, with_metrics=False, bootstrap=BOOT)
    (sweep / "sweep.json").unlink()
    html_path, md_path = write_report(sweep)
    md = md_path.read_text()
    assert "dataset manifest was not found" in md
    assert "sweep.json is missing" in md
    assert "No learning curve" in md and "metrics.jsonl missing" in md
    assert "below the gene-mean baseline" in md  # the baseline falls back to results.csv
    assert (sweep / "figures" / "learning_curves.png").exists()


def test_not_a_sweep_directory_raises_a_one_line_error(tmp_path):
    from cellscale.errors import RunError

    with pytest.raises(RunError, match="not a sweep directory"):
        write_report(tmp_path)
    with pytest.raises(RunError, match="not found"):
        write_report(tmp_path / "nope")


def test_data_sweep_draws_loss_against_data_and_fits_the_largest_subset(tmp_path):
    sweep = make_sweep(tmp_path, train_cells=(200, 600, None), diverged=None, failed=None, bootstrap=BOOT,
                       bayes_floor=1.35)
    html_path, md_path = write_report(sweep)
    assert (sweep / "figures" / "loss_vs_data.png").exists()
    md = md_path.read_text()
    assert "Scaling with data" in md and "only the 10 runs on the largest training set" in md
    assert "Bayes-optimal error of the simulator is 1.35" in md
    assert json.loads((sweep / "fit.json").read_text())["n_points"] == 10
    assert len(IMG_RE.findall(html_path.read_text())) == 4


def test_the_true_floor_is_the_exact_one_on_the_validation_masks(tmp_path):
    # the manifest's figure is the simulator's, over random masks and all its genes; the sweep's
    # baselines.json holds the floor on the dataset's own validation masks and kept genes
    sweep = make_sweep(tmp_path, diverged=None, failed=None, bootstrap=BOOT, bayes_floor=1.35)
    base = json.loads((sweep / "baselines.json").read_text()) if (sweep / "baselines.json").is_file() else {}
    base["bayes_floor"] = {"val": 1.3, "test": 1.31}
    (sweep / "baselines.json").write_text(json.dumps(base))
    md = write_report(sweep)[1].read_text()
    assert "Bayes-optimal error of the simulator is 1.31;" in md and "1.35" not in md  # the test masks' floor


def test_floor_at_boundary_gets_a_plain_language_warning(tmp_path, monkeypatch):
    class Boundary:  # a stand-in FitResult whose floor sits on its bound
        def to_dict(self):
            return {"law": "power-floor", "method": "paper", "params": {"a": 2.0, "alpha": 0.25, "c": 1.39},
                    "ci95": {"a": [1.5, 2.5], "alpha": [0.2, 0.3], "c": [1.39, 1.39]}, "n_points": 12,
                    "r2": 0.86, "floor_param": "c", "floor_at_boundary": True, "floor_bounds": [0.0, 1.39],
                    "entropy_bits": {"gaussian": 2.28, "ci95": [2.28, 2.28], "label": "homoscedastic Gaussian"}}

        def predict(self, X):
            return 2.0 * np.asarray(X, float) ** -0.25 + 1.39

        def band(self, X, level=0.95):
            y = self.predict(X)
            return y * 0.99, y * 1.01

    monkeypatch.setattr(cellscale.fit, "fit_table", lambda df, **kw: Boundary())
    sweep = make_sweep(tmp_path, bootstrap=BOOT)
    html_path, md_path = write_report(sweep)
    for doc in (html_path.read_text(), md_path.read_text()):
        assert "WARNING" in doc and "search bound" in doc and "not a measurement" in doc


def test_methods_paragraph_is_enough_to_reproduce_a_census_study():
    config = {
        "data": {"source": "census", "genes": 512, "cells": 200000, "seed": 0, "split": [0.9, 0.05, 0.05],
                 "target_sum": 10000.0, "hvg_flavor": "seurat_v3",
                 "census": {"version": "2025-01-30", "organism": "homo_sapiens",
                            "obs_filter": "is_primary_data == True", "tissues": ["blood", "lung"],
                            "per_tissue_cap": 20000}},
        "model": {"dropout": 0.1},
        "train": {"cells_seen": 240000, "batch_size": 32, "lr": 2.5e-4, "lr_batch_scaling": "none",
                  "schedule": "constant", "weight_decay": 0.01, "grad_clip": 1.0, "betas": [0.9, 0.999],
                  "mask_prob": 0.15},
        "sweep": {"sizes": ["XXS", "S"], "train_cells": [None], "seeds": [0, 1, 2]},
        "fit": {"law": "power-floor", "method": "paper", "bootstrap": 1000, "seed": 0},
    }
    manifest = {"source": "census", "V": 512, "D": 200000, "seed": 0, "target_sum": 10000.0,
                "hvg_flavor": "seurat_v3", "split_sizes": {"train": 180000, "val": 10000, "test": 10000},
                "mask_prob": 0.15, "census": {"version": "2025-01-30", "obs_filter": "is_primary_data == True"}}
    runs = pd.DataFrame([
        {"size": s, "params": LADDER_512[s][0], "non_embedding_params": LADDER_512[s][0] - 512,
         "d_model": LADDER_512[s][1], "n_layers": LADDER_512[s][2], "n_heads": LADDER_512[s][3],
         "cells_seen": 240000, "lr": 2.5e-4, "status": "ok"} for s in ("XXS", "S")])
    text = methods_paragraph(config, manifest, runs)
    for needle in ("CELLxGENE Census, release 2025-01-30", "homo_sapiens", "'is_primary_data == True'",
                   "blood, lung", "20,000 cells per tissue", "dropped (QC)", "library size was computed over ALL genes",
                   "normalised to 10,000", "log1p", "V = 512", "'seurat_v3'", "training cells",
                   "90/5/5", "180,000 training, 10,000 validation and 10,000 test", "seed 0",
                   "XXS (1/1/1: 533 parameters", "S (128/4/8: 859,137 parameters", "240,000 cells seen",
                   "batches of 32", "seeds 0, 1, 2", "probability 0.15", "AdamW", "weight decay 0.01",
                   "norm 1", "constant learning rate", "peak learning rate 0.00025", "power-floor",
                   "1,000 bootstrap", "0.5 log2(2 pi e c)"):
        assert needle in text, needle


def test_meaning_paragraph_flags_a_model_worse_than_the_baseline_and_below_the_bayes_floor():
    runs = pd.DataFrame({"size": ["XXS", "S"], "params": [533, 859137], "best_val_mse": [2.1, 1.3],
                         "test_mse": [2.1, 1.3], "status": ["ok", "ok"]})
    text = meaning_paragraph(runs, None, baseline_val=1.875, bayes_floor=1.35, fit_error="too few points",
                             n_masked=100_000)
    assert "BELOW the known Bayes-optimal error (1.35) by 3.7%, beyond the sampling error" in text
    assert "too few points" in text
    worse = meaning_paragraph(runs.iloc[:1], None, baseline_val=1.875)
    assert "NOT better than the gene-mean baseline" in worse


def test_plots_are_pure_functions_returning_figures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = pd.DataFrame({"run_id": ["a", "b", "c", "d"], "size": ["XXS", "XXS", "S", "L"],
                         "params": [533, 533, 859137, 1e8], "best_val_mse": [1.8, 1.82, 1.47, 3.0],
                         "status": ["ok", "ok", "ok", "diverged"], "train_cells": [100, 100, 100, 100]})
    xs = np.logspace(2, 9, 50)
    y = 2 * xs**-0.25 + 1.4
    figs = [
        plots.loss_vs_params(runs, curve=plots.Curve(xs, y, y * 0.98, y * 1.02),
                             floor=plots.Floor(1.4, 1.38, 1.42), refs=[plots.RefLine(1.875, "gene mean")]),
        plots.loss_vs_params(runs.iloc[:0]),  # nothing to draw: a labelled empty figure
        plots.learning_curves({}, runs),
        plots.learning_curves({"a": pd.DataFrame({"kind": ["train", "eval"], "cells_seen": [10, 20],
                                                  "loss": [2.0, math.nan], "val_mse": [math.nan, 1.9]})}, runs),
        plots.loss_vs_data(runs),
        plots_genes.entropy_summary(2.29, [2.28, 2.30], refs={"gene mean": 2.5}),
        plots_genes.entropy_summary(None),
    ]
    for fig in figs:
        assert isinstance(fig, Figure)
        assert plots.figure_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"
    assert figs[0].axes[0].get_xscale() == "log" and figs[0].axes[0].get_yscale() == "log"
    assert list(tmp_path.iterdir()) == []  # no file I/O


def test_loss_vs_data_draws_each_sizes_fitted_curve():
    runs = pd.DataFrame({"run_id": ["a", "b", "c"], "size": ["XXS", "S", "S"], "params": [533, 859137, 859137],
                         "best_val_mse": [1.8, 1.5, 1.45], "status": ["ok", "ok", "ok"],
                         "train_cells": [100, 100, 1000]})
    xs = np.logspace(2, 3, 10)
    curves = {"S": plots.Curve(xs, 1.4 + xs**-0.3, 1.39 + xs**-0.3, 1.41 + xs**-0.3), "XXS": plots.Curve(xs, 1.8 + 0 * xs)}
    ax = plots.loss_vs_data(runs, curves=curves).axes[0]
    from matplotlib.colors import to_hex

    drawn = [ln for ln in ax.get_lines() if len(ln.get_xdata())]  # not the empty legend proxy
    dashed = {to_hex(ln.get_color()) for ln in drawn if ln.get_linestyle() == "--"}
    sizes = {to_hex(ln.get_color()) for ln in drawn if ln.get_linestyle() == "-"}
    assert len(dashed) == 2 and dashed == sizes  # one fitted L(N, D) curve per size, in its colour
    assert len(ax.collections) >= 3  # the S band (fill_between) beside the run dots


def test_load_sweep_tolerates_a_truncated_metrics_line(tmp_path):
    sweep = make_sweep(tmp_path, bootstrap=BOOT)
    path = sweep / "runs" / "XXS-dall-s0" / "metrics.jsonl"
    path.write_text(path.read_text() + '{"kind": "train", "st')
    data = load_sweep(sweep)
    assert "XXS-dall-s0" in data.metrics
    assert any("1 unreadable line" in n for n in data.notes)


# ---------------------------------------------------------------------------------------------
# headless Chromium: the report renders, and its figures are drawn


def _chromium() -> str | None:
    for cand in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and Path(cand).is_file():
            return cand
    return None


def _screenshot(exe: str, html: Path, png: Path, profile: Path) -> None:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
           f"--screenshot={png}", "--window-size=1200,2000", html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=25)
    assert png.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"


def _blank_figures(html: str) -> str:
    """The same page with every embedded figure replaced by a white PNG of the same size."""
    def blank(m: re.Match) -> str:
        size = Image.open(io.BytesIO(base64.b64decode(m.group(1)))).size
        buf = io.BytesIO()
        Image.new("RGB", size, "white").save(buf, format="PNG")
        return m.group(0).replace(m.group(1), base64.b64encode(buf.getvalue()).decode())
    return IMG_RE.sub(blank, html)


def test_report_renders_in_headless_chromium_with_figures_drawn(report, tmp_path):
    exe = _chromium()
    if exe is None:
        missing("Chromium is not installed (Debian: apt-get install -y chromium); the headless screenshot test needs it")
    _, html_path, _ = report
    control_html = tmp_path / "control.html"  # same layout, figures blanked
    control_html.write_text(_blank_figures(html_path.read_text()))
    shot, control = tmp_path / "report.png", tmp_path / "control.png"
    _screenshot(exe, html_path, shot, tmp_path / "profile")
    _screenshot(exe, control_html, control, tmp_path / "profile")
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    ctl = np.asarray(Image.open(control).convert("RGB")).astype(int)
    assert img.shape == ctl.shape and img.shape[0] >= 1900 and img.shape[1] >= 1100
    nonwhite = (img < 245).any(axis=2).mean()
    assert nonwhite > 0.08, f"only {nonwhite:.1%} of the page is drawn"
    # what the figures add to the page: pixels that differ from the blanked control
    drawn = (np.abs(img - ctl).max(axis=2) > 30)
    assert drawn.mean() > 0.005, f"figures add only {drawn.mean():.2%} of the pixels"
    colours = np.unique(img[drawn].reshape(-1, 3), axis=0)
    assert len(colours) > 100, f"figures drawn in only {len(colours)} colours"
    saturated = img[drawn].max(axis=1) - img[drawn].min(axis=1) > 60  # plot colours, not grey text
    assert saturated.sum() > 1000, f"only {saturated.sum()} coloured figure pixels"
    # the loss-against-parameters figure sits in the first screen: its rows differ from the control
    rows = drawn.mean(axis=1) > 0.01
    assert rows.sum() > 200, f"figure rows drawn: {rows.sum()}"


@pytest.mark.parametrize("state", ["header-only", "missing"])
def test_a_sweep_with_no_results_yet_gets_a_report(tmp_path, state):
    sweep = make_sweep(tmp_path, bootstrap=BOOT)
    if state == "missing":
        (sweep / "results.csv").unlink()
    else:
        header = (sweep / "results.csv").read_text().splitlines()[0]
        (sweep / "results.csv").write_text(header + "\n")
    html_path, md_path = write_report(sweep)
    md = md_path.read_text()
    assert "No fit" in md and "no runs" in md
    if state == "missing":
        assert "results.csv is missing" in md
        assert "without a row in results.csv" in md  # the run directories are still named
    assert len(IMG_RE.findall(html_path.read_text())) == 3


def test_a_two_variable_law_gets_its_curves_and_compute_optimal_frontier(tmp_path):
    sweep = make_sweep(tmp_path, train_cells=(200, 600, None), diverged=None, failed=None, bootstrap=20,
                       fit_law="chinchilla")
    html_path, md_path = write_report(sweep)
    fit = json.loads((sweep / "fit.json").read_text())
    assert fit["law"] == "chinchilla" and fit["n_points"] == 30  # "all" counted as the 1,800-cell split
    for name in ("loss_vs_data", "compute_frontier"):
        assert (sweep / "figures" / f"{name}.png").exists()
    md = md_path.read_text()
    assert "Compute-optimal allocation" in md and "fitted L(N, D) law for each size" in md
    assert "runs on all training cells counted as 1,800 cells" in md
    assert len(IMG_RE.findall(html_path.read_text())) == 5


def test_methods_paragraph_reads_a_nested_manifest_as_data_build_writes_it():
    manifest = {  # the shape cellscale.data.build writes: source / preprocessing / split blocks
        "source": {"kind": "simulate", "n_simulated": 1516,
                   "simulate": {"n_genes": 200, "n_types": 6, "n_programs": 3, "mode": "nb"}},
        "V": 32, "D": 1500, "seed": 0,
        "preprocessing": {"normalized_input": False, "n_loaded_cells": 1516, "n_empty_cells_dropped": 3,
                          "subsampled": True, "n_source_genes": 200, "target_sum": 10000.0,
                          "hvg_flavor": "seurat_v3", "hvg_batch_key": None},
        "split": {"fractions": [0.8, 0.1, 0.1], "split_by": None, "seed": 7},
        "split_sizes": {"train": 1200, "val": 150, "test": 150}, "eval_mask_seed": 0, "mask_prob": 0.15,
        "config": {"source": "simulate", "census": {"version": "2025-01-30"}},
    }
    text = methods_paragraph({"train": {}, "sweep": {"seeds": [0]}, "fit": {}}, manifest, None)
    for needle in ("simulated from a negative-binomial", "6 cell types", "3 of 1,516 cells",
                   "over all 200 source genes", "normalised to 10,000", "V = 32", "'seurat_v3'", "80/10/10",
                   "1,200 training, 150 validation and 150 test", "fixed by seed 7", "with seed 0"):
        assert needle in text, needle
    assert "Census" not in text


def _methods(train=None, manifest=None, runs=None, model=None, fit=None, fitcfg=None):
    cfg = {"train": train or {}, "sweep": {"seeds": [0]}, "fit": fitcfg or {}, "model": model or {}}
    return methods_paragraph(cfg, manifest or {"source": "simulate", "V": 32}, runs, fit=fit)


def test_methods_paragraph_tells_the_training_mask_from_the_evaluation_mask():
    text = _methods(train={"mask_prob": 0.3}, manifest={"source": "simulate", "V": 32, "mask_prob": 0.15,
                                                         "eval_mask_seed": 4})
    assert "During training each gene was masked with probability 0.3," in text
    assert "fixed seeded evaluation mask (probability 0.15, seed 4)" in text
    assert "probability 0.15, resampled" not in text
    silent = _methods(train={"mask_prob": 0.2}, manifest={"source": "simulate", "V": 32})
    assert "masked with probability 0.2," in silent and "not recorded in the manifest" in silent


@pytest.mark.parametrize("objective, needle", [
    ("mse", "the loss is the MSE on masked positions"),
    ("gaussian-nll", "the loss is the Gaussian negative log-likelihood on masked positions"),
    ("nb", "negative binomial over each masked gene's raw count"),
])
def test_methods_paragraph_names_the_runs_objective(objective, needle):
    runs = pd.DataFrame({"size": ["XXS"], "params": [533], "objective": [objective], "status": ["ok"]})
    for text in (_methods(runs=runs), _methods(model={"objective": objective})):
        assert needle in text
        assert ("the loss is the MSE" in text) == (objective == "mse")


def test_methods_paragraph_states_the_fits_axes_and_interval_method():
    nd = {"law": "chinchilla", "x": ["params", "train_cells"], "y": "best_val_mse", "interval": "profile",
          "ci_method": "profile likelihood XYZ", "bootstrap": 200, "bootstrap_kind": "residuals",
          "bootstrap_failed": 0}
    text = _methods(fit=nd, fitcfg={"law": "chinchilla", "bootstrap": 200})
    assert ("fitted to the best validation MSE, the loss that chose each point's checkpoint and rate (biased low) "
            "against total parameters P and training cells D") in text
    test = _methods(fit={**nd, "y": "test_mse"})
    assert ("fitted to the test MSE at the validation-chosen checkpoint and rate (a loss that chose nothing) against "
            "total parameters P and training cells D") in test
    assert "against total parameters P of" not in text
    assert "95% intervals by profile likelihood XYZ (interval method 'profile')" in text
    assert "200 bootstrap resamples of the residuals" in text and "failed" not in text
    bits = _methods(fit={**nd, "law": "power-floor", "x": ["params"], "y": "best_val_loss", "loss_unit": "bits"})
    assert "the best validation loss (bits per masked gene), the loss that chose" in bits
    # how the bits are read: the floor itself for bits, none for a law without a floor, else the Gaussian reading
    assert "is itself the entropy per masked gene, measured." in bits and "0.5 log2(2 pi e c)" not in bits
    assert "0.5 log2(2 pi e c) bits" in text
    power = _methods(fit={**nd, "law": "power", "x": ["params"], "params": {"a": 2.0, "alpha": 0.3},
                          "floor_param": None})
    assert "This law has no floor, so no entropy is read from it." in power and "log2(2 pi e c)" not in power
    # the evaluation cells' noise, when the intervals hold it
    cells = _methods(fit={**nd, "eval_cells": {"how": "quadrature with the profile interval", "resamples": 200,
                                               "n_cells": 500, "split": "test"}})
    assert ("they hold the evaluation cells' sampling error: 200 resamples of the 500 test cells every run was "
            "scored on, one shared draw per resample (quadrature with the profile interval)") in cells
    assert "evaluation cells" not in text
    # no fit yet: the axes of the configured law and the default interval method
    default = _methods(fitcfg={"law": "chinchilla"})
    assert "against total parameters P and training cells D" in default
    assert f"(interval method '{cellscale.fit.intervals.DEFAULT_INTERVAL}')" in default
    assert "(interval method 'bca-groups')" in _methods(fitcfg={"method": "paper"})


def test_methods_paragraph_and_fit_table_flag_failed_resamples():
    from cellscale.report.tables import _bootstrap_rows

    few = {"interval": "residual-t", "ci_method": "studentized", "bootstrap": 100, "bootstrap_kind": "residuals",
           "bootstrap_failed": 3, "bootstrap_failures": {"RuntimeError: boom": 3}, "bootstrap_unreliable": False}
    text = _methods(fit=few, fitcfg={"bootstrap": 100})
    assert "3 of 100 resamples failed to fit (RuntimeError: boom: 3)" in text and "MORE THAN 5%" not in text
    many = {**few, "bootstrap_failed": 9, "bootstrap_failures": {"RuntimeError: boom": 9}, "bootstrap_unreliable": True}
    assert "9 of 100 resamples failed to fit" in _methods(fit=many) and "MORE THAN 5%" in _methods(fit=many)
    rows = _bootstrap_rows(many)
    assert rows[0][:2] == ["interval method", "residual-t"]
    assert "9 of 100 resamples failed to fit" in rows[1][2] and "WARNING: more than 5%" in rows[1][2]
    assert "WARNING" not in _bootstrap_rows(few)[1][2]


# ---------------------------------------------------------------------------------------------
# per-gene errors and iso-FLOP profiles


def test_per_gene_errors_get_a_figure_a_gene_table_and_the_heteroscedastic_entropy(tmp_path):
    from fixtures_report import EASIEST, HARDEST

    sweep = make_sweep(tmp_path, per_gene=True, per_gene_skip=("XXS-dall-s1",), bootstrap=BOOT)
    html_path, md_path = write_report(sweep)
    html, md = html_path.read_text(), md_path.read_text()
    assert (sweep / "figures" / "per_gene.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(IMG_RE.findall(html)) == 4  # one more than the same sweep without per-gene errors
    runs = pd.read_csv(sweep / "results.csv")
    best = runs[runs["status"] == "ok"].sort_values("best_val_mse").iloc[0]["run_id"]
    for doc in (html, md):
        assert "Per-gene error" in doc and "Hardest and easiest genes" in doc
        assert f"Best run by validation MSE: {best}" in doc
        for gene in HARDEST + EASIEST:
            assert re.search(rf"\b{gene}\b", doc), gene
        assert "XXS-dall-s1" in doc and "per_gene.json missing" in doc  # an old run is named, not fatal
        assert "2 never masked on the test split" in doc
    table = md.split("### Hardest and easiest genes")[1].split("###")[0]
    assert [r.split("|")[2].strip() for r in table.strip().splitlines()[2:]] == HARDEST
    fit = json.loads((sweep / "fit.json").read_text())
    pg = fit["entropy_bits"]["per_gene"]
    assert pg["n_genes"] == 510 and pg["bits"] <= pg["homoscedastic_same_errors"]
    # the best run's heteroscedastic row sits next to its homoscedastic one, and obeys Jensen
    m = re.search(r"best run \S+, test MSE, homoscedastic \| ([\d.]+) bits.*\n.*heteroscedastic\) \| ([\d.]+) bits", md)
    assert m and float(m.group(2)) < float(m.group(1))


def test_a_sweep_without_per_gene_files_says_so(report):
    _, html_path, md_path = report
    for doc in (html_path.read_text(), md_path.read_text()):
        assert "No per-gene errors" in doc and "per_gene.json" in doc
    assert not (report[0] / "figures" / "per_gene.png").exists()


def test_chinchilla_sweep_draws_iso_flop_profiles(tmp_path):
    sweep = make_sweep(tmp_path, train_cells=(200, 600, None), diverged=None, failed=None, bootstrap=20,
                       fit_law="chinchilla", per_gene=True)
    html_path, md_path = write_report(sweep)
    md = md_path.read_text()
    assert "Compute-optimal frontier and iso-FLOP profiles" in md and "4 budgets log-spaced" in md
    assert len(IMG_RE.findall(html_path.read_text())) == 6  # 5 + the per-gene figure
    fit = json.loads((sweep / "fit.json").read_text())
    p, co = fit["params"], fit["compute_optimal"]
    iso = plots.IsoFlop(A=p["A"], B=p["B"], E=p["E"], alpha=p["alpha"], beta=p["beta"], k=co["k"],
                        budgets=[r["C"] for r in co["table"][:3]])
    fig = plots.compute_frontier(co["table"], isoflop=iso)
    assert len(fig.axes) == 2
    right = fig.axes[1]
    profiles = [ln for ln in right.get_lines() if len(ln.get_xdata()) > 1]
    stars = [ln for ln in right.get_lines() if len(ln.get_xdata()) == 1]
    assert len(profiles) == 3 and len(stars) == 3
    for prof, star, row in zip(profiles, stars, co["table"][:3]):
        x, y = np.asarray(prof.get_xdata()), np.asarray(prof.get_ydata())
        # the starred N* is the bottom of its profile and the fit's own compute-optimal N*(C)
        assert star.get_xdata()[0] == pytest.approx(row["N_opt"], rel=1e-9)
        assert star.get_ydata()[0] == pytest.approx(row["loss"], rel=1e-9)
        assert star.get_ydata()[0] <= y.min() + 1e-12
        assert x[np.argmin(y)] == pytest.approx(row["N_opt"], rel=0.05)
    assert plots.figure_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_gene_plot_is_pure_and_tolerates_nothing_to_draw(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    genes = [f"gene{i}" for i in range(40)]
    mse = rng.lognormal(0, 0.5, 40)
    mse[3] = np.nan
    runs = [plots_genes.GeneErrors(f"r{i}", s, p, genes, mse * (1 + i)) for i, (s, p) in
            enumerate([("XS", 1e5), ("S", 1e6), ("XXS", 500)])]
    for fig in (plots_genes.per_gene_errors(runs[0], runs), plots_genes.per_gene_errors(None, []),
                plots.isoflop_profiles(plots.IsoFlop(1.0, 1.0, 0.5, 0.3, 0.3, 6.0, [])),
                plots.compute_frontier([], isoflop=plots.IsoFlop(1.0, 1.0, 0.5, 0.3, 0.3, 6.0, [1e9, 1e12]))):
        assert isinstance(fig, Figure) and plots.figure_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"
    texts = " ".join(t.get_text() for t in plots_genes.per_gene_errors(runs[0], runs).axes[0].texts)
    order = np.argsort(np.where(np.isfinite(mse), mse, -np.inf))[::-1][:10]
    names = texts.split()
    assert all(genes[i] in names for i in order) and "gene3" not in names  # never masked: not ranked
    assert list(tmp_path.iterdir()) == []


def test_a_law_whose_size_term_vanishes_has_no_compute_optimum_to_draw():
    # fitted on a gaussian-nll sweep below zero bits (tests/test_negative_bits.py, the slow one):
    # alpha 2.7e-29 and A 1.4e-15 put N* at 0, which divided by zero before
    iso = plots.IsoFlop(A=1.381e-15, B=18.22, E=-7.33, alpha=2.67e-29, beta=0.1, k=281.6, budgets=[1.6e9, 1.35e10])
    assert all(math.isnan(v) for v in iso.optimum(1.6e9))
    fig = plots.isoflop_profiles(iso)
    assert [t.get_text() for t in fig.axes[0].texts] == ["the fitted law gives no finite compute-optimal size"]
    assert not math.isnan(plots.IsoFlop(1.0, 1.0, 0.5, 0.3, 0.3, 6.0, [1e9]).optimum(1e9)[0])


# ---------------------------------------------------------------------------------- sequencing depth


@pytest.fixture(scope="module")
def depth_report(tmp_path_factory):
    """4 sizes x 2 seeds at depths 1, 0.5, 0.25 (floor C + DEPTH_GAIN (1/f - 1)), reported once."""
    sweep = make_sweep(tmp_path_factory.mktemp("depth"), sizes=("XXS", "TINY", "XS", "S"), diverged=None,
                       failed=None, depths=(1.0, 0.5, 0.25), bootstrap=20)
    write_report(sweep)
    return sweep


def test_depth_fits_recover_each_depths_floor(depth_report):
    from fixtures_report import ALPHA, DEPTH_GAIN, C, depth_gene_mean

    fit = json.loads((depth_report / "fit.json").read_text())
    assert set(fit["by_depth"]) == {"1", "0.5", "0.25"}
    for key, f in (("1", 1.0), ("0.5", 0.5), ("0.25", 0.25)):
        d = fit["by_depth"][key]
        assert (d["depth"], d["n_points"], d["n_runs_ok"]) == (f, 8, 8)
        assert d["params"]["c"] == pytest.approx(C + DEPTH_GAIN * (1 / f - 1), abs=0.03)
        assert d["params"]["alpha"] == pytest.approx(ALPHA, abs=0.05)
        assert set(d["ci95"]) == {"a", "alpha", "c"} and d["r2"] > 0.99
        assert d["baselines"]["gene_mean"] == {"val": depth_gene_mean(f), "test": depth_gene_mean(f, "test")}
    # the headline law is the full-depth fit: the same numbers, never a mix of depths
    assert fit["n_points"] == 8 and fit["params"] == fit["by_depth"]["1"]["params"]


def test_depth_section_figure_table_and_run_column(depth_report):
    html, md = (depth_report / "report.html").read_text(), (depth_report / "report.md").read_text()
    fit = json.loads((depth_report / "fit.json").read_text())
    assert (depth_report / "figures" / "loss_vs_depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '<figure id="fig-loss_vs_depth">' in html and "(figures/loss_vs_depth.png)" in md
    assert "## Sequencing depth" in md and "<h2>Sequencing depth</h2>" in html
    for key in ("1", "0.5", "0.25"):
        d = fit["by_depth"][key]
        lo, hi = d["ci95"]["c"]
        row = (f"| {key} | 8 | {d['params']['alpha']:.4g} | [{d['ci95']['alpha'][0]:.4g}, {d['ci95']['alpha'][1]:.4g}] "
               f"| {d['params']['c']:.4g} | [{lo:.4g}, {hi:.4g}] | {d['r2']:.4g} | False | {d['baselines']['gene_mean']['test']:.4g} |")
        assert row in md, row
    assert "only the 8 runs at full depth (1) were fitted here" in md
    assert "| run_id | size | params | train_cells | depth | seed |" in md
    assert "| XS-dall-s1-f0.25 | XS | 132,993 | all | 0.25 | 1 |" in md
    assert "at sequencing depths 1, 0.5, 0.25 of the reads" in md  # the methods paragraph


def test_a_sweep_without_depths_has_no_depth_section(report):
    sweep, html_path, md_path = report
    assert "by_depth" not in json.loads((sweep / "fit.json").read_text())
    assert not (sweep / "figures" / "loss_vs_depth.png").exists()
    md = md_path.read_text()
    assert "Sequencing depth" not in md and "depth" not in " ".join(load_sweep(sweep).notes)
    assert "| run_id | size | params | train_cells | depth | seed |" in md  # an old results.csv: full depth
    assert "| XXS-dall-s0 | XXS | 533 | all | 1 | 0 |" in md


def test_headline_depth_is_full_depth_else_the_largest():
    from cellscale.report.writer import _fit_subset, headline_depth

    def runs(depths):
        return pd.DataFrame({"run_id": [f"r{i}" for i in range(len(depths))], "status": "ok", "params": 1e3,
                             "best_val_mse": 1.0, "train_cells": np.nan, "depth": depths})

    assert headline_depth(runs([1.0, 1.0])) is None
    assert headline_depth(runs([0.25, 1.0, 0.5])) == 1.0
    used, note = _fit_subset(runs([0.25, 0.5, 0.5]), "power-floor")
    assert list(used["run_id"]) == ["r1", "r2"]
    assert "only the 2 runs at the largest depth, 0.5 were fitted here" in note


def test_loss_vs_depth_plot_is_pure():
    df = pd.DataFrame({"size": ["XS", "XS", "S", "S"], "params": [1e4, 1e4, 1e5, 1e5], "status": "ok",
                       "depth": [1.0, 0.25, 1.0, 0.25], "best_val_mse": [1.0, 1.5, 0.9, 1.4]})
    fig = plots.loss_vs_depth(df, refs={"gene mean": {1.0: 1.2, 0.25: 1.8}})
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["0.25", "1"]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["XS (10,000 params)"].get_ydata()) == [1.5, 1.0]  # mean per depth, ascending depth
    assert list(lines["gene mean"].get_ydata()) == [1.8, 1.2]
    empty = plots.loss_vs_depth(df.assign(status="failed"))
    assert "no finished runs" in empty.axes[0].texts[0].get_text()


def test_a_dataset_that_keeps_every_gene_is_named_in_the_warnings(tmp_path: Path):
    sweep = make_sweep(tmp_path, sizes=("XXS", "TINY", "XS"), seeds=(0,), diverged=None, failed=None, bootstrap=0)
    path = tmp_path / "dataset" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["preprocessing"] = {"kept_count_share": {"median": 0.999, "min": 0.97}}
    path.write_text(json.dumps(manifest))
    write_report(sweep)
    md = (sweep / "report.md").read_text()
    assert ("The kept genes hold 99.9% of a median cell's counts (at least 97.0%): the values are normalised by the "
            "library size over all genes, so the visible genes give away the masked genes' total") in md
    manifest["preprocessing"]["kept_count_share"] = {"median": 0.5, "min": 0.3}
    path.write_text(json.dumps(manifest))
    write_report(sweep)
    assert "give away the masked genes' total" not in (sweep / "report.md").read_text()
