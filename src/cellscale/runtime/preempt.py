"""Stopping cleanly on SIGTERM or SIGINT: Slurm preemption, a spot reclaim, ``ray cancel``, Ctrl-C.

Inside :func:`stop_on_signals`, SIGTERM and SIGINT only set a flag. Nothing more is done in the
handler because a signal can arrive anywhere: in the middle of a checkpoint write, or inside
torch. The training loop reads the flag at each step boundary. When the flag is set, the loop
writes a checkpoint at that step with ``status: interrupted`` in its loop state, and then
raises :class:`Preempted`. A sweep reads the same flag before each run. The CLI turns
:class:`Preempted` into one line and exit code 128 + the signal: 143 for SIGTERM, 130 for
SIGINT. Torch-free, so that the CLI can import it at start-up.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

__all__ = ["Preempted", "StopFlag", "stop_on_signals", "hold_stop_flag", "ignore_stop_signals", "HANDLED"]

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Preempted(KeyboardInterrupt):
    """A run or sweep stopped by a signal after saving its work.

    It subclasses KeyboardInterrupt, not Exception, so that an ``except Exception`` lets it
    through as it lets Ctrl-C through. For example, a sweep records a run that raises as
    failed, but must not record one that was told to stop."""

    def __init__(self, signum: int, detail: str) -> None:
        self.signum, self.detail = int(signum), detail
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}: {detail}; "
                         "rerun the same command to resume")

    def __reduce__(self) -> tuple:
        # pickled by its own arguments (Ray ships a task's exception to the driver)
        return (type(self), (self.signum, self.detail))

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal (143 for SIGTERM, 130 for SIGINT)."""
        return 128 + self.signum


@dataclass
class StopFlag:
    """Set by the signal handlers, read at step boundaries and between a sweep's runs."""

    signum: int = 0  # the latest signal received; 0 means none

    def handler(self, signum: int, frame: FrameType | None) -> None:
        # only an assignment: the interrupted code (a checkpoint write, say) goes on unharmed
        self.signum = signum


_active: StopFlag | None = None


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Within the block, SIGTERM and SIGINT set the returned flag instead of ending the process.

    The handlers that were there before come back at the end of the block. A nested block,
    such as a sweep's run, shares the flag of the outer block. A signal that was ignored
    stays ignored: a background job's SIGINT, for example. Outside the main thread, Python
    lets no code set handlers, so there the flag is never set."""
    global _active
    if _active is not None:
        yield _active
        return
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {}
    for sig in HANDLED:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, flag.handler)
    _active = flag
    try:
        yield flag
    finally:
        _active = None
        for sig, handler in previous.items():
            # None: a handler set from C, which Python cannot put back; the default is the closest
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def hold_stop_flag() -> StopFlag:
    """For a process whose whole life is runs (a local sweep's worker): the handlers of
    :func:`stop_on_signals` from now on, with one flag that every later block shares. A signal
    between two runs is then kept for the next one instead of ending the process. Main thread only."""
    global _active
    if _active is None:
        flag = StopFlag()
        for sig in HANDLED:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, flag.handler)
        _active = flag
    return _active


def ignore_stop_signals() -> None:
    """Ignore SIGTERM and SIGINT from now on. The CLI calls this once its work is saved and it
    is on its way out. Under torchrun, a rank that exits makes torchrun send SIGTERM to the
    others, and that second signal must not turn their exit code 143 into a death by signal."""
    for sig in HANDLED:
        signal.signal(sig, signal.SIG_IGN)
