"""Logging: the console (and a run's log file), progress bars only on a terminal, and under
torchrun warnings only from ranks other than 0.
"""
from __future__ import annotations

import logging
import sys
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
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
        console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    if log_file is not None:
        add_log_file(log_file)
    for noisy in ("matplotlib", "PIL", "h5py", "urllib3", "tensorboard", "tensorboardX", "faiss",
                  "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    """tqdm bars only on a terminal and without --quiet."""
    return not quiet and sys.stderr.isatty()
