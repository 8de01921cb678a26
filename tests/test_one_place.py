"""One list per fact (issue 27): allowed values and defaults are written once, in the typed config
(or, for the fit, in ``cellscale.fit``, which the config reads), and the command line, its help and
the modules that check a name are generated from there. These checks fail when a copy comes back."""

from __future__ import annotations

import argparse
import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
from conftest import require
from pydantic import BaseModel

import cellscale.config as config
from cellscale.cli import build_parser, main
from cellscale.config import (
    CensusConfig,
    DataConfig,
    FitConfig,
    ModelConfig,
    SweepConfig,
    TrainConfig,
    field_default,
    literal_values,
)
from cellscale.rules.bits import count_weighted_bits, gaussian_bits

SRC = Path(__file__).resolve().parents[1] / "src" / "cellscale"
SOURCES = {p: p.read_text() for p in sorted(SRC.rglob("*.py"))}


def _parser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _action(path: tuple[str, ...], flag: str) -> argparse.Action:
    return _parser(*path)._option_string_actions[flag]


def _literal_fields() -> dict[str, tuple]:
    """{"Model.field": its allowed values} of every Literal field of two values or more in the config."""
    out = {}
    for obj in vars(config).values():
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == config.__name__:
            for name in obj.model_fields:
                try:
                    values = literal_values(obj, name)
                except TypeError:
                    continue
                if len(values) >= 2:
                    out[f"{obj.__name__}.{name}"] = values
    return out


LITERALS = _literal_fields()


def test_literal_values_reads_unions_and_refuses_other_fields():
    from cellscale.fit.intervals import INTERVALS

    assert literal_values(TrainConfig, "lr") == ("auto",)  # float | Literal["auto"]
    assert literal_values(FitConfig, "interval") == INTERVALS  # Literal[...] | None
    with pytest.raises(TypeError, match="not a Literal"):
        literal_values(TrainConfig, "batch_size")
    assert field_default(CensusConfig, "tissues") == CensusConfig().tissues


@pytest.mark.parametrize("path, flag, model, field", [
    (("train",), "--objective", ModelConfig, "objective"),
    (("train",), "--schedule", TrainConfig, "schedule"),
    (("train",), "--device", TrainConfig, "device"),
    (("train",), "--precision", TrainConfig, "precision"),
    (("data", "build"), "--source", DataConfig, "source"),
    (("data", "build"), "--dtype", DataConfig, "dtype"),
    (("sweep",), "--backend", SweepConfig, "backend"),
    (("run",), "--backend", SweepConfig, "backend"),
])
def test_cli_choices_are_the_config_literal(path, flag, model, field):
    action = _action(path, flag)
    assert tuple(action.choices) == literal_values(model, field)
    # unset, the config (a study's, or the defaults) decides: the flag's own default stays None
    assert action.default is None


@pytest.mark.parametrize("flag, model, field", [
    ("--objective", ModelConfig, "objective"),
    ("--schedule", TrainConfig, "schedule"),
    ("--device", TrainConfig, "device"),
    ("--precision", TrainConfig, "precision"),
])
def test_train_help_states_the_config_default(flag, model, field):
    help_text = _parser("train").format_help()
    block = help_text.split(f"  {flag} ", 1)[1].split("\n  --", 1)[0]
    assert f"else {field_default(model, field)}" in " ".join(block.split())


def test_fit_defaults_are_the_config_defaults_and_the_fit_functions():
    from cellscale.fit import defaults, fit_data_axis, fit_table

    parser = _parser("fit")
    cfg = FitConfig()
    for flag in ("law", "method", "interval", "bootstrap", "seed"):
        assert parser.get_default(flag) == getattr(cfg, flag), flag
    assert (cfg.method, cfg.bootstrap, cfg.seed) == (defaults.METHOD, defaults.BOOTSTRAP, defaults.SEED)
    # the data axis has its own method (least squares in log space: it predicts a longer run best)
    assert cfg.data_method == defaults.DATA_METHOD == "ls-log"
    for fn, method in ((fit_table, defaults.METHOD), (fit_data_axis, defaults.DATA_METHOD)):
        sig = inspect.signature(fn).parameters
        assert (sig["method"].default, sig["bootstrap"].default, sig["seed"].default) == (
            method, defaults.BOOTSTRAP, defaults.SEED), fn.__name__
        assert sig["gain_tolerance"].default == defaults.GAIN_TOLERANCE


def test_fit_help_lists_the_interval_methods_laws_and_methods():
    from cellscale.fit.intervals import DEFAULT_INTERVAL, INTERVALS
    from cellscale.fit.laws import LAWS
    from cellscale.fit.methods import METHODS

    text = " ".join(_parser("fit").format_help().split())
    assert f"one of {', '.join(literal_values(FitConfig, 'interval'))} (default {DEFAULT_INTERVAL};" in text
    assert literal_values(FitConfig, "interval") == INTERVALS
    assert f"one of {', '.join(LAWS)} (default {FitConfig().law})" in text.replace("- ", "-")
    assert f"one of {', '.join(METHODS)} (default {FitConfig().method})" in text.replace("- ", "-")
    # no choices=: a bad name is still the fit's own one-line error, which lists the methods
    assert _action(("fit",), "--interval").choices is None


def test_bad_interval_is_still_one_line(tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text("params,best_val_mse,status\n1e3,1.0,ok\n1e4,0.9,ok\n1e5,0.8,ok\n1e6,0.75,ok\n")
    assert main(["fit", str(table), "--law", "power-floor", "--interval", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown interval method 'nope'")
    assert ", ".join(literal_values(FitConfig, "interval")) in err[0]


def test_objectives_module_reads_the_config_list():
    from cellscale.rules import objectives

    assert objectives.OBJECTIVES == literal_values(ModelConfig, "objective")
    with pytest.raises(ValueError, match="use one of " + ", ".join(objectives.OBJECTIVES)):
        objectives.head_outputs("nope")


def test_census_help_and_source_read_the_config():
    census = CensusConfig()
    text = "".join(_parser("data", "build").format_help().split())  # whitespace (and wrapping) left out
    for needle in (census.version, f"default{census.organism}", census.obs_filter, ",".join(census.tissues),
                   ",".join(config.CENSUS_ORGANISMS)):
        assert "".join(needle.split()) in text, needle
    require("tiledbsoma")
    from cellscale.data.sources import census as source

    assert source.DEFAULT_CENSUS_VERSION == census.version
    assert source.KNOWN_ORGANISMS == config.CENSUS_ORGANISMS


def _files_containing(needle: str) -> list[str]:
    return [str(p.relative_to(SRC)) for p, text in SOURCES.items() if needle in text]


def test_census_release_and_tissues_are_written_once():
    census = CensusConfig()
    assert _files_containing(census.version) == ["config.py"]
    # the default tissues: each name (bar the ones every reader names, like blood) in config.py alone
    for tissue in ("intestine", "pancreas", "kidney", "spleen"):
        assert tissue in census.tissues
        assert _files_containing(tissue) == ["config.py"], tissue


def _string_collections(tree: ast.AST):
    """Every tuple, list or set literal of two strings or more and nothing else (a ``Literal[...]``'s
    values among them). Dicts keyed by the values (what each one does or says) are not lists of them."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            yield frozenset(e.value for e in node.elts)


def test_each_literal_list_is_written_in_one_file():
    """The allowed values of every config Literal are written as a list once, in config.py; the interval
    methods' names are the keys of ``cellscale.fit.intervals.DESCRIPTIONS`` (the fit imports no config,
    so FitConfig's Literal is built from ``INTERVALS``) and written as a list nowhere; the data axis's
    fit methods likewise come from the keys of ``cellscale.fit.defaults.METHOD_DESCRIPTIONS``."""
    from cellscale.fit.defaults import DATA_METHOD_NAMES, METHOD_DESCRIPTIONS
    from cellscale.fit.intervals import DESCRIPTIONS, INTERVALS

    assert INTERVALS == tuple(DESCRIPTIONS)
    assert set(DATA_METHOD_NAMES) < set(METHOD_DESCRIPTIONS)
    home = {name: {"config.py"} for name in LITERALS}
    home["FitConfig.interval"] = set()
    home["FitConfig.data_method"] = set()
    wanted = {frozenset(v): name for name, v in LITERALS.items()}
    found: dict[str, set[str]] = {name: set() for name in LITERALS}
    for path, text in SOURCES.items():
        for values in _string_collections(ast.parse(text)):
            if values in wanted:
                found[wanted[values]].add(str(path.relative_to(SRC)))
    assert found == home


def test_no_help_text_spells_a_literal_list_out():
    """A help text or message that lists a Literal's values by hand (``"cosine, constant"``) is a copy."""
    for name, values in LITERALS.items():
        for sep in (", ", ","):
            assert _files_containing(sep.join(values)) == [], (name, sep.join(values))


def test_count_weighted_bits_one_home_two_readings():
    from cellscale.report.records import weighted_bits
    from cellscale.train import per_gene_summary

    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, size=40)
    sse = rng.gamma(2.0, size=40) * counts
    mse = np.where(counts > 0, sse / np.maximum(counts, 1), np.nan)
    seen = counts > 0
    expected = float(np.sum(counts[seen] * gaussian_bits(mse[seen])) / counts[seen].sum())
    assert count_weighted_bits(mse, counts) == pytest.approx(expected, rel=1e-12)
    assert per_gene_summary(sse.astype(float), counts)[1]["entropy_bits_per_gene"] == count_weighted_bits(mse, counts)
    assert weighted_bits(mse, counts) == count_weighted_bits(mse, counts, partial=True) == count_weighted_bits(
        mse, counts)
    # a masked gene without a finite positive MSE: no figure for the run, the others' for the report
    zero = sse.copy()
    zero[np.flatnonzero(seen)[0]] = 0.0
    zmse = np.where(seen, zero / np.maximum(counts, 1), np.nan)
    assert per_gene_summary(zero, counts)[1]["entropy_bits_per_gene"] is None
    assert count_weighted_bits(zmse, counts) is None
    partial = weighted_bits(zmse, counts)
    assert partial == count_weighted_bits(zmse, counts, partial=True) and np.isfinite(partial)
    assert count_weighted_bits(np.array([np.nan, 1.0]), np.array([0, 0])) is None


def test_laws_and_methods_are_built_from_the_names_the_cli_reads():
    from cellscale.fit.defaults import LAW_NAMES, METHOD_NAMES
    from cellscale.fit.laws import LAWS
    from cellscale.fit.methods import METHODS

    assert tuple(LAWS) == LAW_NAMES and all(law.name == name for name, law in LAWS.items())
    assert tuple(METHODS) == METHOD_NAMES and all(m.name == name for name, m in METHODS.items())
