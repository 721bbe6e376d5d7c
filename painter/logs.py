"""What a job shows on the terminal, and where everything else goes: the one logging mechanism.

- `setup(job, log_path)` (called by the CLI only, so `painter <job>` and `jobs/<job>_job.py` share it):
  painter's messages go to stderr as `[stage] message`; Ray's own output (its driver loggers, every
  worker's and actor's stdout/stderr, Python warnings) goes to the file `log_path`, which the CLI moves
  into the job's output folder at the end (`move_file`; a job may refuse a non-empty output) and the
  summary names. Ray warnings still reach the terminal unless `NOISE` names them; real errors reach it
  through the job's exception (the CLI prints its one-line reason).
- `get(stage)`: the logger of a stage (`painter.<stage>`).
- `TerminalFilter`: while a job runs, every line headed for the terminal (Python's stdout and stderr,
  Ray's GCS messages printed there, and raw writes to file descriptor 2 from Ray's C++ core worker)
  passes the `NOISE` filter; what it names goes to the log file.
- `Progress`: one progress display per stage on stderr: a bar redrawn in place, with count, rate and
  ETA, when stderr is a terminal; when it is not (CI, `ray job submit` logs), a plain line every
  `PAINTER_PROGRESS_SECONDS` (15) seconds, spaced out to an eighth of the time so far in long jobs
  (an hour-long job writes a few dozen lines, not hundreds).
- A `Progress` fed from Ray workers is `painter.stages.common.remote_progress` (Ray wiring lives there).
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import re
import shutil
import sys
import threading
import time

ROOT = "painter"
PROGRESS_SECONDS = float(os.environ.get("PAINTER_PROGRESS_SECONDS", "15"))
# Messages (from Ray's loggers and Ray workers) that tell a user nothing; they stay in the log file.
NOISE = tuple(re.compile(p) for p in (
    r"Failed to query Ray Train Controller actor state",  # train v2 without the dashboard, once a second
    r"Reporting training result \d+: TrainingReport\(",  # every ray.train.report, dumped in full
    r"State API may be temporarily unavailable",
    r"Progress bars disabled\. To enable",  # we turned Ray Data's bars off: painter draws its own
    r"has constructor arguments in the object store and max_restarts > 0",  # C++, for every actor pool
    r"PYTHON worker processes have been started on node",  # raylet: fractional-CPU actors, as intended
    # Ray Data's preface to any error raised in a datasink's write (ours: a full disk), which the job then
    # reports in one line naming the file; it is not Ray's internal error that it says it is
    r"Exception occurred in Ray Data or Ray Core internal code",
))

_state = {"file": None, "bar": None, "lock": threading.RLock()}


def get(stage: str) -> logging.Logger:
    """The logger of a stage: its messages show as `[stage] message` on stderr."""
    return logging.getLogger(f"{ROOT}.{stage}")


def is_noise(message: str) -> bool:
    return any(p.search(message) for p in NOISE)


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


class _RayConsole(logging.Filter):
    """On Ray's own console handlers: every record to the log file; WARNING+ ones that are not `NOISE` and
    carry no traceback also to the terminal, in painter's format (`[ray] warning: ...`); Ray's handler itself
    prints nothing. (A traceback belongs to a failure, which the job reports in one line, and `--debug` in full.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        if _state["file"] is not None:
            _state["file"].handle(record)
        message = record.getMessage()
        if record.levelno >= logging.WARNING and not is_noise(message) and not _has_traceback(record, message):
            _TERMINAL.emit(record, to_file=False)
        return False


def _has_traceback(record: logging.LogRecord, message: str) -> bool:
    return bool(record.exc_info) or "Traceback (most recent call last)" in message


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


def to_file(message: str, error: BaseException | None = None, *, level: int = logging.ERROR,
            name: str = "error") -> None:
    """Write `message` (and `error`'s traceback) to the log file only."""
    if _state["file"] is not None:
        record = logging.LogRecord(f"{ROOT}.{name}", level, "", 0, message, None,
                                   (type(error), error, error.__traceback__) if error else None)
        _state["file"].handle(record)


def quiet_ray(initialized: bool = True) -> None:
    """Ray's console loggers filtered into the file (call it before `ray.init` too, whose own lines count);
    once initialized, worker output to the file and no Ray Data bars."""
    import ray.data

    for name in [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")]:
        for handler in logging.getLogger(name).handlers:
            stream = getattr(handler, "stream", None)
            if stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) and not any(
                    isinstance(f, _RayConsole) for f in handler.filters):
                handler.addFilter(_RayConsole())
    if not initialized:
        return
    ray.data.DataContext.get_current().enable_progress_bars = False  # painter's own progress instead
    _route_worker_output()


def _route_worker_output() -> None:
    """Workers' and actors' stdout/stderr (Ray's log_to_driver stream) into the log file instead of the terminal.

    Ray 2.60 hands every batch of worker lines to `global_worker_stdstream_dispatcher`; its printing handler
    is replaced by one that writes to the file (the terminal keeps only what the driver itself raises), and so
    is `print_to_stdstream`, which prints the cluster's error messages.
    """
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("painter")
    dispatcher.add_handler("painter", _worker_lines)
    # Errors the cluster publishes ("(raylet) Task ... failed", actors killed when a job stops) are printed to
    # stdout by this function, after a job's last line too: to the file with the rest
    ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: _worker_lines(data)


def _worker_lines(data: dict) -> None:
    handler = _state["file"]
    if handler is None:
        return
    who = data.get("actor_name") or data.get("task_name") or "worker"
    stream = "stderr" if data.get("is_err") else "stdout"
    for line in data.get("lines", []):
        handler.handle(logging.LogRecord(f"ray.worker.{stream}", logging.INFO, "", 0,
                                         f"({who} pid={data.get('pid')}) {line}", None, None))


class LineFilter:
    """A text stream in front of `stream` that drops lines `NOISE` names (into the log file), the rest
    passing through; text that starts with a carriage return (a redrawn bar) passes at once."""

    def __init__(self, stream):
        self.stream, self.pending = stream, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if is_noise(line):
                to_file(line, level=logging.INFO, name="terminal")
            else:
                self.stream.write(line + "\n")
        if self.pending.startswith("\r"):
            self.stream.write(self.pending)
            self.pending = ""
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def __getattr__(self, name):  # encoding, fileno, ... of the stream underneath
        return getattr(self.stream, name)


class TerminalFilter:
    """While installed, `NOISE` is dropped from everything headed for the terminal: Python's stdout and
    stderr become `LineFilter`s, and file descriptor 2 (Ray's C++ core worker writes there) is a pipe
    whose lines a thread filters the same way. `close()` puts everything back; the thread keeps draining
    the pipe for any child process that inherited it."""

    def __init__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.streams = sys.stdout, sys.stderr
        self.saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        stderr = sys.stderr
        try:
            if sys.stderr.fileno() == 2:  # Python's stderr writes to the real stderr, not through the pipe
                stderr = open(os.dup(self.saved), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
        except (AttributeError, OSError, ValueError):  # a harness's stream without a file descriptor
            pass
        self.own = stderr if stderr is not sys.stderr else None
        sys.stdout, sys.stderr = LineFilter(sys.stdout), LineFilter(stderr)
        out = os.dup(self.saved)
        threading.Thread(target=self._pump, args=(read, out), name="painter-stderr", daemon=True).start()

    @staticmethod
    def _pump(read: int, out: int) -> None:
        pending = b""
        while chunk := os.read(read, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                text = line.decode("utf-8", "replace")
                if is_noise(text):
                    to_file(text, level=logging.INFO, name="stderr")
                else:
                    os.write(out, line + b"\n")

    def close(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            if stream.pending:
                stream.write("\n")
            stream.flush()
        sys.stdout, sys.stderr = self.streams
        if self.own is not None:
            self.own.close()
        os.dup2(self.saved, 2)
        os.close(self.saved)


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
