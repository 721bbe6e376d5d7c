"""Review decisions over a generate output table, and the export of the approved pictures.

Decisions are appended to a Delta table beside the night's images, `ROOT/_reviews` (partitioned by
run_date): one row per decision with run_date, idx, sample, decision (`approve` / `reject`), reason,
reviewer and reviewed_at. Nothing is ever updated in place: the newest decision for a picture
(run_date, idx, sample) wins, so two reviewers never lose each other's rows and the log is the history.

`export_approved` writes a night's approved pictures as files named by idx and sample (made path-safe
by the output table's own partition-value encoding, so an idx never becomes a path) plus `manifest.csv`.
"""
from __future__ import annotations

import csv
import io
import os
import posixpath
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake

from painter.errors import InputError
from painter.io.output_table import OutputTable, delta_storage_options, encode_partition_value
from painter.io.storage import as_storage

REVIEWS = "_reviews"
DECISIONS = ("approve", "reject")
MAX_REASON = 500
SCHEMA = pa.schema([
    pa.field("run_date", pa.string()), pa.field("idx", pa.string()), pa.field("sample", pa.int64()),
    pa.field("decision", pa.string()), pa.field("reason", pa.string()), pa.field("reviewer", pa.string()),
    pa.field("reviewed_at", pa.timestamp("us", tz="UTC")),
])
MANIFEST = "manifest.csv"


class ReviewTable:
    """The `_reviews` Delta table of output table `root`."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.root = root
        self.url = root.rstrip("/") + "/" + REVIEWS
        self.storage_options = storage_options or {}

    def _delta_options(self) -> dict:
        return delta_storage_options(self.url, self.storage_options)

    def exists(self) -> bool:
        if "://" not in self.url and not os.path.isdir(os.path.join(self.url, "_delta_log")):
            return False  # delta-rs raises on a local path below a file
        return DeltaTable.is_deltatable(self.url, storage_options=self._delta_options())

    def append(self, run_date: str, pictures: list[tuple[str, int]], decision: str, reason: str | None,
               reviewer: str) -> int:
        """Record one decision for each (idx, sample) of `pictures` in one commit; the rows written."""
        if decision not in DECISIONS:
            raise InputError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
        if decision == "reject" and not (reason or "").strip():
            raise InputError("a rejection needs a reason")
        now = datetime.now(timezone.utc)
        n = len(pictures)
        rows = pa.table({
            "run_date": [run_date] * n, "idx": [i for i, _ in pictures], "sample": [int(s) for _, s in pictures],
            "decision": [decision] * n, "reason": [(reason or "").strip()[:MAX_REASON] or None] * n,
            "reviewer": [reviewer] * n, "reviewed_at": [now] * n,
        }, schema=SCHEMA)
        write_deltalake(self.url, rows, mode="append", partition_by=["run_date"],
                        storage_options=self._delta_options())
        return n

    def latest(self, run_date: str) -> pa.Table:
        """The newest decision per (idx, sample) of the night: idx, sample, decision, reason, reviewer,
        reviewed_at (later commits win ties of the clock)."""
        if not self.exists():
            return SCHEMA.empty_table().drop_columns(["run_date"])
        rows = DeltaTable(self.url, storage_options=self._delta_options()).to_pyarrow_table(
            filters=[("run_date", "=", run_date)])
        rows = rows.append_column("order", pa.array(range(rows.num_rows), pa.int64()))
        rows = rows.sort_by([("reviewed_at", "ascending"), ("order", "ascending")])
        keys = [f"{i}\x00{s}" for i, s in zip(rows["idx"].to_pylist(), rows["sample"].to_pylist())]
        last = {key: n for n, key in enumerate(keys)}  # the newest row of each picture
        return rows.take(sorted(last.values())).drop_columns(["run_date", "order"])


def picture_name(idx: str, sample: int, image_format: str) -> str:
    """A file name for picture (idx, sample): the idx made path-safe, never a path of its own."""
    extension = "jpg" if image_format == "jpeg" else encode_partition_value(image_format)
    return f"{encode_partition_value(idx)}__{int(sample)}.{extension}"


def export_approved(root: str, run_date: str, output: str, storage_options: dict | None = None) -> dict:
    """Write the night's approved pictures under `output` (local folder or fsspec URL) and a manifest CSV
    (file, idx, sample, text, reviewer, reviewed_at); returns counts and the manifest's path."""
    approved = ReviewTable(root, storage_options).latest(run_date)
    approved = approved.filter(pc.equal(approved["decision"], "approve"))
    decided = {(r["idx"], r["sample"]): r for r in approved.to_pylist()}
    storage = as_storage(storage_options)
    fs, base = storage.fs(output)
    fs.makedirs(base, exist_ok=True)
    lines, written = io.StringIO(), 0
    writer = csv.writer(lines)
    writer.writerow(["file", "run_date", "idx", "sample", "text", "reviewer", "reviewed_at"])
    table = OutputTable(root, storage_options)
    idx = sorted({i for i, _ in decided})
    rows = table.read(run_date, ["idx", "sample", "text", "image", "image_format"], idx=idx) if idx else None
    for row in sorted(rows.to_pylist() if rows is not None else [], key=lambda r: (r["idx"], r["sample"])):
        decision = decided.get((row["idx"], row["sample"]))
        if decision is None:
            continue
        name = picture_name(row["idx"], row["sample"], row["image_format"])
        with fs.open(posixpath.join(base, name), "wb") as f:
            f.write(row["image"])
        writer.writerow([name, run_date, row["idx"], row["sample"], row["text"], decision["reviewer"],
                         decision["reviewed_at"].isoformat()])
        written += 1
    manifest = f"{base.rstrip('/')}/{MANIFEST}"
    with fs.open(manifest, "w", encoding="utf-8", newline="") as f:
        f.write(lines.getvalue())
    return {"approved": len(decided), "files_written": written, "manifest": manifest, "output": output}
