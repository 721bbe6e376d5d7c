"""The generate job: a table of prompts -> N images each -> a partitioned, rerunnable output table.

Flow (`run`):
1. `read_input` reads every input file in Ray tasks; the prompts (idx, text and pass-through columns,
   never images) are gathered on the driver, where they are validated: unreadable rows, missing idx,
   empty text and repeated idx (every occurrence after the first) go to the errors table
   `<errors or output/_rejected>/run_date=D/rejected.parquet`, replaced by each run (a rerun reads the
   whole input again). Texts longer than the model's text_len tokens are counted (and truncated).
2. Each prompt becomes `samples` rows (idx, sample); pairs already committed for the run date are
   dropped, and so are pairs held by staged files of an unfinished earlier run with the same
   signature (model, seed, sampling, format, micro-batch, partitioning): those files are committed
   by this run instead of being generated again.
3. An actor pool of `Generator`s (a GPU each where the cluster has GPUs, else CPU slices) generates
   each batch and writes it straight into the run's staging folder; only file names come back.
4. Partitions are committed one by one (`painter.io.output`), then the contact sheet, optional HTML
   gallery and EasyNLP TSV are written from the committed table, and a run record under `_runs/`.

Test-only switch: the environment variable PAINTER_TEST_FAIL_AFTER_BATCHES=K, read by the driver when
`run` starts and handed to the actors, makes each actor raise after it has staged K batches (counted
per actor), as a crash part-way through a night would.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from painter.checkpoint import load_model
from painter.errors import InputError
from painter.generator import PROMPT_COLUMN, GenerationConfig, Generator, default_micro_batch, prompt_image_problem
from painter.io import output as out
from painter.io import sheet
from painter.io.images import IMAGE_FORMATS
from painter.io.tables import REASON, ROW, SOURCE, rejected_table
from painter.options import option, parse_storage_options, to_dict
from painter.stages.common import actor_resources, cluster_has_gpus, join, read_input

FAIL_AFTER_ENV = "PAINTER_TEST_FAIL_AFTER_BATCHES"
STAGE = "generate"
GENERATED = ("sample", "seed", "model", "created_at", "is_truncated", "run_date", *IMAGE_FORMATS)
SHEET_SAMPLES = 8


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
    batch_size: int | None = option(None, "rows per actor call, one staged file per batch and partition; "
                                    "best a multiple of --micro-batch (default: 4 micro-batches)")
    micro_batch: int | None = option(None, "rows per model call: a fixed shape (short batches are padded) "
                                     "that makes images independent of batching (default: 8 on CPU, 64 on GPU)")
    actors: int | None = option(None, "actor pool size (default: one per GPU, else half the CPUs)")
    partition_by: list[str] = option([], "input columns to partition the output by, after run_date")
    run_date: str | None = option(None, "the run_date partition, YYYY-MM-DD (default: today, local time)")
    image_format: str = option("png", "image encoding; the image column is named after it", choices=IMAGE_FORMATS)
    precision: str | None = option(None, "model weights for generation: fp32 or bf16 (default: bf16 on GPU, "
                                   "fp32 on CPU); images depend on it", choices=("fp32", "bf16"))
    tsv_output: str | None = option(None, "also write the night as EasyNLP TSV: idx, text, gen_imgbase64")
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
                                precision=options.precision, guidance=options.guidance, candidates=options.candidates,
                                scorer=options.scorer, keep_rows=options.keep_rows)
    except ValueError as e:
        raise InputError(str(e)) from None


def _find_cause(error: BaseException, kind: type) -> BaseException | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None


def gather_prompts(options: Options, storage_options: dict) -> pa.Table:
    """Every input row on the driver (schema columns, pass-through columns, `_source`, `_row`, `_reason`)."""
    ds = read_input(options.input, options.input_schema, storage_options or None)
    try:
        tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    except Exception as e:  # a worker's InputError (e.g. a file that is not Parquet) arrives wrapped
        cause = _find_cause(e, InputError)
        if cause is None:
            raise
        raise InputError(cause.args[0] if cause.args else str(cause)) from None
    if not tables:
        return pa.table({"idx": pa.array([], pa.string()), "text": pa.array([], pa.string()),
                         SOURCE: pa.array([], pa.string()), ROW: pa.array([], pa.int64()),
                         REASON: pa.array([], pa.string())})
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
    """Split rows into accepted prompts and rejected rows (with reasons); idx and text become strings."""
    idx, text = rows.column("idx").to_pylist(), rows.column("text").to_pylist()
    prompts = rows.column(PROMPT_COLUMN).to_pylist() if PROMPT_COLUMN in rows.column_names else None
    sources, numbers, reasons = (rows.column(c).to_pylist() for c in (SOURCE, ROW, REASON))
    first: dict[str, str] = {}
    for i, reason in enumerate(reasons):
        if reason is not None:
            continue
        if idx[i] is None or not str(idx[i]).strip():
            reasons[i] = "missing idx"
        elif text[i] is None or not str(text[i]).strip():
            reasons[i] = "empty text"
        elif str(idx[i]) in first:
            reasons[i] = f"duplicate idx (first at {first[str(idx[i])]})"
        elif prompts is not None and (reason := prompt_image_problem(prompts[i])):
            reasons[i] = reason
        else:
            first[str(idx[i])] = f"{sources[i]} row {numbers[i]}"
    good = [r is None for r in reasons]
    bad = [i for i, ok in enumerate(good) if not ok]
    rejected = rejected_table([idx[i] for i in bad], [sources[i] for i in bad], [numbers[i] for i in bad],
                              [reasons[i] for i in bad], STAGE)
    dropped = [c for c in rows.column_names if c in GENERATED]
    accepted = _as_strings(rows, ("idx", "text")).filter(pa.array(good)).drop_columns([SOURCE, ROW, REASON, *dropped])
    return Prompts(accepted, rejected, rows.num_rows, dropped)


def expand_samples(prompts: pa.Table, samples: int, committed: set, recovered: set) -> tuple[pa.Table, int, int]:
    """Rows (prompt, sample) still to generate, in input order with a `sample` column; and how many
    of the wanted pairs were already committed, and how many are in recovered staged files."""
    idx = prompts.column("idx").to_pylist()
    keep, skipped, found = [], 0, 0
    for i in range(len(idx)):
        for s in range(samples):
            if (idx[i], s) in committed:
                skipped += 1
            elif (idx[i], s) in recovered:
                found += 1
            else:
                keep.append((i, s))
    table = prompts.take(pa.array([i for i, _ in keep], pa.int64()))
    return table.append_column("sample", pa.array([s for _, s in keep], pa.int64())), skipped, found


def output_rows(batch: pa.Table, generated: dict, image_column: str) -> pa.Table:
    """The output row schema: idx, text, sample, seed, image, model, created_at, is_truncated, then pass-through."""
    n = batch.num_rows
    created = datetime.now(timezone.utc)
    columns = {
        "idx": batch.column("idx"), "text": batch.column("text"), "sample": batch.column("sample"),
        "seed": pa.array(generated["seed"], pa.int64()),
        image_column: pa.array(list(generated[image_column]), pa.binary()),
        "model": pa.array(list(generated["model"]), pa.string()),
        "created_at": pa.array([created] * n, pa.timestamp("us", tz="UTC")),
        "is_truncated": pa.array(generated["is_truncated"], pa.bool_()),
    }
    if "score" in generated:  # --candidates: the kept candidate's score
        columns["score"] = pa.array(generated["score"], pa.float32())
    for name in batch.column_names:
        columns.setdefault(name, batch.column(name))
    return pa.table(columns)


class GenerateActor:
    """Ray actor: generate a batch, stage it under the run's staging folder, return the staged files."""

    def __init__(self, *, model: str, config: GenerationConfig, micro_batch: int, table: out.OutputTable,
                 run_id: str, partition_by: list[str], signature: str, fail_after: int | None):
        self.generator = Generator(model, config, micro_batch=micro_batch)
        self.table, self.run_id, self.partition_by = table, run_id, partition_by
        self.signature, self.fail_after, self.batches = signature, fail_after, 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise RuntimeError(f"{FAIL_AFTER_ENV}={self.fail_after}: failing on purpose after {self.batches} batches")
        names = ("idx", "text", "sample", *([PROMPT_COLUMN] if PROMPT_COLUMN in batch.column_names else []))
        columns = {name: batch.column(name).to_pylist() for name in names}
        generated = self.generator(columns)
        rows = output_rows(batch, generated, self.generator.config.image_format)
        staged = self.table.stage(rows, self.run_id, self.partition_by, self.signature)
        self.batches += 1
        return pa.Table.from_pylist([asdict(item) for item in staged])


def generate_staged(todo: pa.Table, batch_size: int, actors: int | None, actor_kwargs: dict
                    ) -> tuple[list[out.StagedFile], float]:
    """Run the actor pool over `todo`; the staged files and the seconds it took."""
    if todo.num_rows == 0:
        return [], 0.0
    block = batch_size * max(1, math.ceil(todo.num_rows / (batch_size * 256)))  # at most ~256 blocks
    ds = ray.data.from_arrow([todo.slice(i, block) for i in range(0, todo.num_rows, block)])
    staged = ds.map_batches(GenerateActor, batch_size=batch_size, batch_format="pyarrow",
                            fn_constructor_kwargs=actor_kwargs, **actor_resources(actors))
    start = time.time()
    rows = staged.take_all()
    return [out.StagedFile(**row) for row in rows], time.time() - start


def _signature(fingerprint: str, settings: Settings) -> str:
    """Names everything an image's bytes depend on besides (idx, sample): staged files of a run with
    another signature are never committed by this one."""
    config = settings.config
    named = {"model": fingerprint, "seed": config.seed, "temperature": config.temperature, "top_k": config.top_k,
             "top_p": config.top_p, "guidance": config.guidance, "candidates": config.candidates,
             "scorer": config.scorer, "keep_rows": config.keep_rows, "format": config.image_format,
             "micro_batch": settings.micro_batch, "precision": config.precision,
             "partition_by": settings.partition_by}
    return hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()[:16]


def _write_rejected(rejected: pa.Table, options: Options, run_date: str, storage_options: dict) -> str:
    root = options.errors or join(options.output.rstrip("/"), "_rejected")
    buffer = io.BytesIO()
    pq.write_table(rejected, buffer)
    return out.write_bytes(join(root, f"run_date={run_date}", "rejected.parquet"), buffer.getvalue(), storage_options)


def _sheet_rows(table: out.OutputTable, image_column: str, prompts: int) -> list[list[sheet.SheetItem]]:
    chosen = sorted(set(table.committed_pairs().column("idx").to_pylist()))[:prompts]
    if not chosen:
        return []
    rows = table.read(["idx", "text", "sample", image_column], idx=chosen).sort_by(
        [("idx", "ascending"), ("sample", "ascending")]).to_pylist()
    grouped: dict[str, list[sheet.SheetItem]] = {}
    for r in rows:
        grouped.setdefault(r["idx"], []).append(sheet.SheetItem(r[image_column], r["idx"], r["sample"], r["text"]))
    return [items[:SHEET_SAMPLES] for items in grouped.values()]


def write_sheets(table: out.OutputTable, options: Options, storage_options: dict) -> dict:
    """Contact sheet and gallery of the committed night; their paths and the caption font used."""
    result = {"contact_sheet": None, "gallery": None}
    if not (options.contact_sheet or options.gallery):
        return result
    rows = _sheet_rows(table, options.image_format, options.sheet_prompts)
    if not rows:
        return result | {"sheet_note": "no committed images to show"}
    folder = join(table.output, "_sheets", f"run_date={table.run_date}")
    if options.contact_sheet:
        font = sheet.find_caption_font(options.font)
        result["contact_sheet"] = out.write_bytes(join(folder, "contact_sheet.png"),
                                                  sheet.contact_sheet(rows, font), storage_options)
        result["caption_font"] = font.path
        result["caption_font_note"] = font.note
    if options.gallery:
        page = sheet.gallery_html(rows, f"painter {table.run_date}", options.image_format)
        result["gallery"] = out.write_bytes(join(folder, "gallery.html"), page.encode("utf-8"), storage_options)
    return result


def _progress(message: str) -> None:
    """A progress line on stderr (stdout's last line is the summary)."""
    print(f"[generate] {message}", file=sys.stderr, flush=True)


def _fail_after() -> int | None:
    value = os.environ.get(FAIL_AFTER_ENV)
    return int(value) if value else None


@dataclass(frozen=True)
class Settings:
    """Options checked and resolved before any work."""
    storage_options: dict
    config: GenerationConfig
    run_date: str
    partition_by: list[str]
    micro_batch: int
    batch_size: int


def resolve(options: Options) -> Settings:
    """The run's settings, or InputError naming the option; needs Ray started (GPUs decide defaults)."""
    for name in ("samples", "batch_size", "micro_batch", "sheet_prompts"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    micro_batch = options.micro_batch or default_micro_batch("cuda" if cluster_has_gpus() else "cpu")
    return Settings(parse_storage_options(options.storage_options), _generation_config(options),
                    out.check_run_date(options.run_date or date.today().isoformat()),
                    out.check_partition_columns(options.partition_by, ("idx", "text", *GENERATED)),
                    micro_batch, options.batch_size or 4 * micro_batch)


def read_prompts(options: Options, storage_options: dict, partition_by: list[str]) -> Prompts:
    prompts = validate_prompts(gather_prompts(options, storage_options))
    missing = [c for c in partition_by if c not in prompts.accepted.column_names]
    if missing and prompts.accepted.num_rows:
        raise InputError(f"--partition-by {missing[0]!r}: no such input column "
                         f"(columns: {', '.join(prompts.accepted.column_names)})")
    return prompts


def run(options: Options) -> dict:
    settings = resolve(options)
    storage_options, run_date = settings.storage_options, settings.run_date
    model = load_model(options.model, parts=())  # config, tokenizer and fingerprints: no weights here
    prompts = read_prompts(options, storage_options, settings.partition_by)
    errors_path = _write_rejected(prompts.rejected, options, run_date, storage_options)
    truncated = int(model.tokenizer.encode_batch(prompts.accepted.column("text").to_pylist())[1].sum())
    table = out.OutputTable(options.output, run_date, storage_options)
    signature = _signature(model.fingerprint, settings)
    committed = set(out.pairs(table.committed_pairs()))
    recovery = table.recover(signature, committed)
    todo, skipped, recovered = expand_samples(prompts.accepted, options.samples, committed, recovery.pairs)
    _progress(f"{prompts.rows_in} rows read, {prompts.rejected.num_rows} rejected; {skipped} images already "
              f"committed, {recovered} recovered from staging, {todo.num_rows} to generate")
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    record = to_dict(options) | {"storage_options": "<not recorded>", "run_date": run_date,
                                 "micro_batch": settings.micro_batch, "batch_size": settings.batch_size}
    table.start_run(run_id, signature, record)
    staged, seconds = generate_staged(todo, settings.batch_size, options.actors, dict(
        model=options.model, config=settings.config, micro_batch=settings.micro_batch, table=table, run_id=run_id,
        partition_by=settings.partition_by, signature=signature, fail_after=_fail_after()))
    partitions = table.commit(recovery.files + staged, run_id)
    table.remove_runs([*recovery.runs, table.staging_dir(run_id)])
    _progress(f"{len(partitions)} partitions committed under {options.output}")
    images = sum(s.rows for s in staged)
    summary = {
        "run_id": run_id, "run_date": run_date, "model": model.fingerprint,
        "rows_in": prompts.rows_in, "prompts_accepted": prompts.accepted.num_rows,
        "rows_rejected": prompts.rejected.num_rows, "truncated_texts": truncated, "samples": options.samples,
        "pairs_total": prompts.accepted.num_rows * options.samples, "skipped_already_done": skipped,
        "recovered_from_staging": recovered, "images_out": images,
        "images_per_second": round(images / seconds, 3) if seconds else 0.0, "generation_seconds": round(seconds, 3),
        "batch_size": settings.batch_size, "micro_batch": settings.micro_batch,
        "partitions_committed": len(partitions), "output": options.output, "errors": errors_path,
        "dropped_input_columns": prompts.dropped_columns, "discarded_staged_files": recovery.discarded_files,
        "ignored_staging_runs": recovery.ignored_runs,
    }
    return _finish(table, options, storage_options, summary, record)


def _finish(table: out.OutputTable, options: Options, storage_options: dict, summary: dict, record: dict) -> dict:
    """Sheets, TSV and the run record after the commit; the error-rate verdict last."""
    summary |= write_sheets(table, options, storage_options)
    if options.tsv_output:
        summary["tsv_lines"] = out.write_easynlp_tsv(table, options.tsv_output, options.image_format, storage_options)
        summary["tsv_output"] = options.tsv_output
    table.write_atomic(join(table.root, "_runs", f"run_date={table.run_date}", f"{summary['run_id']}.json"),
                       json.dumps(record | {"summary": summary}, ensure_ascii=False, default=str).encode())
    rate = summary["rows_rejected"] / summary["rows_in"] if summary["rows_in"] else 0.0
    if rate > options.max_error_rate:
        summary["_failed"] = (f"{summary['rows_rejected']} of {summary['rows_in']} rows rejected ({rate:.1%}), "
                              f"above --max-error-rate {options.max_error_rate}; see {summary['errors']}")
    return summary
