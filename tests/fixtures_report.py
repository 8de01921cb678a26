"""Fabricate a small sweep directory for the report tests (no training involved).

``make_sweep(root)`` writes, as the sweep and data modules would: a dataset dir with a
``manifest.json``, and a sweep dir with ``config.yaml`` (a dumped StudyConfig), ``sweep.json``,
``results.csv`` and ``runs/<run_id>/metrics.jsonl``. Losses follow a known power-floor law
``L = A P^-ALPHA + C`` with small multiplicative noise; optionally one run diverged and one failed.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from cellscale.config import StudyConfig, dump_yaml

# the seed study's ladder at V = 512 (reference README)
LADDER_512 = {
    "XXS": (533, 1, 1, 1),
    "TINY": (9_953, 16, 1, 1),
    "XS": (132_993, 64, 2, 4),
    "S": (859_137, 128, 4, 8),
    "M": (19_178_497, 512, 6, 8),
    "L": (100_510_801, 1020, 8, 12),
    "XL": (340_770_817, 1536, 12, 16),
}
A, ALPHA, C = 2.0, 0.25, 1.4
B2, BETA2 = 8.0, 0.5  # the data term of the chinchilla-shaped losses
DEPTH_GAIN = 0.2  # at depth f the floor is C + DEPTH_GAIN (1/f - 1): thinning noise no size removes
DEPTH_GM_GAIN = 0.25  # and the gene-mean baseline GENE_MEAN_* + DEPTH_GM_GAIN (1/f - 1)
GENE_MEAN_VAL, GENE_MEAN_TEST = 1.875, 1.862
DIVERGED_ERROR = "loss became NaN at step 1200 (lr 0.01); run stopped"
FAILED_ERROR = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


GENES = [f"g{i}" for i in range(512)]
GENE_FACTOR = np.random.default_rng(7).lognormal(0.0, 0.6, size=512)  # per-gene difficulty
GENE_COUNTS = np.random.default_rng(8).binomial(100, 0.15, size=512)  # 100 test cells, 15% masked
GENE_COUNTS[:2] = 0
HARDEST = [GENES[i] for i in np.argsort(-np.where(GENE_COUNTS > 0, GENE_FACTOR, -np.inf), kind="stable")[:10]]
EASIEST = [GENES[i] for i in np.argsort(np.where(GENE_COUNTS > 0, GENE_FACTOR, np.inf), kind="stable")[:10]]


def per_gene_json(test_mse: float) -> dict:
    """A per_gene.json as train_run writes it, whose count-weighted mean error is ``test_mse``."""
    seen = GENE_COUNTS > 0
    scale = test_mse * GENE_COUNTS[seen].sum() / np.sum(GENE_FACTOR[seen] * GENE_COUNTS[seen])
    mse = [float(f * scale) if c > 0 else None for f, c in zip(GENE_FACTOR, GENE_COUNTS)]
    return {"split": "test", "genes": GENES, "test_mse": mse, "n_masked": [int(c) for c in GENE_COUNTS]}


def depth_gene_mean(depth: float, split: str = "val") -> float:
    return (GENE_MEAN_VAL if split == "val" else GENE_MEAN_TEST) + DEPTH_GM_GAIN * (1.0 / depth - 1.0)


def law(p):
    return A * np.asarray(p, float) ** (-ALPHA) + C


def _metrics_lines(final: float, cells_seen: int, batch: int, rng: np.random.Generator, diverged=False):
    lines = []
    steps = cells_seen // batch
    for i, step in enumerate(np.linspace(10, steps, 24).astype(int)):
        frac = step / steps
        loss = final * (1 + 0.8 * np.exp(-5 * frac)) * (1 + 0.02 * rng.standard_normal())
        if diverged and frac > 0.5:
            loss = float("nan")
        lines.append({"kind": "train", "step": int(step), "cells_seen": int(step * batch), "lr": 1e-3,
                      "loss": None if np.isnan(loss) else float(loss), "wall": 0.1 * i})
        if i % 3 == 2:
            val = final * (1 + 0.7 * np.exp(-5 * frac))
            if diverged and frac > 0.5:
                val = float("nan")
            lines.append({"kind": "eval", "step": int(step), "cells_seen": int(step * batch),
                          "val_mse": None if np.isnan(val) else float(val), "wall": 0.1 * i})
    return lines


def _write_config(sweep: Path, *, source: str, sizes: list[str], seeds, train_cells, depths, fit_law: str,
                  bootstrap: int) -> None:
    data_cfg = {"source": source, "genes": 512, "cells": 2000, "seed": 0}
    if source == "census":
        data_cfg["census"] = {"version": "2025-01-30", "tissues": ["blood", "lung"], "per_tissue_cap": 1000}
    cfg = StudyConfig.model_validate({
        "name": "report-test",
        "description": "fabricated sweep for the report tests",
        "data": data_cfg,
        "train": {"cells_seen": 64_000, "batch_size": 64},
        "sweep": {"sizes": sizes, "seeds": list(seeds), "train_cells": list(train_cells), "depths": list(depths)},
        "fit": {"law": fit_law, "method": "huber-log", "bootstrap": bootstrap, "seed": 0},
    })
    (sweep / "config.yaml").write_text(dump_yaml(cfg))


def _write_sweep_json(sweep: Path, dataset: Path, depths) -> None:
    """sweep.json, and with several depths each thinned dataset's manifest (listed in it)."""
    meta = {"dataset": str(dataset.resolve()), "config_hash": "abc123def456"}
    if len(depths) > 1:
        meta["depth_datasets"] = {}
        for f in depths:
            if f != 1.0:
                ddir = sweep / "datasets" / f"depth-{f:g}"
                ddir.mkdir(parents=True)
                (ddir / "manifest.json").write_text(json.dumps({"depth_fraction": f, "baselines": {"gene_mean": {
                    "val": depth_gene_mean(f), "test": depth_gene_mean(f, "test")}}}))
                meta["depth_datasets"][f"{f:g}"] = str(ddir.resolve())
    (sweep / "sweep.json").write_text(json.dumps(meta))


def _write_manifest(dataset: Path, *, source: str, with_baselines: bool, bayes_floor: float | None) -> None:
    manifest = {
        "source": source, "V": 512, "D": 2000, "seed": 0, "target_sum": 10000.0, "hvg_flavor": "seurat_v3",
        "genes": [f"g{i}" for i in range(512)], "split_sizes": {"train": 1800, "val": 100, "test": 100},
        "eval_mask_seed": 12345, "mask_prob": 0.15, "cellscale_version": "0.1.0",
        "created": "2026-11-24T06:00:00Z",
    }
    if with_baselines:
        manifest["baselines"] = {"gene_mean": {"val": GENE_MEAN_VAL, "test": GENE_MEAN_TEST}}
    if bayes_floor is not None:
        manifest["bayes_floor_mse"] = bayes_floor
    if source == "census":
        manifest["census"] = {"version": "2025-01-30", "organism": "homo_sapiens",
                              "obs_filter": "is_primary_data == True", "tissues": ["blood", "lung"]}
    (dataset / "manifest.json").write_text(json.dumps(manifest))


def _clean_loss(params: int, tc: int | None, depth: float, fit_law: str) -> float:
    if fit_law == "chinchilla":
        clean = law(params) + B2 * (1800 if tc is None else tc) ** (-BETA2)
    else:
        clean = law(params) + (0.0 if tc is None else 0.3 * (1800 / tc - 1) ** 0.5 * (params / 1e6) ** 0.1)
    return clean + DEPTH_GAIN * (1.0 / depth - 1.0)


def _result_row(rid: str, size: str, tc: int | None, depth: float, seed: int, status: str, error: str,
                best: float, test: float, multi_depth: bool) -> dict:
    params, d, nl, nh = LADDER_512[size]
    return {
        "run_id": rid, "size": size, "params": params, "non_embedding_params": params - 512 * max(d, 1),
        "d_model": d, "n_layers": nl, "n_heads": nh, "n_genes": 512,
        "train_cells": np.nan if tc is None else tc, "seed": seed, "steps": 1000,
        "cells_seen": 64_000, "tokens_seen": 64_000 * 512, "flops": 6.0 * params * 64_000 * 512,
        "lr": 1e-3, "best_step": 900 if status == "ok" else np.nan, "best_val_mse": best,
        "test_mse": test, "gene_mean_val_mse": depth_gene_mean(depth),
        "gene_mean_test_mse": depth_gene_mean(depth, "test"),
        "wall_seconds": 12.5, "status": status, "error": error,
        **({"depth": depth} if multi_depth else {}),
    }


def make_sweep(
    root: Path,
    *,
    sizes=("XXS", "TINY", "XS", "S", "M"),
    seeds=(0, 1),
    train_cells=(None,),
    diverged: str | None = "L",
    failed: str | None = "XL",
    only_failed: bool = False,
    source: str = "simulate",
    bootstrap: int = 200,
    noise: float = 0.004,
    with_manifest: bool = True,
    with_metrics: bool = True,
    with_baselines: bool = True,
    bayes_floor: float | None = None,
    fit_law: str = "power-floor",
    per_gene: bool = False,
    per_gene_skip: tuple[str, ...] = (),
    depths: tuple[float, ...] = (1.0,),
) -> Path:
    """Write a dataset dir and a sweep dir under ``root``; return the sweep dir.

    With ``fit_law="chinchilla"`` the losses follow L = C + A / N^ALPHA + B2 / D^BETA2 (D = train
    cells, the whole train split for "all") and the config asks for that law.

    ``per_gene=True`` also writes ``runs/<id>/per_gene.json`` for every run with a test MSE but
    those in ``per_gene_skip``: gene g's error is test_mse x GENE_FACTOR[g] (normalised so the
    count-weighted mean is the run's test MSE), genes 0 and 1 never masked (null).

    ``depths`` with more than one entry adds a sequencing-depth axis as run_sweep writes it: a
    ``depth`` column, run ids ending ``-f{depth}`` below 1, the floor raised by DEPTH_GAIN (1/f - 1),
    and ``datasets/depth-{f}/manifest.json`` (listed in sweep.json) with that depth's gene-mean
    baseline. With one depth the table has no depth column (a results.csv of an older sweep)."""
    root = Path(root)
    rng = np.random.default_rng(123)
    dataset = root / "dataset"
    sweep = root / "sweep"
    dataset.mkdir(parents=True)
    (sweep / "runs").mkdir(parents=True)
    all_sizes = list(sizes) + [s for s in (diverged, failed) if s and s not in sizes]
    _write_config(sweep, source=source, sizes=all_sizes, seeds=seeds, train_cells=train_cells, depths=depths,
                  fit_law=fit_law, bootstrap=bootstrap)
    _write_sweep_json(sweep, dataset, depths)
    if with_manifest:
        _write_manifest(dataset, source=source, with_baselines=with_baselines, bayes_floor=bayes_floor)

    rows = []
    for size, tc, depth, seed in ((s, tc, f, seed) for s in all_sizes
                                  for tc, f in itertools.product(train_cells, depths) for seed in seeds):
        tc_label = "all" if tc is None else str(tc)
        rid = f"{size}-d{tc_label}-s{seed}" + ("" if depth == 1.0 else f"-f{depth:g}")
        status, error = "ok", ""
        best = float(_clean_loss(LADDER_512[size][0], tc, depth, fit_law) * (1 + noise * rng.standard_normal()))
        test = best * 1.002
        if only_failed or (size == failed and seed == seeds[0]):
            status, error, best, test = "failed", FAILED_ERROR, float("nan"), float("nan")
        elif size == diverged and seed == seeds[0]:
            status, error, best, test = "diverged", DIVERGED_ERROR, 2.9, float("nan")
        rows.append(_result_row(rid, size, tc, depth, seed, status, error, best, test, len(depths) > 1))
        run_dir = sweep / "runs" / rid
        if per_gene and np.isfinite(test) and rid not in per_gene_skip:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "per_gene.json").write_text(json.dumps(per_gene_json(test)))
        if with_metrics and status != "failed":
            run_dir.mkdir(parents=True, exist_ok=True)
            lines = _metrics_lines(best if status == "ok" else 2.9, 64_000, 64, rng, diverged=status == "diverged")
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    pd.DataFrame(rows).to_csv(sweep / "results.csv", index=False)
    return sweep


BRANCH_CELLS = 4000 * 2.0 ** np.arange(6)  # 4,000 to 128,000 cells seen


def add_branches(sweep: Path, *, seed: int = 5) -> pd.DataFrame:
    """branches.csv (and its checksum) as a plateau-budget sweep writes it, for the ok runs of
    results.csv: each run's points at BRANCH_CELLS follow the chinchilla-shaped law
    L = C + A / N^ALPHA + B2 / D^BETA2 (D = cells seen) with a shared run offset and point noise."""
    from cellscale.fit import simulate_branches
    from cellscale.runtime.io import atomic_write_text_checked
    from cellscale.schema import BRANCH_FIELDS

    runs = pd.read_csv(sweep / "results.csv")
    ok = runs[runs["status"] == "ok"]
    truth = {"A": A, "B": B2, "E": C, "alpha": ALPHA, "beta": BETA2}
    frames = []
    for i, r in enumerate(ok.itertuples()):
        one = simulate_branches("chinchilla", truth, sizes={r.size: float(r.params)}, cells=BRANCH_CELLS,
                                train_cells=1800.0, noise=0.002, run_noise=0.004, seed=seed + i)
        frames.append(one.assign(run_id=r.run_id, seed=r.seed))
    table = pd.concat(frames, ignore_index=True)
    table = table.assign(lr=1e-3, lr_scale=1.0, depth=1.0, step=table["cells_seen"] // 64,
                         stable_step=(table["cells_seen"] // 64 / 1.2).astype(int), stable_cells=0,
                         flops=6.0 * table["params"] * table["cells_seen"] * 512, val_loss=table["test_loss"] * 1.001,
                         val_mse=table["test_loss"] * 1.001, test_mse=table["test_loss"], cooldown_train_loss=np.nan,
                         gain=np.nan, gain_se=np.nan, converged=False, wall=0.1)
    table = table[list(BRANCH_FIELDS)]
    atomic_write_text_checked(sweep / "branches.csv", table.to_csv(index=False))
    return table
