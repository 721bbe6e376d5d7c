"""What reaches the terminal while a job runs: Ray's console loggers and worker output routed into the job's
log file, and `NOISE` (lines that tell a user nothing) filtered from stdout, stderr and file descriptor 2."""
from __future__ import annotations
import logging
import logging.handlers
import os
import re
import sys
import threading

from painter.logs import _TERMINAL, _state, to_file


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


def is_noise(message: str) -> bool:
    return any(p.search(message) for p in NOISE)


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


