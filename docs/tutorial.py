"""cellscale from a notebook, step by step: a ladder, its law, its report, and a run's embedding in scanpy.

    .venv/bin/python docs/tutorial.py [OUT_DIR]        # about a minute on 2 CPU cores; CI runs it

Every step is one call of the Python API (``cellscale.<name>``), printed as it goes. Copy the steps
into a notebook cell by cell; each reads only what the step before it wrote.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc

import cellscale


def step(text: str) -> None:
    print(f"\n## {text}", flush=True)


def main(out: Path) -> None:
    # 1. A ladder: the smoke preset (simulated cells, four model sizes, one seed each). A real study
    #    names a preset (`cellscale.list_presets()`) or a YAML config, and its own .h5ad or Census.
    step("1. train a ladder of model sizes (the smoke preset)")
    cfg = cellscale.resolve_config(preset="smoke")
    cellscale.run_study(cfg, out=out, progress=False)
    runs = pd.read_csv(out / "results.csv")
    print(runs[["run_id", "params", "best_val_mse", "test_mse", "status"]].to_string(index=False))

    # 2. The law: L = a P^-alpha + c on the test loss of each size (chosen on validation), with
    #    intervals that hold the evaluation cells' noise (the runs' per-cell sums sit in out/runs).
    step("2. fit the scaling law to the runs")
    fit = cellscale.fit_csv(out / "results.csv", law="power-floor", bootstrap=200)
    for name, value in zip(fit.law.param_names, fit.theta):
        lo, hi = fit.ci95[name]
        print(f"{name} = {value:.4g}  95% CI [{lo:.4g}, {hi:.4g}]")
    print("floor identified:", fit.extra["judgement"]["floor_identified"])

    # 3. The report: verdicts, the law, the data axis, the downstream scores (report.md / .html).
    step("3. write the report")
    html, md = cellscale.write_report(out)
    verdicts = md.read_text().split("## What this means", 1)[1].split("\n\n")[1]
    print(verdicts)

    # 4. Embed cells with the best run, as you would your own: raw counts in an AnnData, genes by
    #    name, in any order. Here: the simulator's cells (all 200 of its genes, raw counts).
    step("4. embed cells with the best run (obsm['X_cellscale'])")
    best = runs[runs["status"] == "ok"].sort_values("best_val_mse").iloc[0]["run_id"]
    adata = cellscale.data.build.load_source(cfg.data)[:600].copy()
    cellscale.embed(adata, out / "runs" / best)
    print(adata)
    print("provenance:", {k: adata.uns["cellscale"][k] for k in ("size", "dataset", "n_missing_genes")})

    # 5. scanpy from here: a neighbour graph on the embedding (and umap, leiden, ... as usual).
    step("5. scanpy neighbours on the embedding")
    sc.pp.neighbors(adata, use_rep="X_cellscale", n_neighbors=10, method="gauss")
    degree = np.asarray((adata.obsp["connectivities"] > 0).sum(axis=1)).ravel()
    print(f"neighbour graph: {adata.n_obs} cells, median degree {int(np.median(degree))}")
    assert adata.obsm["X_cellscale"].shape == (adata.n_obs, int(adata.uns["cellscale"]["d_model"]))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp) / "smoke")
