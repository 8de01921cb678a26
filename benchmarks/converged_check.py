"""Does "converged" hold up? What the next doubling bought, for every run the rule would have stopped.

    python benchmarks/converged_check.py SWEEP_DIR [--min-cells 40000] [--patience 1] [--z 1]

SWEEP_DIR is a sweep whose runs were *not* stopped early (``train.plateau_min_cells`` above
``train.cells_seen``, so every run trains to its maximum with a cooldown branch at every doubling):
a run's branches at D and 2 D are then exactly a run stopped at D and a run twice as long (the
same recipe and seed follow the same stable path; ``cellscale.train.branches``). For each run this
applies the convergence rule (``cellscale.rules.plateau.converged_at``, with the study's
``plateau_min_cells`` or ``--min-cells``, and optionally another patience or number of standard
errors) to its branch table, and prints the point at which the run would have stopped and what the
next doubling then bought, cooled down, on the validation cells (the loss the rule reads) and on
the test cells; then the share of stopped runs whose next doubling bought under the tolerance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cellscale.config import TrainConfig
from cellscale.rules import plateau
from cellscale.rules.plateau import converged_at, doubling_gain, has_learned


def run_rows(sweep: Path) -> list[tuple[str, list[dict]]]:
    runs = sorted(p for p in (sweep / "runs").iterdir() if (p / "branches.json").is_file())
    return [(p.name, json.loads((p / "branches.json").read_text())["branches"]) for p in runs]


def stop_and_next(rows: list[dict], gene_mean: float, *, min_cells: float, patience: int,
                  tol: float) -> tuple[int, float, float] | None:
    """(cells seen where the rule stops the run, the next doubling's validation gain, its test gain);
    None when the rule never fires or the run has no branch at twice that."""
    cells = [float(r["cells_seen"]) for r in rows]
    val = [r["val_loss"] for r in rows]
    learned = [has_learned(v, gene_mean, tol) for v in val]
    i = converged_at(cells, val, tol=tol, min_cells=min_cells, patience=patience,
                     ses=[r.get("gain_se") for r in rows], learned=learned)
    if i is None:
        return None
    at = {int(r["cells_seen"]): r for r in rows}
    d = int(cells[i])
    if 2 * d not in at:
        return None
    nxt = at[2 * d]
    return d, doubling_gain(val[i], nxt["val_loss"]), doubling_gain(rows[i]["test_loss"], nxt["test_loss"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--min-cells", type=float, default=40000)
    ap.add_argument("--patience", type=int, default=TrainConfig().plateau_patience)
    ap.add_argument("--tol", type=float, default=TrainConfig().plateau_tol)
    ap.add_argument("--z", type=float, default=plateau.Z, help="standard errors the gain must clear the tolerance by")
    a = ap.parse_args()
    plateau.Z = a.z
    gene_mean = json.loads((a.sweep / "baselines.json").read_text())["gene_mean"]["val"]
    print("| run | stopped at (cells seen) | its last doubling (val) | next doubling: val | next doubling: test |")
    print("|---|---|---|---|---|")
    nexts = []
    for name, rows in run_rows(a.sweep):
        got = stop_and_next(rows, gene_mean, min_cells=a.min_cells, patience=a.patience, tol=a.tol)
        if got is None:
            print(f"| {name} | never (or no branch at twice it) | | | |")
            continue
        d, g_val, g_test = got
        last = next(r for r in rows if int(r["cells_seen"]) == d)
        nexts.append(g_val)
        print(f"| {name} | {d:,} | {100 * last['gain']:+.2f}% +- {100 * last['gain_se']:.2f}% | "
              f"{100 * g_val:+.2f}% | {100 * g_test:+.2f}% |")
    if nexts:
        v = np.array(nexts)
        print(f"\n{len(v)} runs stopped; next doubling (val) under {100 * a.tol:g}%: "
              f"{int((v < a.tol).sum())} of {len(v)}; mean {100 * v.mean():+.2f}%, max {100 * v.max():+.2f}%")


if __name__ == "__main__":
    main()
