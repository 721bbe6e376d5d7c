"""Batched text-to-image token sampling: KV-cache generation and the reference's slow algorithm.

Every row draws its randomness from a counter-based hash of `(seed, idx, sample)`, the step and the
code, so the tokens of a row do not depend on which batch, worker or order produced them. Sampling
is Gumbel-max over the temperature-scaled, top-k/top-p-filtered logits, which is the same
distribution as softmax + multinomial. Pure torch; no I/O.

One tie rule everywhere: codes are ranked by their fp32 logit, higher first, and equal logits by
code, lower first (a stable descending sort). Top-k keeps the first k of that order, top-p the
shortest prefix of it holding probability top_p, and the Gumbel-max pick prefers the lower code on
an exact tie. `choose_codes` (the reference) and `sample_codes` (the engine's) both follow it, so
for the same logits they pick the same codes, in fp32 and in bf16 alike (bf16's coarse logits tie
often). Token equality between the engine and `reference_generate` is an fp32 property: under bf16
the two compute different logits (other kernels, other rounding), hence possibly other tokens; the
tie rule keeps each of them deterministic.
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

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

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


def _step_key(step: int | torch.Tensor, device) -> torch.Tensor:
    """The step's 32-bit lane: a python int or an int64 tensor already on the device (no host sync)."""
    step = torch.as_tensor(step, dtype=torch.int64, device=device)
    return _fmix32((step * 0x9E3779B9 + 0x7F4A7C15) & _MASK32)


def uniform_noise_at(keys: torch.Tensor, step: int | torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(B, n) uniforms in (0, 1) for the codes (B, n) int64 of each row: a pure function of
    (key, step, code), so drawing them for a few candidate codes gives exactly the values that
    `uniform_noise` draws for those codes. `step` is an int or a (1,)/0-dim int64 device tensor."""
    low, high = keys & _MASK32, keys >> 32  # (B,), (B,): the key's two lanes
    base = _fmix32(low ^ _step_key(step, keys.device).reshape(-1))  # (B,)
    h = _fmix32((base[:, None] + codes * 0x632BE5AB) & _MASK32)  # (B, n)
    h = _fmix32(h ^ _fmix32(high ^ 0x2545F491)[:, None])
    h = _fmix32(h ^ low[:, None])
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def uniform_noise(keys: torch.Tensor, step: int, size: int) -> torch.Tensor:
    """(B, size) uniforms in (0, 1), a pure function of (key, step, code); keys (B,) from `row_key`."""
    codes = torch.arange(size, device=keys.device, dtype=torch.int64)  # (V,)
    return uniform_noise_at(keys, step, codes.expand(keys.size(0), size))


def _outside_nucleus(sorted_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, n) bool over descending logits: True past the smallest prefix holding probability top_p."""
    probs = sorted_logits.softmax(dim=-1)
    return probs.cumsum(dim=-1) - probs >= top_p  # keeps at least one


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits (B, V).

    Both are taken in stable descending order (the module's tie rule): of equal logits straddling the
    k-th, the lower codes are kept, so exactly k remain."""
    if top_k is not None and top_k < logits.size(-1):
        order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k]  # (B, k)
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # (B, V)
        drop_sorted = _outside_nucleus(sorted_logits, top_p)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def rank_keys(scores: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """int64 keys (B, n) ordering fp32 scores (B, n) of distinct codes (B, n) by the tie rule: a higher
    score first, on equal scores the lower code. Keys of distinct codes differ, so `topk` and `argmax`
    over them have no ties left to break their own way.

    key = r(score) * 2**32 + (2**32 - 1 - code), where r is the score's bit pattern as an int32, its
    low 31 bits flipped when negative (then integer order is float order), -0.0 read as 0.0."""
    bits = torch.where(scores == 0, 0.0, scores).view(torch.int32).to(torch.int64)  # (B, n)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the score, in [-2**31, 2**31)
    return ordered * (1 << 32) + (_MASK32 - codes)


def top_k_by_rule(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, codes), each (B, k): the k codes the tie rule keeps of scores (B, V), at `topk`'s cost plus
    one pass over V. `topk` keeps the right values but, of codes tied with the k-th value, whichever it
    likes; those slots (the last ones: values descend) get the lowest tied codes instead, found by
    binary search in the running count of tied codes. Fixed shapes, no host sync."""
    values, codes = torch.topk(scores, k, dim=-1)  # (B, k), values descending
    kth = values[:, -1:]  # (B, 1)
    count = torch.int32  # a bool's cumsum in int64 costs 6x the int32 one on CPU
    tied_count = (scores == kth).to(count).cumsum(dim=-1, dtype=count)  # (B, V): tied codes at or below each
    tied_slot = values == kth  # (B, k): topk's slots holding a code tied with the k-th
    nth_tied = tied_slot.to(count).cumsum(dim=-1, dtype=count)  # (B, k): 1, 2, ... over those slots
    lowest = torch.searchsorted(tied_count, nth_tied.clamp(min=1))  # (B, k): the n-th lowest tied code
    return values, torch.where(tied_slot, lowest, codes)


def choose_codes(logits: torch.Tensor, keys: torch.Tensor, step: int, sampling: SamplingConfig) -> torch.Tensor:
    """Pick one image code per row from logits (B, V_img) -> (B,) int64: the reference's sampler,
    with noise for every code. `sample_codes` picks the same codes drawing noise for the candidates only.

    Ties follow the module's rule (stable descending order; `argmax` returns the first, lowest, code)."""
    logits = logits.float()
    if sampling.is_greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    gumbel = -torch.log(-torch.log(uniform_noise(keys, step, logits.size(-1))))
    return (logits + gumbel).argmax(dim=-1)


def sample_codes(logits: torch.Tensor, keys: torch.Tensor, step: int | torch.Tensor,
                 sampling: SamplingConfig) -> torch.Tensor:
    """The codes `choose_codes` picks, (B,) int64, with noise hashed for the top-k candidates only.

    Gumbel-max over the candidates: the top-k codes (or, without top-k, the whole vocabulary, sorted
    when top-p needs it), top-p applied to their sorted logits, noise from `uniform_noise_at` for
    those codes alone, so the per-step cost is O(B*k) hashes instead of O(B*V). The top-k
    (`top_k_by_rule`) and the final pick (`rank_keys`) follow the module's tie rule, so ties fall as in
    `choose_codes`, not as `topk` happens to break them. Device-side only, no branching on tensor values: it runs inside
    a captured CUDA graph with `step` a device tensor.
    """
    logits = logits.float()  # (B, V)
    if sampling.is_greedy:
        return logits.argmax(dim=-1)
    scaled = logits / sampling.temperature
    B, V = scaled.shape
    nucleus = sampling.top_p is not None and sampling.top_p < 1.0
    if sampling.top_k is not None and sampling.top_k < V:
        values, codes = top_k_by_rule(scaled, sampling.top_k)  # (B, k)
        if nucleus:  # the nucleus is a prefix of the rank order: order the k candidates by the rule
            order = rank_keys(values, codes).argsort(dim=-1, descending=True)  # (B, k)
            values, codes = values.gather(-1, order), codes.gather(-1, order)
    elif nucleus:
        values, codes = torch.sort(scaled, dim=-1, descending=True, stable=True)  # (B, V)
    else:
        values, codes = scaled, torch.arange(V, device=scaled.device).expand(B, V)  # (B, V)
    if nucleus:
        values = values.masked_fill(_outside_nucleus(values, sampling.top_p), float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise_at(keys, step, codes)))  # (B, k)
    best = rank_keys(values + gumbel, codes).argmax(dim=-1, keepdim=True)  # (B, 1)
    return codes.gather(-1, best).squeeze(-1)  # (B,)


def guided_logits(logits: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: (2B, V) logits of [conditional rows; null-caption rows] -> (B, V) fp32
    `u + S (c - u)`. S = 0 gives the null rows' logits exactly; S = 1 is not computed (the caller then
    runs the conditional rows alone, which is exact where this would round). Device ops only."""
    c, u = logits.float().chunk(2)  # (B, V), (B, V)
    return u + guidance * (c - u)


@torch.inference_mode()
def generate(gpt: GPT, text_ids: torch.Tensor, keys: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Image codes (B, img_len) for text_ids (B, text_len): prefill once, then one token per step."""
    img_len = gpt.config.img_len
    codes = torch.empty(text_ids.size(0), img_len, dtype=torch.int64, device=text_ids.device)
    cache = gpt.new_cache()
    logits = gpt(gpt.sequence(text_ids), cache)[:, -1]  # (B, V_img)
    for step in range(img_len):
        codes[:, step] = choose_codes(logits, keys, step, sampling)
        if step + 1 < img_len:
            logits = gpt(codes[:, step:step + 1], cache)[:, -1]  # (B, V_img)
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
