"""The error tree of `replay`.

    ReplayError                   anything the replay tool cannot do
    +-- NotAnEventLog             a file that is not a PWFL JSON event log
    +-- UsageError                a command-line value that cannot be used
    +-- TrackingError             MLflow is missing or its store refused (--to-mlflow)

The CLI turns every `ReplayError` into one line on stderr and exit code 2.
"""

from __future__ import annotations


class ReplayError(Exception):
    """Base of every error raised by `replay`."""


class NotAnEventLog(ReplayError):
    """The file cannot be read as JSON event lines with `ts` and `event`."""


class UsageError(ReplayError):
    """An option value (a --simulate grid, a target) cannot be used."""


class TrackingError(ReplayError):
    """MLflow is not installed, or its store refused what was logged."""
