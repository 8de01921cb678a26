"""conftest.require and the ``needs`` marker: a missing optional extra skips its tests, except
under CI (``.ci/run`` installs every extra), where it fails them with a one-line reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ci_requires_extras, require

MISSING = "cellscale_no_such_module"
REASON = (f"optional module '{MISSING}' is not installed (No module named '{MISSING}'); "
          "bash scripts/install.sh installs every extra")


@pytest.mark.parametrize("value, strict", [
    (None, False), ("", False), ("0", False), ("false", False), ("False", False), (" FALSE ", False),
    ("1", True), ("true", True), ("yes", True),
])
def test_ci_is_read_from_the_environment(monkeypatch, value, strict):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert ci_requires_extras() is strict


def test_require_fails_under_ci_and_skips_without(monkeypatch):
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception) as failed:
        require(MISSING)
    assert str(failed.value) == f"CI is set: {REASON}"
    assert failed.value.pytrace is False  # the reason alone, no traceback
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception) as skipped:
        require(MISSING)
    assert str(skipped.value) == REASON


def test_require_returns_an_installed_module(monkeypatch):
    monkeypatch.setenv("CI", "1")
    assert require("json") is json


def _session(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    """A pytest session over one file marked ``needs(MISSING)``, with tests/conftest.py as a plugin."""
    test = tmp_path / "test_needs.py"
    test.write_text(textwrap.dedent(f"""
        import pytest

        pytestmark = pytest.mark.needs("json", "{MISSING}")


        def test_one():
            pass


        def test_two():
            pass
    """))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "conftest", "-p", "no:cacheprovider",
                           str(test)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def test_needs_marker_fails_each_test_under_ci_and_skips_them_without(tmp_path: Path):
    proc = _session(tmp_path, "true")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for name in ("test_one", "test_two"):  # each test fails at setup, the session goes on
        assert f"ERROR test_needs.py::{name} - Failed: CI is set: {REASON}" in lines, proc.stdout
    assert "2 errors" in lines[-1], lines[-1]

    proc = _session(tmp_path, "0")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert [l for l in lines if l.startswith("SKIPPED [2] ") and l.endswith(f": {REASON}")], proc.stdout
    assert "2 skipped" in lines[-1] and "error" not in lines[-1], lines[-1]
