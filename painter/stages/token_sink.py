"""Ray's side of the token-shard writer (`painter.io.token_writer.TokenWriter`): the datasink the tokenize
job streams its encoded rows into, and the tasks that find duplicate idx over the written keys.

This module imports no torch (a test holds it to that): Ray runs these tasks in workers that never load
the VQGAN, and a write task that had to import torch would spend more starting than writing.
"""
from __future__ import annotations

import pyarrow as pa
import ray
from ray.data.block import BlockAccessor

from painter.io.token_writer import KEYS_SCHEMA, BatchReport, TokenWriter


KEYS_PER_TASK = 2_000_000


class TokenSink(ray.data.Datasink):
    """Each write task writes its rows through the `TokenWriter`; the reports meet on the driver
    (`report`). `rows_per_file` rows are gathered per write (in Ray's object store), so shard files
    are that large."""

    def __init__(self, writer: TokenWriter, run_id: str, rows_per_file: int):
        self.writer, self.run_id, self.rows_per_file = writer, run_id, rows_per_file
        self.report = BatchReport()

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks, ctx) -> BatchReport:
        batch = pa.concat_tables([BlockAccessor.for_block(b).to_arrow() for b in blocks])
        return self.writer.write(batch, f"{self.run_id}-{ctx.task_idx:05d}")

    def on_write_complete(self, write_result) -> None:
        for report in write_result.write_returns:
            self.report = self.report.merge(report)


@ray.remote(num_cpus=0.5)
def _bucket_duplicates(writer: TokenWriter, buckets: list[str]) -> pa.Table:
    return pa.concat_tables([writer.bucket_duplicates(bucket) for bucket in buckets])


def duplicate_keys(writer: TokenWriter, rows: int) -> pa.Table:
    """The keys of the `rows` written rows that repeat an earlier good row's idx, with their reason: Ray
    tasks over the hash buckets of idx, so only the duplicates reach the driver. A task per
    `KEYS_PER_TASK` keys, at most one per CPU: a task costs a worker's start (~1 s on 2 cores), more
    than reading a few million keys."""
    buckets = writer.key_buckets()
    if not buckets:
        return KEYS_SCHEMA.empty_table()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    tasks = max(1, min(len(buckets), cpus, -(-rows // KEYS_PER_TASK)))
    found = ray.get([_bucket_duplicates.remote(writer, buckets[k::tasks]) for k in range(tasks)])
    parts = [t for t in found if t.num_rows]
    return pa.concat_tables(parts) if parts else KEYS_SCHEMA.empty_table()
