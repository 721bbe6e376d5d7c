"""The tokenize job: TSV/Parquet image corpora -> VQGAN token shards, every bad row rejected with a reason.

Pipeline (Ray Data), streaming until the tokens exist:
  read_input          one task per file; a malformed line becomes a row with a reason
  -> prepare_batch    CPU tasks: idx/text checks, base64, decode, resize + crop -> uint8 pixels
  -> ImageEncoder     actor pool holding the VQGAN (one GPU each where the cluster has GPUs)
  -> materialize      the token rows only (~1 KB a row; the pixels, up to 200 KB a row, stream past)
  -> driver           counts and duplicate idx over the small (idx, file, row, reason) columns
  -> write            shards (good rows) and the rejected rows, both from the materialized tokens
  -> verify           the written files' footers: rows_in == rows_out + rows_rejected
Materializing the tokens is what lets the shards, the errors table and the counts come from one
pass over the images; the duplicate check needs the whole run anyway.

Duplicate idx: among rows that are otherwise good, the first by (file path, row number) is kept and
later ones are rejected with "duplicate idx (first at FILE:ROW)". Shard rows are in no set order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from painter import logs
from painter.checkpoint import check_model_files, load_model
from painter.encoder import BASE64_COLUMN, BINARY_COLUMN, ImageEncoder, prepare_batch
from painter.errors import CheckpointError, InputError, PainterError
from painter.io import tables
from painter.io.checks import check_inputs, check_output
from painter.io.images import DEFAULT_MAX_PIXELS, RESIZE_MODES
from painter.io.shards import ShardInfo, read_shard_info
from painter.io.tables import REASON, ROW, SOURCE
from painter.options import option, parse_storage_options
from painter.stages.common import (actor_resources, arrow_filesystem, join, painter_error_from, read_input,
                                   write_rejected)

STAGE = "tokenize"
DEFAULT_SCHEMA = "idx:str:1,text:str:1,imgbase64:str:1"
REQUIRED_COLUMNS = ("idx", "text", BASE64_COLUMN)


@dataclass(kw_only=True)
class Options:
    input: list[str] = option(help="TSV/Parquet files, globs, directories or s3:// prefixes to read")
    model: str = option(help="model directory (or zoo name) whose VQGAN and vocabulary make the tokens")
    output: str = option(help="directory (local or s3://) for the token shards")
    input_schema: str = option(DEFAULT_SCHEMA, "TSV columns, EasyNLP style; must name idx, text and imgbase64")
    errors: str | None = option(None, "where rejected rows go (default: <output>/_rejected/)")
    max_error_rate: float = option(0.01, "fail the run, after writing everything, when a larger fraction "
                                         "of the rows is rejected")
    batch_size: int = option(64, "images per VQGAN batch")
    actors: int | None = option(None, "encoder actors (default: one per GPU, else half the CPUs)")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "reject images with more pixels (checked before decoding)")
    resize: str = option("pil", "pil: EXIF rotation, alpha on white, antialiased bicubic (the default: no aliasing "
                                "when shrinking photos); easynlp: EasyNLP/taming's plain RGB and OpenCV bilinear "
                                "SmallestMaxSize, to encode exactly the tokens the reference would",
                         choices=RESIZE_MODES)
    storage_options: str | None = option(None, "JSON object of fsspec/s3fs options for the input and output "
                                               "paths, e.g. '{\"endpoint_url\": \"http://...\"}'; credentials "
                                               "come from the usual AWS environment variables by default")
    rows_per_file: int = option(100_000, "target rows per token-shard file")
    overwrite: bool = option(False, "delete what --output and --errors hold before writing")


def _log(message: str) -> None:
    logs.get(STAGE).info(message)


def _check_options(options: Options) -> None:
    names = [c.name for c in tables.parse_schema(options.input_schema)]
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise InputError(f"--input-schema {options.input_schema!r} names no {missing[0]!r} column")
    if options.batch_size < 1 or options.rows_per_file < 1 or options.max_pixels < 1:
        raise InputError("--batch-size, --rows-per-file and --max-pixels must be positive")
    if not 0 <= options.max_error_rate <= 1:
        raise InputError(f"--max-error-rate must be between 0 and 1, got {options.max_error_rate}")


def prepare_destinations(paths: list[str], storage: dict, overwrite: bool) -> None:
    """Refuse to mix a run's files with another's: each destination must be empty unless overwriting."""
    for path in paths:
        fs, root = tables.url_to_fs(path, storage)
        if not fs.exists(root):
            continue
        if overwrite:
            fs.rm(root, recursive=True)
        elif fs.isfile(root) or fs.ls(root):
            raise PainterError(f"{path} already exists and is not empty; choose another path or pass --overwrite")


def _model_info(model: str) -> ShardInfo:
    """What the shards will record, read from the model directory without loading weights on the driver."""
    info = ShardInfo.for_model(load_model(model, parts=()))
    if not info.vqgan_fingerprint:
        raise CheckpointError(f"{model}: config.json records no VQGAN fingerprint; re-save the model directory")
    return info


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
    if taken >= cpus:
        raise InputError(f"--actors {actors}: the encoders would take {taken:g} of this cluster's {cpus:g} CPUs, "
                         "leaving none to read and decode images")
    return resources, min(1.0, cpus - taken)


def encode_dataset(options: Options, storage: dict, info: ShardInfo) -> ray.data.Dataset:
    """The lazy read -> prepare -> encode graph; one output row per input row, rejected rows with reasons."""
    resources, prepare_cpus = _resources(options.actors)
    rows = read_input(options.input, options.input_schema, storage, alternatives={BASE64_COLUMN: BINARY_COLUMN})
    prepared = rows.map_batches(prepare_batch, batch_format="pyarrow", batch_size=None, num_cpus=prepare_cpus,
                                fn_kwargs={"size": info.image_size, "max_pixels": options.max_pixels,
                                           "resize": options.resize})
    return prepared.map_batches(ImageEncoder, batch_format="pyarrow", batch_size=options.batch_size,
                                fn_constructor_kwargs={"model": options.model}, **resources)


def bookkeeping(ds: ray.data.Dataset) -> pa.Table:
    """The small per-row columns of a materialized dataset, on the driver."""
    columns = ["idx", SOURCE, ROW, REASON, "is_truncated"]
    parts = [t for t in ray.get(ds.select_columns(columns).to_arrow_refs()) if t.num_rows]
    if not parts:
        return pa.table({c: pa.array([], t) for c, t in zip(columns, (pa.string(), pa.string(), pa.int64(),
                                                                      pa.string(), pa.bool_()))})
    return pa.concat_tables(parts)


def find_duplicates(keys: pa.Table) -> dict[tuple[str, int], str]:
    """{(source, row): reason} for good rows whose idx a good row earlier in (source, row) order has."""
    good = keys.filter(pc.is_null(keys[REASON]))
    if good.num_rows < 2:
        return {}
    ordered = good.sort_by([("idx", "ascending"), (SOURCE, "ascending"), (ROW, "ascending")])
    idx = ordered["idx"].to_numpy(zero_copy_only=False)
    repeat = np.zeros(len(idx), dtype=bool)
    repeat[1:] = idx[1:] == idx[:-1]
    first = np.maximum.accumulate(np.where(repeat, 0, np.arange(len(idx))))
    dups = np.flatnonzero(repeat)
    take = lambda column, at: ordered[column].take(pa.array(at, pa.int64())).to_pylist()  # noqa: E731
    sources, rows = take(SOURCE, dups), take(ROW, dups)
    first_sources, first_rows = take(SOURCE, first[dups]), take(ROW, first[dups])
    return {(s, r): f"duplicate idx (first at {fs}:{fr})"
            for s, r, fs, fr in zip(sources, rows, first_sources, first_rows)}


def _apply_rejections(batch: pa.Table, rejections: dict) -> pa.Table:
    keys = zip(batch[SOURCE].to_pylist(), batch[ROW].to_pylist(), batch[REASON].to_pylist())
    reasons = [rejections.get((s, r), old) for s, r, old in keys]
    return batch.set_column(batch.schema.get_field_index(REASON), REASON, pa.array(reasons, pa.string()))


def _shard_rows(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    return batch.filter(pc.is_null(batch[REASON])).select(schema.names).cast(schema)


def write_shards(ds: ray.data.Dataset, output: str, info: ShardInfo, storage: dict, rows_per_file: int) -> None:
    """The good rows of `ds` as token-shard Parquet files (with the ShardInfo metadata) under `output`."""
    schema = info.schema()
    filesystem, path = arrow_filesystem(output, storage)
    shards = ds.map_batches(_shard_rows, batch_format="pyarrow", num_cpus=0.25, fn_kwargs={"schema": schema})
    shards.write_parquet(path, filesystem=filesystem, schema=schema, min_rows_per_file=rows_per_file)


def _parquet_files(path: str, storage: dict, exclude: str | None = None) -> list[str]:
    """Parquet files under `path` (stripped of protocol, for `arrow_filesystem`), minus those under `exclude`."""
    fs, root = tables.url_to_fs(path, storage)
    skip = tables.url_to_fs(exclude, storage)[1].rstrip("/") + "/" if exclude else None
    files = fs.find(root) if fs.exists(root) else []
    return sorted(f for f in files if f.endswith(".parquet") and not (skip and f.startswith(skip)))


def count_written(output: str, errors: str, storage: dict, info: ShardInfo) -> tuple[int, int, int]:
    """(shard rows, shard files, rejected rows) from the written files' footers; checks shard metadata."""
    filesystem, _ = arrow_filesystem(output, storage)
    shard_files = _parquet_files(output, storage, exclude=errors)
    if shard_files and (reason := read_shard_info(shard_files, filesystem).mismatch(info)):
        raise AssertionError(f"written shards do not carry this run's metadata: {reason}")
    rows = lambda files: sum(pq.read_metadata(f, filesystem=filesystem).num_rows for f in files)  # noqa: E731
    return rows(shard_files), len(shard_files), rows(_parquet_files(errors, storage))


def final_reasons(keys: pa.Table, rejections: dict) -> list[str | None]:
    """Each row's reason once the duplicate rejections are applied (None for a written row)."""
    rows = zip(keys[SOURCE].to_pylist(), keys[ROW].to_pylist(), keys[REASON].to_pylist())
    return [rejections.get((s, r), old) for s, r, old in rows]


def _reason_counts(reasons: list[str | None]) -> dict[str, int]:
    """Rejected rows per kind of reason (the reason up to its first parenthesis or colon)."""
    kinds: dict[str, int] = {}
    for reason in filter(None, reasons):
        kind = reason.split(" (", 1)[0].split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def _first_rejection(keys: pa.Table, reasons: list[str | None]) -> tuple[str, int, str]:
    rows = zip(keys[SOURCE].to_pylist(), keys[ROW].to_pylist(), reasons)
    return min((s, r, why) for s, r, why in rows if why is not None)


def _execute(options: Options, storage: dict, info: ShardInfo, errors: str):
    """Run the Ray graph and write everything: (bookkeeping table, duplicate rejections)."""
    encoded = encode_dataset(options, storage, info).materialize()
    keys = bookkeeping(encoded)
    _log(f"encoded {keys.num_rows} rows; checking duplicate idx")
    rejections = find_duplicates(keys)
    final = encoded
    if rejections:
        final = encoded.map_batches(_apply_rejections, batch_format="pyarrow", num_cpus=0.25,
                                    fn_kwargs={"rejections": rejections})
    _log(f"writing token shards to {options.output} and rejected rows to {errors}")
    write_shards(final, options.output, info, storage, options.rows_per_file)
    write_rejected(final, errors, STAGE, storage)
    return keys, rejections


def preflight(options: Options) -> None:
    """What can be checked before Ray starts: options, model files, input files, output folders."""
    _check_options(options)
    storage = parse_storage_options(options.storage_options)
    check_model_files(options.model, parts=("vqgan",))
    check_inputs("--input", options.input, storage)
    for option_name, path in (("--output", options.output), ("--errors", options.errors)):
        check_output(option_name, path, storage)


def run(options: Options) -> dict:
    """Tokenize the corpus; the summary counts rows in, out and rejected (see the module docstring)."""
    start = time.time()
    _check_options(options)
    storage = parse_storage_options(options.storage_options)
    errors = options.errors or join(options.output, "_rejected")
    info = _model_info(options.model)
    prepare_destinations([options.output, errors], storage, options.overwrite)
    _log(f"reading {', '.join(options.input)}; {info.image_size}x{info.image_size} images -> {info.img_len} tokens")
    try:
        keys, rejections = _execute(options, storage, info, errors)
    except Exception as e:
        cause = painter_error_from(e)
        if cause is None:
            raise
        raise cause from None
    rows_in = keys.num_rows
    rows_out, files, rows_rejected = count_written(options.output, errors, storage, info)
    if rows_in != rows_out + rows_rejected:
        raise AssertionError(f"rows lost: {rows_in} read, {rows_out} written to shards, "
                             f"{rows_rejected} to the errors table")
    if rows_in == 0:
        raise InputError(f"{', '.join(options.input)}: no rows to read")
    reasons = final_reasons(keys, rejections)
    if rows_out == 0:
        source, row, reason = _first_rejection(keys, reasons)
        raise InputError(f"{source}: no usable rows (all {rows_in} rejected; first at row {row}: {reason}); "
                         f"rejected rows are in {errors}")
    seconds = time.time() - start
    truncated = keys["is_truncated"].to_pylist()
    summary = {
        "rows_in": rows_in, "rows_out": rows_out, "rows_rejected": rows_rejected,
        "seconds": round(seconds, 3), "images_per_second": round(rows_out / seconds, 2),
        "output": options.output, "errors": errors, "files": files,
        "truncated_texts": sum(1 for t, why in zip(truncated, reasons) if t and why is None),
        "rejected_by_reason": _reason_counts(reasons), "vqgan": info.vqgan_fingerprint,
    }
    rate = rows_rejected / rows_in
    if rate > options.max_error_rate:
        summary["_failed"] = (f"{rows_rejected} of {rows_in} rows rejected ({rate:.2%}) > --max-error-rate "
                              f"{options.max_error_rate:g}; see {errors}")
    return summary
