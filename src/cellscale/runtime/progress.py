"""Progress for long work: a bar for the sweep and one for the run in flight, with ETAs."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


@contextlib.contextmanager
def set_quiet(quiet: bool = True) -> Iterator[None]:
    """Within the block, nothing printed through ``console`` appears (``--quiet``): no status
    lines, no per-run lines, no bars. The previous setting is restored afterwards."""
    before = console.quiet
    console.quiet = quiet
    try:
        yield
    finally:
        console.quiet = before


def score_line(result: dict[str, Any]) -> str:
    """``val X  test Y`` of a finished run: MSEs, or bits per masked gene (and the MSEs) for a
    likelihood objective."""
    text = f"val {result['best_val_mse']:.4f}  test {result['test_mse']:.4f}"
    if result.get("loss_unit") == "bits":
        text = (f"val {result['best_val_loss']:.4f} bits  test {result['test_loss']:.4f} bits  "
                f"(MSE {text})")
    return text


def _loss_text(info: dict[str, Any]) -> str:
    """The step's loss for a progress line; empty before the run's first loss is read."""
    return "" if info.get("loss") is None else f" loss {info['loss']:.4f}"


def _bars(*middle: Any, transient: bool) -> Progress:
    """Rich bars on stderr: description, bar, done/total, ``middle``, elapsed time and the ETA."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *middle,
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                    transient=transient)


class _Live:
    """Bars (``_bar``, None off a terminal) shown for the length of a ``with`` block."""

    _bar: Progress | None = None

    def __enter__(self):
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()


class SweepProgress(_Live):
    """Rich progress bars on stderr; plain lines when stderr is not a terminal (CI logs)."""

    def __init__(self, n_runs: int, *, enabled: bool = True):
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.n_runs = n_runs
        self.done = 0
        self._bar = None
        if self.live:
            self._bar = _bars(TextColumn("{task.fields[info]}"), transient=False)
            self._sweep = self._bar.add_task("runs", total=n_runs, info="")
            self._run = None
        self._parallel: dict[str, Any] = {}  # run id -> its bar or its last plain quarter (runs in parallel)

    def _say(self, text: str) -> None:
        if self.enabled:
            console.print(text, highlight=False)

    def say(self, text: str) -> None:
        """One line of the sweep's own (a plain line in CI logs too)."""
        self._say(text)

    def run_skipped(self, spec: Any) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.advance(self._sweep)
        self._say(f"[{self.done}/{self.n_runs}] {spec.run_id}: already finished, skipped")

    def run_started(self, spec: Any) -> Callable[[dict[str, Any]], None] | None:
        if not self.enabled:
            return None
        if self._bar is None:
            last = {"pct": -1}

            def plain(info: dict[str, Any]) -> None:
                pct = int(100 * info["step"] / info["total"])
                if pct // 25 != last["pct"] // 25:
                    last["pct"] = pct
                    self._say(f"    {spec.run_id}: step {info['step']}/{info['total']}{_loss_text(info)}")

            return plain
        if self._run is not None:
            self._bar.remove_task(self._run)
        self._run = self._bar.add_task(f"  {spec.run_id}", total=None, info="")

        first: dict[str, float] = {}

        def hook(info: dict[str, Any]) -> None:
            # cells/s over this process's steps (a resumed run starts its clock anew)
            now = time.perf_counter()
            first.setdefault("t", now)
            first.setdefault("step", info["step"])
            rate = (info["step"] - first["step"]) * info.get("batch_size", 0) / max(now - first["t"], 1e-9)
            speed = f"  {rate:,.0f} cells/s" if info["step"] > first["step"] else ""
            self._bar.update(self._run, completed=info["step"], total=info["total"],
                             info=f"{_loss_text(info).strip()}{speed}")

        return hook

    def run_progress(self, spec: Any, step: int, total: int, loss: float | None) -> None:
        """Where a run in another process stands (a local pool): a bar per run on a terminal,
        else a line at each quarter of its steps."""
        if not self.enabled or total <= 0:
            return
        info = {"step": step, "total": total, "loss": loss}
        if self._bar is None:
            quarter = int(4 * step / total)
            if self._parallel.get(spec.run_id) != quarter:
                self._parallel[spec.run_id] = quarter
                self._say(f"    {spec.run_id}: step {step}/{total}{_loss_text(info)}")
            return
        if spec.run_id not in self._parallel:
            self._parallel[spec.run_id] = self._bar.add_task(f"  {spec.run_id}", total=total, info="")
        self._bar.update(self._parallel[spec.run_id], completed=step, total=total, info=_loss_text(info).strip())

    def run_finished(self, spec: Any, result: dict[str, Any]) -> None:
        task = self._parallel.pop(spec.run_id, None)
        if self._bar is not None and task is not None:
            self._bar.remove_task(task)
        self.done += 1
        if self._bar is not None:
            self._bar.advance(self._sweep)
        status = result.get("status")
        if status == "ok":
            msg = f"{score_line(result)}  {result['wall_seconds']:.0f}s"
        else:
            msg = f"{status}: {result.get('error')}"
        self._say(f"[{self.done}/{self.n_runs}] {spec.run_id} ({result.get('params', '?')} params): {msg}")


class ResampleProgress(_Live):
    """Where the report's fits stand, fed ``(done, total)`` for each batch of bootstrap resamples
    (``cellscale.fit.bootstrap.on_resamples``): a bar with an ETA per batch on a terminal, else a
    line when a batch is half done and when it is done, once it has taken ``PLAIN_SECONDS`` (the
    demo's batches take 2-4 s and say nothing; the 8k-PBMC data axis's take minutes)."""

    PLAIN_SECONDS = 10.0

    def __init__(self, label: str = "report: fitting", *, enabled: bool = True):
        self.label, self.enabled = label, enabled
        self._bar = None
        if enabled and sys.stderr.isatty():
            self._bar = _bars(transient=True)
        self._task = None
        self._batch, self._last, self._half, self._first = 0, (0, 0), False, 0
        self._t0 = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if done <= self._last[0] or total != self._last[1]:  # a new batch
            self._batch += 1
            # the clock starts at the batch's first chunk: its rate is read over the chunks after it
            self._half, self._t0, self._first = False, time.perf_counter(), done
            if self._bar is not None:
                description = f"{self.label}, batch {self._batch} of resamples"
                if self._task is None:
                    self._task = self._bar.add_task(description, total=total)
                else:
                    self._bar.reset(self._task, total=total, description=description)
        self._last = (done, total)
        if self._bar is not None:
            self._bar.update(self._task, completed=done)
            return
        spent = time.perf_counter() - self._t0
        if spent >= self.PLAIN_SECONDS and (done == total or (not self._half and 2 * done >= total)):
            self._half = self._half or 2 * done >= total
            eta = "" if done == total else f", about {spent * (total - done) / max(done - self._first, 1):.0f} s to go"
            console.print(f"{self.label}: {done}/{total} resamples of batch {self._batch} in {spent:.0f} s{eta}",
                          highlight=False)
