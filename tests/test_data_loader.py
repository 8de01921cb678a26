import numpy as np
import pytest
import torch

from cellscale.data.loader import TrainBatches, eval_batches
from cellscale.data.store import Dataset
from cellscale.errors import DataError


@pytest.fixture(scope="module")
def ds(tiny_dataset_dir):
    return Dataset.open(tiny_dataset_dir)


def test_batch_is_pure_in_seed_and_step(ds):
    a = TrainBatches(ds, batch_size=27, seed=3)
    v1, m1 = a.batch(13)
    a.batch(2), a.batch(40)  # other calls in between change nothing
    v2, m2 = a.batch(13)
    resumed = TrainBatches(ds, batch_size=27, seed=3)  # a fresh object "after a resume"
    v3, m3 = resumed.batch(13)
    assert v1.dtype == torch.float32 and m1.dtype == torch.bool
    assert v1.shape == m1.shape == (27, 64)
    for v, m in ((v2, m2), (v3, m3)):
        assert torch.equal(v, v1) and torch.equal(m, m1)
    v4, m4 = TrainBatches(ds, batch_size=27, seed=4).batch(13)
    assert not torch.equal(v4, v1) and not torch.equal(m4, m1)


def test_values_are_the_stored_rows(ds):
    tb = TrainBatches(ds, batch_size=27, seed=0)
    v, _ = tb.batch(5)
    assert np.array_equal(v.numpy(), np.asarray(ds.values)[tb.rows(5)])


def test_masks_differ_between_steps_and_follow_the_rule(ds):
    tb = TrainBatches(ds, batch_size=27, seed=0)
    masks = [tb.batch(s)[1] for s in range(20)]
    assert all(not torch.equal(masks[0], m) for m in masks[1:])
    # the same cell drawn in two epochs gets a new mask
    same_slot = [tb.batch(s)[1] for s in (0, tb.steps_per_epoch)]
    assert not torch.equal(*same_slot)
    allm = torch.stack(masks)
    assert allm.any(dim=-1).all()
    assert abs(allm.float().mean().item() - 0.15) < 0.02


def test_epoch_visits_every_cell_once(ds):
    tb = TrainBatches(ds, batch_size=27, seed=1)  # 270 train cells: 10 full batches
    assert tb.steps_per_epoch == 10
    for epoch in range(2):
        rows = np.concatenate([tb.rows(epoch * 10 + j) for j in range(10)])
        assert np.array_equal(np.sort(rows), np.sort(ds.splits["train"]))
    e0 = np.concatenate([tb.rows(j) for j in range(10)])
    e1 = np.concatenate([tb.rows(10 + j) for j in range(10)])
    assert not np.array_equal(e0, e1)  # reshuffled every epoch


def test_partial_last_batch_dropped(ds):
    tb = TrainBatches(ds, batch_size=32, seed=0)
    assert tb.steps_per_epoch == 270 // 32
    rows = np.concatenate([tb.rows(j) for j in range(tb.steps_per_epoch)])
    assert rows.size == 256 and np.unique(rows).size == 256
    assert all(tb.batch(s)[0].shape[0] == 32 for s in range(3 * tb.steps_per_epoch))


def test_only_training_cells(ds):
    heldout = set(ds.splits["val"]) | set(ds.splits["test"])
    for train_cells in (None, 50):
        tb = TrainBatches(ds, train_cells=train_cells, batch_size=10, seed=0)
        allowed = set(ds.train_indices(train_cells))
        seen = np.concatenate([tb.rows(s) for s in range(5 * tb.steps_per_epoch)])
        assert not heldout & set(seen)
        assert set(seen) <= allowed
        if train_cells:
            assert set(seen) == allowed


def test_iterate_equals_batch_and_resumes(ds):
    tb = TrainBatches(ds, batch_size=27, seed=2)
    got = list(tb.iterate(7, 15))
    assert len(got) == 15
    for k, (v, m) in enumerate(got):
        ref_v, ref_m = TrainBatches(ds, batch_size=27, seed=2).batch(7 + k)
        assert torch.equal(v, ref_v) and torch.equal(m, ref_m)
    it = tb.iterate(0)  # unbounded; closing it stops the thread
    next(it)
    it.close()


def test_iterate_pins_every_tensor_in_the_prefetch_thread_when_asked(ds, monkeypatch):
    import threading

    pinned = []

    def fake_pin(self):  # CPU-only machines cannot pin; record who pinned what instead
        pinned.append((threading.current_thread().name, tuple(self.shape)))
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    tb = TrainBatches(ds, batch_size=27, seed=2, with_counts=True)
    got = list(tb.iterate(3, 4, pin_memory=True))
    assert pinned == [("cellscale-prefetch", s) for _ in range(4) for s in ((27, ds.n_genes),) * 3 + ((27,),)]
    for k, item in enumerate(got):
        assert all(torch.equal(a, b) for a, b in zip(item, tb.batch(3 + k)))
    pinned.clear()
    list(tb.iterate(3, 4))
    assert pinned == []


@pytest.mark.gpu
def test_iterate_pins_on_a_cuda_machine(ds):
    # selected only with -m gpu: there a missing device is a failure, not a skip
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device"
    v, m = next(TrainBatches(ds, batch_size=27, seed=2).iterate(0, 1, pin_memory=True))
    assert v.is_pinned() and m.is_pinned()


def test_bad_arguments(ds):
    with pytest.raises(DataError, match="fewer than batch_size"):
        TrainBatches(ds, train_cells=10, batch_size=32, seed=0)
    with pytest.raises(DataError, match="train split has 270"):
        TrainBatches(ds, train_cells=1000, batch_size=8, seed=0)


def test_eval_batches_fixed_mask_in_split_order(ds):
    chunks = list(eval_batches(ds, "val", batch_size=4))
    v = torch.cat([c[0] for c in chunks])
    m = torch.cat([c[1] for c in chunks])
    assert [c[0].shape[0] for c in chunks] == [4, 4, 4, 3]
    assert np.array_equal(v.numpy(), np.asarray(ds.values)[ds.splits["val"]])
    assert np.array_equal(m.numpy(), ds.eval_mask("val"))
    again = torch.cat([c[1] for c in eval_batches(ds, "val", batch_size=7)])
    assert torch.equal(again, m)
    capped = list(eval_batches(ds, "test", batch_size=4, max_cells=6))
    pos = ds.eval_positions("test", 6)
    assert sum(c[0].shape[0] for c in capped) == 6 and np.all(np.diff(pos) > 0)
    assert np.array_equal(torch.cat([c[0] for c in capped]).numpy(), np.asarray(ds.values)[ds.splits["test"][pos]])
    assert np.array_equal(torch.cat([c[1] for c in capped]).numpy(), ds.eval_mask("test")[pos])
    with pytest.raises(DataError, match="eval_batches is for held-out splits: use 'val' or 'test'"):
        next(eval_batches(ds, "train", batch_size=4))


def test_a_capped_evaluation_represents_a_split_whose_file_order_is_grouped_by_tissue(write_h5ad, tmp_path):
    """The first half of the file is a sparse, easy tissue and the second a rich, hard one: the
    validation split (sorted by file position) starts with the easy tissue. A capped evaluation scores
    a fixed subset drawn across both in proportion, and agrees with the whole split within its
    sampling error; the first cells of the split (what it used to score) do not."""
    import pandas as pd

    from cellscale.config import DataConfig, TrainConfig
    from cellscale.data.build import build_dataset
    from cellscale.model import CellTransformer
    from cellscale.model.ladder import get_size
    from cellscale.train.evaluate import evaluate

    rng = np.random.default_rng(0)
    easy = rng.poisson(0.3, size=(600, 40))
    hard = rng.poisson(rng.gamma(2.0, 3.0, size=(600, 40)))
    obs = pd.DataFrame({"tissue": ["easy"] * 600 + ["hard"] * 600}, index=[f"c{i}" for i in range(1200)])
    path = write_h5ad(np.vstack([easy, hard]).astype(np.float32), obs=obs)
    out = build_dataset(DataConfig(source="h5ad", input=str(path), genes=40, cells=1200, hvg_flavor="all",
                                   split=(0.8, 0.1, 0.1)), out=tmp_path / "ds", progress=False)
    ds = Dataset.open(out)
    tissue = ds.obs["tissue"].to_numpy()[ds.splits["val"]]
    pos = ds.eval_positions("val", 40)
    assert (tissue[:40] == "easy").all()  # the old cap: the easy tissue only
    shares = pd.Series(tissue[pos]).value_counts()
    assert pos.size == 40 and abs(shares["easy"] - 40 * (tissue == "easy").mean()) <= 1
    assert np.array_equal(pos, Dataset.open(out).eval_positions("val", 40))  # fixed: the same at every evaluation
    model = CellTransformer(get_size("TINY", n_genes=40))
    cfg = TrainConfig(eval_batch_size=16)
    full = evaluate(model, ds, "val", cfg=cfg, device=torch.device("cpu"), per_cell=True)
    capped = evaluate(model, ds, "val", cfg=cfg, device=torch.device("cpu"), max_cells=40)
    per_cell = full.cells.sse / np.maximum(full.cells.n, 1)
    se = per_cell.std() / np.sqrt(40) * np.sqrt(1 - 40 / per_cell.size)  # a subset of a finite split
    first = full.cells.sse[:40].sum() / full.cells.n[:40].sum()
    assert abs(capped.mse - full.mse) <= 3 * se and abs(first - full.mse) > 5 * se
