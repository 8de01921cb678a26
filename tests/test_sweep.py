"""Sweeps: stable ids, results table, finished runs skipped, failures recorded."""

from pathlib import Path

import pandas as pd
import pytest

import cellscale.sweep.runner as runner
from cellscale.config import RunConfig, parse_config
from cellscale.errors import RunError
from cellscale.sweep import run_sweep
from cellscale.train import RESULT_FIELDS


def _cfg(dataset: Path, **sweep) -> RunConfig:
    return parse_config(RunConfig, {
        "name": "t", "dataset": str(dataset),
        "train": {"cells_seen": 256, "batch_size": 32, "eval_every": 4, "num_threads": 1},
        "sweep": {"sizes": ["XXS", "TINY"], "seeds": [0, 1], "train_cells": [None, 50], **sweep},
    })


def test_sweep_table_and_skip_on_rerun(tiny_dataset_dir: Path, tmp_path: Path):
    cfg = _cfg(tiny_dataset_dir)
    out = tmp_path / "sw"
    csv = run_sweep(cfg, out=out, progress=False)
    table = pd.read_csv(csv)
    assert list(table.columns) == list(RESULT_FIELDS)
    assert list(table["run_id"]) == [
        "XXS-dall-s0", "XXS-dall-s1", "XXS-d50-s0", "XXS-d50-s1",
        "TINY-dall-s0", "TINY-dall-s1", "TINY-d50-s0", "TINY-d50-s1",
    ]
    assert (table["status"] == "ok").all()
    assert set(table.loc[table["run_id"].str.contains("d50"), "train_cells"]) == {50}
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    again = pd.read_csv(run_sweep(cfg, out=out, progress=False))
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")} == stamps
    pd.testing.assert_frame_equal(table, again)


def test_failed_run_is_recorded_and_sweep_goes_on(tiny_dataset_dir: Path, tmp_path: Path, monkeypatch):
    real = runner.train_run

    def boom(dataset, model, train, **kw):
        if kw["run_id"] == "XXS-dall-s1":
            raise RuntimeError("simulated crash")
        return real(dataset, model, train, **kw)

    monkeypatch.setattr(runner, "train_run", boom)
    cfg = _cfg(tiny_dataset_dir, train_cells=[None])
    table = pd.read_csv(run_sweep(cfg, out=tmp_path / "sw", progress=False))
    status = dict(zip(table["run_id"], table["status"]))
    assert status == {"XXS-dall-s0": "ok", "XXS-dall-s1": "failed", "TINY-dall-s0": "ok", "TINY-dall-s1": "ok"}
    assert "simulated crash" in table.set_index("run_id").loc["XXS-dall-s1", "error"]
    # the rerun retries the failed run only
    monkeypatch.setattr(runner, "train_run", real)
    table = pd.read_csv(run_sweep(cfg, out=tmp_path / "sw", progress=False))
    assert (table["status"] == "ok").all() and len(table) == 4


def test_sweep_dir_holding_something_else_is_refused(tiny_dataset_dir: Path, tmp_path: Path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(RunError, match="not a cellscale sweep"):
        run_sweep(_cfg(tiny_dataset_dir), out=out, progress=False)
    assert (out / "thesis.tex").read_text() == "precious"
    run_sweep(_cfg(tiny_dataset_dir, sizes=["XXS"], seeds=[0], train_cells=[None]), out=tmp_path / "a", progress=False)
    with pytest.raises(RunError, match="another config"):
        run_sweep(_cfg(tiny_dataset_dir, sizes=["TINY"], seeds=[0], train_cells=[None]), out=tmp_path / "a", progress=False)


def test_diverged_run_is_recorded_and_sweep_goes_on(tiny_dataset_dir: Path, tmp_path: Path, monkeypatch):
    from cellscale.model import CellTransformer

    real_train, real_loss = runner.train_run, CellTransformer.loss

    def train_with_blowup(dataset, model, train, **kw):
        if kw["run_id"] != "TINY-dall-s0":
            return real_train(dataset, model, train, **kw)
        calls = {"n": 0}

        def nan_at_third(self, values, mask):
            calls["n"] += 1
            loss = real_loss(self, values, mask)
            return loss * float("nan") if calls["n"] == 3 else loss

        with monkeypatch.context() as m:
            m.setattr(CellTransformer, "loss", nan_at_third)
            return real_train(dataset, model, train, **kw)

    monkeypatch.setattr(runner, "train_run", train_with_blowup)
    cfg = _cfg(tiny_dataset_dir, train_cells=[None])
    out = tmp_path / "sw"
    table = pd.read_csv(run_sweep(cfg, out=out, progress=False)).set_index("run_id")
    assert dict(table["status"]) == {"XXS-dall-s0": "ok", "XXS-dall-s1": "ok",
                                     "TINY-dall-s0": "diverged", "TINY-dall-s1": "ok"}
    assert table.loc["TINY-dall-s0", "steps"] == 2
    assert table.loc["TINY-dall-s0", "error"] == "non-finite loss at step 2"
    assert pd.isna(table.loc["TINY-dall-s0", "best_val_mse"])  # no eval before the blow-up
    # a diverged run is finished: the rerun does not redo it
    stamp = (out / "runs" / "TINY-dall-s0" / "result.json").stat().st_mtime_ns
    monkeypatch.setattr(runner, "train_run", real_train)
    again = pd.read_csv(run_sweep(cfg, out=out, progress=False)).set_index("run_id")
    assert (out / "runs" / "TINY-dall-s0" / "result.json").stat().st_mtime_ns == stamp
    assert again.loc["TINY-dall-s0", "status"] == "diverged" and len(again) == 4
