"""A nightly job's `--run-date`: one night, or a backfill of several run one after another.

`for_night` makes the options of one night: `run_date` that date and `{run_date}` fields of the input,
output, errors and TSV paths filled (`painter.io.run_dates`). `run_nights` runs a job's night function
for each night of a range in turn; each night is the same idempotent run a single night is, so a rerun
of a backfill creates nothing new. A failing night stops the rest unless `--keep-going`; the summary
holds one entry per night (its own summary, or its failure class and reason) and the nights not run,
and a backfill with a failed night ends with `NightsFailed`, of the first failed night's class.
A signal (SIGTERM, SIGINT) stops the backfill at once.
"""
from __future__ import annotations

import dataclasses
from datetime import date
from typing import Callable

from painter import logs
from painter.errors import ErrorRateExceeded, NightsFailed, PainterError, failure_of
from painter.io.run_dates import fill
from painter.stages.ray_errors import painter_error_from

PATH_FIELDS = ("output", "errors", "tsv_output")  # besides `input`, a list


def for_night(options, night: date):
    """`options` for one night: its run_date, and its dated paths filled."""
    changes = {"run_date": night.isoformat(), "input": [fill(p, night) for p in options.input]}
    changes |= {name: fill(getattr(options, name), night) for name in PATH_FIELDS if hasattr(options, name)}
    return dataclasses.replace(options, **changes)


def _failed_night(night: date, error: Exception) -> dict:
    cause = painter_error_from(error) or error
    if not isinstance(cause, PainterError):
        logs.to_file(f"run_date {night} failed", error)
    reason = str(cause) if isinstance(cause, PainterError) else f"{type(cause).__name__}: {cause}"
    summary = dict(cause.summary) if isinstance(cause, ErrorRateExceeded) else {}
    return summary | {"run_date": night.isoformat(), "status": "failed", "failure": failure_of(cause),
                      "error": " ".join(reason.split())}


def run_nights(options, nights: list[date], run_night: Callable, keep_going: bool, job: str) -> dict:
    """Run `run_night(for_night(options, night))` for each night in turn; the backfill's summary, or
    NightsFailed carrying it."""
    done: list[dict] = []
    for i, night in enumerate(nights):
        logs.get(job).info(f"run_date {night} ({i + 1} of {len(nights)})")
        try:
            done.append(run_night(for_night(options, night)) | {"status": "succeeded"})
        except Exception as e:  # a signal (KeyboardInterrupt) stops the whole backfill
            done.append(_failed_night(night, e))
            logs.get(job).error(f"run_date {night}: {done[-1]['error']}")
            if not keep_going:
                break
    failed = [n for n in done if n["status"] == "failed"]
    summary = {"run_dates": [n.isoformat() for n in nights], "nights": done,
               "nights_succeeded": len(done) - len(failed), "nights_failed": len(failed),
               "nights_not_run": [n.isoformat() for n in nights[len(done):]]}
    if failed:
        first = failed[0]
        raise NightsFailed(f"{len(failed)} of {len(nights)} nights failed, first run_date {first['run_date']}: "
                           f"{first['error']}", summary, first["failure"])
    return summary
