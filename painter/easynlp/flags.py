"""`painter easynlp`: EasyNLP's text2image command lines, unchanged but for the program name.

`easynlp --mode=train|evaluate|predict ... --user_defined_parameters='k=v ...'` becomes
`painter easynlp` with the same flags, each mapped onto painter's own jobs (`painter.easynlp.modes`):
  * train: `tokenize` of each of `--tables` (train, then valid) -> `train` from the model named by
    `pretrain_model_name_or_path` (or `--resume_from_checkpoint`); `--checkpoint_dir` ends up a
    painter model directory that `pipeline()` and `--model` read;
  * evaluate: `tokenize` of `--tables` -> the mean validation loss of `--checkpoint_dir`'s GPT;
  * predict: the `generate` job on `--tables` -> `--outputs` in EasyNLP's own predict TSV format
    (`painter.io.easynlp_tsv`), pixels truncated to 8 bits and images resized as EasyNLP does.
This module checks the flags (declared in `painter.options.easynlp`, which `--help` reads without loading
a job) and owns `--user_defined_parameters`: parsing, and refusing (one line naming the flag or key and
what to do instead) what painter does not support; nothing is silently ignored.
Model shapes come from the model directory; a shape key that contradicts it is refused.
"""
from __future__ import annotations

from painter.errors import InputError
from painter.io import tables

# the flags (EasyNLP's names, defaults and help) and the ones refused, declared where `--help` reads them
from painter.options.easynlp import (APP_NAME, INT_KEYS, KEYS, MODES, UNSUPPORTED_FLAGS, EasyNLPFlags,  # noqa: F401
                                     Options)

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


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
