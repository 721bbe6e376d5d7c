"""Ray wiring shared by the jobs: reading input tables into a Dataset, rejected rows, resources.

- `read_input` lists the input files on the driver and reads each one in a Ray task with
  `painter.io.tables.iter_rows`, so every row keeps its file, row number and reason.
- `write_parquet` writes a Dataset through the job's Storage; `write_rejected` writes the rows that
  carry a reason to the errors table with it.
- `iter_blocks` hands the driver a Dataset's blocks without Ray Data's iterator and its statistics traffic.
- `bound_store` caps the object store a Dataset's execution may fill (read-ahead stays the same whatever
  the corpus).
- `actor_resources` asks for a GPU per actor only when the cluster has GPUs (a GPU request on a
  cluster without one hangs), with the CPUs its image encoders need, and for a fraction of a CPU
  otherwise so small machines keep a core free for the read tasks.
- `remote_progress`: a `painter.logs.Progress` on the driver fed by Ray workers through a small actor
  (`Board`): a worker calls `board.set.remote(done, note)`; the driver polls it.
- `duplicate_keys` finds the repeated idx among the keys a job wrote (`painter.io.key_buckets`) in Ray
  tasks over the hash buckets, so only the duplicates reach the driver.
- `painter_error_from` finds the `PainterError` a Ray task or actor raised, so a job can end with its
  one-line reason instead of Ray's stack trace.
"""
from __future__ import annotations

import posixpath
import re
import threading
from typing import Iterator

import pyarrow as pa
import ray

from painter import errors, logs
from painter.io import rows, tables
from painter.io.key_buckets import KeyBuckets
from painter.io.rows import REASON, ROW, SOURCE
from painter.io.storage import Storage, as_storage, is_remote


def arrow_filesystem(path: str, storage_options: Storage | dict | None = None):
    """(pyarrow filesystem, path) for Ray's readers and writers (`Storage.arrow`)."""
    return as_storage(storage_options).arrow(path)


def _read_files(batch: dict, schema, storage_options, chunk_rows, alternatives):
    for path in batch["path"]:
        for chunk in tables.iter_rows(str(path), schema, storage_options, chunk_rows, alternatives):
            yield chunk


def read_input(paths: list[str], schema_spec: str, storage_options: Storage | dict | None = None, *,
               chunk_rows: int = tables.DEFAULT_CHUNK_ROWS, alternatives: dict[str, str] | None = None,
               num_cpus: float = 0.5, block_bytes: int | None = None, block_rows: int | None = None,
               readers: int | None = None) -> ray.data.Dataset:
    """A Dataset of every row of every input file: schema columns + `_source`, `_row`, `_reason`.

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
        by_rows = rows_bytes(files, schema, block_rows, storage_options, alternatives)
        block_bytes = by_rows if block_bytes is None else min(block_bytes, by_rows)
    if block_bytes is not None:
        listing.context.target_max_block_size = block_bytes
    return listing.map_batches(
        _read_files, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus,
        compute=ray.data.TaskPoolStrategy(size=readers) if readers else None,
        fn_kwargs={"schema": schema, "storage_options": storage_options, "chunk_rows": chunk_rows,
                   "alternatives": alternatives},
    )


MIN_BLOCK_BYTES = 64 * 2 ** 10
SAMPLED_FILES = 4


def rows_bytes(files: list[str], schema: list[tables.Column], rows: int,
               storage_options: Storage | dict | None = None, alternatives: dict[str, str] | None = None) -> int:
    """The bytes `rows` rows of these files take as read (at least `MIN_BLOCK_BYTES`), from the first of
    the first `SAMPLED_FILES` files that has rows (`tables.row_bytes`); `MIN_BLOCK_BYTES` when none has."""
    for path in files[:SAMPLED_FILES]:
        if size := tables.row_bytes(path, schema, storage_options, alternatives):
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
    with the corpus. This reads the blocks' references instead (`iter_internal_ref_bundles`)."""
    for bundle in ds.iter_internal_ref_bundles():
        for entry, part in zip(bundle.blocks, bundle.slices):
            block = ray.get(entry.ref)
            yield block if part is None else block.slice(part.start_offset, part.end_offset - part.start_offset)


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


GPU_ACTOR_MAX_CPUS = 16  # a 256x256 PNG costs ~6-16 ms of one core; a GPU actor makes ~1,000 images/s


def actor_resources(actors: int | None = None) -> dict:
    """map_batches kwargs for a model actor pool: one GPU each where GPUs exist, else CPU slices.

    A GPU actor also asks for the cores its PNG encoders use (`Generator`'s pool is one thread
    per core up to 16 on CUDA): its share of the cluster's CPUs less one for the read tasks, at
    most `GPU_ACTOR_MAX_CPUS`. On CPU, actors get half a core each and the pool is sized to the
    cluster's CPUs, leaving room for the read and preprocess tasks (two 1-CPU actors on a 2-core
    machine hang the job).
    """
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if gpus > 0:
        size = min(actors or gpus, gpus)
        encode_cpus = max(1, min(GPU_ACTOR_MAX_CPUS, cpus // gpus - 1))
        return {"num_gpus": 1, "num_cpus": encode_cpus, "compute": ray.data.ActorPoolStrategy(size=size)}
    size = actors or max(1, cpus // 2)
    return {"num_cpus": 0.5, "compute": ray.data.ActorPoolStrategy(size=size)}


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


_RAISED = re.compile(r"^painter\.errors\.(\w+): (.+)$", re.MULTILINE)


def painter_error_from(exc: BaseException) -> errors.PainterError | None:
    """The PainterError raised inside a Ray task or actor that caused `exc`, or None.

    Ray Data 2.60 does not carry the exception object to the driver (a UDF's error arrives as a
    `RayTaskError(UserCodeException)`, an actor constructor's as an `ActorDiedError`), only its
    traceback text; the last `painter.errors.X: message` line of that text is rebuilt as `X(message)`.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, errors.PainterError) and not isinstance(exc, ray.exceptions.RayError):
            return exc
        text = f"{exc}\n{getattr(exc, 'error_msg', '')}"
        found = [(name, msg) for name, msg in _RAISED.findall(text)
                 if isinstance(getattr(errors, name, None), type) and issubclass(getattr(errors, name), errors.PainterError)]
        if found:
            name, message = found[-1]
            return getattr(errors, name)(message.strip())
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


class Board:
    """Ray actor state behind `remote_progress`: the latest (done, note) a worker set."""

    def __init__(self):
        self.done, self.note = 0, ""

    def set(self, done: int, note: str = "") -> None:
        self.done, self.note = done, note or self.note

    def get(self) -> tuple[int, str]:
        return self.done, self.note


class remote_progress:  # noqa: N801 (used like a function: `with remote_progress(...) as board:`)
    """A `Progress` on the driver fed by workers: `with remote_progress("train", 1000, "steps") as board:`
    pass `board` (an actor handle) to the workers, which call `board.set.remote(step, note)`."""

    def __init__(self, stage: str, total: int | None, unit: str, start: int = 0, poll: float = 0.5):
        self.actor = ray.remote(num_cpus=0)(Board).remote()
        self.progress = logs.Progress(stage, total, unit, start=start)
        self.poll, self.stop = poll, threading.Event()
        self.thread = threading.Thread(target=self._watch, name=f"painter-progress-{stage}", daemon=True)

    def _watch(self) -> None:
        while not self.stop.wait(self.poll):
            try:
                done, note = ray.get(self.actor.get.remote(), timeout=10)
            except Exception:  # the poll is best effort: the job's own errors come from the job
                continue
            if done:
                self.progress.set(done, note)

    def __enter__(self):
        self.progress.__enter__()
        self.thread.start()
        return self.actor

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        try:
            self.progress.done, note = ray.get(self.actor.get.remote(), timeout=10)
            self.progress.note = note or self.progress.note
        except Exception:  # the actor's last word is best effort too
            pass
        self.progress.close()
        ray.kill(self.actor)
