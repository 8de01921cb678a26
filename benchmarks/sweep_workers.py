"""A local sweep one run after another in one process, against the same sweep on one process
per core (``sweep.workers: auto``): how much faster does the ladder train?

The sweep is the shipped demo preset's sizes, data and training settings with a smaller budget
(``--cells`` per run, fixed budget, one learning rate), so that both arms train exactly the same
runs. Each arm is a fresh ``cellscale sweep`` process on its own copy of one prebuilt dataset;
the time is the sweep's wall clock (dataset reuse and baselines included, the same in both). The
numbers of both arms are printed side by side as well: they are the same runs on other threads,
so they differ only by floating-point summation order.

    python benchmarks/sweep_workers.py                 # about 4 minutes on 2 cores
    python benchmarks/sweep_workers.py --cells 10000   # a quick look
Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from cellscale.config import load_study_config, preset_path

CLI = "import sys; from cellscale.cli import main; sys.exit(main(sys.argv[1:]))"


def study(dataset: Path, cells: int) -> dict:
    cfg = load_study_config(preset_path("demo")).model_dump(mode="json")
    cfg["dataset"] = str(dataset)
    cfg["train"].update({"cells_seen": cells, "budget": "fixed"})
    cfg["sweep"]["lr_multipliers"] = [1.0]
    return cfg


def arm(workdir: Path, cfg: dict, workers: str) -> tuple[float, dict[str, float]]:
    out = workdir / f"workers-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    path = workdir / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", CLI, "-q", "sweep", str(path), "--out", str(out), "--workers", workers],
                   check=True)
    wall = time.perf_counter() - t0
    with open(out / "results.csv") as fh:
        losses = {r["run_id"]: float(r["best_val_mse"]) for r in csv.DictReader(fh)}
    return wall, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=40_000, help="cells seen per run (default 40,000)")
    ap.add_argument("--workdir", default="bench-sweep-workers")
    a = ap.parse_args()
    workdir = Path(a.workdir)
    workdir.mkdir(exist_ok=True)
    data = load_study_config(preset_path("demo")).data
    ds = workdir / "dataset"
    if not (ds / "manifest.json").exists():
        subprocess.run([sys.executable, "-c", CLI, "-q", "data", "build", "--source", "simulate",
                        "--genes", str(data.genes), "--cells", str(data.cells), "--seed", str(data.seed),
                        "--config", str(preset_path("demo")), "--out", str(ds), "--overwrite"], check=True)
    cfg = study(ds.resolve(), a.cells)
    one, one_loss = arm(workdir, cfg, "1")
    auto, auto_loss = arm(workdir, cfg, "auto")
    print(f"demo ladder, {len(one_loss)} runs of {a.cells:,} cells seen")
    print(f"  one after another (workers 1): {one:7.1f} s")
    print(f"  one process per core (auto):   {auto:7.1f} s")
    print(f"  speed-up: {one / auto:.2f}x")
    for rid in one_loss:
        print(f"  {rid:16s} validation MSE {one_loss[rid]:.4f} (workers 1)  {auto_loss[rid]:.4f} (auto)")


if __name__ == "__main__":
    main()
