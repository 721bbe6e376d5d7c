"""The project's error types: each carries a one-line message that names the file or row and the reason.

The command line prints these as one line and exits non-zero; anything else is a bug and keeps its
traceback. Each type names its failure class (`failure`), which the command line turns into the exit
code (`EXIT_CODES`, the same for every job): "usage" 2 (an option or a path named on the command line
is wrong: the input missing or unreadable, a model directory broken), "data" 3 (too many rejected rows,
everything else written), "storage" 4 (a storage path unreachable or unwritable after the retries, a
full disk), "internal" 1 (anything else, a diverged training run among them: page someone), and
"stopped" 130/143 (SIGINT/SIGTERM, 128 + the signal's number).
"""

EXIT_CODES = {"internal": 1, "usage": 2, "data": 3, "storage": 4}


class PainterError(Exception):
    """A user-facing failure with a one-line reason; by default a usage failure (what the command named)."""

    failure = "usage"


class CheckpointError(PainterError):
    """A model directory or foreign checkpoint that cannot be read as expected."""


class InputError(PainterError):
    """Input data that cannot be read at all (not a bad row: bad rows are rejected, not raised)."""


class ErrorRateExceeded(PainterError):
    """More rows were rejected than --max-error-rate allows. Raised after everything is written, with the
    run's summary, which the command line still prints (its status "failed", this as its error)."""

    failure = "data"

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

    failure = "storage"


class TrainingDiverged(PainterError):
    """The training loss stopped being finite; the run stopped before saving that state."""

    failure = "internal"


class Stopped(KeyboardInterrupt):
    """The job was asked to stop (SIGTERM, SIGINT) part-way; the message names the signal. A KeyboardInterrupt,
    so that no `except Exception` on the way swallows it and Ray's blocking calls give it way as they do to
    Ctrl-C; the CLI reports it as the run's failure line."""


class NightsFailed(PainterError):
    """Some nights of a backfill failed: raised after the others ran, with the summary of every night; its
    failure class is the first failed night's."""

    def __init__(self, message: str, summary: dict | None = None, failure: str = "internal"):
        super().__init__(message)
        self.summary, self.failure = dict(summary or {}), failure

    def __reduce__(self):
        return type(self), (str(self), self.summary, self.failure)


def failure_of(error: BaseException) -> str:
    """The failure class of `error` (unwrapped from Ray already): its type's, "stopped" for a signal,
    else "internal"."""
    if isinstance(error, KeyboardInterrupt):
        return "stopped"
    return error.failure if isinstance(error, PainterError) else "internal"
