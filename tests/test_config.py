"""Configs: every preset validates; a bad key or type is refused by name."""

import re
from pathlib import Path

import pytest
import yaml

from cellscale.config import (
    ConfigError,
    StudyConfig,
    TrainConfig,
    config_hash,
    dump_yaml,
    list_presets,
    load_study_config,
    parse_config,
    preset_path,
)
from cellscale.model.ladder import get_size
from cellscale.sweep.plan import plan_runs

REQUIRED_PRESETS = {"smoke", "demo", "paper-rich", "paper-limited", "matched-v", "noise", "compute-optimal"}


def test_required_presets_exist():
    assert REQUIRED_PRESETS <= set(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_preset_validates_and_plans(name):
    path = preset_path(name)
    cfg = load_study_config(path)
    assert cfg.name == name
    # every size resolves and the grid has no duplicate ids
    specs = plan_runs(cfg, n_genes=cfg.data.genes)
    assert len(specs) == (len(cfg.sweep.sizes) * len(cfg.sweep.train_cells) * len(cfg.sweep.depths)
                          * len(cfg.sweep.lr_multipliers) * len(cfg.sweep.seeds))
    assert len({s.run_id for s in specs}) == len(specs)
    # each preset states its compute need in its header comment
    header = path.read_text().splitlines()[:6]
    assert any("FLOP" in line for line in header), f"{name}: header must state its compute need"


def test_yaml_round_trip():
    cfg = load_study_config(preset_path("smoke"))
    again = StudyConfig.model_validate(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)


def test_unknown_key_is_named(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  cells_sen: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.cells_sen'"):
        load_study_config(p)


def test_wrong_type_is_named(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"key 'train.batch_size'"):
        load_study_config(p)


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ConfigError, match="split"):
        parse_config(StudyConfig, {"data": {"split": [0.5, 0.2, 0.2]}})


def test_unknown_size_and_override():
    with pytest.raises(ConfigError, match="unknown model size 'XXL'"):
        get_size("XXL", n_genes=512)
    cfg = parse_config(StudyConfig, {"sweep": {"sizes": ["XS"], "overrides": {"S": {"lr": 1e-3}}}})
    with pytest.raises(ConfigError, match="overrides names size 'S'"):
        plan_runs(cfg, n_genes=64)
    cfg = parse_config(StudyConfig, {"sweep": {"sizes": ["XS"], "overrides": {"XS": {"lrr": 1e-3}}}})
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        plan_runs(cfg, n_genes=64)


def test_overrides_apply_per_size():
    cfg = parse_config(StudyConfig, {"sweep": {"sizes": ["XXS", "XS"], "seeds": [0, 1],
                                             "overrides": {"XXS": {"lr": 0.02}}}})
    specs = {s.run_id: s for s in plan_runs(cfg, n_genes=64)}
    assert set(specs) == {"XXS-dall-s0", "XXS-dall-s1", "XS-dall-s0", "XS-dall-s1"}
    assert specs["XXS-dall-s0"].train.lr == 0.02
    assert specs["XS-dall-s0"].train.lr == TrainConfig().lr
    assert specs["XS-dall-s1"].model.n_genes == 64


def test_yaml_examples_in_docs_validate():
    """Every ```yaml block in the README and docs/ is a valid study config (all fields optional)."""
    import re

    root = Path(__file__).parents[1]
    blocks = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        blocks += [(doc.name, b) for b in re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S)]
    assert blocks, "the README shows a study YAML"
    for name, block in blocks:
        parse_config(StudyConfig, yaml.safe_load(block) or {}, origin=name)


def test_depth_axis_run_ids_and_order():
    cfg = parse_config(StudyConfig, {"sweep": {"sizes": ["XS"], "seeds": [0, 1], "train_cells": [None, 50],
                                             "depths": [1.0, 0.25]}})
    specs = plan_runs(cfg, n_genes=64)
    assert [s.run_id for s in specs] == [
        "XS-dall-s0", "XS-dall-s1", "XS-dall-s0-f0.25", "XS-dall-s1-f0.25",
        "XS-d50-s0", "XS-d50-s1", "XS-d50-s0-f0.25", "XS-d50-s1-f0.25",
    ]
    assert [s.depth for s in specs] == [1.0, 1.0, 0.25, 0.25] * 2


@pytest.mark.parametrize("depths, message", [
    ([0.0], "depth 0.0 is not a fraction of the reads in (0, 1]"),
    ([1.5], "depth 1.5 is not a fraction of the reads in (0, 1]"),
    ([0.5, 0.5], "depth 0.5 is listed twice"),
    ([0.1, 0.1000001], "depth 0.1 is listed twice"),  # the same run ids and dataset dir
    ([], "list at least one depth"),
])
def test_bad_depths_are_refused(depths, message):
    with pytest.raises(ConfigError, match=re.escape(f"key 'sweep.depths': Value error, {message}")):
        parse_config(StudyConfig, {"sweep": {"depths": depths}})


def test_epochs_set_cells_seen_from_each_runs_training_cells():
    cfg = parse_config(StudyConfig, {"data": {"cells": 1000}, "train": {"cells_seen": 7},
                                   "sweep": {"sizes": ["XXS"], "train_cells": [None, 100], "epochs": 2.5}})
    specs = {s.run_id: s for s in plan_runs(cfg, n_genes=64)}
    assert specs["XXS-d100-s0"].train.cells_seen == 250
    assert specs["XXS-dall-s0"].train.cells_seen == 2250  # the 900 cells of the default 90/5/5 split
    assert plan_runs(cfg, n_genes=64, n_train=801)[0].train.cells_seen == 2002  # round(2.5 * 801)
    no_epochs = parse_config(StudyConfig, {"train": {"cells_seen": 7}, "sweep": {"sizes": ["XXS"]}})
    assert plan_runs(no_epochs, n_genes=64)[0].train.cells_seen == 7
    clash = parse_config(StudyConfig, {"sweep": {"sizes": ["XXS"], "epochs": 2, "overrides": {"XXS": {"cells_seen": 9}}}})
    with pytest.raises(ConfigError, match=r"sweep.overrides.XXS.cells_seen conflicts with sweep.epochs"):
        plan_runs(clash, n_genes=64)


def test_noise_and_compute_optimal_presets_plan_their_grids():
    noise = plan_runs(load_study_config(preset_path("noise")), n_genes=64)
    assert len(noise) == 16 and {s.depth for s in noise} == {1.0, 0.5, 0.25, 0.1}
    assert [s.run_id for s in noise[:4]] == ["XXS-dall-s0", "XXS-dall-s0-f0.5", "XXS-dall-s0-f0.25", "XXS-dall-s0-f0.1"]
    co_cfg = load_study_config(preset_path("compute-optimal"))
    assert co_cfg.fit.data_law == "auto" and co_cfg.sweep.epochs is None and co_cfg.train.budget == "plateau"
    co = plan_runs(co_cfg, n_genes=64)
    # the data axis: cells seen from the branches, unique cells from two nested training sets
    assert len(co) == 8 and {s.train_cells for s in co} == {4000, None} and {s.depth for s in co} == {1.0}
    assert all(s.train.cells_seen == 320_000 for s in co)


def test_fit_config_defaults_are_the_fit_functions_defaults():
    # cellscale.fit stands alone (it may not import config), so its signature keeps defaults of its
    # own; FitConfig must say the same, or a study and a direct fit_table call would differ
    import inspect

    from cellscale.config import FitConfig
    from cellscale.fit import fit_table

    sig = inspect.signature(fit_table).parameters
    shared = [k for k in FitConfig.model_fields if k in sig and sig[k].default is not inspect.Parameter.empty]
    assert {"method", "bootstrap", "seed"} <= set(shared)
    assert {k: getattr(FitConfig(), k) for k in shared} == {k: sig[k].default for k in shared}
