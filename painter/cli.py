"""The `painter` command line: one subcommand per job or tool, options generated from dataclasses.

Each command (`painter.registry`) names a module with an options dataclass and a `run(options) -> dict`
function; this file parses arguments, starts Ray for the jobs that need it (local unless RAY_ADDRESS is
set), and prints the run's summary as one JSON object on the last line. A `PainterError` becomes a one-line
reason (also the last line, as JSON) and a non-zero exit.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time

# Ray 2.60 authenticates with a token by default; the mode must be in the environment before Ray is
# imported (the stage modules import it), or a local start fails with InvalidAuthToken.
os.environ.setdefault("RAY_AUTH_MODE", "token")

from painter import logs, registry
from painter.errors import PainterError
from painter.options import add_arguments, from_args
from painter.registry import COMMANDS, available_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="painter", description="Chinese text-to-image generation as batch jobs on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in available_commands():
        options_cls, _ = registry.load(name)
        p = sub.add_parser(name, help=COMMANDS[name].help, description=COMMANDS[name].help)
        add_arguments(p, options_cls)
    return parser


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as inside `ray job submit`), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    # Workers' output reaches the driver (log_to_driver) only to be written to the job's log file.
    quiet = {"logging_level": logging.INFO, "log_to_driver": True}
    logs.quiet_ray(initialized=False)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
    logs.quiet_ray()


def log_path(name: str) -> str:
    """Where the job's log file (Ray's own output) is written while it runs: the temp folder, since a job
    may refuse or empty a non-empty --output; `final_log_path` is where it ends up."""
    folder = os.path.join(tempfile.gettempdir(), "painter-logs")
    return os.path.join(folder, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")


def final_log_path(path: str, options) -> str | None:
    """`<output>/_logs/<log file name>` when the job has a local --output folder that exists, else None."""
    output = getattr(options, "output", None)
    if not output or "://" in output or not os.path.isdir(output):
        return None
    return os.path.join(os.path.abspath(output), "_logs", os.path.basename(path))


_REASON = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line_reason(error: BaseException) -> str:
    """The reason of an unexpected error in one line: a PainterError raised inside Ray, else the deepest
    `SomeError: message` line of the error and its causes (Ray wraps a worker's or actor's error in its
    traceback text), else the error's first line."""
    if "ray" in sys.modules:
        from painter.stages.common import painter_error_from

        cause = painter_error_from(error)
        if cause is not None:
            return str(cause)
    reason, seen, exc = None, set(), error
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = _ANSI.sub("", f"{exc}\n{getattr(exc, 'error_msg', '') or ''}").strip()
        found = _REASON.findall(text)
        if found:
            reason = f"{found[-1][0]}: {found[-1][1].strip()}"
        elif text and not type(exc).__module__.startswith("ray"):
            reason = f"{type(exc).__name__}: {text.splitlines()[0]}"
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    if reason:
        return reason
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_command(name: str, options) -> dict:
    """Run one command in-process, Ray started first where it needs it; its summary (what `main` prints)."""
    if COMMANDS[name].uses_ray:
        init_ray()
    return registry.run_command(name, options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options_cls, _ = registry.load(args.command)
    options = from_args(options_cls, args)
    start = time.time()
    path = log_path(args.command) if COMMANDS[args.command].uses_ray else None
    logs.setup(args.command, path)
    terminal = logs.TerminalFilter() if path else None
    ours = path is not None and not _ray_running()
    try:
        return _run_and_report(args.command, options, path, start)
    finally:
        if ours and _ray_running():  # Ray's last words at shutdown pass the filter too
            import ray

            ray.shutdown()
        if terminal is not None:
            terminal.close()


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _run_and_report(name: str, options, path: str | None, start: float) -> int:
    """Run the job; print its summary (or its one-line failure) as the last stdout line; the exit code."""
    try:
        summary = run_command(name, options)
    except (PainterError, Exception) as e:  # noqa: B014 (a PainterError is said as it is, anything else in one line)
        reason = str(e) if isinstance(e, PainterError) else one_line_reason(e)
        if not isinstance(e, PainterError):
            logs.to_file(f"{name} failed", e)
        if path and (final := final_log_path(path, options)):
            path = logs.move_file(final)
        details = f" (details in {path})" if path and not isinstance(e, PainterError) else ""
        logs.get(name).error(reason + details)
        failure = {"job": name, "status": "failed", "error": reason} | ({"log": path} if path else {})
        print(json.dumps(failure, ensure_ascii=False))
        return 1
    failed = summary.pop("_failed", None)
    if path:
        final = final_log_path(path, options)
        summary.setdefault("log", logs.move_file(final) if final else path)
    summary.setdefault("seconds", round(time.time() - start, 3))
    summary.setdefault("status", "failed" if failed else "succeeded")
    if failed:
        summary["error"] = failed
        logs.get(name).error(failed)
    print(json.dumps({"job": name, **summary}, ensure_ascii=False, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
