"""What cooldown branches cost: a plateau-budget run with a branch at every doubling of its cells
seen, against the same run with only its own final cooldown (``branch_min_cells`` = its maximum),
side by side in one process, alternating, so that both see the same load.

Both arms train the same stable phase on the same batches and end with the same cooldown (the
branched run's final branch is its own end), so their end points agree to every digit; the ratio
of wall times is what the other branches (their cooldown steps and their validation and test
scoring) add. The target (issue 25) is at most 1.5x.

    python benchmarks/branch_cost.py                       # the demo's data, XS to 120,000 cells
    python benchmarks/branch_cost.py --size SMALL --cells 60000 --rounds 1
Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cellscale.config import DataConfig, TrainConfig, load_study_config, preset_path
from cellscale.data.build import build_dataset
from cellscale.model.ladder import get_size
from cellscale.train import train_run


def demo_model(size: str, n_genes: int):
    cfg = load_study_config(preset_path("demo"))
    return get_size(size, n_genes=n_genes, custom=cfg.sweep.custom_sizes, **cfg.model)


def one(ds: Path, size: str, train: TrainConfig, out: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    res = train_run(ds, demo_model(size, 32), train, out=out, overwrite=True)
    return time.perf_counter() - t0, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="XS")
    ap.add_argument("--cells", type=int, default=120_000, help="the runs' maximum cells seen")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    demo = load_study_config(preset_path("demo"))
    base = demo.train.model_copy(update={"cells_seen": a.cells, "plateau_min_cells": 10**12, "num_threads": 1})
    arms = {"final cooldown only": base.model_copy(update={"branch_min_cells": a.cells}), "branched": base}
    with tempfile.TemporaryDirectory() as tmp:
        ds = build_dataset(DataConfig(**demo.data.model_dump()), out=Path(tmp) / "ds", progress=False)
        walls: dict[str, list[float]] = {k: [] for k in arms}
        results: dict[str, dict] = {}
        for r in range(a.rounds):
            for name, cfg in arms.items():
                wall, results[name] = one(ds, a.size, cfg, Path(tmp) / f"{name}-{r}")
                walls[name].append(wall)
                print(f"round {r}: {name:>20}: {wall:7.1f} s, {results[name]['n_branches']} branch(es), "
                      f"test MSE {results[name]['test_mse']:.4f}", flush=True)
    single, branched = min(walls["final cooldown only"]), min(walls["branched"])
    res = results["branched"]
    print(f"{a.size} to {a.cells:,} cells: branched {branched:.1f} s / final cooldown only {single:.1f} s = "
          f"{branched / single:.2f}x wall; training FLOPs {(res['flops'] + res['branch_flops']) / res['flops']:.2f}x; "
          f"end points equal: {results['branched']['test_mse'] == results['final cooldown only']['test_mse']}")


if __name__ == "__main__":
    main()
