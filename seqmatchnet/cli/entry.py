"""The one entry shell of every mode: option parsers that fail on one line, and errors turned
into exit codes (0 done, 1 bad data or a failed step, 2 bad options, 130 interrupted, 141 output
into a closed pipe, e.g. ``| head -1``: not an error, nothing printed).

``main.py`` runs the shared-option modes through ``run_guarded``; the modes with their own
parser (extract, prepare, demo, compare) build it from ``OneLineParser`` and call
``run_own_mode``. The messages are printed once, here, always on one line.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable

from seqmatchnet.common.errors import UserError

log = logging.getLogger("seqmatchnet")


OS_ERROR_HINT = ("check that the paths given exist and are writable and that the disk has space "
                 "(--debug shows where it happened)")


# 128 + SIGPIPE: what a shell reports for a command that a closed pipe stopped (| head -1)
CLOSED_PIPE = 141


def closed_pipe() -> int:
    """Output went into a closed pipe (``main.py ... | head -1``): not an error to report. The
    console streams are pointed at /dev/null so that nothing more (not the interpreter's last
    flush either) fails; returns ``CLOSED_PIPE``."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError, AttributeError):    # a stream without a file descriptor
            pass
    os.close(devnull)
    return CLOSED_PIPE


def one_line(exc: BaseException | str) -> str:
    """A message on one line (messages quoted from libraries may hold line breaks)."""
    text = exc if isinstance(exc, str) else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def error(message: BaseException | str) -> None:
    """Print ``error: <message>`` on one line to stderr."""
    print(f"error: {one_line(message)}", file=sys.stderr)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each default once: argparse's ``(default: X)``, left out where the default is
    None, False or empty (the option's help then says what leaving it out does)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises UserError (one ``error:`` line naming the mode's ``--help``) instead of
    printing the usage and exiting; every default is shown once in ``--help``
    (``HelpFormatter``)."""

    def __init__(self, *args, mode: str, **kwargs) -> None:
        kwargs.setdefault("prog", f"main.py --mode {mode}")
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.mode = mode

    def error(self, message: str):
        where = f"--mode {self.mode} --help" if self.mode else "--help"
        raise UserError(f"{message} (see python main.py {where})")


def parse_own_options(parse: Callable[[list[str]], argparse.Namespace], argv: list[str]):
    """``(options, None)``, or ``(None, exit code)`` after a one-line ``error:`` for bad options (2)
    or after ``--help`` (0)."""
    try:
        return parse(list(argv)), None
    except UserError as exc:
        error(exc)
        return None, 2
    except SystemExit as exc:          # --help
        return None, int(exc.code or 0)


def run_guarded(work: Callable[[], int | None], *, os_error: Callable[[OSError], str] | None = None,
                interrupted: str = "interrupted",
                more: tuple[tuple[type[BaseException], Callable[[BaseException], str]], ...] = (),
                trace: bool = True) -> int:
    """Run ``work()`` and return its exit code (None: 0). A ``UserError`` prints its message and
    returns 1; an ``OSError`` the file system raised where no check foresaw it prints
    ``os_error(exc)`` (default: the error and ``OS_ERROR_HINT``) and returns 1; each ``(type,
    message)`` of ``more`` does the same for its type; Ctrl-C prints ``interrupted`` and returns
    130; a closed pipe returns 141 silently (``closed_pipe``). With ``trace`` tracebacks are
    logged at debug level (``--debug`` shows them)."""
    def debug_trace() -> None:
        if trace:
            log.debug("traceback:\n%s", traceback.format_exc())

    try:
        code = work()
    except UserError as exc:
        debug_trace()
        error(exc)
        return 1
    except BrokenPipeError:
        return closed_pipe()
    except OSError as exc:
        debug_trace()
        error(os_error(exc) if os_error is not None else f"{one_line(exc)}: {OS_ERROR_HINT}")
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except BaseException as exc:
        for kind, message in more:
            if isinstance(exc, kind):
                debug_trace()
                error(message(exc))
                return 1
        raise
    return 0 if code is None else int(code)


def run_own_mode(parse: Callable[[list[str]], argparse.Namespace], argv: list[str],
                 work: Callable[[argparse.Namespace], int | None], **guard) -> int:
    """A mode with its own parser: parse ``argv`` (2 on bad options, 0 after ``--help``), then
    ``run_guarded(lambda: work(options), **guard)`` (no traceback logging: these modes have no
    --debug)."""
    guard.setdefault("trace", False)
    opt, code = parse_own_options(parse, argv)
    if opt is None:
        return code
    return run_guarded(lambda: work(opt), **guard)
