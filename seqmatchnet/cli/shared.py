"""The entry of the modes that read the shared options (train, test, localize): parse the command
line, join the torchrun process group, set up logging, run the mode, and turn errors into exit
codes (``cli/entry.py``)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable

from seqmatchnet.cli.entry import error, one_line, run_guarded
from seqmatchnet.cli.options import parse_options
from seqmatchnet.common import distributed
from seqmatchnet.common.errors import UserError
from seqmatchnet.common.logs import setup_logging
from seqmatchnet.common.runtime import get_device

log = logging.getLogger("seqmatchnet")


def run_with_options(mode: str, argv: list[str],
                     work: Callable[[argparse.Namespace], object]) -> int:
    """Parse ``argv`` (the command line without ``--mode``) for ``mode`` and run ``work(options)``;
    the exit code: 0 done, 1 bad data or a failed step, 2 bad options, 130 interrupted."""
    started = time.time()
    try:
        opt = parse_options(argv, mode)
    except UserError as exc:
        error(exc)
        return 2
    try:
        code = run_guarded(lambda: _join_process_group(opt))
        if code:
            return code
        setup_logging(quiet=opt.quiet, debug=opt.debug)
        log.debug("argv: %s", sys.argv)
        code = run_guarded(lambda: _run_quietly_off_rank_0(work, opt),
                           more=(_collective_failure(),))
        log.debug("finished in %.1f s", time.time() - started)
        return code
    finally:    # under torchrun: leave the process group, whatever happened
        distributed.shutdown()


def _join_process_group(opt: argparse.Namespace) -> None:
    """Under torchrun: join the process group (on the device the options choose)."""
    distributed.init(cuda=get_device(opt.nocuda, opt.device).type == "cuda")


def _run_quietly_off_rank_0(work: Callable[[argparse.Namespace], object],
                            opt: argparse.Namespace) -> None:
    """Ranks other than 0 print nothing on stdout (their warnings and errors go to stderr)."""
    with open(os.devnull, "w") as devnull:
        with contextlib.redirect_stdout(sys.stdout if distributed.is_main() else devnull):
            work(opt)


def _collective_failure():
    """A collective inside torch (DDP's gradient sum) failed: one line naming this rank."""
    return (distributed.dist.DistError,
            lambda exc: f"rank {distributed.rank()}: a collective failed: another process of the "
                        f"job ended or did not answer ({one_line(exc)[:200]})")
