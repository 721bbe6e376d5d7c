"""`Generator`: the plain callable that turns a batch of (idx, text, sample) rows into images.

It owns one loaded model and runs tokenize-text -> static-shape decoding (`painter.engine`, CUDA
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

Encoding overlaps the model: each chunk's pixels go to a thread pool (Pillow releases the GIL while
compressing) while the next chunk is sampled. On CUDA the host does not wait for a chunk's pixels
before queueing the next chunk's work: inputs go up from pinned memory, pixels come back as uint8
into pinned memory behind a CUDA event, and a chunk is handed to the encoders once the next one is
queued, so the GPU always has work while the host tokenizes, launches and encodes.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from painter.checkpoint import LoadedModel, load_model
from painter.engine import DecodeEngine
from painter.io.images import IMAGE_FORMATS, PIXEL_ROUNDING, encode_image, uint8_on_device
from painter.runtime import check_precision, inference_copy, inference_dtype, pick_device
from painter.sampling import SamplingConfig, row_keys

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
    pixel_rounding: str = "round"  # or "truncate", as EasyNLP (painter.io.images)

    def __post_init__(self):
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format {self.image_format!r} is not one of {IMAGE_FORMATS}")
        check_precision(self.precision)
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
    (see the module docstring); `encode_threads` sizes the image-encoding pool (0: encode inline);
    `compile_sampler` is `DecodeEngine`'s (same images; measured by benchmarks/gpu.sh).
    """

    def __init__(self, model: str | LoadedModel, config: GenerationConfig | None = None, device=None, *,
                 micro_batch: int | None = None, encode_threads: int | None = None, compile_sampler: bool = False):
        self.device = pick_device(device)
        self.model = model if isinstance(model, LoadedModel) else load_model(model, device=self.device)
        if self.model.gpt is None or self.model.vqgan is None:
            raise ValueError("Generator needs a model loaded with both its GPT and its VQGAN")
        self.config = config or GenerationConfig()
        self.micro_batch = micro_batch or default_micro_batch(self.device)
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")
        self.dtype = inference_dtype(self.device, self.config.precision)
        self.gpt = inference_copy(self.model.gpt, self.dtype)
        self.vqgan = inference_copy(self.model.vqgan, self.dtype, channels_last=self.device.type == "cuda")
        self._engine: DecodeEngine | None = None  # built (and on CUDA captured) on first use
        self.compile_sampler = compile_sampler
        threads = default_encode_threads(self.device) if encode_threads is None else encode_threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="encode") if threads > 0 else None

    @property
    def engine(self) -> DecodeEngine:
        if self._engine is None:
            self._engine = DecodeEngine(self.gpt, self.config.sampling, self.micro_batch,
                                        compile_sampler=self.compile_sampler)
        return self._engine

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """Host int array -> int64 device tensor; on CUDA from pinned memory, without waiting for the GPU
        (int64 already on the host: a copy that also converts would stage through pageable memory)."""
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def codes(self, texts, idxs, samples) -> tuple[torch.Tensor, np.ndarray]:
        """Image codes (B, img_len) and is_truncated (B,) for rows named by (idx, sample), computed as given.

        B must be the micro-batch (the engine's shape). On CUDA the codes may still be being computed."""
        ids, is_truncated = self.model.tokenizer.encode_batch([str(t) for t in texts])
        keys = row_keys(self.config.seed, [str(i) for i in idxs], [int(s) for s in samples])
        return self.engine(self._to_device(ids), self._to_device(keys.numpy())), is_truncated

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

    def images(self, texts, idxs, samples) -> tuple[list[bytes], np.ndarray]:
        """Encoded images and is_truncated for any number of rows, in fixed-shape micro-batches.

        Each chunk's pixels are collected only after the next chunk is queued (see the module docstring)."""
        texts, idxs, samples = list(texts), list(idxs), [int(s) for s in samples]
        pending, truncated, previous = [], [], None
        for start in range(0, len(texts), self.micro_batch):
            n = min(start + self.micro_batch, len(texts)) - start
            chunk = [_padded(column[start:start + n], self.micro_batch) for column in (texts, idxs, samples)]
            codes, is_truncated = self.codes(*chunk)
            truncated.append(is_truncated[:n])
            pixels_later = self._pixels_later(codes)
            if previous is not None:
                pending.append(self._start_encoding(previous[0]()[:previous[1]]))
            previous = (pixels_later, n)
        if previous is not None:
            pending.append(self._start_encoding(previous[0]()[:previous[1]]))
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
