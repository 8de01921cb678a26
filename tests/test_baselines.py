"""Baselines under the fixed evaluation mask: gene mean, Bayes-linear, kNN, and the cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cellscale.data.baselines import (
    BASELINES_FILE,
    bayes_linear_predict,
    compute_baselines,
    fit_gaussian,
    knn_predict,
    load_or_compute_baselines,
)
from cellscale.data.build import EVAL_MASK_PROB, gene_mean_baseline
from cellscale.data.store import Dataset, DatasetWriter, eval_mask


def write_dataset(out: Path, values: np.ndarray, splits: dict[str, np.ndarray], *, seed: int = 0,
                  extra: dict | None = None) -> Path:
    """A dataset dir written by hand (values only, no counts), with the manifest fields that
    ``Dataset`` and the baselines read; the gene-mean baseline computed as build does."""
    values = np.asarray(values, dtype=np.float32)
    D, V = values.shape
    splits = {k: np.asarray(v, dtype=np.int64) for k, v in splits.items()}
    with DatasetWriter(out) as w:
        arr = w.array("values.npy", (D, V), np.float32)
        arr[:] = values
        w.save("library_size.npy", np.ones(D))
        w.save_splits(splits)
        baseline = {
            s: gene_mean_baseline(arr, splits["train"], splits[s],
                                  eval_mask(splits[s].size, V, seed=seed, split=s, mask_prob=EVAL_MASK_PROB))
            for s in ("val", "test")
        }
        manifest = {
            "source": {"kind": "test"}, "V": V, "D": D, "seed": seed,
            "genes": [f"g{i}" for i in range(V)],
            "split_sizes": {k: int(v.size) for k, v in splits.items()},
            "eval_mask_seed": seed, "mask_prob": EVAL_MASK_PROB,
            "baselines": {"gene_mean": baseline}, "dtype": "float32", "counts_dtype": None,
            "shapes": {"values.npy": [D, V], "library_size.npy": [D]},
            "config": {"source": "test"}, "config_hash": "test", **(extra or {}),
        }
        del arr
        return w.commit(manifest)


def brute_force_bayes_linear(x, mask, mean, cov_reg):
    """Per cell: mu_m + S_mo S_oo^{-1} (x_o - mu_o) with the full (regularised) covariance."""
    out = x.copy()
    for i in range(x.shape[0]):
        m, o = mask[i], ~mask[i]
        if o.any():
            out[i, m] = mean[m] + cov_reg[np.ix_(m, o)] @ np.linalg.solve(cov_reg[np.ix_(o, o)], x[i, o] - mean[o])
        else:
            out[i, m] = mean[m]
    return out


@pytest.fixture(scope="module")
def tiny_ds(tiny_dataset_dir):
    return Dataset.open(tiny_dataset_dir)


@pytest.fixture(scope="module")
def tiny_baselines(tiny_ds):
    return compute_baselines(tiny_ds)


def test_gene_mean_equals_manifest_exactly(tiny_ds, tiny_baselines):
    for split in ("val", "test"):
        assert tiny_baselines["gene_mean"][split] == tiny_ds.baselines["gene_mean"][split]
        assert tiny_baselines["n_masked"][split] == int(tiny_ds.eval_mask(split).sum())


def test_ordering_on_tiny_simulated_dataset(tiny_baselines):
    for split in ("val", "test"):
        assert tiny_baselines["bayes_linear"][split] < tiny_baselines["gene_mean"][split]
        assert 0 < tiny_baselines["knn"][split]
    assert "bayes_floor" not in tiny_baselines  # NB mode: no known floor


def test_bayes_linear_equals_brute_force(tiny_ds, tiny_baselines):
    ridge = tiny_baselines["settings"]["ridge"]
    mean, cov = fit_gaussian(tiny_ds.values, tiny_ds.splits["train"])
    # the training moments themselves, against numpy
    train = np.asarray(tiny_ds.values[np.sort(tiny_ds.splits["train"])], dtype=np.float64)
    np.testing.assert_allclose(mean, train.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(train, rowvar=False), rtol=1e-9, atol=1e-12)
    cov_reg = cov + ridge * np.mean(np.diag(cov)) * np.eye(cov.shape[0])
    for split in ("val", "test"):
        rows, mask = tiny_ds.splits[split], tiny_ds.eval_mask(split)
        x = np.asarray(tiny_ds.values[rows], dtype=np.float64)
        fast = bayes_linear_predict(x, mask, mean, cov, ridge=ridge)
        slow = brute_force_bayes_linear(x, mask, mean, cov_reg)
        np.testing.assert_allclose(fast, slow, rtol=1e-8, atol=1e-8)
        assert np.array_equal(fast[~mask], x[~mask])  # visible entries untouched
        mse = np.sum((slow - x)[mask] ** 2) / mask.sum()
        assert tiny_baselines["bayes_linear"][split] == pytest.approx(mse, rel=1e-8)


def test_bayes_linear_mixed_mask_sizes_and_all_masked():
    rng = np.random.default_rng(0)
    V = 12
    A = rng.normal(size=(V, V))
    cov = A @ A.T + np.eye(V)
    mean = rng.normal(size=V)
    x = rng.multivariate_normal(mean, cov, size=40)
    mask = rng.random((40, V)) < 0.4
    mask[0] = True  # nothing visible: prediction is the mean
    mask[1] = False
    mask[1, 3] = True
    fast = bayes_linear_predict(x, mask, mean, cov, ridge=0.0)
    np.testing.assert_allclose(fast, brute_force_bayes_linear(x, mask, mean, cov), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fast[0], mean)


def test_bayes_linear_reaches_true_conditional_variance(tmp_path):
    """On Gaussian data with known covariance, the Bayes-linear MSE approaches the true
    expected conditional variance of the masked genes (under the same eval masks)."""
    rng = np.random.default_rng(1)
    V, n = 16, 12000
    W = rng.normal(0, 0.8, size=(V, 3))
    cov = W @ W.T + np.diag(rng.uniform(0.2, 0.6, size=V))
    mean = rng.normal(1.0, 0.5, size=V)
    x = rng.multivariate_normal(mean, cov, size=n)
    splits = {"train": np.arange(8000), "val": np.arange(8000, 10000), "test": np.arange(10000, n)}
    ds = Dataset.open(write_dataset(tmp_path / "g", x, splits))
    res = compute_baselines(ds, knn_k=20, max_train_cells=2000)
    for split in ("val", "test"):
        mask = ds.eval_mask(split)
        tr = 0.0
        for m in mask:
            o = ~m
            c = cov[np.ix_(m, m)] - cov[np.ix_(m, o)] @ np.linalg.solve(cov[np.ix_(o, o)], cov[np.ix_(o, m)])
            tr += np.trace(c)
        truth = tr / mask.sum()
        # relative SE of an MSE over ~4.8k masked positions is ~2-3%
        assert res["bayes_linear"][split] == pytest.approx(truth, rel=0.08)
        assert res["bayes_linear"][split] < res["knn"][split] < res["gene_mean"][split]


def test_knn_k1_predicts_duplicated_training_cell_exactly(tmp_path):
    rng = np.random.default_rng(2)
    V = 10
    train = rng.normal(size=(50, V))
    dup = [3, 17, 41]
    values = np.vstack([train, train[dup], rng.normal(size=(3, V)) + 5.0])
    splits = {"train": np.arange(50), "val": np.arange(50, 53), "test": np.arange(53, 56)}
    ds = Dataset.open(write_dataset(tmp_path / "k", values, splits))
    res = compute_baselines(ds, knn_k=1)
    assert res["knn"]["val"] == 0.0
    assert res["knn"]["test"] > 0.0
    assert res["gene_mean"]["val"] > 0.0 and res["bayes_linear"]["val"] > 0.0
    # the function itself: k=1 copies the duplicate; k=all gives the mean of all training rows
    x = train[dup].astype(np.float32).astype(np.float64)
    mask = ds.eval_mask("val")
    t32 = train.astype(np.float32).astype(np.float64)
    assert np.array_equal(knn_predict(x, mask, t32, k=1), x)
    full = knn_predict(x, mask, t32, k=50)
    np.testing.assert_allclose(full[mask], np.broadcast_to(t32.mean(0), x.shape)[mask])


def test_knn_uses_visible_genes_only():
    # two training cells: equal on gene 0, differ hugely on gene 1; the query's gene 1 is
    # masked (its value must not pick the neighbour) and gene 0 is visible
    train = np.array([[0.0, 100.0, 0.0], [1.0, -100.0, 0.0]])
    x = np.array([[0.1, -100.0, 0.0]])
    mask = np.array([[False, True, False]])
    pred = knn_predict(x, mask, train, k=1)
    assert pred[0, 1] == 100.0


def test_cache_roundtrip_and_settings_key(tmp_path, tiny_dataset_dir):
    copy = tmp_path / "ds"
    shutil.copytree(tiny_dataset_dir, copy)
    ds = Dataset.open(copy)
    first = load_or_compute_baselines(ds, knn_k=3)
    doc = json.loads((copy / BASELINES_FILE).read_text())
    assert doc["format"] == "cellscale-baselines" and len(doc["entries"]) == 1
    again = load_or_compute_baselines(Dataset.open(copy), knn_k=3)
    assert again == first
    # a tampered cached number is returned as is: proof that the cache is read
    key = next(iter(doc["entries"]))
    doc["entries"][key]["knn"]["val"] = -1.0
    (copy / BASELINES_FILE).write_text(json.dumps(doc))
    assert load_or_compute_baselines(ds, knn_k=3)["knn"]["val"] == -1.0
    other = load_or_compute_baselines(ds, knn_k=4)
    assert other["settings"]["knn_k"] == 4
    assert len(json.loads((copy / BASELINES_FILE).read_text())["entries"]) == 2
    assert Dataset.open(copy).verify() is None  # the extra file does not break verification


def test_train_split_refused(tiny_ds):
    from cellscale.errors import DataError

    with pytest.raises(DataError, match="held-out"):
        compute_baselines(tiny_ds, splits=("train",))
