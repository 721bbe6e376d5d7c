"""Tables whose files name their own columns: CSV with a header row, JSON lines, and Hugging Face image
folders; plus the decompression of `.gz`/`.zst` text tables.

- `iter_csv`: comma-separated, a header row, quoted fields (Python's `csv`); a record with the wrong
  number of fields gets a reason. Never split on tabs: `.csv` means CSV.
- `iter_jsonl`: one JSON object per line; a line that is not one gets a reason.
- An image folder (HF `imagefolder`): images beside a `metadata.jsonl` or `metadata.csv` whose
  `file_name` column names each row's image, relative to the metadata file. `image_folder_rows` reads
  those images into the rows (`image`), and `idx` is the file name unless the table or `--columns`
  gives one. A row whose image file is missing gets that reason.
- `open_text_table`: a binary stream of a table's lines, gunzipped or un-zstd'ed by pyarrow when the
  name ends `.gz` or `.zst` (no extra dependency).
Every chunk carries `_source`, `_row` (the line number of the record's last line) and `_reason`.
No Ray in this module.
"""
from __future__ import annotations

import csv
import io
import json
import posixpath
from typing import Iterator

import pyarrow as pa

from painter.io.columns import IMAGE, read_beside
from painter.io.rows import REASON, ROW, SOURCE
from painter.io.storage import as_storage

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FILE_NAME = "file_name"
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}


class _Raw(io.RawIOBase):
    """A pyarrow input stream as a Python raw stream, so `io.BufferedReader` can give it lines."""

    def __init__(self, stream):
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def compression(path: str) -> str | None:
    return next((codec for ext, codec in COMPRESSIONS.items() if path.endswith(ext)), None)


def open_text_table(f, path: str):
    """`f` (an open binary file) as a stream of lines, decompressed when `path` ends `.gz` or `.zst`."""
    codec = compression(path)
    if codec is None:
        return f
    return io.BufferedReader(_Raw(pa.input_stream(f, compression=codec)), 1 << 20)


def _chunks(records: Iterator[tuple[int, dict | None, str | None]], path: str, chunk_rows: int
            ) -> Iterator[dict[str, list]]:
    """Chunks of (line number, {column: value} or None, reason) records: the union of the chunk's columns."""
    batch: list[tuple[int, dict | None, str | None]] = []

    def chunk() -> dict[str, list]:
        names = list(dict.fromkeys(name for _, values, _ in batch for name in (values or {})))
        out = {name: [(values or {}).get(name) for _, values, _ in batch] for name in names}
        out[SOURCE] = [path] * len(batch)
        out[ROW] = [number for number, _, _ in batch]
        out[REASON] = [reason for _, _, reason in batch]
        return out

    for record in records:
        batch.append(record)
        if len(batch) >= chunk_rows:
            yield chunk()
            batch = []
    if batch:
        yield chunk()


def _csv_records(f) -> Iterator[tuple[int, dict | None, str | None]]:
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader, None)
        if header is None:
            return
        for fields in reader:
            if not any(field.strip() for field in fields):
                continue  # blank lines are no records
            if len(fields) != len(header):
                yield reader.line_num, None, (f"expected {len(header)} comma-separated fields "
                                              f"({','.join(header)}), got {len(fields)}")
            else:
                yield reader.line_num, dict(zip(header, fields)), None
    except UnicodeDecodeError as e:
        yield reader.line_num + 1, None, f"not UTF-8 text (byte {e.start} of a read); the rest of the file is unread"
    except csv.Error as e:
        yield reader.line_num, None, f"not readable as CSV ({e}); the rest of the file is unread"


def csv_header(f) -> list[str]:
    """The header row of an open CSV file ([] when empty)."""
    return next(csv.reader(io.TextIOWrapper(f, encoding="utf-8", newline="")), None) or []


def _jsonl_records(f) -> Iterator[tuple[int, dict | None, str | None]]:
    for number, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except ValueError as e:
            yield number, None, f"not a JSON object ({e})"
            continue
        if not isinstance(value, dict):
            yield number, None, f"not a JSON object (a {type(value).__name__})"
            continue
        yield number, {k: v if v is None or isinstance(v, (str, dict, list)) else str(v) for k, v in value.items()}, None


def iter_csv(path: str, storage=None, chunk_rows: int = 256) -> Iterator[dict[str, list]]:
    with as_storage(storage).open(path, "rb") as f:
        yield from _chunks(_csv_records(open_text_table(f, path)), path, chunk_rows)


def iter_jsonl(path: str, storage=None, chunk_rows: int = 256) -> Iterator[dict[str, list]]:
    with as_storage(storage).open(path, "rb") as f:
        yield from _chunks(_jsonl_records(open_text_table(f, path)), path, chunk_rows)


def is_image_folder(path: str) -> bool:
    return posixpath.basename(path) in METADATA_FILES


def image_folder_rows(chunk: dict[str, list], path: str, mapping: dict[str, str], storage=None) -> None:
    """Each row's image read from the file its `file_name` names (beside `path`), in place; `idx` is the file
    name where neither the table nor `mapping` gives one. Rows without a usable file get a reason."""
    if IMAGE in mapping:
        return  # --columns names the image column itself
    n = len(chunk[ROW])
    names = chunk.get(FILE_NAME) or [None] * n
    images = chunk.setdefault(IMAGE, [None] * n)
    for i, name in enumerate(names):
        if chunk[REASON][i] is not None:
            continue
        if not name:
            chunk[REASON][i] = f"no {FILE_NAME!r} (an image folder's metadata names each row's image)"
            continue
        images[i], chunk[REASON][i] = read_beside(path, str(name), storage)
    if "idx" not in chunk and "idx" not in mapping:
        chunk["idx"] = list(names)
