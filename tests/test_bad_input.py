"""Bad input through the real CLI: one `error:` line naming problem and fix, exit 2, no
traceback, and nothing half-written where a rerun would trust it.

Every case runs ``python -m cellscale.cli ...`` as a subprocess. The data layer's own
function-level checks are tested in tests/test_data_*.py; here the whole command is.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from cellscale.schema import RESULT_FIELDS


def cellscale(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellscale.cli", *args], capture_output=True, check=False,
                          text=True, cwd=cwd, timeout=timeout)


def cellscale_many(cases: dict[str, tuple[tuple[str, ...], Path]]) -> dict[str, subprocess.CompletedProcess]:
    """Run independent CLI commands concurrently (each in its own cwd): {name: (args, cwd)}."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(cellscale, *args, cwd=cwd) for name, (args, cwd) in cases.items()}
        return {name: f.result() for name, f in futures.items()}


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def no_leftovers(parent: Path, name: str) -> None:
    """Neither the output nor a temp sibling of it (``.name.*``) exists."""
    assert not (parent / name).exists(), f"{name} was created"
    assert not list(parent.glob(f".{name}.*")), list(parent.glob(f".{name}.*"))


# ----------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Small .h5ad files, good and bad, and configs, in one directory (read-only)."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, size=(40, 30)).astype(np.float32)

    def write(name: str, M: np.ndarray, genes: list[str] | None = None) -> None:
        var = pd.DataFrame(index=pd.Index(genes or [f"g{i}" for i in range(M.shape[1])]))
        obs = pd.DataFrame(index=pd.Index([f"c{i}" for i in range(M.shape[0])]))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ad.AnnData(X=M, obs=obs, var=var).write_h5ad(d / name)

    write("good.h5ad", X)
    for name, (value) in {"nan": np.nan, "inf": np.inf, "neg": -1.0, "frac": 0.5}.items():
        Y = X.copy()
        Y[3, 4] = value
        write(f"{name}.h5ad", Y)
    write("dup.h5ad", X, genes=["g0", "g0"] + [f"g{i}" for i in range(2, 30)])
    write("zero.h5ad", np.zeros_like(X))
    blob = (d / "good.h5ad").read_bytes()
    (d / "trunc.h5ad").write_bytes(blob[: len(blob) // 2])
    (d / "text.h5ad").write_text("cell,gene,count\n")
    (d / "a_dir.h5ad").mkdir()
    (d / "unknown_key.yaml").write_text(yaml.safe_dump({"train": {"batch_size": 8, "bogus": 1}}))
    (d / "wrong_type.yaml").write_text(yaml.safe_dump({"train": {"batch_size": "many"}}))
    (d / "not_yaml.yaml").write_text("train: [unclosed\n")
    (d / "huge_size.yaml").write_text(yaml.safe_dump({"sweep": {"sizes": ["HUGE"]}}))
    pd.DataFrame([{**dict.fromkeys(RESULT_FIELDS), "run_id": f"r{i}", "params": 10 ** (i + 2),
                   "best_val_mse": None, "status": "failed", "error": "boom"} for i in range(4)]
                 ).to_csv(d / "no_finished.csv", index=False)
    return d


def _build(files: Path, name: str, *extra: str, genes: str = "10", cells: str = "30") -> tuple[str, ...]:
    return ("data", "build", "--source", "h5ad", "--input", str(files / name), "--genes", genes,
            "--cells", cells, "--out", "ds", *extra)


BUILD_CASES = {
    "missing-file": (("missing.h5ad",), ("missing.h5ad",)),
    "a-directory": (("a_dir.h5ad",), ("directory",)),
    "truncated-h5ad": (("trunc.h5ad",), ("truncated",)),
    "not-hdf5": (("text.h5ad",), ("not an HDF5",)),
    "nan": (("nan.h5ad",), ("NaN",)),
    "inf": (("inf.h5ad",), ("infinite",)),
    "negative": (("neg.h5ad",), ("negative", "--layer", "--normalized")),
    "non-integer": (("frac.h5ad",), ("non-integer", "--layer", "--normalized")),
    "duplicate-genes": (("dup.h5ad",), ("duplicate gene names", "g0")),
    "zero-counts-only": (("zero.h5ad",), ("zero counts",)),
}


BUILD_CASES["fewer-genes"] = (("good.h5ad", "100", "30"), ("30 genes", "--genes"))
BUILD_CASES["fewer-cells"] = (("good.h5ad", "10", "300"), ("40 usable cells", "--cells"))
# the default suite runs a few through the CLI (each is also tested at function level in
# tests/test_data_*.py); `pytest -m slow` runs every case through the CLI
CORE_BUILD_CASES = ("truncated-h5ad", "nan", "duplicate-genes", "fewer-cells")


def test_data_build_refuses_bad_h5ad(files: Path, tmp_path: Path):
    _build_cases(files, tmp_path, {k: BUILD_CASES[k] for k in CORE_BUILD_CASES})


@pytest.mark.slow
def test_data_build_refuses_bad_h5ad_every_case(files: Path, tmp_path: Path):
    _build_cases(files, tmp_path, BUILD_CASES)


def _build_cases(files: Path, tmp_path: Path, cases: dict) -> None:
    runs = {}
    for case, (spec, _) in cases.items():
        (tmp_path / case).mkdir()
        name, genes, cells = (*spec, "10", "30")[:3]
        runs[case] = (_build(files, name, genes=genes, cells=cells), tmp_path / case)
    for case, proc in cellscale_many(runs).items():
        assert_one_line_error(proc, *cases[case][1])
        no_leftovers(tmp_path / case, "ds")


# ----------------------------------------------------------------------------- configs and sizes


def _train(data: Path, *extra: str) -> tuple[str, ...]:
    return ("train", "--data", str(data), "--size", "TINY", "--out", "run", "--cells-seen", "64",
            "--batch-size", "32", *extra)


CONFIG_CASES = {
    "unknown_key.yaml": ("unknown key 'train.bogus'",),
    "wrong_type.yaml": ("key 'train.batch_size'",),
    "not_yaml.yaml": ("not valid YAML",),
    "missing.yaml": ("config file not found",),
}


def test_bad_config_names_the_key(files: Path, tiny_dataset_dir: Path, tmp_path: Path):
    runs = {}
    for cfg in CONFIG_CASES:
        for cmd in ("train", "sweep"):
            cwd = tmp_path / f"{cmd}-{cfg}"
            cwd.mkdir()
            args = (_train(tiny_dataset_dir, "--config", str(files / cfg)) if cmd == "train"
                    else ("sweep", str(files / cfg), "--out", "sw"))
            runs[f"{cmd}-{cfg}"] = (args, cwd)
    for key, proc in cellscale_many(runs).items():
        cmd, cfg = key.split("-", 1)
        assert_one_line_error(proc, *CONFIG_CASES[cfg])
        no_leftovers(tmp_path / key, "run" if cmd == "train" else "sw")


def test_unknown_model_size(files: Path, tiny_dataset_dir: Path, tmp_path: Path):
    # in a sweep config it is refused before the sweep dir (or its dataset) is made
    cfg = yaml.safe_load((files / "huge_size.yaml").read_text())
    cfg["dataset"] = str(tiny_dataset_dir)
    (tmp_path / "huge.yaml").write_text(yaml.safe_dump(cfg))
    procs = cellscale_many({
        "train": (("train", "--data", str(tiny_dataset_dir), "--size", "HUGE", "--out", "run"), tmp_path),
        "sweep": (("sweep", "huge.yaml", "--out", "sw"), tmp_path),
    })
    assert_one_line_error(procs["train"], "unknown model size 'HUGE'", "known:")
    assert_one_line_error(procs["sweep"], "unknown model size 'HUGE'")
    no_leftovers(tmp_path, "run")
    no_leftovers(tmp_path, "sw")


def test_missing_dataset_and_truncated_or_changed_array(tiny_dataset_dir: Path, tmp_path: Path):
    truncated, changed = tmp_path / "truncated", tmp_path / "changed"
    for d in (truncated, changed):
        shutil.copytree(tiny_dataset_dir, d)
    blob = (tiny_dataset_dir / "values.npy").read_bytes()
    (truncated / "values.npy").write_bytes(blob[: len(blob) - 64])
    flipped = bytearray(blob)
    flipped[-5] ^= 0xFF  # same size, one value changed: only the checksum can tell
    (changed / "values.npy").write_bytes(bytes(flipped))
    cwd = {k: tmp_path / f"cwd-{k}" for k in ("missing", "truncated", "changed")}
    for d in cwd.values():
        d.mkdir()
    procs = cellscale_many({
        "missing": (_train(tmp_path / "nope"), cwd["missing"]),
        "truncated": (_train(truncated), cwd["truncated"]),
        "changed": (_train(changed), cwd["changed"]),
    })
    assert_one_line_error(procs["missing"], "dataset directory not found", "cellscale data build")
    assert_one_line_error(procs["truncated"], "values.npy is truncated", "--overwrite")
    assert_one_line_error(procs["changed"], "values.npy does not match its checksum")
    for d in cwd.values():
        no_leftovers(d, "run")


def test_fit_refuses_a_table_without_finished_runs(files: Path, tmp_path: Path):
    proc = cellscale("fit", str(files / "no_finished.csv"), "--law", "power-floor", cwd=tmp_path)
    assert_one_line_error(proc, "no finished runs")
    proc = cellscale("fit", str(tmp_path / "missing.csv"), cwd=tmp_path)
    assert_one_line_error(proc, "missing.csv")


# ----------------------------------------------------------------------------- occupied --out


def _occupied(tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    return out


def test_occupied_output_is_refused_without_overwrite(files: Path, tiny_dataset_dir: Path, tmp_path: Path):
    sweep_cfg = tmp_path / "s.yaml"
    sweep_cfg.write_text(yaml.safe_dump({
        "dataset": str(tiny_dataset_dir), "sweep": {"sizes": ["XXS"]},
        "train": {"cells_seen": 64, "batch_size": 32, "num_threads": 1}}))
    cases = {
        "ds": _build(files, "good.h5ad"),
        "run": _train(tiny_dataset_dir),
        "sw": ("sweep", str(sweep_cfg), "--out", "sw"),
        "study": ("run", "--config", str(sweep_cfg), "--out", "study"),
    }
    outs = {name: _occupied(tmp_path, name) for name in cases}
    procs = cellscale_many({name: (args, tmp_path) for name, args in cases.items()})
    for name, proc in procs.items():
        line = assert_one_line_error(proc, str(name), "--overwrite")
        assert "another --out" in line, line
        assert sorted(p.name for p in outs[name].iterdir()) == ["thesis.tex"], name
        assert (outs[name] / "thesis.tex").read_text() == "precious"
        assert not list(tmp_path.glob(f".{name}.*")), name
    # --overwrite itself: tests/test_train.py (train), tests/test_data_store.py (data build)
