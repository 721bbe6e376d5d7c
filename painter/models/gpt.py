"""The text-to-image GPT: a minGPT decoder over [text tokens, image tokens] with a KV cache.

Two caches: `KVCache` grows with the sequence (training-time checks, the reference comparison), and
`StaticKVCache` is preallocated at full length and written at a position tensor, so that
`GPT.forward_static` has the same shapes and the same kernels at every step (what a CUDA graph needs).
`forward_static` attends over the cache's first `length` positions only, `length` a python int fixed
per call site, so a decode loop reads the filled part of the cache, not all `block_size` positions.

Parameter names follow the reference (EasyNLP pai-painter `transformer.*`, itself minGPT): separate
`key`/`query`/`value`/`proj` linears, `ln1`/`ln2`, `mlp.0`/`mlp.2`, `ln_f`, a `pos_emb` parameter and a
bias-free `head` that scores image codes only. Text ids enter the embedding offset by
`img_vocab_size`, so one table holds both vocabularies. Pure torch: no I/O, no global settings.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from painter.models.config import GPTConfig  # noqa: F401 (torch-free, for the command line; re-exported here)


class KVCache:
    """Keys and values of every layer for a batch, preallocated to the full sequence length.

    Buffers are allocated on first use with the dtype and device of the keys written, so the same
    cache serves fp32 and autocast (bf16) inference.
    """

    def __init__(self, config: GPTConfig):
        self.max_length = config.block_size
        self.keys: list[torch.Tensor | None] = [None] * config.n_layer
        self.values: list[torch.Tensor | None] = [None] * config.n_layer
        self.length = 0  # positions filled so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nh, t, hs) at the next positions; return all keys and values so far."""
        if self.keys[layer] is None:
            B, nh, _, hs = k.shape
            self.keys[layer] = k.new_empty(B, nh, self.max_length, hs)  # (B, nh, T_max, hs)
            self.values[layer] = v.new_empty(B, nh, self.max_length, hs)
        start, t = self.length, k.size(2)
        self.keys[layer][:, :, start:start + t] = k
        self.values[layer][:, :, start:start + t] = v
        end = start + t
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class StaticKVCache:
    """Keys and values (n_layer, B, nh, T_max, hs), zero-filled, written at positions given as a tensor.

    Zeros rather than empty memory: positions not yet written are masked out of attention, and a
    masked NaN would still poison the softmax-weighted sum.
    """

    def __init__(self, config: GPTConfig, batch: int, dtype: torch.dtype, device: torch.device | str):
        shape = (config.n_layer, batch, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_positions = torch.arange(config.block_size, device=device)  # (T_max,)

    def mask(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """(T, length) bool over the first `length` keys: query at positions[i] sees every key at or before it."""
        return self.key_positions[None, :length] <= positions[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.key = nn.Linear(config.n_embd, config.n_embd)
        self.query = nn.Linear(config.n_embd, config.n_embd)
        self.value = nn.Linear(config.n_embd, config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_drop = nn.Dropout(config.resid_pdrop)

    def _heads(self, x):
        """(B, T, C) -> q, k, v each (B, nh, T, hs)."""
        B, T, C = x.size()
        nh = self.n_head
        return (lin(x).view(B, T, nh, C // nh).transpose(1, 2) for lin in (self.query, self.key, self.value))

    def _merge(self, y, x):
        return self.resid_drop(self.proj(y.transpose(1, 2).contiguous().view_as(x)))  # (B, T, C)

    def forward_static(self, x, cache: StaticKVCache, layer: int, positions: torch.Tensor, mask: torch.Tensor):
        """x (B, T, C) at `positions` (T,); writes k, v there and attends over the cache's first L
        positions under `mask` (T, L)."""
        q, k, v = self._heads(x)  # (B, nh, T, hs)
        keys, values = cache.keys[layer], cache.values[layer]  # (B, nh, T_max, hs)
        keys.index_copy_(2, positions, k)
        values.index_copy_(2, positions, v)
        length = mask.size(-1)
        y = F.scaled_dot_product_attention(q, keys[:, :, :length], values[:, :, :length], attn_mask=mask)
        return self._merge(y, x)  # (B, T, C)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        T = x.size(1)
        q, k, v = self._heads(x)  # (B, nh, T, hs)
        past = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, past+T, hs)
        dropout = self.attn_pdrop if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif T == 1:  # one new token sees every cached position
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # several new tokens after a cached prefix
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self._merge(y, x)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.GELU(),
            nn.Linear(4 * config.n_embd, config.n_embd),
            nn.Dropout(config.resid_pdrop),
        )

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))

    def forward_static(self, x, cache: StaticKVCache, layer: int, positions: torch.Tensor, mask: torch.Tensor):
        x = x + self.attn.forward_static(self.ln1(x), cache, layer, positions, mask)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.block_size, config.n_embd))
        self.drop = nn.Dropout(config.embd_pdrop)
        self.blocks = nn.Sequential(*[Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.img_vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)

    def sequence(self, text_ids: torch.Tensor, image_codes: torch.Tensor | None = None):
        """Embedding ids for [text, image]: text_ids (B, Tt) tokenizer ids, image_codes (B, Ti)."""
        seq = text_ids.long() + self.config.img_vocab_size  # (B, Tt)
        if image_codes is not None:
            seq = torch.cat([seq, image_codes.long()], dim=1)  # (B, Tt+Ti)
        return seq

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) embedding ids -> the last block's output (B, T, C), before `ln_f` and the head.

        With a cache, idx holds only the new positions, which continue at `cache.length`.
        """
        B, T = idx.size()
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} exceeds block_size {self.config.block_size}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, start:start + T])  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        return x

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) embedding ids -> logits over image codes (B, T, img_vocab_size); see `hidden`."""
        return self.head(self.ln_f(self.hidden(idx, cache)))  # (B, T, img_vocab_size)

    def image_logits(self, text_ids: torch.Tensor, image_codes: torch.Tensor) -> torch.Tensor:
        """Logits (B, Ti, img_vocab_size) predicting each image code from the text and the codes before it.

        One forward of [text, image[:-1]]; `ln_f` and the head run on the Ti positions that predict image
        codes only (the text positions before them predict nothing that is scored).
        """
        seq = self.sequence(text_ids, image_codes)  # (B, Tt+Ti)
        x = self.hidden(seq[:, :-1])[:, text_ids.size(1) - 1:]  # (B, Ti, C): position p predicts p+1
        return self.head(self.ln_f(x))  # (B, Ti, img_vocab_size)

    def forward_static(self, idx: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
                       length: int | None = None) -> torch.Tensor:
        """idx (B, T) embedding ids at `positions` (T,) int64 on the device -> the next code's logits
        (B, img_vocab_size), scored at the last position only.

        Attention reads the cache's first `length` positions (default `block_size`): every position
        written so far, these included, must lie below it; the keys past a query's position are masked,
        so any `length` that covers them gives the same result. Fixed shapes for a fixed `length` and no
        host synchronisation: the same call serves the prefill (positions 0..T-1) and each decode step
        (one position), and can be captured in a CUDA graph.
        """
        mask = cache.mask(positions, self.config.block_size if length is None else length)  # (T, L)
        x = self.drop(self.tok_emb(idx) + self.pos_emb[0].index_select(0, positions))  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block.forward_static(x, cache, layer, positions, mask)
        return self.head(self.ln_f(x[:, -1]))  # (B, img_vocab_size)

    def loss(self, text_ids: torch.Tensor, image_codes: torch.Tensor,
             targets: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token cross-entropy on the image positions only (the reference's objective).

        `targets` (B, Ti) default to `image_codes`; training with pkeep < 1 feeds corrupted codes
        as input and scores the clean ones.
        """
        targets = image_codes if targets is None else targets
        logits = self.image_logits(text_ids, image_codes)  # (B, Ti, V_img)
        return F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1).long())

    def new_cache(self) -> KVCache:
        return KVCache(self.config)

    def new_static_cache(self, batch: int) -> StaticKVCache:
        """A full-length cache for `batch` rows in the dtype and on the device of the weights."""
        weight = self.head.weight
        return StaticKVCache(self.config, batch, weight.dtype, weight.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token at full context (6N training / 2N inference rule of thumb)."""
        c = self.config
        n = self.num_params() - self.tok_emb.weight.numel() - self.pos_emb.numel()
        return 2 * n + 2 * c.n_layer * c.block_size * c.n_embd


def attention_mask_keys(config: GPTConfig) -> list[str]:
    """Names of the reference's causal-mask buffers: in its state dicts, but not weights here."""
    return [f"blocks.{i}.attn.mask" for i in range(config.n_layer)]
