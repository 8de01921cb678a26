"""Turn a study config into a list of run specifications with stable ids."""

from __future__ import annotations

from dataclasses import dataclass

from cellscale.config import ConfigError, ModelConfig, RunConfig, TrainConfig, parse_config
from cellscale.ladder import get_size


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    size: str
    model: ModelConfig
    train: TrainConfig
    train_cells: int | None
    seed: int


def run_id(size: str, train_cells: int | None, seed: int) -> str:
    return f"{size}-d{'all' if train_cells is None else train_cells}-s{seed}"


def plan_runs(cfg: RunConfig, *, n_genes: int) -> list[RunSpec]:
    """Sizes x train_cells x seeds, largest data first within a size so nested subsets share
    nothing but the dataset; ids do not depend on the order of the grid."""
    specs: list[RunSpec] = []
    seen: set[str] = set()
    for size in cfg.sweep.sizes:
        model = get_size(size, n_genes=n_genes, custom=cfg.sweep.custom_sizes, **cfg.model)
        over = dict(cfg.sweep.overrides.get(size, {}))
        unknown = set(over) - set(TrainConfig.model_fields)
        if unknown:
            raise ConfigError(f"sweep.overrides.{size}: unknown key '{sorted(unknown)[0]}'")
        train = parse_config(
            TrainConfig, {**cfg.train.model_dump(), **over}, origin=f"sweep.overrides.{size}"
        )
        for n in cfg.sweep.train_cells:
            for seed in cfg.sweep.seeds:
                rid = run_id(size, n, seed)
                if rid in seen:
                    raise ConfigError(f"sweep lists run '{rid}' twice; remove the duplicate")
                seen.add(rid)
                specs.append(RunSpec(rid, size, model, train, n, seed))
    unknown_overrides = set(cfg.sweep.overrides) - set(cfg.sweep.sizes)
    if unknown_overrides:
        raise ConfigError(
            f"sweep.overrides names size '{sorted(unknown_overrides)[0]}' which is not in sweep.sizes"
        )
    return specs
