"""The CPUs a process may use, and the thread environment the command line sets before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cellscale.runtime import cpus


def _cgroup_v2(tmp_path, text):
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path


def _cgroup_v1(tmp_path, quota, period):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


def test_cgroup_v2_quota_in_cores(tmp_path):
    assert cpus.cgroup_cpu_limit(_cgroup_v2(tmp_path, "150000 100000\n")) == 1.5


def test_cgroup_v2_without_quota(tmp_path):
    assert cpus.cgroup_cpu_limit(_cgroup_v2(tmp_path, "max 100000\n")) is None


def test_cgroup_v1_quota_and_no_quota(tmp_path):
    assert cpus.cgroup_cpu_limit(_cgroup_v1(tmp_path, 50000, 100000)) == 0.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.cgroup_cpu_limit(tmp_path) is None


def test_no_cgroup_files(tmp_path):
    assert cpus.cgroup_cpu_limit(tmp_path) is None
    assert cpus.usable_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_quota_caps_affinity_rounded_up(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert cpus.usable_cpus(_cgroup_v2(tmp_path, "50000 100000")) == 1  # half a core: one thread
    assert cpus.usable_cpus(_cgroup_v2(tmp_path, "150000 100000")) == min(affinity, 2)
    assert cpus.usable_cpus(_cgroup_v2(tmp_path, "6400000 100000")) == affinity  # 64 cores: the mask wins


def test_prepare_threads_defaults_and_user_values():
    env: dict[str, str] = {}
    n = cpus.prepare_threads(None, environ=env)
    assert n == cpus.usable_cpus()
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", **{v: str(n) for v in cpus.THREAD_VARS}}

    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "7"}
    assert cpus.prepare_threads(None, environ=env) == 7  # the user's variables stay
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"

    env = {"OMP_NUM_THREADS": "7"}
    assert cpus.prepare_threads(3, environ=env) == 3  # an explicit --threads wins
    assert [env[v] for v in cpus.THREAD_VARS] == ["3", "3", "3"]


_PROBE = (
    "import sys; from cellscale.cli import main; main(sys.argv[1:]); "
    "import os, torch; print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])"
)


def _probe(*argv: str) -> list[str]:
    """torch's thread count and the wait policy after ``cellscale ARGV`` in a fresh process
    whose environment sets neither."""
    env = {k: v for k, v in os.environ.items() if k not in (*cpus.THREAD_VARS, "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], env=env, capture_output=True,
                         text=True, check=True).stdout
    return out.strip().splitlines()[-1].split()


@pytest.mark.parametrize("argv", [("--threads", "1", "ladder"), ("ladder", "--threads", "1")])
def test_cli_threads_flag_reaches_torch(argv):
    assert _probe(*argv) == ["1", "PASSIVE"]


def test_cli_default_is_the_usable_cpus():
    assert _probe("ladder") == [str(cpus.usable_cpus()), "PASSIVE"]
