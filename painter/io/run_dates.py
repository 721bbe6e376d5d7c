"""The nights a nightly job runs for, and the paths it reads and writes for each.

`--run-date` is `today`, `yesterday`, a date `YYYY-MM-DD`, or an inclusive range `A..B` of those (a
backfill); "today" is the date in `--timezone` (an IANA name, default UTC) when the job starts, so a
CronJob firing at 01:00 in Shanghai means Shanghai's date. Paths may hold `{run_date}` (2026-12-01)
or `{run_date:FORMAT}` (strftime, e.g. `{run_date:%Y/%m/%d}` -> 2026/12/01), filled from the night; any
other brace (a glob's `{a,b}`) is left alone. No Ray in this module.
"""
from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from painter.errors import InputError

MAX_NIGHTS = 366  # a backfill of more is more likely a typo than a plan
_FIELD = re.compile(r"\{run_date(?::([^{}]*))?\}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def zone(name: str) -> ZoneInfo:
    """The time zone named `name`, or InputError naming --timezone."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InputError(f"--timezone {name!r}: not a time zone name (such as UTC or Asia/Shanghai)") from None


def _one(word: str, today: date) -> date:
    word = word.strip()
    if word == "today":
        return today
    if word == "yesterday":
        return today - timedelta(days=1)
    try:
        if _DATE.fullmatch(word):
            return date.fromisoformat(word)
    except ValueError:
        pass
    raise InputError(f"--run-date {word!r}: expected today, yesterday, a date as YYYY-MM-DD, or a range A..B of those")


def nights(spec: str | None, timezone: str = "UTC", now: datetime | None = None) -> list[date]:
    """The nights `spec` names, in order (one for a single date; `None` is today), today being `now`'s
    date (default: the current time) in `timezone`."""
    today = (now or datetime.now(tz=ZoneInfo("UTC"))).astimezone(zone(timezone)).date()
    spec = spec or "today"
    if ".." not in spec:
        return [_one(spec, today)]
    first, _, last = spec.partition("..")
    start, end = _one(first, today), _one(last, today)
    if end < start:
        raise InputError(f"--run-date {spec!r}: the range ends before it starts")
    if (end - start).days >= MAX_NIGHTS:
        raise InputError(f"--run-date {spec!r}: {(end - start).days + 1} nights; at most {MAX_NIGHTS} in one run")
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def is_range(spec: str | None) -> bool:
    return bool(spec) and ".." in spec


def fill(path: str | None, night: date) -> str | None:
    """`path` with every `{run_date}` / `{run_date:FORMAT}` replaced by the night's date."""
    if path is None:
        return None
    return _FIELD.sub(lambda m: night.strftime(m.group(1)) if m.group(1) else night.isoformat(), path)
