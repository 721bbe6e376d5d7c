"""What a job shows on the terminal, and where everything else goes: the one logging mechanism.

- `setup(job, log_path)` (called by the CLI only, so `painter <job>` and `jobs/<job>_job.py` share it):
  painter's messages go to stderr as `[stage] message`; Ray's own output (its driver loggers, the
  cluster's messages, Python warnings and, at the end, every worker's and actor's stdout/stderr of a local
  Ray) goes to the file `log_path`, which the CLI moves into the job's output folder at the end
  (`move_file`; a job may refuse a non-empty output), or uploads there for a remote output
  (`upload_file`), and the summary names. Ray warnings still reach the terminal unless `NOISE` names them; real errors reach it
  through the job's exception (the CLI prints its one-line reason).
- `get(stage)`: the logger of a stage (`painter.<stage>`).
- What reaches the terminal from Ray (its loggers, worker output, file descriptor 2) is filtered in
  `painter.cli.console`, which writes through this module's handlers.
- `Progress`: one progress display per stage on stderr: a bar redrawn in place, with count, rate and
  ETA, when stderr is a terminal; when it is not (CI, `ray job submit` logs), a plain line every
  `PAINTER_PROGRESS_SECONDS` (15) seconds, spaced out to an eighth of the time so far in long jobs
  (an hour-long job writes a few dozen lines, not hundreds).
- A `Progress` fed from Ray workers is `painter.stages.progress.remote_progress` (Ray wiring lives there).
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import shutil
import sys
import threading
import time

ROOT = "painter"
PROGRESS_SECONDS = float(os.environ.get("PAINTER_PROGRESS_SECONDS", "15"))

_state = {"file": None, "bar": None, "lock": threading.RLock()}


def get(stage: str) -> logging.Logger:
    """The logger of a stage: its messages show as `[stage] message` on stderr."""
    return logging.getLogger(f"{ROOT}.{stage}")




class _Terminal(logging.Handler):
    """painter's records on the current stderr (keeping a bar intact) and in the log file."""

    def emit(self, record: logging.LogRecord, to_file: bool = True) -> None:
        if to_file and _state["file"] is not None:
            _state["file"].handle(record)
        try:
            stage = record.name[len(ROOT) + 1:] if record.name.startswith(ROOT + ".") else record.name.split(".")[0]
            level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
            text = f"[{stage}] {level}{record.getMessage()}"
            with _state["lock"]:
                bar = _state["bar"]
                if bar is not None:
                    bar.clear()
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
                if bar is not None:
                    bar.draw(force=True)
        except Exception:  # a logging handler never raises into the job
            self.handleError(record)


_TERMINAL = _Terminal()


def _file_handler(path: str) -> logging.Handler:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # reopened if a job empties its output folder (`--overwrite`) after the file was opened
    handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler






def setup(job: str, log_path: str | None) -> None:
    """Configure the terminal for `job`: painter's logger on stderr; Ray's output to `log_path` (see `quiet_ray`)."""
    root = logging.getLogger(ROOT)
    root.setLevel(logging.INFO)
    root.propagate = False
    if _TERMINAL not in root.handlers:
        root.addHandler(_TERMINAL)
    old = _state["file"]
    if old is not None:
        old.close()
    _state["file"] = _file_handler(log_path) if log_path else None
    logging.captureWarnings(True)  # library warnings (deprecations) to the file, not the terminal
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers = [_state["file"]] if _state["file"] else [logging.NullHandler()]
    warnings_logger.propagate = False


def move_file(path: str) -> str:
    """Move the log file to `path` (the job's output folder, once the job has written it); the new path."""
    handler = _state["file"]
    if handler is None:
        return path
    with _state["lock"]:
        handler.acquire()
        try:
            handler.close()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.move(handler.baseFilename, path)
            _state["file"] = _file_handler(path)
        finally:
            handler.release()
    return path


def upload_file(write, url: str) -> str:
    """Hand the log file's bytes as they are now to `write(url, chunks)` (a Storage's `write_atomic`: the
    job's remote output); `url`. Lines written later stay in the local file only."""
    handler = _state["file"]
    if handler is None:
        return url
    with _state["lock"]:
        handler.flush()
        with open(handler.baseFilename, "rb") as f:
            write(url, iter(lambda: f.read(1 << 20), b""))
    return url


def to_file(message: str, error: BaseException | None = None, *, level: int = logging.ERROR,
            name: str = "error") -> None:
    """Write `message` (and `error`'s traceback) to the log file only."""
    if _state["file"] is not None:
        record = logging.LogRecord(f"{ROOT}.{name}", level, "", 0, message, None,
                                   (type(error), error, error.__traceback__) if error else None)
        _state["file"].handle(record)












def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """One stage's progress on stderr: `done` of `total` `unit`, rate and ETA (use as a context manager)."""

    def __init__(self, stage: str, total: int | None, unit: str, *, start: int = 0):
        self.stage, self.total, self.unit = stage, total, unit
        self.done, self.note = start, ""
        self.begin, self.start_count = time.monotonic(), start
        self.tty = sys.stderr.isatty()
        self.last_draw = self.last_line = self.begin
        self.drawn = False
        self.first: tuple[float, int] | None = None  # (time, count) of the first update: rates leave start-up out

    def __enter__(self) -> Progress:
        with _state["lock"]:
            _state["bar"] = self if self.tty else None
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set(self, done: int, note: str = "") -> None:
        """Record that `done` units are finished (`note`: a short extra such as the loss)."""
        with _state["lock"]:
            self.done, self.note = done, note or self.note
            now = time.monotonic()
            if self.first is None:
                self.first = (now, done)
            if self.tty and now - self.last_draw >= 0.2:
                self.draw()
            elif not self.tty and now - self.last_line >= max(PROGRESS_SECONDS, (now - self.begin) / 8):
                self.last_line = now
                get(self.stage).info(self.text())

    def text(self) -> str:
        now = time.monotonic()
        elapsed = now - self.begin
        since, counted = self.first or (self.begin, self.start_count)
        rate = (self.done - counted) / (now - since) if now > since and self.done > counted else 0.0
        count = f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"
        parts = [count, f"{rate:.1f} {self.unit}/s" if rate >= 1 else f"{rate:.2f} {self.unit}/s", _clock(elapsed)]
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        if self.note:
            parts.append(self.note)
        return " · ".join(parts)

    def draw(self, force: bool = False) -> None:
        width = 24
        filled = int(width * min(1.0, self.done / self.total)) if self.total else 0
        bar = f"[{'#' * filled}{'.' * (width - filled)}] " if self.total else ""
        sys.stderr.write(f"\r\x1b[2K[{self.stage}] {bar}{self.text()}")
        sys.stderr.flush()
        self.drawn, self.last_draw = True, time.monotonic()

    def clear(self) -> None:
        if self.drawn:
            sys.stderr.write("\r\x1b[2K")

    def close(self) -> None:
        with _state["lock"]:
            if _state["bar"] is self:
                _state["bar"] = None
            if self.tty:
                self.draw()
                sys.stderr.write("\n")
                sys.stderr.flush()
            else:
                get(self.stage).info(self.text())
