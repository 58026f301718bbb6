"""The error boundary of every entry point in ``run_scripts/``.

A user error (a bad config key, a missing or unreadable file, a value out of range, a
refused checkpoint) is one line on stderr naming the input, and exit status 2; anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

#: Exceptions that mean "the input is wrong", not "the code is wrong". ConfigError and
#: CheckpointError are ValueErrors; OSError covers missing, unreadable and unwritable paths.
USER_ERRORS = (ValueError, OSError)

#: Exit status of a refused input (argparse uses 2 for a bad command line as well).
USER_ERROR_STATUS = 2

T = TypeVar("T")


def user_error_boundary(script: str, main: Callable[[], T]) -> T:
    """Run ``main()``; a user error becomes ``<script>: <message>`` on stderr and exit 2."""
    try:
        return main()
    except USER_ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{script}: {message}", file=sys.stderr)
        raise SystemExit(USER_ERROR_STATUS) from err
