"""The `painter` command line: one subcommand per job or tool, options generated from dataclasses.

Each command (`painter.cli.registry`) names its options dataclass (`painter.options`) and the module with its
`run(options) -> dict` function, loaded only to run it; this file parses arguments, starts Ray for the jobs that need it (local unless RAY_ADDRESS is set), and
prints the run's summary as one JSON object on the last line. It is the one place that turns a failure
into the last line `{"status": "failed", "error": "<one-line reason>"}` and a non-zero exit: a
`PainterError` says its own reason; any other error (Ray's wrapped ones unwrapped to their root) is said
as its deepest `SomeError: message` line, its traceback going to the job's log file, or to stderr with
`--debug`. A job's `preflight(options)` (inputs, model files, outputs: see `painter.io.checks`) runs before
Ray starts, so most mistakes cost a second. SIGTERM and SIGINT stop a job cleanly with that line (exit
143 and 130): what was finished is kept and rerunning the same command completes the work. Values of
credentials never reach the output.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import signal
import sys
import tempfile
import threading
import time
import traceback

# Ray 2.60 authenticates with a token by default; the mode must be in the environment before Ray is
# imported (the stage modules import it), or a local start fails with InvalidAuthToken.
os.environ.setdefault("RAY_AUTH_MODE", "token")

from painter import logs
from painter.cli import console
from painter.cli import outcomes
from painter.cli import registry
from painter.io.storage import Storage, is_remote
from painter.io.storage_options import STORAGE_FIELD, redact, secrets_of
from painter.stages.ray_errors import one_line_reason
from painter.errors import ErrorRateExceeded, NightsFailed, PainterError, Stopped
from painter.cli.parser import build_parser, config_text, parse  # noqa: F401 (build_parser: the CLI's parser, for tests)
from painter.options import from_args
from painter.cli.registry import COMMANDS


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as inside `ray job submit`), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    # Workers' output stays off the driver; `console.keep_worker_logs` copies it into the job's log file.
    quiet = {"logging_level": logging.INFO, "log_to_driver": False}
    console.quiet_ray(initialized=False)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        context = ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
        _local_ray["session_dir"] = context.address_info.get("session_dir")
    console.quiet_ray()


_local_ray: dict = {"session_dir": None}  # the session folder of the local Ray this process started


def log_path(name: str) -> str:
    """Where the job's log file (Ray's own output) is written while it runs: the temp folder, since a job
    may refuse or empty a non-empty --output; `final_log_path` is where it ends up."""
    folder = os.path.join(tempfile.gettempdir(), "painter-logs")
    return os.path.join(folder, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")


def final_log_path(path: str, options) -> str | None:
    """Where the log file ends up: `<output>/_logs/<log file name>` for a remote --output (`s3://...`,
    uploaded there) or a local --output folder that exists; else None (it stays where it is)."""
    output = getattr(options, "output", None)
    if not output:
        return None
    if is_remote(output):
        return posixpath.join(output.rstrip("/"), "_logs", os.path.basename(path))
    if not os.path.isdir(output):
        return None
    return os.path.join(os.path.abspath(output), "_logs", os.path.basename(path))


def run_command(name: str, options) -> dict:
    """Run one command in-process and return its summary (what `main` prints): its preflight checks, then
    Ray (for the jobs that use it), then the job."""
    module, run = registry.runner_of(name), registry.run_of(name)
    if getattr(module, "preflight", None) is not None:
        module.preflight(options)
    if COMMANDS[name].uses_ray:
        init_ray()
        stop_on_signals()  # after ray.init, which sets its own SIGTERM handler (a bare sys.exit)
    return run(options)


STOP_SIGNALS = {signal.SIGTERM: 143, signal.SIGINT: 130}  # exit codes: 128 + the signal's number
_received: list[str] = []  # the signals that stopped the job (Ray may re-raise ours as a plain KeyboardInterrupt)


def _stop(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)
    raise Stopped(_received[-1])


def stop_on_signals() -> dict:
    """SIGTERM and SIGINT raise `Stopped` in the main thread: the job unwinds (a generate run commits the
    batches it holds) and ends with its failure line. Returns the handlers it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _stop) for signum in STOP_SIGNALS}






def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    options = from_args(registry.options_of(args.command), args)  # the job's module is loaded only to run it
    if args.print_config:
        sys.stdout.write(config_text(options))
        return 0
    start = time.time()
    path = log_path(args.command) if COMMANDS[args.command].uses_ray else None
    logs.setup(args.command, path)
    terminal = console.TerminalFilter() if path else None
    ours = path is not None and not _ray_running()
    _received.clear()
    saved = stop_on_signals()
    try:
        return _run_and_report(args.command, options, path, start, getattr(args, "debug", False))
    finally:
        if ours and _ray_running():  # Ray's last words at shutdown pass the filter too
            import ray

            ray.shutdown()
            _local_ray["session_dir"] = None
        if terminal is not None:
            terminal.close()
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _unraisable_to_log(unraisable) -> None:
    """Python's "Exception ignored in ..." reports (a `__del__` that raised; Ray's actor handles collected
    at exit after a stopped job do this) go to the job's log file, so the terminal ends with the job's own
    lines."""
    try:
        logs.to_file(f"exception ignored in {unraisable.object!r}", unraisable.exc_value)
    except Exception:  # at interpreter exit the log may be closed already: nothing more to do
        pass


def entry(argv: list[str] | None = None) -> None:
    """The `painter` console script and the `jobs/*_job.py` scripts: `main`, with ignored-exception reports
    kept off the terminal to the end."""
    sys.unraisablehook = _unraisable_to_log
    sys.exit(main(argv))


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _reason(name: str, error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):  # ours (Stopped), or Ray's stand-in for it
        return f"stopped by {_received[-1] if _received else 'SIGINT'} part-way; {COMMANDS[name].after_stop}"
    return str(error) if isinstance(error, PainterError) else one_line_reason(error)


def _exit_code(error: BaseException) -> int:
    if isinstance(error, KeyboardInterrupt):
        return STOP_SIGNALS[signal.Signals[_received[-1]]] if _received else 130
    return outcomes.exit_code(error)  # by failure class: painter.cli.outcomes


def _keep_log(path: str | None, options) -> str | None:
    """The log file (with the workers' output of a local Ray added) moved into the job's output folder, or
    uploaded there for a remote output, where it has one; where it now is. Left where it is when it cannot
    be kept there (a full disk, an unreachable bucket): the job's own reason is what matters."""
    if path is None:
        return None
    if _ray_running():
        console.keep_worker_logs(_local_ray["session_dir"])
    final = final_log_path(path, options)
    if not final:
        return path
    try:
        if is_remote(final):
            return logs.upload_file(Storage.from_option(getattr(options, STORAGE_FIELD, None)).write_atomic, final)
        return logs.move_file(final)
    except Exception as e:  # OSError, a bucket's refusal, malformed --storage-options: the log stays here
        logs.to_file(f"could not keep the log at {final}", e)
        return path


def _run_and_report(name: str, options, path: str | None, start: float, debug: bool = False) -> int:
    """Run the job; print its summary (or its one-line failure) as the last stdout line; the exit code."""
    failed = None
    try:
        summary = run_command(name, options)
    except (ErrorRateExceeded, NightsFailed) as e:  # everything else was written: the summary prints, as a failure
        summary, failed = e.summary, e
    except (Exception, KeyboardInterrupt) as e:  # KeyboardInterrupt: Stopped by a signal, or Ctrl-C
        secrets = secrets_of(options)
        reason = redact(" ".join(_reason(name, e).split()), secrets)  # one line, whatever the message held
        expected = isinstance(e, (PainterError, KeyboardInterrupt))
        if not expected:
            logs.to_file(f"{name} failed", e)
        if debug:
            sys.stderr.write(redact("".join(traceback.format_exception(e)), secrets))
        where = final_log_path(path, options) if path else None
        details = f" (details in {where or path})" if path and not expected else ""
        logs.get(name).error(reason + details)
        path = _keep_log(path, options)
        failure = {"job": name, "status": "failed", "failure": outcomes.failure(e), "error": reason}
        failure |= {"log": path} if path else {}
        print(json.dumps(failure, ensure_ascii=False))
        return _exit_code(e)
    summary.setdefault("seconds", round(time.time() - start, 3))
    summary.setdefault("status", "failed" if failed else "succeeded")
    if failed:
        summary |= {"failure": outcomes.failure(failed), "error": str(failed)}
        logs.get(name).error(str(failed))
    if path:
        summary.setdefault("log", _keep_log(path, options))
    print(json.dumps({"job": name, **summary}, ensure_ascii=False, default=str))
    return outcomes.exit_code(failed) if failed else 0


if __name__ == "__main__":
    entry()
