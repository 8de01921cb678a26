"""Sweeps: stable ids, results table, finished runs skipped, failures recorded."""

from pathlib import Path

import pandas as pd
import pytest

import cellscale.sweep.runner as runner
from cellscale.config import StudyConfig, parse_config
from cellscale.errors import RunError
from cellscale.schema import RESULT_FIELDS
from cellscale.sweep import run_sweep


def _cfg(dataset: Path, **sweep) -> StudyConfig:
    return parse_config(StudyConfig, {
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
    assert set(table["depth"]) == {1.0}
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


def test_depth_axis_sweep_trains_each_depth_on_its_thinned_dataset(tiny_dataset_dir: Path, tmp_path: Path):
    import json

    from cellscale.data.store import Dataset
    from cellscale.report.writer import write_report

    cfg = parse_config(StudyConfig, {
        "name": "depth", "dataset": str(tiny_dataset_dir),
        "train": {"cells_seen": 256, "batch_size": 32, "eval_every": 4, "num_threads": 1},
        "sweep": {"sizes": ["XXS", "TINY"], "depths": [1.0, 0.5]},
        "fit": {"law": "power", "bootstrap": 10, "keep_unconverged": True},  # 8 steps: wiring, not plateaus
    })
    out = tmp_path / "sw"
    table = pd.read_csv(run_sweep(cfg, out=out, progress=False))
    assert list(table["run_id"]) == ["XXS-dall-s0", "XXS-dall-s0-f0.5", "TINY-dall-s0", "TINY-dall-s0-f0.5"]
    assert list(table["depth"]) == [1.0, 0.5, 1.0, 0.5] and (table["status"] == "ok").all()

    base, half = Dataset.open(tiny_dataset_dir), Dataset.open(out / "datasets" / "depth-0.5")
    assert half.manifest["depth_fraction"] == 0.5
    assert half.manifest["thinning"]["parent_checksum"] == base.manifest["checksums"]["values.npy"]
    assert (out / "datasets" / "depth-0.5" / "baselines.json").is_file()
    assert json.loads((out / "sweep.json").read_text())["depth_datasets"] == {"0.5": str(half.path.resolve())}
    # each run trained on its depth's dataset and is scored against that dataset's baseline
    for rid, ds in (("XXS-dall-s0", base), ("TINY-dall-s0-f0.5", half)):
        identity = json.loads((out / "runs" / rid / "config.json").read_text())
        assert identity["dataset_checksum"] == ds.manifest["checksums"]["values.npy"], rid
        row = table.set_index("run_id").loc[rid]
        assert row["gene_mean_val_mse"] == pytest.approx(ds.baselines["gene_mean"]["val"], rel=1e-12)
    # the headline baselines stay the full-depth dataset's
    headline = json.loads((out / "baselines.json").read_text())
    assert headline["gene_mean"]["val"] == pytest.approx(base.baselines["gene_mean"]["val"], rel=1e-12)

    write_report(out)
    fit = json.loads((out / "fit.json").read_text())
    assert set(fit["by_depth"]) == {"1", "0.5"}
    assert [fit["by_depth"][k]["n_points"] for k in ("1", "0.5")] == [2, 2] and fit["n_points"] == 2
    assert fit["by_depth"]["0.5"]["baselines"]["gene_mean"]["val"] == pytest.approx(
        half.baselines["gene_mean"]["val"], rel=1e-12)
    assert (out / "figures" / "loss_vs_depth.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "## Sequencing depth" in md and "| XXS-dall-s0-f0.5 | XXS |" in md

    # a rerun reuses the thinned dataset and the finished runs
    stamp = (out / "datasets" / "depth-0.5" / "manifest.json").stat().st_mtime_ns
    pd.testing.assert_frame_equal(pd.read_csv(run_sweep(cfg, out=out, progress=False)), table)
    assert (out / "datasets" / "depth-0.5" / "manifest.json").stat().st_mtime_ns == stamp


def test_depth_axis_on_data_without_counts_is_refused_before_anything_is_written(tmp_path: Path):
    from cellscale.config import ConfigError

    cfg = parse_config(StudyConfig, {"data": {"simulate": {"mode": "gaussian"}}, "sweep": {"depths": [1.0, 0.5]}})
    with pytest.raises(ConfigError, match="sweep.depths thins raw counts, but the data section builds from the "
                                          "gaussian simulator mode"):
        run_sweep(cfg, out=tmp_path / "sw", progress=False)
    assert not (tmp_path / "sw").exists()


def test_dataset_for_picks_each_depths_dataset():
    from cellscale.sweep.plan import plan_runs
    from cellscale.sweep.runner import dataset_for

    cfg = parse_config(StudyConfig, {"sweep": {"sizes": ["XXS"], "depths": [1.0, 0.5]}})
    full, half = plan_runs(cfg, n_genes=16)
    assert dataset_for(full, "/ds") == "/ds" and dataset_for(half, {1.0: "/ds", 0.5: "/half"}) == "/half"
    with pytest.raises(RunError, match="run XXS-dall-s0-f0.5 needs the dataset thinned to depth 0.5"):
        dataset_for(half, "/ds")
    with pytest.raises(RunError, match="run XXS-dall-s0-f0.5: no dataset for depth 0.5"):
        dataset_for(half, {1.0: "/ds"})


def test_sweep_hash_ignores_new_axes_left_off():
    """A sweep dir claimed before `depths`, `epochs` and the later settings existed still resumes."""
    from cellscale.config import ADDED_SETTINGS_OFF, NOT_IDENTITY, config_hash
    from cellscale.sweep.study import sweep_hash

    cfg = parse_config(StudyConfig, {"sweep": {"sizes": ["XXS"]}})
    old_style = cfg.model_dump(mode="json")
    del old_style["sweep"]["depths"], old_style["sweep"]["epochs"]
    for section in ("train", "sweep", "fit"):  # the settings added after depths and epochs
        for key in (*ADDED_SETTINGS_OFF[section], *NOT_IDENTITY.get(section, ())):
            old_style[section].pop(key, None)
    assert sweep_hash(cfg) == config_hash(old_style)
    for axis in ({"depths": [1.0, 0.5]}, {"epochs": 2}, {"lr_multipliers": [0.5, 1.0]}):
        other = parse_config(StudyConfig, {"sweep": {"sizes": ["XXS"], **axis}})
        assert sweep_hash(other) != sweep_hash(cfg)


def test_a_first_seed_rate_search_trains_later_seeds_at_its_choice(tiny_dataset_dir: Path, tmp_path: Path):
    cfg = _cfg(tiny_dataset_dir, seeds=[0, 1, 2], train_cells=[None], lr_multipliers=[0.5, 1.0],
               lr_search="first-seed")
    out = tmp_path / "sw"
    table = pd.read_csv(run_sweep(cfg, out=out, progress=False))
    first = table[table["seed"] == 0]
    assert sorted(first["run_id"]) == ["TINY-dall-s0", "TINY-dall-s0-lr0.5", "XXS-dall-s0", "XXS-dall-s0-lr0.5"]
    for size, runs in first.groupby("size"):
        best = runs.loc[runs["best_val_mse"].idxmin(), "lr_scale"]
        later = table[(table["size"] == size) & (table["seed"] > 0)]
        assert list(later["seed"]) == [1, 2] and set(later["lr_scale"]) == {best}, size
    assert len(table) == 4 + 2 * 2 and sorted(p.name for p in (out / "runs").iterdir()) == sorted(table["run_id"])
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    pd.testing.assert_frame_equal(table, pd.read_csv(run_sweep(cfg, out=out, progress=False)))
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")} == stamps
