"""`painter train-vq`'s options (the job: `painter.stages.train_vq`)."""
from __future__ import annotations

from dataclasses import dataclass

from painter.io.formats import COLUMNS_HELP, DEFAULT_MAX_PIXELS
from painter.options import max_error_rate_option, option
from painter.options.tokenize import DEFAULT_SCHEMA
from painter.options.training import RunOptions

SCRATCH_LR, FINE_TUNE_LR = 2e-3, 1e-4


@dataclass(kw_only=True)
class Options(RunOptions):
    RENAMED = {"batch_size": "micro_batch"}  # its name until issue #31; records written then still read (upgrade)

    input: list[str] = option(help="TSV/Parquet image corpus: files, globs, directories or s3:// prefixes")
    model: str = option(help="model directory (or zoo name) whose VQGAN to train; its weights are the start "
                             "unless --from-scratch")
    output: str = option(help="model directory to write: the input's config, vocab and GPT with the trained VQGAN")
    input_schema: str = option(DEFAULT_SCHEMA, "TSV columns, EasyNLP style; must name imgbase64 (text is not needed)")
    columns: str | None = option(None, COLUMNS_HELP)
    from_scratch: bool = option(False, "start from a seeded random VQGAN of the model's config, not its weights")
    name: str = option("train-vq", "run name under --run-dir; an existing one needs --resume")
    epochs: int = option(1, "passes over the training images (unless --max-steps is given)")
    micro_batch: int = option(32, "images per model call on the device: each worker's batch of an optimizer step "
                                  "and of the held-out reconstruction")
    lr: float | None = option(None, f"peak learning rate (default: {SCRATCH_LR:g} when training from scratch, "
                                    f"what suits a small VQGAN; {FINE_TUNE_LR:g} when starting from the model's weights)")
    warmup_steps: int = option(0, "optimizer steps of linear lr warm-up")
    grad_clip: float = option(1.0, "clip the VQGAN's global grad norm to this (0: no clipping)")
    restart_every: int = option(100, "optimizer steps between dead-code restarts (codes unused since the last "
                                     "restart take random encoder outputs); 0: never")
    gan_weight: float = option(0.0, "weight of the PatchGAN hinge term (0: no discriminator)")
    gan_start: int = option(0, "optimizer steps before the GAN term starts")
    eval_images: int = option(256, "good rows held out to measure reconstruction (at most a fifth of them; 0: none)")
    shuffle_buffer: int = option(256, "images in each worker's local shuffle buffer (reshuffled every epoch)")
    seed: int = option(0, "seed of the init, the shuffles and the restarts")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "reject images with more pixels (checked before decoding)")
    max_error_rate: float = max_error_rate_option()

    @property
    def grad_accum(self) -> int:  # `painter.stages.train_runner.plan_steps` sizes runs by it; no accumulation here
        return 1

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (SCRATCH_LR if self.from_scratch else FINE_TUNE_LR)

