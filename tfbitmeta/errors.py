"""User-facing errors: the CLI prints these as one line and exits non-zero (no traceback).

Library code raises them with messages in the library's own terms (argument names, paths, values); it never names
a command-line flag.  When an error is about one argument, pass its Python name as ``param``: the CLI, which alone
knows the flags, appends the flag (``--batch-size``) when it turns the error into a message.

* :class:`TfbitmetaError` -- the base class, a :class:`ValueError`, so callers that do not know this package still
  catch it as a bad value.
* :class:`BadArgument` -- a value the caller passed is invalid or inconsistent with the others.
* :class:`DataMissing` -- data, a run, a checkpoint or a file the caller pointed to is absent or unreadable.
"""
from __future__ import annotations


class TfbitmetaError(ValueError):
    """An error caused by user input or the environment, with a message that says what to do.

    Args:
        message: what is wrong and how to fix it, in the library's terms.
        param: the Python name of the argument at fault (e.g. ``"batch_size"``), if there is one.
    """

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class BadArgument(TfbitmetaError):
    """An argument value is invalid (out of range, unknown name, inconsistent with another argument)."""


class DataMissing(TfbitmetaError):
    """Data, a run directory, a checkpoint or a file is missing, unreadable or corrupt."""
