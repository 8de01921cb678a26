"""Named model sizes: the seed study's ladder (XXS..XL) plus custom sizes from a config.

The study's parameter counts (docs/study.md) are reproduced exactly by
:func:`cellscale.model.count_params`; ``tests/test_ladder.py`` asserts all 14.
"""

from __future__ import annotations

from typing import Any, Mapping

from cellscale.config import ConfigError, ModelConfig, parse_config
from cellscale.model import count_params, flops_per_cell, non_embedding_params

__all__ = ["LADDER", "STUDY_PARAMS", "get_size", "ladder_table", "known_sizes"]

# name -> (d_model, n_layers, n_heads, ffn_ratio), as in the study
LADDER: dict[str, dict[str, int]] = {
    "XXS": {"d_model": 1, "n_layers": 1, "n_heads": 1, "ffn_ratio": 1},
    "TINY": {"d_model": 16, "n_layers": 1, "n_heads": 1, "ffn_ratio": 1},
    "XS": {"d_model": 64, "n_layers": 2, "n_heads": 4, "ffn_ratio": 4},
    "S": {"d_model": 128, "n_layers": 4, "n_heads": 8, "ffn_ratio": 4},
    "M": {"d_model": 512, "n_layers": 6, "n_heads": 8, "ffn_ratio": 4},
    "L": {"d_model": 1020, "n_layers": 8, "n_heads": 12, "ffn_ratio": 4},
    "XL": {"d_model": 1536, "n_layers": 12, "n_heads": 16, "ffn_ratio": 4},
}

# the study's published totals {V: {size: params}}
STUDY_PARAMS: dict[int, dict[str, int]] = {
    512: {"XXS": 533, "TINY": 9_953, "XS": 132_993, "S": 859_137, "M": 19_178_497,
          "L": 100_510_801, "XL": 340_770_817},
    1024: {"XXS": 1_045, "TINY": 18_145, "XS": 165_761, "S": 924_673, "M": 19_440_641,
           "L": 101_033_041, "XL": 341_557_249},
}

_SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "ffn_ratio")


def known_sizes(custom: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    return list(LADDER) + [k for k in (custom or {}) if k not in LADDER]


def get_size(
    name: str,
    *,
    n_genes: int,
    custom: Mapping[str, Mapping[str, Any]] | None = None,
    **overrides: Any,
) -> ModelConfig:
    """The ModelConfig of size ``name`` at ``n_genes`` genes.

    ``custom`` maps extra names to ``{d_model, n_layers, n_heads[, ffn_ratio]}`` (a custom
    entry with a ladder name replaces it); ``overrides`` set any other ModelConfig field
    (e.g. ``dropout=0.0``). Unknown names and bad shapes raise ConfigError.
    """
    custom = dict(custom or {})
    if name in custom:
        spec = dict(custom[name])
        unknown = set(spec) - set(_SHAPE_KEYS) - set(ModelConfig.model_fields)
        if unknown:
            raise ConfigError(f"custom size '{name}': unknown key '{sorted(unknown)[0]}'")
    elif name in LADDER:
        spec = dict(LADDER[name])
    else:
        raise ConfigError(f"unknown model size '{name}' (known: {', '.join(known_sizes(custom))})")
    spec.setdefault("ffn_ratio", 4)
    spec.update(overrides)
    spec["name"] = name
    spec["n_genes"] = n_genes
    return parse_config(ModelConfig, spec, origin=f"model size '{name}'")


def ladder_table(
    n_genes: int,
    *,
    sizes: list[str] | None = None,
    custom: Mapping[str, Mapping[str, Any]] | None = None,
    mask_prob: float = 0.15,
) -> list[dict[str, Any]]:
    """One row per size: shape, total and non-embedding parameters, training FLOPs per cell."""
    rows = []
    for name in sizes or known_sizes(custom):
        cfg = get_size(name, n_genes=n_genes, custom=custom)
        rows.append(
            {
                "size": name,
                "d_model": cfg.d_model,
                "n_layers": cfg.n_layers,
                "n_heads": cfg.n_heads,
                "ffn_ratio": cfg.ffn_ratio,
                "params": count_params(cfg),
                "non_embedding_params": non_embedding_params(cfg),
                "flops_per_cell": flops_per_cell(cfg, mask_prob=mask_prob)["train"],
            }
        )
    return rows
