"""The command line: the smoke study end to end, and one-line errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cellscale.cli import main


def cellscale(*args: str, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellscale.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def test_ladder_prints_study_counts(capsys):
    assert main(["ladder", "--genes", "512"]) == 0
    out = capsys.readouterr().out
    for count in ("533", "9,953", "132,993", "859,137", "19,178,497", "100,510,801", "340,770,817"):
        assert count in out
    assert main(["ladder", "--genes", "1024", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["params"] for r in rows] == [1045, 18145, 165761, 924673, 19440641, 101033041, 341557249]


def test_run_smoke_end_to_end(tmp_path: Path):
    out = tmp_path / "smoke"
    proc = cellscale("run", "--preset", "smoke", "--out", str(out), timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(out / "results.csv")
    assert list(table["size"]) == ["XXS", "TINY", "XS", "S"]
    assert (table["status"] == "ok").all()
    assert table["params"].max() / table["params"].min() > 10 ** 2.5
    fit = json.loads((out / "fit.json").read_text())
    assert set(fit["params"]) == {"a", "alpha", "c"}
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "XXS-dall-s0" in html
    assert (out / "report.md").is_file()
    assert "report:" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "no/such/dir", "--size", "XS", "--out", "r"], "error: "),
        (["fit", "no_such.csv", "--law", "power-floor"], "error: "),
        (["run", "--preset", "nope"], "error: unknown preset 'nope'"),
        (["data", "build", "--source", "h5ad", "--genes", "8", "--cells", "10", "--out", "d"],
         "error: --source h5ad needs --input"),
        (["data", "build", "--source", "h5ad", "--input", "missing.h5ad", "--genes", "8", "--cells", "10",
          "--out", "d"], "error: "),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, args, message):
    proc = cellscale(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists() and not (tmp_path / "r").exists()


def test_unknown_size_is_one_line(tiny_dataset_dir: Path, tmp_path: Path):
    proc = cellscale("train", "--data", str(tiny_dataset_dir), "--size", "HUGE", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown model size 'HUGE'")
    assert not (tmp_path / "r").exists()
