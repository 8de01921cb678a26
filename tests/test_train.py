"""One training run: accounting, schedule, resume, divergence, refusal of a foreign run dir."""

import json
import math
from pathlib import Path

import pytest
import torch

from cellscale.config import ModelConfig, TrainConfig
from cellscale.data.store import Dataset
from cellscale.errors import RunError
from cellscale.model import CellTransformer, count_params, flops_per_cell, non_embedding_params
from cellscale.model.ladder import get_size
from cellscale.train import frozen_gc, lr_at, resolve_lr, run_threads, train_run

TRAIN = TrainConfig(cells_seen=32 * 24, batch_size=32, eval_every=6, eval_batch_size=64,
                    warmup_frac=0.1, num_threads=1)


def _metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for rec in lines:
        rec.pop("wall", None)
    return lines


def test_result_accounting(tiny_dataset_dir: Path, tmp_path: Path):
    ds = Dataset.open(tiny_dataset_dir)
    model = get_size("XS", n_genes=ds.n_genes)
    res = train_run(ds, model, TRAIN, out=tmp_path / "run", train_cells=100, seed=0)
    assert res["status"] == "ok"
    assert res["steps"] == 24
    assert res["cells_seen"] == 24 * 32
    assert res["tokens_seen"] == 24 * 32 * ds.n_genes
    assert res["train_cells"] == 100
    assert res["params"] == count_params(model) == sum(p.numel() for p in CellTransformer(model).parameters())
    assert res["non_embedding_params"] == non_embedding_params(model)
    assert res["flops"] == pytest.approx(flops_per_cell(model, mask_prob=0.15)["train"] * 24 * 32)
    assert res["gene_mean_val_mse"] == ds.manifest["baselines"]["gene_mean"]["val"]
    evals = [m for m in _metrics(tmp_path / "run") if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [6, 12, 18, 24]
    best = min(evals, key=lambda m: m["val_mse"])
    assert res["best_step"] == best["step"]
    assert res["best_val_mse"] == pytest.approx(best["val_mse"], rel=1e-6)
    assert math.isfinite(res["test_mse"])
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["best_val_mse"] == res["best_val_mse"]


def test_training_freezes_the_collector_only_while_it_runs(tiny_dataset_dir: Path, tmp_path: Path):
    import gc

    seen = []
    res = train_run(Dataset.open(tiny_dataset_dir), get_size("TINY", n_genes=32), TRAIN, out=tmp_path / "run",
                    train_cells=100, seed=0, on_step=lambda rec: seen.append(gc.get_freeze_count()))
    assert res["status"] == "ok" and len(seen) == 24
    assert min(seen) > 0  # the objects alive at the start were frozen during the loop
    assert gc.get_freeze_count() == 0  # and released after it
    gc.freeze()  # a caller's own freeze is left as it is
    try:
        with frozen_gc():
            pass
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_small_steps_run_on_one_thread_and_the_next_run_gets_the_callers_count(tiny_dataset_dir: Path,
                                                                               tmp_path: Path):
    ds = Dataset.open(tiny_dataset_dir)
    auto = TRAIN.model_copy(update={"num_threads": None})
    before = torch.get_num_threads()
    threads: dict[str, set[int]] = {"TINY": set(), "XS": set()}
    # without dropout XS's step (1.4e9 FLOPs) is under SMALL_STEP_FLOPS too; with it, far over
    assert run_threads(get_size("XS", n_genes=ds.n_genes), auto, torch.device("cpu")) == 1
    for name in threads:
        cfg = get_size(name, n_genes=ds.n_genes, dropout=0.1)
        expect = run_threads(cfg, auto, torch.device("cpu"))
        assert expect == (1 if name == "TINY" else None)  # TINY's step is far under SMALL_STEP_FLOPS, XS's far over
        train_run(ds, cfg, auto, out=tmp_path / name, train_cells=100, seed=0,
                  on_step=lambda rec, n=name: threads[n].add(torch.get_num_threads()))
        assert torch.get_num_threads() == before
    assert threads == {"TINY": {1}, "XS": {before}}


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(warmup_frac=0.1, final_lr_frac=0.1, schedule="cosine")
    lrs = [lr_at(s, total_steps=100, peak=1.0, cfg=cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    const = TrainConfig(schedule="constant")
    assert {lr_at(s, total_steps=100, peak=0.5, cfg=const) for s in range(100)} == {0.5}


def test_auto_lr_shrinks_with_width_and_scales_with_batch():
    cfg = TrainConfig(batch_size=64, lr_batch_ref=64, lr_batch_scaling="sqrt")
    lr = {d: resolve_lr(ModelConfig(d_model=d, n_layers=1, n_heads=1), cfg) for d in (1, 64, 256, 1024)}
    assert lr[1] == cfg.lr_max and lr[64] == pytest.approx(cfg.lr_base)
    assert lr[256] == pytest.approx(cfg.lr_base / 4) and lr[1024] == pytest.approx(cfg.lr_base / 16)
    small = TrainConfig(batch_size=16, lr_batch_ref=64, lr_batch_scaling="sqrt")
    assert resolve_lr(ModelConfig(d_model=64, n_layers=1, n_heads=1), small) == pytest.approx(cfg.lr_base / 2)


def test_auto_lr_is_clamped_and_batch_scaling_none_and_linear():
    narrow, wide = ModelConfig(d_model=1, n_layers=1, n_heads=1), ModelConfig(d_model=4096, n_layers=1, n_heads=1)
    base = dict(lr_base=5e-3, lr_min=1e-4, lr_max=3e-2, batch_size=64, lr_batch_ref=64, lr_batch_scaling="none")
    cfg = TrainConfig(**base)
    assert 5e-3 * 64 / 1 > 3e-2 and 5e-3 * 64 / 4096 < 1e-4  # both ends clamp
    assert resolve_lr(narrow, cfg) == pytest.approx(3e-2) and resolve_lr(wide, cfg) == pytest.approx(1e-4)
    mid = ModelConfig(d_model=128, n_layers=1, n_heads=1)
    assert resolve_lr(mid, cfg) == pytest.approx(2.5e-3)
    for batch, scaling, factor in [(256, "none", 1.0), (256, "linear", 4.0), (16, "linear", 0.25),
                                   (256, "sqrt", 2.0)]:
        c = TrainConfig(**{**base, "batch_size": batch, "lr_batch_scaling": scaling})
        assert resolve_lr(mid, c) == pytest.approx(2.5e-3 * factor), (batch, scaling)
        # the clamp applies before the batch scaling: a clamped rate is scaled too
        assert resolve_lr(narrow, c) == pytest.approx(3e-2 * factor), (batch, scaling)
    fixed = TrainConfig(**{**base, "lr": 1e-3, "batch_size": 128, "lr_batch_scaling": "linear"})
    assert resolve_lr(wide, fixed) == pytest.approx(2e-3)  # a given rate is not clamped, only scaled


def test_logged_rate_is_resolve_lr_through_lr_at(tiny_dataset_dir: Path, tmp_path: Path):
    ds = Dataset.open(tiny_dataset_dir)
    model = get_size("TINY", n_genes=ds.n_genes)
    cfg = TRAIN.model_copy(update={"lr_batch_scaling": "linear", "lr_batch_ref": 16, "schedule": "cosine"})
    res = train_run(ds, model, cfg, out=tmp_path / "run", train_cells=100, seed=0)
    peak = resolve_lr(model, cfg)
    assert peak == pytest.approx(cfg.lr_base * 64 / model.d_model * 2)  # 32 / 16 cells per batch
    assert res["lr"] == pytest.approx(peak)
    train_lines = [m for m in _metrics(tmp_path / "run") if m["kind"] == "train"]
    assert len(train_lines) >= 4
    # a train line at step s logs the rate its last update (step s - 1) used
    for rec in train_lines:
        assert rec["lr"] == pytest.approx(lr_at(rec["step"] - 1, total_steps=24, peak=peak, cfg=cfg), rel=1e-12)
    assert len({rec["lr"] for rec in train_lines}) > 2  # warmup and decay: the rate moves


def test_resume_gives_identical_metrics(tiny_dataset_dir: Path, tmp_path: Path):
    ds = Dataset.open(tiny_dataset_dir)
    model = get_size("XS", n_genes=ds.n_genes)
    straight = train_run(ds, model, TRAIN, out=tmp_path / "a", seed=3)
    # stop after 9 steps: the last checkpoint is at step 6, steps 7-9 are redone
    partial = train_run(ds, model, TRAIN, out=tmp_path / "b", seed=3, stop_after_steps=9)
    assert partial["status"] == "incomplete"
    assert not (tmp_path / "b" / "result.json").exists()
    resumed = train_run(ds, model, TRAIN, out=tmp_path / "b", seed=3)
    # resumed from the step-6 checkpoint, not restarted (the runs are deterministic, so a
    # restart from step 0 would give the same metrics)
    assert straight["resumed_at"] == [] and resumed["resumed_at"] == [6]
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    for key in ("best_val_mse", "test_mse", "best_step", "steps", "cells_seen", "masked_tokens_seen"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6, abs=0), key


def test_finished_run_is_not_redone_and_foreign_settings_refused(tiny_dataset_dir: Path, tmp_path: Path):
    ds = Dataset.open(tiny_dataset_dir)
    model = get_size("TINY", n_genes=ds.n_genes)
    first = train_run(ds, model, TRAIN, out=tmp_path / "r")
    mtime = (tmp_path / "r" / "result.json").stat().st_mtime_ns
    again = train_run(ds, model, TRAIN, out=tmp_path / "r")
    assert again == first
    assert (tmp_path / "r" / "result.json").stat().st_mtime_ns == mtime
    other = TRAIN.model_copy(update={"cells_seen": 64})
    with pytest.raises(RunError, match="holds a run with other settings"):
        train_run(ds, model, other, out=tmp_path / "r")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not empty and holds no cellscale run"):
        train_run(ds, model, TRAIN, out=tmp_path / "x")


def test_nan_loss_marks_run_diverged(tiny_dataset_dir: Path, tmp_path: Path, monkeypatch):
    ds = Dataset.open(tiny_dataset_dir)
    model = get_size("TINY", n_genes=ds.n_genes)
    calls = {"n": 0}
    real = CellTransformer.loss

    def flaky(self, values, mask):
        calls["n"] += 1
        loss = real(self, values, mask)
        return loss * float("nan") if calls["n"] == 8 else loss

    monkeypatch.setattr(CellTransformer, "loss", flaky)
    res = train_run(ds, model, TRAIN, out=tmp_path / "d")
    assert res["status"] == "diverged"
    assert res["diverged_at"] == 7 and res["steps"] == 7
    assert "non-finite loss at step 7" in res["error"]
    assert res["best_step"] == 6  # the eval before the blow-up is kept


def test_overwrite_replaces_a_foreign_or_other_run_dir(tiny_dataset_dir: Path, tmp_path: Path):
    ds = Dataset.open(tiny_dataset_dir)
    model = get_size("XXS", n_genes=ds.n_genes)
    short = TRAIN.model_copy(update={"cells_seen": 64})
    out = tmp_path / "x"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    first = train_run(ds, model, short, out=out, overwrite=True)
    assert first["status"] == "ok" and not (out / "notes.txt").exists()
    # the same settings with --overwrite: the finished run is returned, not redone
    mtime = (out / "result.json").stat().st_mtime_ns
    assert train_run(ds, model, short, out=out, overwrite=True) == first
    assert (out / "result.json").stat().st_mtime_ns == mtime
    # other settings: replaced
    other = short.model_copy(update={"cells_seen": 96})
    assert train_run(ds, model, other, out=out, overwrite=True)["steps"] == 3


def test_train_losses_are_read_from_the_device_only_when_due(tiny_dataset_dir: Path, tmp_path: Path, monkeypatch):
    # 120 steps: log every 2 (120 // 50), eval every 12, checkpoint every 30; a read at each of
    # the 60 due steps, each of the steps since the one before (never one read per step)
    from cellscale.train import loop

    reads: list[int] = []
    real_read = loop.PendingLosses.read

    def spy(self, run):
        reads.append(len(self.losses))
        return real_read(self, run)

    monkeypatch.setattr(loop.PendingLosses, "read", spy)
    seen: list = []
    cfg = TRAIN.model_copy(update={"cells_seen": 32 * 120, "eval_every": 12, "checkpoint_every": 30})
    res = train_run(Dataset.open(tiny_dataset_dir), get_size("XXS", n_genes=64), cfg, out=tmp_path / "r",
                    on_step=lambda info: seen.append(info["loss"]))
    assert res["status"] == "ok" and res["steps"] == 120
    assert reads == [2] * 60
    train_lines = [m for m in _metrics(tmp_path / "r") if m["kind"] == "train"]
    assert [m["step"] for m in train_lines] == list(range(2, 121, 2))
    # progress sees the newest loss read: none before the first read, then the read step's own
    assert seen[0] is None and seen[1] is not None and seen[2] == seen[1]
