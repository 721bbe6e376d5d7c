"""Input tables: EasyNLP-style TSV and Parquet, local or `s3://`, read row by row with reasons.

Rows are read here, not by pyarrow's CSV reader, so that a malformed row becomes a rejected row with
its file, row number and reason instead of failing the whole file. Every chunk read carries the
columns of the schema plus `_source` (file), `_row` (1-based row number) and `_reason` (None for a
good row): the bookkeeping of `painter.io.rows`. No Ray in this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from painter.errors import InputError
from painter.io.rows import REASON, ROW, SOURCE
from painter.io.storage import Storage, as_storage

DEFAULT_CHUNK_ROWS = 256
SAMPLE_ROWS = 64  # the rows `row_bytes` reads
TABLE_EXTENSIONS = (".tsv", ".txt", ".csv", ".parquet")


@dataclass(frozen=True)
class Column:
    name: str
    type: str = "str"
    count: int = 1


def parse_schema(spec: str) -> list[Column]:
    """EasyNLP's `--input-schema`: `idx:str:1,text:str:1,imgbase64:str:1` (type and count optional)."""
    columns = []
    for part in spec.split(","):
        bits = part.strip().split(":")
        if not bits[0] or len(bits) > 3:
            raise InputError(f"bad --input-schema entry {part!r}: expected name[:type[:count]]")
        count = int(bits[2]) if len(bits) == 3 else 1
        if count != 1:
            raise InputError(f"--input-schema column {bits[0]!r}: only a count of 1 is supported, got {count}")
        columns.append(Column(bits[0], bits[1] if len(bits) > 1 else "str", count))
    if len({c.name for c in columns}) != len(columns):
        raise InputError(f"--input-schema {spec!r} names a column twice")
    return columns


def url_to_fs(path: str, storage_options: Storage | dict | None = None):
    """(fsspec filesystem, path without protocol) for a local path or URL such as s3://bucket/key."""
    return as_storage(storage_options).fs(path)


def _with_protocol(fs, path: str, like: str) -> str:
    protocol = like.split("://", 1)[0] + "://" if "://" in like else ""
    return protocol + path if protocol and not path.startswith(protocol) else path


def expand_paths(paths: list[str], storage_options: Storage | dict | None = None,
                 extensions: tuple[str, ...] = TABLE_EXTENSIONS) -> list[str]:
    """Files named by paths, globs or directories/prefixes (searched for `extensions`), sorted."""
    found: list[str] = []
    for path in paths:
        fs, stripped = url_to_fs(path, storage_options)
        if any(ch in stripped for ch in "*?["):
            matches = fs.glob(stripped)
        elif fs.isdir(stripped):
            matches = as_storage(storage_options).find(path, extensions, skip_hidden=True)
        elif fs.exists(stripped):
            matches = [stripped]
        else:
            raise InputError(f"{path}: no such file or directory")
        if not matches:
            raise InputError(f"{path}: matches no input files")
        found.extend(_with_protocol(fs, m, path) for m in sorted(matches))
    return found


def is_parquet(path: str) -> bool:
    return path.endswith(".parquet") or path.endswith(".pq")


def _chunk(columns: list[str], rows: list[tuple]) -> dict[str, list]:
    return {name: [r[i] for r in rows] for i, name in enumerate(columns)}


def iter_tsv(path: str, schema: list[Column], storage_options: Storage | dict | None = None,
             chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[dict[str, list]]:
    """Chunks of rows of a headerless TSV; a row with the wrong field count or bad UTF-8 gets a reason."""
    names = [c.name for c in schema]
    columns = names + [SOURCE, ROW, REASON]
    empty = (None,) * len(names)
    rows: list[tuple] = []
    with as_storage(storage_options).open(path, "rb") as f:
        pending_blank: list[int] = []
        for number, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                pending_blank.append(number)  # blank lines at the very end are not rows
                continue
            for blank in pending_blank:
                rows.append(empty + (path, blank, "empty line"))
            pending_blank = []
            rows.append(_split_line(line, names, path, number))
            if len(rows) >= chunk_rows:
                yield _chunk(columns, rows)
                rows = []
    if rows:
        yield _chunk(columns, rows)


def _split_line(line: bytes, names: list[str], path: str, number: int) -> tuple:
    empty = (None,) * len(names)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return empty + (path, number, f"not UTF-8 text (byte {e.start})")
    fields = text.split("\t")
    if len(fields) != len(names):
        return empty + (path, number, f"expected {len(names)} tab-separated fields "
                                      f"({','.join(names)}), got {len(fields)}")
    return tuple(fields) + (path, number, None)


def iter_parquet(path: str, schema: list[Column], storage_options: Storage | dict | None = None,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, alternatives: dict[str, str] | None = None
                 ) -> Iterator[dict[str, list]]:
    """Chunks of a Parquet file: every column of the file, plus the bookkeeping columns.

    A schema column missing from the file (and from `alternatives`, e.g. {"imgbase64": "image"})
    makes every row of the file rejected with that reason. Null cells are left for the stage to judge.
    """
    alternatives = alternatives or {}
    with as_storage(storage_options).open(path, "rb") as f:
        try:
            parquet = pq.ParquetFile(f)
        except Exception as e:  # not Parquet at all
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None
        present = set(parquet.schema_arrow.names)
        missing = [c.name for c in schema if c.name not in present and alternatives.get(c.name) not in present]
        row = 0
        for batch in parquet.iter_batches(batch_size=chunk_rows):
            chunk = batch.to_pydict()
            n = batch.num_rows
            for name in missing:
                chunk[name] = [None] * n
            reason = f"missing column {missing[0]!r}" if missing else None
            chunk[SOURCE] = [path] * n
            chunk[ROW] = list(range(row + 1, row + n + 1))
            chunk[REASON] = [reason] * n
            row += n
            yield chunk


def iter_rows(path: str, schema: list[Column], storage_options: Storage | dict | None = None,
              chunk_rows: int = DEFAULT_CHUNK_ROWS, alternatives: dict[str, str] | None = None
              ) -> Iterator[dict[str, list]]:
    """Chunks of rows of one input file, TSV or Parquet by its extension."""
    if is_parquet(path):
        yield from iter_parquet(path, schema, storage_options, chunk_rows, alternatives)
    else:
        yield from iter_tsv(path, schema, storage_options, chunk_rows)


def row_bytes(path: str, schema: list[Column], storage_options: Storage | dict | None = None,
              alternatives: dict[str, str] | None = None) -> float | None:
    """The Arrow bytes a row of this file takes as read (with the bookkeeping columns), from its first
    `SAMPLE_ROWS` rows; None for a file without rows or one that is not readable (its read task gives
    the reason)."""
    chunks = iter_rows(path, schema, storage_options, SAMPLE_ROWS, alternatives)
    try:
        chunk = next(chunks, None)
    except InputError:
        return None
    finally:
        chunks.close()
    if chunk is None:  # the file has no rows
        return None
    table = pa.table(chunk)
    return table.nbytes / table.num_rows if table.num_rows else None


def parquet_rows(root: str, files: list[str], storage: Storage | dict | None = None) -> int:
    """The rows of the Parquet `files` below `root` (paths as `Storage.find(root)` gives them, without
    the protocol), from their footers alone."""
    fs, _ = as_storage(storage).fs(root)
    total = 0
    for path in files:
        with fs.open(path, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total
