"""`painter train`'s options (the job: `painter.stages.train`)."""
from __future__ import annotations

from dataclasses import dataclass

from painter.checkpoint.config import PRESETS
from painter.options import option
from painter.options.training import RunOptions


@dataclass(kw_only=True)
class Options(RunOptions):
    RENAMED = {"batch_size": "micro_batch"}  # its name until issue #31; records written then still read (upgrade)

    data: list[str] = option(help="token shards: Parquet files, directories or globs (local or s3://)")
    val_data: list[str] = option([], "validation token shards; their loss is measured after every epoch")
    init: str | None = option(None, "model directory to fine-tune (one without GPT weights trains from scratch)")
    preset: str | None = option(None, "train a fresh GPT of this shape instead of --init (needs --vqgan)",
                                choices=tuple(PRESETS))
    vqgan: str | None = option(None, "with --preset: model directory giving the VQGAN, vocab and lengths")
    dropout: float = option(0.0, "with --preset: dropout of the fresh GPT's embeddings and residual paths while it "
                                 "trains (kept in its config; generation never drops). Attention dropout stays 0: "
                                 "it takes attention off its fused kernel, ~1.5x slower steps on CPU")
    output: str = option(help="model directory to write the trained model to")
    name: str = option("train", "run name under --run-dir; an existing one needs --resume")
    epochs: int = option(1, "passes over the training shards (unless --max-steps is given)")
    micro_batch: int = option(8, "rows per model call on the device: each worker's micro-batch (--grad-accum of them "
                                 "make an optimizer step)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-4, "peak learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay of Linear weights")
    warmup_steps: int = option(100, "optimizer steps of linear lr warm-up")
    grad_clip: float = option(1.0, "clip the global grad norm to this (0: no clipping)")
    pkeep: float = option(1.0, "probability an input image token is kept (else replaced by a random code)")
    null_caption_prob: float = option(0.0, "probability a training row's caption is dropped to the null caption (all "
                                           "[PAD]), which makes the model guidable (classifier-free guidance); 0.1 is "
                                           "usual. Stored in the model's config (an --init model's own value is "
                                           "kept when this is 0)")
    shuffle_buffer: int = option(2048, "rows in each worker's local shuffle buffer (reshuffled every epoch)")
    seed: int = option(0, "seed of the init, the shuffles and the pkeep corruption")
    record_rows: bool = option(False, "write the idx of every row each worker trains on to <run>/rows/")
    compile: bool | None = option(None, "torch.compile the GPT for its training steps (default: on a GPU only; "
                                        "a CPU spends longer compiling than it saves)")

