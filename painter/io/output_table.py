"""The generation output as a Delta Lake table: data files written by workers, commits made by the driver.

Layout under the table root (a local path or `s3://bucket/prefix`, through fsspec for the data files
and delta-rs for the transaction log):

    <root>/_delta_log/                                       the transaction log: what readers see
    <root>/run_date=D/[col=value/…]part-<batch>-<k>of<n>.parquet  data files, partition columns in the path

Writing (`write_files`, called where the images are, e.g. in a Ray actor): one batch of output rows
becomes one Parquet file per partition; partition columns go to the path (percent-encoded by
`painter.io.output.encode_partition_value`) and to the file's record, never into the file. The image
bytes go from the writer to the file; what comes back is a small record per file (path, size,
partition values, rows, batch id, and the batch's (idx, sample) pairs). An uncommitted file is
invisible to every Delta reader.

Partition values are percent-encoded in paths (`encode_partition_value`): ASCII letters, digits, `-_.`
and non-ASCII letters/digits/marks stay, every other character becomes %XX of its UTF-8 bytes, so no
`/`, `\\`, `..`, control character or empty name reaches a path. Readers never parse these names: the
log holds each file's exact partition values. None and '' both mean null (`__HIVE_DEFAULT_PARTITION__`
in the path, null in the log), and values whose encoding exceeds `MAX_SEGMENT_BYTES` are cut and end
in `~` + a hash.

Committing (`Committer`, on the driver, as the records arrive): whole batches only (all the files of
a batch, or none), grouped into Delta commits of at least `commit_images` images (`commit`). Exactly once
per (run_date, idx, sample) comes from the table itself: every commit of a night carries the
transaction id `painter-generate/<run_date>` (a Delta `txn` action) at the next version, so two
commits of the same night that read the same snapshot conflict in delta-rs' conflict checker and the
loser re-reads the table and tries again. Before each attempt the pairs already in the table are read
(only the `idx` and `sample` columns of files it has not read yet, kept as 8-byte keys:
`painter.io.rows.pair_keys`), and a file holding any pair
already there is left out: such a file stays uncommitted and its other pairs are generated again by
the caller. Files nobody commits (a killed run, a lost race) are orphans: `vacuum` removes them once
they are older than the table's `delta.deletedFileRetentionDuration` (7 days unless set), which must
exceed the longest run. No Ray in this module.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import unicodedata
import time
import uuid
from urllib.parse import unquote
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable, Schema
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction, CommitProperties, Transaction, create_table_with_add_actions

from painter.errors import InputError
from painter.io.retries import delta_retry_options
from painter.io.rows import pair_keys, pairs_in
from painter.io.storage import Storage, as_storage, writing

APP_ID = "painter-generate"
DEFAULT_PARTITION = "__HIVE_DEFAULT_PARTITION__"
MAX_SEGMENT_BYTES = 160
_SAFE_ASCII = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
MAX_COMMIT_ATTEMPTS = 20
FILE_RECORD = pa.schema([
    pa.field("path", pa.string()), pa.field("size", pa.int64()), pa.field("partition_values", pa.string()),
    pa.field("rows", pa.int64()), pa.field("batch", pa.string()), pa.field("batch_files", pa.int64()),
    pa.field("idx", pa.list_(pa.string())), pa.field("sample", pa.list_(pa.int64())),
    pa.field("truncated", pa.list_(pa.string())), pa.field("stats", pa.string()),
])


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
    if segment == DEFAULT_PARTITION:
        return None
    if "~" in segment:
        raise ValueError(f"partition value {segment[:40]!r}… was shortened with a hash; read it from the Delta log")
    return unquote(segment, errors="strict")


def delta_storage_options(url: str, storage_options: dict | None) -> dict:
    """delta-rs' options for `url` from painter's fsspec `--storage-options`.

    On `s3://` the commit needs S3's conditional PUT (`aws_conditional_put=etag`: AWS S3 since 2024,
    MinIO, moto) so two writers never both create the same log version; without it delta-rs refuses
    concurrent writers unless a locking provider is configured. Credentials not given here come from
    the process's AWS environment, as for fsspec; an endpoint (given or `AWS_ENDPOINT_URL`) on plain
    http is allowed as such.
    """
    if not url.startswith(("s3://", "s3a://")):
        return {}
    given = dict(storage_options or {})
    client = dict(given.pop("client_kwargs", None) or {})
    endpoint = given.pop("endpoint_url", None) or client.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    names = {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY", "token": "AWS_SESSION_TOKEN"}
    options = {names[k]: str(v) for k, v in given.items() if k in names and v is not None}
    if endpoint:
        options["AWS_ENDPOINT_URL"] = str(endpoint)
        options["AWS_ALLOW_HTTP"] = "true" if str(endpoint).startswith("http://") else "false"
    if client.get("region_name"):
        options["AWS_REGION"] = str(client["region_name"])
    options.update({k: str(v) for k, v in given.items() if k.isupper() or k.startswith("aws_")})
    options.setdefault("aws_conditional_put", "etag")
    for name, value in delta_retry_options().items():  # bounded retries of transient errors (painter.io.retries)
        options.setdefault(name, value)
    return options


@dataclass
class CommitResult:
    """What one `commit` call did."""
    version: int | None = None  # the table's version just after its commit (None: nothing committed)
    files: int = 0
    rows: int = 0
    conflicts: int = 0  # commits lost to a concurrent writer of the same night, then retried
    paths: set = field(default_factory=set)  # the files it committed
    left_out: list = field(default_factory=list)  # (idx, sample) of files left out that were not in the table


def _stats(table: pa.Table) -> str:
    """Delta file statistics: row count and the (idx, sample) range, for readers that skip files."""
    stats = {"numRecords": table.num_rows}
    if table.num_rows:
        bounds = {c: pc.min_max(table.column(c)).as_py() for c in ("idx", "sample")}
        stats |= {"minValues": {c: b["min"] for c, b in bounds.items()},
                  "maxValues": {c: b["max"] for c, b in bounds.items()},
                  "nullCount": {c: table.column(c).null_count for c in ("idx", "sample")}}
    return json.dumps(stats, ensure_ascii=False)


def _truncated(part: pa.Table) -> list[str]:
    """idx of the rows whose text was cut to the model's text length (where the text was tokenized)."""
    if "is_truncated" not in part.column_names:
        return []
    return part.column("idx").filter(part.column("is_truncated")).to_pylist()


class OutputTable:
    """The Delta table of generated images at `root`; `partition_by` is run_date + the user's columns."""

    def __init__(self, root: str, storage_options: Storage | dict | None = None):
        self.root, self.storage_options = root.rstrip("/"), as_storage(storage_options).options
        self.delta_options = delta_storage_options(self.root, self.storage_options)
        self._pairs_by_file: dict[str, np.ndarray] = {}
        self._fs = None

    def __reduce__(self):  # ship to workers by what names it, not by open handles
        return OutputTable, (self.root, self.storage_options)

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._fs_root = as_storage(self.storage_options).fs(self.root)
        return self._fs

    def _path(self, rel: str) -> str:
        self.fs  # noqa: B018  (sets _fs_root)
        return posixpath.join(self._fs_root.rstrip("/"), rel)

    # -- the table -----------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether a Delta table is at the root (a local file or a folder without `_delta_log/` is not one)."""
        if "://" not in self.root and not os.path.isdir(os.path.join(self.root, "_delta_log")):
            return False  # delta-rs raises on a local path below a file
        return DeltaTable.is_deltatable(self.root, storage_options=self.delta_options)

    def delta(self, version: int | None = None) -> DeltaTable:
        """The table at its latest (or a given) version; InputError when there is no table at the root."""
        try:
            return DeltaTable(self.root, version=version, storage_options=self.delta_options)
        except TableNotFoundError:
            raise InputError(f"{self.root}: not a Delta table (no _delta_log)") from None

    def ensure(self, schema: pa.Schema, partition_by: list[str]) -> None:
        """Create the table (version 0, no files) or check that it is partitioned the same way and add
        the columns it lacks; InputError when a column's type or the partitioning differs."""
        if not self.exists():
            try:
                create_table_with_add_actions(self.root, Schema.from_arrow(schema), [], mode="error",
                                              partition_by=partition_by, storage_options=self.delta_options)
                return
            except Exception:
                if not self.exists():  # not a concurrent creator that won: a real failure
                    raise
        dt = self.delta()
        have = dt.metadata().partition_columns
        if list(have) != list(partition_by):
            raise InputError(f"{self.root} is partitioned by {', '.join(have)}; this run asks for "
                             f"{', '.join(partition_by)} (--partition-by must match the table's)")
        current = pa.schema(dt.schema().to_arrow())
        for name in schema.names:
            if name in current.names and not current.field(name).type.equals(schema.field(name).type):
                raise InputError(f"{self.root}: column {name!r} is {current.field(name).type} in the table "
                                 f"but {schema.field(name).type} in this run's rows")
        new = [schema.field(n).with_nullable(True) for n in schema.names if n not in current.names]
        if new:
            dt.alter.add_columns(Schema.from_arrow(pa.schema(new)).fields)

    # -- writing (workers) ---------------------------------------------------------------------

    def write_files(self, rows: pa.Table, partition_by: list[str], batch: str) -> pa.Table:
        """Write one batch of rows as one Parquet file per partition; a record per file (FILE_RECORD)."""
        keys = [rows.column(c).to_pylist() for c in partition_by]
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(zip(*keys) if keys else [()] * rows.num_rows):
            groups.setdefault(tuple(None if v is None or v == "" else str(v) for v in key), []).append(i)
        data, records = rows.drop_columns(partition_by), []
        for k, (key, indices) in enumerate(groups.items()):
            values = dict(zip(partition_by, key))
            folder = "/".join(f"{c}={encode_partition_value(v)}" for c, v in values.items())
            rel = posixpath.join(folder, f"part-{batch}-{k}of{len(groups)}.parquet")
            part = data.take(indices)
            with writing(posixpath.join(self.root, rel), "the data file"):
                self.fs.makedirs(posixpath.dirname(self._path(rel)), exist_ok=True)
                with self.fs.open(self._path(rel), "wb") as f:
                    pq.write_table(part, f)
            records.append({"path": rel, "size": self.fs.size(self._path(rel)),
                            "partition_values": json.dumps(values, ensure_ascii=False), "rows": part.num_rows,
                            "batch": batch, "batch_files": len(groups), "idx": part.column("idx").to_pylist(),
                            "sample": part.column("sample").to_pylist(), "truncated": _truncated(part),
                            "stats": _stats(part)})
        return pa.Table.from_pylist(records, schema=FILE_RECORD)

    # -- committed state (driver) --------------------------------------------------------------

    def committed_pairs(self, run_date: str, dt: DeltaTable | None = None) -> np.ndarray:
        """The `pair_keys` of every row of the night in the table's latest version (or `dt`), sorted and
        unique; reads only the idx and sample columns of files not read before by this object."""
        dt = dt or self.delta()
        actions = pa.table(dt.get_add_actions(flatten=True))
        paths = [unquote(p) for p, d in zip(actions.column("path").to_pylist(),  # the log holds URI-encoded paths
                                   actions.column("partition.run_date").to_pylist()) if d == run_date]
        for path in paths:
            if path not in self._pairs_by_file:
                with self.fs.open(self._path(path), "rb") as f:
                    part = pq.read_table(f, columns=["idx", "sample"])
                self._pairs_by_file[path] = pair_keys(part.column("idx").to_pylist(), part.column("sample").to_pylist())
        return np.unique(np.concatenate([self._pairs_by_file[p] for p in paths] or [np.empty(0, np.uint64)]))

    def commit(self, files: pa.Table, run_date: str, schema: pa.Schema, partition_by: list[str],
               run_id: str) -> CommitResult:
        """Commit the files of whole batches (FILE_RECORD rows) in one Delta commit, leaving out files that
        hold a pair already in the table (see the module docstring)."""
        result, app = CommitResult(), f"{APP_ID}/{run_date}"
        records = files.to_pylist()
        for _ in range(MAX_COMMIT_ATTEMPTS):
            dt = self.delta()
            seen, taken = self.committed_pairs(run_date, dt), set()
            keep, left_out = [], []
            for record in records:
                keys = pair_keys(record["idx"], record["sample"])
                new = ~pairs_in(keys, seen) & np.array([k not in taken for k in keys.tolist()], dtype=bool)
                if new.all():
                    keep.append(record)
                    taken.update(keys.tolist())
                else:
                    left_out.extend(p for p, n in zip(zip(record["idx"], record["sample"]), new) if n)
            result.left_out = left_out
            if not keep:
                return result
            version = (dt.transaction_version(app) or 0) + 1
            properties = CommitProperties(app_transactions=[Transaction(app, version)],
                                          custom_metadata={"painter.run_id": run_id, "painter.run_date": run_date})
            try:
                dt.create_write_transaction([self._add(r) for r in keep], "append", schema, partition_by,
                                            commit_properties=properties)
            except CommitFailedError:
                result.conflicts += 1
                continue
            result.version, result.files, result.rows = self.delta().version(), len(keep), sum(r["rows"] for r in keep)
            result.paths = {r["path"] for r in keep}
            return result
        raise RuntimeError(f"{self.root}: {MAX_COMMIT_ATTEMPTS} commits of run_date {run_date} in a row lost "
                           "to concurrent writers")

    @staticmethod
    def _add(record: dict) -> AddAction:
        return AddAction(record["path"], record["size"], json.loads(record["partition_values"]),
                         int(time.time() * 1000), True, record["stats"])

    # -- reading and upkeep --------------------------------------------------------------------

    def read(self, run_date: str, columns: list[str] | None = None, idx: list[str] | None = None,
             version: int | None = None) -> pa.Table:
        """The night's rows (optionally only some columns and idx) at the latest or a given version."""
        if not self.exists():
            return pa.table({})
        filters = [("run_date", "=", run_date)] + ([("idx", "in", list(idx))] if idx is not None else [])
        return self.delta(version).to_pyarrow_table(columns=columns, filters=filters)

    def first_idx(self, run_date: str, count: int) -> list[str]:
        """The night's `count` smallest distinct idx, from its idx column read a batch at a time (a night
        can hold millions; the driver holds one batch and the `count` kept)."""
        if not self.exists() or count < 1:
            return []
        scanner = self.delta().to_pyarrow_dataset().scanner(columns=["idx"], filter=pc.field("run_date") == run_date)
        kept = None
        for batch in scanner.to_batches():
            column = batch.column("idx")
            both = pc.unique(column if kept is None else pa.concat_arrays([kept, column]))
            kept = both.take(pc.sort_indices(both)[:count])
        return [] if kept is None else kept.to_pylist()

    def night_files(self, run_date: str) -> list[str]:
        """The data files of the night's committed rows, as delta-rs names them (a URL, or a local path)."""
        if not self.exists():
            return []
        return self.delta().file_uris(file_pruning_predicate=[("run_date", "=", run_date)])

    def run_dates(self) -> list[str]:
        """The nights that hold at least one committed file, oldest first."""
        if not self.exists():
            return []
        actions = pa.table(self.delta().get_add_actions(flatten=True))
        return sorted(set(actions.column("partition.run_date").to_pylist())) if actions.num_rows else []

    def vacuum(self, retention_hours: int | None = None, enforce_retention: bool = True) -> int:
        """Delete files the log does not reference (orphans of killed runs, lost races) once older than the
        retention (default: the table's own); returns how many were deleted."""
        if not self.exists():
            return 0
        return len(self.delta().vacuum(retention_hours=retention_hours, dry_run=False, full=True,
                                       enforce_retention_duration=enforce_retention))


class Committer:
    """Commits a run's file records (FILE_RECORD tables, as they arrive) in groups of whole batches of at
    least `commit_images` images; counts what this run committed over all its commits."""

    def __init__(self, table: OutputTable, run_date: str, schema: pa.Schema, partition_by: list[str],
                 run_id: str, commit_images: int):
        self.table, self.run_date, self.schema, self.partition_by = table, run_date, schema, partition_by
        self.run_id, self.commit_images, self.pending = run_id, commit_images, []
        self.images = self.commits = self.conflicts = self.files_left_out = 0
        self.left_out = 0  # pairs of the files left out that the table did not have: to generate again
        self.version, self.truncated, self.seconds = None, set(), 0.0

    def add(self, records: pa.Table) -> None:
        self.pending.append(records)
        if sum(pc.sum(t.column("rows")).as_py() or 0 for t in self.pending) >= self.commit_images:
            self.flush()

    def flush(self) -> None:
        """Commit every batch whose files have all arrived; the others stay pending."""
        records = pa.concat_tables(self.pending) if self.pending else FILE_RECORD.empty_table()
        if not records.num_rows:
            return
        batches = records.column("batch").to_pylist()
        counts = {b: batches.count(b) for b in set(batches)}
        whole = pa.array([counts[b] == n for b, n in zip(batches, records.column("batch_files").to_pylist())],
                         pa.bool_())
        rest, files = records.filter(pc.invert(whole)), records.filter(whole)
        self.pending = [rest] if rest.num_rows else []
        if not files.num_rows:
            return
        result = self.table.commit(files, self.run_date, self.schema, self.partition_by, self.run_id)
        self.conflicts += result.conflicts
        self.files_left_out += files.num_rows - result.files
        self.left_out += len(result.left_out)
        if result.version is not None:
            self.images, self.commits, self.version = self.images + result.rows, self.commits + 1, result.version
            for path, truncated in zip(files.column("path").to_pylist(), files.column("truncated").to_pylist()):
                if path in result.paths:
                    self.truncated.update(truncated)


def new_batch_id(run_id: str) -> str:
    """A batch's name in its files' names: the run and a random part (a retried batch gets a new one)."""
    return f"{run_id}-{uuid.uuid4().hex[:12]}"
