"""The decode loop that keeps a GPU busy: static shapes, on-device sampling, one CUDA graph per step.

`DecodeEngine` owns, for one micro-batch shape, a `StaticKVCache`, the code buffer and a step
counter that lives on the device. A micro-batch is: copy the text ids and row keys in, run the
prefill (the text positions, then sample code 0), then `img_len - 1` identical steps (feed code s-1
at its position, sample code s). Nothing in the loop reads a tensor on the host, and every step has
the same shapes, so on CUDA the prefill and the step are each captured once as a `torch.cuda.CUDAGraph`
and the loop is `img_len - 1` graph replays. On CPU the same functions run eagerly.

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
from typing import Callable

import torch

from painter.models.gpt import GPT
from painter.inference.sampling import SamplingConfig, sample_codes

WARMUP_RUNS = 2  # eager runs on a side stream before capture: cuBLAS workspaces, lazy kernel loading


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
    Outputs are fresh tensors; the engine's buffers are reused by the next call.
    """

    def __init__(self, gpt: GPT, sampling: SamplingConfig, batch: int, *, steering: Steering = Steering(),
                 cuda_graph: bool | None = None, compile_sampler: bool = False):
        self.gpt, self.sampling, self.batch, self.steering = gpt.eval(), sampling, batch, steering
        config = gpt.config
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
        self._graphs: tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph] | None = None
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
        logits = self.gpt.forward_static(self.gpt.sequence(self.text_ids), self.text_positions, self.cache)  # (R, V)
        self._choose(logits)

    def _decode_step(self) -> None:
        previous = self.codes.index_select(1, self.step - 1)  # (B, 1): the code sampled last step
        if self.steering.rows_per_sample > 1:
            previous = previous.repeat(self.steering.rows_per_sample, 1)  # (R, 1)
        position = self.step + (self.gpt.config.text_len - 1)  # (1,): where code step-1 sits
        self._choose(self.gpt.forward_static(previous, position, self.cache))  # (R, V)

    # -- running ----------------------------------------------------------------------------------

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]:
        """One graph for the prefill, one for a decode step (the torch.cuda.graphs recipe: warm up on a
        side stream, then capture on that same stream, so cuBLAS handles and workspaces already exist
        for it). Warm-up writes only buffers that every run rewrites before reading."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                self._prefill()
                self._decode_step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        prefill, step = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(prefill, stream=stream):
            self._prefill()
        with torch.cuda.graph(step, stream=stream):
            self._decode_step()
        return prefill, step

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
            for _ in range(self.gpt.config.img_len - 1):
                self._decode_step()
        return self.codes.clone()

    def _run_graphs(self) -> None:
        if self._graphs is None:
            self._graphs = self._capture()
        prefill, step = self._graphs
        prefill.replay()
        for _ in range(self.gpt.config.img_len - 1):
            step.replay()
        self.replays += self.gpt.config.img_len
