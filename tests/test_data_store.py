import json
import os
import shutil

import numpy as np
import pytest

from cellscale.data.build import build_dataset
from cellscale.data.store import Dataset, DatasetWriter, eval_mask
from cellscale.errors import DataError


@pytest.fixture()
def ds_copy(tiny_dataset_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_dataset_dir, dst)
    return dst


def test_layout_and_manifest(tiny_dataset_dir, tiny_data_cfg):
    # baselines.json is the cache a sweep over the shared fixture may have written since
    files = {p.name for p in tiny_dataset_dir.iterdir()} - {"baselines.json"}
    assert files == {"manifest.json", "values.npy", "counts.npy", "library_size.npy", "splits.npz", "obs.parquet"}
    m = json.loads((tiny_dataset_dir / "manifest.json").read_text())
    for key in ("source", "V", "D", "seed", "preprocessing", "genes", "split_sizes", "eval_mask_seed",
                "mask_prob", "baselines", "checksums", "cellscale_version", "created"):
        assert key in m, key
    assert (m["V"], m["D"], m["mask_prob"]) == (64, 300, 0.15)
    assert m["split_sizes"] == {"train": 270, "val": 15, "test": 15}
    assert len(m["genes"]) == 64 and m["source"]["kind"] == "simulate"
    assert set(m["checksums"]) == files - {"manifest.json"}
    ds = Dataset.open(tiny_dataset_dir)
    assert ds.values.shape == (300, 64) and ds.counts.shape == (300, 64)
    assert ds.obs.shape[0] == 300 and {"cell_type", "dataset_id", "donor_id"} <= set(ds.obs)
    assert ds.genes == m["genes"] and ds.n_genes == 64 and ds.n_cells == 300


def test_gene_mean_baseline_matches_numpy(tiny_dataset_dir):
    ds = Dataset.open(tiny_dataset_dir)
    v = np.asarray(ds.values, dtype=np.float64)
    means = v[ds.splits["train"]].mean(axis=0)
    for split in ("val", "test"):
        m = ds.eval_mask(split)
        err = (v[ds.splits[split]] - means)[m]
        assert ds.baselines["gene_mean"][split] == pytest.approx(np.sum(err**2) / m.sum(), rel=1e-12)


def test_eval_mask_fixed_and_at_least_one(tiny_dataset_dir):
    ds = Dataset.open(tiny_dataset_dir)
    m = ds.eval_mask("val")
    assert m.shape == (15, 64) and m.dtype == bool
    assert np.array_equal(m, Dataset.open(tiny_dataset_dir).eval_mask("val"))
    assert not np.array_equal(m, ds.eval_mask("test")[:15])
    big = eval_mask(20000, 64, seed=0, split="val", mask_prob=0.15)
    assert big.any(axis=1).all()
    assert abs(big.mean() - 0.15) < 0.005
    tiny_p = eval_mask(2000, 4, seed=0, split="val", mask_prob=0.01)
    assert tiny_p.sum(axis=1).min() == 1  # rows with no draw get exactly one masked gene


def test_tampered_values_refused(ds_copy):
    v = np.load(ds_copy / "values.npy", mmap_mode="r+")
    v[5, 3] += 1.0
    v.flush()
    del v
    with pytest.raises(DataError, match="values.npy does not match its checksum"):
        Dataset.open(ds_copy)
    Dataset.open(ds_copy, verify="quick")  # same size and shape: only the checksum sees it


def test_truncated_values_refused(ds_copy):
    p = ds_copy / "values.npy"
    data = p.read_bytes()
    p.write_bytes(data[:-1000])
    with pytest.raises(DataError, match="values.npy is truncated"):
        Dataset.open(ds_copy, verify="quick")
    with pytest.raises(DataError, match="truncated"):
        Dataset.open(ds_copy)


def test_missing_file_and_not_a_dataset(ds_copy, tmp_path):
    (ds_copy / "splits.npz").unlink()
    with pytest.raises(DataError, match="splits.npz is missing"):
        Dataset.open(ds_copy)
    with pytest.raises(DataError, match="not found"):
        Dataset.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a cellscale dataset"):
        Dataset.open(tmp_path / "empty")


def test_refuses_foreign_target_unless_overwrite(tiny_data_cfg, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a cellscale dataset: pass --overwrite"):
        build_dataset(tiny_data_cfg, out=out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataError, match="--overwrite"):
        build_dataset(tiny_data_cfg, out=f, progress=False)
    build_dataset(tiny_data_cfg, out=out, overwrite=True, progress=False)
    assert not (out / "notes.txt").exists()
    Dataset.open(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_reuse_same_config_refuse_other(tiny_data_cfg, tiny_dataset_dir, ds_copy):
    before = (ds_copy / "manifest.json").read_text()
    assert build_dataset(tiny_data_cfg, out=ds_copy, progress=False) == ds_copy.absolute()
    assert (ds_copy / "manifest.json").read_text() == before  # reused, not rebuilt
    other = tiny_data_cfg.model_copy(update={"seed": 5})
    with pytest.raises(DataError, match="another cellscale dataset"):
        build_dataset(other, out=ds_copy, progress=False)
    build_dataset(other, out=ds_copy, overwrite=True, progress=False)
    assert Dataset.open(ds_copy).manifest["seed"] == 5


def test_failed_build_leaves_nothing(tmp_path):
    out = tmp_path / "ds"
    with DatasetWriter(out) as w:
        w.save("library_size.npy", np.ones(3))
        tmp = w.tmp
        assert tmp.exists() and not out.exists()
        w.abort()
    assert not tmp.exists() and not out.exists()
    with pytest.raises(RuntimeError):
        with DatasetWriter(out) as w:
            w.save("values.npy", np.ones((2, 2)))
            raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_killed_build_leftover_is_not_trusted_and_cleaned(tiny_data_cfg, tmp_path):
    out = tmp_path / "ds"
    # what a SIGKILL mid-build leaves: a temp dir of a dead process, no target
    stale = tmp_path / f".ds.building-{2**22 + 12345}-abcd"
    stale.mkdir()
    (stale / "values.npy").write_bytes(b"partial")
    with pytest.raises(DataError, match="not found"):
        Dataset.open(out)
    build_dataset(tiny_data_cfg, out=out, progress=False)
    assert not stale.exists()
    Dataset.open(out)


def test_float16_storage(tiny_data_cfg, tmp_path):
    ds = Dataset.open(build_dataset(tiny_data_cfg.model_copy(update={"dtype": "float16"}), out=tmp_path / "h", progress=False))
    assert ds.values.dtype == np.float16
    from cellscale.data.loader import TrainBatches, eval_batches

    v, m = TrainBatches(ds, batch_size=16, seed=0).batch(0)
    assert v.dtype.is_floating_point and str(v.dtype) == "torch.float32"
    ev, _ = next(eval_batches(ds, "val", batch_size=4))
    assert str(ev.dtype) == "torch.float32"
    assert os.path.getsize(ds.path / "values.npy") < 300 * 64 * 4
