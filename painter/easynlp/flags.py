"""`painter easynlp`: EasyNLP's text2image command lines, unchanged but for the program name.

`easynlp --mode=train|evaluate|predict ... --user_defined_parameters='k=v ...'` becomes
`painter easynlp` with the same flags, each mapped onto painter's own jobs (`painter.easynlp.modes`):
  * train: `tokenize` of each of `--tables` (train, then valid) -> `train` from the model named by
    `pretrain_model_name_or_path` (or `--resume_from_checkpoint`); `--checkpoint_dir` ends up a
    painter model directory that `pipeline()` and `--model` read;
  * evaluate: `tokenize` of `--tables` -> the mean validation loss of `--checkpoint_dir`'s GPT;
  * predict: the `generate` job on `--tables` -> `--outputs` in EasyNLP's own predict TSV format
    (`painter.io.easynlp_tsv`), pixels truncated to 8 bits and images resized as EasyNLP does.
This module owns the flags and `--user_defined_parameters`: parsing, and refusing (one line naming
the flag or key and what to do instead) what painter does not support; nothing is silently ignored.
Model shapes come from the model directory; a shape key that contradicts it is refused.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from painter.errors import InputError
from painter.io import tables
from painter.options import option

APP_NAME = "text2image_generation"
MODES = ("train", "evaluate", "predict")
INT_KEYS = ("size", "text_len", "img_len", "img_vocab_size", "text_vocab_size", "max_generated_num",
            "n_layer", "n_head", "n_embd")
KEYS = ("pretrain_model_name_or_path", "vqgan_ckpt_path", "random_crop", *INT_KEYS)
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")

# EasyNLP flags painter does not take, and what to do instead.
UNSUPPORTED_FLAGS = {
    "skip_first_line": "remove the header line from the table (painter's TSV input has none)",
    "buckets": "use s3:// paths in --tables, --checkpoint_dir and --outputs (OSS buckets are not read)",
    "odps_config": "export the ODPS table to TSV or Parquet files first",
    "user_script": "painter runs only the text2image app", "user_entry_file": "painter runs only the text2image app",
    "distributed_backend": "painter picks NCCL on GPUs and gloo on CPUs itself",
    "local_rank": "painter starts its workers through Ray; drop the flag",
    "modelzoo_base_dir": "set PAINTER_HOME to the folder holding the imported zoo models",
    "do_lower_case": "put do_lower_case in the model's tokenizer_config.json (read beside vocab.txt)",
    "save_all_checkpoints": "painter keeps the last two checkpoints of a run (see `painter train`)",
    "optimizer_type": "painter trains with AdamW only; drop the flag",
    "label_name": "text2image has no label column", "label_enumerate_values": "text2image has no label column",
    "predict_slice_size": "use `painter generate --batch-size`", "predict_queue_size": "drop the flag",
    "predict_thread_num": "use `painter generate --actors`", "predict_table_read_thread_num": "drop the flag",
    "worker_count": "submit to a Ray cluster (RAY_ADDRESS) instead; --worker_gpu sets the workers",
    "master_port": "Ray connects the workers; drop the flag", "worker_hosts": "Ray places the workers; drop the flag",
    "use_torchacc": "drop the flag", "data_threads": "Ray sizes the readers; drop the flag",
    "mg_model": "Megatron checkpoints are not read; import with `painter import-easynlp`",
}


def _flag(default, help: str, name: str, **kwargs):
    return option(default, help, flag=f"--{name}", **kwargs)


@dataclass(kw_only=True)
class EasyNLPFlags:
    """The text2image flags of EasyNLP's `easynlp` command, spelled and defaulted as there."""
    mode: str = _flag("train", "train, evaluate or predict", "mode", choices=MODES)
    app_name: str = _flag(APP_NAME, "must be text2image_generation", "app_name")
    tables: str | None = _flag(None, "input TSV/Parquet files separated by commas: train,valid (train); valid "
                               "(evaluate); the prompts (predict)", "tables")
    input_schema: str | None = _flag(None, "TSV columns, e.g. idx:str:1,text:str:1,imgbase64:str:1", "input_schema")
    first_sequence: str = _flag("text", "the text column", "first_sequence")
    second_sequence: str = _flag("imgbase64", "the base64 image column (train, evaluate)", "second_sequence")
    outputs: str | None = _flag(None, "predict: the output TSV", "outputs")
    output_schema: str = _flag("idx,text,gen_imgbase64", "predict: output columns, in order", "output_schema")
    append_cols: str | None = _flag(None, "predict: input columns appended to each output line", "append_cols")
    checkpoint_dir: str | None = _flag(None, "train: the model directory written; evaluate/predict: the model read",
                                       "checkpoint_dir")
    resume_from_checkpoint: str | None = _flag(None, "train: start from this model directory instead of "
                                               "pretrain_model_name_or_path", "resume_from_checkpoint")
    learning_rate: float = _flag(5e-5, "peak learning rate", "learning_rate")
    epoch_num: int = _flag(3, "training epochs", "epoch_num")
    random_seed: int = _flag(1234, "seed of training and of sampling", "random_seed")
    logging_steps: int = _flag(100, "optimizer steps between logged metrics", "logging_steps")
    save_checkpoint_steps: int | None = _flag(None, "optimizer steps between checkpoints (default: once an epoch)",
                                              "save_checkpoint_steps")
    sequence_length: int | None = _flag(None, "text_len + img_len; checked against the model", "sequence_length")
    micro_batch_size: int = _flag(2, "rows per batch per worker (train, evaluate); rows per model call (predict)",
                                  "micro_batch_size")
    gradient_accumulation_steps: int = _flag(1, "micro-batches per optimizer step", "gradient_accumulation_steps")
    weight_decay: float = _flag(1e-4, "AdamW weight decay", "weight_decay")
    max_grad_norm: float = _flag(1.0, "clip the global gradient norm to this", "max_grad_norm")
    warmup_proportion: float = _flag(0.1, "share of the optimizer steps spent warming the learning rate up",
                                     "warmup_proportion")
    worker_gpu: int = _flag(-1, "training workers (DDP ranks), one GPU each where the cluster has GPUs; "
                            "-1 or 0: one", "worker_gpu")
    use_amp: bool = _flag(False, "accepted: painter always computes in bf16 autocast on GPUs and fp32 on CPUs",
                          "use_amp")
    user_defined_parameters: str | None = _flag(None, "key=value pairs separated by spaces: " + ", ".join(KEYS),
                                                "user_defined_parameters")
    mlflow_uri: str | None = option(None, "painter's own (train): record the training run in MLflow, a tracking "
                                          "server URI or a local folder")


Options = dataclasses.make_dataclass(
    "Options", [(name, "str | None", _flag(None, f"not supported by painter: {advice}", name))
                for name, advice in UNSUPPORTED_FLAGS.items()],
    bases=(EasyNLPFlags,), kw_only=True)
Options.__module__ = __name__
Options.__doc__ = "EasyNLP's flags: those painter maps onto its jobs, and those it refuses with advice."


def parse_bool(key: str, text: str) -> bool:
    """`True`/`False` (any case), 1/0, yes/no. EasyNLP's `bool("False")` is True; here it is False."""
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise InputError(f"--user_defined_parameters {key}={text!r}: expected True or False")


def parse_user_defined_parameters(text: str | None) -> dict:
    """`'k=v k2=v2'` -> {k: value}: ints for the shape keys, a bool for random_crop; unknown keys refused."""
    values: dict = {}
    for item in (text or "").split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--user_defined_parameters {item!r}: expected key=value")
        if key not in KEYS:
            raise InputError(f"--user_defined_parameters {key!r} is not a text2image key painter knows "
                             f"(keys: {', '.join(KEYS)})")
        if key in INT_KEYS:
            try:
                values[key] = int(value)
            except ValueError:
                raise InputError(f"--user_defined_parameters {key}={value!r}: expected an integer") from None
        elif key == "random_crop":
            values[key] = parse_bool(key, value)
        else:
            values[key] = value
    return values


def check_flags(o) -> dict:
    """Refuse unsupported flags and keys (one line each, with what to do instead); the parsed parameters."""
    for name, advice in UNSUPPORTED_FLAGS.items():
        if getattr(o, name) is not None:
            raise InputError(f"--{name} is not supported by painter easynlp: {advice}")
    if o.app_name != APP_NAME:
        raise InputError(f"--app_name {o.app_name!r}: painter runs only {APP_NAME}")
    params = parse_user_defined_parameters(o.user_defined_parameters)
    if params.get("random_crop"):
        raise InputError("--user_defined_parameters random_crop=True: painter encodes each image once, before "
                         "training, so there is no per-epoch random crop; use random_crop=False (center crop)")
    if "vqgan_ckpt_path" in params:
        raise InputError("--user_defined_parameters vqgan_ckpt_path: to train from scratch on a taming VQGAN, "
                         "run `painter import-vqgan CKPT DIR`, then `painter train --preset NAME --vqgan DIR`")
    if not o.tables:
        raise InputError(f"--mode {o.mode} needs --tables")
    if o.micro_batch_size < 1 or o.gradient_accumulation_steps < 1:
        raise InputError("--micro_batch_size and --gradient_accumulation_steps must be at least 1")
    if "text_len" in params and "img_len" in params and o.sequence_length is not None \
            and o.sequence_length != params["text_len"] + params["img_len"]:
        raise InputError(f"--sequence_length {o.sequence_length} != text_len {params['text_len']} + "
                         f"img_len {params['img_len']}")
    return params


def check_model_shape(model, params: dict, sequence_length: int | None) -> None:
    """Refuse shape keys that contradict the model: painter takes every shape from the model directory."""
    gpt = model.config.gpt
    actual = {"size": model.config.image_size, "text_len": gpt.text_len, "img_len": gpt.img_len,
              "img_vocab_size": gpt.img_vocab_size, "text_vocab_size": gpt.text_vocab_size,
              "n_layer": gpt.n_layer, "n_head": gpt.n_head, "n_embd": gpt.n_embd}
    for key, value in actual.items():
        if key in params and params[key] != value:
            raise InputError(f"--user_defined_parameters {key}={params[key]}, but {model.path} has {key} {value}: "
                             "painter takes shapes from the model; drop the key or use a model of that shape")
    if sequence_length is not None and sequence_length != gpt.block_size:
        raise InputError(f"--sequence_length {sequence_length}, but {model.path} reads text_len + img_len = "
                         f"{gpt.block_size} tokens")


def painter_schema(o, needs_image: bool) -> str:
    """`--input_schema` with `--first_sequence` renamed to text (and `--second_sequence` to imgbase64)."""
    if not o.input_schema:
        raise InputError("--input_schema is needed, e.g. idx:str:1,text:str:1" + (",imgbase64:str:1" if needs_image else ""))
    columns = tables.parse_schema(o.input_schema)
    names = [c.name for c in columns]
    renames = {o.first_sequence: "text"} | ({o.second_sequence: "imgbase64"} if needs_image else {})
    for source, target in renames.items():
        if source not in names:
            raise InputError(f"--input_schema {o.input_schema!r} has no column {source!r} "
                             f"(named by --{'first' if target == 'text' else 'second'}_sequence)")
        if target in names and target != source:
            raise InputError(f"--input_schema {o.input_schema!r}: column {target!r} is not --"
                             f"{'first' if target == 'text' else 'second'}_sequence; rename it")
    if "idx" not in names:
        raise InputError(f"--input_schema {o.input_schema!r} has no idx column (EasyNLP's text2image needs one)")
    return ",".join(":".join([renames.get(c.name, c.name), c.type, str(c.count)]) for c in columns)


def split_tables(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]
