"""How much the library size gives away when every gene is kept (issue 29).

    python benchmarks/library_leak.py                  # a few seconds

Values are log1p(count / library size x target sum), the library size summed over ALL genes. When
the model sees every gene, sum_g expm1(value_g) = target sum in every cell, so the visible genes tell
the total of the masked ones: one masked gene is recovered exactly, and with 15% masked their total
is known. This builds two small simulated datasets, one keeping every gene and one keeping a quarter
of them, and scores on the validation cells, under masks of one gene per cell and of 15% of the
genes: the gene-mean baseline (each masked gene predicted by its training mean), and the leak's
oracle (the masked genes' total from the visible ones, shared out in proportion to their typical
levels, expm1 of their training means of log values), and a line per gene of its value on that
total (log1p), fitted on training cells: what a model can learn from the constraint. Prints the kept
genes' share of the counts and each error with its ratio to the gene mean. The oracle uses nothing but the constraint; a model can learn it.
Prints the kept genes' share of the counts, both errors and their ratio.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from cellscale.config import DataConfig, SimulateConfig
from cellscale.data.build import build_dataset
from cellscale.data.store import Dataset


def leak_oracle(values: np.ndarray, mask: np.ndarray, mean_counts: np.ndarray, target_sum: float) -> np.ndarray:
    """Predictions at the masked positions: the total left by the visible genes, in proportion to the
    masked genes' typical levels ``mean_counts`` (counts per target sum)."""
    expm1 = np.expm1(values.astype(np.float64))
    left = np.clip(target_sum - np.where(mask, 0.0, expm1).sum(axis=1, keepdims=True), 0.0, None)
    weights = np.where(mask, mean_counts[None, :], 0.0)
    share = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
    return np.log1p(left * share)


def masked_total(values: np.ndarray, mask: np.ndarray, target_sum: float) -> np.ndarray:
    """log1p of what the visible genes leave of the target sum: the masked genes' total, when every gene is kept."""
    left = target_sum - np.where(mask, 0.0, np.expm1(values.astype(np.float64))).sum(axis=1)
    return np.log1p(np.clip(left, 0.0, None))


def total_regression(train: np.ndarray, train_mask: np.ndarray, val: np.ndarray, mask: np.ndarray,
                     target_sum: float) -> np.ndarray:
    """Per gene, the least-squares line of its value on the masked total (fitted on training cells
    under their own mask), evaluated on the validation cells: what a model learns from the total."""
    x_tr, x_va = masked_total(train, train_mask, target_sum), masked_total(val, mask, target_sum)
    pred = np.zeros_like(val)
    for g in range(train.shape[1]):
        rows = train_mask[:, g]
        slope, icept = np.polyfit(x_tr[rows], train[rows, g], 1) if rows.sum() > 2 else (0.0, train[:, g].mean())
        pred[:, g] = icept + slope * x_va
    return pred


def score(ds: Dataset, mask: np.ndarray, train_mask: np.ndarray) -> tuple[float, float, float]:
    """(gene-mean MSE, leak-oracle MSE, total-regression MSE) on the validation cells under ``mask``."""
    train = np.asarray(ds.values)[ds.splits["train"]].astype(np.float64)
    val = np.asarray(ds.values)[ds.splits["val"]].astype(np.float64)
    mean_log = train.mean(axis=0)
    mean_counts = np.expm1(mean_log)  # the typical level of each gene, in counts per target sum
    gm = float(np.mean((np.broadcast_to(mean_log, val.shape)[mask] - val[mask]) ** 2))
    oracle = leak_oracle(val, mask, mean_counts, ds.target_sum)
    reg = total_regression(train, train_mask, val, mask, ds.target_sum)
    return gm, float(np.mean((oracle[mask] - val[mask]) ** 2)), float(np.mean((reg[mask] - val[mask]) ** 2))


def masks(n_cells: int, n_genes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    one = np.zeros((n_cells, n_genes), bool)
    one[np.arange(n_cells), rng.integers(0, n_genes, n_cells)] = True
    return {"one masked gene": one, "15% masked": rng.random((n_cells, n_genes)) < 0.15}


def main() -> None:
    sim = SimulateConfig(n_genes=200, n_types=6, n_programs=3)
    with tempfile.TemporaryDirectory() as tmp:
        for label, genes, flavor in (("every gene kept (200 of 200)", 200, "all"), ("a quarter kept (50 of 200)", 50,
                                                                                       "seurat_v3")):
            cfg = DataConfig(source="simulate", genes=genes, cells=3000, seed=0, hvg_flavor=flavor, simulate=sim)
            ds = Dataset.open(build_dataset(cfg, out=Path(tmp) / flavor, progress=False))
            share = ds.meta.preprocessing.kept_count_share
            print(f"{label}: the kept genes hold {100 * share['median']:.1f}% of a median cell's counts")
            rng = np.random.default_rng(0)
            train_masks = masks(int(ds.splits["train"].size), genes, rng)
            for name, mask in masks(int(ds.splits["val"].size), genes, rng).items():
                gm, oracle, reg = score(ds, mask, train_masks[name])
                print(f"  {name:>16}: gene-mean MSE {gm:.4f}; leak oracle {oracle:.4f} ({oracle / gm:.3f}x); "
                      f"a line on the masked total {reg:.4f} ({reg / gm:.3f}x)")


if __name__ == "__main__":
    main()
