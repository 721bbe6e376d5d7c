"""The GPT's optimisation, as plain torch: optimizer groups, lr schedule, pkeep corruption, one step.

Owns `TrainConfig` (the optimisation hyper-parameters), `make_optimizer` (AdamW with minGPT's
weight-decay groups), `lr_at` (linear warm-up then cosine decay, a pure function of the step),
`corrupt_tokens` (the reference's pkeep: input image tokens replaced by random codes, targets kept
clean), `GPTLoss` (the GPT's loss as a module's forward, so DDP's gradient hooks see it) and
`train_step` (gradient accumulation, clipping, grad norm, bf16 autocast on CUDA / fp32 on CPU).
The GPU path's choices live here too: fused AdamW and `torch.compile` per device (`use_fused_adamw`,
`use_compile`, `compile_model`), batches copied ahead to the device (`prefetch_to_device`), and the
training FLOPs per token and bf16 peaks behind the model FLOPs utilisation (`train_flops_per_token`,
`peak_bf16_tflops`, `mfu`).
No Ray and no I/O: the train stage (`painter.stages.train`) drives these on every worker.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from painter.models.gpt import GPT
from painter.runtime import autocast
from painter.inference.sampling import row_keys, uniform_noise


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
    compile: bool | None = None  # torch.compile the model; None: per device (`use_compile`)

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


def use_fused_adamw(device: torch.device) -> bool:
    """Fused AdamW (one kernel for all parameters) on CUDA; the plain for-each one on CPU, where the fused
    kernel is no faster and the for-each one is what every CPU test and checkpoint was made with."""
    return torch.device(device).type == "cuda"


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups` (fused where the parameters are on CUDA); `train_step` sets its lr."""
    device = next(model.parameters()).device
    return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
                             fused=use_fused_adamw(device) or None)


def use_compile(device: torch.device, requested: bool | None = None) -> bool:
    """Whether to `torch.compile` the training model: as requested, else on CUDA only. On a CPU the
    compile takes longer than the small models it would speed up train, and needs a C++ compiler."""
    return torch.device(device).type == "cuda" if requested is None else requested


def compile_model(model: nn.Module, enabled: bool) -> nn.Module:
    """`torch.compile(model)` (fixed shapes: every training micro-batch has the same size) or the model.

    The compiled wrapper shares the model's parameters, so optimizer, checkpoints and DDP's `no_sync`
    (reached through the wrapper) work as before; compilation happens at the first step."""
    return torch.compile(model, dynamic=False) if enabled else model


def lr_at(step: int, config: TrainConfig) -> float:
    """The lr of optimizer step `step` (0-based): linear warm-up to lr, then cosine to min_lr_ratio * lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def prefetch_to_device(batches: Iterable[tuple], device: torch.device, depth: int = 2) -> Iterator[tuple]:
    """The same tuples, in order, their tensors on `device` (other items, e.g. row ids, pass as they are).

    On CUDA each tensor is pinned and copied `depth` batches ahead on a side stream (non_blocking), so the
    copies overlap the steps instead of stalling them. Elsewhere (CPU) the tensors are moved with
    `.to(device)` as the batches come, nothing read ahead (a no-op for CPU tensors).
    """
    device = torch.device(device)
    if device.type != "cuda":
        for batch in batches:
            yield _map_tensors(batch, lambda t: t.to(device))
        return
    stream = torch.cuda.Stream(device)
    ahead: collections.deque = collections.deque()  # (batch on the device, event after its copies)
    source = iter(batches)
    while True:
        while len(ahead) < depth and (batch := next(source, None)) is not None:
            with torch.cuda.stream(stream):
                moved = _map_tensors(batch, lambda t: t.pin_memory().to(device, non_blocking=True))
                copied = torch.cuda.Event()
                copied.record(stream)
            ahead.append((moved, copied))
        if not ahead:
            return
        batch, copied = ahead.popleft()
        current = torch.cuda.current_stream(device)
        current.wait_event(copied)  # the step's kernels start after this batch's copies, not the later ones
        for item in batch:
            if isinstance(item, torch.Tensor):
                item.record_stream(current)  # in use on the compute stream from here on (for the allocator)
        yield batch


def _map_tensors(batch: tuple, fn) -> tuple:
    return tuple(fn(item) if isinstance(item, torch.Tensor) else item for item in batch)


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


# Dense bf16 peaks (TFLOP/s, no sparsity) by a substring of `torch.cuda.get_device_name`; the first
# match wins, so the more specific names come first.
# Dense bf16 peaks by model: (model, variant) -> TFLOP/s; variant None is the model's default part (the
# SXM module). Matched on whole words of the name CUDA reports, never substrings: "NVIDIA L40" is not an
# L4, "NVIDIA H100 NVL" is not an SXM H100 (`known_peak_tflops`).
PEAK_BF16_TFLOPS = {("H100", None): 989.0, ("H100", "PCIe"): 756.0, ("H100", "NVL"): 835.0,
                    ("H200", None): 989.0, ("H200", "NVL"): 835.0, ("GH200", None): 989.0,
                    ("B200", None): 2250.0, ("A100", None): 312.0, ("L40S", None): 362.0,
                    ("L40", None): 181.0, ("L4", None): 121.0, ("A10G", None): 70.0, ("A10", None): 125.0}


def known_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak for a CUDA device name ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB",
    "NVIDIA H100 NVL"), matching the model and variant as whole words; None for a model not in the table."""
    words = {w.lower() for w in re.split(r"[\s\-_/]+", device_name) if w}
    for (model, variant), peak in PEAK_BF16_TFLOPS.items():
        if variant is not None and model.lower() in words and variant.lower() in words:
            return peak
    return next((peak for (model, variant), peak in PEAK_BF16_TFLOPS.items()
                 if variant is None and model.lower() in words), None)


def peak_bf16_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known GPU; None on CPU, and on an unknown GPU, which is said in the log
    (pass the peak by hand, e.g. the benchmarks' --peak-tflops, for an MFU figure)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = known_peak_tflops(name)
    if peak is None:
        logging.getLogger("painter.train").warning(f"unknown GPU {name!r}: no bf16 peak, so no MFU figure")
    return peak


def train_flops_per_token(gpt: GPT) -> int:
    """Training FLOPs per token: forward + backward = 3 x `GPT.flops_per_token` (the 6N rule + attention)."""
    return 3 * gpt.flops_per_token()


def mfu(flops_per_token: float, tokens_per_second: float, peak_tflops: float | None, devices: int = 1
        ) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' bf16 peak (None without a peak)."""
    if not peak_tflops:
        return None
    return flops_per_token * tokens_per_second / (peak_tflops * 1e12 * devices)
