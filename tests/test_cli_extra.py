"""Command-line comfort: examples in every --help, --quiet, `data info`, and the lazy Python API."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys

import pytest

import cellscale
from cellscale.cli import build_parser, main


def _subcommands(parser: argparse.ArgumentParser, path=()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append(((*path, name), sub))
                out += _subcommands(sub, (*path, name))
    return out


SUBCOMMANDS = _subcommands(build_parser())


def test_every_subcommand_is_listed():
    names = {" ".join(p) for p, _ in SUBCOMMANDS}
    assert names == {"data", "data build", "data info", "data thin", "ladder", "train", "sweep", "fit", "report",
                     "embed", "downstream", "run"}


@pytest.mark.parametrize("path, parser", SUBCOMMANDS, ids=[" ".join(p) for p, _ in SUBCOMMANDS])
def test_help_shows_examples_that_parse(path, parser):
    text = parser.format_help()
    assert "example" in text
    assert "--quiet" in text
    examples = text.split("examples:", 1)[1].strip().splitlines()
    own = [line for line in examples if line.strip().startswith("cellscale ")]
    assert own, text
    for line in own + [line for line in examples if "-m cellscale.cli" in line]:
        tokens = shlex.split(line, comments=True)
        argv = tokens[tokens.index("cellscale.cli") + 1:] if "cellscale.cli" in tokens else tokens[1:]
        build_parser().parse_args(argv)  # an example that does not parse exits here
        assert argv[: len(path)] == list(path) or "--quiet" in argv, line


def test_top_level_help_examples_parse():
    text = build_parser().format_help()
    assert "examples:" in text, text
    lines = [line for line in text.split("examples:", 1)[1].strip().splitlines() if line.strip()]
    assert len(lines) >= 5, text  # the top-level help lists the main subcommands' examples
    assert all(line.strip().startswith("cellscale ") for line in lines), lines
    commands = set()
    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        build_parser().parse_args(argv)  # an example that does not parse exits here
        commands.add(next(a for a in argv if not a.startswith("-")))
    assert {"run", "data", "train", "sweep", "fit", "report"} <= commands, commands


@pytest.mark.parametrize("argv", [
    ["--quiet", "ladder"], ["ladder", "--quiet"], ["-q", "ladder"], ["ladder", "-q"],
    ["--quiet", "data", "info", "ds"], ["data", "info", "ds", "--quiet"], ["data", "--quiet", "info", "ds"],
    ["run", "--quiet", "--preset", "smoke"], ["--quiet", "run", "--preset", "smoke"],
])
def test_quiet_before_or_after_the_subcommand(argv):
    assert build_parser().parse_args(argv).quiet is True


def test_not_quiet_by_default():
    assert build_parser().parse_args(["ladder"]).quiet is False
    assert build_parser().parse_args(["data", "info", "ds"]).quiet is False


def test_quiet_train_prints_results_only(tiny_dataset_dir, tmp_path, capsys):
    args = ["train", "--data", str(tiny_dataset_dir), "--size", "XXS", "--cells-seen", "256",
            "--batch-size", "32", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "loud")]) == 0
    loud = capsys.readouterr()
    assert "[1/1] loud" in loud.err and "step" in loud.err  # per-run and progress lines
    assert main(["--quiet", *args, "--out", str(tmp_path / "quiet")]) == 0
    quiet = capsys.readouterr()
    assert "[1/1]" not in quiet.err and "step" not in quiet.err
    assert quiet.out.startswith("XXS: val ") and "result:" in quiet.err
    assert json.loads((tmp_path / "quiet" / "result.json").read_text())["status"] == "ok"


def test_quiet_data_build_turns_off_build_progress(monkeypatch, tmp_path, tiny_dataset_dir, capsys):
    from cellscale.data import build

    seen = []

    def fake_build(cfg, *, out, overwrite=False, progress=True):
        seen.append(progress)
        return tiny_dataset_dir

    monkeypatch.setattr(build, "build_dataset", fake_build)
    argv = ["data", "build", "--source", "simulate", "--genes", "64", "--cells", "300", "--out", str(tmp_path / "d")]
    assert main(argv) == 0
    assert main([*argv, "--quiet"]) == 0
    assert seen == [True, False]
    assert capsys.readouterr().out.count("dataset: ") == 2  # the result is printed either way


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_run_hushes_the_work_but_prints_the_summary(monkeypatch, tmp_path, capsys, quiet):
    import cellscale.pipeline as pipeline
    from cellscale.runtime.progress import console

    calls = []

    def fake_study(cfg, *, out, backend=None, ray_address=None, overwrite=False, progress=True, workers=None):
        calls.append(progress)
        console.print("building dataset (a status line)")
        return {"runs": 4, "finished": 4, "failed_or_diverged": 0, "report_html": str(out / "report.html")}

    monkeypatch.setattr(pipeline, "run_study", fake_study)
    argv = ["run", "--preset", "smoke", "--out", str(tmp_path / "o")] + (["--quiet"] if quiet else [])
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert calls == [not quiet]
    assert ("building dataset" in err) is not quiet
    assert "runs: 4/4 finished" in err and "report:" in err  # the results, quiet or not
    assert not console.quiet


def test_silenced_restores_the_consoles():
    import rich

    from cellscale.cli import _silenced
    from cellscale.runtime.progress import console

    with _silenced(True):
        assert console.quiet and rich.get_console().quiet
    assert not console.quiet and not rich.get_console().quiet
    with _silenced(False):
        assert not console.quiet


def test_data_info_table_and_json(tiny_dataset_dir, capsys):
    assert main(["data", "info", str(tiny_dataset_dir)]) == 0
    out = capsys.readouterr().out
    for text in ("simulate", "genes (V)", "64", "cells (D)", "300", "train 270", "val 15", "test 15",
                 "float32", "seurat_v3", "gene-mean MSE", "verified ok", "first genes", "gene"):
        assert text in out, text
    assert main(["data", "info", str(tiny_dataset_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["V"] == 64 and info["D"] == 300
    assert info["split_sizes"] == {"train": 270, "val": 15, "test": 15}
    assert set(info["baselines"]["gene_mean"]) == {"val", "test"}
    assert "values.npy" in info["checksums_verified"]
    assert info["genes_first"] == json.loads((tiny_dataset_dir / "manifest.json").read_text())["genes"][:10]


def test_data_info_shows_cached_baselines(tiny_dataset_dir, tmp_path, capsys):
    from cellscale.data.baselines import load_or_compute_baselines
    from cellscale.data.store import Dataset

    ds_dir = tmp_path / "ds"
    shutil.copytree(tiny_dataset_dir, ds_dir)
    base = load_or_compute_baselines(Dataset.open(ds_dir))
    assert main(["data", "info", str(ds_dir)]) == 0
    out = capsys.readouterr().out
    assert "bayes_linear" in out and "knn" in out and f"{base['knn']['val']:.4f}" in out
    assert main(["data", "info", str(ds_dir), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["cached_baselines"].values()
    assert entry["knn"]["val"] == pytest.approx(base["knn"]["val"])


def test_data_info_names_census_release_and_tissues(tiny_dataset_dir, tmp_path, capsys):
    ds_dir = tmp_path / "census-like"
    shutil.copytree(tiny_dataset_dir, ds_dir)
    manifest = json.loads((ds_dir / "manifest.json").read_text())  # not itself checksummed
    manifest["source"] = {"kind": "census", "census_version": "2025-01-30", "uri": None,
                          "organism": "homo_sapiens", "obs_filter": "is_primary_data == True",
                          "n_cells_per_tissue_kept": {"blood": 200, "lung": 100}}
    (ds_dir / "manifest.json").write_text(json.dumps(manifest))
    assert main(["data", "info", str(ds_dir)]) == 0
    out = capsys.readouterr().out
    assert "census  census_version=2025-01-30  organism=homo_sapiens" in out
    assert "blood 200  lung 100" in out


def test_data_info_bad_dirs_are_one_line(tiny_dataset_dir, tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset directory not found") and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert main(["data", "info", str(tmp_path / "empty")]) == 2
    assert "not a cellscale dataset" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset_dir, broken)
    values = broken / "values.npy"
    data = bytearray(values.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the checksum can tell
    values.write_bytes(bytes(data))
    assert main(["data", "info", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "values.npy does not match its checksum" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- Python API

LAZY = {
    "build_dataset": ("cellscale.data.build", "build_dataset"),
    "Dataset": ("cellscale.data.store", "Dataset"),
    "train_run": ("cellscale.train", "train_run"),
    "run_sweep": ("cellscale.sweep", "run_sweep"),
    "fit_table": ("cellscale.fit", "fit_table"),
    "fit_csv": ("cellscale.fit", "fit_csv"),
    "write_report": ("cellscale.report", "write_report"),
    "run_study": ("cellscale.pipeline", "run_study"),
    "resolve_config": ("cellscale.pipeline", "resolve_config"),
    "load_study_config": ("cellscale.config", "load_study_config"),
    "ladder_table": ("cellscale.model.ladder", "ladder_table"),
    "get_size": ("cellscale.model.ladder", "get_size"),
}


def test_import_cellscale_does_not_import_torch():
    code = ("import sys, cellscale; heavy = [m for m in ('torch', 'scanpy', 'anndata', 'pandas', 'cellscale.data') "
            "if m in sys.modules]; print(heavy); cellscale.fit_table; print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "False"]  # fit needs no torch either


@pytest.mark.parametrize("name", sorted(LAZY))
def test_lazy_api_names_resolve(name):
    import importlib

    module, attr = LAZY[name]
    obj = getattr(cellscale, name)
    assert obj is getattr(importlib.import_module(module), attr)
    assert name in dir(cellscale) and name in cellscale.__all__
    assert callable(obj)


def test_submodule_names_stay_modules():
    import types

    for name in ("train", "sweep", "fit", "data", "report"):
        assert isinstance(getattr(cellscale, name), types.ModuleType), name
    assert cellscale.fit.fit_table is cellscale.fit_table
    assert set(cellscale.__all__) == {"__version__", *cellscale._EXPORTS}
    assert cellscale.train.train_run is cellscale.train_run
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cellscale.nope  # noqa: B018


def test_api_functions_have_docstrings():
    documented = [n for n in ("build_dataset", "Dataset", "train_run", "run_sweep", "fit_table", "fit_csv",
                              "write_report", "ladder_table", "get_size")]
    for name in documented:
        assert (getattr(cellscale, name).__doc__ or "").strip(), name
    assert "train_run" in cellscale.__doc__ and "run_sweep" in cellscale.__doc__


def test_data_build_takes_source_genes_cells_and_seed_from_config(monkeypatch, tmp_path, capsys):
    import yaml

    import cellscale.data.build as build

    built = []

    def stop_at_build(cfg, **kw):  # what would be built is all this test needs
        built.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(build, "build_dataset", stop_at_build)
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"data": {"source": "simulate", "genes": 16, "cells": 300, "seed": 7}}))
    with pytest.raises(SystemExit):
        main(["data", "build", "--config", str(study), "--out", str(tmp_path / "ds")])
    assert (built[0].source, built[0].genes, built[0].cells, built[0].seed) == ("simulate", 16, 300, 7)
    with pytest.raises(SystemExit):
        main(["data", "build", "--config", str(study), "--genes", "8", "--seed", "1", "--out", str(tmp_path / "ds")])
    assert (built[1].genes, built[1].seed, built[1].cells) == (8, 1, 300)  # a flag wins over the config
    assert main(["data", "build", "--source", "simulate", "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert "error: data build needs --genes, --cells (or --config with a data section)" in err
    assert "Traceback" not in err


def test_the_reports_resample_batches_are_shown_at_half_and_at_the_end(monkeypatch):
    from cellscale.runtime.progress import ResampleProgress, console

    def batches(bar):
        for total in (1000, 40):
            for done in range(total // 10, total + 1, total // 10):
                bar(done, total)
        for done in (250, 500):  # a third batch of the same size as the first
            bar(done, 1000)

    with console.capture() as cap:  # not a terminal: plain lines, none for batches done in a blink
        with ResampleProgress() as bar:
            batches(bar)
    assert cap.get() == ""
    monkeypatch.setattr(ResampleProgress, "PLAIN_SECONDS", 0.0)  # every batch counts as long
    with console.capture() as cap:
        with ResampleProgress() as bar:
            batches(bar)
    lines = [line.split(" in ")[0] for line in cap.get().splitlines()]
    assert lines == ["report: fitting: 500/1000 resamples of batch 1", "report: fitting: 1000/1000 resamples of batch 1",
                     "report: fitting: 20/40 resamples of batch 2", "report: fitting: 40/40 resamples of batch 2",
                     "report: fitting: 500/1000 resamples of batch 3"]
    with console.capture() as cap:
        with ResampleProgress(enabled=False) as bar:
            bar(1000, 1000)
    assert cap.get() == ""
