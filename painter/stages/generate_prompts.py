"""The generate job's prompts, streamed through Ray twice and never gathered on the driver.

1. `scan_prompts` (pass 1): Ray tasks read every input file and check each batch (`check_prompts`:
   unreadable rows, missing idx, empty text, a bad prompt image). Each task writes its batch's rejected
   rows to the night's errors folder and its good rows' keys to the run's key buckets
   (`painter.io.key_buckets`), and returns one row of counts. Repeated idx are then found bucket by
   bucket in Ray tasks (`painter.stages.datasets.duplicate_keys`): the first good row by (file, row) is
   kept, the others are rejected, and only they reach the driver.
2. `prompt_pairs` (pass 2): the same files read again, each batch checked again (the same verdicts),
   less the repeated idx found in pass 1, each prompt made `samples` rows (idx, sample), less the pairs
   already in the output table. What comes out is the generate actors' input.

The driver holds counts, the schema, the repeated rows and the table's committed pairs as 8-byte keys
(`painter.io.rows.pair_keys`, shared with the tasks through the object store); nothing per input row.
This module loads no torch (a test holds it to that): the read tasks run it, and only a batch with a
prompt image loads the image code.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from painter.errors import InputError
from painter.io.key_buckets import KeyBuckets, write_part
from painter.io.images import PROMPT_COLUMN
from painter.io.rows import REASON, ROW, SOURCE, pair_keys, pairs_in
from painter.io.storage import Storage
from painter.io.tables import parquet_rows
from painter.stages.datasets import duplicate_keys, iter_blocks, read_input, rejected_rows
from painter.stages.ray_errors import painter_errors

STAGE = "generate"
KEYS_SCHEMA = pa.schema([pa.field("idx", pa.string()), pa.field(SOURCE, pa.string()), pa.field(ROW, pa.int64()),
                         pa.field(REASON, pa.string())])
COUNTS = ("rows", "rejected", "todo")
# CPUs of a read task: less than a generate actor asks for (half a CPU), or Ray would fuse the reading
# into the actors; the same in both passes and their checks, so Ray runs each file's read and checks
# as one task
READ_CPUS = 0.25
# Pass 2's blocks: about a batch of prompts whatever the size of a file (a block was a whole file: 25k
# prompts of a 200k corpus in 8 files, a MiB of store each, so the store's peak grew with the corpus)
PAIRS_BLOCK_BYTES = 64 * 2 ** 10


@dataclass(frozen=True)
class Scan:
    """What pass 1 found."""
    rows_in: int
    rejected: int  # rows rejected, the repeated idx among them
    accepted: int  # prompts to make images of
    todo: int  # (idx, sample) pairs of the accepted prompts not yet in the table
    schema: pa.Schema  # the input's columns (idx and text as strings), without the bookkeeping ones
    duplicates: pa.Table  # SOURCE and ROW of the rows rejected for repeating an idx


def as_strings(table: pa.Table, names: tuple[str, ...]) -> pa.Table:
    """`table` with the named columns as strings (Parquet may hold an integer idx; TSV holds text)."""
    for name in names:
        column = table.column(name)
        if not pa.types.is_string(column.type):
            strings = pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())
            table = table.set_column(table.column_names.index(name), name, strings)
    return table


def check_prompts(batch: pa.Table) -> pa.Table:
    """A batch as read (input columns and the bookkeeping ones) with idx and text as strings and each bad
    row's reason set: missing idx, empty text, a bad prompt image (a row unreadable where it was read
    keeps that reason). Repeated idx are found over the whole input (`scan_prompts`), not here."""
    batch = as_strings(batch, ("idx", "text"))
    idx, text, reasons = (batch.column(c).to_pylist() for c in ("idx", "text", REASON))
    prompts = batch.column(PROMPT_COLUMN).to_pylist() if PROMPT_COLUMN in batch.column_names else None
    problem = None
    if prompts is not None and any(p is not None for p in prompts):
        from painter.inference.generator import prompt_image_problem as problem  # the image code loads torch
    for i, reason in enumerate(reasons):
        if reason is not None:
            continue
        if idx[i] is None or not idx[i].strip():
            reasons[i] = "missing idx"
        elif text[i] is None or not text[i].strip():
            reasons[i] = "empty text"
        elif problem is not None and (found := problem(prompts[i])):
            reasons[i] = found
    return batch.set_column(batch.column_names.index(REASON), REASON, pa.array(reasons, pa.string()))


def _todo(idx: list[str], samples: int, committed) -> np.ndarray:
    """Per pair (idx, sample) of these prompts, in prompt order, whether it is not yet in the table."""
    if not len(committed):
        return np.ones(len(idx) * samples, dtype=bool)
    keys = pair_keys([i for i in idx for _ in range(samples)], [s for _ in idx for s in range(samples)])
    return ~pairs_in(keys, committed)


def _batch_name(batch: pa.Table) -> str:
    """A name for a batch's files that only its rows decide: a task Ray runs again (after its worker died)
    replaces the files of its first try instead of adding a second copy of its rows."""
    sources, rows = batch[SOURCE], batch[ROW]
    ends = f"{sources[0]}:{rows[0]}:{sources[-1]}:{rows[-1]}:{batch.num_rows}" if batch.num_rows else "empty"
    return hashlib.sha256(ends.encode()).hexdigest()[:24]


def scan_batch(batch: pa.Table, *, errors: str, keys: KeyBuckets, samples: int, committed,
               storage: Storage) -> pa.Table:
    """Pass 1 over one batch (a Ray task): its rejected rows to `errors`, its good rows' keys to `keys`;
    returns one row: rows, rejected, todo (its good rows' pairs not in the table) and its schema."""
    checked = check_prompts(batch)
    good_mask = pc.is_null(checked[REASON])
    good, bad = checked.filter(good_mask), checked.filter(pc.invert(good_mask))
    name = _batch_name(checked)
    if bad.num_rows:
        write_part(rejected_rows(bad, STAGE), errors, name, storage)
    if good.num_rows:
        keys.write(good, name)
    todo = int(_todo(good["idx"].to_pylist(), samples, ray.get(committed)).sum())
    schema = checked.drop_columns([SOURCE, ROW, REASON]).schema.remove_metadata()
    return pa.table({"rows": [checked.num_rows], "rejected": [bad.num_rows], "todo": [todo],
                     "schema": [schema.serialize().to_pybytes()]})


def scan_prompts(inputs: list[str], input_schema: str, *, errors: str, keys: KeyBuckets, samples: int,
                 committed: np.ndarray, storage: Storage, columns: dict[str, str] | None = None) -> Scan:
    """Pass 1 (see the module docstring); writes the rejected rows, repeated idx last, and checks from the
    written files' footers that every rejected row is there."""
    ds = read_input(inputs, input_schema, storage, num_cpus=READ_CPUS, columns=columns).map_batches(
        scan_batch, batch_size=None, batch_format="pyarrow", num_cpus=READ_CPUS,
        fn_kwargs={"errors": errors, "keys": keys, "samples": samples, "committed": ray.put(committed),
                   "storage": storage})
    counts, schemas = dict.fromkeys(COUNTS, 0), set()  # the distinct schemas (serialized): one per kind of file
    try:
        for block in _raising_input_errors(iter_blocks(ds)):
            for name in COUNTS:
                counts[name] += pc.sum(block[name]).as_py() or 0
            schemas.update(block["schema"].to_pylist())
        duplicates = duplicate_keys(keys, counts["rows"] - counts["rejected"])
    finally:
        keys.remove()
    if duplicates.num_rows:
        write_part(rejected_rows(duplicates, STAGE), errors, f"{uuid.uuid4().hex}-duplicates", storage)
        counts["todo"] -= int(_todo(duplicates["idx"].to_pylist(), samples, committed).sum())
    rejected = counts["rejected"] + duplicates.num_rows
    written = parquet_rows(errors, storage.find(errors, (".parquet",)), storage)
    if written != rejected:
        raise AssertionError(f"rows lost: {counts['rows']} read, {rejected} rejected, {written} in {errors}")
    return Scan(counts["rows"], rejected, counts["rows"] - rejected, counts["todo"], _unify(schemas),
                duplicates.select([SOURCE, ROW]))


def _raising_input_errors(batches):
    """`batches`, a worker's InputError (e.g. a file that is not Parquet) raised as itself, not wrapped."""
    with painter_errors(InputError):
        yield from batches


def _unify(schemas: set[bytes]) -> pa.Schema:
    if not schemas:
        return pa.schema([pa.field("idx", pa.string()), pa.field("text", pa.string())])
    try:
        return pa.unify_schemas([pa.ipc.read_schema(pa.py_buffer(b)) for b in sorted(schemas)],
                                promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"input files disagree on a column's type: {e}") from None


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`: its columns cast, a column it lacks (another input file's) all null. Ray joins
    blocks of different files into one batch, which it can only do when their schemas agree."""
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def pairs_batch(batch: pa.Table, *, samples: int, duplicates: pa.Table, schema: pa.Schema, committed) -> pa.Table:
    """Pass 2 over one batch (a Ray task): its accepted prompts in `schema` (the columns kept), `samples`
    rows each with a `sample` column, in input order, less the pairs already in the table."""
    checked = check_prompts(batch)
    repeated = set(zip(duplicates[SOURCE].to_pylist(), duplicates[ROW].to_pylist()))
    good = [reason is None and (source, row) not in repeated for reason, source, row
            in zip(checked[REASON].to_pylist(), checked[SOURCE].to_pylist(), checked[ROW].to_pylist())]
    accepted = conform(checked.filter(pa.array(good, pa.bool_())), schema)
    rows = np.repeat(np.arange(accepted.num_rows), samples)
    pairs = accepted.take(pa.array(rows, pa.int64())).append_column(
        "sample", pa.array(np.tile(np.arange(samples), accepted.num_rows), pa.int64()))
    return pairs.filter(pa.array(_todo(accepted["idx"].to_pylist(), samples, ray.get(committed))))


def prompt_pairs(inputs: list[str], input_schema: str, *, samples: int, scan: Scan, schema: pa.Schema,
                 committed: np.ndarray, storage: Storage, columns: dict[str, str] | None = None) -> ray.data.Dataset:
    """Pass 2 (see the module docstring): the Dataset of (prompt, sample) rows to generate, in `schema`
    (the prompts' columns the job keeps) and a `sample` column."""
    return read_input(inputs, input_schema, storage, num_cpus=READ_CPUS, block_bytes=PAIRS_BLOCK_BYTES,
                      columns=columns).map_batches(
        pairs_batch, batch_size=None, batch_format="pyarrow", num_cpus=READ_CPUS,
        fn_kwargs={"samples": samples, "duplicates": scan.duplicates, "schema": schema,
                   "committed": ray.put(committed)})
