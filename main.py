"""SeqMatchNet command line: ``python main.py --mode MODE ...`` (see README).

This file only dispatches: it reads ``--mode``, hands the command line to that
mode's function from ``MODES`` and turns errors into exit codes. Nothing
imports it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import time
import traceback

# Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads made small
# training steps up to 50x slower. Must be set before torch loads; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("seqmatchnet")

# mode -> "module:function". Modes in OWN_PARSER read the rest of the command line themselves
# (``function(argv) -> exit code``); the others get the parsed shared options (``function(opt)``,
# train also the command line for its resume hint).
MODES = {
    "train": "train:train",
    "test": "test:run_test",
    "localize": "localize:run_localize",
    "extract": "extract:run_extract",
    "prepare": "prepare:run_prepare",
    "demo": "demo:run_demo",
    "compare": "report:main_compare",
}
OWN_PARSER = {"extract", "prepare", "demo", "compare"}
DISTRIBUTED = {"train", "test"}     # the modes that run under torchrun (README, "More than one process")


def mode_function(mode: str):
    module, name = MODES[mode].split(":")
    return getattr(importlib.import_module(module), name)


def one_line(exc: BaseException) -> str:
    """An error message on one line (messages quoted from libraries may hold line breaks)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def run_mode(mode: str, argv: list[str]) -> int:
    """Parse the shared options, set up logging and run ``mode``; errors become exit codes."""
    import distributed
    from options import parse_options
    from utils import UserError, get_device, setup_logging

    started = time.time()
    try:
        opt = parse_options(argv)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    try:
        distributed.init(cuda=get_device(opt.nocuda, opt.device).type == "cuda")
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    setup_logging(quiet=opt.quiet, debug=opt.debug)
    log.debug("argv: %s", sys.argv)
    try:
        function = mode_function(mode)
        # ranks other than 0 print nothing on stdout (their warnings and errors go to stderr)
        out = sys.stdout if distributed.is_main() else open(os.devnull, "w")
        with contextlib.redirect_stdout(out):
            function(opt, argv) if mode == "train" else function(opt)
    except UserError as exc:
        log.debug("traceback:\n%s", traceback.format_exc())
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:          # the file system refused something the checks above did not foresee
        log.debug("traceback:\n%s", traceback.format_exc())
        print(f"error: {one_line(exc)}: check that the paths given exist and are writable and that the disk has "
              "space (--debug shows where it happened)", file=sys.stderr)
        return 1
    except distributed.dist.DistError as exc:    # a collective inside torch (DDP's gradient sum) failed
        log.debug("traceback:\n%s", traceback.format_exc())
        print(f"error: rank {distributed.rank()}: a collective failed: another process of the job ended or did "
              f"not answer ({one_line(exc)[:200]})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    log.debug("finished in %.1f s", time.time() - started)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--mode", default="train")
    known, rest = mode.parse_known_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and known.mode in MODES and known.mode not in DISTRIBUTED:
        print(f"error: --mode {known.mode} runs in one process: start it with python, not torchrun "
              f"(torchrun serves --mode {' and '.join(sorted(DISTRIBUTED))})", file=sys.stderr)
        return 2
    if known.mode in OWN_PARSER:
        return mode_function(known.mode)(rest)
    if known.mode not in MODES:     # the full parser names the choices
        from options import build_parser
        build_parser().parse_args(argv)
    try:
        return run_mode(known.mode, argv)
    finally:    # under torchrun: leave the process group, whatever happened
        import distributed
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
