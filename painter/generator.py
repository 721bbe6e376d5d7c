"""`Generator`: the plain callable that turns a batch of (idx, text, sample) rows into images.

It owns one loaded model and runs tokenize-text -> KV-cache sampling -> one batched VQGAN decode ->
image encoding. It runs and tests without Ray; `painter.stages.generate` puts it in an actor pool and
`painter.pipeline` calls it directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from painter.checkpoint import LoadedModel, load_model
from painter.io.images import IMAGE_FORMATS, encode_image, uint8_from_tensor
from painter.runtime import autocast, pick_device
from painter.sampling import SamplingConfig, generate, row_keys


@dataclass
class GenerationConfig:
    seed: int = 0
    temperature: float = 1.0
    top_k: int | None = 100
    top_p: float | None = None
    image_format: str = "png"

    def __post_init__(self):
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format {self.image_format!r} is not one of {IMAGE_FORMATS}")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


class Generator:
    """`Generator(model_dir, config)(batch) -> batch`; batch columns idx, text and optionally sample.

    Adds `seed`, `model` (fingerprint), `is_truncated` and the encoded image under a column named
    after the image format (`png` by default).
    """

    def __init__(self, model: str | LoadedModel, config: GenerationConfig | None = None, device=None):
        self.device = pick_device(device)
        self.model = model if isinstance(model, LoadedModel) else load_model(model, device=self.device)
        if self.model.gpt is None or self.model.vqgan is None:
            raise ValueError("Generator needs a model loaded with both its GPT and its VQGAN")
        self.config = config or GenerationConfig()

    def codes(self, texts, idxs, samples) -> tuple[torch.Tensor, np.ndarray]:
        """Image codes (B, img_len) and is_truncated (B,) for rows named by (idx, sample)."""
        ids, is_truncated = self.model.tokenizer.encode_batch([str(t) for t in texts])
        text_ids = torch.from_numpy(ids).to(self.device)
        keys = row_keys(self.config.seed, [str(i) for i in idxs], [int(s) for s in samples], device=self.device)
        with autocast(self.device):
            codes = generate(self.model.gpt, text_ids, keys, self.config.sampling)
        return codes, is_truncated

    @torch.inference_mode()
    def pixels(self, codes: torch.Tensor) -> np.ndarray:
        """(B, img_len) codes -> (B, H, W, 3) uint8, decoding the whole batch once."""
        with autocast(self.device):
            images = self.model.vqgan.decode(codes)
        return uint8_from_tensor(images)

    def __call__(self, batch: dict) -> dict:
        texts, idxs = batch["text"], batch["idx"]
        samples = batch.get("sample", np.zeros(len(texts), dtype=np.int64))
        codes, is_truncated = self.codes(texts, idxs, samples)
        pixels = self.pixels(codes)
        out = dict(batch)
        out["sample"] = np.asarray(samples, dtype=np.int64)
        out["seed"] = np.full(len(texts), self.config.seed, dtype=np.int64)
        out["model"] = np.array([self.model.fingerprint] * len(texts), dtype=object)
        out["is_truncated"] = np.asarray(is_truncated, dtype=bool)
        out[self.config.image_format] = np.array(
            [encode_image(p, self.config.image_format) for p in pixels], dtype=object)
        return out
