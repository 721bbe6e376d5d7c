"""The generate job: a table of prompts -> N images each -> the night's rows in a Delta Lake table.

Flow (`run`); the prompts stream through Ray and never gather on the driver:
1. Pass 1 (`painter.stages.generate_prompts.scan_prompts`): Ray tasks read every input file and check
   each row (unreadable rows, missing idx, empty text, a bad prompt image); they write the rejected rows
   to the night's errors folder (`OutputRoot.rejected_folder`, emptied when a run starts: a rerun reads
   the whole input again) and the good rows' keys to hash buckets of idx, where Ray tasks then find the
   repeated idx (every occurrence after the first by (file, row) is rejected). The driver gets counts:
   rows, rejected, and the pairs (idx, sample) not yet in the table for the run date.
2. Pass 2 (`prompt_pairs`): the files read again, each prompt made `samples` rows (idx, sample), less the
   repeated idx and the pairs already in the table (the table's pairs as 8-byte keys, through the object
   store).
3. An actor pool of `Generator`s (a GPU each where the cluster has GPUs, else CPU slices) generates
   each batch; the output table writes it as data files right there (`OutputTable.write_files`), so
   image bytes never reach the driver; only a small record per file comes back. Texts longer than the
   model's text_len tokens are counted where they are tokenized (the generator's `is_truncated`).
4. The driver streams those records to the output table's `Committer`, which commits whole batches in
   Delta commits of at least `--commit-images` images (exactly once per (run_date, idx, sample) through
   the table's transaction ids and conflict check: `OutputTable.commit`). Pairs left out because a concurrent run committed
   part of their file are generated again in another round, until the night is complete.
5. Then the contact sheet, optional HTML gallery and EasyNLP TSV are made from the committed night,
   the table's vacuum removes orphaned files older than its retention, and the run is recorded under
   `_runs/` (all paths: `painter.io.output.OutputRoot`).

A test can make the actors crash part-way through a night (`painter.stages.faults.FAIL_AFTER_BATCHES`).
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import ray
from ray.data.context import ShuffleStrategy

from painter import logs
from painter.checkpoint.model_dir import check_model_files, load_model
from painter.errors import InputError, check_error_rate
from painter.inference.generator import GenerationConfig, Generator, default_micro_batch
from painter.io.images import PROMPT_COLUMN
from painter.io import output as out
from painter.io import columns as column_map, tables
from painter.io.checks import check_inputs, check_output
from painter.io.easynlp_tsv import easynlp_lines, write_lines
from painter.io.images import IMAGE_FORMATS
from painter.io.output_table import Committer, OutputTable, new_batch_id
from painter.io.key_buckets import KeyBuckets
from painter.io.run_dates import is_range, nights
from painter.io.storage import Storage, as_storage
from painter.options import to_dict
from painter.options.generate import Options
from painter.stages import faults
from painter.stages import generate_prompts as prompts
from painter.stages.resources import actor_resources, cluster_has_gpus
from painter.stages.datasets import bound_store, iter_blocks
from painter.stages.generate_prompts import Scan
from painter.stages.metrics import Recorder, rejected_reasons
from painter.stages.nights import for_night, run_nights

STAGE = "generate"
log = logs.get(STAGE)
GENERATED = ("sample", "seed", "model", "created_at", "is_truncated", "run_date", "image", "image_format",
             *IMAGE_FORMATS)
MAX_ROUNDS = 3
# The object store the prompt blocks may fill ahead of the actors, per actor: ~150k prompts of text, or
# two batches of 256 rows with a 30 KB prompt image. Blocks under 100 KB live in the driver's own heap
# (Ray inlines small objects), so without a cap a fast reader would hold a large corpus there.
STORE_BYTES_PER_ACTOR = 16 * 2 ** 20
SHUFFLE_PARTITIONS = 200  # the most partitions of the --tsv-output shuffle: Ray Data's own default
FIXED_SCHEMA = pa.schema([
    pa.field("idx", pa.string()), pa.field("text", pa.string()), pa.field("sample", pa.int64()),
    pa.field("seed", pa.int64()), pa.field("image", pa.binary()), pa.field("image_format", pa.string()),
    pa.field("model", pa.string()), pa.field("created_at", pa.timestamp("us", tz="UTC")),
    pa.field("is_truncated", pa.bool_()),
    pa.field("score", pa.float32()),  # --candidates > 1: the kept candidate's score; else null
])


def generation_config(options: Options) -> GenerationConfig:
    try:
        return GenerationConfig(seed=options.seed, temperature=options.temperature,
                                top_k=options.top_k or None, top_p=options.top_p, image_format=options.image_format,
                                precision=options.precision, pixel_rounding=options.pixel_rounding,
                                guidance=options.guidance, candidates=options.candidates, scorer=options.scorer,
                                keep_rows=options.keep_rows)
    except ValueError as e:
        raise InputError(str(e)) from None


def output_schema(prompts: pa.Schema, partition_by: list[str]) -> pa.Schema:
    """The table's columns: the fixed ones, pass-through input columns (not a prompt image), then the
    partition columns (run_date and --partition-by, as strings: their values live in the Delta log as text)."""
    passed = [f for f in prompts if f.name not in (*FIXED_SCHEMA.names, PROMPT_COLUMN, *partition_by)]
    parts = [pa.field(name, pa.string()) for name in ["run_date", *partition_by]]
    return pa.schema([*FIXED_SCHEMA, *(f.with_nullable(True) for f in passed), *parts])


def output_rows(batch: pa.Table, generated: dict, image_format: str, run_date: str, schema: pa.Schema) -> pa.Table:
    """A batch's rows in the table's schema: idx, text, sample, seed, image, image_format, model, created_at,
    is_truncated, pass-through columns, run_date and the partition columns."""
    n = batch.num_rows
    columns = {
        "seed": pa.array(generated["seed"], pa.int64()), "image": pa.array(list(generated[image_format]), pa.binary()),
        "image_format": pa.array([image_format] * n, pa.string()), "model": pa.array(list(generated["model"]), pa.string()),
        "created_at": pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
        "is_truncated": pa.array(generated["is_truncated"], pa.bool_()), "run_date": pa.array([run_date] * n, pa.string()),
        "score": pa.array(generated["score"] if "score" in generated else [None] * n, pa.float32()),
    }
    arrays = []
    for f in schema:
        column = columns[f.name] if f.name in columns else batch.column(f.name)
        if pa.types.is_string(f.type) and not pa.types.is_string(column.type):  # partition values as text
            column = pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())
        arrays.append(column.cast(f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


class GenerateActor:
    """Ray actor: generate a batch; the output table writes it as data files; returns their records."""

    def __init__(self, *, model: str, config: GenerationConfig, micro_batch: int, table: OutputTable,
                 schema: pa.Schema, partition_by: list[str], run_date: str, run_id: str, fail_after: int | None,
                 storage: Storage, metrics: Recorder):
        self.generator = Generator(model, config, micro_batch=micro_batch, storage=storage)
        self.table, self.schema, self.partition_by = table, schema, ["run_date", *partition_by]
        self.run_date, self.run_id, self.fail_after, self.batches = run_date, run_id, fail_after, 0
        self.metrics = metrics

    def __call__(self, batch: pa.Table) -> pa.Table:
        faults.after_batch(self.fail_after, self.batches)
        names = ("idx", "text", "sample", *([PROMPT_COLUMN] if PROMPT_COLUMN in batch.column_names else []))
        start = time.perf_counter()
        generated = self.generator({name: batch.column(name).to_pylist() for name in names})
        self.metrics.observe("painter_image_seconds", (time.perf_counter() - start) / max(batch.num_rows, 1))
        rows = output_rows(batch, generated, self.generator.config.image_format, self.run_date, self.schema)
        files = self.table.write_files(rows, self.partition_by, new_batch_id(self.run_id))
        self.batches += 1
        return files


def generate_into(pairs: ray.data.Dataset, settings: "Settings", actors: int | None, actor_kwargs: dict,
                  committer: Committer) -> None:
    """Generate the (prompt, sample) rows of `pairs` in the actor pool; the committer commits whole batches
    as their records arrive."""
    # blocks of one batch each: an actor call's records reach the driver as their own block (Ray joins the
    # outputs of one task into one block), so the committer can commit batch by batch
    resources = actor_resources(actors)
    batches = bound_store(pairs, STORE_BYTES_PER_ACTOR * resources["compute"].max_size).repartition(
        target_num_rows_per_block=settings.batch_size)
    files = batches.map_batches(GenerateActor, batch_size=settings.batch_size, batch_format="pyarrow",
                                fn_constructor_kwargs=actor_kwargs, **resources)
    start = time.time()
    try:
        for records in iter_blocks(files):
            _counted(committer, actor_kwargs["metrics"], records)
    finally:  # a failed run still commits the whole batches it received: the rerun skips them
        _counted(committer, actor_kwargs["metrics"])
        committer.seconds += time.time() - start


def _counted(committer: Committer, metrics: Recorder, records: pa.Table | None = None) -> None:
    """`committer.add(records)` (`flush()` without records), its commits (images, commits, their seconds, the
    table's version) recorded as metrics."""
    images, commits, start = committer.images, committer.commits, time.perf_counter()
    committer.add(records) if records is not None else committer.flush()
    if committer.commits > commits:
        seconds = (time.perf_counter() - start) / (committer.commits - commits)
        for _ in range(committer.commits - commits):
            metrics.observe("painter_commit_seconds", seconds)
        metrics.add("painter_commits", committer.commits - commits)
        metrics.add("painter_images_written", committer.images - images)
        metrics.set("painter_table_version", committer.version)


@dataclass(frozen=True)
class Settings:
    """Options checked and resolved before any work."""
    storage: Storage
    config: GenerationConfig
    run_date: str
    partition_by: list[str]
    micro_batch: int
    batch_size: int
    commit_images: int


def resolve(options: Options) -> Settings:
    """The run's settings, or InputError naming the option; needs Ray started (GPUs decide defaults)."""
    for name in ("samples", "batch_size", "micro_batch", "sheet_prompts", "commit_images"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    micro_batch = options.micro_batch or default_micro_batch("cuda" if cluster_has_gpus() else "cpu")
    return Settings(Storage.from_option(options.storage_options), generation_config(options),
                    out.check_run_date(options.run_date),
                    out.check_partition_columns(options.partition_by, ("idx", "text", *GENERATED)),
                    micro_batch, options.batch_size or 4 * micro_batch, options.commit_images)


def preflight(options: Options) -> None:
    """What can be checked before Ray starts: options, model files, and a single night's input files and
    output paths (a backfill's are checked as each night starts: one night's missing input is that night's)."""
    storage = Storage.from_option(options.storage_options)
    generation_config(options)
    dates = nights(options.run_date, options.timezone)
    out.check_partition_columns(options.partition_by, ("idx", "text", *GENERATED))
    check_model_files(options.model, storage=storage)
    if not is_range(options.run_date):
        check_paths(for_night(options, dates[0]), storage)


def check_paths(options: Options, storage: Storage) -> None:
    """One night's input files readable (and holding the columns it names), its output paths writable."""
    check_inputs("--input", options.input, storage, columns=column_map.parse(options.columns),
                 schema=tables.parse_schema(options.input_schema))
    check_output("--output", options.output, storage)
    check_output("--errors", options.errors, storage)
    if options.tsv_output:  # a file: its folder must be writable
        check_output("--tsv-output", os.path.dirname(options.tsv_output.rstrip("/")) or ".", storage)


def scan(options: Options, settings: Settings, root: out.OutputRoot, run_id: str,
         committed: np.ndarray) -> tuple[Scan, list[str]]:
    """Pass 1 over the prompts (`painter.stages.generate_prompts`) and the input columns the job writes
    itself (dropped); InputError for a --partition-by column no input file has."""
    keys = KeyBuckets(root.keys_folder(run_id), prompts.KEYS_SCHEMA, settings.storage)
    found = prompts.scan_prompts(options.input, options.input_schema, columns=column_map.parse(options.columns),
                                 errors=root.clear_rejected(), keys=keys,
                                 samples=options.samples, committed=committed, storage=settings.storage)
    missing = [c for c in settings.partition_by if c not in found.schema.names]
    if missing and found.accepted:
        raise InputError(f"--partition-by {missing[0]!r}: no such input column "
                         f"(columns: {', '.join(found.schema.names)})")
    return found, [c for c in found.schema.names if c in GENERATED]


def run(options: Options) -> dict:
    """One night (`run_night`), or a backfill of each night of a --run-date range in turn."""
    dates = nights(options.run_date, options.timezone)
    if not is_range(options.run_date):
        return run_night(for_night(options, dates[0]))

    def checked_night(night: Options) -> dict:
        check_paths(night, Storage.from_option(night.storage_options))
        return run_night(night)

    return run_nights(options, dates, checked_night, options.keep_going, STAGE)


def run_night(options: Options) -> dict:
    """The night of `options.run_date` (a date), its paths filled."""
    settings = resolve(options)
    root = out.OutputRoot(options.output, settings.run_date, settings.storage, options.errors)
    model = load_model(options.model, parts=(), storage=settings.storage)  # config and fingerprints: no weights
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    committed = root.table.committed_pairs(root.run_date) if root.table.exists() else np.empty(0, np.uint64)
    found, dropped = scan(options, settings, root, run_id, committed)
    metrics = Recorder(STAGE, settings.run_date, model.fingerprint)
    metrics.add("painter_rows_in", found.rows_in)
    metrics.rejected(rejected_reasons(root.rejected_folder(), settings.storage) if found.rejected else {})
    kept = pa.schema([f for f in found.schema if f.name not in dropped])
    schema = output_schema(kept, settings.partition_by)
    skipped = found.accepted * options.samples - found.todo
    log.info(f"{found.rows_in} rows read, {found.rejected} rejected; {skipped} images already in the table, "
              f"{found.todo} to generate")
    root.table.ensure(schema, ["run_date", *settings.partition_by])
    actor_kwargs = dict(model=options.model, config=settings.config, micro_batch=settings.micro_batch,
                        table=root.table, schema=schema, partition_by=settings.partition_by,
                        run_date=settings.run_date, run_id=run_id, fail_after=faults.fail_after_batches(),
                        storage=settings.storage, metrics=metrics)
    written = Committer(root.table, root.run_date, schema, ["run_date", *settings.partition_by], run_id,
                        settings.commit_images)
    todo = found.todo
    for round_number in range(MAX_ROUNDS + 1):  # more rounds only when concurrent runs took some of our files
        if todo == 0:
            break
        if round_number == MAX_ROUNDS:
            raise RuntimeError(f"{options.output} run_date {root.run_date}: {todo} images still missing "
                               f"after {MAX_ROUNDS} rounds lost to concurrent runs")
        pairs = prompts.prompt_pairs(options.input, options.input_schema, columns=column_map.parse(options.columns),
                                     samples=options.samples, scan=found,
                                     schema=kept, committed=committed, storage=settings.storage)
        left_out = written.left_out
        generate_into(pairs, settings, options.actors, actor_kwargs, written)
        todo = written.left_out - left_out  # pairs of files a concurrent run's commit overlapped
        committed = root.table.committed_pairs(root.run_date) if todo else committed
    log.info(f"{written.images} images in {written.commits} commits to {options.output}")
    record = to_dict(options) | {"run_date": root.run_date,  # to_dict records --storage-options' source only
                                 "micro_batch": settings.micro_batch, "batch_size": settings.batch_size}
    summary = {
        "run_id": run_id, "run_date": root.run_date, "model": model.fingerprint,
        "rows_in": found.rows_in, "prompts_accepted": found.accepted,
        "rows_rejected": found.rejected, "truncated_texts": len(written.truncated),
        "samples": options.samples, "pairs_total": found.accepted * options.samples,
        "skipped_already_done": skipped, "images_out": written.images,
        "images_per_second": round(written.images / written.seconds, 3) if written.seconds else 0.0,
        "generation_seconds": round(written.seconds, 3), "batch_size": settings.batch_size,
        "micro_batch": settings.micro_batch, "commits": written.commits, "commit_conflicts": written.conflicts,
        "files_left_out": written.files_left_out, "table_version": written.version, "output": options.output,
        "errors": root.rejected_folder(), "dropped_input_columns": dropped,
    }
    return _finish(root, options, summary, record)


def _finish(root: out.OutputRoot, options: Options, summary: dict, record: dict) -> dict:
    """Sheets, TSV, vacuum and the run record after the commits; the error-rate verdict last."""
    summary |= root.write_sheets(contact_sheet=options.contact_sheet, gallery=options.gallery,
                                 prompts=options.sheet_prompts, font=options.font, image_format=options.image_format)
    if options.tsv_output:
        summary["tsv_lines"] = write_night_tsv(root, options.tsv_output)
        summary["tsv_output"] = options.tsv_output
    summary["vacuumed_files"] = root.table.vacuum()
    root.write_run_record(summary["run_id"], record | {"summary": summary})
    check_error_rate(summary["rows_rejected"], summary["rows_in"], options.max_error_rate,
                     f"see {summary['errors']}", summary)
    return summary


def write_night_tsv(root: out.OutputRoot, path: str) -> int:
    """`--tsv-output`: EasyNLP's predict TSV of the night's committed images, through Ray: each idx's
    images become its line in a Ray task, the lines are sorted by idx, and the driver writes them a block
    at a time as they arrive (it never holds the night). The number of lines."""
    files = root.table.night_files(root.run_date)
    if not files:
        return write_lines([], path, root.storage_options)
    storage = as_storage(root.storage_options)
    filesystem, _ = storage.arrow(files[0])
    night = ray.data.read_parquet([storage.fs(f)[1] for f in files], filesystem=filesystem, partitioning=None,
                                  columns=["idx", "text", "sample", "image"], num_cpus=0.25)
    # A sort-based shuffle of plain tasks, one partition per file the night has: Ray Data's default hash
    # shuffle starts aggregator actors and 200 partitions, ~25 s for a night of a few rows on 2 cores
    night.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    partitions = min(len(files), SHUFFLE_PARTITIONS)
    lines = night.groupby("idx", num_partitions=partitions).map_groups(
        _idx_line, batch_format="pyarrow", num_cpus=0.25).sort("idx")
    lines.context.execution_options.preserve_order = True
    return write_lines((line for block in iter_blocks(lines) for line in block["line"].to_pylist()), path,
                       root.storage_options)


def _idx_line(images: pa.Table) -> pa.Table:
    """The TSV line of one idx's images (`easynlp_lines`), beside its idx."""
    return pa.table({"idx": images["idx"][:1], "line": easynlp_lines(images, "image")})
