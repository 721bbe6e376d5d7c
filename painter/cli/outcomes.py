"""A run's outcome for the operator: its failure class and exit code, the same for every job.

0 succeeded; 1 internal (an unexpected error: page someone); 2 usage (bad options, an input or model named
on the command line that cannot be used); 3 data (more rows rejected than --max-error-rate allows,
everything else written); 4 storage (input or output unreachable or unwritable after the retries);
130/143 stopped by SIGINT/SIGTERM. The last JSON line says the class as `"failure"`. Each `PainterError`
type names its class (`painter.errors`); an error raised inside Ray is unwrapped to it first. Argument
parsing errors end the same way (`UsageParser`): the usage on stderr, the failure line on stdout, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from painter.errors import EXIT_CODES, failure_of
from painter.stages.ray_errors import painter_error_from


def failure(error: BaseException) -> str:
    """"usage", "data", "storage", "internal" or "stopped" (a PainterError raised inside Ray unwrapped first)."""
    return failure_of(painter_error_from(error) or error)


def exit_code(error: BaseException) -> int:
    """The exit code of a run that ended with `error` (not a signal: the CLI knows which one stopped it)."""
    return EXIT_CODES[failure(error)]


class UsageParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors also end with the failure line ("failure": "usage") and exit 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        job = self.prog.split()[-1] if " " in self.prog else None
        line = {"job": job, "status": "failed", "failure": "usage", "error": f"{self.prog}: {message}"}
        print(json.dumps(line, ensure_ascii=False))
        sys.exit(EXIT_CODES["usage"])
