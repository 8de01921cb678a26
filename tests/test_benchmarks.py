"""The benchmark scripts run end to end (tiny settings) and print what their docs promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    r = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_train_throughput_prints_both_mfus_and_the_summary_line():
    out = _run("train_throughput.py", "--sizes", "XXS", "--seconds", "0.5", "--rounds", "1", "--cells", "256")
    lines = out.strip().splitlines()
    assert re.fullmatch(r"speedup_xs=\S+ speedup_s=\S+ mfu_s=\S+", lines[-1])
    header = next(l for l in lines if l.startswith("size"))
    assert header.split()[-3:] == ["MFU", "paired", "steps"]
    row = next(r for r in (l.split() for l in lines) if r[:2] == ["XXS", "cellscale"])
    assert row[1:3] == ["cellscale", "256"] and row[5].endswith("%") and row[6].endswith("%")
    assert re.search(r"matmul peak used for MFU: [\d.]+ GFLOP/s \(highest of 2 measurements", out)


def test_loader_benchmark_prints_the_ratios(tmp_path: Path):
    out = _run("bench_loader.py", "--cells", "3000", "--genes", "64", "--seconds", "0.3", "--workdir", str(tmp_path))
    ratios = re.findall(r"^ratio .* ([\d.]+)x$", out, flags=re.M)
    assert len(ratios) == 2 and all(float(r) > 0 for r in ratios)
