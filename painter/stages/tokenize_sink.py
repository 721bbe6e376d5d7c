"""Ray's side of the token-shard writer (`painter.io.token_writer.TokenWriter`): the datasink the tokenize
job streams its encoded rows into (the duplicate idx are then found over the written keys by
`painter.stages.datasets.duplicate_keys`).

This module imports no torch (a test holds it to that): Ray runs these tasks in workers that never load
the VQGAN, and a write task that had to import torch would spend more starting than writing.
"""
from __future__ import annotations

import pyarrow as pa
import ray
from ray.data.block import BlockAccessor

from painter.io.token_writer import BatchReport, TokenWriter


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

