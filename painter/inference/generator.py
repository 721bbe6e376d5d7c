"""`Generator`: the plain callable that turns a batch of (idx, text, sample) rows into images.

It owns one loaded model and runs tokenize-text -> static-shape decoding (`painter.inference.engine`, CUDA
graphs on a GPU) -> batched VQGAN decode -> image encoding. Precision: bf16 weights on CUDA (a
converted copy; the VQGAN also channels_last), fp32 on CPU, or as `GenerationConfig.precision` says.
It runs and tests without Ray; `painter.stages.generate` puts it in an actor pool and
`painter.pipeline` calls it directly.

Reproducibility: a row's randomness comes from (seed, idx, sample), and the model always computes
in chunks of exactly `micro_batch` rows (the last chunk of a batch is padded by repeating its last
row; padded outputs are dropped). Kernels choose their algorithm by tensor shape (oneDNN uses another
convolution for a batch of one, cuBLAS picks GEMM tiles per shape), so a fixed shape is what makes an
image byte-identical whatever batch, worker or order it came in. The micro-batch size is therefore
part of what names an image, like the seed; it defaults by device (`default_micro_batch`).

Guidance, reranking and image prompts steer the same engine (`painter.inference.engine.Steering`): `guidance` S
runs each row under its caption and under the null caption (all [PAD]) as 2B model rows with one
cache and samples from `u + S (c - u)` (S = 1 runs the plain engine: exactly the conditional tokens;
S = 0 samples the null caption); `candidates` N draws each (idx, sample) N times with derived keys
(`painter.inference.rerank.candidate_keys`) and keeps the best by the model's own caption-vs-null likelihood
ratio (or `scorer`, a user's image-text model file), returned as the `score` column; an input
column `prompt_image` (encoded image bytes, or base64 text) with `keep_rows` K forces the first K
token rows to that image's VQGAN codes and generates the rest. A micro-batch of R rows is always
R x N candidates (x 2 when guided), so shapes stay fixed and the kept image depends on (seed, idx,
sample) alone.

Encoding overlaps the model: each chunk's pixels go to a thread pool (Pillow releases the GIL while
compressing) while the next chunk is sampled. On CUDA the host does not wait for a chunk's pixels
before queueing the next chunk's work: inputs go up from pinned memory, pixels come back as uint8
into pinned memory behind a CUDA event, and a chunk is handed to the encoders once the next one is
queued, so the GPU always has work while the host tokenizes, launches and encodes.
"""
from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from painter import logs
from painter.inference import rerank
from painter.checkpoint.model_dir import LoadedModel, load_model, read_bytes
from painter.inference.engine import DecodeEngine, Steering
from painter.io.images import PROMPT_COLUMN, IMAGE_FORMATS, PIXEL_ROUNDING, ImageRejected, encode_image, image_bytes, load_image, preprocess
from painter.inference.pixels import uint8_on_device
from painter.runtime import check_precision, inference_copy, inference_dtype, pick_device
from painter.inference.sampling import SamplingConfig, guided_logits

# The guidance scale when none is given, for a model trained with caption dropout (others: 1, unguided).
# Chosen by measurement on the bundled model (docs/demo.md, "Guidance, reranking and image prompts").
DEFAULT_GUIDANCE = 1.5

MICRO_BATCH_DEFAULTS = {"cpu": 8, "cuda": 64}
ENCODE_THREADS_MAX = {"cpu": 8, "cuda": 16}  # a 256x256 PNG is ~6-16 ms of one core: a GPU needs many


def default_micro_batch(device: torch.device | str) -> int:
    """Rows per model call when none is given: small on CPU, enough to fill a GPU."""
    return MICRO_BATCH_DEFAULTS.get(torch.device(device).type, MICRO_BATCH_DEFAULTS["cpu"])


def default_encode_threads(device: torch.device | str) -> int:
    """Image-encoding threads when none are given: one per core, up to 8 on CPU and 16 on CUDA."""
    return min(ENCODE_THREADS_MAX.get(torch.device(device).type, 8), os.cpu_count() or 1)


@dataclass
class GenerationConfig:
    seed: int = 0
    temperature: float = 1.0
    top_k: int | None = 100
    top_p: float | None = None
    image_format: str = "png"
    precision: str | None = None  # "fp32" or "bf16"; None: bf16 on CUDA, fp32 on CPU
    guidance: float | None = None  # guidance scale S (1: plain sampling); None: DEFAULT_GUIDANCE for guidable models
    candidates: int = 1  # images drawn per (idx, sample); the best-scored one is kept
    scorer: str | None = None  # image-text scorer file (.pt2 / TorchScript) instead of the model's own score
    keep_rows: int = 0  # token rows of a row's prompt image kept (the rest generated)
    pixel_rounding: str = "round"  # or "truncate", as EasyNLP (painter.io.images)

    def __post_init__(self):
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format {self.image_format!r} is not one of {IMAGE_FORMATS}")
        check_precision(self.precision)
        if self.guidance is not None and not 0.0 <= self.guidance <= 100.0:
            raise ValueError(f"guidance must be in [0, 100], got {self.guidance}")
        if self.candidates < 1 or self.keep_rows < 0:
            raise ValueError(f"candidates must be >= 1 and keep_rows >= 0, got {self.candidates}, {self.keep_rows}")
        if self.pixel_rounding not in PIXEL_ROUNDING:
            raise ValueError(f"pixel rounding {self.pixel_rounding!r} is not one of {PIXEL_ROUNDING}")
        self.sampling  # validates temperature, top_k and top_p now rather than on the first batch

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


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
    (see the module docstring); `encode_threads` sizes the image-encoding pool (0: encode inline);
    `compile_sampler` is `DecodeEngine`'s (same images; measured by benchmarks/gpu.sh). A model
    directory and the scorer file are read through `storage` (a `painter.io.storage.Storage`).
    """

    def __init__(self, model: str | LoadedModel, config: GenerationConfig | None = None, device=None, *,
                 micro_batch: int | None = None, encode_threads: int | None = None, compile_sampler: bool = False,
                 storage=None):
        self.device = pick_device(device)
        self.model = (model if isinstance(model, LoadedModel)
                      else load_model(model, device=self.device, storage=storage))
        if self.model.gpt is None or self.model.vqgan is None:
            raise ValueError("Generator needs a model loaded with both its GPT and its VQGAN")
        self.config = config or GenerationConfig()
        self.micro_batch = micro_batch or default_micro_batch(self.device)
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")
        self.dtype = inference_dtype(self.device, self.config.precision)
        self.gpt = inference_copy(self.model.gpt, self.dtype)
        # NCHW: CUDA's GroupNorm works on NCHW only, so a channels_last decoder converts around every norm;
        # benchmarks/generate.py --decoder-layouts times both (and torch.compile) for the first GPU run to decide
        self.vqgan = inference_copy(self.model.vqgan, self.dtype)
        self._engines: dict[tuple, DecodeEngine] = {}  # per sampling and steering; built (on CUDA captured) on first use
        self.compile_sampler = compile_sampler
        threads = default_encode_threads(self.device) if encode_threads is None else encode_threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="encode") if threads > 0 else None
        self.guidable = self.model.config.null_caption_prob > 0
        self._storage = storage
        self.scorer, self._scorer_file = None, None
        self.reconfigure(self.config)

    def reconfigure(self, config: GenerationConfig) -> "Generator":
        """Take `config`'s per-call settings (seed, sampling, guidance, candidates, scorer, prompt rows,
        image format) for the next calls, keeping what the engine settings (model, device, precision,
        micro-batch) built: the weight copies, the encoding pool and every decode engine already
        captured. The precision is an engine setting: a config naming another one is refused."""
        if inference_dtype(self.device, config.precision) != self.dtype:
            raise ValueError(f"this Generator computes in {self.dtype}; precision {config.precision!r} needs another")
        self.config = config
        self.guidance = self._guidance()
        if config.scorer != self._scorer_file:
            self.scorer = None if not config.scorer else rerank.load_scorer(
                read_bytes(config.scorer, self._storage), self.device, config.scorer)
            self._scorer_file = config.scorer
        side = math.isqrt(self.model.config.gpt.img_len)
        self.keep_codes = config.keep_rows * side
        if self.keep_codes > self.model.config.gpt.img_len:
            raise ValueError(f"keep_rows {config.keep_rows} is more than the image's {side} token rows")
        return self

    def _guidance(self) -> float:
        """The guidance scale in force: the config's, else DEFAULT_GUIDANCE for a guidable model, else 1."""
        guidance = self.config.guidance
        if guidance is None:
            return DEFAULT_GUIDANCE if self.guidable else 1.0
        if guidance != 1.0 and not self.guidable:
            logs.get("generate").warning(f"{self.model.path} was trained without caption dropout "
                                         f"(train --null-caption-prob); --guidance {guidance} may not help")
        return guidance

    @property
    def sampling(self) -> SamplingConfig:
        return self.config.sampling

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0

    @property
    def reranks(self) -> bool:
        return self.config.candidates > 1

    @property
    def engine(self) -> DecodeEngine:
        """The decode engine for micro_batch x candidates rows (x 2 model rows when guided)."""
        sampling = self.config.sampling
        key = (sampling.temperature, sampling.top_k, sampling.top_p, self.guidance, self.config.candidates,
               self.keep_codes > 0)
        if key not in self._engines:
            combine = functools.partial(guided_logits, guidance=self.guidance) if self.guided else None
            steering = Steering(rows_per_sample=2 if self.guided else 1, combine=combine, forcing=self.keep_codes > 0)
            self._engines[key] = DecodeEngine(self.gpt, sampling, self.micro_batch * self.config.candidates,
                                              steering=steering, compile_sampler=self.compile_sampler)
        return self._engines[key]

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """Host int array -> int64 device tensor; on CUDA from pinned memory, without waiting for the GPU
        (int64 already on the host: a copy that also converts would stage through pageable memory)."""
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def codes(self, texts, idxs, samples, prompts=None) -> tuple[torch.Tensor, np.ndarray, torch.Tensor | None]:
        """Image codes (B, img_len), is_truncated (B,) and scores (B,) (None without reranking) for rows
        named by (idx, sample), computed as given; `prompts` (B,) prompt image cells or None.

        B must be the micro-batch (the engine's shape). On CUDA the codes may still be being computed."""
        n, tokenizer = self.config.candidates, self.model.tokenizer
        ids, is_truncated = tokenizer.encode_batch([str(t) for t in texts])
        ids = np.repeat(ids, n, axis=0)  # (B*n, Tt): each row's candidates together
        null = np.full_like(ids, tokenizer.pad_id)  # the null caption
        keys = rerank.candidate_keys(self.config.seed, [str(i) for i in idxs], [int(s) for s in samples], n)  # (B*n,)
        forced_codes, forced_mask = self.forced(prompts, n)
        model_ids = np.concatenate([ids, null]) if self.guided else ids  # (2Bn or Bn, Tt)
        codes = self.engine(self._to_device(model_ids), self._to_device(keys.numpy()), forced_codes, forced_mask)
        if not self.reranks:
            return codes, is_truncated, None
        scores = self.score(self._to_device(ids), codes, self._to_device(null))  # (B*n,)
        rows = torch.arange(len(texts), device=codes.device) * n + rerank.best_of(scores, n)  # (B,)
        return codes[rows], is_truncated, scores[rows]

    def score(self, text_ids: torch.Tensor, codes: torch.Tensor, null_ids: torch.Tensor) -> torch.Tensor:
        """(B,) scores of candidate codes (B, img_len): the user's scorer, else the model's own."""
        if self.scorer is not None:
            with torch.inference_mode():
                images = self.vqgan.decode(codes).float().clamp(-1, 1)  # (B, 3, H, W)
            return self.scorer(images, text_ids)
        return rerank.likelihood_score(self.gpt, text_ids, codes, null_ids if self.guidable else None).float()

    @torch.inference_mode()
    def prompt_codes(self, cell) -> torch.Tensor:
        """(img_len,) VQGAN codes of one prompt image cell, encoded alone (batch 1), so a prompt's codes
        do not depend on the rows beside it; ImageRejected if unusable."""
        array, reason = preprocess(cell, self.model.config.image_size, is_base64=isinstance(cell, str))
        if reason is not None:
            raise ImageRejected(f"prompt image: {reason}")
        return self.model.vqgan.encode(torch.from_numpy(array)[None].to(self.device))[0]

    @torch.inference_mode()
    def forced(self, prompts, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(forced codes (B*n, img_len), forced mask (B*n, img_len)) from the rows' prompt images: the
        first keep_rows token rows of each image's VQGAN codes; None, None without any. A missing cell
        keeps nothing; an unusable image raises ImageRejected (the generate stage rejects those first)."""
        if prompts is None or self.keep_codes == 0 or all(p is None for p in prompts):
            return None, None
        img_len = self.model.config.gpt.img_len
        codes = torch.zeros(len(prompts), img_len, dtype=torch.int64, device=self.device)
        keep = np.zeros(len(prompts), dtype=np.int64)
        for i, cell in enumerate(prompts):
            if cell is not None:
                codes[i], keep[i] = self.prompt_codes(cell), self.keep_codes
        mask = torch.arange(img_len, device=self.device)[None, :] < torch.from_numpy(keep).to(self.device)[:, None]
        return codes.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)

    @torch.inference_mode()
    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, img_len) codes -> (B, H, W, 3) uint8 on the device, as `config.pixel_rounding` says."""
        return uint8_on_device(self.vqgan.decode(codes), self.config.pixel_rounding)  # decode: (B, 3, H, W)

    def pixels(self, codes: torch.Tensor) -> np.ndarray:
        """(B, img_len) codes -> (B, H, W, 3) uint8, decoding the given rows in one call."""
        return self._decode(codes).cpu().numpy()

    def _pixels_later(self, codes: torch.Tensor):
        """Start decoding `codes`; returns a function giving the (B, H, W, 3) uint8 array when called."""
        pixels = self._decode(codes)
        if self.device.type != "cuda":
            return lambda: pixels.numpy()
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()

        def wait() -> np.ndarray:
            ready.synchronize()
            return host.numpy()
        return wait

    def _encode(self, pixels: np.ndarray) -> list[bytes]:
        return [encode_image(p, self.config.image_format) for p in pixels]

    def _start_encoding(self, pixels: np.ndarray):
        return self._pool.submit(self._encode, pixels) if self._pool else self._encode(pixels)

    def images(self, texts, idxs, samples, prompts=None) -> tuple[list[bytes], np.ndarray, np.ndarray | None]:
        """Encoded images, is_truncated and scores (None without reranking) for any number of rows, in
        fixed-shape micro-batches.

        Each chunk's pixels are collected only after the next chunk is queued (see the module docstring)."""
        texts, idxs, samples = list(texts), list(idxs), [int(s) for s in samples]
        prompts = [None] * len(texts) if prompts is None else list(prompts)
        pending, truncated, scores, previous = [], [], [], None
        for start in range(0, len(texts), self.micro_batch):
            n = min(start + self.micro_batch, len(texts)) - start
            chunk = [_padded(column[start:start + n], self.micro_batch) for column in (texts, idxs, samples, prompts)]
            codes, is_truncated, score = self.codes(*chunk)
            truncated.append(is_truncated[:n])
            if score is not None:
                scores.append(score[:n])
            pixels_later = self._pixels_later(codes)
            if previous is not None:
                pending.append(self._start_encoding(previous[0]()[:previous[1]]))
            previous = (pixels_later, n)
        if previous is not None:
            pending.append(self._start_encoding(previous[0]()[:previous[1]]))
        encoded = [image for part in pending for image in (part.result() if self._pool else part)]
        kept_scores = None
        if self.reranks:
            kept_scores = torch.cat(scores).float().cpu().numpy() if scores else np.zeros(0, dtype=np.float32)
        return encoded, np.concatenate(truncated) if truncated else np.zeros(0, dtype=bool), kept_scores

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
