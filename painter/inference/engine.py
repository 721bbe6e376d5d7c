"""The decode loop that keeps a GPU busy: static shapes, on-device sampling, one CUDA graph per step.

`DecodeEngine` owns, for one micro-batch shape, a `StaticKVCache`, the code buffer and a step
counter that lives on the device. A micro-batch is: copy the text ids and row keys in, run the
prefill (the text positions, then sample code 0), then `img_len - 1` steps (feed code s-1 at its
position, sample code s). Nothing in the loop reads a tensor on the host.

Each model call attends over the filled part of the cache only, rounded up to a bucket
(`kv_lengths`: multiples of `KV_GRANULE` positions, capped at block_size), so the steps fall into a
few groups of identical shapes. On CUDA the prefill and one step per bucket are each captured once as
a `torch.cuda.CUDAGraph` (all sharing one memory pool) and the loop is `img_len - 1` graph replays; on
CPU the same functions run eagerly with the same lengths. `kv_cache_bytes` counts what a row reads.

Sampling is `painter.inference.sampling.sample_codes` (noise hashed for the top-k candidates only, ties
broken by the sampling module's one rule: equal logits, lower code first). In fp32 the tokens equal
`painter.inference.sampling.reference_generate` for the same weights, text and keys; in bf16 the logits
differ from fp32's (hence possibly the tokens), while the tie rule keeps the result deterministic.

Two hooks for callers that steer decoding (`Steering`), fixed when the engine is built:
- `combine` + `rows_per_sample`: the model computes `rows_per_sample * B` rows (say conditional
  rows then null-caption rows, each block in the same order) and `combine` turns their logits
  (R, V) into the B rows that are sampled (classifier-free guidance: u + S * (c - u)). The code
  sampled for row b is fed to model rows b, b + B, b + 2B, ...
- `forcing`: `generate(..., forced_codes, forced_mask)` keeps the given code wherever the mask is
  set (image prompts: the first K token rows of an existing picture) instead of the sampled one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from painter.models.gpt import GPT, GPTConfig
from painter.inference.sampling import SamplingConfig, sample_codes

WARMUP_RUNS = 2  # eager runs on a side stream before capture: cuBLAS workspaces, lazy kernel loading
KV_GRANULE = 64  # cache positions per bucket: 5 step graphs for base/large (32 + 256 positions)


def kv_lengths(config: GPTConfig, granule: int = KV_GRANULE) -> list[int]:
    """Cache positions each model call of a micro-batch attends over: [prefill, step 1, .., step img_len-1].

    The prefill reads the text_len positions it writes. The step sampling code s reads the text and
    codes 0..s-1, text_len + s positions, rounded up to a multiple of `granule` and capped at
    block_size; the distinct lengths are the buckets, one captured step graph each. A smaller granule
    reads less (the mean overshoot is granule / 2 positions a step) for more graphs; granule >=
    block_size is one bucket, the whole cache every step. For base (32 + 256) and 64: lengths 64, 128,
    192, 256, 288, and 65% of the whole cache's reads.
    """
    if granule < 1:
        raise ValueError(f"granule must be >= 1, got {granule}")
    need = [config.text_len + s for s in range(1, config.img_len)]
    return [config.text_len] + [min(-(-n // granule) * granule, config.block_size) for n in need]


def kv_cache_bytes(config: GPTConfig, lengths: Sequence[int], element_size: int) -> int:
    """Bytes of keys and values one model row reads from the cache over calls attending over `lengths`
    positions each: 2 (K and V) x n_layer x n_embd x element_size per position read."""
    return 2 * config.n_layer * config.n_embd * element_size * sum(lengths)


@dataclass(frozen=True)
class Steering:
    """How model rows map to sampled rows, and whether some codes are given rather than sampled."""
    rows_per_sample: int = 1  # model rows R = rows_per_sample * B sampled rows
    combine: Callable[[torch.Tensor], torch.Tensor] | None = None  # (R, V) logits -> (B, V); device ops only
    forcing: bool = False  # generate() takes forced_codes / forced_mask

    def __post_init__(self):
        if self.rows_per_sample < 1:
            raise ValueError(f"rows_per_sample must be >= 1, got {self.rows_per_sample}")
        if self.rows_per_sample > 1 and self.combine is None:
            raise ValueError("rows_per_sample > 1 needs a combine function to mix the rows' logits")


class DecodeEngine:
    """`DecodeEngine(gpt, sampling, batch)(text_ids, keys) -> codes (batch, img_len)` for one fixed shape.

    `gpt` is used as given (its dtype is the compute dtype; eval mode). `cuda_graph` defaults to
    True on CUDA. `compile_sampler` runs the sampler through `torch.compile` (Inductor fuses its ~80
    small elementwise hash ops into a few kernels, which matters inside a graph whose step is
    launch-bound; same tokens, but a compile on first use), captured inside the engine's own graph.
    `kv_granule` sets the KV-length buckets (`kv_lengths`); every granule gives the same tokens, and
    block_size or more attends over the whole cache at every step (the benchmark's comparison).
    Outputs are fresh tensors; the engine's buffers are reused by the next call.
    """

    def __init__(self, gpt: GPT, sampling: SamplingConfig, batch: int, *, steering: Steering = Steering(),
                 cuda_graph: bool | None = None, compile_sampler: bool = False, kv_granule: int = KV_GRANULE):
        self.gpt, self.sampling, self.batch, self.steering = gpt.eval(), sampling, batch, steering
        config = gpt.config
        self.lengths = kv_lengths(config, kv_granule)  # per call: the prefill, then each step
        self.device = gpt.head.weight.device
        self.rows = batch * steering.rows_per_sample
        with torch.inference_mode():
            self.cache = gpt.new_static_cache(self.rows)
            self.text_ids = torch.zeros(self.rows, config.text_len, dtype=torch.int64, device=self.device)
            self.text_positions = torch.arange(config.text_len, device=self.device)  # (Tt,)
            self.keys = torch.zeros(batch, dtype=torch.int64, device=self.device)
            self.codes = torch.zeros(batch, config.img_len, dtype=torch.int64, device=self.device)
            self.step = torch.zeros(1, dtype=torch.int64, device=self.device)  # the code being sampled
            if steering.forcing:
                self.forced_codes = torch.zeros_like(self.codes)
                self.forced_mask = torch.zeros_like(self.codes, dtype=torch.bool)
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA model, got one on {self.device}")
        self._sample = torch.compile(sample_codes, fullgraph=True, dynamic=False) if compile_sampler else sample_codes
        self._graphs: tuple[torch.cuda.CUDAGraph, dict[int, torch.cuda.CUDAGraph]] | None = None
        self.replays = 0  # graph replays so far (benchmarks report replays per step)

    # -- the captured functions: device ops only, fixed shapes -------------------------------------

    def _choose(self, logits: torch.Tensor) -> None:
        """Sample code `step` from the model rows' logits (R, V) into `codes`, then advance `step`."""
        if self.steering.combine is not None:
            logits = self.steering.combine(logits)  # (B, V)
        code = self._sample(logits, self.keys, self.step, self.sampling)  # (B,)
        if self.steering.forcing:
            keep = self.forced_mask.index_select(1, self.step)[:, 0]  # (B,)
            code = torch.where(keep, self.forced_codes.index_select(1, self.step)[:, 0], code)
        self.codes.index_copy_(1, self.step, code[:, None])
        self.step.add_(1)

    def _prefill(self) -> None:
        self.step.zero_()
        ids = self.gpt.sequence(self.text_ids)  # (R, Tt)
        self._choose(self.gpt.forward_static(ids, self.text_positions, self.cache, self.lengths[0]))  # (R, V)

    def _decode_step(self, length: int) -> None:
        """Feed code step-1, sample code step, attending over the cache's first `length` positions (a
        bucket of `kv_lengths` that covers this step)."""
        previous = self.codes.index_select(1, self.step - 1)  # (B, 1): the code sampled last step
        if self.steering.rows_per_sample > 1:
            previous = previous.repeat(self.steering.rows_per_sample, 1)  # (R, 1)
        position = self.step + (self.gpt.config.text_len - 1)  # (1,): where code step-1 sits
        self._choose(self.gpt.forward_static(previous, position, self.cache, length))  # (R, V)

    # -- running ----------------------------------------------------------------------------------

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, dict[int, torch.cuda.CUDAGraph]]:
        """One graph for the prefill, one for a decode step per bucket length (the torch.cuda.graphs
        recipe: warm up on a side stream, then capture on that same stream, so cuBLAS handles and
        workspaces already exist for it). Warm-up writes only buffers that every run rewrites before
        reading (its steps stay below img_len: one per bucket, and each bucket holds a step).

        All graphs share one memory pool. That is safe because they are replayed one at a time on one
        stream and none leaves a tensor alive in the pool: everything a graph hands on (cache, codes,
        step counter) lives in the engine's buffers, allocated before capture, and the rest is
        temporaries dead when its replay ends. So the pool holds one step's temporaries, not one set
        per graph."""
        buckets = sorted(set(self.lengths[1:]))
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                self._prefill()
                for length in buckets:
                    self._decode_step(length)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()
        prefill, steps = torch.cuda.CUDAGraph(), {length: torch.cuda.CUDAGraph() for length in buckets}
        with torch.cuda.graph(prefill, pool=pool, stream=stream):
            self._prefill()
        for length, graph in steps.items():
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._decode_step(length)
        return prefill, steps

    @torch.inference_mode()
    def __call__(self, text_ids: torch.Tensor, keys: torch.Tensor, forced_codes: torch.Tensor | None = None,
                 forced_mask: torch.Tensor | None = None) -> torch.Tensor:
        """text_ids (R, text_len) tokenizer ids, keys (B,) row keys -> codes (B, img_len) int64.

        Inputs may be on the host (pinned for an asynchronous copy) or on the device.
        """
        if text_ids.shape != self.text_ids.shape or keys.shape != self.keys.shape:
            raise ValueError(f"engine built for text {tuple(self.text_ids.shape)} and keys {tuple(self.keys.shape)}, "
                             f"got {tuple(text_ids.shape)} and {tuple(keys.shape)}")
        if (forced_codes is not None or forced_mask is not None) and not self.steering.forcing:
            raise ValueError("forced codes need an engine built with Steering(forcing=True)")
        self.text_ids.copy_(text_ids, non_blocking=True)
        self.keys.copy_(keys, non_blocking=True)
        if self.steering.forcing:
            if forced_mask is None:
                self.forced_mask.zero_()
            else:
                self.forced_mask.copy_(forced_mask, non_blocking=True)
            if forced_codes is not None:
                self.forced_codes.copy_(forced_codes, non_blocking=True)
        if self.cuda_graph:
            self._run_graphs()
        else:
            self._prefill()
            for length in self.lengths[1:]:
                self._decode_step(length)
        return self.codes.clone()

    def _run_graphs(self) -> None:
        if self._graphs is None:
            self._graphs = self._capture()
        prefill, steps = self._graphs
        prefill.replay()
        for length in self.lengths[1:]:
            steps[length].replay()
        self.replays += len(self.lengths)
