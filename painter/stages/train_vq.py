"""The train-vq job (stage 1): Ray Train DDP training of a model directory's VQGAN on an image corpus.

Pipeline:
  check      Ray Data over the whole corpus (read_input -> decode on CPU tasks), keeping only the
             small (idx, file, row, reason) columns: counts the rows, writes the rejected ones to
             `<output>/_rejected/` (replaced on every run) and fails early above `--max-error-rate`.
  hold out   the first `--eval-images` good rows by (file, row) (at most a fifth of them) are kept
             out of training and decoded once (`eval`); their reconstruction error, PSNR and code use
             are measured with the starting weights and after the last step.
  train      the other good rows stream from Ray Data CPU tasks (decode -> uint8 (S, S, 3) pixels) to
             the workers every epoch; each runs `painter.stages.train_vq_worker.train_loop`
             (`painter.training.vqgan.train_step` over its split: L1 + L2 + codebook loss, dead-code
             restarts every `--restart-every` steps, an optional PatchGAN term with `--gan-weight`).
  export     the final checkpoint's model directory is copied to `--output` with `train.json`.
Images are decoded once by the check and once per epoch by the training stream (nothing the size of
the corpus's pixels is ever held), plus once for the held-out rows.

The output directory holds the input model's config, vocab and GPT (copied; a GPT fine-tuned on the
old VQGAN's codes is no longer matched to the new one) and the trained VQGAN, whose new fingerprint
is in its config.json: token shards made with the old VQGAN are refused by `painter train`, as they
should be; tokenize the corpus again with the output directory.

The learning rate defaults to what suits the start: 2e-3 with `--from-scratch` (a prototype trained
the `tiny` VQGAN with it: Adam, batch 32, restarts every 100 steps), 1e-4 when starting from the
model's weights, where 2e-3 would wreck a pretrained 256-px VQGAN in a few steps.

Runs, checkpoints, `metrics.jsonl`, `--resume` and the recovery of a failed worker group are those of
the one runner both training jobs share (`painter.stages.train_runner`): the same run layout under
`--run-dir` (default `<output>/_runs`), the same rules for names, and the same test-only fault switch
(`painter.stages.faults.FAIL_AT_STEP`).
"""
from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc
import ray

from painter import logs
from painter.training import loss_curve as plots
from painter.checkpoint.model_dir import check_model_files, load_model
from painter.inference.encoder import BASE64_COLUMN, BINARY_COLUMN, PIXELS, image_cells
from painter.errors import CheckpointError, InputError, check_error_rate
from painter.io import tables
from painter.io import columns as column_map
from painter.io.checks import check_inputs, check_output
from painter.io.images import prepare_pixels
from painter.io.rows import REASON, ROW, SOURCE, empty_rows
from painter.io.storage import Storage
from painter.options import to_dict
from painter.options.train_vq import FINE_TUNE_LR, SCRATCH_LR, Options  # noqa: F401 (callers read them here too)
from painter.stages.datasets import join, read_input, write_rejected
from painter.stages.ray_errors import painter_errors
from painter.stages.progress import remote_progress
from painter.stages.train_runner import (checkpoint_url, export_model, fit, plan_steps, run_location,
                                         run_path_of, scaling_config)
from painter.stages.tracking import mlflow_run
from painter.stages.train_vq_worker import WorkerConfig, train_loop
from painter.training.vqgan import VQTrainConfig

STAGE = "train-vq"
log = logs.get(STAGE)


def _check_options(o: Options) -> None:
    names = column_map.renamed([c.name for c in tables.parse_schema(o.input_schema)], column_map.parse(o.columns))
    if BASE64_COLUMN not in names:
        raise InputError(f"--input-schema {o.input_schema!r} names no {BASE64_COLUMN!r} column")
    if min(o.micro_batch, o.workers, o.max_pixels) < 1 or (o.max_steps is not None and o.max_steps < 1):
        raise InputError("--micro-batch, --workers, --max-pixels and --max-steps must be positive")
    if min(o.eval_images, o.restart_every, o.gan_start, o.warmup_steps, o.shuffle_buffer) < 0 or o.gan_weight < 0:
        raise InputError("--eval-images, --restart-every, --gan-start, --gan-weight, --warmup-steps and "
                         "--shuffle-buffer must not be negative")
    if not 0 <= o.max_error_rate <= 1:
        raise InputError(f"--max-error-rate must be between 0 and 1, got {o.max_error_rate}")
    if o.peak_lr <= 0:
        raise InputError(f"--lr must be positive, got {o.lr}")


# --- the Ray Data side ---------------------------------------------------------------------------


def prepare_images(batch: pa.Table, size: int, max_pixels: int, keep: str,
                   eval_keys: frozenset = frozenset()) -> pa.Table:
    """Rows read by `read_input` -> decoded images, on a Ray Data CPU task. Never raises for bad data.

    keep="check": every row's (idx, _source, _row, _reason), the images decoded but not returned;
    keep="train": `pixels` (uint8 (size, size, 3) bytes), `_source` and `_row` of the good rows not in `eval_keys`;
    keep="eval":  the same of the good rows in `eval_keys` (only those are decoded).
    Keys are (file, row) pairs.
    """
    cells, is_base64 = image_cells(batch)
    reasons = batch[REASON].to_pylist()
    sources, rows = batch[SOURCE].to_pylist(), batch[ROW].to_pylist()
    pixels, kept = [], []
    for i in range(batch.num_rows):
        if reasons[i] is not None:
            continue
        if keep != "check" and ((sources[i], rows[i]) in eval_keys) != (keep == "eval"):
            continue
        array, reasons[i] = prepare_pixels(cells[i], size, is_base64=is_base64[i], max_pixels=max_pixels)
        if array is not None and keep != "check":
            pixels.append(array.tobytes())
            kept.append(i)
    if keep != "check":
        return pa.table({PIXELS: pa.array(pixels, pa.binary()), ROW: pa.array([rows[i] for i in kept], pa.int64()),
                         SOURCE: pa.array([sources[i] for i in kept], pa.string())})
    idx = batch["idx"].to_pylist() if "idx" in batch.column_names else [None] * batch.num_rows
    return pa.table({"idx": pa.array([None if v is None else str(v) for v in idx], pa.string()),
                     SOURCE: batch[SOURCE].cast(pa.string()), ROW: batch[ROW].cast(pa.int64()),
                     REASON: pa.array(reasons, pa.string())})


def image_dataset(o: Options, storage: Storage, size: int, keep: str, eval_keys: frozenset = frozenset(),
                  paths: list[str] | None = None) -> ray.data.Dataset:
    """The lazy read -> decode graph of `prepare_images` (reading at 0.25 CPU, decoding at 0.5: unfused)."""
    rows = read_input(paths or o.input, o.input_schema, storage, alternatives={BASE64_COLUMN: BINARY_COLUMN},
                      num_cpus=0.25, columns=column_map.parse(o.columns))
    return rows.map_batches(prepare_images, batch_format="pyarrow", batch_size=None, num_cpus=0.5,
                            fn_kwargs={"size": size, "max_pixels": o.max_pixels, "keep": keep,
                                       "eval_keys": eval_keys})


def image_datasets(o: Options, storage: Storage, size: int, held_out: list, in_memory: bool) -> tuple[dict, dict]:
    """(Ray Train's datasets, the WorkerConfig's in-memory blocks). In memory, the decoded images are
    materialized once and the workers get the object refs of their blocks (`train_blocks`, `eval_blocks`),
    each taking its share by key (`painter.stages.train_vq_worker.pixels_in_memory`); otherwise the training
    images stream through Ray Data (decoded every epoch) and the held-out ones are a materialized dataset."""
    eval_keys = frozenset(held_out)
    train = image_dataset(o, storage, size, "train", eval_keys)
    held = None
    if held_out:
        held = image_dataset(o, storage, size, "eval", eval_keys, paths=sorted({s for s, _ in held_out})).materialize()
    if in_memory:
        blocks = {"train_blocks": train.materialize().to_arrow_refs()}
        return {}, blocks | ({"eval_blocks": held.to_arrow_refs()} if held is not None else {})
    return {"train": train} | ({"eval": held} if held is not None else {}), {}


def check_corpus(o: Options, storage: Storage, size: int, errors: str) -> pa.Table:
    """Decode every row once; write the rejected rows to `errors` (replacing what is there); the keys table."""
    checked = image_dataset(o, storage, size, "check").materialize()
    parts = [t for t in ray.get(checked.to_arrow_refs()) if t.num_rows]
    keys = pa.concat_tables(parts) if parts else empty_rows("idx")
    storage.remove(errors, recursive=True)
    if pc.sum(pc.is_valid(keys[REASON])).as_py():
        write_rejected(checked, errors, STAGE, storage)
    return keys


def held_out_keys(keys: pa.Table, eval_images: int) -> list[tuple[str, int]]:
    """The first `eval_images` good rows by (file, row), at most a fifth of the good rows."""
    good = keys.filter(pc.is_null(keys[REASON])).sort_by([(SOURCE, "ascending"), (ROW, "ascending")])
    n = min(eval_images, good.num_rows // 5)
    return list(zip(good[SOURCE].to_pylist()[:n], good[ROW].to_pylist()[:n]))


def _first_rejection(keys: pa.Table) -> str:
    bad = keys.filter(pc.is_valid(keys[REASON])).sort_by([(SOURCE, "ascending"), (ROW, "ascending")])
    return f"{bad[SOURCE][0].as_py()} row {bad[ROW][0].as_py()}: {bad[REASON][0].as_py()}"


# --- the run -------------------------------------------------------------------------------------


def preflight(o: Options) -> None:
    """What can be checked before Ray starts: options, the VQGAN to start from, input files, output paths."""
    _check_options(o)
    storage = Storage.from_option(o.storage_options)
    check_model_files(o.model, parts=() if o.from_scratch else ("vqgan",), storage=storage)
    check_inputs("--input", o.input, storage, columns=column_map.parse(o.columns))
    check_output("--output", o.output, storage)
    check_output("--run-dir", o.run_dir, storage)
    run_location(o, storage)


def run(o: Options) -> dict:
    """Train the VQGAN; the summary has the losses, held-out reconstruction and code use, and row counts; recorded
    in MLflow with --mlflow-uri (`painter.stages.tracking`)."""
    with mlflow_run(o, "train-vq", run_path_of(o), Storage.from_option(o.storage_options)):
        return _train(o)


def _train(o: Options) -> dict:
    start_time = time.time()
    _check_options(o)
    storage = Storage.from_option(o.storage_options)
    source = load_model(o.model, parts=(), storage=storage)
    if (not o.from_scratch and not source.vqgan_fingerprint
            and not storage.exists(join(source.path, "vqgan.safetensors"))):
        raise CheckpointError(f"{source.path}: no VQGAN weights to start from (pass --from-scratch)")
    if storage.fs(source.path)[1].rstrip("/") == storage.fs(o.output)[1].rstrip("/"):
        raise InputError(f"--output {o.output} is the --model directory; write the trained model elsewhere")
    scaling = scaling_config(o)
    runs, run_path = run_location(o, storage)
    size = source.config.vqgan.resolution
    errors = join(o.output, "_rejected")
    log.info(f"checking {', '.join(o.input)}: decoding every image at {size}x{size}")
    with painter_errors():
        keys = check_corpus(o, storage, size, errors)
    rows_in, rows_rejected = keys.num_rows, pc.sum(pc.is_valid(keys[REASON])).as_py() or 0
    good = rows_in - rows_rejected
    if rows_in == 0:
        raise InputError(f"{', '.join(o.input)}: no rows to read")
    if good == 0:
        raise InputError(f"{', '.join(o.input)}: no usable images (all {rows_in} rows rejected; first at "
                         f"{_first_rejection(keys)}); rejected rows are in {errors}")
    check_error_rate(rows_rejected, rows_in, o.max_error_rate, f"see {errors}",
                     {"rows_in": rows_in, "rows_rejected": rows_rejected, "errors": errors})
    held_out = held_out_keys(keys, o.eval_images)
    train_rows = good - len(held_out)
    steps_per_epoch, total = plan_steps(train_rows, o)
    in_memory = train_rows * size * size * 3 <= o.in_memory_mb * 2**20  # uint8 RGB
    datasets, blocks = image_datasets(o, storage, size, held_out, in_memory)
    log.info(f"{rows_in} rows, {rows_rejected} rejected, {len(held_out)} held out, {train_rows} to train on; "
         f"{o.workers} workers, {steps_per_epoch} steps/epoch, {total} steps{' (resuming)' if o.resume else ''} "
         f"-> {run_path}")
    train = VQTrainConfig(lr=o.peak_lr, warmup_steps=o.warmup_steps, total_steps=total, min_lr_ratio=o.min_lr_ratio,
                          grad_clip=o.grad_clip, restart_every=o.restart_every, gan_weight=o.gan_weight,
                          gan_start=o.gan_start)
    with remote_progress(STAGE, total, "steps") as progress:
        config = WorkerConfig(source=source.path, model=source.config, train=train, run_path=run_path,
                              steps_per_epoch=steps_per_epoch, total_steps=total, seed=o.seed,
                              micro_batch=o.micro_batch, shuffle_buffer=o.shuffle_buffer, log_every=max(1, o.log_every),
                              checkpoint_every=max(1, o.checkpoint_every), in_memory=in_memory, storage=storage,
                              progress=progress, from_scratch=o.from_scratch, has_eval=bool(held_out), **blocks)
        result = fit(train_loop, config, datasets, scaling, o, runs, storage, stage=STAGE)
    m = result.metrics
    summary = _summary(o, m, rows_in, rows_rejected, train_rows, steps_per_epoch, run_path, errors)
    summary["data_path"] = "memory" if in_memory else "stream"
    summary |= {"checkpoint": checkpoint_url(result.checkpoint, run_path), "previous_vqgan": source.vqgan_fingerprint,
                "loss_curve": plots.write_loss_curve(run_path, f"train-vq {o.name}", {
                    "train loss": "loss", "train L1": "l1", "held-out L1": "eval.l1"}, storage)}
    export_model(result.checkpoint, o.output, {"options": to_dict(o) | {"lr": o.peak_lr}, "summary": summary}, storage)
    summary["vqgan"] = load_model(o.output, parts=(), storage=storage).vqgan_fingerprint
    summary["seconds"] = round(time.time() - start_time, 3)
    return summary


def _summary(o: Options, m: dict, rows_in: int, rows_rejected: int, train_rows: int, steps_per_epoch: int,
             run_path: str, errors: str) -> dict:
    final, start = m.get("eval") or {}, m.get("start_eval") or {}
    measured = bool(final.get("images"))
    return {
        "steps": m["step"], "epochs": round(m["step"] / steps_per_epoch, 3),
        "first_loss": m["first_loss"], "final_loss": m["loss"],
        # held-out images when there are any, else the last logging window of training
        "reconstruction_l1": final["l1"] if measured else m["l1"], "psnr": final.get("psnr"),
        "codebook_usage": final["codebook_usage"] if measured else m["codebook_usage"],
        "perplexity": final["perplexity"] if measured else m["perplexity"],
        "start_reconstruction_l1": start.get("l1"), "start_psnr": start.get("psnr"),
        "start_codebook_usage": start.get("codebook_usage"), "eval_images": final.get("images", 0),
        "train_l1": m["l1"], "train_codebook_usage": m["codebook_usage"], "train_perplexity": m["perplexity"],
        "codes_restarted": m["codes_restarted"], "images_per_second": m["run_images_per_second"],
        "rows_in": rows_in, "rows_rejected": rows_rejected, "rows": train_rows, "errors": errors,
        "steps_per_epoch": steps_per_epoch, "workers": o.workers, "lr": o.peak_lr, "output": o.output, "run": run_path,
    }
