"""`painter demo`'s options (the command: `painter.stages.demo`)."""
from __future__ import annotations

from dataclasses import dataclass

from painter.options import option


@dataclass(kw_only=True)
class Options:
    RENAMED = {"batch_size": "micro_batch"}  # its name until issue #31; records written then still read (upgrade)

    output: str = option("out/demo", "folder for every step's output (corpus, tokens, model, images, scores)")
    rows: int = option(6000, "images in the synthetic training corpus")
    size: int = option(32, "image size of the corpus (the model's VQGAN size)")
    hold_out: int = option(60, "whole captions kept out of the corpus; evaluation draws from them")
    base_model: str | None = option(None, "model directory whose VQGAN and vocab to use (default: the bundled model)")
    train_vq_steps: int = option(0, "train a fresh VQGAN for this many steps first (0: reuse the base model's)")
    preset: str = option("demo", "shape of the GPT trained from scratch")
    steps: int = option(1400, "GPT optimizer steps (measured on 2 cores at batch 32: 1250 steps scored colour+shape "
                               "0.62, 1500 scored 0.69 but took 5 minutes; see docs/demo.md)")
    micro_batch: int = option(32, "rows per model call on the device in the GPT's training, per worker (32 learns "
                                  "more in the demo's minutes than 64: twice the steps at the same cost)")
    lr: float = option(3e-3, "GPT peak learning rate (at batch 32: 2e-3 and 5e-3 both scored lower)")
    dropout: float = option(0.0, "GPT dropout while training (helps long runs on a small corpus generalise)")
    fine_tune: bool = option(False, "fine-tune the base model's GPT (train --init) instead of training a fresh one; "
                                    "its dropout stays as its config says")
    null_caption_prob: float = option(0.0, "caption dropout of the GPT training (the train job's null caption "
                                           "probability): makes the model guidable")
    workers: int = option(1, "Ray Train workers (DDP ranks) for the GPT and the VQGAN; each gets an equal "
                             "share of this machine's cores as torch threads")
    captions: int = option(200, "held-out captions generated and judged by the evaluation")
    top_k: int = option(1, "top-k of generation and evaluation (1 is greedy, which draws the cleanest shapes)")
    guidance: float | None = option(None, "classifier-free guidance of generation and evaluation (default: the "
                                          "trained model's, as in painter generate)")
    candidates: int = option(1, "images drawn per caption in generation and evaluation; the best-scored is kept")
    seed: int = option(0, "seed of the corpus, the initialisation and the sampling")
