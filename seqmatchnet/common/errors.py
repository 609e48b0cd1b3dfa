"""The one error type of bad input: its message is printed on one line and the mode exits 1."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; main() prints it as one line, without a traceback."""
