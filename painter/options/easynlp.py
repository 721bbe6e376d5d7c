"""`painter easynlp`'s options: EasyNLP's text2image flags, spelled and defaulted as EasyNLP spells them (they
mirror that tool's command line), and the flags painter refuses with the advice it gives. Parsing and
checking them is `painter.easynlp.flags`'s; running them, `painter.easynlp.modes`'.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from painter.options import option

APP_NAME = "text2image_generation"
MODES = ("train", "evaluate", "predict")
INT_KEYS = ("size", "text_len", "img_len", "img_vocab_size", "text_vocab_size", "max_generated_num",
            "n_layer", "n_head", "n_embd")
KEYS = ("pretrain_model_name_or_path", "vqgan_ckpt_path", "random_crop", *INT_KEYS)

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
    micro_batch_size: int = _flag(2, "rows per model call on the device, per worker: painter's --micro-batch",
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
