"""The VQGAN's optimisation (stage 1), as plain torch: loss, dead-code restarts, a PatchGAN, one step.

Owns `VQTrainConfig` (the hyper-parameters), `vq_losses` (L1 + L2 reconstruction + the quantizer's
codebook/commitment loss, optionally + a hinge GAN term), `PatchDiscriminator` (a small
pix2pix/taming-style PatchGAN) with `hinge_d_loss`, `CodeCounter` (code histograms: per logging
window and since the last restart), `restart_dead_codes` and `train_step`. No Ray and no I/O: the
train-vq stage (`painter.stages.train_vq`) drives these on every worker. The lr schedule is
`painter.training.gpt.lr_at` (linear warm-up, then cosine).

**Codebook collapse: dead-code restarts, not EMA.** The codebook keeps learning by gradient (the
quantizer's codebook term, as in taming), and every `restart_every` optimizer steps every code that no
image position chose since the previous restart (counts summed over all DDP ranks) is re-initialised
to a randomly chosen pre-quantization latent of the current batch. Only rank 0's batch is used: rank 0
picks the latents (a generator seeded by the step) and broadcasts them, so every rank writes the same
rows and the replicas stay identical. Adam's moments of the revived rows are zeroed so stale momentum
does not push them off again. Restarts were chosen over EMA updates because they keep the plain
gradient codebook of the taming checkpoints we import and fine-tune (an EMA codebook would change
what the weights mean) and they are what the prototype validated (tiny preset, lr 2e-3, restarts
every 100 steps: loss 0.3 -> 0.05 in 1500 steps).

**GAN term** (off by default: `gan_weight` 0). From step `gan_start` on, the generator loss adds
`gan_weight * -mean(D(reconstruction))` (the discriminator frozen for that pass) and the
discriminator takes a hinge-loss step of its own on real images and detached reconstructions. The
weight is fixed: taming's adaptive weight (a ratio of gradient norms at the decoder's last layer)
needs a second autograd pass that does not mix well with DDP's gradient hooks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from painter.evaluation.reconstruction import codebook_usage
from painter.models.vqgan import VQGAN
from painter.runtime import autocast
from painter.training.gpt import TrainConfig, lr_at


@dataclass
class VQTrainConfig:
    lr: float = 2e-3  # peak lr of the VQGAN (and of the discriminator unless disc_lr is set)
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 0
    total_steps: int = 1000  # the cosine decay ends here, at min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm of the VQGAN; <= 0 disables clipping
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    codebook_weight: float = 1.0  # on the quantizer's codebook + beta * commitment loss
    restart_every: int = 100  # optimizer steps between dead-code restarts; 0: never
    gan_weight: float = 0.0  # 0: no discriminator
    gan_start: int = 0  # optimizer steps before the GAN term (and the discriminator's training) starts
    disc_lr: float | None = None

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.restart_every < 0 or self.gan_weight < 0 or self.gan_start < 0:
            raise ValueError("restart_every, gan_weight and gan_start must be >= 0")

    def schedule(self, lr: float | None = None) -> TrainConfig:
        """The warm-up + cosine schedule of `painter.training.gpt.lr_at` with these settings."""
        return TrainConfig(lr=self.lr if lr is None else lr, warmup_steps=self.warmup_steps,
                           total_steps=self.total_steps, min_lr_ratio=self.min_lr_ratio)

    def gan_active(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) has the GAN term."""
        return self.gan_weight > 0 and step >= self.gan_start


# --- the discriminator ---------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """A PatchGAN (pix2pix / taming's NLayerDiscriminator): (B, 3, H, W) -> (B, 1, h, w) patch logits.

    4x4 convolutions, stride 2 `n_layers` times then stride 1, LeakyReLU(0.2); GroupNorm instead of
    BatchNorm, so small per-rank batches and DDP need no synchronised statistics.
    """

    def __init__(self, in_channels: int = 3, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch * prev, ch * mult, 4, stride, 1, bias=False),
                       nn.GroupNorm(min(32, ch * mult // 4), ch * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ch * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    @classmethod
    def for_resolution(cls, resolution: int, ch: int = 64) -> "PatchDiscriminator":
        """Depth fitted to the image size: 3 layers from 64 px up, fewer for smaller images."""
        return cls(ch=ch, n_layers=max(1, min(3, int(math.log2(resolution)) - 3)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: (mean relu(1 - D(real)) + mean relu(1 + D(fake))) / 2."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


# --- the loss ------------------------------------------------------------------------------------


@dataclass
class VQLosses:
    loss: torch.Tensor  # the total the VQGAN is optimised on
    l1: torch.Tensor  # mean |reconstruction - image| per value, in [-1, 1] space
    l2: torch.Tensor  # mean squared error per value
    codebook: torch.Tensor  # the quantizer's codebook + commitment loss
    gan: torch.Tensor | None = None  # the generator's adversarial term (before gan_weight), when on


def vq_losses(reconstruction: torch.Tensor, images: torch.Tensor, codebook_loss: torch.Tensor,
              config: VQTrainConfig, discriminator: nn.Module | None = None) -> VQLosses:
    """The VQGAN's training loss; with a `discriminator`, + gan_weight * -mean(D(reconstruction))."""
    rec, x = reconstruction.float(), images.float()
    l1 = (rec - x).abs().mean()
    l2 = (rec - x).square().mean()
    loss = config.l1_weight * l1 + config.l2_weight * l2 + config.codebook_weight * codebook_loss.float()
    gan = None
    if discriminator is not None:
        gan = -discriminator(reconstruction).float().mean()
        loss = loss + config.gan_weight * gan
    return VQLosses(loss, l1, l2, codebook_loss.float(), gan)


# --- codebook usage and restarts -----------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def usage_from_counts(counts) -> dict:
    """`painter.evaluation.reconstruction.codebook_usage`'s dict (codes_used, codebook_usage, perplexity, ...) of a histogram."""
    counts = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.int64)
    return codebook_usage(np.repeat(np.arange(len(counts)), counts), len(counts))


class CodeCounter:
    """Histograms of the codes chosen: `window` (since the last `window_usage`) and `since_restart`."""

    def __init__(self, n_codes: int, device: torch.device | str = "cpu"):
        self.n_codes = n_codes
        self.window = torch.zeros(n_codes, dtype=torch.long, device=device)
        self.since_restart = torch.zeros(n_codes, dtype=torch.long, device=device)

    def update(self, codes: torch.Tensor) -> None:
        counts = torch.bincount(codes.reshape(-1), minlength=self.n_codes)
        self.window += counts
        self.since_restart += counts

    def window_usage(self) -> dict:
        """Usage and perplexity of the window's codes on all ranks (every rank must call it); resets the window."""
        counts = self.window.clone()
        if _distributed():
            dist.all_reduce(counts)
        self.window.zero_()
        return usage_from_counts(counts)

    def state_dict(self) -> dict:
        """Both histograms summed over the ranks (every rank must call it: it all-reduces), for the checkpoint
        that rank 0 alone writes: rank 0's own counts would lose the codes only other ranks chose, and a
        resumed run would restart them as dead (a redone step then differs from its first run)."""
        state = {"window": self.window.clone(), "since_restart": self.since_restart.clone()}
        if _distributed():
            for counts in state.values():
                dist.all_reduce(counts)
        return {name: counts.cpu() for name, counts in state.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restore summed histograms: rank 0 takes them and the other ranks start from zero, so the sums over
        ranks are those saved."""
        first = not _distributed() or dist.get_rank() == 0
        for name in ("window", "since_restart"):
            getattr(self, name).copy_(state[name] if first else torch.zeros_like(state[name]))


@torch.no_grad()
def restart_dead_codes(vqgan: VQGAN, latents: torch.Tensor | None, counts: torch.Tensor,
                       optimizer: torch.optim.Optimizer | None = None, seed: int = 0) -> int:
    """Re-initialise every code whose count (summed over ranks) is 0 from random latents; returns how many.

    `latents` (B, D, h, w) are the pre-quantization latents of rank 0's batch (other ranks may pass
    None): rank 0 draws distinct positions (with replacement only when there are more dead codes than
    positions) with a generator seeded by `seed` and broadcasts the vectors, so all ranks agree. Every
    rank must call this together. Adam's moments of the revived rows are zeroed.
    """
    counts = counts.clone()
    distributed = _distributed()
    if distributed:
        dist.all_reduce(counts)
    dead = torch.nonzero(counts == 0).flatten()
    n = int(dead.numel())
    if n == 0:
        return 0
    weight = vqgan.quantize.embedding.weight  # (K, D)
    new = torch.zeros(n, weight.size(1), device=weight.device, dtype=weight.dtype)
    if not distributed or dist.get_rank() == 0:
        if latents is None:
            raise ValueError("rank 0 needs the latents of its batch to restart dead codes")
        flat = latents.detach().permute(0, 2, 3, 1).reshape(-1, latents.size(1))  # (B*h*w, D)
        generator = torch.Generator().manual_seed(seed)
        if n <= flat.size(0):
            pick = torch.randperm(flat.size(0), generator=generator)[:n]
        else:
            pick = torch.randint(0, flat.size(0), (n,), generator=generator)
        new = flat[pick.to(flat.device)].to(weight.dtype)
    if distributed:
        dist.broadcast(new, src=0)
    weight.data[dead] = new
    if optimizer is not None:
        state = optimizer.state.get(weight, {})
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in state:
                state[key][dead] = 0
    return n


# --- one optimizer step --------------------------------------------------------------------------


def make_optimizers(vqgan: VQGAN, config: VQTrainConfig, discriminator: nn.Module | None = None
                    ) -> tuple[torch.optim.Adam, torch.optim.Adam | None]:
    """Adam for the VQGAN, and for the discriminator when there is one (betas 0.5, 0.9, as taming)."""
    opt = torch.optim.Adam(vqgan.parameters(), lr=config.lr, betas=config.betas)
    disc_opt = None
    if discriminator is not None:
        disc_opt = torch.optim.Adam(discriminator.parameters(), lr=config.disc_lr or config.lr, betas=(0.5, 0.9))
    return opt, disc_opt


@dataclass
class VQStepResult:
    loss: torch.Tensor  # scalar, detached: the VQGAN's total loss
    l1: torch.Tensor
    l2: torch.Tensor
    codebook: torch.Tensor
    grad_norm: torch.Tensor  # of the VQGAN, before clipping
    lr: float
    rows: int
    gan: torch.Tensor | None = None  # generator term, when the GAN is active
    disc_loss: torch.Tensor | None = None  # discriminator hinge loss, when the GAN is active
    restarted: int = 0  # codes re-initialised after this step


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               config: VQTrainConfig, step: int, counter: CodeCounter, *,
               discriminator: nn.Module | None = None, disc_optimizer: torch.optim.Optimizer | None = None,
               seed: int = 0) -> VQStepResult:
    """One optimizer step of the VQGAN on `images` (B, 3, H, W) in [-1, 1]; `step` is 0-based.

    `model` is a VQGAN, optionally DDP-wrapped (so is `discriminator`). The codes chosen are added to
    `counter`; after step `restart_every * k - 1`, dead codes are restarted (all ranks together) and
    the since-restart counts reset. Bf16 autocast on CUDA, fp32 on CPU.
    """
    device = images.device
    lr = lr_at(step, config.schedule())
    for group in optimizer.param_groups:
        group["lr"] = lr
    gan_on = discriminator is not None and config.gan_active(step)
    disc = _unwrap(discriminator) if gan_on else None
    if disc is not None:
        disc.requires_grad_(False)  # the generator's pass must not train (or sync) the discriminator
    optimizer.zero_grad(set_to_none=True)
    with autocast(device):
        reconstruction, codebook_loss, codes = model(images)
        losses = vq_losses(reconstruction, images, codebook_loss, config, disc)
    losses.loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
    optimizer.step()
    counter.update(codes)
    disc_loss = None
    if gan_on:
        disc.requires_grad_(True)
        for group in disc_optimizer.param_groups:
            group["lr"] = lr_at(step, config.schedule(config.disc_lr or config.lr))
        disc_optimizer.zero_grad(set_to_none=True)
        with autocast(device):  # one forward over real and fake together: one DDP forward per backward
            logits = discriminator(torch.cat([images, reconstruction.detach().to(images.dtype)]))
            real, fake = logits.float().chunk(2)
            disc_loss = hinge_d_loss(real, fake)
        disc_loss.backward()
        disc_optimizer.step()
    restarted = 0
    if config.restart_every and (step + 1) % config.restart_every == 0:
        vqgan = _unwrap(model)
        latents = None
        if not _distributed() or dist.get_rank() == 0:
            with torch.no_grad(), autocast(device):
                latents = vqgan.encode_latents(images).float()  # (B, D, h, w), with the updated encoder
        restarted = restart_dead_codes(vqgan, latents, counter.since_restart, optimizer, seed=seed * 1_000_003 + step)
        counter.since_restart.zero_()
    return VQStepResult(loss=losses.loss.detach(), l1=losses.l1.detach(), l2=losses.l2.detach(),
                        codebook=losses.codebook.detach(), grad_norm=grad_norm.detach(), lr=lr,
                        rows=int(images.size(0)), gan=None if losses.gan is None else losses.gan.detach(),
                        disc_loss=None if disc_loss is None else disc_loss.detach(), restarted=restarted)
