"""The project's error types: each carries a one-line message that names the file or row and the reason.

The command line prints these as one line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class PainterError(Exception):
    """A user-facing failure with a one-line reason."""


class CheckpointError(PainterError):
    """A model directory or foreign checkpoint that cannot be read as expected."""


class InputError(PainterError):
    """Input data that cannot be read at all (not a bad row: bad rows are rejected, not raised)."""


class ErrorRateExceeded(PainterError):
    """More rows were rejected than --max-error-rate allows (raised after everything is written)."""
