"""The generate job: a table of prompts -> N images each -> the night's rows in a Delta Lake table.

Flow (`run`):
1. `read_input` reads every input file in Ray tasks; the prompts (idx, text and pass-through columns,
   never images) are gathered on the driver, where they are validated: unreadable rows, missing idx,
   empty text and repeated idx (every occurrence after the first) go to the rejected rows
   (`OutputRoot.write_rejected`, replaced by each run: a rerun reads the whole input again).
2. Each prompt becomes `samples` rows (idx, sample); pairs already in the table for the run date are
   dropped (`expand_samples`).
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

Test-only switch: the environment variable PAINTER_TEST_FAIL_AFTER_BATCHES=K, read by the driver when
`run` starts and handed to the actors, makes each actor raise after it has written K batches (counted
per actor), as a crash part-way through a night would (`_fail_point`, the one place it acts).
"""
from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timezone

import pyarrow as pa
import ray

from painter import logs
from painter.checkpoint import check_model_files, load_model
from painter.errors import InputError, check_error_rate
from painter.generator import PROMPT_COLUMN, GenerationConfig, Generator, default_micro_batch, prompt_image_problem
from painter.io import output as out
from painter.io.checks import check_inputs, check_output
from painter.io.easynlp_tsv import write_easynlp_tsv
from painter.io.images import IMAGE_FORMATS, PIXEL_ROUNDING
from painter.io.output_table import Committer, OutputTable, new_batch_id
from painter.io.rows import REASON, ROW, SOURCE, empty_rows, find_duplicates, rejected_table
from painter.io.storage import Storage
from painter.options import option, to_dict
from painter.stages.common import actor_resources, cluster_has_gpus, painter_error_from, read_input

FAIL_AFTER_ENV = "PAINTER_TEST_FAIL_AFTER_BATCHES"
STAGE = "generate"
GENERATED = ("sample", "seed", "model", "created_at", "is_truncated", "run_date", "image", "image_format",
             *IMAGE_FORMATS)
MAX_ROUNDS = 3
FIXED_SCHEMA = pa.schema([
    pa.field("idx", pa.string()), pa.field("text", pa.string()), pa.field("sample", pa.int64()),
    pa.field("seed", pa.int64()), pa.field("image", pa.binary()), pa.field("image_format", pa.string()),
    pa.field("model", pa.string()), pa.field("created_at", pa.timestamp("us", tz="UTC")),
    pa.field("is_truncated", pa.bool_()),
    pa.field("score", pa.float32()),  # --candidates > 1: the kept candidate's score; else null
])


@dataclass(kw_only=True)
class Options:
    input: list[str] = option(help="TSV or Parquet files, globs or s3:// prefixes holding the prompts")
    model: str = option(help="model directory (local, s3:// or a zoo name)")
    output: str = option(help="output table root (local or s3://)")
    input_schema: str = option("idx:str:1,text:str:1", "TSV columns, EasyNLP style")
    errors: str | None = option(None, "where rejected rows go instead of <output>/_rejected")
    max_error_rate: float = option(0.05, "fail the run (after writing everything) above this rejected fraction")
    samples: int = option(1, "images per prompt")
    seed: int = option(0, "the image of (seed, idx, sample) is always the same")
    temperature: float = option(1.0, "sampling temperature; 0 is greedy")
    top_k: int = option(100, "sample among the k likeliest codes; 0 turns top-k off")
    top_p: float | None = option(None, "nucleus sampling threshold in (0, 1]")
    guidance: float | None = option(None, "classifier-free guidance scale S (1: none; default: painter.generator."
                                          "DEFAULT_GUIDANCE for a model trained with caption dropout, else 1)")
    candidates: int = option(1, "images drawn per (idx, sample); the best-scored is kept, its score a column")
    scorer: str | None = option(None, "image-text scorer file for --candidates (.pt2 / TorchScript; TRUSTED FILES "
                                      "ONLY) instead of the model's own caption-vs-null likelihood ratio")
    keep_rows: int = option(0, "with an input column prompt_image (an image, or base64): keep its first K token "
                               "rows and generate the rest")
    batch_size: int | None = option(None, "rows per actor call, one data file per batch and partition; "
                                    "best a multiple of --micro-batch (default: 4 micro-batches)")
    micro_batch: int | None = option(None, "rows per model call: a fixed shape (short batches are padded) "
                                     "that makes images independent of batching (default: 8 on CPU, 64 on GPU)")
    actors: int | None = option(None, "actor pool size (default: one per GPU, else half the CPUs)")
    partition_by: list[str] = option([], "input columns to partition the output by, after run_date")
    run_date: str | None = option(None, "the run_date partition, YYYY-MM-DD (default: today, local time)")
    image_format: str = option("png", "image encoding of the `image` column (named in `image_format`)",
                               choices=IMAGE_FORMATS)
    commit_images: int = option(1024, "images per Delta commit: the night becomes visible in commits of whole "
                                "batches holding at least this many images (the last one fewer)")
    precision: str | None = option(None, "model weights for generation: fp32 or bf16 (default: bf16 on GPU, "
                                   "fp32 on CPU); images depend on it", choices=("fp32", "bf16"))
    pixel_rounding: str = option("round", "model output to 8 bits: nearest level, or truncated as EasyNLP does",
                                 choices=PIXEL_ROUNDING)
    tsv_output: str | None = option(None, "also write the night as EasyNLP's predict TSV: idx, text, gen_imgbase64 "
                                    "(one line per prompt, a list of base64 PNGs)")
    contact_sheet: bool = option(True, "write a contact sheet PNG under <output>/_sheets/")
    gallery: bool = option(False, "also write a static HTML gallery beside the contact sheet")
    sheet_prompts: int = option(16, "prompts shown on the contact sheet and gallery")
    font: str | None = option(None, "caption font file (default: a CJK font found on the system)")
    storage_options: str | None = option(None, "fsspec options as JSON, for the driver and every worker (default: "
                                         "each process's own AWS credential chain: environment, ~/.aws, role)")


@dataclass(frozen=True)
class Prompts:
    accepted: pa.Table  # idx, text (strings) and pass-through columns
    rejected: pa.Table  # REJECTED_SCHEMA
    rows_in: int
    dropped_columns: list[str]


def _generation_config(options: Options) -> GenerationConfig:
    try:
        return GenerationConfig(seed=options.seed, temperature=options.temperature,
                                top_k=options.top_k or None, top_p=options.top_p, image_format=options.image_format,
                                precision=options.precision, pixel_rounding=options.pixel_rounding,
                                guidance=options.guidance, candidates=options.candidates, scorer=options.scorer,
                                keep_rows=options.keep_rows)
    except ValueError as e:
        raise InputError(str(e)) from None


def gather_prompts(options: Options, storage: Storage) -> pa.Table:
    """Every input row on the driver (schema columns, pass-through columns, `_source`, `_row`, `_reason`)."""
    ds = read_input(options.input, options.input_schema, storage)
    try:
        tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    except Exception as e:  # a worker's InputError (e.g. a file that is not Parquet) arrives wrapped
        cause = painter_error_from(e)
        if not isinstance(cause, InputError):
            raise
        raise cause from None
    if not tables:
        return empty_rows("idx", "text")
    try:
        return pa.concat_tables([_as_strings(t, ("idx", "text")) for t in tables], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"input files disagree on a column's type: {e}") from None


def _as_strings(table: pa.Table, names: tuple[str, ...]) -> pa.Table:
    """`table` with the named columns as strings (Parquet may hold an integer idx; TSV holds text)."""
    for name in names:
        column = table.column(name)
        if not pa.types.is_string(column.type):
            strings = pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())
            table = table.set_column(table.column_names.index(name), name, strings)
    return table


def validate_prompts(rows: pa.Table) -> Prompts:
    """Split rows into accepted prompts and rejected rows (with reasons); idx and text become strings.
    Among otherwise good rows, a repeated idx keeps its first row by (file, row) (`painter.io.rows.find_duplicates`)."""
    idx, text = rows.column("idx").to_pylist(), rows.column("text").to_pylist()
    prompts = rows.column(PROMPT_COLUMN).to_pylist() if PROMPT_COLUMN in rows.column_names else None
    sources, numbers, reasons = (rows.column(c).to_pylist() for c in (SOURCE, ROW, REASON))
    for i, reason in enumerate(reasons):
        if reason is not None:
            continue
        if idx[i] is None or not str(idx[i]).strip():
            reasons[i] = "missing idx"
        elif text[i] is None or not str(text[i]).strip():
            reasons[i] = "empty text"
        elif prompts is not None and (reason := prompt_image_problem(prompts[i])):
            reasons[i] = reason
    keys = pa.table({"idx": pa.array([None if i is None else str(i) for i in idx], pa.string()),
                     SOURCE: pa.array(sources, pa.string()), ROW: pa.array(numbers, pa.int64()),
                     REASON: pa.array(reasons, pa.string())})
    duplicates = find_duplicates(keys)
    reasons = [reason or duplicates.get((source, number)) for reason, source, number in zip(reasons, sources, numbers)]
    good = [r is None for r in reasons]
    bad = [i for i, ok in enumerate(good) if not ok]
    rejected = rejected_table([idx[i] for i in bad], [sources[i] for i in bad], [numbers[i] for i in bad],
                              [reasons[i] for i in bad], STAGE)
    dropped = [c for c in rows.column_names if c in GENERATED]
    accepted = _as_strings(rows, ("idx", "text")).filter(pa.array(good)).drop_columns([SOURCE, ROW, REASON, *dropped])
    return Prompts(accepted, rejected, rows.num_rows, dropped)


def output_schema(prompts: pa.Schema, partition_by: list[str]) -> pa.Schema:
    """The table's columns: the fixed ones, pass-through input columns (not a prompt image), then the
    partition columns (run_date and --partition-by, as strings: their values live in the Delta log as text)."""
    passed = [f for f in prompts if f.name not in (*FIXED_SCHEMA.names, PROMPT_COLUMN, *partition_by)]
    parts = [pa.field(name, pa.string()) for name in ["run_date", *partition_by]]
    return pa.schema([*FIXED_SCHEMA, *(f.with_nullable(True) for f in passed), *parts])


def expand_samples(prompts: pa.Table, samples: int, committed: set) -> tuple[pa.Table, int]:
    """Rows (prompt, sample) not yet in the table, in input order with a `sample` column; and how many
    of the wanted pairs were there already."""
    idx = prompts.column("idx").to_pylist()
    keep = [(i, s) for i in range(len(idx)) for s in range(samples) if (idx[i], s) not in committed]
    table = prompts.take(pa.array([i for i, _ in keep], pa.int64()))
    return table.append_column("sample", pa.array([s for _, s in keep], pa.int64())), len(idx) * samples - len(keep)


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


def _fail_point(fail_after: int | None, batches: int) -> None:
    """The test-only crash (see the module docstring): raise once `batches` reaches `fail_after`."""
    if fail_after is not None and batches >= fail_after:
        raise RuntimeError(f"{FAIL_AFTER_ENV}={fail_after}: failing on purpose after {batches} batches")


class GenerateActor:
    """Ray actor: generate a batch; the output table writes it as data files; returns their records."""

    def __init__(self, *, model: str, config: GenerationConfig, micro_batch: int, table: OutputTable,
                 schema: pa.Schema, partition_by: list[str], run_date: str, run_id: str, fail_after: int | None,
                 storage: Storage):
        self.generator = Generator(model, config, micro_batch=micro_batch, storage=storage)
        self.table, self.schema, self.partition_by = table, schema, ["run_date", *partition_by]
        self.run_date, self.run_id, self.fail_after, self.batches = run_date, run_id, fail_after, 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        _fail_point(self.fail_after, self.batches)
        names = ("idx", "text", "sample", *([PROMPT_COLUMN] if PROMPT_COLUMN in batch.column_names else []))
        generated = self.generator({name: batch.column(name).to_pylist() for name in names})
        rows = output_rows(batch, generated, self.generator.config.image_format, self.run_date, self.schema)
        files = self.table.write_files(rows, self.partition_by, new_batch_id(self.run_id))
        self.batches += 1
        return files


def generate_into(todo: pa.Table, settings: "Settings", actors: int | None, actor_kwargs: dict,
                  committer: Committer) -> None:
    """Generate `todo` in the actor pool; the committer commits whole batches as their records arrive."""
    block = settings.batch_size * max(1, math.ceil(todo.num_rows / (settings.batch_size * 256)))  # ≤ ~256 blocks
    ds = ray.data.from_arrow([todo.slice(i, block) for i in range(0, todo.num_rows, block)])
    files = ds.map_batches(GenerateActor, batch_size=settings.batch_size, batch_format="pyarrow",
                           fn_constructor_kwargs=actor_kwargs, **actor_resources(actors))
    start = time.time()
    try:
        for records in files.iter_batches(batch_size=None, batch_format="pyarrow"):
            committer.add(records)
    finally:  # a failed run still commits the whole batches it received: the rerun skips them
        committer.flush()
        committer.seconds += time.time() - start


def _progress(message: str) -> None:
    """A progress line on stderr (stdout's last line is the summary)."""
    logs.get("generate").info(message)


def _fail_after() -> int | None:
    value = os.environ.get(FAIL_AFTER_ENV)
    return int(value) if value else None


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
    return Settings(Storage.from_option(options.storage_options), _generation_config(options),
                    out.check_run_date(options.run_date or date.today().isoformat()),
                    out.check_partition_columns(options.partition_by, ("idx", "text", *GENERATED)),
                    micro_batch, options.batch_size or 4 * micro_batch, options.commit_images)


def preflight(options: Options) -> None:
    """What can be checked before Ray starts: options, model files, input files, output paths."""
    storage = Storage.from_option(options.storage_options)
    _generation_config(options)
    out.check_run_date(options.run_date or date.today().isoformat())
    out.check_partition_columns(options.partition_by, ("idx", "text", *GENERATED))
    check_model_files(options.model, storage=storage)
    check_inputs("--input", options.input, storage)
    check_output("--output", options.output, storage)
    check_output("--errors", options.errors, storage)
    if options.tsv_output:  # a file: its folder must be writable
        check_output("--tsv-output", os.path.dirname(options.tsv_output.rstrip("/")) or ".", storage)


def read_prompts(options: Options, storage: Storage, partition_by: list[str]) -> Prompts:
    prompts = validate_prompts(gather_prompts(options, storage))
    missing = [c for c in partition_by if c not in prompts.accepted.column_names]
    if missing and prompts.accepted.num_rows:
        raise InputError(f"--partition-by {missing[0]!r}: no such input column "
                         f"(columns: {', '.join(prompts.accepted.column_names)})")
    return prompts


def run(options: Options) -> dict:
    settings = resolve(options)
    root = out.OutputRoot(options.output, settings.run_date, settings.storage, options.errors)
    model = load_model(options.model, parts=(), storage=settings.storage)  # config and fingerprints: no weights
    prompts = read_prompts(options, settings.storage, settings.partition_by)
    errors_path = root.write_rejected(prompts.rejected)
    schema = output_schema(prompts.accepted.schema, settings.partition_by)
    root.table.ensure(schema, ["run_date", *settings.partition_by])
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    actor_kwargs = dict(model=options.model, config=settings.config, micro_batch=settings.micro_batch,
                        table=root.table, schema=schema, partition_by=settings.partition_by,
                        run_date=settings.run_date, run_id=run_id, fail_after=_fail_after(), storage=settings.storage)
    written, skipped = Committer(root.table, root.run_date, schema, ["run_date", *settings.partition_by], run_id,
                                 settings.commit_images), None
    for round_number in range(MAX_ROUNDS + 1):  # more rounds only when concurrent runs took some of our files
        todo, already = expand_samples(prompts.accepted, options.samples, root.table.committed_pairs(root.run_date))
        if skipped is None:
            skipped = already
            _progress(f"{prompts.rows_in} rows read, {prompts.rejected.num_rows} rejected; {already} images already "
                      f"in the table, {todo.num_rows} to generate")
        if todo.num_rows == 0:
            break
        if round_number == MAX_ROUNDS:
            raise RuntimeError(f"{options.output} run_date {root.run_date}: {todo.num_rows} images still missing "
                               f"after {MAX_ROUNDS} rounds lost to concurrent runs")
        generate_into(todo, settings, options.actors, actor_kwargs, written)
    _progress(f"{written.images} images in {written.commits} commits to {options.output}")
    record = to_dict(options) | {"run_date": root.run_date,  # to_dict records --storage-options' source only
                                 "micro_batch": settings.micro_batch, "batch_size": settings.batch_size}
    summary = {
        "run_id": run_id, "run_date": root.run_date, "model": model.fingerprint,
        "rows_in": prompts.rows_in, "prompts_accepted": prompts.accepted.num_rows,
        "rows_rejected": prompts.rejected.num_rows, "truncated_texts": len(written.truncated),
        "samples": options.samples, "pairs_total": prompts.accepted.num_rows * options.samples,
        "skipped_already_done": skipped, "images_out": written.images,
        "images_per_second": round(written.images / written.seconds, 3) if written.seconds else 0.0,
        "generation_seconds": round(written.seconds, 3), "batch_size": settings.batch_size,
        "micro_batch": settings.micro_batch, "commits": written.commits, "commit_conflicts": written.conflicts,
        "files_left_out": written.files_left_out, "table_version": written.version, "output": options.output,
        "errors": errors_path, "dropped_input_columns": prompts.dropped_columns,
    }
    return _finish(root, options, summary, record)


def _finish(root: out.OutputRoot, options: Options, summary: dict, record: dict) -> dict:
    """Sheets, TSV, vacuum and the run record after the commits; the error-rate verdict last."""
    summary |= root.write_sheets(contact_sheet=options.contact_sheet, gallery=options.gallery,
                                 prompts=options.sheet_prompts, font=options.font, image_format=options.image_format)
    if options.tsv_output:
        summary["tsv_lines"] = write_easynlp_tsv(root.read(), options.tsv_output, "image", root.storage_options)
        summary["tsv_output"] = options.tsv_output
    summary["vacuumed_files"] = root.table.vacuum()
    root.write_run_record(summary["run_id"], record | {"summary": summary})
    check_error_rate(summary["rows_rejected"], summary["rows_in"], options.max_error_rate,
                     f"see {summary['errors']}", summary)
    return summary
