"""The VQGAN's encode loop on a device: uint8 pictures -> code ids, the hot path of the tokenize job.

Owns how images reach the VQGAN on each device (`encode_codes`, `model_input`, `prepare_vqgan`) and how
many go at once (`default_max_batch`). On CUDA that is the GPU path: the uint8 (b, H, W, 3) pixels are
copied from pinned memory without blocking (4x fewer bytes than floats) and scaled there, their
permuted view already channels_last; the VQGAN runs channels_last on a bf16 copy of its weights (as
generation does: under autocast its GroupNorms and swish would be upcast to fp32 and every weight cast
again per call), and the nearest-code search stays fp32 (`VectorQuantizer.codes_from_latents`); the
codes stay on the device until one copy back at the end. On CPU: fp32 on
`painter.io.images.to_model_input`'s contiguous floats, so the tokens are exactly the reference's.
`channels_last=False` keeps CUDA in NCHW: torch's CUDA GroupNorm works on NCHW only, so every norm of
the channels_last VQGAN converts its input; `benchmarks/gpu_train.py` times both layouts.
`painter.inference.encoder.ImageEncoder` (the tokenize job) and `benchmarks/gpu_train.py` both run it; it needs
only torch and numpy (no Ray, no fsspec).
"""
from __future__ import annotations

import numpy as np
import torch

from painter.io.images import to_model_input
from painter.models.vqgan import VQGAN
from painter.runtime import inference_dtype

# Images per VQGAN call by device type. Every call has exactly this many (see `encode_codes`). On a GPU,
# the tokenize job's default batch (a 256x256 image holds ~100 MiB of activations at the encoder's
# full-resolution level, so 64 take ~6 GiB and keep an H200 busy; a larger chunk would be mostly padding
# at that batch). On a CPU, 8: measured on 2 cores with one thread, 32 bundled 32x32 images encode in
# 0.119 s as 8 per call against 0.202 s as one call of 64, and 64x64 images in 0.135 s as 8 per call
# against 0.226 s all at once (the activations of a few images stay in cache).
DEFAULT_MAX_BATCH = {"cuda": 64, "cpu": 8}


def default_max_batch(device: torch.device) -> int | None:
    """The images per VQGAN call on `device` when none is given: 64 on CUDA, 8 on CPU, else all at once."""
    return DEFAULT_MAX_BATCH.get(torch.device(device).type)


def prepare_vqgan(vqgan: VQGAN, device: torch.device, channels_last: bool = True,
                  dtype: torch.dtype | None = None) -> VQGAN:
    """The VQGAN in eval mode on `device`, converted in place: weights in `dtype` (default bf16 on CUDA,
    fp32 on CPU) and channels_last on CUDA (cuDNN's NHWC kernels) unless not."""
    device = torch.device(device)
    vqgan = vqgan.to(device=device, dtype=dtype or inference_dtype(device)).eval()
    layout = torch.channels_last if device.type == "cuda" and channels_last else torch.contiguous_format
    return vqgan.to(memory_format=layout)


def network_input(vqgan: VQGAN, pixels: np.ndarray, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """`model_input` in the dtype of the VQGAN's weights (bf16 on CUDA after `prepare_vqgan`)."""
    return model_input(pixels, device, channels_last).to(vqgan.quant_conv.weight.dtype)


def model_input(pixels: np.ndarray, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """uint8 (b, H, W, 3) -> float32 (b, 3, H, W) in [-1, 1] (x / 127.5 - 1) on `device`.

    CUDA: the uint8 array goes over as it is (from pinned memory, non_blocking), its permuted view has
    channels_last strides (made contiguous if not `channels_last`), and it is scaled there.
    CPU: `to_model_input`, contiguous NCHW.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.from_numpy(to_model_input(pixels)).to(device)
    host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)  # (b, H, W, 3)
    host.numpy()[...] = pixels  # the one host copy, straight into pinned memory
    x = scale_channels_last(host.to(device, non_blocking=True))
    return x if channels_last else x.contiguous()


def scale_channels_last(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (b, H, W, 3) on any device -> float32 (b, 3, H, W) in [-1, 1] with channels_last strides (the
    permuted view of NHWC memory is exactly that layout), by the same x / 127.5 - 1 as `to_model_input`."""
    return pixels.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


@torch.inference_mode()
def encode_codes(vqgan: VQGAN, pixels: np.ndarray, device: torch.device, max_batch: int | None = None,
                 channels_last: bool = True) -> np.ndarray:
    """uint8 (B, H, W, 3) -> VQGAN codes (B, h*w) as int64, exactly `max_batch` images per call (None: all
    at once, unpadded).

    The last call is padded with black images, so an image's codes do not depend on which others share
    its batch: convolution and matmul kernels choose their blocking by shape, the float sums of one
    image then differ in the last bits between batch sizes (measured on CPU: batch 1 against 2), and
    that is enough to flip a near-tie in the nearest-code search. The same images read from another
    store, split into other blocks, or rerun after a fault, get the same tokens.
    `vqgan` is on `device`, prepared with the same `channels_last` (see `prepare_vqgan`); the network runs
    in its weights' dtype (bf16 on CUDA, fp32 on CPU) without autocast; the nearest-code search is fp32
    on both (`VectorQuantizer.codes_from_latents`).
    """
    device = torch.device(device)
    n = len(pixels)
    step = max_batch or max(1, n)
    out = []
    for start in range(0, n, step):
        chunk = pixels[start:start + step]
        if len(chunk) < step:  # (step, H, W, 3): the same shape as every other call
            chunk = np.concatenate([chunk, np.zeros((step - len(chunk),) + chunk.shape[1:], chunk.dtype)])
        x = network_input(vqgan, chunk, device, channels_last)  # (step, 3, H, W)
        out.append(vqgan.encode(x))  # (step, h*w), left on the device until the end
    if not out:
        return np.zeros((0, vqgan.config.image_token_count), dtype=np.int64)
    return torch.cat(out)[:n].cpu().numpy()
