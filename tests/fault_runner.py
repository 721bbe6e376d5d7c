"""Run many `painter` command lines in one process: `python tests/fault_runner.py CASES.json RESULTS.json`.

The fault matrix's cells that fail before any work (a job's preflight) cost less than importing the job's
modules; one process per cell would spend the file's CI budget on imports alone. Each case runs
`painter.cli.main(argv)` (what the console script calls) with its environment applied and its stdout and
stderr captured; RESULTS.json gets {"code", "stdout", "stderr"} per case, in order.
CASES.json: [{"argv": [...], "env": {...}}, ...].
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys


def clear_filesystem_caches() -> None:
    """fsspec reuses a filesystem built with the same options; a case's endpoint may come from its environment."""
    import fsspec

    for protocol in ("s3", "file"):
        try:
            fsspec.get_filesystem_class(protocol).clear_instance_cache()
        except (ImportError, ValueError):
            pass


def run_case(argv: list[str], env: dict) -> dict:
    from painter.cli import main as cli

    saved = dict(os.environ)
    os.environ.update(env)
    clear_filesystem_caches()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main(cases_path: str, results_path: str) -> None:
    with open(cases_path, encoding="utf-8") as f:
        cases = json.load(f)
    results = [run_case(case["argv"], case["env"]) for case in cases]
    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
