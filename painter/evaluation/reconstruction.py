"""VQGAN reconstruction and codebook statistics, shared by `painter evaluate` and VQGAN training.

`reconstruction_error` / `ReconstructionMeter`: images in [-1, 1] -> codes -> decoded images; mean L1
and L2 (mean squared error) per value in [-1, 1] space, PSNR = 10 log10(2^2 / MSE) per image
(peak-to-peak 2; the same number as on 0..255 pixels), averaged over images; and the code histogram
(`codebook_usage`): the fraction of the codebook used and its perplexity exp(entropy).
Only numpy and torch: no I/O, no Ray.
"""
from __future__ import annotations

import numpy as np
import torch

from painter.runtime import autocast


def codebook_usage(codes, n_codes: int) -> dict:
    """How a VQGAN's codebook is used by `codes` (any shape of ids in [0, n_codes)): `codes_used`,
    `codebook_usage` (their fraction of the codebook), `perplexity` (exp of the histogram's entropy:
    the number of equally likely codes with the same entropy) and `tokens`."""
    return _usage(np.bincount(np.asarray(codes, dtype=np.int64).ravel(), minlength=n_codes), n_codes)


def _usage(counts: np.ndarray, n_codes: int) -> dict:
    if len(counts) > n_codes:
        raise ValueError(f"code ids beyond the codebook of {n_codes}")
    total = counts.sum()
    if total == 0:
        return {"codes_used": 0, "codebook_size": n_codes, "codebook_usage": 0.0, "perplexity": 0.0, "tokens": 0}
    p = counts[counts > 0] / total
    return {"codes_used": int((counts > 0).sum()), "codebook_size": n_codes,
            "codebook_usage": float((counts > 0).sum() / n_codes),
            "perplexity": float(np.exp(-(p * np.log(p)).sum())), "tokens": int(total)}


class ReconstructionMeter:
    """Accumulates reconstruction error and code counts over batches (`update`), then `result()`."""

    def __init__(self, n_codes: int):
        self.n_codes = n_codes
        self.counts = np.zeros(n_codes, dtype=np.int64)
        self.abs_sum = self.sq_sum = 0.0
        self.values = 0
        self.psnr: list[float] = []

    @torch.inference_mode()
    def update(self, vqgan, images) -> None:
        """Encode and decode one batch of images (B, 3, H, W) in [-1, 1] (numpy or torch)."""
        device = next(vqgan.parameters()).device
        x = torch.as_tensor(np.asarray(images, dtype=np.float32) if not isinstance(images, torch.Tensor) else images)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(x.shape)}")
        x = x.to(device=device, dtype=torch.float32)
        with autocast(device):  # what tokenize and generate run under: measures the production path
            codes = vqgan.encode(x)
            recon = vqgan.decode(codes)
        diff = (recon.float() - x).double()
        self.abs_sum += float(diff.abs().sum())
        self.sq_sum += float(diff.square().sum())
        self.values += diff.numel()
        mse = diff.square().flatten(1).mean(dim=1).clamp_min(1e-10)
        self.psnr.extend((10 * torch.log10(4.0 / mse)).tolist())
        self.counts += np.bincount(codes.flatten().cpu().numpy(), minlength=self.n_codes)[:self.n_codes]

    def result(self) -> dict:
        if not self.values:
            raise ValueError("no images were reconstructed")
        return {"images": len(self.psnr), "l1": self.abs_sum / self.values, "l2": self.sq_sum / self.values,
                "psnr": float(np.mean(self.psnr))} | _usage(self.counts, self.n_codes)


def reconstruction_error(vqgan, images, batch_size: int = 32) -> dict:
    """Reconstruction error and codebook usage of `vqgan` on images (N, 3, H, W) in [-1, 1]:
    `images`, `l1`, `l2` (MSE), `psnr` (dB, mean over images), and `codebook_usage`'s keys."""
    meter = ReconstructionMeter(vqgan.config.n_embed)
    for start in range(0, len(images), batch_size):
        meter.update(vqgan, images[start:start + batch_size])
    return meter.result()
