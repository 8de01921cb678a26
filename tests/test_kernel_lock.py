"""An interrupted kernel build never hangs later runs: a stale build lock is found and removed,
a live build is waited for a bounded time (then SDPA, with one line saying why), and two
Python environments sharing the kernel cache keep a build each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cellscale import kernels
from cellscale.kernels import lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _fake_lock(build: Path, *, owner: int | None, age_s: float = 0.0) -> Path:
    build.mkdir(parents=True, exist_ok=True)
    torch_lock = build / lock.TORCH_LOCK
    torch_lock.touch()
    if age_s:
        then = time.time() - age_s
        os.utime(torch_lock, (then, then))
    if owner is not None:
        (build / lock.OWNER_FILE).write_text(json.dumps({"pid": owner, "host": os.uname().nodename,
                                                          "started": time.time()}))
    return torch_lock


def _say(lines: list[str]):
    return lines.append


def test_a_lock_whose_owner_died_is_removed(tmp_path: Path):
    build = tmp_path / "build"
    torch_lock = _fake_lock(build, owner=_dead_pid())
    said: list[str] = []
    t = time.monotonic()
    lock.clear_stale_torch_lock(build, lock.read_owner(build), deadline=time.monotonic() + 30, say=_say(said))
    assert time.monotonic() - t < 5 and not torch_lock.exists()
    assert len(said) == 1 and "removing the kernel build lock" in said[0] and "which is gone" in said[0]


def test_a_lock_is_kept_while_its_owner_lives_or_a_compiler_works_there(tmp_path: Path):
    build = tmp_path / "build"
    torch_lock = _fake_lock(build, owner=os.getppid())
    assert lock.stale_reason(build, lock.read_owner(build)) is None  # alive, and young
    _fake_lock(build, owner=_dead_pid())
    # an orphaned ninja (its Python parent killed) still building in the directory
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=build)
    try:
        for _ in range(100):
            if worker.pid in lock.busy_pids(build):
                break
            time.sleep(0.05)
        assert worker.pid in lock.busy_pids(build)
        assert lock.stale_reason(build, lock.read_owner(build)) is None
    finally:
        worker.kill()
        worker.wait()
    assert "which is gone" in lock.stale_reason(build, lock.read_owner(build))
    assert torch_lock.exists()  # stale_reason only looks


def test_an_old_lock_of_an_unknown_owner_is_stale(tmp_path: Path):
    build = tmp_path / "build"
    _fake_lock(build, owner=None)
    assert lock.stale_reason(build, None) is None  # a build of a cellscale before lock.owner, maybe
    _fake_lock(build, owner=None, age_s=lock.STALE_AGE_S + 60)
    assert "min old" in lock.stale_reason(build, None)


def test_a_live_lock_is_waited_for_a_bounded_time(tmp_path: Path):
    build = tmp_path / "build"
    _fake_lock(build, owner=os.getppid())
    said: list[str] = []
    t = time.monotonic()
    with pytest.raises(lock.LockTimeout, match="still held"):
        lock.clear_stale_torch_lock(build, lock.read_owner(build), deadline=time.monotonic() + 1.0, say=_say(said))
    assert time.monotonic() - t < 5
    assert len(said) == 1 and said[0].startswith("cellscale: waiting for pid")


HOLD_FLOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def _hold_flock(build: Path) -> subprocess.Popen:
    build.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FLOCK, str(build / lock.FLOCK_FILE)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_another_live_build_is_waited_for_then_given_up(tmp_path: Path):
    build = tmp_path / "build"
    holder = _hold_flock(build)
    said: list[str] = []
    try:
        t = time.monotonic()
        with pytest.raises(lock.LockTimeout, match="still building the kernel"):
            with lock.build_lock(build, timeout=1.0, say=_say(said)):
                pass
        assert time.monotonic() - t < 5
        assert len(said) == 1 and "waiting for" in said[0]
    finally:
        holder.kill()
        holder.wait()
    with lock.build_lock(build, timeout=1.0, say=_say(said)):  # the holder died: the flock went with it
        assert lock.read_owner(build)["pid"] == os.getpid()
    assert lock.read_owner(build) is None


def test_a_run_falls_back_to_sdpa_with_one_line_when_the_build_stays_locked(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CELLSCALE_KERNEL_CACHE", str(tmp_path / "cache"))
    holder = _hold_flock(kernels.cache_dir())  # the directory the child process will use
    code = "from cellscale import kernels; print(kernels.available()); print(kernels.unavailable_reason())"
    env = {**os.environ, "CELLSCALE_KERNEL_WAIT": "1"}
    env.pop("CELLSCALE_KERNELS", None)
    try:
        t = time.monotonic()
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        took = time.monotonic() - t
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "False" and "still building the kernel" in r.stdout
    assert took < 60
    assert "this run uses SDPA's slower math path" in r.stderr


def test_each_python_environment_has_its_own_build_dir(monkeypatch):
    here = kernels.cache_dir()
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    assert kernels.cache_dir() != here and kernels.cache_dir().parent == here.parent


def _wait_for(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["process", "group"])
def test_a_build_killed_midway_does_not_hang_the_next_one(tmp_path: Path, kill: str):
    """kill -9 a real first-use build (the Python process alone: its ninja and compiler go on,
    orphaned; or its whole process group, as a lost terminal does), then build again: it
    finishes, or falls back, in bounded time. A build takes ~1 min here."""
    env = {**os.environ, "CELLSCALE_KERNEL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("CELLSCALE_KERNELS", None)
    cmd = [sys.executable, "-m", "cellscale.kernels"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    locks = lambda: list((tmp_path / "cache").glob(f"*/{lock.TORCH_LOCK}"))  # noqa: E731
    try:
        assert _wait_for(lambda: locks() and lock.busy_pids(locks()[0].parent), 120), "the build never started"
        time.sleep(1.0)  # the compiler at work
        if kill == "group":
            os.killpg(first.pid, signal.SIGKILL)
        else:
            first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    assert locks(), "the killed build should leave torch's lock behind"
    t = time.monotonic()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - t
    assert again.returncode == 0, again.stderr  # built (or found built by the orphaned compiler)
    assert "fused CPU attention ready" in again.stdout
    assert "removing the kernel build lock" in again.stderr and not locks()
    assert took < 400, took
