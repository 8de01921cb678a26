"""The Census source on a small local SOMA store shaped like the CELLxGENE Census.

The store (built once per session with tiledbsoma) has a root collection, the experiment
``census_data/homo_sapiens`` with measurement ``RNA`` and X layer ``raw`` (float32 counts),
obs ``is_primary_data``, ``tissue_general``, ``dataset_id``, ``raw_sum`` (full-row sums) and
var ``feature_id``, ``feature_name``; 600 cells x 300 genes, tissues blood, lung and bone,
six datasets, ~15% non-primary cells.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

# skipped without the census extra, failed under CI (conftest.require)
pytestmark = pytest.mark.needs("tiledbsoma", "cellxgene_census")

import anndata as ad  # noqa: E402

from cellscale import cli  # noqa: E402
from cellscale.config import CensusConfig, DataConfig  # noqa: E402
from cellscale.data.build import build_dataset  # noqa: E402
from cellscale.data.store import Dataset  # noqa: E402

N_CELLS, N_GENES = 600, 300
TISSUES = "blood,lung"  # "bone" is in the store but not sampled


@pytest.fixture(scope="session")
def census_store(tmp_path_factory):
    """(uri, dense counts, obs) of a Census-shaped SOMA store."""
    import tiledbsoma as soma
    import tiledbsoma.io

    rng = np.random.default_rng(0)
    rates = rng.gamma(0.5, 2.0, size=N_GENES)
    dataset = rng.choice([f"ds{i}" for i in range(6)], size=N_CELLS)
    shift = rng.gamma(2.0, 0.5, size=(6, N_GENES))  # per-dataset gene effects
    codes = np.array([int(d[2:]) for d in dataset])
    X = rng.poisson(rates * shift[codes] * rng.gamma(2.0, 0.5, size=(N_CELLS, 1))).astype(np.float32)
    X[7] = 0  # one empty cell
    obs = pd.DataFrame(
        {
            "is_primary_data": rng.random(N_CELLS) > 0.15,
            "tissue_general": pd.Categorical(rng.choice(["blood", "lung", "bone"], size=N_CELLS)),
            "dataset_id": pd.Categorical(dataset),
            "raw_sum": X.sum(axis=1).astype(np.float64),
        },
        index=[f"cell{i}" for i in range(N_CELLS)],
    )
    var = pd.DataFrame({"feature_name": [f"G{j}" for j in range(N_GENES)]},
                       index=pd.Index([f"ENSG{j:05d}" for j in range(N_GENES)]))
    root = str(tmp_path_factory.mktemp("census") / "soma")
    with soma.Collection.create(root) as census:
        data = census.add_new_collection("census_data")
        exp_uri = f"{root}/census_data/homo_sapiens"
        tiledbsoma.io.from_anndata(
            exp_uri, ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var),
            measurement_name="RNA", X_layer_name="raw", var_id_name="feature_id",
        )
        with soma.Experiment.open(exp_uri) as exp:
            data.set("homo_sapiens", exp, use_relative_uri=True)
    return root, X, obs


def _cli_args(uri, out, *extra):
    return ["data", "build", "--source", "census", "--census-uri", uri, "--tissues", TISSUES,
            "--genes", "40", "--cells", "300", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def built(census_store, tmp_path_factory):
    """The whole Census path through the CLI, in a fresh process."""
    uri, X, obs = census_store
    out = tmp_path_factory.mktemp("census-ds") / "ds"
    proc = subprocess.run(
        [sys.executable, "-m", "cellscale.cli", *_cli_args(uri, out, "--split-by", "dataset_id")],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr
    return Dataset.open(out), X, obs


def _seurat_v3(X_train, n_top, batch=None):
    import scanpy as sc

    a = ad.AnnData(X=sp.csr_matrix(X_train), var=pd.DataFrame(index=[f"ENSG{j:05d}" for j in range(X_train.shape[1])]))
    if batch is not None:
        a.obs["b"] = batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=n_top, batch_key="b" if batch is not None else None, inplace=False)
    return list(a.var_names[np.asarray(h["highly_variable"], dtype=bool)])


def test_cells_are_primary_from_the_listed_tissues(built):
    ds, X, obs = built
    jids = ds.obs["soma_joinid"].to_numpy()
    assert ds.n_cells == 300 and np.all(np.diff(jids) > 0)
    chosen = obs.iloc[jids]
    assert chosen["is_primary_data"].all()
    assert set(chosen["tissue_general"]) <= {"blood", "lung"}
    assert 7 not in set(jids)  # the empty cell is dropped
    assert list(ds.obs["tissue_general"]) == list(chosen["tissue_general"].astype(str))


def test_library_size_is_the_full_row_sum(built):
    ds, X, _ = built
    jids = ds.obs["soma_joinid"].to_numpy()
    np.testing.assert_array_equal(ds.library_size, X[jids].sum(axis=1, dtype=np.float64))
    assert np.all(ds.library_size > np.asarray(ds.counts).sum(axis=1))  # not the sum over V genes


def test_genes_equal_scanpy_seurat_v3_on_the_training_cells(built):
    ds, X, _ = built
    jids = ds.obs["soma_joinid"].to_numpy()
    train = np.sort(ds.splits["train"])
    assert ds.genes == _seurat_v3(X[jids[train]], 40)
    assert ds.manifest["preprocessing"]["hvg_flavor"] == "seurat_v3"
    gene_idx = [int(g[4:]) for g in ds.genes]
    assert ds.manifest["source"]["gene_names"] == [f"G{j}" for j in gene_idx]
    # only the kept genes' raw counts, normalised with the all-gene library size
    counts = X[jids][:, gene_idx]
    np.testing.assert_array_equal(np.asarray(ds.counts), counts)
    expected = np.log1p(counts / X[jids].sum(axis=1, keepdims=True) * 1e4)
    np.testing.assert_allclose(np.asarray(ds.values), expected, rtol=1e-6, atol=1e-6)


def test_held_out_datasets_stay_in_one_split(built):
    ds, _, _ = built
    where = {}
    for split, idx in ds.splits.items():
        for d in set(ds.obs["dataset_id"].to_numpy()[idx]):
            assert where.setdefault(d, split) == split
    assert ds.manifest["split"]["split_by"] == "dataset_id"
    assert set(where.values()) == {"train", "val", "test"}


def test_manifest_records_the_selection(built, census_store):
    from cellscale.data.sources.census import joinid_checksum

    ds, _, _ = built
    src = ds.manifest["source"]
    assert src["kind"] == "census" and src["uri"] == census_store[0] and src["organism"] == "homo_sapiens"
    assert src["obs_filter"] == "is_primary_data == True" and src["tissues"] == ["blood", "lung"]
    assert src["seed"] == 0 and src["per_tissue_cap"] is None
    assert src["soma_joinids_sha256"] == joinid_checksum(ds.obs["soma_joinid"].to_numpy())


def test_rebuild_is_identical_and_cap_is_seeded(census_store, tmp_path, built):
    uri = census_store[0]
    cfg = DataConfig(source="census", genes=40, cells=300, split_by="dataset_id",
                     census=CensusConfig(uri=uri, tissues=["blood", "lung"]))
    again = Dataset.open(build_dataset(cfg, out=tmp_path / "again", progress=False))
    first = built[0]
    assert again.manifest["checksums"]["values.npy"] == first.manifest["checksums"]["values.npy"]
    assert again.manifest["source"]["soma_joinids_sha256"] == first.manifest["source"]["soma_joinids_sha256"]
    # a per-tissue cap: at most cap cells per tissue before the subsample, same cells twice
    capped = cfg.model_copy(update={"cells": 150, "split_by": None,
                                    "census": CensusConfig(uri=uri, tissues=["blood", "lung"], per_tissue_cap=80)})
    a = Dataset.open(build_dataset(capped, out=tmp_path / "cap-a", progress=False))
    b = Dataset.open(build_dataset(capped, out=tmp_path / "cap-b", progress=False))
    assert a.manifest["source"]["n_cells_per_tissue_sampled"] == {"blood": 80, "lung": 80}
    assert a.manifest["source"]["soma_joinids_sha256"] == b.manifest["source"]["soma_joinids_sha256"]
    assert max(a.obs["tissue_general"].value_counts()) <= 80


def test_batch_aware_genes_equal_scanpy(census_store, tmp_path):
    uri, X, _ = census_store
    cfg = DataConfig(source="census", genes=30, cells=300, hvg_batch_key="dataset_id",
                     census=CensusConfig(uri=uri, tissues=["blood", "lung"]))
    ds = Dataset.open(build_dataset(cfg, out=tmp_path / "ds", progress=False))
    jids = ds.obs["soma_joinid"].to_numpy()
    train = np.sort(ds.splits["train"])
    assert ds.genes == _seurat_v3(X[jids[train]], 30, batch=ds.obs["dataset_id"].to_numpy()[train])


# ------------------------------------------------------------------------------ errors
def _run_cli(args, capsys):
    rc = cli.main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--organism", "danio_rerio"], r"unknown Census organism 'danio_rerio': use one of homo_sapiens, mus_musculus"),
        (["--organism", "mus_musculus"], r"has no organism 'mus_musculus': use one of homo_sapiens"),
        (["--obs-filter", "is_primary_data == True and raw_sum < 0"], r"matches no cells"),
        (["--obs-filter", "no_such_column == 3"], r"invalid --obs-filter"),
        (["--cells", "5000"], r"gives only \d+ cells .* but --cells is 5000"),
    ],
)
def test_errors_are_one_line(census_store, tmp_path, capsys, extra, pattern):
    out = tmp_path / "ds"
    rc, err = _run_cli([*_cli_args(census_store[0], out), *extra], capsys)
    assert rc != 0 and err.startswith("error: ") and "\n" not in err
    import re

    assert re.search(pattern, err), err
    assert not out.exists() and not any(p.name.startswith(".ds.") for p in tmp_path.iterdir())


def test_unreachable_census_names_census_uri(tmp_path, capsys, monkeypatch):
    import cellxgene_census

    def offline(**kw):
        raise ConnectionError("Failed to resolve 'census.cellxgene.cziscience.com'")

    monkeypatch.setattr(cellxgene_census, "open_soma", offline)
    out = tmp_path / "ds"
    rc, err = _run_cli(["data", "build", "--source", "census", "--genes", "10", "--cells", "20", "--out", str(out)], capsys)
    assert rc != 0 and "\n" not in err
    assert "Census (release 2025-01-30) is unreachable" in err and "--census-uri" in err
    assert not out.exists()

    def no_such_release(**kw):
        raise ValueError(f"Unable to locate Census version: {kw.get('census_version')}.")

    monkeypatch.setattr(cellxgene_census, "open_soma", no_such_release)
    rc, err = _run_cli(["data", "build", "--source", "census", "--census-version", "1999-01-01",
                        "--genes", "10", "--cells", "20", "--out", str(out)], capsys)
    assert rc != 0 and "unknown Census release '1999-01-01'" in err and not out.exists()
    rc, err = _run_cli(["data", "build", "--source", "census", "--census-uri", str(tmp_path / "nothing"),
                        "--genes", "10", "--cells", "20", "--out", str(out)], capsys)
    assert rc != 0 and "--census-uri" in err and not out.exists()


def test_missing_census_extra(monkeypatch, tmp_path, capsys):
    import cellscale.data.sources as sources_pkg

    monkeypatch.delattr(sources_pkg, "census", raising=False)
    monkeypatch.delitem(sys.modules, "cellscale.data.sources.census", raising=False)
    monkeypatch.setitem(sys.modules, "tiledbsoma", None)
    out = tmp_path / "ds"
    rc, err = _run_cli(["data", "build", "--source", "census", "--genes", "10", "--cells", "20", "--out", str(out)], capsys)
    assert rc != 0 and "pip install 'cellscale[census]'" in err and not out.exists()


# ------------------------------------------------------------------------------ live
@pytest.mark.network
def test_live_census_tiny_build(tmp_path):
    """Opens the real Census release 2025-01-30 and builds 200 spleen cells x 50 genes."""
    cfg = DataConfig(source="census", genes=50, cells=200, census=CensusConfig(
        tissues=["spleen"], per_tissue_cap=400,
        obs_filter="is_primary_data == True and assay == \"10x 3' v3\""))
    ds = Dataset.open(build_dataset(cfg, out=tmp_path / "ds", progress=False))
    assert ds.n_cells == 200 and ds.n_genes == 50
    assert ds.manifest["source"]["census_version"] == "2025-01-30"
    assert set(ds.obs["tissue_general"]) == {"spleen"}
    assert np.all(ds.library_size >= np.asarray(ds.counts).sum(axis=1))
