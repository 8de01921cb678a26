"""One training job alone, then beside a competitor: how much does sharing the machine cost?

The job is ``cellscale train`` (XS, V = 64, batch 64, a fixed number of cells). It runs, each
in a fresh process:

1. alone;
2. beside a second copy of itself (the competitor trains for longer and is stopped when the
   measured job ends);
3. beside a plain CPU-bound process (one busy Python loop).

and prints each slowdown, the job's training wall time beside a competitor over the same
alone. On C cores with one competitor the fair share is about 2x (the competitor takes half
the machine); the target is 2.5x or less.

Two ways of running the job are measured side by side in the same session:

- ``cellscale``: the command line as shipped, which sets passive OpenMP waits and one thread
  per usable CPU before torch loads (``cellscale.runtime.cpus``);
- ``torch defaults``: the same command with torch imported first, so its OpenMP and thread
  pools keep their defaults (libgomp's spinning waits): the behaviour before ``cellscale.runtime.cpus``.

    python benchmarks/contention.py                    # about 5-10 minutes on 2 cores
    python benchmarks/contention.py --cells 4000       # a quick look
Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TARGET = 2.5
BUSY_LOOP = "while True: pass"
# the reference imports torch before cellscale's command line can set the environment
TORCH_FIRST = "import sys, torch; from cellscale.cli import main; sys.exit(main(sys.argv[1:]))"
SHIPPED = "import sys; from cellscale.cli import main; sys.exit(main(sys.argv[1:]))"
MODES = {"cellscale": SHIPPED, "torch defaults": TORCH_FIRST}


def _clean_env() -> dict[str, str]:
    """The environment of a user who set no thread variables."""
    drop = {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def build_dataset(workdir: Path) -> Path:
    ds = workdir / "dataset"
    if not (ds / "manifest.json").exists():
        subprocess.run([sys.executable, "-c", SHIPPED, "-q", "data", "build", "--source", "simulate", "--genes", "64",
                        "--cells", "2000", "--out", str(ds), "--overwrite"], check=True, env=_clean_env())
    return ds


def _train_argv(ds: Path, out: Path, cells: int) -> list[str]:
    return ["-q", "train", "--data", str(ds), "--size", "XS", "--out", str(out), "--cells-seen", str(cells),
            "--batch-size", "64"]


def train(mode: str, ds: Path, out: Path, cells: int) -> float:
    """The job's training wall time (result.json), in a fresh process, from scratch."""
    shutil.rmtree(out, ignore_errors=True)  # a finished run would only be read back
    r = subprocess.run([sys.executable, "-c", MODES[mode], *_train_argv(ds, out, cells)], env=_clean_env(),
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: the measured job failed: {r.stderr.strip()[-500:]}")
    return float(json.loads((out / "result.json").read_text())["wall_seconds"])


def competitor(kind: str, mode: str, ds: Path, out: Path, cells: int) -> subprocess.Popen:
    if kind == "cpu":
        argv = [sys.executable, "-c", BUSY_LOOP]
    else:  # a second job of the same kind, long enough to outlast the measured one
        shutil.rmtree(out, ignore_errors=True)
        argv = [sys.executable, "-c", MODES[mode], *_train_argv(ds, out, cells * 100)]
    proc = subprocess.Popen(argv, env=_clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3.0)  # let it start up and load torch, so the measured job meets it at work
    return proc


def beside(kind: str, mode: str, ds: Path, workdir: Path, cells: int) -> float:
    proc = competitor(kind, mode, ds, workdir / f"competitor-{kind}", cells)
    try:
        return train(mode, ds, workdir / "measured", cells)
    finally:
        proc.kill()
        proc.wait()


def measure(mode: str, ds: Path, workdir: Path, cells: int) -> dict[str, float]:
    alone = train(mode, ds, workdir / "measured", cells)
    return {"alone": alone, "cellscale": beside("cellscale", mode, ds, workdir, cells),
            "cpu": beside("cpu", mode, ds, workdir, cells)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=20_000, help="cells the measured job trains on")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cellscale-bench-contention"))
    ap.add_argument("--modes", default="cellscale,torch defaults")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ds = build_dataset(args.workdir)
    print(f"job: cellscale train XS, V=64, batch 64, {args.cells:,} cells; {os.cpu_count()} CPUs visible")
    print(f"{'mode':<16}{'alone s':>9}{'+cellscale s':>14}{'slowdown':>10}{'+cpu loop s':>13}{'slowdown':>10}")
    summary = []
    for mode in args.modes.split(","):
        t = measure(mode, ds, args.workdir, args.cells)
        r_job, r_cpu = t["cellscale"] / t["alone"], t["cpu"] / t["alone"]
        print(f"{mode:<16}{t['alone']:>9.1f}{t['cellscale']:>14.1f}{r_job:>9.2f}x{t['cpu']:>13.1f}{r_cpu:>9.2f}x",
              flush=True)
        key = mode.replace(" ", "_")
        summary += [f"slowdown_job_{key}={r_job:.2f}", f"slowdown_cpu_{key}={r_cpu:.2f}"]
    print(f"target: {TARGET}x or less with one competitor")
    print(" ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
