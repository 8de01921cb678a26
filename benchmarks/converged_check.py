"""Does "converged" hold up? What the next doubling bought, for every run the rule would have stopped.

    python benchmarks/converged_check.py SWEEP_DIR [--min-cells 40000] [--patience 1] [--z 1]

SWEEP_DIR is a sweep whose runs were *not* stopped early (``train.plateau_min_cells`` above
``train.cells_seen``, so every run trains to its maximum with a cooldown branch at every doubling):
a run's branches at D and 2 D are then exactly a run stopped at D and a run twice as long (the
same recipe and seed follow the same stable path; ``cellscale.train.branches``). For each run this
applies the convergence rule (``cellscale.rules.plateau.ladder_converged_at``, as the trainer reads it, with no convergence called
before ``--min-cells``, by default the demo's ``plateau_min_cells``, and the studies' default
patience and tolerance unless given) to its branch table, and prints the point at which the run
would have stopped and what the next doubling then bought, cooled down, on the validation cells
(the loss the rule reads) and on the test cells, or that the rule fired only at its last branch;
then the share of the stopped runs with a next doubling whose gain was under the tolerance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cellscale.config import TrainConfig
from cellscale.rules import plateau
from cellscale.rules.plateau import doubling_gain, gains, ladder_converged_at


def run_rows(sweep: Path) -> list[tuple[str, list[dict]]]:
    """Each run's finished branch points, in order of cells seen."""
    runs = sorted(p for p in (sweep / "runs").iterdir() if (p / "branches.json").is_file())
    return [(p.name, [r for r in json.loads((p / "branches.json").read_text())["branches"]
                      if r.get("status", "ok") == "ok"]) for p in runs]


def stop_and_next(rows: list[dict], gene_mean: float, *, min_cells: float, patience: int,
                  tol: float) -> tuple[int, float | None, float | None, float | None] | None:
    """(the index of the branch where the rule stops the run, the gain it read there, the next
    doubling's gain on the validation cells, on the test cells): the next doubling read against the first later branch with
    at least about twice (``plateau.HALF``) its cells seen, as the rule reads its own; gains None when
    the run has no such branch. None when the rule never fires."""
    unit = str(rows[0].get("loss_unit", "mse")) if rows else "mse"
    cells = [float(r["cells_seen"]) for r in rows]
    val = [r["val_loss"] for r in rows]
    i = ladder_converged_at(rows, gene_mean, unit=unit, tol=tol, patience=patience, min_cells=min_cells)
    if i is None:
        return None
    j = plateau.next_doubling(cells, i)
    own = gains(cells, val, unit)[i]
    if j is None:
        return i, own, None, None
    nxt = rows[j]
    return (i, own, doubling_gain(val[i], nxt["val_loss"], unit),
            doubling_gain(rows[i]["test_loss"], nxt["test_loss"], unit))


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.2f}%"


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
            print(f"| {name} | never | | | |")
            continue
        i, own, g_val, g_test = got
        last = rows[i]
        se = "" if last.get("gain_se") is None else f" +- {100 * last['gain_se']:.2f}%"
        if g_val is None:
            print(f"| {name} | {int(last['cells_seen']):,} (its last branch) | {_pct(own)}{se} | "
                  "no later branch | |")
            continue
        nexts.append(g_val)
        print(f"| {name} | {int(last['cells_seen']):,} | {_pct(own)}{se} | {_pct(g_val)} | {_pct(g_test)} |")
    if nexts:
        v = np.array(nexts)
        print(f"\n{len(v)} stopped runs with a next doubling; it bought (val) under {100 * a.tol:g}% in "
              f"{int((v < a.tol).sum())} of {len(v)}; mean {100 * v.mean():+.2f}%, max {100 * v.max():+.2f}%")


if __name__ == "__main__":
    main()
