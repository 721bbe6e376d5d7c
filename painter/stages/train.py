"""The train job: Ray Train DDP fine-tuning of the GPT on token shards, resumable after failures.

The driver (`run`) lists the shards, refuses any whose metadata does not fit the model (another
VQGAN, vocab or lengths), sizes the run (steps per epoch from the row count), and starts a
`TorchTrainer` through the one runner (`painter.stages.train_runner`); every worker runs
`painter.stages.train_worker.train_loop` (painter.training.gpt's `train_step` over its split of the shards).
Only token ids flow: the VQGAN is never loaded, its weights file is only copied along into every checkpoint.

Where the model starts: `--init DIR` (a model directory; one without gpt.safetensors, as
`import-vqgan` writes, starts the GPT from a seeded random init of its config), or `--preset NAME
--vqgan DIR` (the preset's depth and width, a fresh GPT, on the VQGAN, vocab and lengths of DIR).

Run layout, under `--run-dir` (default `<output>/_runs`): `<name>/checkpoint_*/` (each a full model
directory plus `train_state.pt`: optimizer, schedule, step, epoch; the last two are kept),
`<name>/metrics.jsonl` (one JSON line per logged step) and, with `--record-rows`,
`<name>/rows/epoch<E>-rank<R>.txt`. A failed worker group restarts from the last checkpoint (up to
`--max-failures` times). An existing run name is refused unless `--resume` is given, which
continues it (e.g. to a larger `--max-steps`). The final model directory is copied to `--output`
with `train.json` (options and summary).

A test can make a worker fail after a step (`painter.stages.faults.FAIL_AT_STEP`).
"""
from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from painter import logs
from painter.training import loss_curve as plots
from painter.checkpoint.config import ModelConfig, preset_config
from painter.checkpoint.model_dir import check_model_files, load_model
from painter.errors import InputError, PainterError, StorageError
from painter.io import tables
from painter.io.checks import check_output, describe
from painter.io.shards import ShardInfo, check_shards_fit
from painter.io.storage import Storage, as_storage
from painter.models.gpt import GPTConfig
from painter.options import to_dict
from painter.options.train import Options
from painter.stages.progress import remote_progress
from painter.stages.train_runner import (checkpoint_url, export_model, fit, plan_steps, run_location, run_path_of,
                                         scaling_config)
from painter.stages.tracking import mlflow_run
from painter.stages.train_worker import WorkerConfig, train_loop
from painter.training.gpt import TrainConfig

log = logs.get("train")


@dataclass
class Start:
    """Where training starts: the directory giving vocab and VQGAN, the model shape, GPT weights or not."""
    source: str
    config: ModelConfig
    shard_info: ShardInfo
    has_gpt: bool


def resolve_start(o: Options, storage: Storage | None = None) -> Start:
    """The model to train, from --init or --preset/--vqgan, without loading any weights."""
    if (o.init is None) == (o.preset is None):
        raise InputError("give exactly one of --init MODEL_DIR or --preset NAME (with --vqgan MODEL_DIR)")
    if o.preset is not None and o.vqgan is None:
        raise InputError(f"--preset {o.preset} needs --vqgan MODEL_DIR: the VQGAN and vocab the shards were made with")
    if o.init is not None and o.vqgan is not None:
        raise InputError("--vqgan goes with --preset; --init already names the model's VQGAN")
    if o.dropout and o.preset is None:
        raise InputError("--dropout goes with --preset; --init keeps the dropout in its model's config")
    if not 0.0 <= o.dropout < 1.0:
        raise InputError(f"--dropout must be in [0, 1), got {o.dropout}")
    if not 0.0 <= o.null_caption_prob < 1.0:
        raise InputError(f"--null-caption-prob must be in [0, 1), got {o.null_caption_prob}")
    storage = as_storage(storage)
    source = load_model(o.init or o.vqgan, parts=(), storage=storage)
    if not source.vqgan_fingerprint:
        raise InputError(f"{source.path}: its config.json records no VQGAN fingerprint, so shards cannot be checked")
    config = source.config
    if o.preset is not None:
        shape, c = preset_config(o.preset).gpt, source.config.gpt
        gpt = GPTConfig(img_vocab_size=c.img_vocab_size, text_vocab_size=c.text_vocab_size, text_len=c.text_len,
                        img_len=c.img_len, n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                        embd_pdrop=o.dropout, resid_pdrop=o.dropout)
        config = ModelConfig(gpt, source.config.vqgan, name=o.preset)
    if o.null_caption_prob > 0:
        config = dataclasses.replace(config, null_caption_prob=o.null_caption_prob)
    has_gpt = o.init is not None and (bool(source.gpt_fingerprint)
                                      or storage.exists(posixpath.join(source.path, "gpt.safetensors")))
    return Start(source.path, config, ShardInfo.for_model(source), has_gpt)


def list_shards(paths: list[str], storage: Storage | None = None) -> list[str]:
    """Shard files (as given: local paths or URLs) named by files, globs or directories.

    Below a directory, names starting with `_` or `.` are skipped (the tokenize job's `_rejected/`).
    """
    files = tables.expand_paths(paths, storage, extensions=(".parquet",))
    protocols = {f.split("://", 1)[0] if "://" in f else "file" for f in files}
    if len(protocols) > 1:
        raise InputError(f"{', '.join(paths)}: shards of one option must be on one filesystem, not {sorted(protocols)}")
    return files


def check_shards(files: list[str], model_info: ShardInfo, storage: Storage | None = None) -> int:
    """Refuse, naming the file, any shard that is not readable Parquet or does not fit the model; the rows of
    all of them (from the same footers)."""
    if not files:
        raise InputError("no token shards found")
    filesystem, _ = as_storage(storage).arrow(files[0])
    rows = 0
    for file in files:
        try:
            footer = pq.read_metadata(tables.url_to_fs(file, storage)[1], filesystem=filesystem)
        except pa.ArrowException as e:  # truncated, or not Parquet: "Parquet magic bytes not found"
            raise InputError(f"{file}: not a readable token shard ({describe(e)})") from None
        check_shards_fit(ShardInfo.from_schema(footer.schema.to_arrow_schema(), file), model_info, file)
        rows += footer.num_rows
    return rows


def shard_dataset(files: list[str], storage: Storage | None = None):
    """A Ray Dataset over the token shards `files` (checked first with `check_shards`), streamed to the workers."""
    import ray.data

    filesystem, _ = as_storage(storage).arrow(files[0])
    return ray.data.read_parquet([tables.url_to_fs(f, storage)[1] for f in files], filesystem=filesystem)


def preflight(o: Options) -> None:
    """What can be checked before Ray starts: the start model's files, every shard's footer, the run and
    output paths."""
    storage = Storage.from_option(o.storage_options)
    start = resolve_start(o, storage)
    check_model_files(start.source, parts=("gpt", "vqgan") if start.has_gpt else ("vqgan",), storage=storage)
    for paths in (o.data, o.val_data):
        if paths:
            try:
                files = list_shards(paths, storage)
            except Exception as e:  # refused connections, denied access: after the retries
                if isinstance(e, PainterError):
                    raise
                raise StorageError(f"{', '.join(paths)}: cannot list the token shards ({describe(e)})") from None
            check_shards(files, start.shard_info, storage)
    check_output("--output", o.output, storage)
    check_output("--run-dir", o.run_dir, storage)
    run_location(o, storage)


def run(o: Options) -> dict:
    """The training run, recorded in MLflow with --mlflow-uri (`painter.stages.tracking`)."""
    with mlflow_run(o, "train", run_path_of(o), Storage.from_option(o.storage_options)):
        return _train(o)


def _train(o: Options) -> dict:
    storage = Storage.from_option(o.storage_options)
    start = resolve_start(o, storage)
    scaling = scaling_config(o)
    runs, run_path = run_location(o, storage)
    files, val_files = list_shards(o.data, storage), list_shards(o.val_data, storage)
    rows = check_shards(files, start.shard_info, storage)
    steps_per_epoch, total = plan_steps(rows, o)
    in_memory = keeps_in_memory(o, start, steps_per_epoch)
    # a split kept in memory is read by each worker itself (painter.io.shards.read_split)
    datasets = {} if in_memory else {"train": shard_dataset(files, storage)}
    if val_files:
        check_shards(val_files, start.shard_info, storage)
        datasets["val"] = shard_dataset(val_files, storage)
    log.info(f"{len(files)} shards, {rows} rows, {o.workers} workers, {steps_per_epoch} steps/epoch, "
          f"{total} steps{' (resuming)' if o.resume else ''} -> {run_path}")
    if not start.has_gpt:
        log.info(f"{start.source} has no GPT weights: the {start.config.name} GPT starts from a random init "
              f"(seed {o.seed})")
    with remote_progress("train", total, "steps") as progress:
        config = worker_config(o, start, run_path, steps_per_epoch, total, files, storage, progress)
        result = fit(train_loop, config, datasets, scaling, o, runs, storage, stage="train")
    m = result.metrics
    summary = {"steps": m["step"], "epochs": round(m["step"] / steps_per_epoch, 3), "first_loss": m["first_loss"],
               "final_loss": m["loss"], "val_loss": m.get("val_loss"), "tokens_per_second": m["run_tokens_per_second"],
               "checkpoint": checkpoint_url(result.checkpoint, run_path), "output": o.output, "workers": o.workers, "threads": m.get("threads"),
               "rows": rows, "steps_per_epoch": steps_per_epoch, "run": run_path,
               "data_path": "memory" if in_memory else "stream"}
    summary["loss_curve"] = plots.write_loss_curve(run_path, f"train {o.name}",
                                                   {"train loss": "loss", "validation loss": "val_loss"}, storage)
    export_model(result.checkpoint, o.output, {"options": to_dict(o), "summary": summary}, storage)
    return summary


def worker_config(o: Options, start: Start, run_path: str, steps_per_epoch: int, total: int, files: list[str],
                  storage: Storage | None = None, progress=None) -> WorkerConfig:
    """Everything a worker needs (`files`: the training shards, which a worker keeping its split in memory
    reads itself; `progress`: the driver's progress board)."""
    train = TrainConfig(lr=o.lr, weight_decay=o.weight_decay, warmup_steps=o.warmup_steps, total_steps=total,
                        min_lr_ratio=o.min_lr_ratio, grad_clip=o.grad_clip, pkeep=o.pkeep, grad_accum=o.grad_accum,
                        compile=o.compile)
    in_memory = keeps_in_memory(o, start, steps_per_epoch)
    return WorkerConfig(source=start.source, model=start.config, train=train, run_path=run_path,
                        steps_per_epoch=steps_per_epoch, total_steps=total, seed=o.seed, micro_batch=o.micro_batch,
                        shuffle_buffer=o.shuffle_buffer, log_every=max(1, o.log_every),
                        checkpoint_every=max(1, o.checkpoint_every), in_memory=in_memory,
                        storage=as_storage(storage), progress=progress, has_gpt=start.has_gpt,
                        null_caption_prob=o.null_caption_prob, record_rows=o.record_rows, has_val=bool(o.val_data),
                        train_files=tuple(files) if in_memory else ())


def keeps_in_memory(o: Options, start: Start, steps_per_epoch: int) -> bool:
    """True when one worker's split (int32 text and image ids) fits in --in-memory-mb."""
    rows = steps_per_epoch * o.micro_batch * o.grad_accum + o.micro_batch  # a worker's split, give or take a batch
    per_row = 4 * (start.config.gpt.text_len + start.config.gpt.img_len)
    return rows * per_row <= o.in_memory_mb * 2**20
