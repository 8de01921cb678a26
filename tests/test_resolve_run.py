"""One run's settings have one source: `cellscale train --config X` trains what `cellscale sweep X` does.

``cellscale.train.spec.resolve_run`` gives both commands a run's model and training settings
(model defaults, per-size overrides, ``sweep.epochs``); ``train``'s flags go on top.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cellscale.cli import main
from cellscale.config import ConfigError, StudyConfig, parse_config
from cellscale.sweep.plan import plan_runs, resolve_run

# sweep.epochs sets cells_seen (not train.cells_seen) and TINY has its own batch size and lr:
# a train command that skipped either would train another budget
STUDY = {
    "name": "same-run",
    "train": {"cells_seen": 64, "batch_size": 32, "eval_every": 3, "num_threads": 1},
    "sweep": {"sizes": ["TINY"], "train_cells": [100], "seeds": [1], "epochs": 1.5,
              "overrides": {"TINY": {"batch_size": 16, "lr": 0.004}}},
}


def _jsonl_without_clock(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if not k.startswith("wall")} for row in rows]


def test_train_with_config_is_the_same_run_as_in_the_sweep(tiny_dataset_dir: Path, tmp_path: Path):
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump({**STUDY, "dataset": str(tiny_dataset_dir)}))
    assert main(["--quiet", "sweep", str(cfg), "--out", str(tmp_path / "sw")]) == 0
    in_sweep = tmp_path / "sw" / "runs" / "TINY-d100-s1"
    alone = tmp_path / "TINY-d100-s1"
    assert main(["--quiet", "train", "--config", str(cfg), "--data", str(tiny_dataset_dir), "--size", "TINY",
                 "--train-cells", "100", "--seed", "1", "--out", str(alone)]) == 0

    sweep_config, train_config = (json.loads((d / "config.json").read_text()) for d in (in_sweep, alone))
    assert train_config["hash"] == sweep_config["hash"]
    assert train_config["train"]["cells_seen"] == 150  # 1.5 epochs of 100 cells
    assert train_config["train"]["batch_size"] == 16
    sweep_result, train_result = (json.loads((d / "result.json").read_text()) for d in (in_sweep, alone))
    for key in ("best_val_mse", "test_mse", "steps"):
        assert train_result[key] == sweep_result[key], key
    assert _jsonl_without_clock(alone / "metrics.jsonl") == _jsonl_without_clock(in_sweep / "metrics.jsonl")


def test_plan_runs_is_resolve_run_over_the_grid():
    cfg = parse_config(StudyConfig, {**STUDY, "sweep": {**STUDY["sweep"], "sizes": ["XXS", "TINY"],
                                                      "train_cells": [None, 100], "seeds": [0, 1]}})
    for spec in plan_runs(cfg, n_genes=64, n_train=270):
        alone = resolve_run(cfg, size=spec.size, n_genes=64, n_train=270, train_cells=spec.train_cells,
                            seed=spec.seed, depth=spec.depth)
        assert alone == spec
    every_cell = resolve_run(cfg, size="XXS", n_genes=64, n_train=270)
    assert every_cell.run_id == "XXS-dall-s0" and every_cell.train.cells_seen == 405  # 1.5 x 270


def test_flags_go_on_top_and_a_flag_not_given_changes_nothing():
    cfg = parse_config(StudyConfig, STUDY)
    sweep_run = resolve_run(cfg, size="TINY", n_genes=64, train_cells=100)
    assert resolve_run(cfg, size="TINY", n_genes=64, train_cells=100, train_flags={}, model_flags={}) == sweep_run
    flagged = resolve_run(cfg, size="TINY", n_genes=64, train_cells=100, run_name="mine",
                          train_flags={"cells_seen": 7, "lr": 0.1}, model_flags={"objective": "nb"})
    assert flagged.run_id == "mine" and flagged.model.objective == "nb"
    assert flagged.train == sweep_run.train.model_copy(update={"cells_seen": 7, "lr": 0.1})
    with pytest.raises(ConfigError, match="train: key 'batch_size'"):
        resolve_run(cfg, size="TINY", n_genes=64, train_flags={"batch_size": 0})


@pytest.mark.parametrize("sweep, message", [
    ({"sizes": ["TINY"], "overrides": {"TINY": {"lrr": 1}}}, "sweep.overrides.TINY: unknown key 'lrr'"),
    ({"sizes": ["TINY"], "epochs": 2, "overrides": {"TINY": {"cells_seen": 9}}},
     "sweep.overrides.TINY.cells_seen conflicts with sweep.epochs"),
    ({"sizes": ["XXS"], "overrides": {"TINY": {"lr": 0.1}}}, "overrides names size 'TINY' which is not in sweep.sizes"),
])
def test_train_refuses_the_overrides_the_sweep_refuses(sweep, message, tiny_dataset_dir: Path, tmp_path: Path,
                                                       capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"sweep": sweep}))
    argv = ["train", "--config", str(cfg), "--data", str(tiny_dataset_dir), "--size", "TINY",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
