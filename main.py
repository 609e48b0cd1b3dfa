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
DISTRIBUTED = {"train", "test"}     # the modes that run under torchrun (docs/torchrun.md)


def mode_function(mode: str):
    module, name = MODES[mode].split(":")
    return getattr(importlib.import_module(module), name)


def run_mode(mode: str, argv: list[str]) -> int:
    """Parse the shared options, set up logging and run ``mode``; errors become exit codes."""
    import distributed
    from entry import error, one_line, run_guarded
    from options import parse_options
    from utils import UserError, get_device, setup_logging

    started = time.time()
    try:
        opt = parse_options(argv)
    except UserError as exc:
        error(exc)
        return 2
    def start() -> None:
        distributed.init(cuda=get_device(opt.nocuda, opt.device).type == "cuda")

    code = run_guarded(start)
    if code:
        return code
    setup_logging(quiet=opt.quiet, debug=opt.debug)
    log.debug("argv: %s", sys.argv)

    def work() -> None:
        function = mode_function(mode)
        # ranks other than 0 print nothing on stdout (their warnings and errors go to stderr)
        out = sys.stdout if distributed.is_main() else open(os.devnull, "w")
        with contextlib.redirect_stdout(out):
            function(opt, argv) if mode == "train" else function(opt)

    collective = (distributed.dist.DistError,       # a collective inside torch (DDP's gradient sum) failed
                  lambda exc: f"rank {distributed.rank()}: a collective failed: another process of the job ended "
                              f"or did not answer ({one_line(exc)[:200]})")
    code = run_guarded(work, more=(collective,))
    log.debug("finished in %.1f s", time.time() - started)
    return code


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
        from entry import error
        from options import build_parser
        from utils import UserError
        try:
            build_parser().parse_args(argv)
        except UserError as exc:
            error(exc)
            return 2
    try:
        return run_mode(known.mode, argv)
    finally:    # under torchrun: leave the process group, whatever happened
        import distributed
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
