"""Turn a study config into the runs of its grid, with stable ids (``plan_runs``), and what each
costs at most (``planned_flops``). One run's settings are resolved by ``cellscale.train.spec``
(``resolve_run``, ``RunSpec``, ``run_id``; imported here for the sweep's modules)."""

from __future__ import annotations

import itertools

from cellscale.config import ConfigError, StudyConfig
from cellscale.train.spec import RunSpec, check_override_sizes, n_train_of_config, resolve_run, run_id  # noqa: F401


def plan_runs(cfg: StudyConfig, *, n_genes: int, n_train: int | None = None) -> list[RunSpec]:
    """Sizes x train_cells x depths x learning-rate multiples x seeds, largest data first within a size so nested
    subsets share nothing but the dataset; ids do not depend on the order of the grid.

    ``n_train`` (the dataset's train split) is what ``train_cells: null`` means when
    ``sweep.epochs`` sets the budget; by default the size the config's data section builds."""
    check_override_sizes(cfg)  # also when sweep.sizes is empty and no run is resolved
    if cfg.sweep.epochs is not None and n_train is None:
        n_train = n_train_of_config(cfg)  # once, not once per run
    specs: list[RunSpec] = []
    seen: set[str] = set()
    grid = itertools.product(cfg.sweep.sizes, cfg.sweep.train_cells, cfg.sweep.depths, cfg.sweep.lr_multipliers,
                             cfg.sweep.seeds)
    for size, cells, depth, lr_multiple, seed in grid:
        spec = resolve_run(cfg, size=size, n_genes=n_genes, n_train=n_train, train_cells=cells,
                           seed=seed, depth=depth, lr_multiple=lr_multiple)
        if spec.run_id in seen:
            raise ConfigError(f"sweep lists run '{spec.run_id}' twice; remove the duplicate")
        seen.add(spec.run_id)
        specs.append(spec)
    return specs


def planned_flops(spec: RunSpec) -> tuple[float, float]:
    """(the training FLOPs of ``spec`` at its maximum cells seen, those of its cooldown branches
    besides its own end): what the run costs at most; a plateau run that converges stops sooner."""
    from cellscale.model import flops_per_cell
    from cellscale.rules.schedule import run_branch_points

    per_cell = flops_per_cell(spec.model, mask_prob=spec.train.mask_prob)["train"]
    points = run_branch_points(spec.train)
    branch_cells = sum((p.end - p.stable) * spec.train.batch_size for p in points[:-1])
    return per_cell * spec.train.cells_seen, per_cell * branch_cells
