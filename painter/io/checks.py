"""Cheap checks a job makes before it starts any work: inputs readable, outputs writable, storage reachable.

Each raises a `PainterError` whose one line names the path (first) and the option, so a job that cannot work
stops in a second with that reason instead of after starting Ray, or part-way with a library's traceback:
- `check_inputs`: the paths name files; Parquet files have a readable footer; the first bytes of a TSV
  are not binary data (`looks_binary`). At most `SNIFF_FILES` files are opened; bad rows of the
  others are still rejected row by row as they are read.
- `check_output`: a local path has no file where a folder must be and a writable folder above it; on
  object storage the bucket exists and answers (transient errors are retried, `painter.io.retries`).
No Ray in this module.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import os

import pyarrow as pa
import pyarrow.parquet as pq

from painter.errors import InputError, StorageError
from painter.io import tables

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
                 extensions: tuple[str, ...] = tables.TABLE_EXTENSIONS) -> list[str]:
    """The input files named by `paths`, after refusing missing, unreachable, binary or broken ones."""
    try:
        files = tables.expand_paths(paths, storage or None, extensions)
    except Exception as e:  # refused connections, denied access: after the retries
        if isinstance(e, InputError):
            raise
        raise StorageError(f"{', '.join(paths)}: cannot list the {option} files ({describe(e)})") from None
    for path in files[:SNIFF_FILES]:
        _sniff(option, path, storage)
    return files


def _sniff(option: str, path: str, storage: "Storage | dict | None") -> None:
    fs, stripped = tables.url_to_fs(path, storage)
    try:
        with fs.open(stripped, "rb") as f:
            if tables.is_parquet(path):
                pq.read_schema(f)
                return
            head = f.read(SNIFF_BYTES)
    except IsADirectoryError:
        raise InputError(f"{path}: a directory, not a table file ({option})") from None
    except pa.ArrowException as e:  # "Parquet magic bytes not found", a footer cut short, ...
        raise InputError(f"{path}: not a readable Parquet file ({option}; {describe(e)})") from None
    except Exception as e:  # denied access, refused connections (after the retries)
        raise StorageError(f"{path}: cannot read the {option} file ({describe(e)})") from None
    if looks_binary(head):
        raise InputError(f"{path}: binary data, not a TSV table ({option}; not UTF-8 text and a NUL byte at "
                         f"offset {head.index(0)})")


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
