"""Model output to pixels: the VQGAN's [-1, 1] images as 8-bit arrays, on the host or on the device."""
from __future__ import annotations
import numpy as np
import torch

from painter.io.images import PIXEL_ROUNDING


def uint8_from_tensor(images: torch.Tensor, rounding: str = "round") -> np.ndarray:
    """(B, 3, H, W) floats in [-1, 1] -> (B, H, W, 3) uint8: (x + 1) * 127.5 to the nearest level
    (`round`, the default), or truncated as EasyNLP's `astype(np.uint8)` does (`truncate`)."""
    return uint8_on_device(images, rounding).cpu().numpy()


def uint8_on_device(images: torch.Tensor, rounding: str = "round") -> torch.Tensor:
    """`uint8_from_tensor` without leaving the device: (B, 3, H, W) -> (B, H, W, 3) uint8 tensor."""
    if rounding not in PIXEL_ROUNDING:
        raise ValueError(f"pixel rounding {rounding!r} is not one of {PIXEL_ROUNDING}")
    x = (images.detach().float().clamp(-1, 1) + 1.0) * 127.5
    x = x.round() if rounding == "round" else x.floor()
    return x.to(torch.uint8).permute(0, 2, 3, 1)


