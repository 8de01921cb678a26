"""Binomial thinning (data/thin.py, `cellscale data thin`): counts, library sizes, values,
determinism, what stays the parent's, and refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import cellscale.data.thin as thin
from cellscale.cli import main
from cellscale.config import ConfigError, DataConfig, SimulateConfig
from cellscale.data.build import build_dataset, gene_mean_baseline
from cellscale.data.preprocess import normalize_log1p
from cellscale.data.store import Dataset
from cellscale.data.thin import thin_counts, thin_dataset
from cellscale.errors import DataError

F = 0.3


@pytest.fixture(scope="module")
def parent(tiny_dataset_dir) -> Dataset:
    return Dataset.open(tiny_dataset_dir)


@pytest.fixture(scope="module")
def thinned(parent, tmp_path_factory) -> Dataset:
    """The tiny dataset thinned to F with seed 0 (read-only: shared)."""
    return Dataset.open(thin_dataset(parent, fraction=F, seed=0, out=tmp_path_factory.mktemp("thin") / "f03"))


def _binomial_z(observed: float, n: float, p: float) -> float:
    return abs(observed - p * n) / math.sqrt(n * p * (1 - p))


def test_thinned_counts_are_a_binomial_fraction_of_the_parent(parent, thinned):
    c0 = np.asarray(parent.counts, dtype=np.int64)
    c1 = np.asarray(thinned.counts, dtype=np.int64)
    assert c1.dtype == c0.dtype and c1.shape == c0.shape
    assert (c1 >= 0).all() and (c1 <= c0).all()
    assert (c1 < c0).any()  # something was thinned
    assert _binomial_z(c1.sum(), c0.sum(), F) < 5  # within 5 binomial standard errors


def test_library_size_thins_exactly_over_all_genes(parent, thinned):
    kept0 = np.asarray(parent.counts, dtype=np.float64).sum(axis=1)
    kept1 = np.asarray(thinned.counts, dtype=np.float64).sum(axis=1)
    rest0, rest1 = parent.library_size - kept0, thinned.library_size - kept1
    assert (rest0 > 0).all()  # the simulator has genes outside the V kept ones
    assert (thinned.library_size >= kept1).all()
    assert (rest1 <= rest0).all() and np.array_equal(rest1, np.rint(rest1))
    # the other genes' total thins as one binomial with the right mean
    assert _binomial_z(rest1.sum(), rest0.sum(), F) < 5


def test_values_are_normalised_log1p_of_thinned_counts(parent, thinned):
    expect = normalize_log1p(np.asarray(thinned.counts), thinned.library_size,
                             target_sum=parent.manifest["preprocessing"]["target_sum"])
    assert np.array_equal(np.asarray(thinned.values), expect.astype(np.float32))


def test_cells_genes_splits_and_eval_mask_are_the_parents(parent, thinned):
    assert thinned.genes == parent.genes and (thinned.n_cells, thinned.n_genes) == (300, 64)
    for split in ("train", "val", "test"):
        assert np.array_equal(thinned.splits[split], parent.splits[split])
    for split in ("val", "test"):
        assert np.array_equal(thinned.eval_mask(split), parent.eval_mask(split))
    assert thinned.manifest["checksums"]["obs.parquet"] == parent.manifest["checksums"]["obs.parquet"]
    assert thinned.manifest["checksums"]["splits.npz"] == parent.manifest["checksums"]["splits.npz"]


def test_manifest_records_depth_thinning_and_new_baselines(parent, thinned):
    m = thinned.manifest
    assert m["depth_fraction"] == F
    assert m["thinning"] == {
        "fraction": F, "seed": 0, "parent_checksum": parent.manifest["checksums"]["values.npy"],
        "parent_path": str(parent.path.resolve()), "parent_depth_fraction": 1.0, "chunk_rows": thin.THIN_CHUNK,
        "library_size": "thinned kept-gene counts + Binomial(parent library size - parent kept-gene sum, fraction)",
        "n_cells_empty_library": 0,
    }
    assert m["config"] == parent.manifest["config"] and m["config_hash"] != parent.manifest["config_hash"]
    v = thinned.values
    for split in ("val", "test"):
        want = gene_mean_baseline(v, thinned.splits["train"], thinned.splits[split], thinned.eval_mask(split))
        assert m["baselines"]["gene_mean"][split] == want
        assert want != parent.baselines["gene_mean"][split]


def test_fraction_one_copies_the_parents_arrays(parent, tmp_path):
    ds = Dataset.open(thin_dataset(parent, fraction=1.0, out=tmp_path / "f1"))
    assert ds.manifest["checksums"] == parent.manifest["checksums"]
    assert ds.manifest["baselines"] == parent.manifest["baselines"] and ds.manifest["depth_fraction"] == 1.0


def test_same_seed_same_bytes_other_seed_differs_and_reuse(parent, thinned, tmp_path):
    arrays = ("values.npy", "counts.npy", "library_size.npy")
    again = Dataset.open(thin_dataset(parent, fraction=F, seed=0, out=tmp_path / "again"))
    other = Dataset.open(thin_dataset(parent, fraction=F, seed=1, out=tmp_path / "other"))
    for name in arrays:
        assert again.manifest["checksums"][name] == thinned.manifest["checksums"][name]
        assert other.manifest["checksums"][name] != thinned.manifest["checksums"][name]
    # the same thinning into the same place is reused as it is; another one is refused
    stamp = (tmp_path / "again" / "manifest.json").stat().st_mtime_ns
    thin_dataset(parent, fraction=F, seed=0, out=tmp_path / "again")
    assert (tmp_path / "again" / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="already holds another cellscale dataset"):
        thin_dataset(parent, fraction=0.5, seed=0, out=tmp_path / "again")


def test_each_chunk_has_its_own_generator(parent, tmp_path, monkeypatch):
    """Chunk k is thinned by seed_sequence(seed, "thin", repr(fraction), k), whatever D is."""
    monkeypatch.setattr(thin, "THIN_CHUNK", 128)  # 300 cells: chunks of 128, 128, 44
    ds = Dataset.open(thin_dataset(parent, fraction=F, seed=4, out=tmp_path / "chunks"))
    for k, start in enumerate((0, 128, 256)):
        rows = slice(start, start + 128)
        kept, lib = thin_counts(parent.counts[rows], parent.library_size[rows], fraction=F, seed=4, chunk=k)
        assert np.array_equal(ds.counts[rows], kept) and np.array_equal(ds.library_size[rows], lib)
    first, _ = thin_counts(parent.counts[:128], parent.library_size[:128], fraction=F, seed=4, chunk=1)
    assert not np.array_equal(first, ds.counts[:128])  # another chunk index draws other counts


def test_thinning_a_thinned_dataset_multiplies_the_depth(thinned, tmp_path):
    m = Dataset.open(thin_dataset(thinned, fraction=0.5, out=tmp_path / "f015")).manifest
    assert m["depth_fraction"] == pytest.approx(0.15, rel=1e-15)
    assert m["thinning"]["parent_depth_fraction"] == F


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, float("nan"), "half", True])
def test_bad_fraction_is_a_config_error(parent, tmp_path, fraction):
    with pytest.raises(ConfigError, match=r"--fraction must be"):
        thin_dataset(parent, fraction=fraction, out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_out_inside_or_around_the_parent_is_refused(parent):
    with pytest.raises(DataError, match="is the dataset being thinned"):
        thin_dataset(parent, fraction=F, out=parent.path / "inner")
    assert not (parent.path / "inner").exists()
    with pytest.raises(DataError, match="holds the dataset being thinned"):
        thin_dataset(parent, fraction=F, out=parent.path.parent, overwrite=True)
    assert Dataset.open(parent.path).manifest == parent.manifest


def test_bad_seed_is_a_config_error(parent, tmp_path):
    with pytest.raises(ConfigError, match=r"--seed must be a non-negative integer, got -1"):
        thin_dataset(parent, fraction=F, seed=-1, out=tmp_path / "bad")


# ------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def gaussian_dir(tmp_path_factory) -> Path:
    cfg = DataConfig(source="simulate", genes=16, cells=60,
                     simulate=SimulateConfig(n_genes=40, n_types=2, n_programs=1, mode="gaussian"))
    return build_dataset(cfg, out=tmp_path_factory.mktemp("gauss") / "ds", progress=False)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_refuses_a_dataset_without_counts(gaussian_dir, tmp_path, capsys):
    out = tmp_path / "thin"
    assert main(["data", "thin", str(gaussian_dir), "--fraction", "0.5", "--out", str(out)]) == 2
    assert _one_error_line(capsys) == (
        f"error: cannot thin {gaussian_dir}: it was simulated in gaussian mode, whose values are log-scale "
        "numbers, not counts; binomial thinning needs a dataset built from raw counts")
    assert not out.exists() and not list(tmp_path.glob(".thin.*"))


def test_cli_bad_fraction_one_line_nothing_left(tiny_dataset_dir, tmp_path, capsys):
    out = tmp_path / "thin"
    assert main(["data", "thin", str(tiny_dataset_dir), "--fraction", "1.5", "--out", str(out)]) == 2
    assert _one_error_line(capsys) == "error: --fraction must be in (0, 1] (the share of the reads kept), got 1.5"
    assert not out.exists() and not list(tmp_path.glob(".thin.*"))


def test_cli_thins_and_prints_the_new_depth(tiny_dataset_dir, tmp_path, capsys):
    out = tmp_path / "thin"
    assert main(["--quiet", "data", "thin", str(tiny_dataset_dir), "--fraction", "0.5", "--seed", "3",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert (m["depth_fraction"], m["thinning"]["seed"]) == (0.5, 3)
    assert f"dataset: {out.absolute()}  (300 cells x 64 genes; depth fraction 0.5, mean library size" in text
    assert f"gene-mean baseline MSE: validation {m['baselines']['gene_mean']['val']:.4f}" in text
    assert main(["data", "info", str(out)]) == 0
    assert "0.5 of the reads (binomially thinned by 0.5, seed 3, from " in capsys.readouterr().out
