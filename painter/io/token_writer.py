"""Where the tokenize job's encoded rows go, one batch at a time, and how duplicates leave afterwards.

No Ray here: `painter.stages.tokenize` calls `TokenWriter.write` from a Ray datasink's write tasks.
One call takes a batch of encoded rows (`painter.inference.encoder.ImageEncoder`'s output) and writes:
  - the good rows as one token-shard file `<output>/part-<name>.parquet` (the `ShardInfo` schema);
  - the rejected rows to `<errors>/part-<name>.parquet` (the rejected-rows schema);
  - the good rows' keys (idx, source file, row, the shard file and the row's place in it) to
    `<output>/_keys/<bucket>/part-<name>.parquet` (`painter.io.key_buckets.KeyBuckets`: buckets by a
    hash of idx), so duplicate idx can be found later, bucket by bucket in parallel, without the tokens;
and returns a small `BatchReport` (counts by reason, truncated texts, the first rejection).

Duplicate idx are found once everything is written (`KeyBuckets.duplicates`: `find_duplicates` over one
bucket of the keys, every row of an idx being in the same bucket) and `remove_rows` rewrites only the
shard files that hold one. Writing first and removing the few duplicates after is what lets the job
stream: nothing holds the corpus, in memory or on the driver.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from painter.io import rows
from painter.io.key_buckets import KeyBuckets, write_part
from painter.io.rows import REASON, ROW, SOURCE
from painter.io.shards import ShardInfo
from painter.io.storage import as_storage

if TYPE_CHECKING:
    from painter.io.storage import Storage

KEYS_FOLDER = "_keys"  # under the shard folder: skipped by `painter train` like every `_*` folder
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

    @property
    def keys(self) -> KeyBuckets:
        """The good rows' keys, under `<output>/_keys/`."""
        return KeyBuckets(posixpath.join(self.output, KEYS_FOLDER), KEYS_SCHEMA, self.storage)

    def _write(self, table: pa.Table, folder: str, name: str) -> str:
        return write_part(table, folder, name, self.storage)

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
            self.keys.write(keys, name)
        return report

    def remove_rows(self, duplicates: pa.Table, name: str) -> None:
        """Drop `duplicates` (keys rows with their reason) from their shard files and add them to the
        errors table. A shard left empty is deleted."""
        fs, _ = as_storage(self.storage).fs(self.output, fresh=True)
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
