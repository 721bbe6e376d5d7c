"""`Generator`: the plain callable that turns a batch of (idx, text, sample) rows into images.

It owns one loaded model and runs tokenize-text -> KV-cache sampling -> batched VQGAN decode ->
image encoding. It runs and tests without Ray; `painter.stages.generate` puts it in an actor pool and
`painter.pipeline` calls it directly.

Reproducibility: a row's randomness comes from (seed, idx, sample), and the model always computes
in chunks of exactly `micro_batch` rows (the last chunk of a batch is padded by repeating its last
row; padded outputs are dropped). Kernels choose their algorithm by tensor shape (oneDNN uses another
convolution for a batch of one, cuBLAS picks GEMM tiles per shape), so a fixed shape is what makes an
image byte-identical whatever batch, worker or order it came in. The micro-batch size is therefore
part of what names an image, like the seed; it defaults by device (`default_micro_batch`).

Encoding overlaps the model: each chunk's pixels go to a thread pool (Pillow releases the GIL while
compressing) while the next chunk is sampled.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from painter.checkpoint import LoadedModel, load_model
from painter.io.images import IMAGE_FORMATS, PIXEL_ROUNDING, encode_image, uint8_from_tensor
from painter.runtime import autocast, pick_device
from painter.sampling import SamplingConfig, generate, row_keys

MICRO_BATCH_DEFAULTS = {"cpu": 8, "cuda": 64}


def default_micro_batch(device: torch.device | str) -> int:
    """Rows per model call when none is given: small on CPU, enough to fill a GPU."""
    return MICRO_BATCH_DEFAULTS.get(torch.device(device).type, MICRO_BATCH_DEFAULTS["cpu"])


@dataclass
class GenerationConfig:
    seed: int = 0
    temperature: float = 1.0
    top_k: int | None = 100
    top_p: float | None = None
    image_format: str = "png"
    pixel_rounding: str = "round"  # or "truncate", as EasyNLP (painter.io.images)

    def __post_init__(self):
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format {self.image_format!r} is not one of {IMAGE_FORMATS}")
        if self.pixel_rounding not in PIXEL_ROUNDING:
            raise ValueError(f"pixel rounding {self.pixel_rounding!r} is not one of {PIXEL_ROUNDING}")
        self.sampling  # validates temperature, top_k and top_p now rather than on the first batch

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


def _padded(values: list, size: int) -> list:
    """`values` repeated at its last element up to `size` entries."""
    return values + [values[-1]] * (size - len(values))


class Generator:
    """`Generator(model_dir, config)(batch) -> batch`; batch columns idx, text and optionally sample.

    Adds `seed`, `model` (fingerprint), `is_truncated` and the encoded image under a column named
    after the image format (`png` by default). `micro_batch` fixes the shape the model computes in
    (see the module docstring); `encode_threads` sizes the image-encoding pool (0: encode inline).
    """

    def __init__(self, model: str | LoadedModel, config: GenerationConfig | None = None, device=None, *,
                 micro_batch: int | None = None, encode_threads: int | None = None):
        self.device = pick_device(device)
        self.model = model if isinstance(model, LoadedModel) else load_model(model, device=self.device)
        if self.model.gpt is None or self.model.vqgan is None:
            raise ValueError("Generator needs a model loaded with both its GPT and its VQGAN")
        self.config = config or GenerationConfig()
        self.micro_batch = micro_batch or default_micro_batch(self.device)
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")
        threads = min(8, os.cpu_count() or 1) if encode_threads is None else encode_threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="encode") if threads > 0 else None

    def codes(self, texts, idxs, samples) -> tuple[torch.Tensor, np.ndarray]:
        """Image codes (B, img_len) and is_truncated (B,) for rows named by (idx, sample), computed as given."""
        ids, is_truncated = self.model.tokenizer.encode_batch([str(t) for t in texts])
        text_ids = torch.from_numpy(ids).to(self.device)
        keys = row_keys(self.config.seed, [str(i) for i in idxs], [int(s) for s in samples], device=self.device)
        with autocast(self.device):
            codes = generate(self.model.gpt, text_ids, keys, self.config.sampling)
        return codes, is_truncated

    @torch.inference_mode()
    def pixels(self, codes: torch.Tensor) -> np.ndarray:
        """(B, img_len) codes -> (B, H, W, 3) uint8, decoding the given rows in one call."""
        with autocast(self.device):
            images = self.model.vqgan.decode(codes)
        return uint8_from_tensor(images, self.config.pixel_rounding)

    def _encode(self, pixels: np.ndarray) -> list[bytes]:
        return [encode_image(p, self.config.image_format) for p in pixels]

    def images(self, texts, idxs, samples) -> tuple[list[bytes], np.ndarray]:
        """Encoded images and is_truncated for any number of rows, in fixed-shape micro-batches."""
        texts, idxs, samples = list(texts), list(idxs), [int(s) for s in samples]
        pending, truncated = [], []
        for start in range(0, len(texts), self.micro_batch):
            stop = min(start + self.micro_batch, len(texts))
            n = stop - start
            chunk = [_padded(column[start:stop], self.micro_batch) for column in (texts, idxs, samples)]
            codes, is_truncated = self.codes(*chunk)
            pixels = self.pixels(codes)[:n]
            truncated.append(is_truncated[:n])
            pending.append(self._pool.submit(self._encode, pixels) if self._pool else self._encode(pixels))
        encoded = [image for part in pending for image in (part.result() if self._pool else part)]
        return encoded, np.concatenate(truncated) if truncated else np.zeros(0, dtype=bool)

    def __call__(self, batch: dict) -> dict:
        texts, idxs = batch["text"], batch["idx"]
        samples = batch.get("sample", np.zeros(len(texts), dtype=np.int64))
        encoded, is_truncated = self.images(texts, idxs, samples)
        out = dict(batch)
        out["sample"] = np.asarray(samples, dtype=np.int64)
        out["seed"] = np.full(len(texts), self.config.seed, dtype=np.int64)
        out["model"] = np.array([self.model.fingerprint] * len(texts), dtype=object)
        out["is_truncated"] = np.asarray(is_truncated, dtype=bool)
        out[self.config.image_format] = np.array(encoded, dtype=object)
        return out
