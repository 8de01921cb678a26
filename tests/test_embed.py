"""`cellscale embed`: a run's cell embedding written to obsm["X_cellscale"], new cells preprocessed as
the dataset was; and the TensorBoard view of a run's curves (cellscale.downstream.embedding, cellscale.runtime.tblog)."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import PROBE_DATA, require

from cellscale.cli import main
from cellscale.data.build import load_source
from cellscale.data.store import Dataset
from cellscale.downstream.embedding import EMBED_KEY, embed_dataset, load_run_model


@pytest.fixture(scope="module")
def own_embedding(trained_run_dir, probe_dataset_dir) -> np.ndarray:
    """The run's embedding of its dataset's own cells (the stored values)."""
    return embed_dataset(load_run_model(trained_run_dir, device="cpu"), Dataset.open(probe_dataset_dir))


def _source_cells(ds: Dataset, rows: np.ndarray, *, seed: int = 0, by_feature_id: bool = False) -> ad.AnnData:
    """The raw counts of ``rows`` of the dataset as its source had them: ALL source genes (the V
    HVGs and 136 more), shuffled out of order; optionally named by a feature_id column only."""
    src = load_source(PROBE_DATA)
    src = src[ds.obs["cell_id"].to_numpy()[rows]]
    order = np.random.default_rng(seed).permutation(src.n_vars)
    adata = ad.AnnData(X=src.X[:, order].copy(), obs=src.obs.copy(), var=pd.DataFrame(index=src.var_names[order]))
    if by_feature_id:
        adata.var["feature_id"] = adata.var_names.astype(str)
        adata.var_names = [f"sym{i}" for i in range(adata.n_vars)]
    return adata


@pytest.mark.parametrize("by_feature_id", [False, True])
def test_new_file_with_reordered_and_extra_genes_embeds_like_the_dataset(
        trained_run_dir, probe_dataset_dir, own_embedding, tmp_path, by_feature_id, capsys):
    ds = Dataset.open(probe_dataset_dir)
    rows = np.arange(0, ds.n_cells, 5)
    path = tmp_path / "cells.h5ad"
    _source_cells(ds, rows, by_feature_id=by_feature_id).write_h5ad(path)
    out = tmp_path / "embedded.h5ad"
    assert main(["embed", str(trained_run_dir), "--input", str(path), "--out", str(out),
                 "--dataset", str(probe_dataset_dir), "--device", "cpu"]) == 0
    assert f"embedded {rows.size} cells" in capsys.readouterr().out
    got = ad.read_h5ad(out)
    np.testing.assert_allclose(got.obsm[EMBED_KEY], own_embedding[rows], rtol=1e-5, atol=1e-6)
    prov = got.uns["cellscale"]
    assert prov["gene_key"] == ("feature_id" if by_feature_id else "var_names") and prov["n_missing_genes"] == 0
    assert got.n_vars == 200 and list(got.obs_names) == list(ds.obs["cell_id"].to_numpy()[rows])


def test_missing_gene_is_refused_in_one_line_unless_allowed(trained_run_dir, probe_dataset_dir, tmp_path, capsys):
    ds = Dataset.open(probe_dataset_dir)
    adata = _source_cells(ds, np.arange(40))
    adata = adata[:, adata.var_names != ds.genes[3]].copy()
    path = tmp_path / "lacking.h5ad"
    adata.write_h5ad(path)
    args = ["embed", str(trained_run_dir), "--input", str(path), "--out", str(tmp_path / "o.h5ad"),
            "--dataset", str(probe_dataset_dir), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "lacks 1 of the model's 64 genes" in err and ds.genes[3] in err and "--allow-missing-genes" in err
    assert not (tmp_path / "o.h5ad").exists()
    assert main([*args, "--allow-missing-genes"]) == 0
    assert "1 of the model's 64 genes are missing from the input" in capsys.readouterr().out


def test_scanpy_neighbors_on_the_output_of_a_dataset_dir(trained_run_dir, probe_dataset_dir, own_embedding,
                                                         tmp_path):
    """`--data DIR` embeds every cell of a dataset; the sweep.json above the run names its dataset."""
    import scanpy as sc

    sweep = tmp_path / "sweep"
    shutil.copytree(trained_run_dir, sweep / "runs" / "r")
    (sweep / "sweep.json").write_text(json.dumps({"dataset": str(probe_dataset_dir)}))
    out = tmp_path / "ds.h5ad"
    assert main(["embed", str(sweep / "runs" / "r"), "--data", str(probe_dataset_dir), "--out", str(out)]) == 0
    adata = ad.read_h5ad(out)
    np.testing.assert_allclose(adata.obsm[EMBED_KEY], own_embedding, rtol=1e-5, atol=1e-6)
    assert set(adata.obs["split"]) == {"train", "val", "test"}
    # method "gauss": the graph without umap's numba compilation (about 20 s on 2 cores); the
    # default method reads use_rep the same way
    sc.pp.neighbors(adata, use_rep=EMBED_KEY, n_neighbors=10, method="gauss")
    assert adata.obsp["connectivities"].shape == (adata.n_obs, adata.n_obs)


def test_embed_refuses_a_file_without_the_runs_genes(trained_run_dir, tmp_path, write_h5ad, capsys):
    path = write_h5ad(np.ones((3, 4), dtype=np.float32))
    assert main(["embed", str(trained_run_dir), "--input", str(path), "--out", str(tmp_path / "o.h5ad")]) == 2
    assert "lacks 64 of the model's 64 genes" in capsys.readouterr().err


def test_a_run_alone_is_enough_to_embed_new_cells(trained_run_dir, probe_dataset_dir, own_embedding, tmp_path):
    """registry.json: a run copied away from its sweep and dataset still embeds (no --dataset)."""
    ds = Dataset.open(probe_dataset_dir)
    reg = json.loads((trained_run_dir / "registry.json").read_text())
    assert reg["genes"] == ds.genes and reg["target_sum"] == ds.target_sum and reg["normalized_input"] is False
    alone = tmp_path / "alone"
    shutil.copytree(trained_run_dir, alone)
    rows = np.arange(0, ds.n_cells, 7)
    path = tmp_path / "cells.h5ad"
    _source_cells(ds, rows).write_h5ad(path)
    assert main(["embed", str(alone), "--input", str(path), "--out", str(tmp_path / "e.h5ad"), "--device", "cpu"]) == 0
    got = ad.read_h5ad(tmp_path / "e.h5ad")
    np.testing.assert_allclose(got.obsm[EMBED_KEY], own_embedding[rows], rtol=1e-5, atol=1e-6)
    assert got.uns["cellscale"]["dataset"] == "registry.json"


def test_the_notebook_api_writes_obsm_and_uns_in_memory(trained_run_dir, probe_dataset_dir, own_embedding):
    import cellscale
    from cellscale.downstream.embedding import RunModel

    ds = Dataset.open(probe_dataset_dir)
    rows = np.arange(0, ds.n_cells, 9)
    adata = _source_cells(ds, rows)
    assert cellscale.embed(adata, trained_run_dir) is None  # in place, as scanpy's tools
    np.testing.assert_allclose(adata.obsm["X_cellscale"], own_embedding[rows], rtol=1e-5, atol=1e-6)
    assert adata.uns["cellscale"]["n_cells"] == rows.size and adata.uns["cellscale"]["key"] == "X_cellscale"
    # the counts in a layer, X normalised; a copy under another key; the original untouched
    norm = adata.copy()
    norm.layers["counts"] = norm.X.copy()
    norm.X = np.log1p(norm.X.toarray() if hasattr(norm.X, "toarray") else np.asarray(norm.X, dtype=np.float32))
    del norm.obsm["X_cellscale"]
    rm = RunModel.load(trained_run_dir, device="cpu")
    other = cellscale.embed(norm, rm, layer="counts", key_added="X_run2", copy=True)
    np.testing.assert_allclose(other.obsm["X_run2"], own_embedding[rows], rtol=1e-5, atol=1e-6)
    assert other.uns["X_run2"]["layer"] == "counts" and "X_run2" not in norm.obsm
    np.testing.assert_allclose(rm.embed(adata), own_embedding[rows], rtol=1e-5, atol=1e-6)
    with pytest.raises(cellscale.errors.DataError, match="has no layer 'raw'"):
        cellscale.embed(adata, rm, layer="raw")
    with pytest.raises(cellscale.errors.DataError, match="non-integer values, so it is not raw counts"):
        cellscale.embed(norm, rm)  # log values in X: the counts are in a layer


def test_tensorboard_events_read_back(trained_run_dir):
    require("tensorboard")  # skipped without it, failed under CI
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained_run_dir / "tensorboard"))
    acc.Reload()
    lines = [json.loads(x) for x in (trained_run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r["kind"] == "eval"]
    val = acc.Scalars("val/mse")
    assert [e.step for e in val] == [r["cells_seen"] for r in evals]
    np.testing.assert_allclose([e.value for e in val], [r["val_mse"] for r in evals], rtol=1e-6)
    assert len(acc.Scalars("train/loss")) == sum(r["kind"] == "train" for r in lines)
    assert {"train/loss", "train/lr", "val/mse"} <= set(acc.Tags()["scalars"])


def test_tensorboard_absent_is_one_line(trained_run_dir, tmp_path, monkeypatch, capsys):
    import sys

    from cellscale.runtime import tblog

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run_dir / "metrics.jsonl", run / "metrics.jsonl")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setattr(tblog, "_NOTED", [])
    assert tblog.write_events(run) is None and tblog.write_events(run) is None
    assert not (run / "tensorboard").exists()
    err = capsys.readouterr().err
    assert err.count("TensorBoard logs skipped") == 1 and len(err.strip().splitlines()) == 1
