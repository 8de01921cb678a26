"""A kernel build lock that a killed build cannot leave behind.

torch's ``cpp_extension.load`` guards a build directory with a plain ``lock`` file: created
when the build starts, removed when it ends, and waited on forever by everyone else while it
exists. A build killed with -9 (or a lost terminal) never removes it, so every later run sleeps
silently. Around torch's lock, cellscale therefore takes its own:

* ``build.flock``, an ``flock`` that the kernel drops when its process dies, however it dies:
  cellscale processes building into one directory take turns on it;
* ``lock.owner`` beside torch's ``lock``: the pid and host of the process holding it, for the
  stale test below and for the line a waiting process prints.

Holding ``build.flock``, a torch ``lock`` is stale once no process works in the build
directory (ninja and the compiler run there, and outlive a killed parent: they finish or fail on
their own) and its owner is a dead process of this host, or, with no owner known, it is older
than :data:`STALE_AGE_S`. Every wait is bounded (:class:`LockTimeout`), and announced once.

Imports only the standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the owner file and the age test still apply
    fcntl = None  # type: ignore[assignment]

TORCH_LOCK = "lock"  # the name torch.utils.cpp_extension gives its FileBaton
OWNER_FILE = "lock.owner"
FLOCK_FILE = "build.flock"
STALE_AGE_S = 300.0  # no owner known (a cellscale before this lock): older than any build
POLL_S = 0.5


class LockTimeout(RuntimeError):
    """The build directory stayed locked by a live build for longer than the wait allowed."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def busy_pids(build: Path) -> list[int]:
    """Processes whose working directory is ``build``: ninja and the compiler of a build, which
    keep running (orphaned) after their Python parent is killed. Empty without /proc."""
    target = os.path.realpath(build)
    found = []
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return []
    for name in entries:
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:  # gone, or not ours to look at
            continue
        if cwd == target and int(name) != os.getpid():
            found.append(int(name))
    return found


def read_owner(build: Path) -> dict | None:
    try:
        owner = json.loads((build / OWNER_FILE).read_text())
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def write_owner(build: Path) -> None:
    (build / OWNER_FILE).write_text(json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))


def remove_owner(build: Path) -> None:
    with contextlib.suppress(OSError):
        (build / OWNER_FILE).unlink()


def _owner_text(owner: dict | None) -> str:
    if owner is None:
        return "an unknown process"
    return f"pid {owner['pid']} on {owner.get('host', '?')}"


def stale_reason(build: Path, owner: dict | None, *, now: float | None = None) -> str | None:
    """Why torch's lock in ``build`` is stale (None while it may still be in use or is absent).
    ``owner``: the ``lock.owner`` read before this process took the build lock."""
    lock = build / TORCH_LOCK
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    if busy_pids(build):  # an orphaned ninja or compiler is still writing there
        return None
    if owner is not None and owner.get("host") == socket.gethostname() and owner["pid"] != os.getpid():
        if not pid_alive(owner["pid"]):
            return f"left by pid {owner['pid']}, which is gone"
    if age > STALE_AGE_S:
        return f"{age / 60:.0f} min old, and no process is building there"
    return None


def clear_stale_torch_lock(build: Path, owner: dict | None, *, deadline: float,
                           say: Callable[[str], None]) -> None:
    """Return once torch's lock in ``build`` is gone: removed when stale, else waited for until
    ``deadline`` (time.monotonic()), then LockTimeout."""
    lock = build / TORCH_LOCK
    told = False
    while lock.exists():
        reason = stale_reason(build, owner)
        if reason is not None:
            say(f"cellscale: removing the kernel build lock {lock} ({reason})")
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            return
        if time.monotonic() > deadline:
            raise LockTimeout(f"the kernel build lock {lock} is still held (by {_owner_text(owner)}, or an "
                              "interrupted build's compiler)")
        if not told:
            told = True
            busy = busy_pids(build)
            who = f"an earlier build's compiler (pid {busy[0]})" if busy else _owner_text(owner)
            say(f"cellscale: waiting for {who} to finish with the kernel build lock {lock}")
        time.sleep(POLL_S)


def _acquire_flock(fd: int, build: Path, *, deadline: float, say: Callable[[str], None]) -> None:
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if time.monotonic() > deadline:
            raise LockTimeout(f"another process ({_owner_text(read_owner(build))}) is still building the "
                              f"kernel in {build}")
        if not told:
            told = True
            say(f"cellscale: waiting for {_owner_text(read_owner(build))}, which is building the kernel in {build}")
        time.sleep(POLL_S)


def _open_flock(build: Path) -> int | None:
    """The lock file's descriptor; None where it cannot be had (a read-only cache, no flock)."""
    if fcntl is None:
        return None
    try:
        return os.open(build / FLOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None


@contextlib.contextmanager
def build_lock(build: Path, *, timeout: float, say: Callable[[str], None]) -> Iterator[None]:
    """Hold ``build`` for one ``cpp_extension.load``: cellscale's flock taken (waiting at most
    ``timeout`` seconds in all), a stale torch lock removed, this process named the owner.
    LockTimeout when a live build keeps it longer."""
    deadline = time.monotonic() + timeout
    fd = _open_flock(build)
    try:
        if fd is not None:
            try:
                _acquire_flock(fd, build, deadline=deadline, say=say)
            except OSError:  # a filesystem without flock (ENOLCK): the torch lock's own tests only
                pass
        # the previous owner, read before this process names itself: is its lock stale?
        clear_stale_torch_lock(build, read_owner(build), deadline=deadline, say=say)
        with contextlib.suppress(OSError):
            write_owner(build)
        try:
            yield
        finally:
            remove_owner(build)
    finally:
        if fd is not None:
            os.close(fd)  # drops the flock
