"""What reaches the terminal while a job runs: Ray's console loggers, the cluster's messages and (at the end)
the workers' output routed into the job's log file, and `NOISE` (lines that tell a user nothing) filtered
from stdout, stderr and file descriptor 2. Public Ray only: workers' output is kept off the driver with
`ray.init(log_to_driver=False)` and read back from Ray's own per-worker log files."""
from __future__ import annotations
import glob
import logging
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
    once initialized, no Ray Data bars. (Workers' output never reaches this process: `ray.init(log_to_driver=
    False)`; `keep_worker_logs` copies it into the file at the end.)"""
    import ray.data

    for name in [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")]:
        for handler in logging.getLogger(name).handlers:
            stream = getattr(handler, "stream", None)
            if stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) and not any(
                    isinstance(f, _RayConsole) for f in handler.filters):
                handler.addFilter(_RayConsole())
    if initialized:
        ray.data.DataContext.get_current().enable_progress_bars = False  # painter's own progress instead


# A line Ray prints for a worker or the cluster ("(raylet) Task ... failed", "(MyActor pid=12) ..."): the
# cluster's error messages reach the driver's stdout whatever `log_to_driver` says, after a job's last line too
_RAY_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)*\((?:raylet|autoscaler|.*?\bpid=\w+)")


def keep_worker_logs(session_dir: str | None) -> None:
    """Append the output of this job's workers and actors (Ray's per-worker files in a local Ray's session
    folder, `logs/worker-*.out|err`) to the job's log file; on a cluster, where to find them."""
    import ray

    if _state["file"] is None or not ray.is_initialized():
        return
    job = ray.get_runtime_context().get_job_id()
    if not session_dir:
        to_file(f"workers' output: Ray's logs of job {job} (`ray logs`, the dashboard)", level=logging.INFO,
                name="workers")
        return
    for path in sorted(glob.glob(os.path.join(session_dir, "logs", "worker-*.out")) +
                       glob.glob(os.path.join(session_dir, "logs", "worker-*.err"))):
        pid, stream = os.path.basename(path).rsplit("-", 1)[-1].split(".")
        for line in _job_lines(path, job):
            to_file(f"(pid={pid}) {line}", level=logging.INFO, name=f"ray.worker.{stream}")


def _job_lines(path: str, job: str) -> list[str]:
    """The lines of one of Ray's worker log files written for `job`: a worker marks each job it works for
    with a `:job_id:<id>` line (a pooled worker's file is named for no job); other markers left out."""
    parts = os.path.basename(path).split("-")
    current = parts[2] if len(parts) > 3 else None
    kept = []
    try:
        with open(path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith(":job_id:"):
                    current = line[len(":job_id:"):].strip()
                elif current == job and line.strip() and not line.startswith((":actor_name:", ":task_name:")):
                    kept.append(line.rstrip())
    except OSError:  # a worker's file removed under us: the others still count
        return []
    return kept


class LineFilter:
    """A text stream in front of `stream` that drops lines `NOISE` names (into the log file), the rest
    passing through; text that starts with a carriage return (a redrawn bar) passes at once."""

    def __init__(self, stream):
        self.stream, self.pending = stream, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if is_noise(line) or _RAY_PREFIX.match(line):
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


