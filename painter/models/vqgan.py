"""
The VQGAN image tokenizer of taming-transformers (Esser et al., 2021), in pure torch.

This module owns the network only: the config (`VQGANConfig`), the convolutional encoder and
decoder, the vector quantizer, and the `VQGAN` wrapper with `encode` (images -> code ids),
`decode` (code ids -> images) and `forward` (the training pass with a straight-through
estimator). Parameter names follow taming exactly, so the state dict of a taming `last.ckpt`
(minus its `loss.*` discriminator/LPIPS keys) loads with `load_state_dict(strict=True)`.
No file I/O and no global torch settings here: loading checkpoints and presets lives elsewhere.

Shapes: B batch, C channels, H/W image size, h/w latent grid (H // downsample_factor),
D embed_dim, K n_embed.
"""

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from painter.models.config import VQGANConfig  # noqa: F401 (torch-free, for the command line; re-exported here)


# -----------------------------------------------------------------------------
# building blocks (names as in taming/modules/diffusionmodules/model.py)

def Normalize(in_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


class Downsample(nn.Module):
    """3x3 conv with stride 2 after taming's asymmetric (right/bottom) zero padding."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H/2, W/2)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1-conv projections."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)  # (B, C, H, W) each
        # (B, 1, H*W, C): one head; SDPA's default scale C**-0.5 is taming's
        q, k, v = (t.reshape(B, 1, C, H * W).transpose(2, 3) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        y = y.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(y)


class _Mid(nn.Module):
    """Container giving taming's `mid.block_1 / mid.attn_1 / mid.block_2` names."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


def _level(blocks: list, attns: list) -> nn.Module:
    """One resolution level: `block` and `attn` lists (the up/downsampler is added later)."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


# -----------------------------------------------------------------------------
# encoder / decoder

class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H/f, W/f)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        cfg = config
        self.num_resolutions = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(cfg.ch_mult)
        curr_res = cfg.resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block_in = cfg.ch * in_ch_mult[i_level]
            block_out = cfg.ch * cfg.ch_mult[i_level]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            down = _level(blocks, attns)
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res = curr_res // 2
            self.down.append(down)
        self.mid = _Mid(block_in, cfg.dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        h = self.conv_in(x)  # (B, ch, H, W)
        for i_level, down in enumerate(self.down):
            h = _run_level(down, h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)  # halves H and W
        h = self.mid(h)  # (B, ch*ch_mult[-1], h, w)
        return self.conv_out(swish(self.norm_out(h)))  # (B, z_channels, h, w)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h*f, w*f), unclamped."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        cfg = config
        self.num_resolutions = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        curr_res = cfg.resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in, cfg.dropout)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block_out = cfg.ch * cfg.ch_mult[i_level]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            up = _level(blocks, attns)
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res = curr_res * 2
            self.up.insert(0, up)  # keep taming's order: up[0] is the full-resolution level
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))  # (B, ch*ch_mult[-1], h, w)
        for i_level in reversed(range(self.num_resolutions)):
            h = _run_level(self.up[i_level], h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)  # doubles H and W
        return self.conv_out(swish(self.norm_out(h)))  # (B, out_ch, H, W)


# -----------------------------------------------------------------------------
# vector quantizer

def _autocast_off(device: torch.device):
    """Autocast disabled on `device`; nothing to disable on devices without autocast (meta: FLOP counts)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup (taming's VectorQuantizer2, without remapping)."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25):
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def codes_from_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) latents -> (B, h*w) nearest code ids, row-major over (h, w)."""
        B, D, h, w = z.shape
        # squared L2 distance ||z||^2 - 2 z.e + ||e||^2, in fp32 whatever the caller's autocast: a bf16
        # GEMM here moves near-ties (a quarter of the codes of a bf16 encode changed)
        with _autocast_off(z.device):
            zf = z.detach().float().permute(0, 2, 3, 1).reshape(-1, D)  # (B*h*w, D)
            e = self.embedding.weight.detach().float()  # (K, D)
            d = (zf.pow(2).sum(dim=1, keepdim=True)
                 - 2.0 * zf @ e.t()
                 + e.pow(2).sum(dim=1)[None, :])  # (B*h*w, K)
            return d.argmin(dim=1).view(B, h * w)

    def latents_from_codes(self, codes: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h*w) code ids -> (B, D, h, w) codebook vectors."""
        B = codes.shape[0]
        z_q = self.embedding(codes.reshape(B, h * w))  # (B, h*w, D)
        return z_q.view(B, h, w, self.embed_dim).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor):
        """Training pass: (z_q with straight-through gradient, codebook loss, codes)."""
        B, D, h, w = z.shape
        codes = self.codes_from_latents(z)  # (B, h*w)
        z_q = self.latents_from_codes(codes, h, w).to(z.dtype)  # (B, D, h, w)
        # codebook term moves e toward sg(z); commitment term (x beta) moves z toward sg(e)
        loss = (F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach()))
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return z_q, loss, codes


# -----------------------------------------------------------------------------
# the full model

class VQGAN(nn.Module):

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, D, h, w) pre-quantization latents."""
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [-1, 1] -> (B, h*w) LongTensor of code ids, row-major."""
        return self.quantize.codes_from_latents(self.encode_latents(images))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h*w) code ids (square grid) -> (B, 3, H, W) images clamped to [-1, 1]."""
        n = codes.shape[-1]
        side = math.isqrt(n)
        assert side * side == n, f"decode expects a square grid of codes, got {n} per image"
        z_q = self.quantize.latents_from_codes(codes, side, side)  # (B, D, h, w)
        x = self.decoder(self.post_quant_conv(z_q))  # (B, 3, H, W)
        return x.clamp(-1.0, 1.0)

    def forward(self, images: torch.Tensor):
        """Training pass -> (reconstruction (B, 3, H, W) unclamped, codebook_loss, codes (B, h*w))."""
        z = self.encode_latents(images)  # (B, D, h, w)
        z_q, codebook_loss, codes = self.quantize(z)
        reconstruction = self.decoder(self.post_quant_conv(z_q))  # (B, 3, H, W)
        return reconstruction, codebook_loss, codes
