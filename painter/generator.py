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

Guidance, reranking and image prompts (see `painter.sampling` and `painter.rerank`): `guidance` S
mixes each row's conditional and null-caption logits; `candidates` N draws each (idx, sample) N
times with derived keys and keeps the best by the model's own score (or `scorer`, a user's
image-text model file), returned as the `score` column; an input column `prompt_image` (encoded image
bytes, or base64 text) with `keep_rows` K keeps the first K token rows of that image's VQGAN codes
and generates the rest. A micro-batch of R rows is always R x N candidates (x 2 when guided), so
the shapes stay fixed and the kept image depends on (seed, idx, sample) alone.

Encoding overlaps the model: each chunk's pixels go to a thread pool (Pillow releases the GIL while
compressing) while the next chunk is sampled.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from painter.checkpoint import LoadedModel, load_model
from painter import rerank
from painter.checkpoint import read_bytes
from painter.io.images import (IMAGE_FORMATS, ImageRejected, encode_image, image_bytes, load_image, preprocess,
                               uint8_from_tensor)
from painter.runtime import autocast, pick_device
from painter.sampling import SamplingConfig, generate, null_caption

PROMPT_COLUMN = "prompt_image"  # optional input column: an image (bytes, or base64 text) to continue

MICRO_BATCH_DEFAULTS = {"cpu": 8, "cuda": 64}
# The guidance scale when none is given, for a model trained with caption dropout (others: 1, unguided).
# Chosen by measurement on the bundled model (README, "Guidance and reranking").
DEFAULT_GUIDANCE = 2.0


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
    guidance: float | None = None  # guidance scale S (1: plain sampling); None: DEFAULT_GUIDANCE for guidable models
    candidates: int = 1  # images drawn per (idx, sample); the best-scored one is kept
    scorer: str | None = None  # image-text scorer file (.pt2 / TorchScript) instead of the model's own score
    keep_rows: int = 0  # token rows of a row's prompt image kept (the rest generated)

    def __post_init__(self):
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format {self.image_format!r} is not one of {IMAGE_FORMATS}")
        if self.candidates < 1 or self.keep_rows < 0:
            raise ValueError(f"candidates must be >= 1 and keep_rows >= 0, got {self.candidates}, {self.keep_rows}")
        self.sampling  # validates temperature, top_k, top_p and guidance now rather than on the first batch

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              guidance=1.0 if self.guidance is None else self.guidance)


def prompt_image_problem(cell) -> str | None:
    """Why a `prompt_image` cell (bytes, or base64 text) cannot be a prompt, or None (also for no prompt)."""
    if cell is None:
        return None
    try:
        load_image(image_bytes(cell, isinstance(cell, str)))
    except ImageRejected as e:
        return f"prompt image: {e}"
    return None


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
        self.guidable = self.model.config.null_caption_prob > 0
        guidance = self.config.guidance
        if guidance is None:
            guidance = DEFAULT_GUIDANCE if self.guidable else 1.0
        elif guidance != 1.0 and not self.guidable:
            print(f"painter: warning: {self.model.path} was trained without caption dropout "
                  f"(train --null-caption-prob); --guidance {guidance} may not help", file=sys.stderr)
        self.sampling = dataclasses.replace(self.config.sampling, guidance=guidance)
        self.scorer = None
        if self.config.scorer:
            self.scorer = rerank.load_scorer(read_bytes(self.config.scorer), self.device, self.config.scorer)
        side = math.isqrt(self.model.config.gpt.img_len)
        self.keep_codes = self.config.keep_rows * side
        if self.keep_codes > self.model.config.gpt.img_len:
            raise ValueError(f"keep_rows {self.config.keep_rows} is more than the image's {side} token rows")

    @property
    def reranks(self) -> bool:
        return self.config.candidates > 1

    def codes(self, texts, idxs, samples, prompts=None) -> tuple[torch.Tensor, np.ndarray, torch.Tensor | None]:
        """Image codes (B, img_len), is_truncated (B,) and scores (B,) (None without reranking) for rows
        named by (idx, sample), computed as given; `prompts` (B,) prompt image cells or None."""
        n, tokenizer = self.config.candidates, self.model.tokenizer
        ids, is_truncated = tokenizer.encode_batch([str(t) for t in texts])
        text_ids = torch.from_numpy(ids).to(self.device).repeat_interleave(n, 0)  # (B*n, Tt)
        keys = rerank.candidate_keys(self.config.seed, [str(i) for i in idxs], [int(s) for s in samples], n,
                                     device=self.device)  # (B*n,)
        null_ids = null_caption(text_ids, tokenizer.pad_id)
        prefix, keep = self.prompt_codes(prompts, len(ids))
        if prefix is not None:
            prefix, keep = prefix.repeat_interleave(n, 0), keep.repeat_interleave(n, 0)
        with autocast(self.device):
            codes = generate(self.model.gpt, text_ids, keys, self.sampling, null_ids=null_ids,
                             prefix=prefix, keep=keep)  # (B*n, img_len)
            if not self.reranks:
                return codes, is_truncated, None
            scores = self.score(text_ids, codes, null_ids)  # (B*n,)
        best = rerank.best_of(scores, n)  # (B,)
        rows = torch.arange(len(ids), device=best.device) * n + best
        return codes[rows], is_truncated, scores[rows]

    def score(self, text_ids: torch.Tensor, codes: torch.Tensor, null_ids: torch.Tensor) -> torch.Tensor:
        """(B,) scores of candidate codes (B, img_len): the user's scorer, else the model's own."""
        if self.scorer is not None:
            with torch.inference_mode():
                images = self.model.vqgan.decode(codes).float()  # (B, 3, H, W)
            return self.scorer(images, text_ids)
        return rerank.likelihood_score(self.model.gpt, text_ids, codes, null_ids if self.guidable else None).float()

    @torch.inference_mode()
    def prompt_codes(self, prompts, rows: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(prefix codes (B, img_len), kept codes per row (B,)) of the rows' prompt images; None, None
        without any. A missing cell keeps nothing; an unusable image raises ImageRejected (the stage checks first)."""
        if prompts is None or self.keep_codes == 0 or all(p is None for p in prompts):
            return None, None
        size = self.model.config.image_size
        pixels = np.zeros((rows, 3, size, size), dtype=np.float32)
        keep = torch.zeros(rows, dtype=torch.int64, device=self.device)
        for i, cell in enumerate(prompts):
            if cell is None:
                continue
            array, reason = preprocess(cell, size, is_base64=isinstance(cell, str))
            if reason is not None:
                raise ImageRejected(f"prompt image: {reason}")
            pixels[i], keep[i] = array, self.keep_codes
        prefix = self.model.vqgan.encode(torch.from_numpy(pixels).to(self.device))  # (B, img_len)
        return prefix, keep

    @torch.inference_mode()
    def pixels(self, codes: torch.Tensor) -> np.ndarray:
        """(B, img_len) codes -> (B, H, W, 3) uint8, decoding the given rows in one call."""
        with autocast(self.device):
            images = self.model.vqgan.decode(codes)
        return uint8_from_tensor(images)

    def _encode(self, pixels: np.ndarray) -> list[bytes]:
        return [encode_image(p, self.config.image_format) for p in pixels]

    def images(self, texts, idxs, samples, prompts=None) -> tuple[list[bytes], np.ndarray, np.ndarray | None]:
        """Encoded images, is_truncated and scores (None without reranking) for any number of rows, in
        fixed-shape micro-batches."""
        texts, idxs, samples = list(texts), list(idxs), [int(s) for s in samples]
        prompts = [None] * len(texts) if prompts is None else list(prompts)
        pending, truncated, scores = [], [], []
        for start in range(0, len(texts), self.micro_batch):
            stop = min(start + self.micro_batch, len(texts))
            n = stop - start
            chunk = [_padded(column[start:stop], self.micro_batch) for column in (texts, idxs, samples, prompts)]
            codes, is_truncated, score = self.codes(*chunk)
            pixels = self.pixels(codes)[:n]
            truncated.append(is_truncated[:n])
            if score is not None:
                scores.append(score[:n].float().cpu().numpy())
            pending.append(self._pool.submit(self._encode, pixels) if self._pool else self._encode(pixels))
        encoded = [image for part in pending for image in (part.result() if self._pool else part)]
        if not self.reranks:
            scores_out = None
        else:
            scores_out = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
        return encoded, np.concatenate(truncated) if truncated else np.zeros(0, dtype=bool), scores_out

    def __call__(self, batch: dict) -> dict:
        texts, idxs = batch["text"], batch["idx"]
        samples = batch.get("sample", np.zeros(len(texts), dtype=np.int64))
        encoded, is_truncated, scores = self.images(texts, idxs, samples, batch.get(PROMPT_COLUMN))
        out = dict(batch)
        if scores is not None:
            out["score"] = scores.astype(np.float32)
        out["sample"] = np.asarray(samples, dtype=np.int64)
        out["seed"] = np.full(len(texts), self.config.seed, dtype=np.int64)
        out["model"] = np.array([self.model.fingerprint] * len(texts), dtype=object)
        out["is_truncated"] = np.asarray(is_truncated, dtype=bool)
        out[self.config.image_format] = np.array(encoded, dtype=object)
        return out
