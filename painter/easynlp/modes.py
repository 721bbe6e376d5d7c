"""The three modes of `painter easynlp` (flags in `painter.easynlp`), each run through painter's own jobs.

Under `painter easynlp`, what EasyNLP does differently from painter's defaults is done EasyNLP's way:
training images are resized as its dataset does (tokenize `--resize easynlp`), generated pixels are
truncated to 8 bits as its predictor does (`pixel_rounding="truncate"`), generation runs in fp32 as
its predictor does (`precision="fp32"`; painter's GPU default is bf16), and the predict TSV's text
column is the prompt read back through the tokenizer, as its predictor writes it.
"""
from __future__ import annotations

import math
import os
import posixpath
import tempfile
import dataclasses
import time
from datetime import date, datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from painter import logs
from painter.checkpoint.model_dir import load_model, resolve_model_dir
from painter.options.easynlp import Options  # noqa: F401 (the command's options; callers read them here too)
from painter.easynlp.flags import check_flags, check_model_shape, painter_schema, split_tables
from painter.errors import ErrorRateExceeded, InputError
from painter.io import tables
from painter.io.easynlp_tsv import check_columns, write_easynlp_tsv
from painter.io.output import OutputRoot
from painter.io.storage import absolute
from painter.stages import generate as generate_job
from painter.stages import tokenize as tokenize_job
from painter.stages import train as train_job

log = logs.get("easynlp")

RESIZE = "easynlp"  # tokenize as EasyNLP's dataset does
PIXEL_ROUNDING = "truncate"  # 8 bits as EasyNLP's predictor does
PRECISION = "fp32"  # EasyNLP generates in fp32; painter's GPU default is bf16
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _tokenize(o, model: str, table: str, output: str) -> dict:
    """One table -> token shards under `output` (its rejected rows under `output/_rejected`)."""
    log.info(f"tokenize {table} -> {output}")
    return tokenize_job.run(tokenize_job.Options(
        input=[table], model=model, output=output, input_schema=painter_schema(o, needs_image=True),
        resize=RESIZE, overwrite=True))


def _start_model(o, params: dict) -> str:
    start = o.resume_from_checkpoint or params.get("pretrain_model_name_or_path")
    if not start:
        raise InputError("--mode train needs a model to fine-tune: pretrain_model_name_or_path in "
                         "--user_defined_parameters, or --resume_from_checkpoint")
    return absolute(resolve_model_dir(start))  # here, on the driver: Ray workers may not share its PAINTER_HOME


def train(o, params: dict) -> dict:
    """tokenize train (and valid) tables, then fine-tune into --checkpoint_dir."""
    if not o.checkpoint_dir:
        raise InputError("--mode train needs --checkpoint_dir (the model directory to write)")
    names = split_tables(o.tables)
    if len(names) > 2:
        raise InputError(f"--tables {o.tables!r}: train takes a training table and at most one validation table")
    start = _start_model(o, params)
    model = load_model(start, parts=())
    check_model_shape(model, params, o.sequence_length)
    run_name = f"easynlp-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    data_root = posixpath.join(o.checkpoint_dir.rstrip("/"), "_easynlp", run_name)
    shards = [posixpath.join(data_root, kind) for kind in ("train", "valid")[:len(names)]]
    tokenized = [_tokenize(o, start, table, out) for table, out in zip(names, shards)]
    workers = max(1, o.worker_gpu)
    per_step = o.micro_batch_size * o.gradient_accumulation_steps * workers
    total = (tokenized[0]["rows_out"] // per_step) * o.epoch_num
    options = train_job.Options(
        data=[shards[0]], val_data=shards[1:], init=start, output=o.checkpoint_dir, name=run_name,
        epochs=o.epoch_num, micro_batch=o.micro_batch_size, grad_accum=o.gradient_accumulation_steps,
        lr=o.learning_rate, weight_decay=o.weight_decay, warmup_steps=math.ceil(o.warmup_proportion * total),
        grad_clip=o.max_grad_norm, seed=o.random_seed, workers=workers, log_every=o.logging_steps,
        checkpoint_every=o.save_checkpoint_steps or max(1, total), mlflow_uri=o.mlflow_uri)
    log.info(f"train {start} -> {o.checkpoint_dir} ({total} steps)")
    summary = train_job.run(options)
    return {"mode": "train", "checkpoint_dir": o.checkpoint_dir, "model": start, "tokenize": tokenized[0],
            "tokenize_valid": tokenized[1] if len(tokenized) > 1 else None, "train": summary,
            "rows_rejected": sum(t["rows_rejected"] for t in tokenized)}


def shard_loss(gpt, files: list[str], batch_size: int) -> tuple[float, int]:
    """Mean image-token loss of `gpt` (fp32, on CPU or its device) over token-shard files, and the rows."""
    device = next(gpt.parameters()).device
    total, rows = 0.0, 0
    gpt.eval()
    with torch.no_grad():
        for file in files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size, columns=["text_ids", "image_tokens"]):
                text = np.stack(batch.column("text_ids").to_numpy(zero_copy_only=False))
                image = np.stack(batch.column("image_tokens").to_numpy(zero_copy_only=False))
                loss = gpt.loss(torch.from_numpy(text.astype(np.int64)).to(device),
                                torch.from_numpy(image.astype(np.int64)).to(device))
                total += float(loss) * len(text)
                rows += len(text)
    return (total / rows if rows else float("nan")), rows


def evaluate(o, params: dict) -> dict:
    """The validation loss of --checkpoint_dir's GPT on --tables (tokenized as for training)."""
    if not o.checkpoint_dir:
        raise InputError("--mode evaluate needs --checkpoint_dir (the model to evaluate)")
    model = load_model(o.checkpoint_dir, parts=("gpt",))
    check_model_shape(model, params, o.sequence_length)
    with tempfile.TemporaryDirectory(prefix="painter-easynlp-eval-") as tmp:
        summaries = [_tokenize(o, o.checkpoint_dir, table, os.path.join(tmp, f"t{i}"))
                     for i, table in enumerate(split_tables(o.tables))]
        files = sorted(os.path.join(root, f) for i in range(len(summaries))
                       for root, dirs, names in os.walk(os.path.join(tmp, f"t{i}"))
                       if "_rejected" not in root for f in names if f.endswith(".parquet"))
        loss, rows = shard_loss(model.gpt, files, o.micro_batch_size)
    return {"mode": "evaluate", "model": o.checkpoint_dir, "val_loss": loss, "rows": rows,
            "rows_in": sum(s["rows_in"] for s in summaries), "rows_rejected": sum(s["rows_rejected"] for s in summaries)}


def read_generated(output: str, run_date: str) -> pa.Table:
    """Every image the generate job committed under `output` for `run_date` (its Delta table's night)."""
    return OutputRoot(output, run_date).read()


def easynlp_text(tokenizer, text: str) -> str:
    """The prompt as EasyNLP's predictor writes it back: tokenized, truncated to text_len, special tokens
    dropped, pieces joined (`"".join(tokenizer.decode(ids, skip_special_tokens=True).split(" "))`)."""
    vocab = tokenizer.vocab
    tokens = [vocab[i] for i in tokenizer.encode(text) if vocab[i] not in SPECIAL_TOKENS]
    return "".join(" ".join(tokens).replace(" ##", "").split(" "))


def input_order(o) -> list[str]:
    """The idx of every input row, in input order (EasyNLP writes its lines in that order)."""
    schema = tables.parse_schema(painter_schema(o, needs_image=False))
    order = []
    for path in tables.expand_paths(split_tables(o.tables)):
        for chunk in tables.iter_rows(path, schema):
            order.extend(str(i) for i in chunk["idx"] if i is not None)
    return order


def _generate_options(o, params: dict, output: str, errors: str, run_date: str):
    return generate_job.Options(
        input=split_tables(o.tables), model=o.checkpoint_dir, output=output, errors=errors,
        input_schema=painter_schema(o, needs_image=False), samples=params.get("max_generated_num", 1),
        seed=o.random_seed, micro_batch=o.micro_batch_size, run_date=run_date, contact_sheet=False,
        pixel_rounding=PIXEL_ROUNDING, precision=PRECISION)


def predict(o, params: dict) -> dict:
    """The generate job on --tables, then --outputs in EasyNLP's predict format."""
    if not (o.checkpoint_dir and o.outputs):
        raise InputError("--mode predict needs --checkpoint_dir (the model) and --outputs (the TSV to write)")
    if params.get("max_generated_num", 1) < 1:
        raise InputError("--user_defined_parameters max_generated_num must be at least 1")
    model = load_model(o.checkpoint_dir, parts=())
    check_model_shape(model, params, o.sequence_length)
    errors = o.outputs.rstrip("/") + ".rejected"
    run_date = date.today().isoformat()
    with tempfile.TemporaryDirectory(prefix="painter-easynlp-predict-") as tmp:
        options = _generate_options(o, params, os.path.join(tmp, "out"), errors, run_date)
        start = time.time()
        try:
            summary, failed = generate_job.run(options), None
        except ErrorRateExceeded as e:  # written all the same: the EasyNLP TSV too, then the failure
            summary, failed = e.summary, str(e)
        generated = read_generated(options.output, run_date)
    texts = {}
    if generated.num_rows:
        check_columns(generated.column_names, o.output_schema, o.append_cols)
        rows = zip(generated.column("idx").to_pylist(), generated.column("text").to_pylist())
        texts = {idx: easynlp_text(model.tokenizer, text) for idx, text in rows}
    lines = write_easynlp_tsv(generated, o.outputs, "image", output_schema=o.output_schema,
                              append_cols=o.append_cols, order=input_order(o), output_text=texts)
    result = {"mode": "predict", "outputs": o.outputs, "lines": lines, "model": o.checkpoint_dir,
              "rows_in": summary["rows_in"], "rows_rejected": summary["rows_rejected"], "errors": summary["errors"],
              "images_out": summary["images_out"], "seconds": round(time.time() - start, 3)}
    if failed:
        raise ErrorRateExceeded(failed, result)
    return result


def run(o) -> dict:
    """Run `o.mode` (see the module docstring); the summary of the jobs it ran."""
    params = check_flags(o)
    o = dataclasses.replace(o, tables=",".join(absolute(t) for t in split_tables(o.tables)),
                            checkpoint_dir=absolute(o.checkpoint_dir), outputs=absolute(o.outputs),
                            resume_from_checkpoint=absolute(o.resume_from_checkpoint))
    return {"train": train, "evaluate": evaluate, "predict": predict}[o.mode](o, params)


