"""Coverage and width of the interval methods of cellscale.fit, on simulated studies.

    python benchmarks/interval_coverage.py --design study --noise 0.01,0.03 --replicates 200
    python benchmarks/interval_coverage.py --design demo --noise 0.01,0.03 --replicates 200
    python benchmarks/interval_coverage.py --design chinchilla --noise 0.01,0.03 --replicates 100

Each replicate simulates a table from a known law (``simulate_table``: log-normal noise,
seed = replicate number), fits it with huber-log, and computes every interval method of
``cellscale.fit.intervals`` on that one fit; ``residual`` and ``residual-t`` share one
residual bootstrap. Designs:

- ``study``: the seed study's six sizes (533 to 1e8 parameters at V = 512) x 3 seeds, its
  published fit a 2.153, alpha 0.266, c 1.444;
- ``demo``: configs/demo.yaml's five sizes at V = 64 (parameter counts from
  ``cellscale.model.ladder``) x 1 seed, the law the demo itself fitted (a 1.070, alpha 0.0976,
  c 0.340);
- ``chinchilla``: 4 model sizes x 4 data sizes x 1 seed, Besiroglu et al.'s estimates.

Prints one markdown row per (design, noise, method, parameter): coverage of the 95%
interval, its Monte Carlo standard error, and the median width; ``--json PATH`` keeps the
per-replicate numbers. Deterministic: the same flags print the same table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from cellscale.fit import LAWS, METHODS, simulate_table
from cellscale.fit.data import prepare
from cellscale.fit.intervals import (
    INTERVALS,
    compute_intervals,
    percentile_ci,
    profile_ci,
    wald_t_ci,
)
from cellscale.fit.threads import blas_single_thread
from cellscale.model.ladder import ladder_table

ROOT = Path(__file__).resolve().parents[1]
STUDY_P = [533, 9_953, 132_993, 859_137, 19_178_497, 100_510_801]
STUDY_TRUE = {"a": 2.153, "alpha": 0.266, "c": 1.444}
DEMO_TRUE = {"a": 1.0698, "alpha": 0.0976, "c": 0.3398}  # the demo's own huber-log fit
CHIN_TRUE = {"A": 482.01, "B": 2085.43, "E": 1.817, "alpha": 0.3478, "beta": 0.3658}


def demo_params() -> list[int]:
    cfg = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    rows = ladder_table(int(cfg["data"]["genes"]), sizes=cfg["sweep"]["sizes"], custom=cfg["sweep"]["custom_sizes"])
    return [int(r["params"]) for r in rows]


def design(name: str) -> dict:
    if name == "study":
        return {"law": "power-floor", "truth": STUDY_TRUE, "grid": {"params": np.array(STUDY_P, float)},
                "seeds": 3, "report": ("a", "alpha", "c")}
    if name == "demo":
        return {"law": "power-floor", "truth": DEMO_TRUE, "grid": {"params": np.array(demo_params(), float)},
                "seeds": 1, "report": ("a", "alpha", "c")}
    n, d = np.meshgrid([3e7, 1e8, 3e8, 1e9], [3e8, 1e9, 3e9, 1e10], indexing="ij")
    return {"law": "chinchilla", "truth": CHIN_TRUE, "grid": {"params": n.ravel(), "tokens": d.ravel()},
            "seeds": 1, "report": ("E", "alpha", "beta")}


def one_replicate(spec: dict, noise: float, rep: int, n_boot: int) -> dict:
    """{method: (lo, hi)} (natural parameters) and the bootstrap failure counts."""
    law = LAWS[spec["law"]]
    method = METHODS["huber-log"]
    df = simulate_table(spec["law"], spec["truth"], spec["grid"], noise=noise, seeds=spec["seeds"],
                        seed=10_000 + rep)
    data = prepare(df, law_name=law.name, n_params=law.n_params, variables=law.variables,
                   x=list(spec["grid"]), y="best_val_mse", groups=None, weights=None)
    args = (data.logX, data.y, data.weights)
    out = method.fit(law, data.logX, data.y, data.logy, data.weights)
    u, starts = out.u, out.candidates[:1]
    g_starts = np.vstack([u[None, :], starts])
    res: dict = {"theta": law.to_natural(u)}
    res["profile"] = profile_ci(law, "log", *args, g_starts)
    res["wald-t"] = wald_t_ci(law, "log", *args, g_starts)
    boot = compute_intervals("residual-t", method, law, data, u, starts, n_boot=n_boot, seed=rep, n_jobs=1)
    res["residual-t"] = (boot.lo, boot.hi)
    res["residual"] = percentile_ci(boot.samples)
    groups = compute_intervals("bca-groups", method, law, data, u, starts, n_boot=n_boot, seed=rep, n_jobs=1)
    res["bca-groups"] = (groups.lo, groups.hi)
    res["failed"] = {"residual": boot.boot.n_failed, "bca-groups": groups.boot.n_failed}
    return res


def summarise(spec: dict, noise: float, reps: list[dict]) -> list[dict]:
    law = LAWS[spec["law"]]
    rows = []
    for m in INTERVALS:
        for p in spec["report"]:
            j = law.param_names.index(p)
            truth = spec["truth"][p]
            lo = np.array([r[m][0][j] for r in reps], float)
            hi = np.array([r[m][1][j] for r in reps], float)
            ok = np.isfinite(lo) & np.isfinite(hi)
            cover = ok & (lo <= truth) & (truth <= hi)
            cov = float(cover.mean())
            rows.append({"noise": noise, "method": m, "param": p, "coverage": cov,
                         "mc_se": float(np.sqrt(cov * (1 - cov) / len(reps))),
                         "median_width": float(np.median(np.where(ok, hi - lo, np.inf))),
                         "no_interval": int((~ok).sum())})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--design", choices=("study", "demo", "chinchilla"), default="study")
    ap.add_argument("--noise", default="0.01,0.03", help="comma-separated log-normal noise levels")
    ap.add_argument("--replicates", type=int, default=100)
    ap.add_argument("--bootstrap", type=int, default=300)
    ap.add_argument("--json", type=Path, default=None, help="write per-replicate intervals here")
    a = ap.parse_args(argv)
    spec = design(a.design)
    t0 = time.perf_counter()
    rows, dump = [], {}
    with blas_single_thread():
        for noise in (float(v) for v in a.noise.split(",")):
            reps = [one_replicate(spec, noise, r, a.bootstrap) for r in range(a.replicates)]
            rows += summarise(spec, noise, reps)
            failed = {k: int(sum(r["failed"][k] for r in reps)) for k in ("residual", "bca-groups")}
            print(f"# {a.design} noise {noise}: failed resamples over all replicates {failed}", flush=True)
            dump[str(noise)] = [{k: np.asarray(v).tolist() if k != "failed" else v for k, v in r.items()}
                                for r in reps]
    wall = time.perf_counter() - t0
    print(f"# design {a.design}: {spec['grid']['params'].size * spec['seeds']} runs, truth {spec['truth']}, "
          f"{a.replicates} replicates, {a.bootstrap} resamples, wall {wall:.0f} s")
    print("| noise | method | parameter | coverage (MC s.e.) | median width | no interval |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['noise']:g} | {r['method']} | {r['param']} | {r['coverage']:.3f} ({r['mc_se']:.3f}) | "
              f"{r['median_width']:.4g} | {r['no_interval']} |")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "replicates": dump, "wall_s": wall}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
