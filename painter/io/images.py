"""Image conversion: model tensors in [-1, 1] to 8-bit pictures and encoded bytes (PNG/JPEG/WebP)."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGE_FORMATS = ("png", "jpeg", "webp")


def uint8_from_tensor(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [-1, 1] -> (B, H, W, 3) uint8, rounded like the reference's postprocess."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def encode_image(pixels: np.ndarray, image_format: str = "png") -> bytes:
    """(H, W, 3) uint8 -> file bytes. PNG is lossless and byte-stable for equal pixels."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format {image_format!r} is not one of {IMAGE_FORMATS}")
    buf = io.BytesIO()
    kwargs = {"png": {"optimize": False}, "jpeg": {"quality": 95}, "webp": {"quality": 95}}[image_format]
    Image.fromarray(pixels, "RGB").save(buf, format=image_format.upper(), **kwargs)
    return buf.getvalue()


def open_image(data: bytes) -> Image.Image:
    """Bytes written by `encode_image` back to a PIL image."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
