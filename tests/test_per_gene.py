"""Per-gene test errors of a run (per_gene.json, result.json) and their place in the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cellscale.config import TrainConfig
from cellscale.data.store import Dataset
from cellscale.model import CellTransformer
from cellscale.model.ladder import get_size
from cellscale.runtime.checkpoint import load_weights
from cellscale.train import per_gene_summary, train_run

TRAIN = TrainConfig(cells_seen=32 * 12, batch_size=32, eval_every=4, eval_batch_size=4,
                    warmup_frac=0.1, num_threads=1)


def _bits(mse):
    return 0.5 * np.log2(2 * np.pi * np.e * np.asarray(mse, float))


@pytest.fixture(scope="module")
def run(tiny_dataset_dir: Path, tmp_path_factory) -> tuple[Path, dict]:
    ds = Dataset.open(tiny_dataset_dir)
    out = tmp_path_factory.mktemp("pg") / "run"
    res = train_run(ds, get_size("TINY", n_genes=ds.n_genes), TRAIN, out=out, seed=4)
    return out, res


def _direct(ds: Dataset, run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene SSE and counts straight from the best model's predictions, in numpy."""
    model = CellTransformer(get_size("TINY", n_genes=ds.n_genes))
    load_weights(model, run_dir / "best.safetensors")
    model.eval()
    rows, mask = ds.splits["test"], ds.eval_mask("test")
    values = np.asarray(ds.values[rows], dtype=np.float32)
    with torch.no_grad():
        pred = model(torch.from_numpy(values), torch.from_numpy(mask)).numpy().astype(np.float64)
    r, g = np.nonzero(mask)  # the model's prediction order
    err = (pred - values[r, g].astype(np.float64)) ** 2
    return (np.bincount(g, weights=err, minlength=ds.n_genes),
            np.bincount(g, minlength=ds.n_genes))


def test_per_gene_json_equals_a_direct_numpy_computation(run, tiny_dataset_dir: Path):
    run_dir, res = run
    ds = Dataset.open(tiny_dataset_dir)
    pg = json.loads((run_dir / "per_gene.json").read_text())
    assert pg["genes"] == ds.genes and len(pg["test_mse"]) == len(pg["n_masked"]) == ds.n_genes
    sse, n = _direct(ds, run_dir)
    assert pg["n_masked"] == n.tolist()
    for got, s, c in zip(pg["test_mse"], sse, n):
        if c == 0:
            assert got is None  # a gene never masked on the test split has no error
        else:
            assert got == pytest.approx(s / c, rel=1e-5, abs=1e-9)
    # the count-weighted mean of the per-gene errors is the run's test MSE
    mse = np.array([np.nan if v is None else v for v in pg["test_mse"]])
    seen = np.asarray(pg["n_masked"]) > 0
    weighted = float(np.sum(mse[seen] * np.asarray(pg["n_masked"])[seen]) / np.sum(seen * pg["n_masked"]))
    assert weighted == pytest.approx(res["test_mse"], rel=1e-9, abs=0)
    assert res["per_gene_mse_spread"] == pytest.approx(float(np.std(mse[seen])), rel=1e-12)
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["entropy_bits_per_gene"] == res["entropy_bits_per_gene"]


def test_heteroscedastic_entropy_obeys_jensen(run):
    run_dir, res = run
    pg = json.loads((run_dir / "per_gene.json").read_text())
    n = np.asarray(pg["n_masked"], float)
    mse = np.array([np.nan if v is None else v for v in pg["test_mse"]])
    seen = n > 0
    expected = float(np.sum(n[seen] * _bits(mse[seen])) / n[seen].sum())  # count-weighted mean of bits
    assert res["entropy_bits_per_gene"] == pytest.approx(expected, rel=1e-12)
    assert res["entropy_bits_per_gene"] <= _bits(res["test_mse"]) + 1e-12
    assert res["entropy_bits_per_gene_weighting"] == "masked-count"


def test_jensen_holds_for_skewed_errors_and_counts_and_unmasked_genes_are_null():
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(0, 40, size=30)
        sse = rng.lognormal(0, 2, size=30) * counts
        values, stats = per_gene_summary(sse, counts)
        test_mse = sse.sum() / counts.sum()
        assert stats["entropy_bits_per_gene"] <= _bits(test_mse) + 1e-12
        assert [v is None for v in values] == (counts == 0).tolist()
    values, stats = per_gene_summary(np.zeros(3), np.zeros(3, dtype=np.int64))
    assert values == [None] * 3 and stats == {"per_gene_mse_spread": None, "entropy_bits_per_gene": None}


def test_resume_writes_an_identical_per_gene_json(run, tiny_dataset_dir: Path, tmp_path: Path):
    run_dir, res = run
    ds = Dataset.open(tiny_dataset_dir)
    model = get_size("TINY", n_genes=ds.n_genes)
    part = train_run(ds, model, TRAIN, out=tmp_path / "b", seed=4, stop_after_steps=6)
    assert part["status"] == "incomplete" and not (tmp_path / "b" / "per_gene.json").exists()
    resumed = train_run(ds, model, TRAIN, out=tmp_path / "b", seed=4)
    assert resumed["resumed_at"] == [4]
    # same weights, same evaluation: the file is byte for byte the uninterrupted run's
    assert (tmp_path / "b" / "per_gene.json").read_bytes() == (run_dir / "per_gene.json").read_bytes()
    for key in ("per_gene_mse_spread", "entropy_bits_per_gene"):
        assert resumed[key] == pytest.approx(res[key], rel=1e-6, abs=0), key
    assert math.isfinite(resumed["entropy_bits_per_gene"])
