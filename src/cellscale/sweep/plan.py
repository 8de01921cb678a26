"""Turn a study config into a list of run specifications with stable ids."""

from __future__ import annotations

from dataclasses import dataclass

from cellscale.config import ConfigError, ModelConfig, RunConfig, TrainConfig, depth_label, parse_config
from cellscale.ladder import get_size


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    size: str
    model: ModelConfig
    train: TrainConfig
    train_cells: int | None
    seed: int
    # fraction of the sequencing depth (binomially thinned counts); 1.0 = the dataset as built
    depth: float = 1.0


def run_id(size: str, train_cells: int | None, seed: int, depth: float = 1.0) -> str:
    """``{size}-d{cells|all}-s{seed}``, plus ``-f{depth}`` below full depth (so the ids of
    sweeps without a depth axis never change)."""
    rid = f"{size}-d{'all' if train_cells is None else train_cells}-s{seed}"
    return rid if float(depth) == 1.0 else f"{rid}-f{depth_label(depth)}"


def _n_train_of_config(cfg: RunConfig) -> int:
    """The train split the config's data section builds (exact without ``split_by``)."""
    from cellscale.data.split import split_sizes

    return split_sizes(cfg.data.cells, cfg.data.split)[0]


def _with_epochs(train: TrainConfig, cfg: RunConfig, size: str, n_train_cells: int) -> TrainConfig:
    if cfg.sweep.epochs is None:
        return train
    if "cells_seen" in cfg.sweep.overrides.get(size, {}):
        raise ConfigError(f"sweep.overrides.{size}.cells_seen conflicts with sweep.epochs "
                          "(epochs sets every run's cells seen): drop one of them")
    return train.model_copy(update={"cells_seen": max(1, round(cfg.sweep.epochs * n_train_cells))})


def plan_runs(cfg: RunConfig, *, n_genes: int, n_train: int | None = None) -> list[RunSpec]:
    """Sizes x train_cells x depths x seeds, largest data first within a size so nested
    subsets share nothing but the dataset; ids do not depend on the order of the grid.

    ``n_train`` (the dataset's train split) is what ``train_cells: null`` means when
    ``sweep.epochs`` sets the budget; by default the size the config's data section builds."""
    specs: list[RunSpec] = []
    seen: set[str] = set()
    if cfg.sweep.epochs is not None and n_train is None:
        n_train = _n_train_of_config(cfg)
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
            run_train = _with_epochs(train, cfg, size, n if n is not None else n_train or 0)
            for depth in cfg.sweep.depths:
                for seed in cfg.sweep.seeds:
                    rid = run_id(size, n, seed, depth)
                    if rid in seen:
                        raise ConfigError(f"sweep lists run '{rid}' twice; remove the duplicate")
                    seen.add(rid)
                    specs.append(RunSpec(rid, size, model, run_train, n, seed, float(depth)))
    unknown_overrides = set(cfg.sweep.overrides) - set(cfg.sweep.sizes)
    if unknown_overrides:
        raise ConfigError(
            f"sweep.overrides names size '{sorted(unknown_overrides)[0]}' which is not in sweep.sizes"
        )
    return specs
