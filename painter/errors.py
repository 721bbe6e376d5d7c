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


class StorageError(PainterError):
    """A storage path that cannot be reached, found or written (after the bounded retries of transient errors)."""


class TrainingDiverged(PainterError):
    """The training loss stopped being finite; the run stopped before saving that state."""


class Stopped(KeyboardInterrupt):
    """The job was asked to stop (SIGTERM, SIGINT) part-way; the message names the signal. A KeyboardInterrupt,
    so that no `except Exception` on the way swallows it and Ray's blocking calls give it way as they do to
    Ctrl-C; the CLI reports it as the run's failure line."""
