"""The one error type for bad input.

A :class:`UsageError` says that what the user gave cannot work: a config value, a path, a flag, a run that
does not fit another. The command line prints its message as one line and exits with status 2; any other
exception is a bug (or a failure of the machine) and keeps its traceback.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user, with a message that names the problem."""
