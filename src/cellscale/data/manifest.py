"""The dataset manifest (``manifest.json``) as a typed record, validated once when read.

``data build`` writes nested blocks (``source``, ``preprocessing``, ``split``, ``config``);
``data thin`` adds ``depth_fraction`` and ``thinning``. Older manifests kept some of those facts
at the top level: they are lifted into their blocks here, so readers see one layout. Every
field but ``format``/``format_version`` is optional, and unknown keys are kept.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from cellscale.errors import DataError

__all__ = ["FORMAT", "FORMAT_VERSION", "Manifest", "Scores", "Source"]

FORMAT = "cellscale-dataset"
FORMAT_VERSION = 1

CENSUS_KEYS = ("version", "organism", "obs_filter", "tissues", "per_tissue_cap", "uri")
QC_KEYS = ("min_counts", "min_genes", "max_pct_mito")

# top-level key of an older, flat manifest -> (block, key) it is read into; it wins over the block
_LEGACY = {
    "normalized": ("preprocessing", "normalized_input"),
    **{k: ("preprocessing", k) for k in (
        "target_sum", "hvg_flavor", "hvg_batch_key", "qc", *QC_KEYS, "n_empty_cells_dropped",
        "n_loaded_cells", "subsampled", "n_source_genes")},
    "split_fractions": ("split", "fractions"),
    "split_by": ("split", "split_by"),
    "split_seed": ("split", "seed"),
    "input": ("config", "input"),
    "layer": ("config", "layer"),
    "simulate": ("source", "simulate"),
    "census": ("source", "census"),
    "bayes_floor_mse": ("source", "bayes_floor_mse"),
}


def finite_or_none(v: Any) -> float | None:
    """``v`` as a finite float, else None (JSON null, NaN, text)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class _Block(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    @field_validator("simulate", "census", "qc", mode="before", check_fields=False)
    @classmethod
    def _null_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v


class Scores(_Block):
    """A reference predictor's score on the validation and test splits (None: not recorded)."""

    val: float | None = None
    test: float | None = None

    @field_validator("val", "test", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> float | None:
        return finite_or_none(v)

    @property
    def recorded(self) -> bool:
        return self.val is not None or self.test is not None


class Source(_Block):
    """Where the cells came from (``describe()`` of the cell source)."""

    kind: str | None = None
    name: str | None = None
    path: str | None = None  # h5ad: the file read
    input: str | None = None
    layer: str | None = None
    mode: str | None = None
    bayes_floor_mse: float | None = None  # gaussian mode: the simulator's exact floor
    simulate: dict[str, Any] = {}
    census: dict[str, Any] = {}

    @field_validator("bayes_floor_mse", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> float | None:
        return finite_or_none(v)

    @property
    def census_facts(self) -> dict[str, Any]:
        """Census settings recorded in this block (a census source keeps them at its top)."""
        own = self.model_dump(exclude_unset=True) if self.kind == "census" else {}
        return {**{k: own[k] for k in CENSUS_KEYS if k in own}, **self.census}


# a median share of a cell's counts in the kept genes from which on the build warns and the report says
# so: values normalised by the library size over all genes then give away the masked genes' total
# (docs/own-data.md, "Keeping every gene")
LEAK_SHARE = 0.95


class Preprocessing(_Block):
    normalized_input: bool | None = None
    n_loaded_cells: int | None = None
    n_empty_cells_dropped: int | None = None
    subsampled: bool | None = None
    n_source_genes: int | None = None
    target_sum: float | None = None
    hvg_flavor: str | None = None
    hvg_batch_key: str | None = None
    # the share of each cell's counts (library size over all genes) in the kept genes, its median and
    # smallest value over the cells: near 1 the visible genes give away the masked ones (data/build.py)
    kept_count_share: dict[str, float] | None = None
    qc: dict[str, Any] = {}
    min_counts: int | float | None = None
    min_genes: int | float | None = None
    max_pct_mito: int | float | None = None

    @property
    def leaks_masked_total(self) -> bool:
        """Do the kept genes hold so much of the counts that the visible genes give away the masked ones'
        total (``LEAK_SHARE``)?"""
        share = self.kept_count_share or {}
        return share.get("median") is not None and float(share["median"]) >= LEAK_SHARE

    @property
    def qc_items(self) -> dict[str, Any]:
        """The scalar QC thresholds applied (``qc`` and the older top-level keys)."""
        given = self.model_dump(exclude_unset=True)
        items = {**self.qc, **{k: given[k] for k in QC_KEYS if k in given}}
        return {k: v for k, v in items.items() if not isinstance(v, (dict, list))}


class Split(_Block):
    fractions: list[float] | None = None
    split_by: str | None = None
    seed: int | None = None


class BuildConfig(_Block):
    """The ``DataConfig`` the dataset was built from (as dumped; older ones may lack keys)."""

    source: str | None = None
    input: str | None = None
    layer: str | None = None
    normalized: bool | None = None
    target_sum: float | None = None
    hvg_flavor: str | None = None
    hvg_batch_key: str | None = None
    split: list[float] | None = None
    split_by: str | None = None
    simulate: dict[str, Any] = {}
    census: dict[str, Any] = {}


class Thinning(_Block):
    fraction: float | None = None
    seed: int | None = None
    parent_checksum: str | None = None
    parent_path: str | None = None
    parent_depth_fraction: float | None = None


class Manifest(_Block):
    """``manifest.json`` of a dataset directory."""

    format: str | None = None  # absent only in manifests older than the field
    format_version: int | None = None
    source: Source | None = None
    V: int | None = None
    D: int | None = None
    seed: int | None = None
    preprocessing: Preprocessing = Preprocessing()
    genes: list[str] = []
    split: Split = Split()
    split_sizes: dict[str, int] = {}
    eval_mask_seed: int | None = None
    mask_prob: float | None = None
    baselines: dict[str, Scores] = {}
    depth_fraction: float | None = 1.0
    thinning: Thinning | None = None
    config: BuildConfig = BuildConfig()
    config_hash: str | None = None
    cellscale_version: str | None = None
    created: str | None = None

    # ---------------------------------------------------------------- reading
    @classmethod
    def parse(cls, obj: Any, *, origin: str | Path = "manifest.json") -> Manifest:
        """Validate a manifest mapping; a DataError names ``origin`` and the first problem."""
        if not isinstance(obj, dict):
            raise DataError(f"{origin}: not a cellscale dataset manifest (not a JSON object)")
        try:
            return cls.model_validate(obj)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise DataError(f"{origin}: {where}: {first['msg'].removeprefix('Value error, ')}") from None

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        """Read and validate ``path`` (a manifest.json)."""
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise DataError(f"{path} could not be read ({err})") from None
        try:
            obj = json.loads(text)
        except ValueError as err:
            raise DataError(f"{path} is not valid JSON ({err})") from None
        return cls.parse(obj, origin=path)

    @model_validator(mode="before")
    @classmethod
    def _lift_legacy(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        out = dict(raw)
        if isinstance(out.get("source"), str):
            out["source"] = {"kind": out["source"]}
        if isinstance(out.get("baselines"), dict):  # an entry that is not {val, test} is not a baseline
            out["baselines"] = {k: v for k, v in out["baselines"].items() if isinstance(v, dict)}
        for key in _LEGACY.keys() & raw.keys():
            _lift(out, key)
        return out

    @field_validator("format")
    @classmethod
    def _format(cls, v: str | None) -> str | None:
        if v is not None and v != FORMAT:
            raise ValueError(f"not a cellscale dataset manifest (format {v!r}, expected {FORMAT!r})")
        return v

    @field_validator("format_version")
    @classmethod
    def _version(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= FORMAT_VERSION:
            raise ValueError(f"format_version {v} is not one this cellscale reads (1 to {FORMAT_VERSION}): "
                             "upgrade cellscale or rebuild the dataset")
        return v

    # ---------------------------------------------------------------- facts, newest layout first
    @property
    def source_kind(self) -> str | None:
        return None if self.source is None else self.source.kind or self.source.name

    @property
    def source_block(self) -> Source:
        return self.source or Source()

    @property
    def census(self) -> dict[str, Any]:
        return {**self.config.census, **self.source_block.census_facts}

    @property
    def simulate(self) -> dict[str, Any]:
        return {**self.config.simulate, **self.source_block.simulate}

    @property
    def input(self) -> str | None:
        return self.config.input or self.source_block.path or self.source_block.input

    @property
    def layer(self) -> str | None:
        return self.config.layer or self.source_block.layer

    @property
    def normalized(self) -> bool | None:
        return _first(self.preprocessing.normalized_input, self.config.normalized)

    @property
    def target_sum(self) -> float | None:
        return _first(self.preprocessing.target_sum, self.config.target_sum)

    @property
    def hvg_flavor(self) -> str | None:
        return _first(self.preprocessing.hvg_flavor, self.config.hvg_flavor)

    @property
    def hvg_batch_key(self) -> str | None:
        return _first(self.preprocessing.hvg_batch_key, self.config.hvg_batch_key)

    @property
    def split_fractions(self) -> list[float] | None:
        return self.split.fractions or self.config.split

    @property
    def split_by(self) -> str | None:
        return _first(self.split.split_by, self.config.split_by)

    @property
    def split_seed(self) -> int | None:
        return _first(self.split.seed, self.seed)

    @property
    def bayes_floor_mse(self) -> float | None:
        """The simulator's exact Bayes floor (MSE, validation), when the data have one."""
        floor = self.baselines.get("bayes_floor")
        return _first(self.source_block.bayes_floor_mse, None if floor is None else floor.val)

    @property
    def train_cells(self) -> int | None:
        """The size of the train split ("all training cells")."""
        return self.split_sizes.get("train")


def _lift(manifest: dict[str, Any], key: str) -> None:
    """Move the older top-level ``key`` into its block (merged, for the census settings)."""
    block, inner = _LEGACY[key]
    value = manifest.pop(key)
    into = dict(manifest[block]) if isinstance(manifest.get(block), dict) else {}
    if key == "census" and isinstance(value, dict) and isinstance(into.get(inner), dict):
        value = {**into[inner], **value}
    into[inner] = value
    manifest[block] = into


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)
