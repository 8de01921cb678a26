"""The ladder reproduces the seed study's 14 parameter counts exactly."""

from __future__ import annotations

import pytest
import torch

from cellscale.config import ConfigError
from cellscale.errors import CellscaleError
from cellscale.model import CellTransformer, count_params, non_embedding_params
from cellscale.model.ladder import LADDER, STUDY_PARAMS, get_size, ladder_table

# the study's table (reference/README.md), written out here so the test cannot drift with code
EXPECTED = {
    512: {"XXS": 533, "TINY": 9_953, "XS": 132_993, "S": 859_137, "M": 19_178_497,
          "L": 100_510_801, "XL": 340_770_817},
    1024: {"XXS": 1_045, "TINY": 18_145, "XS": 165_761, "S": 924_673, "M": 19_440_641,
           "L": 101_033_041, "XL": 341_557_249},
}
SHAPES = {"XXS": (1, 1, 1, 1), "TINY": (16, 1, 1, 1), "XS": (64, 2, 4, 4), "S": (128, 4, 8, 4),
          "M": (512, 6, 8, 4), "L": (1020, 8, 12, 4), "XL": (1536, 12, 16, 4)}


def test_ladder_shapes():
    assert list(LADDER) == ["XXS", "TINY", "XS", "S", "M", "L", "XL"]
    for name, (d, l, h, f) in SHAPES.items():
        assert LADDER[name] == {"d_model": d, "n_layers": l, "n_heads": h, "ffn_ratio": f}
    assert STUDY_PARAMS == EXPECTED


@pytest.mark.parametrize("V", [512, 1024])
@pytest.mark.parametrize("name", list(SHAPES))
def test_study_param_counts(name, V):
    cfg = get_size(name, n_genes=V)
    assert count_params(cfg) == EXPECTED[V][name]


@pytest.mark.parametrize("V", [512, 1024])
@pytest.mark.parametrize("name", list(SHAPES))
def test_count_params_equals_instantiated(name, V):
    cfg = get_size(name, n_genes=V)
    big = name in ("M", "L", "XL")
    if big:
        with torch.device("meta"):
            model = CellTransformer(cfg)
    else:
        model = CellTransformer(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == count_params(cfg) == model.num_params() == EXPECTED[V][name]
    assert non_embedding_params(cfg) == n - V * cfg.d_model


def test_non_embedding_params_value():
    # XS at V=512: 132,993 total - 512*64 gene table
    assert non_embedding_params(get_size("XS", n_genes=512)) == 132_993 - 32_768


def test_unknown_size_is_config_error():
    with pytest.raises(ConfigError, match=r"unknown model size 'XXL' \(known: XXS, TINY, XS, S, M, L, XL\)"):
        get_size("XXL", n_genes=512)
    with pytest.raises(CellscaleError, match=r"unknown model size 'nope' \(known: XXS, "):
        get_size("nope", n_genes=512)


def test_custom_sizes_and_overrides():
    custom = {"S2": {"d_model": 96, "n_layers": 3, "n_heads": 4}, "XS": {"d_model": 32, "n_layers": 1, "n_heads": 2}}
    cfg = get_size("S2", n_genes=100, custom=custom, dropout=0.0)
    assert (cfg.name, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.ffn_ratio, cfg.n_genes, cfg.dropout) == (
        "S2", 96, 3, 4, 4, 100, 0.0)
    assert count_params(cfg) == CellTransformer(cfg).num_params()
    assert get_size("XS", n_genes=10, custom=custom).d_model == 32  # custom entry replaces
    with pytest.raises(ConfigError, match="S2"):
        get_size("S3", n_genes=10, custom=custom)
    with pytest.raises(ConfigError, match="d_model=10 is not divisible by n_heads=3"):
        get_size("bad", n_genes=10, custom={"bad": {"d_model": 10, "n_layers": 1, "n_heads": 3}})
    with pytest.raises(ConfigError, match="unknown key"):
        get_size("bad", n_genes=10, custom={"bad": {"d_model": 8, "n_layers": 1, "n_heads": 2, "width": 3}})


def test_ladder_table():
    rows = ladder_table(512)
    assert [r["size"] for r in rows] == list(SHAPES)
    assert [r["params"] for r in rows] == list(EXPECTED[512].values())
    for r in rows:
        assert set(r) == {"size", "d_model", "n_layers", "n_heads", "ffn_ratio", "params",
                          "non_embedding_params", "flops_per_cell"}
        assert r["non_embedding_params"] == r["params"] - 512 * r["d_model"]
    flops = [r["flops_per_cell"] for r in rows]
    assert flops == sorted(flops)
