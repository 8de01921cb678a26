"""How much a loss that made choices flatters a sweep's floor (issue 26, part 3).

    python benchmarks/selection_bias.py SWEEP_DIR        # seconds: reads a finished sweep, trains nothing

A sweep chooses on its validation cells: each size's learning rate (the lowest validation loss over
the grid), each run's checkpoint (the best evaluation; the plateau budget's is its last), and when a
run stops. A validation loss that made those choices is biased low as an estimate of the chosen
model's loss; the test loss at the same checkpoint and rate made none. This prints, on SWEEP_DIR:

- per size, the chosen run's validation and test loss, each relative to the gene-mean baseline on
  the same cells (so that the two cell sets' own difficulty cancels), and the same for the runs at
  rates that were not chosen: the selection bias is the chosen runs' val-minus-test gap beyond the
  unchosen runs' gap (which holds the cells' difference and no choice);
- the size law fitted as the report fits it, once to the validation column and once to the test
  column, each floor beside the exact Bayes floor on its own cells when the data are simulated;
- the same for the data axis on the cooldown branches (``val_loss`` against ``test_loss``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from cellscale.config import load_study_config
from cellscale.errors import FitError
from cellscale.fit import fit_table
from cellscale.fit.data_axis import fit_data_axis
from cellscale.report.data_axis import branch_points
from cellscale.report.fitting import fit_subset
from cellscale.report.load import load_sweep
from cellscale.rules.lrgrid import select_lr


def _rel(frame: pd.DataFrame, col: str, gm: str) -> pd.Series:
    return pd.to_numeric(frame[col], errors="coerce") / pd.to_numeric(frame[gm], errors="coerce")


def choice_gaps(sd) -> None:
    ok = sd.runs[sd.runs["status"] == "ok"]
    sel = select_lr(ok, loss_col="best_val_mse")
    chosen, other = sel.kept, ok[ok["run_id"].isin(sel.dropped)]
    gap = _rel(chosen, "best_val_mse", "gene_mean_val_mse") - _rel(chosen, "test_mse", "gene_mean_test_mse")
    print("size      val/gm   test/gm   gap (chosen)")
    for (_, r), g in zip(chosen.iterrows(), gap):
        print(f"{r['size']:<8} {r['best_val_mse'] / r['gene_mean_val_mse']:.4f}   "
              f"{r['test_mse'] / r['gene_mean_test_mse']:.4f}   {g:+.4f}")
    base = (_rel(other, "best_val_mse", "gene_mean_val_mse") - _rel(other, "test_mse", "gene_mean_test_mse")).mean()
    if len(other):
        print(f"mean gap, chosen {gap.mean():+.4f}; unchosen rates {base:+.4f} ({len(other)} runs); "
              f"selection bias (chosen minus unchosen) {gap.mean() - base:+.4f} of the gene-mean loss")
    else:
        print(f"mean gap {gap.mean():+.4f}: no run at an unchosen rate, so the gap is the two cell sets' own difference")
    checkpoints = (pd.to_numeric(ok["best_step"]) < pd.to_numeric(ok["steps"])).sum()
    print(f"runs whose checkpoint was chosen before their last step: {checkpoints} of {len(ok)}")


def _floor_line(label: str, fit, name: str, true: float | None) -> str:
    lo, hi = fit.ci95[name] if name in fit.ci95 else (np.nan, np.nan)
    c = float(dict(zip(fit.law.param_names, fit.theta))[name])
    text = f"{label:<22} {name} = {c:.4f} [{lo:.4f}, {hi:.4f}]"
    if true is not None:
        text += f"   true {true:.4f}, fitted minus true {100 * (c / true - 1):+.2f}%"
    return text


def size_law(sd, cfg) -> None:
    law = cfg.fit.law
    used, _ = fit_subset(sd.runs, law, sd.full_train, keep_unconverged=True)
    floors = sd.baselines_json.get("bayes_floor") or {}
    for y, split in (("best_val_mse", "val"), ("test_mse", "test")):
        try:
            fit = fit_table(used, law=law, y=y, bootstrap=0, seed=0)
        except FitError as err:
            print(f"size law on {y}: {err}")
            continue
        print(_floor_line(f"size law on {y}", fit, fit.law.floor, floors.get(split)))


def data_axis(sd) -> None:
    if sd.branches is None or sd.branches.empty:
        return
    floors = sd.baselines_json.get("bayes_floor") or {}
    pts, _, _ = branch_points(sd)  # as the report chooses them
    for y, split in (("val_mse", "val"), ("test_mse", "test")):
        fit = fit_data_axis(pts, y=y, bootstrap=0)
        law = fit.size_law()
        true = floors.get(split)
        text = f"data axis on {y:<9} floor = {law['floor']:.4f} {law['floor_ci95']}"
        if true is not None:
            text += f"   true {true:.4f}, fitted minus true {100 * (law['floor'] / true - 1):+.2f}%"
        print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    args = ap.parse_args()
    sd = load_sweep(args.sweep)
    cfg = load_study_config(args.sweep / "config.yaml")
    print(f"# {args.sweep}")
    choice_gaps(sd)
    size_law(sd, cfg)
    data_axis(sd)


if __name__ == "__main__":
    main()
