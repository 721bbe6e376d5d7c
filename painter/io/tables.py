"""Input tables, local or `s3://`, read row by row with reasons; the file's name selects its format:
EasyNLP-style TSV (`.tsv`, `.txt`, also `.tsv.gz` and `.tsv.zst`), Parquet, CSV with a header row and
JSON lines (`painter.io.records`), Hugging Face image folders (their `metadata.jsonl`/`metadata.csv`),
and WebDataset `.tar` shards (`painter.io.webdataset`). `--columns` (`painter.io.columns`) is applied
here, once, so every chunk has painter's column names.

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
from painter.io import columns as column_map
from painter.io import records, webdataset
from painter.io.formats import FORMATS_HELP  # noqa: F401 (the input options' help, shown by the command line)
from painter.io.rows import REASON, ROW, SOURCE
from painter.io.storage import Storage, as_storage

DEFAULT_CHUNK_ROWS = 256
SAMPLE_ROWS = 64  # the rows `row_bytes` reads
TSV_EXTENSIONS = (".tsv", ".txt", ".tsv.gz", ".tsv.zst", ".txt.gz", ".txt.zst")
TABLE_EXTENSIONS = (*TSV_EXTENSIONS, ".csv", ".csv.gz", ".csv.zst", ".jsonl", ".parquet", ".tar")


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
            if any(m.endswith(".tar") for m in matches):  # WebDataset shards: img2dataset's .parquet beside
                matches = [m for m in matches if m.endswith(".tar")]  # them are per-shard statistics
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


def is_tsv(path: str) -> bool:
    """A headerless tab-separated table: what is neither Parquet, CSV, JSON lines nor a tar."""
    base = path.removesuffix(".gz").removesuffix(".zst")
    return not (is_parquet(path) or base.endswith((".csv", ".jsonl")) or path.endswith(".tar"))


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
        number = 0
        lines = records.open_text_table(f, path)
        try:
            for number, raw in enumerate(lines, start=1):
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
        except OSError as e:  # compressed data cut short or corrupt: the lines read are kept
            if lines is f:
                raise
            rows.append(empty + (path, number + 1, f"{records.compression(path)} data unreadable after line "
                                                   f"{number} ({type(e).__name__}: {e})"))
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
              chunk_rows: int = DEFAULT_CHUNK_ROWS, alternatives: dict[str, str] | None = None,
              columns: dict[str, str] | None = None) -> Iterator[dict[str, list]]:
    """Chunks of rows of one input file in the format its name selects, with `columns` (painter's name ->
    the input's, `painter.io.columns.parse`) applied. `schema` names a TSV's columns (before `columns`)
    and, for Parquet, the columns whose absence rejects every row."""
    columns = columns or {}
    if path.endswith(".tar"):
        yield from webdataset.iter_webdataset(path, columns, storage_options, chunk_rows)
        return
    if is_parquet(path):
        sources = {c.name: columns.get(c.name, c.name) for c in schema}
        renamed = [Column(sources[c.name], c.type, c.count) for c in schema]
        alternatives = {sources.get(k, k): columns.get(v, v) for k, v in (alternatives or {}).items()}
        chunks = iter_parquet(path, renamed, storage_options, chunk_rows, alternatives)
    elif not is_tsv(path):
        jsonl = path.removesuffix(".gz").removesuffix(".zst").endswith(".jsonl")
        chunks = (records.iter_jsonl if jsonl else records.iter_csv)(path, storage_options, chunk_rows)
    else:
        chunks = iter_tsv(path, schema, storage_options, chunk_rows)
    headed = not is_parquet(path) and not is_tsv(path)
    for chunk in chunks:
        if records.is_image_folder(path):
            records.image_folder_rows(chunk, path, columns, storage_options)
        chunk = column_map.rename(chunk, columns, path, storage_options)
        yield _fill_missing(chunk, schema, alternatives) if headed else chunk


def _fill_missing(chunk: dict[str, list], schema: list[Column], alternatives: dict[str, str] | None) -> dict:
    """A CSV or JSON-lines chunk with the schema's columns it lacks (after `--columns`) as nulls, their rows
    rejected with the reason, as Parquet's are."""
    alternatives = alternatives or {}
    n = len(chunk[ROW])
    for column in schema:
        alternative = alternatives.get(column.name)
        if column.name in chunk or alternative in chunk:
            continue
        chunk[column.name] = [None] * n
        chunk[REASON] = [reason or f"missing column {column.name!r}" for reason in chunk[REASON]]
    return chunk


def row_bytes(path: str, schema: list[Column], storage_options: Storage | dict | None = None,
              alternatives: dict[str, str] | None = None, columns: dict[str, str] | None = None) -> float | None:
    """The Arrow bytes a row of this file takes as read (with the bookkeeping columns), from its first
    `SAMPLE_ROWS` rows; None for a file without rows or one that is not readable (its read task gives
    the reason)."""
    chunks = iter_rows(path, schema, storage_options, SAMPLE_ROWS, alternatives, columns)
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
