"""Every path under a generate output root, and the checks on the names that become paths.

Layout (every path goes through fsspec or delta-rs, so `s3://bucket/prefix` works like a local folder):

    <output>/_delta_log/, <output>/run_date=D/…     the Delta Lake table of images (`painter.io.output_table`)
    <output>/_rejected/run_date=D/part-*.parquet    rejected prompt rows of the night's latest run (Parquet
                                                    parts written by its tasks; emptied when a run starts:
                                                    a report, not a table to append to)
    <output>/_sheets/run_date=D/contact_sheet.png   contact sheet (and gallery.html) of the committed night
    <output>/_runs/run_date=D/<run id>.json         one record per run: options and summary
    <output>/_keys_<run id>/                        the run's prompt keys while it looks for repeated idx
                                                    (`painter.io.key_buckets`; deleted when that is done)

`OutputRoot` is the one owner of these paths; the names starting with `_` are ignored by Delta readers
and by the table's vacuum. Single files are replaced atomically (`Storage.write_atomic`: a temp file, then
a rename locally or a server-side copy on S3).

No Ray in this module.
"""
from __future__ import annotations

import json
import posixpath
import re
from datetime import date
from typing import Iterable

import pyarrow as pa

from painter.errors import InputError
from painter.io import sheet
from painter.io.output_table import OutputTable
from painter.io.storage import Storage, as_storage, writing

REJECTED, SHEETS, RUNS, KEYS = "_rejected", "_sheets", "_runs", "_keys"
SHEET_SAMPLES = 8  # samples of a prompt shown on the contact sheet and the gallery
_COLUMN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def check_run_date(run_date: str) -> str:
    """`run_date` if it is a real YYYY-MM-DD date, else InputError."""
    try:
        if not _DATE.fullmatch(run_date or ""):
            raise ValueError
        date.fromisoformat(run_date)
    except ValueError:
        raise InputError(f"--run-date {run_date!r}: expected a date as YYYY-MM-DD") from None
    return run_date


def check_partition_columns(columns: Iterable[str], reserved: Iterable[str] = ()) -> list[str]:
    """Partition column names: plain identifiers, not reserved, each once."""
    columns, reserved = list(columns), set(reserved) | {"run_date"}
    for name in columns:
        if not _COLUMN_NAME.fullmatch(name):
            raise InputError(f"--partition-by {name!r}: column names must match {_COLUMN_NAME.pattern}")
        if name in reserved:
            raise InputError(f"--partition-by {name!r}: that column is written by the job; choose an input column")
    if len(set(columns)) != len(columns):
        raise InputError(f"--partition-by {columns}: a column is named twice")
    return columns


def write_bytes(url: str, data: bytes, storage_options: "Storage | dict | None" = None) -> str:
    """Replace the file at a local path or URL in one step (`Storage.write_atomic`); returns the URL."""
    with writing(url):
        return as_storage(storage_options).write_atomic(url, data)


class OutputRoot:
    """The generate output root for one run date: the Delta table and the folders beside it."""

    def __init__(self, output: str, run_date: str, storage_options: Storage | dict | None = None,
                 errors: str | None = None):
        self.output, self.run_date = output.rstrip("/"), check_run_date(run_date)
        self.storage_options = as_storage(storage_options).options
        self.table = OutputTable(self.output, self.storage_options)
        self.errors_root = (errors or posixpath.join(self.output, REJECTED)).rstrip("/")

    def _beside(self, folder: str, name: str) -> str:
        return posixpath.join(self.output, folder, f"run_date={self.run_date}", name)

    def rejected_folder(self) -> str:
        """The folder of the night's rejected rows (Parquet parts), emptied by `clear_rejected`."""
        return posixpath.join(self.errors_root, f"run_date={self.run_date}")

    def clear_rejected(self) -> str:
        """Empty the night's rejected rows (a run starting replaces them); returns the folder."""
        folder = self.rejected_folder()
        with writing(folder, "the rejected rows"):
            as_storage(self.storage_options).remove(folder, recursive=True)
        return folder

    def keys_folder(self, run_id: str) -> str:
        """Where run `run_id` keeps its prompt keys (`painter.io.key_buckets.KeyBuckets`) for a while."""
        return posixpath.join(self.output, f"{KEYS}_{run_id}")

    def write_sheet(self, name: str, data: bytes) -> str:
        """A file of the night's `_sheets/` folder (contact_sheet.png, gallery.html); its URL."""
        return write_bytes(self._beside(SHEETS, name), data, self.storage_options)

    def write_sheets(self, *, contact_sheet: bool, gallery: bool, prompts: int, font: str | None = None,
                     image_format: str = "png") -> dict:
        """Contact sheet and gallery of the committed night's first `prompts` prompts; their URLs and the
        caption font used."""
        result = {"contact_sheet": None, "gallery": None}
        if not (contact_sheet or gallery):
            return result
        rows = self._sheet_rows(prompts)
        if not rows:
            return result | {"sheet_note": "no committed images to show"}
        if contact_sheet:
            found = sheet.find_caption_font(font)
            result["contact_sheet"] = self.write_sheet("contact_sheet.png", sheet.contact_sheet(rows, found))
            result["caption_font"], result["caption_font_note"] = found.path, found.note
        if gallery:
            page = sheet.gallery_html(rows, f"painter {self.run_date}", image_format)
            result["gallery"] = self.write_sheet("gallery.html", page.encode("utf-8"))
        return result

    def _sheet_rows(self, prompts: int) -> list[list[sheet.SheetItem]]:
        """The committed images of the night's first `prompts` idx (sorted), a row of samples each."""
        chosen = self.table.first_idx(self.run_date, prompts)
        if not chosen:
            return []
        rows = self.read(["idx", "text", "sample", "image"], idx=chosen).sort_by(
            [("idx", "ascending"), ("sample", "ascending")]).to_pylist()
        grouped: dict[str, list[sheet.SheetItem]] = {}
        for r in rows:
            grouped.setdefault(r["idx"], []).append(sheet.SheetItem(r["image"], r["idx"], r["sample"], r["text"]))
        return [items[:SHEET_SAMPLES] for items in grouped.values()]

    def write_run_record(self, run_id: str, record: dict) -> str:
        """The run's record (options and summary) under `_runs/`; its URL."""
        data = json.dumps(record, ensure_ascii=False, default=str).encode()
        return write_bytes(self._beside(RUNS, f"{run_id}.json"), data, self.storage_options)

    def read(self, columns: list[str] | None = None, idx: list[str] | None = None) -> pa.Table:
        """The night's committed rows (see `OutputTable.read`)."""
        return self.table.read(self.run_date, columns, idx)
