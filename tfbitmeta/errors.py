"""User-facing errors: the CLI prints these as one line and exits non-zero (no traceback)."""


class TfbitmetaError(Exception):
    """An error caused by user input or the environment, with a message that says what to do."""
