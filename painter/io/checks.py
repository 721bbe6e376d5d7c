"""Cheap checks a job makes before it starts any work: inputs readable, outputs writable, storage reachable.

Each raises a `PainterError` whose one line names the path (first) and the option, so a job that cannot work
stops in a second with that reason instead of after starting Ray, or part-way with a library's traceback:
- `check_inputs`: the paths name files; Parquet files have a readable footer, tar shards a first
  sample, CSV files a header; the first bytes of a TSV (decompressed) are not binary data
  (`looks_binary`); every input name `--columns` maps is a column of each file (a TSV's are its
  `--input-schema` names). At most `SNIFF_FILES` files are opened; bad rows of the others are still
  rejected row by row as they are read.
- `check_output`: a local path has no file where a folder must be and a writable folder above it; on
  object storage the bucket exists and answers (transient errors are retried, `painter.io.retries`).
No Ray in this module.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import csv
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from painter.errors import InputError, StorageError
from painter.io import columns as column_map
from painter.io import records, tables, webdataset

if TYPE_CHECKING:
    from painter.io.storage import Storage

SNIFF_FILES = 64
SNIFF_BYTES = 4096


def describe(error: BaseException) -> str:
    """`Type: first line` of a library's error (no traceback, no credentials: botocore never puts them in
    its messages)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def check_inputs(option: str, paths: list[str], storage: "Storage | dict | None" = None,
                 extensions: tuple[str, ...] = tables.TABLE_EXTENSIONS, columns: dict[str, str] | None = None,
                 schema: list[tables.Column] | None = None) -> list[str]:
    """The input files named by `paths`, after refusing missing, unreachable, binary or broken ones, and
    those that lack a column `columns` (`--columns`) names."""
    try:
        files = tables.expand_paths(paths, storage or None, extensions)
    except Exception as e:  # refused connections, denied access: after the retries
        if isinstance(e, InputError):
            raise
        raise StorageError(f"{', '.join(paths)}: cannot list the {option} files ({describe(e)})") from None
    for path in files[:SNIFF_FILES]:
        names = _sniff(option, path, storage)
        if names is None and schema:  # a TSV: its columns are the --input-schema names
            names = [c.name for c in schema]
        if columns and names is not None and (lacking := column_map.missing(names, columns)):
            has = f"it has {', '.join(names)}" if names else "it has no rows"
            what = "the --input-schema names" if tables.is_tsv(path) else "the file's columns"
            raise InputError(f"{path}: --columns names {lacking[0]!r}, not among {what} ({option}; {has})")
        if schema and names and not tables.is_tsv(path) and not tables.is_parquet(path) and not path.endswith(".tar"):
            _check_header(option, path, names, columns or {}, schema)
    return files


def _check_header(option: str, path: str, names: list[str], columns: dict[str, str],
                  schema: list[tables.Column]) -> None:
    """A CSV or JSON-lines file must have (after `--columns`) every column the job reads: a CSV without a
    header row is refused here rather than read with its first row as the header."""
    have = column_map.renamed(names, columns)
    lacking = [c.name for c in schema if c.name not in have]
    if lacking:
        raise InputError(f"{path}: no {lacking[0]!r} column among {', '.join(names)} ({option}; a .csv needs a "
                         f"header row, and --columns {lacking[0]}=NAME maps another name onto it)")


def _names(path: str, f) -> list[str] | None:
    """The column names of an open input file (None: a TSV, whose names its schema gives)."""
    if tables.is_parquet(path):
        return list(pq.read_schema(f).names)
    if path.endswith(".tar"):
        for key, parts in webdataset.samples(f):
            return webdataset.names(key, parts)
        return []
    if tables.is_tsv(path):
        return None
    lines = records.open_text_table(f, path)
    if path.removesuffix(".gz").removesuffix(".zst").endswith(".jsonl"):
        first = next((line for line in lines if line.strip()), b"{}")
        names = list(json.loads(first))
    else:
        names = records.csv_header(lines)
    if records.is_image_folder(path):  # its rows get the image, and the file name as idx (records)
        return names + [column_map.IMAGE] + ([] if "idx" in names else ["idx"])
    return names


def _sniff(option: str, path: str, storage: "Storage | dict | None") -> list[str] | None:
    """The file's column names (`_names`), after refusing a file that is not what its name says."""
    fs, stripped = tables.url_to_fs(path, storage)
    try:
        with fs.open(stripped, "rb") as f:
            if not tables.is_tsv(path):
                return _names(path, f)
            try:
                head = records.open_text_table(f, path).read(SNIFF_BYTES)
            except OSError as e:
                if records.compression(path) is None:
                    raise
                raise InputError(f"{path}: not a readable {records.compression(path)} file ({option}; "
                                 f"{describe(e)})") from None
    except InputError:
        raise
    except IsADirectoryError:
        raise InputError(f"{path}: a directory, not a table file ({option})") from None
    except pa.ArrowException as e:  # "Parquet magic bytes not found", a footer cut short, a bad gzip ...
        what = "Parquet file" if tables.is_parquet(path) else f"{records.compression(path)} file"
        raise InputError(f"{path}: not a readable {what} ({option}; {describe(e)})") from None
    except (tarfile.TarError, EOFError) as e:
        raise InputError(f"{path}: not a readable WebDataset tar shard ({option}; {describe(e)})") from None
    except (ValueError, csv.Error) as e:  # a first JSON line that is no object, text that is not UTF-8
        raise InputError(f"{path}: not a readable {path.rsplit('.', 1)[-1]} table ({option}; {describe(e)})") from None
    except Exception as e:  # denied access, refused connections (after the retries)
        raise StorageError(f"{path}: cannot read the {option} file ({describe(e)})") from None
    if looks_binary(head):
        raise InputError(f"{path}: binary data, not a TSV table ({option}; not UTF-8 text and a NUL byte at "
                         f"offset {head.index(0)})")
    return None


def looks_binary(head: bytes) -> bool:
    """A file's first bytes are binary data: a NUL byte and not UTF-8 (a text table may hold a NUL in a
    field, and a row that is not UTF-8 is rejected on its own; both at once is no table)."""
    if b"\x00" not in head:
        return False
    try:
        head.decode("utf-8")
        return False
    except UnicodeDecodeError as e:
        return e.start < len(head) - 3  # not merely a character cut by the read


def check_output(option: str, path: str | None, storage: "Storage | dict | None" = None) -> None:
    """Refuse an output `path` that cannot be written: a file in the way, no writable folder, no bucket."""
    if not path:
        return
    if "://" not in path or path.startswith("file://"):
        _check_local_output(option, path.removeprefix("file://"))
        return
    fs, stripped = tables.url_to_fs(path, storage)
    bucket = stripped.split("/", 1)[0]
    try:
        if hasattr(fs, "call_s3"):  # s3fs: ask for the bucket itself (its `exists` says False for a dead endpoint)
            fs.call_s3("head_bucket", Bucket=bucket)
        elif not fs.exists(bucket):
            raise FileNotFoundError(bucket)
    except FileNotFoundError:
        raise StorageError(f"{option} {path}: no such bucket {bucket!r}") from None
    except Exception as e:  # refused connections, unknown hosts, denied access: after the retries
        raise StorageError(f"{option} {path}: cannot reach the storage ({describe(e)})") from None


def _check_local_output(option: str, path: str) -> None:
    path = os.path.abspath(path)
    if os.path.isfile(path):
        raise InputError(f"{option} {path}: is a file, not a folder")
    above = os.path.dirname(path)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise InputError(f"{option} {path}: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: the folder {above} is not writable")
