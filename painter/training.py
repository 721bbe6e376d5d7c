"""The GPT's optimisation, as plain torch: optimizer groups, lr schedule, pkeep corruption, one step.

Owns `TrainConfig` (the optimisation hyper-parameters), `make_optimizer` (AdamW with minGPT's
weight-decay groups), `lr_at` (linear warm-up then cosine decay, a pure function of the step),
`corrupt_tokens` (the reference's pkeep: input image tokens replaced by random codes, targets kept
clean), `GPTLoss` (the GPT's loss as a module's forward, so DDP's gradient hooks see it) and
`train_step` (gradient accumulation, clipping, grad norm, bf16 autocast on CUDA / fp32 on CPU).
No Ray and no I/O: the train stage (`painter.stages.train`) drives these on every worker.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from painter.models.gpt import GPT
from painter.runtime import autocast
from painter.sampling import row_keys, uniform_noise


@dataclass
class TrainConfig:
    lr: float = 3e-4  # peak learning rate, reached at the end of warm-up
    weight_decay: float = 0.01  # on Linear weights only (minGPT's groups)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0  # optimizer steps of linear warm-up
    total_steps: int = 1000  # cosine decay ends here, at min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping (the norm is still measured)
    pkeep: float = 1.0  # probability that an input image token is kept (1: no corruption)
    grad_accum: int = 1  # micro-batches per optimizer step

    def __post_init__(self):
        if not 0.0 <= self.pkeep <= 1.0:
            raise ValueError(f"pkeep {self.pkeep} is not in [0, 1]")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum {self.grad_accum} must be >= 1")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """minGPT's groups: decay Linear weights; no decay for biases, LayerNorm, embeddings, pos_emb."""
    decay, no_decay = set(), set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if name == "weight" and isinstance(module, nn.Linear):
                decay.add(full)
            else:  # biases, LayerNorm/Embedding weights, pos_emb
                no_decay.add(full)
    params = dict(model.named_parameters())
    return [{"params": [params[n] for n in sorted(decay)], "weight_decay": weight_decay},
            {"params": [params[n] for n in sorted(no_decay)], "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`; its lr is set by `train_step` from `lr_at` every step."""
    return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)


def lr_at(step: int, config: TrainConfig) -> float:
    """The lr of optimizer step `step` (0-based): linear warm-up to lr, then cosine to min_lr_ratio * lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def corrupt_tokens(codes: torch.Tensor, pkeep: float, vocab_size: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """codes (B, Ti): each replaced, with probability 1 - pkeep, by a random code in [0, vocab_size)."""
    if pkeep >= 1.0:
        return codes
    keep = torch.rand(codes.shape, generator=generator, device=codes.device) < pkeep  # (B, Ti)
    random = torch.randint(0, vocab_size, codes.shape, generator=generator, device=codes.device)  # (B, Ti)
    return torch.where(keep, codes, random.to(codes.dtype))


def drop_captions(text_ids: torch.Tensor, prob: float, pad_id: int, seed: int, step: int,
                  first_row: int) -> torch.Tensor:
    """text_ids (B, Tt) with each row replaced, with probability `prob`, by the null caption (all `pad_id`).

    Row i's draw is a pure function of (seed, step, first_row + i): the same on every rank, worker
    count and resume, never a global RNG state. The classifier-free guidance of generation needs it.
    """
    if prob <= 0.0:
        return text_ids
    rows = range(first_row, first_row + text_ids.size(0))
    keys = row_keys(seed, [f"null-caption/{step}"] * text_ids.size(0), list(rows), device=text_ids.device)  # (B,)
    dropped = uniform_noise(keys, 0, 1)[:, 0] < prob  # (B,)
    return text_ids.masked_fill(dropped[:, None], pad_id)


class GPTLoss(nn.Module):
    """The GPT's image-token loss as `forward`, so a DistributedDataParallel wrapper syncs its gradients."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, text_ids: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """text_ids (B, Tt), inputs and targets (B, Ti) image codes -> scalar mean cross-entropy."""
        return self.gpt.loss(text_ids, inputs, targets)


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar, detached: mean loss over the step's micro-batches (weighted by rows)
    grad_norm: torch.Tensor  # scalar: global grad norm before clipping
    lr: float
    rows: int  # rows in this step (on this worker)


def _no_sync(model: nn.Module, last: bool):
    """DDP's no_sync for every micro-batch but the last (gradients all-reduce once per step)."""
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list,
               config: TrainConfig, step: int, img_vocab_size: int,
               generator: torch.Generator | None = None) -> StepResult:
    """One optimizer step over `micro_batches`, a list of (text_ids (b, Tt), image_tokens (b, Ti)).

    `model` is a `GPTLoss` (optionally DDP-wrapped) on the batches' device. Each micro-batch's loss is
    weighted by its share of the step's rows, so accumulating k micro-batches equals one batch of all.
    """
    device = micro_batches[0][0].device
    lr = lr_at(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    rows = sum(int(text.size(0)) for text, _ in micro_batches)
    total = torch.zeros((), device=device)
    for i, (text_ids, image_tokens) in enumerate(micro_batches):
        inputs = corrupt_tokens(image_tokens, config.pkeep, img_vocab_size, generator)  # (b, Ti)
        with _no_sync(model, last=i == len(micro_batches) - 1):
            with autocast(device):
                loss = model(text_ids, inputs, image_tokens)
            weighted = loss.float() * (text_ids.size(0) / rows)
            weighted.backward()
        total += weighted.detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    return StepResult(loss=total, grad_norm=grad_norm.detach(), lr=lr, rows=rows)
