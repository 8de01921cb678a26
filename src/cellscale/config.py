"""Typed, frozen configuration for every stage, with YAML in and out.

Every config is a pydantic model with ``extra="forbid"`` so that a misspelt key in a YAML
file is an error that names the key, never a silently ignored setting.

One fact, one place: the allowed values of a setting are its ``Literal`` here and its default is
its default here; the command line's ``choices=``, defaults and the value lists of its help are
generated from these models (:func:`literal_values`, :func:`field_default`), and modules that check
a name (``cellscale.rules.objectives``) read their list from here too. The fit's own defaults and interval
methods live in ``cellscale.fit`` (``fit.defaults``, ``fit.intervals``), which imports no config:
``FitConfig`` reads them from there.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator, model_validator

from cellscale.errors import CellscaleError
from cellscale.fit import defaults as fit_defaults
from cellscale.fit.defaults import INTERVALS
from cellscale.runtime.io import json_digest

__all__ = [
    "ConfigError",
    "DataConfig",
    "SimulateConfig",
    "CensusConfig",
    "ModelConfig",
    "TrainConfig",
    "SweepConfig",
    "FitConfig",
    "StudyConfig",
    "load_study_config",
    "data_config_with",
    "dump_yaml",
    "config_hash",
    "preset_path",
    "list_presets",
    "literal_values",
    "field_default",
    "CENSUS_ORGANISMS",
]

PRESET_DIR = Path(__file__).parent / "presets"


def depth_label(depth: float) -> str:
    """A sequencing depth as it appears in run ids, dataset dirs and reports: ``0.25``, ``1``."""
    return f"{float(depth):g}"


# the downstream probe's label, and the obs columns tried in order as its batch key when none is
# named (the simulator's is dataset_id; cellscale.downstream)
DOWNSTREAM_LABEL = "cell_type"
DOWNSTREAM_BATCH_KEYS = ("batch", "dataset_id", "batch_id", "sample_id", "donor_id")


class ConfigError(CellscaleError, ValueError):
    """A configuration problem, with a message fit for a one-line ``error:``."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SimulateConfig(_Frozen):
    """Negative-binomial simulator with discrete cell types and continuous programs."""

    n_genes: int = Field(2000, ge=2)
    n_types: int = Field(12, ge=1)
    n_programs: int = Field(6, ge=0)
    # log-mean shift of a cell type's marker genes, and the share of genes that are markers
    type_effect: float = Field(1.5, ge=0)
    marker_frac: float = Field(0.1, ge=0, le=1)
    program_effect: float = Field(0.6, ge=0)
    # library size ~ LogNormal(log(median), sigma): 10x data sits near 0.5-0.7
    library_median: float = Field(4000.0, gt=0)
    library_sigma: float = Field(0.6, ge=0)
    # NB dispersion phi (variance = mu + phi mu^2) ~ LogNormal(log(median), sigma) per gene
    dispersion_median: float = Field(0.3, gt=0)
    dispersion_sigma: float = Field(0.5, ge=0)
    # known-floor mode: a Gaussian latent-factor model on the log scale (issue 7)
    mode: Literal["nb", "gaussian"] = "nb"
    params_file: str | None = None


# the organisms the Census holds (cellscale.data.sources.census checks a build's against them)
CENSUS_ORGANISMS = ("homo_sapiens", "mus_musculus")


class CensusConfig(_Frozen):
    uri: str | None = None
    # the pinned Census release: a long-term-support release, the one the seed study used
    version: str = "2025-01-30"
    organism: str = "homo_sapiens"
    obs_filter: str = "is_primary_data == True"
    tissues: list[str] = Field(
        default_factory=lambda: [
            "blood", "lung", "brain", "kidney", "liver",
            "heart", "intestine", "pancreas", "skin", "spleen",
        ]
    )
    per_tissue_cap: int | None = Field(None, ge=1)
    hvg_batch_key: str | None = None


class DataConfig(_Frozen):
    source: Literal["simulate", "h5ad", "census"] = "simulate"
    input: str | None = None
    layer: str | None = None
    normalized: bool = False
    genes: int = Field(512, ge=1, description="V, the number of genes the model sees")
    cells: int = Field(10_000, ge=3, description="D, cells kept after QC (train+val+test)")
    seed: int = 0
    split: tuple[float, float, float] = (0.90, 0.05, 0.05)
    split_by: str | None = Field(None, description="obs column held out as groups, e.g. dataset_id")
    target_sum: float = Field(1e4, gt=0)
    hvg_flavor: Literal["seurat_v3", "variance", "all"] = "seurat_v3"
    hvg_batch_key: str | None = None
    dtype: Literal["float32", "float16"] = "float32"
    simulate: SimulateConfig = Field(default_factory=SimulateConfig)
    census: CensusConfig = Field(default_factory=CensusConfig)

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in v) or abs(sum(v) - 1.0) > 1e-9:
            raise ValueError("split fractions must be positive and sum to 1")
        return v


class ModelConfig(_Frozen):
    """One transformer size. ``n_genes`` is set from the dataset at train time."""

    name: str = "custom"
    d_model: int = Field(..., ge=1)
    n_layers: int = Field(..., ge=1)
    n_heads: int = Field(..., ge=1)
    ffn_ratio: int = Field(4, ge=1)
    # 0 by measurement (docs/ablations.md, the dropout ablation): on the demo every size's
    # validation MSE was 2-5% lower without dropout, and on known-floor the largest size became the
    # best (with 0.1 it was worse than SMALL). The study presets set the study's 0.1 themselves.
    dropout: float = Field(0.0, ge=0, lt=1, description="on the residual branches and the FFN")
    # on the attention probabilities; None = the same as dropout (the study's single rate)
    attention_dropout: float | None = Field(None, ge=0, lt=1)
    n_genes: int = Field(512, ge=1)
    # what the head predicts and is scored by (cellscale.rules.objectives): the study's MSE, or a
    # likelihood whose loss is bits per masked gene
    objective: Literal["mse", "gaussian-nll", "nb"] = "mse"

    @property
    def attn_dropout(self) -> float:
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        return self


class TrainConfig(_Frozen):
    cells_seen: int = Field(240_000, ge=1, description="training budget: cells drawn (with repeats)")
    batch_size: int = Field(64, ge=1)
    # lr: a number, or "auto" = lr_base * 64 / d_model clipped to [lr_min, lr_max] (Adam's
    # step for hidden weights shrinks like 1/width, as in muP);
    # either is then scaled with batch (lr_batch_scaling) relative to lr_batch_ref cells
    lr: PositiveFloat | Literal["auto"] = "auto"
    lr_base: float = Field(5e-3, gt=0)
    lr_min: float = Field(1e-4, gt=0)
    lr_max: float = Field(3e-2, gt=0)
    lr_batch_scaling: Literal["none", "sqrt", "linear"] = "sqrt"
    lr_batch_ref: int = Field(64, ge=1)
    # a multiple of the peak rate above (set per run by sweep.lr_multipliers, the learning-rate axis)
    lr_scale: float = Field(1.0, gt=0)
    # budget "fixed": exactly cells_seen (the study's way), on the schedule below. "plateau":
    # warmup-stable-decay with cooldown branches (cellscale.train.branches): at every doubling of
    # cells seen up to the maximum cells_seen, a short cooldown branches off the stable phase and
    # its cooled-down weights are scored; the run ends at the first branch whose cooled-down loss
    # gained at most plateau_tol over the doubling before it (cellscale.rules.plateau), for
    # plateau_patience branches in a row, or at its maximum (the last branch)
    budget: Literal["fixed", "plateau"] = "fixed"
    plateau_tol: float = Field(0.01, gt=0, lt=1)
    # two doublings in a row, by measurement (docs/ablations.md, "Does converged hold up?"): a single
    # flat doubling is often a low draw (4 seeds x MINI, TINY: of 6 runs it stopped whose next doubling
    # was measured, 4 then bought 1.2-1.5%; two in a row stopped none of the 8 within 1.92M cells)
    plateau_patience: int = Field(2, ge=1)
    # no plateau is called before this many cells seen: a run at a low rate can sit flat at the
    # gene-mean loss for its first tens of thousands of cells and would read as trained there
    # (measured on SMALL, docs/ablations.md)
    plateau_min_cells: int = Field(0, ge=0)
    # a branch's cooldown: cooldown_frac x the stable steps before it, shaped as cooldown_shape
    # ("linear": the rate falls linearly to final_lr_frac x peak; "1-sqrt": it falls by the square root
    # of the cooldown's progress, fast first; Hagele et al. 2024); chosen by measurement (docs/ablations.md)
    cooldown_frac: float = Field(0.2, gt=0, le=1)
    cooldown_shape: Literal["linear", "1-sqrt"] = "1-sqrt"
    # the first cooldown branch: no earlier than this many cells seen (0: the first point whose
    # stable phase is past the warmup); branch_every: the ratio of cells seen from one branch to the
    # next, down from the maximum (2: every doubling; 1.414: twice per doubling, for a denser data axis)
    branch_min_cells: int = Field(0, ge=0)
    branch_every: float = Field(2.0, gt=1, le=16)
    # evaluate, keep as best and judge the plateau on an exponential moving average of the weights
    # with this decay (cellscale.train.ema): at a constant rate the raw weights' validation loss
    # is noise-bound; None = the weights themselves (the study's way)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_frac: float = Field(0.05, ge=0, lt=1)
    # the warmup in cells seen instead (0: warmup_frac of the steps, of the maximum under budget
    # plateau): a run's warmup then does not depend on where it may end, so that a longer run of the
    # same recipe follows the same path (its cooldown branches at the same cells seen match)
    warmup_cells: int = Field(0, ge=0)
    final_lr_frac: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    mask_prob: float = Field(0.15, gt=0, lt=1)
    eval_every: int = Field(0, ge=0, description="steps between evaluations; 0 = ~10 per run (of the maximum with budget plateau)")
    eval_batch_size: int = Field(256, ge=1)
    max_eval_cells: int | None = Field(None, ge=1, description="cap on validation cells per eval")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = at evals")
    # a long GPU run loses at most this much to a kill -9; 0 is stored as None, so both are one hash
    checkpoint_minutes: float | None = Field(
        None, ge=0, description="also checkpoint every N minutes of wall time; None or 0 = off")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    num_threads: int | None = Field(None, ge=1)

    @field_validator("checkpoint_minutes")
    @classmethod
    def _zero_minutes_is_off(cls, v: float | None) -> float | None:
        return v or None


class FitConfig(_Frozen):
    law: str = "power-floor"
    # the fit's defaults are cellscale.fit's own (cellscale.fit.defaults): fit_table has them too
    method: str = fit_defaults.METHOD
    bootstrap: int = Field(fit_defaults.BOOTSTRAP, ge=0)
    seed: int = fit_defaults.SEED
    # the interval method (cellscale.fit.intervals.INTERVALS; None: profile, or bca-groups for method
    # paper; coverage measured in docs/intervals.md)
    interval: Literal[INTERVALS] | None = None  # type: ignore[valid-type]
    # a law is fitted to converged runs (result "converged", cellscale.rules.plateau's rule); True fits the
    # unconverged ones too (the report still names them)
    keep_unconverged: bool = False
    # the data axis (cellscale.fit.data_axis), fitted to the cooldown branch points of a plateau-budget
    # sweep: the joint law ("auto": data-constrained when the runs differ in training cells, else
    # chinchilla)
    data_law: Literal["auto", "chinchilla", "data-constrained"] = "auto"
    # the data axis's fitting method: least squares in log space, the one that predicts a longer run
    # best (cellscale.fit.defaults.DATA_METHOD)
    data_method: Literal[fit_defaults.DATA_METHOD_NAMES] = fit_defaults.DATA_METHOD  # type: ignore[valid-type]


class SweepConfig(_Frozen):
    sizes: list[str] = Field(default_factory=lambda: ["XXS", "TINY", "XS", "S"])
    train_cells: list[int | None] = Field(default_factory=lambda: [None])
    seeds: list[int] = Field(default_factory=lambda: [0])
    # custom sizes, usable by name in ``sizes``: {name: {d_model, n_layers, n_heads, ffn_ratio}}
    custom_sizes: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # per-size overrides of training settings, e.g. {"XXS": {"lr": 0.01}}
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # sequencing depths: each run also trains on its dataset's counts binomially thinned to
    # this fraction of the reads (1.0 = the dataset as built; see cellscale.data.thin)
    depths: list[float] = Field(default_factory=lambda: [1.0])
    # the learning-rate axis: each run also trains at these multiples of its peak rate, and the
    # law is fitted to each size's best multiple on validation loss (cellscale.rules.lrgrid)
    lr_multipliers: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    # "every-seed": every seed trains at every multiple. "first-seed": the first seed of ``seeds``
    # trains at every multiple, and the other seeds only at the multiple chosen on its validation
    # loss (cellscale.sweep.lrsearch): a grid of k rates costs k + seeds - 1 runs per size, not k x seeds
    lr_search: Literal["every-seed", "first-seed"] = "every-seed"
    # when set, every run sees each of its training cells this many times:
    # cells_seen = round(epochs * its training cells), whatever train.cells_seen says
    epochs: float | None = Field(None, gt=0)
    backend: Literal["local", "ray"] = "local"
    # local backend: runs at once, each in its own process of num_cpus_per_run threads ("auto":
    # as many as the usable CPUs hold; 1: one after another in this process). Small models use
    # one core each far better than two (cellscale.sweep.pool)
    workers: int | Literal["auto"] = Field(1, description="local runs at once; auto = usable CPUs / num_cpus_per_run")
    num_cpus_per_run: float = Field(1.0, gt=0)
    num_gpus_per_run: float = Field(0.0, ge=0)

    @field_validator("workers")
    @classmethod
    def _at_least_one_worker(cls, v: int | str) -> int | str:
        if v != "auto" and v < 1:
            raise ValueError("workers is a count of processes (1 or more) or auto")
        return v

    @field_validator("depths")
    @classmethod
    def _depths_in_unit_interval(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("list at least one depth (1.0 = the dataset as built)")
        for d in v:
            if not math.isfinite(d) or not 0.0 < d <= 1.0:
                raise ValueError(f"depth {d!r} is not a fraction of the reads in (0, 1]")
        labels = [depth_label(d) for d in v]  # run ids and dataset dirs are named by this label
        dup = next((lab for i, lab in enumerate(labels) if lab in labels[:i]), None)
        if dup is not None:
            raise ValueError(f"depth {dup} is listed twice; remove the duplicate")
        return v


class StudyConfig(_Frozen):
    """A whole study: data -> sweep of trainings -> fit -> report (a preset file)."""

    name: str = "study"
    description: str = ""
    data: DataConfig = Field(default_factory=DataConfig)
    dataset: str | None = Field(None, description="use an existing dataset dir instead of building")
    model: dict[str, Any] = Field(default_factory=dict, description="defaults for every size, e.g. dropout")
    train: TrainConfig = Field(default_factory=TrainConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    fit: FitConfig = Field(default_factory=FitConfig)


def literal_values(model: type[BaseModel], name: str) -> tuple[Any, ...]:
    """The values a ``Literal`` field of ``model`` allows, in the order written (None and the
    non-literal members of a union, such as the number of ``float | Literal["auto"]``, left out):
    the one list of them, which the command line's ``choices=`` and help are generated from."""
    values: list[Any] = []

    def walk(tp: Any) -> None:
        if get_origin(tp) is Literal:
            values.extend(a for a in get_args(tp) if a not in values)
        elif get_origin(tp) in (Union, types.UnionType):
            for member in get_args(tp):
                walk(member)

    walk(model.model_fields[name].annotation)
    if not values:
        raise TypeError(f"{model.__name__}.{name} is not a Literal field")
    return tuple(values)


def field_default(model: type[BaseModel], name: str) -> Any:
    """The default of ``model``'s field ``name`` (a default factory called)."""
    return model.model_fields[name].get_default(call_default_factory=True)


def data_config_with(
    base: DataConfig, settings: Mapping[str, Any], census: Mapping[str, Any], *, origin: str = "data build",
) -> DataConfig:
    """``base`` (a study's data section) with ``settings`` (DataConfig keys) and ``census``
    (CensusConfig keys) laid over it: what ``cellscale data build`` builds. Callers leave out
    what was not given; ``normalized`` only switches on."""
    merged = base.model_dump()
    merged.update({k: v for k, v in settings.items() if k != "normalized"})
    merged["normalized"] = bool(settings.get("normalized")) or base.normalized
    merged["census"] = {**merged["census"], **census}
    cfg = parse_config(DataConfig, merged, origin=origin)
    if cfg.source == "h5ad" and not cfg.input:
        raise ConfigError("--source h5ad needs --input PATH to a .h5ad file")
    return cfg


def _format_validation_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{origin}: unknown key '{loc}'"
    return f"{origin}: key '{loc}': {first['msg']}"


def parse_config(model: type[BaseModel], data: dict[str, Any], origin: str = "config") -> Any:
    """Validate ``data`` into ``model``; raise ConfigError with a one-line message."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None


def load_study_config(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML; a bad key or type is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return parse_config(StudyConfig, data, origin=str(path))


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# settings added after runs and sweeps were first written, at the value that means "as before":
# left out of identity hashes there, so a run or sweep from before them still resumes
ADDED_SETTINGS_OFF: dict[str, dict[str, Any]] = {
    "train": {"budget": "fixed", "plateau_tol": 0.01, "plateau_patience": 1, "plateau_min_cells": 0,
              "cooldown_frac": 0.2, "cooldown_shape": "linear", "branch_min_cells": 0, "warmup_cells": 0,
              "branch_every": 2.0,
              "lr_scale": 1.0, "checkpoint_minutes": None, "ema_decay": None},
    "model": {"attention_dropout": None},
    "sweep": {"depths": [1.0], "epochs": None, "lr_multipliers": [1.0], "lr_search": "every-seed"},
    "fit": {"keep_unconverged": False, "interval": None, "data_law": "auto"},
}


# settings that never change a run's numbers, only when extra checkpoints are written: left out
# of the identity, so a preempted run can be resumed with them added or changed
NOT_IDENTITY: dict[str, tuple[str, ...]] = {"train": ("checkpoint_minutes",), "sweep": ("workers",)}
# settings of the plateau budget alone: a fixed-budget run's identity leaves them out
PLATEAU_ONLY = ("plateau_tol", "plateau_patience", "plateau_min_cells", "cooldown_frac", "cooldown_shape",
                "branch_min_cells", "branch_every")


def identity_dump(section: str, cfg: BaseModel) -> dict[str, Any]:
    """``cfg.model_dump(mode="json")`` without the settings of ``NOT_IDENTITY[section]`` and those of
    ``ADDED_SETTINGS_OFF[section]`` that are at their "as before" value: the payload of an
    identity hash."""
    payload = cfg.model_dump(mode="json")
    for key in NOT_IDENTITY.get(section, ()):
        payload.pop(key, None)
    if section == "train" and payload.get("budget") == "fixed":
        for key in PLATEAU_ONLY:
            payload.pop(key, None)
    for key, off in ADDED_SETTINGS_OFF.get(section, {}).items():
        if key in payload and payload[key] == off:
            del payload[key]
    return payload


def config_hash(cfg: BaseModel | dict[str, Any]) -> str:
    """A short stable hash of a config, used to refuse resuming a run under other settings."""
    payload = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    return json_digest(payload)[:12]


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}' (available: {', '.join(list_presets())})")
    return path


# names before 0.2: a whole study's config was called RunConfig, next to Run, RunSpec and run_id,
# which are one run; the old names still resolve, with a DeprecationWarning
_RENAMED = {"RunConfig": "StudyConfig", "load_run_config": "load_study_config"}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        warnings.warn(f"cellscale.config.{name} is deprecated: use {_RENAMED[name]}", DeprecationWarning,
                      stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module 'cellscale.config' has no attribute {name!r}")
