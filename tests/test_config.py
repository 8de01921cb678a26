"""Configs: every preset validates; a bad key or type is refused by name."""

from pathlib import Path

import pytest
import yaml

from cellscale.config import (
    ConfigError, RunConfig, TrainConfig, config_hash, dump_yaml, list_presets, load_run_config,
    parse_config, preset_path,
)
from cellscale.ladder import get_size
from cellscale.sweep.plan import plan_runs

REQUIRED_PRESETS = {"smoke", "demo", "paper-rich", "paper-limited", "matched-v"}


def test_required_presets_exist():
    assert REQUIRED_PRESETS <= set(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_preset_validates_and_plans(name):
    path = preset_path(name)
    cfg = load_run_config(path)
    assert cfg.name == name
    # every size resolves and the grid has no duplicate ids
    specs = plan_runs(cfg, n_genes=cfg.data.genes)
    assert len(specs) == len(cfg.sweep.sizes) * len(cfg.sweep.train_cells) * len(cfg.sweep.seeds)
    assert len({s.run_id for s in specs}) == len(specs)
    # each preset states its compute need in its header comment
    header = path.read_text().splitlines()[:6]
    assert any("FLOP" in line for line in header), f"{name}: header must state its compute need"


def test_yaml_round_trip():
    cfg = load_run_config(preset_path("smoke"))
    again = RunConfig.model_validate(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)


def test_unknown_key_is_named(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  cells_sen: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.cells_sen'"):
        load_run_config(p)


def test_wrong_type_is_named(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"key 'train.batch_size'"):
        load_run_config(p)


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ConfigError, match="split"):
        parse_config(RunConfig, {"data": {"split": [0.5, 0.2, 0.2]}})


def test_unknown_size_and_override():
    with pytest.raises(ConfigError, match="unknown model size 'XXL'"):
        get_size("XXL", n_genes=512)
    cfg = parse_config(RunConfig, {"sweep": {"sizes": ["XS"], "overrides": {"S": {"lr": 1e-3}}}})
    with pytest.raises(ConfigError, match="overrides names size 'S'"):
        plan_runs(cfg, n_genes=64)
    cfg = parse_config(RunConfig, {"sweep": {"sizes": ["XS"], "overrides": {"XS": {"lrr": 1e-3}}}})
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        plan_runs(cfg, n_genes=64)


def test_overrides_apply_per_size():
    cfg = parse_config(RunConfig, {"sweep": {"sizes": ["XXS", "XS"], "seeds": [0, 1],
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
        parse_config(RunConfig, yaml.safe_load(block) or {}, origin=name)
