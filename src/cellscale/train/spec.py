"""One run of a study: its settings and its id.

``resolve_run`` is the one place that says which model and training settings a run of a study
gets: ``cellscale train --config`` calls it for its one run and the sweep's ``plan_runs`` for every
run of its grid, so the same run trains the same budget whichever command starts it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cellscale.config import ConfigError, ModelConfig, StudyConfig, TrainConfig, depth_label, parse_config
from cellscale.model.ladder import get_size


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


def run_id(size: str, train_cells: int | None, seed: int, depth: float = 1.0, lr_scale: float = 1.0) -> str:
    """``{size}-d{cells|all}-s{seed}``, plus ``-f{depth}`` below full depth and ``-lr{multiple}``
    off the rule's rate (so the ids of sweeps without those axes never change)."""
    rid = f"{size}-d{'all' if train_cells is None else train_cells}-s{seed}"
    if float(depth) != 1.0:
        rid += f"-f{depth_label(depth)}"
    return rid if float(lr_scale) == 1.0 else f"{rid}-lr{float(lr_scale):g}"


def n_train_of_config(cfg: StudyConfig) -> int:
    """The train split the config's data section builds (exact without ``split_by``)."""
    from cellscale.data.split import split_sizes

    return split_sizes(cfg.data.cells, cfg.data.split)[0]


def check_override_sizes(cfg: StudyConfig) -> None:
    """An override for a size the sweep never trains is a typo, not a setting."""
    stray = set(cfg.sweep.overrides) - set(cfg.sweep.sizes)
    if stray:
        raise ConfigError(f"sweep.overrides names size '{sorted(stray)[0]}' which is not in sweep.sizes")


def _size_train_config(cfg: StudyConfig, size: str) -> TrainConfig:
    """``cfg.train`` with ``sweep.overrides[size]`` on top."""
    over = dict(cfg.sweep.overrides.get(size, {}))
    unknown = set(over) - set(TrainConfig.model_fields)
    if unknown:
        raise ConfigError(f"sweep.overrides.{size}: unknown key '{sorted(unknown)[0]}'")
    return parse_config(TrainConfig, {**cfg.train.model_dump(), **over}, origin=f"sweep.overrides.{size}")


def _with_epochs(train: TrainConfig, cfg: StudyConfig, size: str, n_train_cells: int) -> TrainConfig:
    if cfg.sweep.epochs is None:
        return train
    if "cells_seen" in cfg.sweep.overrides.get(size, {}):
        raise ConfigError(f"sweep.overrides.{size}.cells_seen conflicts with sweep.epochs "
                          "(epochs sets every run's cells seen): drop one of them")
    return train.model_copy(update={"cells_seen": max(1, round(cfg.sweep.epochs * n_train_cells))})


def resolve_run(
    cfg: StudyConfig, *, size: str, n_genes: int, n_train: int | None = None, train_cells: int | None = None,
    seed: int = 0, depth: float = 1.0, lr_multiple: float = 1.0, run_name: str | None = None,
    model_flags: Mapping[str, Any] | None = None, train_flags: Mapping[str, Any] | None = None,
) -> RunSpec:
    """The run ``size`` x ``train_cells`` x ``depth`` x ``seed`` of the study ``cfg``, as its sweep trains it.

    The model is the size at ``n_genes`` genes with ``cfg.model`` applied; training is
    ``cfg.train`` under ``sweep.overrides[size]``, with ``sweep.epochs`` setting the cells seen
    from the run's training cells (``train_cells``, or all ``n_train`` of the train split: by
    default the split the config's data section builds). ``model_flags`` and ``train_flags``
    (a command line's settings; leave out what was not given) go on top of all that, validated
    as ``train``. ``lr_multiple`` (one of ``sweep.lr_multipliers``) multiplies the run's
    ``lr_scale``. ``run_name`` names the run (default: the sweep's run id)."""
    check_override_sizes(cfg)
    model = get_size(size, n_genes=n_genes, custom=cfg.sweep.custom_sizes, **{**cfg.model, **(model_flags or {})})
    train = _size_train_config(cfg, size)
    if cfg.sweep.epochs is not None:
        if train_cells is None and n_train is None:
            n_train = n_train_of_config(cfg)
        train = _with_epochs(train, cfg, size, train_cells if train_cells is not None else n_train)
    if train_flags:
        train = parse_config(TrainConfig, {**train.model_dump(), **train_flags}, origin="train")
    if lr_multiple != 1.0:
        train = train.model_copy(update={"lr_scale": train.lr_scale * float(lr_multiple)})
    name = run_name if run_name is not None else run_id(size, train_cells, seed, depth, lr_multiple)
    return RunSpec(name, size, model, train, train_cells, seed, float(depth))
