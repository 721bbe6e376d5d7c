"""The tokenize job: image corpora -> VQGAN token shards, every bad row rejected with a reason.

Inputs: EasyNLP TSV (also gzip/zstd), Parquet (Hugging Face image structs too), CSV, JSON lines, image
folders and WebDataset shards (`painter.io.tables`), their columns mapped by `--columns`.

Pipeline (Ray Data), streaming end to end; nothing holds the corpus, in memory or on the driver:
  read_input          one task per file; a malformed line becomes a row with a reason
  -> prepare_batch    CPU tasks: idx/text checks, base64, decode, resize + crop -> uint8 pixels
  -> ImageEncoder     actor pool holding the VQGAN, one GPU each (on a CPU-only cluster the two are
                      one actor per CPU, `DecodingEncoder`, each decoding and encoding its own rows)
  -> TokenSink        write tasks (`painter.stages.tokenize_sink`, torch-free): good rows to shard files,
                      rejected rows to the errors table, the good rows' keys to `<output>/_keys/`
  -> duplicates       Ray tasks over the hash buckets of the keys (one per 2 M keys, at most one per
                      CPU); only duplicates reach the driver, which removes them from their shard
                      files and adds them to the errors table
  -> verify           the written files' footers: rows_in == rows_out + rows_rejected

Duplicate idx: among rows that are otherwise good, the first by (file path, row number) is kept and
later ones are rejected with "duplicate idx (first at FILE:ROW)". Shard rows are in no set order.
"""
from __future__ import annotations

import time
import uuid

import ray

from painter import logs
from painter.checkpoint.model_dir import check_model_files, load_model
from painter.inference.encoder import BASE64_COLUMN, BINARY_COLUMN, DecodingEncoder, ImageEncoder, prepare_batch
from painter.errors import CheckpointError, InputError, PainterError, check_error_rate
from painter.io import columns as column_map
from painter.io import tables
from painter.io.checks import check_inputs, check_output
from painter.io.shards import ShardInfo, read_shard_info
from painter.io.rows import REASON, ROW, SOURCE
from painter.io.storage import Storage
from painter.io.token_writer import KEYS_FOLDER, BatchReport, TokenWriter
from painter.options.tokenize import DEFAULT_SCHEMA, ROWS_PER_FILE, Options  # noqa: F401 (callers read them here too)
from painter.stages.resources import actor_resources, cluster_has_gpus
from painter.stages.datasets import arrow_filesystem, bound_store, duplicate_keys, join, read_input
from painter.stages.ray_errors import painter_errors
from painter.stages.tokenize_sink import TokenSink
from painter.stages.metrics import Recorder

STAGE = "tokenize"
log = logs.get(STAGE)
REQUIRED_COLUMNS = ("idx", "text", BASE64_COLUMN)
# Blocks of the image rows as read: 256 rows (8 MiB of 32 KB images) and never more than 8 MiB. Decoding
# and encoding start on a file's first rows while the rest is read, and a large file never makes one block
# of its own. Measured on 2 cores, the block size that is fastest follows the rows, not the bytes: 1 MiB
# blocks made 4 KB rows faster than 8 MiB ones and 32 KB rows a third slower.
READ_BLOCK_ROWS = 256
READ_BLOCK_BYTES = 8 * 2 ** 20
# The object store the job's blocks may hold per encoder actor: 16 read blocks, at most 32 MiB (512 MiB
# with a GPU). Ray Data's own budget is a share of the whole store, which a fast reader fills with blocks
# the encoders have not reached: measured on 2 cores, 84 MB at 20k rows and 503 MB at 200k. A fixed
# budget per actor keeps the read-ahead the same whatever the corpus; counted in blocks (rows), it is the
# same work ahead whatever the image size, so a small corpus fills it too. On CPU that is many batches of
# 64 images; with four 1 MiB blocks an actor, the 200k-row scale run took over 11 minutes instead of ~4,
# its encoders at 3-5% of a core and the driver at 95%. A GPU actor eats ~600 MB/s of 256x256 pixels, so
# it gets more (not yet measured on a GPU).
STORE_BLOCKS_PER_ACTOR = 16
STORE_BYTES_PER_ACTOR = {"cpu": 32 * 2 ** 20, "gpu": 512 * 2 ** 20}
# On a CPU-only cluster, one read task per this many encoder actors. A read task yields ~3,500 rows/s
# of 32 KB base64 images (measured on 2 cores), the work of ~10 CPU actors at ~300 images/s; every
# further reader is one more worker process starting beside the actors (~1 s of a core each). On 2
# cores, one reader instead of Ray's two made the 8,192-row benchmark 19.3-19.9 s instead of 22.8-25.1.
CPU_ACTORS_PER_READER = 8


def _check_options(options: Options) -> None:
    names = column_map.renamed([c.name for c in tables.parse_schema(options.input_schema)],
                               column_map.parse(options.columns))
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise InputError(f"--input-schema {options.input_schema!r} names no {missing[0]!r} column")
    if options.micro_batch < 1 or options.rows_per_file < 1 or options.max_pixels < 1:
        raise InputError("--micro-batch, --rows-per-file and --max-pixels must be positive")
    if not 0 <= options.max_error_rate <= 1:
        raise InputError(f"--max-error-rate must be between 0 and 1, got {options.max_error_rate}")


def prepare_destinations(paths: list[str], storage: Storage, overwrite: bool) -> None:
    """Refuse to mix a run's files with another's: each destination must be empty unless overwriting."""
    for path in paths:
        fs, root = tables.url_to_fs(path, storage)
        if not fs.exists(root):
            continue
        if overwrite:
            fs.rm(root, recursive=True)
        elif fs.isfile(root) or fs.ls(root):
            raise PainterError(f"{path} already exists and is not empty; choose another path or pass --overwrite")


def _model_info(model: str, storage: Storage) -> ShardInfo:
    """What the shards will record, read from the model directory without loading weights on the driver."""
    info = ShardInfo.for_model(load_model(model, parts=(), storage=storage))
    if not info.vqgan_fingerprint:
        raise CheckpointError(f"{model}: config.json records no VQGAN fingerprint; re-save the model directory")
    return info


def _check_pool(actors: int | None, taken: float, cpus: float) -> None:
    if taken >= cpus:
        raise InputError(f"--actors {actors}: the encoders would take {taken:g} of this cluster's {cpus:g} CPUs, "
                         "leaving none to read and decode images")


def _resources(actors: int | None) -> tuple[dict, float]:
    """(encoder actor pool kwargs, CPUs per decode task), refusing a pool that leaves no CPU to decode.

    Decoding asks for a whole core where the cluster has one to spare beside the encoders. Ray fuses
    consecutive maps whose remote args are equal; asking for more than the read tasks (0.5) and the
    encoder actors (0.5 CPU, or a GPU) keeps decoding in its own parallel tasks instead of inside the
    read task or, worse, the encoder actor. (On a 1-CPU machine everything fuses, which is fine there.)
    """
    resources = actor_resources(actors)
    cpus = ray.cluster_resources().get("CPU", 0)
    taken = resources.get("num_cpus", 0) * resources["compute"].min_size
    _check_pool(actors, taken, cpus)
    return resources, min(1.0, cpus - taken)


def _cpu_resources(actors: int | None) -> dict:
    """The CPU cluster's decoding encoder pool: one actor per CPU by default, each asking for half of one
    (the read and write tasks take the rest of the reservations; the actors' own threads fill the cores)."""
    cpus = ray.cluster_resources().get("CPU", 1)
    size = actors or max(1, int(cpus))
    _check_pool(actors, size * 0.5, cpus)
    return {"num_cpus": 0.5, "compute": ray.data.ActorPoolStrategy(size=size)}


def encode_dataset(options: Options, storage: Storage, info: ShardInfo) -> ray.data.Dataset:
    """The lazy read -> prepare -> encode graph; one output row per input row, rejected rows with reasons.

    With GPUs, CPU tasks decode (`prepare_batch`) and GPU actors encode. On a CPU-only cluster each
    encoder actor decodes its own rows (`DecodingEncoder`): one per CPU, one torch thread each, which
    keeps every core busy without the decode tasks and the encoders' thread pools fighting for them.
    """
    gpus = cluster_has_gpus()
    prepare = {"max_pixels": options.max_pixels, "resize": options.resize}
    if not gpus:
        resources = _cpu_resources(options.actors)
        # reads ask for less CPU than the encoders, or Ray would fuse reading into the actors
        readers = -(-resources["compute"].max_size // CPU_ACTORS_PER_READER)
        read = _read(options, storage, num_cpus=0.25, readers=readers)
        rows = bound_store(read, _store_budget(read, "cpu", resources["compute"].max_size))
        return rows.map_batches(DecodingEncoder, batch_format="pyarrow", batch_size=options.micro_batch,
                                fn_constructor_kwargs={"model": options.model, "storage": storage, "threads": 1, **prepare}, **resources)
    resources, prepare_cpus = _resources(options.actors)
    read = _read(options, storage, num_cpus=0.5)
    prepared = bound_store(read, _store_budget(read, "gpu", resources["compute"].max_size)).map_batches(
        prepare_batch, batch_format="pyarrow", batch_size=None, num_cpus=prepare_cpus,
        fn_kwargs={"size": info.image_size, **prepare})
    return prepared.map_batches(ImageEncoder, batch_format="pyarrow", batch_size=options.micro_batch,
                                fn_constructor_kwargs={"model": options.model, "storage": storage}, **resources)


def _store_budget(read: ray.data.Dataset, device: str, actors: int) -> int:
    per_actor = min(STORE_BYTES_PER_ACTOR[device], STORE_BLOCKS_PER_ACTOR * read.context.target_max_block_size)
    return per_actor * actors


def _read(options: Options, storage: Storage, num_cpus: float, readers: int | None = None) -> ray.data.Dataset:
    return read_input(options.input, options.input_schema, storage, alternatives={BASE64_COLUMN: BINARY_COLUMN},
                      columns=column_map.parse(options.columns),
                      block_bytes=READ_BLOCK_BYTES, block_rows=READ_BLOCK_ROWS, num_cpus=num_cpus, readers=readers)


def count_written(output: str, errors: str, storage: Storage, info: ShardInfo) -> tuple[int, int, int]:
    """(shard rows, shard files, rejected rows) from the written files' footers; checks shard metadata."""
    filesystem, _ = arrow_filesystem(output, storage)
    shard_files = storage.find(output, (".parquet",), exclude=(errors, join(output, KEYS_FOLDER)))
    if shard_files and (reason := read_shard_info(shard_files, filesystem).mismatch(info)):
        raise AssertionError(f"written shards do not carry this run's metadata: {reason}")
    rejected = storage.find(errors, (".parquet",))
    return (tables.parquet_rows(output, shard_files, storage), len(shard_files),
            tables.parquet_rows(errors, rejected, storage))


def _execute(options: Options, storage: Storage, info: ShardInfo, errors: str) -> BatchReport:
    """Stream the Ray graph into the shards and the errors table, then reject duplicate idx."""
    writer = TokenWriter(options.output, errors, info, STAGE, storage)
    run_id = uuid.uuid4().hex[:8]
    sink = TokenSink(writer, run_id, options.rows_per_file)
    log.info(f"writing token shards to {options.output} and rejected rows to {errors}")
    encode_dataset(options, storage, info).write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
    log.info(f"encoded {sink.report.rows} rows; checking duplicate idx")
    duplicates = duplicate_keys(writer.keys, sink.report.rows)
    report = sink.report
    if duplicates.num_rows:
        writer.remove_rows(duplicates, f"{run_id}-duplicates")
        d = duplicates.to_pydict()
        report = report.merge(BatchReport.of_rejections(d[REASON], d[SOURCE], d[ROW]))
        report.truncated -= sum(d["is_truncated"])
    writer.keys.remove()
    return report


def preflight(options: Options) -> None:
    """What can be checked before Ray starts: options, model files, input files, output folders."""
    _check_options(options)
    storage = Storage.from_option(options.storage_options)
    check_model_files(options.model, parts=("vqgan",), storage=storage)
    check_inputs("--input", options.input, storage, columns=column_map.parse(options.columns),
                 schema=tables.parse_schema(options.input_schema))
    for option_name, path in (("--output", options.output), ("--errors", options.errors)):
        check_output(option_name, path, storage)


def run(options: Options) -> dict:
    """Tokenize the corpus; the summary counts rows in, out and rejected (see the module docstring)."""
    start = time.time()
    _check_options(options)
    storage = Storage.from_option(options.storage_options)
    errors = options.errors or join(options.output, "_rejected")
    info = _model_info(options.model, storage)
    prepare_destinations([options.output, errors], storage, options.overwrite)
    log.info(f"reading {', '.join(options.input)}; {info.image_size}x{info.image_size} images -> {info.img_len} tokens")
    with painter_errors():
        report = _execute(options, storage, info, errors)
    rows_in = report.rows
    rows_out, files, rows_rejected = count_written(options.output, errors, storage, info)
    if rows_in != rows_out + rows_rejected:
        raise AssertionError(f"rows lost: {rows_in} read, {rows_out} written to shards, "
                             f"{rows_rejected} to the errors table")
    if rows_in == 0:
        raise InputError(f"{', '.join(options.input)}: no rows to read")
    if rows_out == 0:
        source, row, reason = report.first_rejection
        raise InputError(f"{source}: no usable rows (all {rows_in} rejected; first at row {row}: {reason}); "
                         f"rejected rows are in {errors}")
    seconds = time.time() - start
    summary = {
        "rows_in": rows_in, "rows_out": rows_out, "rows_rejected": rows_rejected,
        "seconds": round(seconds, 3), "images_per_second": round(rows_out / seconds, 2),
        "output": options.output, "errors": errors, "files": files, "truncated_texts": report.truncated,
        "rejected_by_reason": dict(sorted(report.by_reason.items(), key=lambda kv: -kv[1])),
        "vqgan": info.vqgan_fingerprint,
    }
    _record(summary, report.by_reason, info.vqgan_fingerprint)
    check_error_rate(rows_rejected, rows_in, options.max_error_rate, f"see {errors}", summary)
    return summary


def _record(summary: dict, by_reason: dict, model: str) -> None:
    """The run's counts as Prometheus metrics (tagged with the day it ran, UTC)."""
    metrics = Recorder(STAGE, time.strftime("%Y-%m-%d", time.gmtime()), model)
    for name in ("rows_in", "rows_out"):
        metrics.add(f"painter_{name}", summary[name])
    metrics.set("painter_images_per_second", summary["images_per_second"])
    metrics.rejected(by_reason)
