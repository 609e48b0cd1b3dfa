"""SeqMatchNet command line: ``python main.py --mode MODE ...`` (see README).

This file only dispatches: it reads ``--mode`` and hands the rest of the command line to that
mode's entry in the mode table (``seqmatchnet/cli/modes.py``). Nothing imports it.
"""
from __future__ import annotations

import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads made small
# training steps up to 50x slower. Must be set before torch loads; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from seqmatchnet.cli.modes import MODES, split_mode  # noqa: E402  (after the environment)


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
        return mode.run(rest)
    except BrokenPipeError:  # `| head -1` closed the output (e.g. during --help): not an error
        from seqmatchnet.cli.entry import closed_pipe
        return closed_pipe()


if __name__ == "__main__":
    sys.exit(main())
