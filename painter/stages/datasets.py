"""Ray Data wiring shared by the jobs: input tables into a Dataset, rejected rows, Parquet writes, blocks.

- `read_input` lists the input files on the driver and reads each one in a Ray task with
  `painter.io.tables.iter_rows`, so every row keeps its file, row number and reason.
- `write_parquet` writes a Dataset through the job's Storage; `write_rejected` writes the rows that
  carry a reason to the errors table with it.
- `iter_blocks` hands the driver a Dataset's blocks without Ray Data's iterator and its statistics traffic.
- `bound_store` caps the object store a Dataset's execution may fill (read-ahead stays the same whatever
  the corpus).
- `duplicate_keys` finds the repeated idx among the keys a job wrote (`painter.io.key_buckets`) in Ray
  tasks over the hash buckets, so only the duplicates reach the driver.
Resources are in `resources`, driver-side progress fed by workers in `progress`, Ray's errors in `ray_errors`.
"""
from __future__ import annotations

import posixpath
from typing import Iterator

import pyarrow as pa
import ray

from painter.io import rows, tables
from painter.io.key_buckets import KeyBuckets
from painter.io.rows import REASON, ROW, SOURCE
from painter.io.storage import Storage, as_storage, is_remote
from painter.stages.ray_compat import block_refs, map_batches_pool


def arrow_filesystem(path: str, storage_options: Storage | dict | None = None):
    """(pyarrow filesystem, path) for Ray's readers and writers (`Storage.arrow`)."""
    return as_storage(storage_options).arrow(path)


def _read_files(batch: dict, schema, storage_options, chunk_rows, alternatives, columns):
    for path in batch["path"]:
        for chunk in tables.iter_rows(str(path), schema, storage_options, chunk_rows, alternatives, columns):
            yield chunk


def read_input(paths: list[str], schema_spec: str, storage_options: Storage | dict | None = None, *,
               chunk_rows: int = tables.DEFAULT_CHUNK_ROWS, alternatives: dict[str, str] | None = None,
               num_cpus: float = 0.5, block_bytes: int | None = None, block_rows: int | None = None,
               readers: int | None = None, columns: dict[str, str] | None = None) -> ray.data.Dataset:
    """A Dataset of every row of every input file (any format `painter.io.tables` reads): schema columns,
    named as `columns` (`--columns`) maps them, + `_source`, `_row`, `_reason`.

    `block_bytes` caps the blocks of this Dataset and those made from it (Ray's default is 128 MiB):
    smaller blocks let the next stages start on a file before it has been read to the end. With
    `block_rows` too, the cap is that many rows of this corpus where they take fewer bytes
    (`rows_bytes`); the Dataset's `context.target_max_block_size` is the cap taken. `readers` caps the
    read tasks running at once (default: as many as the cluster's CPUs allow).
    """
    schema = tables.parse_schema(schema_spec)
    files = tables.expand_paths(paths, storage_options)
    listing = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    if block_rows is not None:
        by_rows = rows_bytes(files, schema, block_rows, storage_options, alternatives, columns)
        block_bytes = by_rows if block_bytes is None else min(block_bytes, by_rows)
    if block_bytes is not None:
        listing.context.target_max_block_size = block_bytes
    return listing.map_batches(
        _read_files, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus,
        **map_batches_pool(readers),
        fn_kwargs={"schema": schema, "storage_options": storage_options, "chunk_rows": chunk_rows,
                   "alternatives": alternatives, "columns": columns},
    )


MIN_BLOCK_BYTES = 64 * 2 ** 10
SAMPLED_FILES = 4


def rows_bytes(files: list[str], schema: list[tables.Column], rows: int, storage_options: Storage | dict | None = None,
               alternatives: dict[str, str] | None = None, columns: dict[str, str] | None = None) -> int:
    """The bytes `rows` rows of these files take as read (at least `MIN_BLOCK_BYTES`), from the first of
    the first `SAMPLED_FILES` files that has rows (`tables.row_bytes`); `MIN_BLOCK_BYTES` when none has."""
    for path in files[:SAMPLED_FILES]:
        if size := tables.row_bytes(path, schema, storage_options, alternatives, columns):
            return max(MIN_BLOCK_BYTES, int(rows * size))
    return MIN_BLOCK_BYTES


def rejected_rows(batch: pa.Table, stage: str) -> pa.Table:
    """`batch` (rows that carry a reason) in the rejected-rows schema."""
    d = batch.to_pydict()
    idx = d.get("idx", [None] * batch.num_rows)
    return rows.rejected_table(idx, d[SOURCE], d[ROW], d[REASON], stage)


def rejected_only(ds: ray.data.Dataset, stage: str) -> ray.data.Dataset:
    """The rows of `ds` that carry a reason, in the rejected-rows schema."""
    def keep(batch: pa.Table) -> pa.Table:
        mask = pa.compute.is_valid(batch[REASON])
        return rejected_rows(batch.filter(mask), stage)

    return ds.map_batches(keep, batch_format="pyarrow", num_cpus=0.25)


def write_parquet(ds: ray.data.Dataset, path: str, storage: Storage | dict | None = None, **kwargs) -> None:
    """Write `ds` as Parquet files under `path` through `storage`. In a bucket Ray is not asked to make
    the folder: it would make none there, then fail to delete it when no row was written."""
    filesystem, stripped = arrow_filesystem(path, storage)
    ds.write_parquet(stripped, filesystem=filesystem, try_create_dir=not is_remote(path), **kwargs)


def write_rejected(ds: ray.data.Dataset, path: str, stage: str, storage_options: Storage | dict | None = None) -> None:
    """Write the rows of `ds` that carry a reason to the errors table at `path` (Parquet files)."""
    write_parquet(rejected_only(ds, stage), path, storage_options, min_rows_per_file=1)


def good_only(ds: ray.data.Dataset) -> ray.data.Dataset:
    """The rows of `ds` without a reason."""
    def keep(batch: pa.Table) -> pa.Table:
        return batch.filter(pa.compute.is_null(batch[REASON]))

    return ds.map_batches(keep, batch_format="pyarrow", num_cpus=0.25)


def bound_store(ds: ray.data.Dataset, budget: int) -> ray.data.Dataset:
    """`ds`, its execution limited to `budget` bytes of object store (Ray Data's own limit is a share of
    the whole store, which a fast reader fills with blocks the actors have not reached)."""
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(object_store_memory=budget)
    return ds


def iter_blocks(ds: ray.data.Dataset) -> Iterator[pa.Table]:
    """The blocks of `ds` on the driver as they are made, each an Arrow table (a block's slice where Ray
    hands on part of one). Ray Data's own iterator (`iter_batches`) sends the execution's statistics, a
    record per block made so far, through the object store every few seconds and once at the end: for
    generate's 200k prompts that was 0.1 MB at the start and 1.27 MB at the end, a store peak growing
    with the corpus. This reads the blocks' references instead (`ray_compat.block_refs`)."""
    for ref, part in block_refs(ds):
        block = ray.get(ref)
        yield block if part is None else block.slice(part[0], part[1] - part[0])








KEYS_PER_TASK = 2_000_000


@ray.remote(num_cpus=0.5)
def _bucket_duplicates(keys: KeyBuckets, buckets: list[str]) -> pa.Table:
    return pa.concat_tables([keys.duplicates(bucket) for bucket in buckets])


def duplicate_keys(keys: KeyBuckets, rows: int) -> pa.Table:
    """The keys (of `rows` written) that repeat an earlier good row's idx, with their reason: Ray tasks
    over the hash buckets of idx, so only the duplicates reach the driver. A task per `KEYS_PER_TASK`
    keys, at most one per CPU: a task costs a worker's start (~1 s on 2 cores), more than reading a few
    million keys."""
    buckets = keys.buckets()
    if not buckets:
        return keys.schema.empty_table()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    tasks = max(1, min(len(buckets), cpus, -(-rows // KEYS_PER_TASK)))
    found = ray.get([_bucket_duplicates.remote(keys, buckets[k::tasks]) for k in range(tasks)])
    parts = [t for t in found if t.num_rows]
    return pa.concat_tables(parts) if parts else keys.schema.empty_table()


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URL."""
    return posixpath.join(base, *parts)








