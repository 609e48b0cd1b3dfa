"""SeqMatchNet command line: ``python main.py --mode MODE ...`` (see README).

This file only dispatches: it reads ``--mode`` (the modes are the table of
``seqmatchnet/cli/modes.py``) and hands the rest of the command line to that mode's entry,
``seqmatchnet.cli.<mode>.main``. Nothing imports it.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

# Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads made small
# training steps up to 50x slower. Must be set before torch loads; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from seqmatchnet.cli.modes import MODES, split_mode  # noqa: E402  (after the environment)


def entry(name: str) -> Callable[[list[str]], int]:
    """The ``main(argv)`` of mode ``name``, imported when that mode runs (``--mode compare`` loads
    no torch)."""
    if name == "train":
        from seqmatchnet.cli import train as mode
    elif name == "test":
        from seqmatchnet.cli import test as mode
    elif name == "localize":
        from seqmatchnet.cli import localize as mode
    elif name == "extract":
        from seqmatchnet.cli import extract as mode
    elif name == "prepare":
        from seqmatchnet.cli import prepare as mode
    elif name == "demo":
        from seqmatchnet.cli import demo as mode
    elif name == "compare":
        from seqmatchnet.cli import compare as mode
    else:
        raise KeyError(f"no entry for --mode {name}")
    return mode.main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name, rest = split_mode(argv)
    mode = MODES.get(name)
    if mode is None:        # the full parser names the choices
        from seqmatchnet.cli.entry import error
        from seqmatchnet.cli.options import build_parser
        from seqmatchnet.common.errors import UserError
        try:
            build_parser().parse_args(argv)
        except UserError as exc:
            error(exc)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not mode.distributed:
        served = " and ".join(n for n, m in MODES.items() if m.distributed)
        print(f"error: --mode {name} runs in one process: start it with python, not torchrun "
              f"(torchrun serves --mode {served})", file=sys.stderr)
        return 2
    try:
        return entry(name)(rest)
    except BrokenPipeError:  # `| head -1` closed the output (e.g. during --help): not an error
        from seqmatchnet.cli.entry import closed_pipe
        return closed_pipe()


if __name__ == "__main__":
    sys.exit(main())
