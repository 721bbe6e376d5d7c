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
    """More rows were rejected than --max-error-rate allows. Raised after everything is written, with the
    run's summary, which the command line still prints (its status "failed", this as its error)."""

    def __init__(self, message: str, summary: dict | None = None):
        super().__init__(message)
        self.summary = dict(summary or {})

    def __reduce__(self):  # pickled through Ray with its summary
        return type(self), (str(self), self.summary)


def check_error_rate(rejected: int, total: int, limit: float, detail: str, summary: dict | None = None) -> None:
    """ErrorRateExceeded (with `summary`) when rejected / total > limit: every job's one verdict and wording."""
    rate = rejected / total if total else 0.0
    if rate > limit:
        raise ErrorRateExceeded(f"{rejected} of {total} rows rejected ({rate:.2%}), above --max-error-rate "
                                f"{limit:g}; {detail}", summary)


class StorageError(PainterError):
    """A storage path that cannot be reached, found or written (after the bounded retries of transient errors)."""


class TrainingDiverged(PainterError):
    """The training loss stopped being finite; the run stopped before saving that state."""


class Stopped(KeyboardInterrupt):
    """The job was asked to stop (SIGTERM, SIGINT) part-way; the message names the signal. A KeyboardInterrupt,
    so that no `except Exception` on the way swallows it and Ray's blocking calls give it way as they do to
    Ctrl-C; the CLI reports it as the run's failure line."""
