"""Where the tokenize job's encoded rows go, one batch at a time, and how duplicates leave afterwards.

No Ray here: `painter.stages.tokenize` calls `TokenWriter.write` from a Ray datasink's write tasks.
One call takes a batch of encoded rows (`painter.encoder.ImageEncoder`'s output) and writes:
  - the good rows as one token-shard file `<output>/part-<name>.parquet` (the `ShardInfo` schema);
  - the rejected rows to `<errors>/part-<name>.parquet` (the rejected-rows schema);
  - the good rows' keys (idx, source file, row, the shard file and the row's place in it) to
    `<output>/_keys/<bucket>/part-<name>.parquet`, split into `KEY_BUCKETS` buckets by a hash of idx,
    so duplicate idx can be found later, bucket by bucket in parallel, without the tokens;
and returns a small `BatchReport` (counts by reason, truncated texts, the first rejection).

Duplicate idx are found once everything is written (`bucket_duplicates`: `find_duplicates` over one
bucket of the keys, every row of an idx being in the same bucket) and `remove_rows` rewrites only the
shard files that hold one. Writing first and removing the few duplicates after is what lets the job
stream: nothing holds the corpus, in memory or on the driver.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import posixpath
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from painter.io import rows
from painter.io.rows import REASON, ROW, SOURCE, find_duplicates
from painter.io.shards import ShardInfo
from painter.io.storage import as_storage, writing

if TYPE_CHECKING:
    from painter.io.storage import Storage

KEYS_FOLDER = "_keys"  # under the shard folder: skipped by `painter train` like every `_*` folder
KEY_BUCKETS = 32  # a task each when looking for duplicates; 100 M rows make ~3 M keys (~150 MB) a bucket
SHARD, SHARD_ROW = "_shard", "_shard_row"
KEYS_SCHEMA = pa.schema([pa.field("idx", pa.string()), pa.field(SOURCE, pa.string()), pa.field(ROW, pa.int64()),
                         pa.field(REASON, pa.string()), pa.field(SHARD, pa.string()),
                         pa.field(SHARD_ROW, pa.int64()), pa.field("is_truncated", pa.bool_())])


def reason_kind(reason: str) -> str:
    """A reason up to its first parenthesis or colon: what the summary counts rejections by."""
    return reason.split(" (", 1)[0].split(":", 1)[0]


@dataclass
class BatchReport:
    """What one `TokenWriter.write` call wrote; reports add up with `merge`."""
    rows: int = 0
    truncated: int = 0  # good rows whose text was cut to the model's text length
    by_reason: dict[str, int] = field(default_factory=dict)
    first_rejection: tuple[str, int, str] | None = None  # (source, row, reason), the smallest

    def merge(self, other: "BatchReport") -> "BatchReport":
        by_reason = dict(self.by_reason)
        for kind, count in other.by_reason.items():
            by_reason[kind] = by_reason.get(kind, 0) + count
        firsts = [f for f in (self.first_rejection, other.first_rejection) if f is not None]
        return BatchReport(self.rows + other.rows, self.truncated + other.truncated, by_reason,
                           min(firsts) if firsts else None)

    @classmethod
    def of_rejections(cls, reasons: list[str], sources: list[str], rows: list[int]) -> "BatchReport":
        """The report of rows rejected (already counted in some report's `rows`) with `reasons`."""
        by_reason: dict[str, int] = {}
        for reason in reasons:
            by_reason[reason_kind(reason)] = by_reason.get(reason_kind(reason), 0) + 1
        return cls(0, 0, by_reason, min(zip(sources, rows, reasons)) if reasons else None)


@dataclass(frozen=True)
class TokenWriter:
    """Writes encoded batches under `output` (shards, keys) and `errors` (rejected rows)."""
    output: str
    errors: str
    info: ShardInfo
    stage: str
    storage: "Storage | dict | None" = None  # painter.io.storage.Storage (or its options)

    def _fs(self, path: str):
        """(filesystem, root) for `path`, its cached listings dropped: Ray workers write here too."""
        return as_storage(self.storage).fs(path, fresh=True)

    def _write(self, table: pa.Table, folder: str, name: str) -> str:
        fs, root = self._fs(folder)
        file = f"part-{name}.parquet"
        path = posixpath.join(root, file)
        with writing(posixpath.join(folder, file), "the file"):  # names the URL, not the stripped path
            fs.makedirs(root, exist_ok=True)
            with fs.open(path, "wb") as f:
                pq.write_table(table, f)
        return path

    def write(self, batch: pa.Table, name: str) -> BatchReport:
        """Write one batch of encoded rows (see the module docstring); `name` is unique to the call."""
        good_mask = pc.is_null(batch[REASON])
        good, bad = batch.filter(good_mask), batch.filter(pc.invert(good_mask))
        report = BatchReport(rows=batch.num_rows, truncated=int(pc.sum(good["is_truncated"]).as_py() or 0))
        if bad.num_rows:
            d = bad.select(["idx", SOURCE, ROW, REASON]).to_pydict()
            self._write(rows.rejected_table(d["idx"], d[SOURCE], d[ROW], d[REASON], self.stage), self.errors, name)
            report = report.merge(BatchReport.of_rejections(d[REASON], d[SOURCE], d[ROW]))
        if good.num_rows:
            schema = self.info.schema()
            shard = self._write(good.select(schema.names).cast(schema), self.output, name)
            keys = pa.table({"idx": good["idx"], SOURCE: good[SOURCE], ROW: good[ROW], REASON: good[REASON],
                             SHARD: pa.array([shard] * good.num_rows, pa.string()),
                             SHARD_ROW: pa.array(np.arange(good.num_rows), pa.int64()),
                             "is_truncated": good["is_truncated"]}, schema=KEYS_SCHEMA)
            self._write_keys(keys, name)
        return report

    def _write_keys(self, keys: pa.Table, name: str) -> None:
        buckets = np.array([zlib.crc32(i.encode()) % KEY_BUCKETS for i in keys["idx"].to_pylist()])
        for bucket in np.unique(buckets):
            part = keys.filter(pa.array(buckets == bucket))
            self._write(part, posixpath.join(self.output, KEYS_FOLDER, f"{bucket:02d}"), name)

    def key_buckets(self) -> list[str]:
        """The key buckets written so far (folder names)."""
        fs, root = self._fs(posixpath.join(self.output, KEYS_FOLDER))
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)) if fs.exists(root) else []

    def bucket_duplicates(self, bucket: str) -> pa.Table:
        """The keys of one bucket that repeat an earlier good row's idx, with their reason."""
        fs, root = self._fs(posixpath.join(self.output, KEYS_FOLDER, bucket))
        parts = []
        for path in sorted(fs.find(root)):
            with fs.open(path, "rb") as f:
                parts.append(pq.read_table(f))
        return duplicate_rows(pa.concat_tables(parts)) if parts else KEYS_SCHEMA.empty_table()

    def remove_rows(self, duplicates: pa.Table, name: str) -> None:
        """Drop `duplicates` (keys rows with their reason) from their shard files and add them to the
        errors table. A shard left empty is deleted."""
        fs, _ = self._fs(self.output)
        for shard in sorted(set(duplicates[SHARD].to_pylist())):
            drop = duplicates.filter(pc.equal(duplicates[SHARD], shard))[SHARD_ROW].to_numpy()
            with fs.open(shard, "rb") as f:
                table = pq.read_table(f)
            keep = np.ones(table.num_rows, dtype=bool)
            keep[drop] = False
            if keep.any():
                with fs.open(shard, "wb") as f:
                    pq.write_table(table.filter(pa.array(keep)), f)
            else:
                fs.rm(shard)
        d = duplicates.to_pydict()
        self._write(rows.rejected_table(d["idx"], d[SOURCE], d[ROW], d[REASON], self.stage), self.errors, name)

    def remove_keys(self) -> None:
        fs, root = self._fs(posixpath.join(self.output, KEYS_FOLDER))
        if fs.exists(root):
            fs.rm(root, recursive=True)


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
