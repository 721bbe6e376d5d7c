"""Batched text-to-image token sampling: KV-cache generation and the reference's slow algorithm.

Every row draws its randomness from a counter-based hash of `(seed, idx, sample)`, the step and the
code, so the tokens of a row do not depend on which batch, worker or order produced them. Sampling
is Gumbel-max over the temperature-scaled, top-k/top-p-filtered logits, which is the same
distribution as softmax + multinomial. Pure torch; no I/O.

Classifier-free guidance (`SamplingConfig.guidance` S != 1): every row runs twice in one batch with
one cache, under its caption and under the null caption (all [PAD]); the codes are chosen from
`u + S (c - u)` (c conditional, u null logits, in fp32) and fed back to both halves. S = 1 skips the
null half (plain conditional sampling); S = 0 samples the null-caption model. Image prompts
(`prefix`, `keep`): row b's first keep[b] codes are forced to prefix[b] instead of sampled, inside
the same fixed-shape step, so rows with and without a prompt share a batch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch

from painter.models.gpt import GPT

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = 100  # the reference's default; 1 means greedy
    top_p: float | None = None
    guidance: float = 1.0  # classifier-free guidance scale S: logits u + S (c - u); 1 is plain sampling

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.guidance <= 100.0:
            raise ValueError(f"guidance must be in [0, 100], got {self.guidance}")

    @property
    def is_guided(self) -> bool:
        return self.guidance != 1.0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def row_key(seed: int, idx: str, sample: int) -> int:
    """A 62-bit key naming one image: the same (seed, idx, sample) always gives the same key.

    62 bits (two 32-bit lanes, the high one 30 bits wide so the key fits a signed int64) make two
    distinct rows sharing their noise vanishingly unlikely even over billions of images.
    """
    digest = hashlib.blake2b(f"{seed}\x1f{idx}\x1f{sample}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def row_keys(seed: int, idxs: Sequence[str], samples: Sequence[int], device=None) -> torch.Tensor:
    """(B,) int64 keys for rows (idx, sample) of one run."""
    return torch.tensor([row_key(seed, i, s) for i, s in zip(idxs, samples)], dtype=torch.int64, device=device)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors that hold uint32 values."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def uniform_noise(keys: torch.Tensor, step: int, size: int) -> torch.Tensor:
    """(B, size) uniforms in (0, 1), a pure function of (key, step, code); keys (B,) from `row_key`."""
    low, high = keys & _MASK32, keys >> 32  # (B,), (B,): the key's two lanes
    step_key = _fmix32(torch.tensor((step * 0x9E3779B9 + 0x7F4A7C15) & _MASK32, device=keys.device))
    base = _fmix32(low ^ step_key)  # (B,)
    codes = torch.arange(size, device=keys.device, dtype=torch.int64)  # (V,)
    h = _fmix32((base[:, None] + codes[None, :] * 0x632BE5AB) & _MASK32)  # (B, V)
    h = _fmix32(h ^ _fmix32(high ^ 0x2545F491)[:, None])
    h = _fmix32(h ^ low[:, None])
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits (B, V)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keeps at least one
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_codes(logits: torch.Tensor, keys: torch.Tensor, step: int, sampling: SamplingConfig) -> torch.Tensor:
    """Pick one image code per row from logits (B, V_img) -> (B,) int64."""
    logits = logits.float()
    if sampling.is_greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    gumbel = -torch.log(-torch.log(uniform_noise(keys, step, logits.size(-1))))
    return (logits + gumbel).argmax(dim=-1)


def guided_logits(logits: torch.Tensor, guidance: float) -> torch.Tensor:
    """(2B, V) logits of [conditional rows; null rows] -> (B, V) fp32 `u + S (c - u)`."""
    c, u = logits.float().chunk(2)  # (B, V), (B, V)
    return u + guidance * (c - u)


def null_caption(text_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The null caption (every position [PAD]) for each row of text_ids (B, Tt)."""
    return torch.full_like(text_ids, pad_id)


@torch.inference_mode()
def generate(gpt: GPT, text_ids: torch.Tensor, keys: torch.Tensor, sampling: SamplingConfig, *,
             null_ids: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
             keep: torch.Tensor | None = None) -> torch.Tensor:
    """Image codes (B, img_len) for text_ids (B, text_len): prefill once, then one token per step.

    Guided sampling (sampling.guidance != 1) needs `null_ids` (B, text_len) and runs 2B rows with one
    cache. `prefix` (B, img_len) codes with `keep` (B,) counts force each row's first keep[b] codes.
    """
    img_len, guided = gpt.config.img_len, sampling.is_guided
    if guided and null_ids is None:
        raise ValueError("guided sampling needs the null caption's ids (null_ids)")
    B = text_ids.size(0)
    codes = torch.empty(B, img_len, dtype=torch.int64, device=text_ids.device)
    cache = gpt.new_cache()
    rows = torch.cat([text_ids, null_ids]) if guided else text_ids  # (2B or B, Tt)
    logits = gpt(gpt.sequence(rows), cache)[:, -1]  # (2B or B, V_img)
    for step in range(img_len):
        step_logits = guided_logits(logits, sampling.guidance) if guided else logits  # (B, V_img)
        chosen = choose_codes(step_logits, keys, step, sampling)  # (B,)
        if prefix is not None:
            chosen = torch.where(keep > step, prefix[:, step], chosen)
        codes[:, step] = chosen
        if step + 1 < img_len:
            fed = codes[:, step:step + 1]  # (B, 1)
            logits = gpt(torch.cat([fed, fed]) if guided else fed, cache)[:, -1]  # (2B or B, V_img)
    return codes


@torch.inference_mode()
def reference_generate(gpt: GPT, text_ids: torch.Tensor, keys: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The reference's algorithm: recompute the whole sequence at every step (no cache).

    Kept for tests (cache equivalence) and as the benchmark baseline; same randomness as `generate`.
    """
    seq = gpt.sequence(text_ids)  # (B, Tt)
    for step in range(gpt.config.img_len):
        logits = gpt(seq)[:, -1]  # (B, V_img)
        seq = torch.cat([seq, choose_codes(logits, keys, step, sampling)[:, None]], dim=1)
    return seq[:, text_ids.size(1):]
