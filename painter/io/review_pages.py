"""What the review page shows: a night's pictures (without their bytes), filtered and paged, each with its
newest decision (`painter.io.reviews`), and one picture's bytes.

A night is read as its small columns only (idx, text, sample, image_format and the partition columns);
image bytes are read one picture at a time, by (run_date, idx, sample). Every picture of the night is
reachable: the page count is the filtered night's size over the page size.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from painter.errors import InputError
from painter.io.output import check_run_date
from painter.io.output_table import OutputTable
from painter.io.reviews import ReviewTable

MAX_PER_PAGE = 200
DECISION_FILTERS = ("", "approve", "reject", "undecided")


def partition_columns(table: OutputTable) -> list[str]:
    """The table's partition columns after run_date (the user's --partition-by)."""
    if not table.exists():
        return []
    return [c for c in table.delta().metadata().partition_columns if c != "run_date"]


def nights(table: OutputTable) -> dict:
    """The nights that hold pictures, newest first, and the partition columns with each one's values."""
    columns = partition_columns(table)
    values = {}
    if columns:
        actions = pa.table(table.delta().get_add_actions(flatten=True))
        for c in columns:
            values[c] = sorted({v for v in actions.column(f"partition.{c}").to_pylist() if v is not None})
    return {"nights": list(reversed(table.run_dates())), "partitions": values}


def _night(table: OutputTable, run_date: str, columns: list[str]) -> pa.Table:
    rows = table.read(run_date, ["idx", "text", "sample", "image_format", *columns])
    return rows.sort_by([("idx", "ascending"), ("sample", "ascending")]) if rows.num_rows else rows


def _with_decisions(rows: pa.Table, reviews: ReviewTable, run_date: str) -> list[dict]:
    latest = {(r["idx"], r["sample"]): r for r in reviews.latest(run_date).to_pylist()}
    out = []
    for row in rows.to_pylist():
        decided = latest.get((row["idx"], row["sample"]))
        row["decision"] = decided["decision"] if decided else None
        row["reason"] = decided["reason"] if decided else None
        out.append(row)
    return out


def page(table: OutputTable, reviews: ReviewTable, run_date: str, *, number: int = 1, per_page: int = 24,
         text: str = "", decision: str = "", partitions: dict | None = None) -> dict:
    """Page `number` (from 1) of the night's pictures that match: text contains `text`, decision is
    `decision` (or 'undecided', or any), each partition column equals its given value."""
    check_run_date(run_date)
    if not 1 <= per_page <= MAX_PER_PAGE or number < 1:
        raise InputError(f"per_page must be in 1..{MAX_PER_PAGE} and page at least 1")
    if decision not in DECISION_FILTERS:
        raise InputError(f"decision filter must be one of {', '.join(d or 'any' for d in DECISION_FILTERS)}")
    columns = partition_columns(table)
    unknown = set(partitions or {}) - set(columns)
    if unknown:
        raise InputError(f"unknown partition column(s): {', '.join(sorted(unknown))}")
    rows = _night(table, run_date, columns)
    if text and rows.num_rows:
        rows = rows.filter(pc.match_substring(rows["text"], text, ignore_case=True))
    for column, value in (partitions or {}).items():
        if value != "" and rows.num_rows:
            rows = rows.filter(pc.equal(rows[column], value))
    items = _with_decisions(rows, reviews, run_date)
    if decision:
        items = [r for r in items if (r["decision"] or "undecided") == decision]
    pages = max(1, -(-len(items) // per_page))
    start = (number - 1) * per_page
    return {"run_date": run_date, "page": number, "pages": pages, "per_page": per_page, "total": len(items),
            "partition_columns": columns, "items": items[start:start + per_page]}


def picture(table: OutputTable, run_date: str, idx: str, sample: int) -> tuple[bytes, str] | None:
    """(image bytes, image format) of one picture, or None when the night has no such picture."""
    check_run_date(run_date)
    rows = table.read(run_date, ["sample", "image", "image_format"], idx=[idx])
    rows = rows.filter(pc.equal(rows["sample"], int(sample))) if rows.num_rows else rows
    if not rows.num_rows:
        return None
    return rows["image"][0].as_py(), rows["image_format"][0].as_py()


def known_pictures(table: OutputTable, run_date: str, pictures: list[tuple[str, int]]) -> set[tuple[str, int]]:
    """Which of `pictures` the night holds (decisions are only recorded for real pictures)."""
    rows = table.read(run_date, ["idx", "sample"], idx=sorted({i for i, _ in pictures}))
    return set(zip(rows["idx"].to_pylist(), rows["sample"].to_pylist())) if rows.num_rows else set()
