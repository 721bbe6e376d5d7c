"""Keys of a job's rows, split into hash buckets of idx, and the repeated idx found in them bucket by bucket.

A job that streams its rows writes the keys of each batch's good rows with `KeyBuckets.write`: the idx,
`_source`, `_row`, `_reason` and whatever else the job needs to find a row again, as one Parquet file per
bucket the batch touches, under `<root>/<bucket>/`. The bucket is a hash of idx, so every row of an idx
is in one bucket. Once everything is written, `KeyBuckets.duplicates(bucket)` finds the rows of one bucket
that repeat an earlier good row's idx (`painter.io.rows.find_duplicates`): the buckets can be searched in
parallel (Ray tasks: `painter.stages.datasets.duplicate_keys`) and only the duplicates reach the driver,
whatever the corpus. `remove` deletes the keys. The tokenize job keeps its keys beside its shards
(`painter.io.token_writer`), the generate job beside its output table (`painter.io.output.OutputRoot`).

`write_part` writes one Parquet file into a folder through the job's Storage (the keys, rejected rows,
token shards). No Ray here.
"""
from __future__ import annotations

import posixpath
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from painter.io.rows import REASON, ROW, SOURCE, find_duplicates
from painter.io.storage import Storage, as_storage, writing

KEY_BUCKETS = 32  # a task each when looking for duplicates; 100 M rows make ~3 M keys (~150 MB) a bucket


def write_part(table: pa.Table, folder: str, name: str, storage: Storage | dict | None = None) -> str:
    """Write `table` as `<folder>/part-<name>.parquet` (made if missing); returns the file's path as the
    filesystem names it (listings are dropped first: Ray workers write beside each other)."""
    fs, root = as_storage(storage).fs(folder, fresh=True)
    file = f"part-{name}.parquet"
    path = posixpath.join(root, file)
    with writing(posixpath.join(folder, file), "the file"):  # names the URL, not the stripped path
        fs.makedirs(root, exist_ok=True)
        with fs.open(path, "wb") as f:
            pq.write_table(table, f)
    return path


@dataclass(frozen=True)
class KeyBuckets:
    """The keys under `root` (a folder of the job's own, deleted by `remove`), in `schema` (which holds at
    least idx, SOURCE, ROW and REASON)."""
    root: str
    schema: pa.Schema
    storage: Storage | dict | None = None

    def _fs(self, path: str):
        return as_storage(self.storage).fs(path, fresh=True)

    def write(self, keys: pa.Table, name: str) -> None:
        """Write one batch's keys (`name` is unique to the call), a file per bucket its idx fall in."""
        keys = keys.select(self.schema.names).cast(self.schema)
        buckets = np.array([zlib.crc32(i.encode()) % KEY_BUCKETS for i in keys["idx"].to_pylist()])
        for bucket in np.unique(buckets):
            write_part(keys.filter(pa.array(buckets == bucket)), posixpath.join(self.root, f"{bucket:02d}"), name,
                       self.storage)

    def buckets(self) -> list[str]:
        """The buckets written so far (folder names)."""
        fs, root = self._fs(self.root)
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)) if fs.exists(root) else []

    def duplicates(self, bucket: str) -> pa.Table:
        """The keys of one bucket that repeat an earlier good row's idx, with their reason."""
        fs, root = self._fs(posixpath.join(self.root, bucket))
        parts = []
        for path in sorted(fs.find(root)):
            with fs.open(path, "rb") as f:
                parts.append(pq.read_table(f))
        return duplicate_rows(pa.concat_tables(parts)) if parts else self.schema.empty_table()

    def remove(self) -> None:
        as_storage(self.storage).remove(self.root, recursive=True)


def duplicate_rows(keys: pa.Table) -> pa.Table:
    """The rows of `keys` (one hash bucket of them: every row of an idx) that `find_duplicates`
    rejects, with their reason set."""
    found = find_duplicates(keys)
    if not found:
        return keys.schema.empty_table()
    pairs = list(zip(keys[SOURCE].to_pylist(), keys[ROW].to_pylist()))
    at = [i for i, pair in enumerate(pairs) if pair in found]
    repeats = keys.take(pa.array(at, pa.int64()))
    reasons = pa.array([found[pairs[i]] for i in at], pa.string())
    return repeats.set_column(repeats.schema.get_field_index(REASON), REASON, reasons)
