"""The generation output table: partition paths, staging, the `_SUCCESS` commit, recovery.

Layout (every path goes through fsspec, so `s3://bucket/prefix` works like a local folder):

    <output>/run_date=D/[col=value/…]part-<run id>-<uuid>.parquet   data files (partition columns in the path)
    <output>/run_date=D/[col=value/…]_SUCCESS                       JSON: the partition's values and files
    <output>/_staging/run_date=D/<run id>/_RUN.json                   the run's generation signature
    <output>/_staging/run_date=D/<run id>/[col=value/…]part-*.parquet files staged by the workers

Only files listed in a partition's `_SUCCESS` exist for readers and reruns. Committing a partition
copies its staged files in under their own names (still invisible: not listed), replaces `_SUCCESS`
with one atomic write (a temp file, then a rename locally or a single PUT on S3), and only then
deletes the staged files. On S3 a move is copy + delete, so nothing here relies on a rename of data.
A crash at any point leaves: staged files (recovered by the next run with the same signature),
copied-but-unlisted files (invisible, overwritten by the same name on the next commit), or staged
files already listed (deleted by the next run). Files are checked pair by pair against what is
committed before they are used, so every (idx, sample) is listed exactly once. One run at a time per
(output, run_date) is assumed; concurrent runs are not coordinated.

Partition values are percent-encoded (`encode_partition_value`): ASCII letters, digits, `-_.` and
non-ASCII letters/digits/marks stay as they are, every other character becomes %XX of its UTF-8
bytes, so no `/`, `\\`, `..`, control character or empty name reaches a path, and Hive readers
(pyarrow's default `segment_encoding="uri"`) decode values back. Documented exceptions: None and ''
both mean null and become `__HIVE_DEFAULT_PARTITION__` (as in Hive), and values whose encoding
exceeds `MAX_SEGMENT_BYTES` are cut and end in `~` + a hash; `_SUCCESS` keeps their exact value.
No Ray in this module.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import re
import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from painter.errors import InputError
from painter.io.tables import url_to_fs

DEFAULT_PARTITION = "__HIVE_DEFAULT_PARTITION__"
MAX_SEGMENT_BYTES = 160
SUCCESS, RUN_MARKER, STAGING = "_SUCCESS", "_RUN.json", "_staging"
PARTITION_KEY, SIGNATURE_KEY = b"painter.partition", b"painter.signature"
_SAFE_ASCII = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_COLUMN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _char_token(ch: str) -> str:
    if ch in _SAFE_ASCII or (ord(ch) > 127 and unicodedata.category(ch)[0] in "LNM"):
        return ch
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))


def encode_partition_value(value) -> str:
    """A path-safe, injective name for one partition value (see the module docstring)."""
    if value is None or value == "":
        return DEFAULT_PARTITION
    text = str(value)
    tokens = [_char_token(ch) for ch in text]
    if set(text) == {"."} or text == DEFAULT_PARTITION:
        tokens[0] = "%2E" if text[0] == "." else "%5F"  # never '.', '..' or the null name
    encoded = "".join(tokens)
    if len(encoded.encode("utf-8")) <= MAX_SEGMENT_BYTES:
        return encoded
    digest = "~" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    kept, size = [], 0
    for token in tokens:  # cut between characters, never inside a %XX escape
        size += len(token.encode("utf-8"))
        if size > MAX_SEGMENT_BYTES - len(digest):
            break
        kept.append(token)
    return "".join(kept) + digest


def decode_partition_value(segment: str) -> str | None:
    """The value named by `encode_partition_value`; hashed long values cannot be decoded (ValueError)."""
    from urllib.parse import unquote

    if segment == DEFAULT_PARTITION:
        return None
    if "~" in segment:
        raise ValueError(f"partition value {segment[:40]!r}… was shortened with a hash; read it from _SUCCESS")
    return unquote(segment, errors="strict")


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


def partition_path(values: list[tuple[str, object]]) -> str:
    """Relative hive path `col=value/…` for [(column, value), …]."""
    return "/".join(f"{column}={encode_partition_value(value)}" for column, value in values)


@dataclass
class StagedFile:
    """One Parquet file a worker wrote: its path (no protocol), partition folder and exact values."""
    path: str
    partition: str  # relative to the output root, e.g. "run_date=2024-05-01/category=shoes"
    values: str  # JSON [[column, value], …], exact (None and '' kept apart)
    rows: int


@dataclass
class Recovery:
    """Staged files of earlier, unfinished runs with this run's signature, checked against the table."""
    files: list[StagedFile] = field(default_factory=list)
    pairs: set = field(default_factory=set)
    discarded_files: int = 0  # unreadable (cut off by a crash) or wholly committed already
    runs: list[str] = field(default_factory=list)  # run folders with this signature: removed after the commit
    ignored_runs: list[str] = field(default_factory=list)  # other signatures: left untouched


def _temp_beside(path: str) -> str:
    head, tail = posixpath.split(path)
    return posixpath.join(head, f"_{tail}.{uuid.uuid4().hex}.tmp")  # '_': hidden from Hive readers


def write_atomic(fs, path: str, data: bytes) -> None:
    """Replace `path` in one step: a temp file beside it, then a rename (local) or a PUT-copy (S3)."""
    head = posixpath.dirname(path)
    if head:
        fs.makedirs(head, exist_ok=True)
    tmp = _temp_beside(path)
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> str:
    """`write_atomic` for a local path or URL; returns the URL."""
    fs, path = url_to_fs(url, storage_options)
    write_atomic(fs, path, data)
    return url


def pairs(table: pa.Table) -> list[tuple[str, int]]:
    """(idx, sample) of every row of `table`."""
    return list(zip(table.column("idx").to_pylist(), table.column("sample").to_pylist()))


class OutputTable:
    """The generation output for one run date under `output` (a local path or URL)."""

    def __init__(self, output: str, run_date: str, storage_options: dict | None = None):
        self.output, self.run_date = output.rstrip("/"), check_run_date(run_date)
        self.storage_options = storage_options or {}
        self.fs, self.root = url_to_fs(self.output, self.storage_options)
        self.root = self.root.rstrip("/")
        self.date_dir = posixpath.join(self.root, f"run_date={self.run_date}")
        self.staging_root = posixpath.join(self.root, STAGING, f"run_date={self.run_date}")

    def __reduce__(self):  # ship to workers by what names it, not by its open filesystem
        return OutputTable, (self.output, self.run_date, self.storage_options)

    def url(self, path: str) -> str:
        """`path` (as this filesystem names it) as a URL the user can pass back in."""
        protocol = self.output.split("://", 1)[0] + "://" if "://" in self.output else ""
        return protocol + path if protocol else path

    def staging_dir(self, run_id: str) -> str:
        return posixpath.join(self.staging_root, run_id)

    # -- writing -------------------------------------------------------------------------------

    def write_atomic(self, path: str, data: bytes) -> None:
        write_atomic(self.fs, path, data)

    def start_run(self, run_id: str, signature: str, options: dict) -> None:
        """Mark a run's staging folder with its signature (what recovery compares)."""
        marker = {"run_id": run_id, "signature": signature, "options": options}
        self.write_atomic(posixpath.join(self.staging_dir(run_id), RUN_MARKER),
                          json.dumps(marker, ensure_ascii=False, default=str).encode())

    def stage(self, rows: pa.Table, run_id: str, partition_by: list[str], signature: str) -> list[StagedFile]:
        """Write `rows` into the run's staging folder, one file per partition; partition columns go to paths."""
        keys = [rows.column(c).to_pylist() for c in partition_by]
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(zip(*keys) if keys else [()] * rows.num_rows):
            groups.setdefault(tuple(key), []).append(i)
        data = rows.drop_columns(partition_by)
        staged = []
        for key, indices in groups.items():
            exact = [(c, None if v is None or v == "" else str(v)) for c, v in zip(partition_by, key)]
            values = [("run_date", self.run_date), *exact]
            rel = partition_path(values)
            part = data.take(indices).replace_schema_metadata({
                PARTITION_KEY: json.dumps(values, ensure_ascii=False).encode(), SIGNATURE_KEY: signature.encode()})
            folder = posixpath.join(self.staging_dir(run_id), rel)
            path = posixpath.join(folder, f"part-{run_id}-{uuid.uuid4().hex[:12]}.parquet")
            self.fs.makedirs(folder, exist_ok=True)
            with self.fs.open(path, "wb") as f:
                pq.write_table(part, f)
            staged.append(StagedFile(path, rel, json.dumps(values, ensure_ascii=False), len(indices)))
        return staged

    # -- committed state -----------------------------------------------------------------------

    def manifests(self) -> dict[str, dict]:
        """{partition folder (relative): its `_SUCCESS` manifest} for every committed partition of the date."""
        if not self.fs.exists(self.date_dir):
            return {}
        found = {}
        for path in sorted(self.fs.find(self.date_dir)):
            if posixpath.basename(path) == SUCCESS:
                folder = posixpath.dirname(path)
                with self.fs.open(path, "rb") as f:
                    found[posixpath.relpath(folder, self.root)] = json.loads(f.read())
        return found

    def committed_files(self) -> Iterator[tuple[dict, str]]:
        """(exact partition values, file path) for every file listed by a `_SUCCESS` of the date."""
        for rel, manifest in self.manifests().items():
            values = dict(manifest["partition"])
            for entry in manifest["files"]:
                yield values, posixpath.join(self.root, rel, entry["name"])

    def _read_file(self, path: str, columns: list[str] | None, filters=None) -> pa.Table:
        try:
            with self.fs.open(path, "rb") as f:
                return pq.read_table(f, columns=columns, filters=filters)
        except FileNotFoundError:
            raise InputError(f"{self.url(path)}: listed in _SUCCESS but missing") from None

    def committed_pairs(self) -> pa.Table:
        """(idx, sample) of every committed row of the date."""
        parts = [self._read_file(path, ["idx", "sample"]) for _, path in self.committed_files()]
        empty = pa.table({"idx": pa.array([], pa.string()), "sample": pa.array([], pa.int64())})
        return pa.concat_tables([empty, *(p.cast(empty.schema) for p in parts)])

    def iter_committed(self, columns: list[str] | None = None, idx: Iterable[str] | None = None
                       ) -> Iterator[pa.Table]:
        """Committed rows file by file (optionally only some idx), partition columns added from `_SUCCESS`."""
        filters = [("idx", "in", list(idx))] if idx is not None else None
        for values, path in self.committed_files():
            in_file = None if columns is None else [c for c in columns if c not in values]
            table = self._read_file(path, in_file, filters)
            for column, value in values.items():
                if columns is None or column in columns:
                    table = table.append_column(column, pa.array([value] * table.num_rows, pa.string()))
            yield table

    def read(self, columns: list[str] | None = None, idx: Iterable[str] | None = None) -> pa.Table:
        """All committed rows of the date (see `iter_committed`) as one table."""
        parts = list(self.iter_committed(columns, idx))
        return pa.concat_tables(parts, promote_options="default") if parts else pa.table({})

    # -- commit and recovery -------------------------------------------------------------------

    def commit(self, staged: list[StagedFile], run_id: str) -> dict[str, int]:
        """Commit staged files partition by partition; {partition folder: rows added}."""
        by_partition: dict[str, list[StagedFile]] = {}
        for item in staged:
            by_partition.setdefault(item.partition, []).append(item)
        return {rel: self._commit_partition(rel, items, run_id) for rel, items in sorted(by_partition.items())}

    def _commit_partition(self, rel: str, items: list[StagedFile], run_id: str) -> int:
        folder = posixpath.join(self.root, rel)
        success = posixpath.join(folder, SUCCESS)
        manifest = {"partition": dict(json.loads(items[0].values)), "files": []}
        if self.fs.exists(success):
            with self.fs.open(success, "rb") as f:
                manifest = json.loads(f.read())
        listed = {entry["name"] for entry in manifest["files"]}
        self.fs.makedirs(folder, exist_ok=True)
        added = 0
        for item in items:
            name = posixpath.basename(item.path)
            if name not in listed:
                self.fs.copy(item.path, posixpath.join(folder, name))
                manifest["files"].append({"name": name, "rows": item.rows, "run_id": run_id})
                listed.add(name)
                added += item.rows
        manifest["committed_at"] = datetime.now(timezone.utc).isoformat()
        self.write_atomic(success, json.dumps(manifest, ensure_ascii=False, indent=1).encode())
        for item in items:
            self.fs.rm(item.path)
        return added

    def _run_signature(self, run_dir: str) -> str | None:
        marker = posixpath.join(run_dir, RUN_MARKER)
        if not self.fs.exists(marker):
            return None
        with self.fs.open(marker, "rb") as f:
            return json.loads(f.read()).get("signature")

    def staged_runs(self) -> list[str]:
        """Run folders under this date's staging prefix."""
        if not self.fs.exists(self.staging_root):
            return []
        return sorted(p for p in self.fs.ls(self.staging_root, detail=False) if self.fs.isdir(p))

    def recover(self, signature: str, committed: set) -> Recovery:
        """Usable staged files of earlier runs with `signature`; never yields a pair twice or a committed one."""
        recovery = Recovery()
        seen = set(committed)
        listed = {rel: {e["name"] for e in m["files"]} for rel, m in self.manifests().items()}
        for run_dir in self.staged_runs():
            if self._run_signature(run_dir) != signature:
                recovery.ignored_runs.append(self.url(run_dir))
                continue
            recovery.runs.append(run_dir)
            for path in sorted(p for p in self.fs.find(run_dir) if p.endswith(".parquet")):
                item = self._recover_file(path, run_dir, listed, seen)
                if item is None:
                    recovery.discarded_files += 1
                    self.fs.rm(path)
                    continue
                recovery.files.append(item)
        recovery.pairs = seen - set(committed)
        return recovery

    def _recover_file(self, path: str, run_dir: str, listed: dict, seen: set) -> StagedFile | None:
        """The staged file as usable (rewritten without pairs already seen), or None to discard it."""
        rel = posixpath.relpath(posixpath.dirname(path), run_dir)
        if posixpath.basename(path) in listed.get(rel, ()):
            return None  # committed by a run that stopped before deleting its staged copy
        try:
            with self.fs.open(path, "rb") as f:
                table = pq.read_table(f)
        except (OSError, pa.ArrowException):
            return None  # cut off mid-write
        values = (table.schema.metadata or {}).get(PARTITION_KEY, b"[]").decode()
        pairs_in_file = pairs(table)
        fresh = [p not in seen for p in pairs_in_file]
        seen.update(pairs_in_file)
        if not any(fresh):
            return None
        if not all(fresh):  # an earlier file already holds some of these pairs
            table = table.filter(pa.array(fresh))
            new_path = posixpath.join(posixpath.dirname(path), f"part-r{uuid.uuid4().hex[:12]}.parquet")
            with self.fs.open(new_path, "wb") as f:
                pq.write_table(table, f)
            self.fs.rm(path)
            path = new_path
        return StagedFile(path, rel, values, table.num_rows)

    def remove_runs(self, run_dirs: Iterable[str]) -> None:
        """Delete whole staging run folders (after their files were committed or discarded); the
        signature marker goes last, so a crash part-way leaves files that recovery still recognises."""
        for run_dir in run_dirs:
            if not self.fs.exists(run_dir):
                continue
            marker = posixpath.join(run_dir, RUN_MARKER)
            files = [p for p in self.fs.find(run_dir) if p != marker]
            if files:
                self.fs.rm(files)
            self.fs.rm(run_dir, recursive=True)


def write_easynlp_tsv(table: OutputTable, path: str, image_column: str,
                      storage_options: dict | None = None) -> int:
    """Every committed image of the date in EasyNLP's predict format (`painter.io.easynlp_tsv`):
    one line per idx, `idx \\t text \\t ['<base64 PNG>', ...]`; returns the number of lines."""
    from painter.io import easynlp_tsv

    return easynlp_tsv.write_easynlp_tsv(table.read(), path, image_column, storage_options)
