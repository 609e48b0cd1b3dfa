"""Logging: the console (and a run's log file), progress (bars on a terminal, a line at a steady
interval otherwise), and under torchrun warnings only from ranks other than 0.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from seqmatchnet.common import distributed

# ---------------------------------------------------------------- logging

def setup_logging(log_file: Path | None = None, quiet: bool = False, debug: bool = False) -> None:
    """Console: INFO (WARNING with --quiet, DEBUG with --debug), short lines. File (optional): DEBUG
    with timestamps, including tracebacks."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.DEBUG)
    rank = distributed.rank()
    if rank:  # under torchrun, ranks other than 0 show only warnings and errors, on stderr, marked
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.DEBUG if debug else logging.WARNING)
        console.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
    else:
        console = ConsoleHandler(sys.stdout)
        console.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
        console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    if log_file is not None:
        add_log_file(log_file)
    for noisy in ("matplotlib", "PIL", "h5py", "urllib3", "tensorboard", "tensorboardX", "faiss",
                  "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class ConsoleHandler(logging.StreamHandler):
    """The console: a closed pipe (``| head -1``) ends the program, quietly (``cli/entry.py``),
    instead of logging's "--- Logging error ---" on every later line."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            raise  # noqa: PLE0704 (re-raises the error being handled)
        super().handleError(record)


def add_log_file(log_file: Path) -> None:
    """Log to ``log_file`` too (rank 0 only under torchrun: one log per run)."""
    if not distributed.is_main():
        return
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def progress_enabled(quiet: bool = False) -> bool:
    """Progress is shown without --quiet (``progress``: a bar on a terminal, lines otherwise)."""
    return not quiet


# seconds between progress lines when stderr is not a terminal (SEQMATCHNET_PROGRESS_SECONDS)
PROGRESS_INTERVAL_S = 30.0


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, initial: int = 0, **bar_options):
    """A tqdm bar on a terminal; otherwise a ``ProgressLines`` that prints one line to stderr every
    ``PROGRESS_INTERVAL_S`` seconds (under ``nohup`` or into a log). Either iterates ``iterable``
    and has ``update(n)`` and ``close()``; nothing is shown with ``disable`` or off rank 0."""
    from tqdm import tqdm

    disable = disable or not distributed.is_main()
    if disable or sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable,
                    initial=initial, **bar_options)
    try:
        seconds = float(os.environ.get("SEQMATCHNET_PROGRESS_SECONDS", PROGRESS_INTERVAL_S))
    except ValueError:
        seconds = PROGRESS_INTERVAL_S
    return ProgressLines(iterable, total, desc, unit, initial, seconds)


class ProgressLines:
    """Progress as a line every ``interval`` seconds on stderr (``desc: done/total unit (pct),
    elapsed, rate, left``), and a last line on closing when any was printed. The interval runs
    across loops (``last``: the time of the last line of any), so that a long epoch of short chunks
    still prints one line per interval."""

    last: float | None = None

    def __init__(self, iterable, total: int | None, desc: str, unit: str, initial: int,
                 interval: float) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.start, self.interval, self.printed = initial, initial, interval, 0
        self.t0 = time.monotonic()
        if ProgressLines.last is None:
            ProgressLines.last = self.t0
        self.closed, self.postfix = False, ""

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - ProgressLines.last >= self.interval:
            self._line(now)

    def set_postfix(self, **values) -> None:
        """Shown at the end of the next line (as tqdm's ``set_postfix``)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """A last line (``done``) when any line was printed; once."""
        if self.printed and not self.closed:
            stopped = self.total and self.n < self.total
            self._line(time.monotonic(), "stopped" if stopped else "done")
        self.closed = True

    def _line(self, now: float, end: str = "") -> None:
        elapsed = now - self.t0
        rate = (self.n - self.start) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        text = f"{self.desc}: {done} {self.unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += f", {elapsed:.0f} s, {rate:.3g} {self.unit}/s"
        if self.postfix:
            text += f", {self.postfix}"
        if end:
            text += f", {end}"
        elif self.total and rate > 0:
            text += f", about {(self.total - self.n) / rate:.0f} s left"
        print(text, file=sys.stderr, flush=True)
        self.printed += 1
        ProgressLines.last = now
