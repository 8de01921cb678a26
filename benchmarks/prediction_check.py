"""The judge of a data axis: does a sweep's own joint law L(N, D) predict a longer run?

    python benchmarks/prediction_check.py SWEEP_DIR --size XS --factor 4     # the demo: ~10 minutes on 2 cores

Trains one run of SWEEP_DIR's study (``cellscale.train.spec.resolve_run``: the same model, recipe and
seed, at the size's learning rate chosen in the sweep) for ``--factor`` times the sweep's maximum
cells seen, with no early stop, into ``SWEEP_DIR/checks/<size>-x<factor>``; then fits the sweep's
data axis as its report does (``cellscale.report.data_axis.run_data_fit``) and prints, for every
cooldown branch of the longer run beyond the sweep's maximum, the law's prediction with its 95%
prediction interval against the measured test loss (the quantity the law is fitted to), the error
in percent, and whether the interval holds it; and for each run of that size the rule called converged
at D, what the longer run bought from D to 2 D. A rerun reuses a finished check run.

    python benchmarks/prediction_check.py SWEEP_DIR --size XS --factor 4 --seeds 0 1 2

trains one longer run per seed (seeds other than the sweep's first into ``<size>-x<factor>-s<seed>``)
and judges the law against each and against their mean: one run's loss carries its seed's offset
(on 8k real PBMCs, 5% between two seeds of XS at the same cells seen), while the law estimates the
expected loss.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cellscale.config import load_study_config
from cellscale.data.store import Dataset
from cellscale.fit.compare import prediction_error
from cellscale.report.data_axis import prediction_clause, run_data_fit
from cellscale.report.load import load_sweep
from cellscale.rules.lrgrid import select_lr
from cellscale.train import train_run
from cellscale.train.spec import resolve_run


def chosen_multiple(sd, size: str) -> float:
    """The learning-rate multiple the sweep chose for ``size`` (1 without a rate grid)."""
    ok = sd.runs[(sd.runs["status"] == "ok") & (sd.runs["size"] == size)]
    sel = select_lr(ok, loss_col=sd.choice_col)
    return float(sel.kept["lr_scale"].iloc[0]) if sel.choices else 1.0


def longer_run(sweep: Path, size: str, factor: float, lr_multiple: float | None = None,
               train_cells: int | None = None, seed: int | None = None) -> tuple[Path, dict]:
    cfg = load_study_config(sweep / "config.yaml")
    meta = json.loads((sweep / "sweep.json").read_text())
    ds = Dataset.open(meta["dataset"])
    sd = load_sweep(sweep)
    cells = int(round(cfg.train.cells_seen * factor))
    # no early stop: every branch of the longer run is a point to predict
    flags = {"cells_seen": cells, "plateau_min_cells": 10 * cells}
    multiple = chosen_multiple(sd, size) if lr_multiple is None else lr_multiple
    spec = resolve_run(cfg, size=size, n_genes=ds.n_genes, n_train=int(ds.splits["train"].size),
                       seed=cfg.sweep.seeds[0] if seed is None else seed, lr_multiple=multiple,
                       train_cells=train_cells, train_flags=flags)
    out = sweep / "checks" / (f"{size}-x{factor:g}" + ("" if lr_multiple is None else f"-lr{lr_multiple:g}")
                              + ("" if train_cells is None else f"-d{train_cells}")
                              + ("" if seed is None else f"-s{seed}"))
    result = train_run(ds, spec.model, spec.train, out=out, train_cells=spec.train_cells, seed=spec.seed,
                       run_id=out.name)
    return out, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--size", default="XS")
    ap.add_argument("--factor", type=float, default=4.0)
    ap.add_argument("--lr-multiple", type=float, default=None,
                    help="train at this multiple of the rule's rate (default: the one the sweep chose for the size)")
    ap.add_argument("--train-cells", type=int, default=None, help="on this nested training set (default: all)")
    ap.add_argument("--seeds", "--seed", type=int, nargs="+", default=None,
                    help="train a longer run with each of these seeds (default: the sweep's first) and judge the law "
                         "against each and against their mean, the expected loss the law estimates")
    a = ap.parse_args()
    first = load_study_config(a.sweep / "config.yaml").sweep.seeds[0]
    runs = [longer_run(a.sweep, a.size, a.factor, a.lr_multiple, a.train_cells, None if s == first else s)
            for s in (a.seeds or [first])]
    sd = load_sweep(a.sweep)
    data = run_data_fit(sd)
    if data is None or data.fit is None:
        raise SystemExit(f"error: the sweep has no data fit ({None if data is None else data.error})")
    fit = data.fit
    print(f"{a.sweep}: law {fit.result.law.name} on {fit.result.n_points} points, params "
          + ", ".join(f"{k} {v:.4g}" for k, v in fit.result.params.items()))
    branches = [json.loads((out / "branches.json").read_text())["branches"] for out, _ in runs]
    table = judged_rows(fit, [(result, rows) for (_, result), rows in zip(runs, branches)],
                        top=float(sd.branches["cells_seen"].max()))
    print("| seed | cells seen | x the sweep's max | predicted test loss | 95% prediction interval | measured | error "
          "| inside |")
    print("|---|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['seed']} | {t['cells_seen']:,.0f} | {t['factor']:.3g} | {t['predicted']:.4f} | "
              f"[{t['lo']:.4f}, {t['hi']:.4f}] | {t['measured']:.4f}{t.get('pm', '')} | {t['error']:+.2f}% | "
              f"{'yes' if t['inside'] else 'NO'} |")
    # what the report says of the same law from the sweep's own points, beside what the longer run says
    print("the report's backtest:", prediction_clause(data))
    for (out, result), rows in zip(runs, branches):
        converged_check(sd, a.size, rows, lr_scale=float(result["lr_scale"]),
                        train_cells=float(result["train_cells"]), seed=int(result["seed"]))
        if not np.isfinite(result.get("test_mse") or np.nan):
            print(f"the longer run {out.name} did not finish ok:", result.get("status"), result.get("error"))


def judged_rows(fit, runs: list[tuple[dict, list[dict]]], *, top: float) -> list[dict]:
    """The law's prediction against each longer run's cooled-down test loss at every branch beyond the
    sweep's maximum ``top``, and, with several seeds, against their mean at each cells seen that all
    reached ("mean", its standard error across seeds in ``pm``). The interval is the one for a new run,
    so for a mean of k runs it is wider than it need be."""
    # every longer run is the same size on the same training cells; only the seed differs
    n, u = float(runs[0][0]["params"]), float(runs[0][0]["train_cells"])
    out, by_d = [], {}
    for result, rows in runs:
        for r in rows:
            if r["cells_seen"] > top:
                by_d.setdefault(float(r["cells_seen"]), []).append(float(r["test_loss"]))
                out.append(_judged(fit, n, float(r["cells_seen"]), u, float(r["test_loss"]), top,
                                   seed=str(result["seed"])))
    if len(runs) > 1:
        for d, got in sorted(by_d.items()):
            if len(got) == len(runs):
                pm = f" +- {np.std(got, ddof=1) / np.sqrt(len(got)):.4f}"
                out.append(_judged(fit, n, d, u, float(np.mean(got)), top, seed=f"mean of {len(got)}", pm=pm))
    return out


def _judged(fit, n: float, d: float, u: float, got: float, top: float, **extra) -> dict:
    pred = float(fit.predict([n], [d], [u])[0])
    lo, hi = (float(v[0]) for v in fit.prediction_interval([n], [d], [u]))
    return {"cells_seen": d, "factor": d / top, "predicted": pred, "lo": lo, "hi": hi, "measured": got,
            "error": 100 * prediction_error(pred, got, fit.unit), "inside": lo <= got <= hi, **extra}


def converged_check(sd, size: str, rows: list[dict], *, lr_scale: float, train_cells: float, seed: int) -> None:
    """For each sweep run of ``size`` at the longer run's rate, training set and seed that the rule called
    converged at D: what the longer run (the same recipe and seed, so the same path to D) bought from
    D to 2 D, cooled down, on validation cells (the loss the rule reads) and on test cells."""
    from cellscale.rules.plateau import doubling_gain, next_doubling

    cells = [float(r["cells_seen"]) for r in rows]
    runs = sd.runs.assign(train_cells=sd.runs["train_cells"].fillna(sd.full_train or np.nan))
    ok = runs[(runs["size"] == size) & (runs["status"] == "ok") & np.isclose(runs["lr_scale"], lr_scale)
              & np.isclose(runs["train_cells"], train_cells) & (runs["seed"] == seed)]
    for r in ok.itertuples():
        if r.converged is not True and r.converged != 1:
            continue
        d = float(r.cells_seen)
        i = next((k for k, c in enumerate(cells) if np.isclose(c, d)), None)
        j = None if i is None else next_doubling(cells, i)
        if j is None:
            print(f"{r.run_id}: converged at {d:,.0f} cells seen; the longer run has no branch there and about "
                  "twice as far")
            continue
        at, nxt = rows[i], rows[j]
        unit = str(at.get("loss_unit", "mse"))
        g_val = doubling_gain(at["val_loss"], nxt["val_loss"], unit)
        g_test = doubling_gain(at["test_loss"], nxt["test_loss"], unit)
        print(f"{r.run_id}: converged at {d:,.0f} cells seen; {cells[j] / d:.2g}x longer buys {100 * g_val:+.2f}% "
              f"(validation), {100 * g_test:+.2f}% (test)")


if __name__ == "__main__":
    main()
