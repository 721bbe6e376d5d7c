"""The quick Python entry: `pipeline("text2image_generation", model_dir)(texts)`, EasyNLP style.

Returns one dict per text with `text` and `gen_imgbase64` (standard base64 PNG; a list when
samples > 1). A row's image depends only on (seed, text, sample): the text is the row's idx.
"""
from __future__ import annotations

import base64

from PIL import Image

from painter.checkpoint.model_dir import BUNDLED, load_model, zoo_name
from painter.inference.generator import GenerationConfig, Generator
from painter.io.images import open_image
from painter.runtime import pick_device

TASKS = ("text2image_generation",)


class TextToImagePipeline:
    """Engine settings (model, device; precision and micro-batch by device) are fixed when it is built and
    served by one `Generator`, built on the first call and kept; each call's sampling settings (seed,
    temperature, top-k/p, guidance, candidates) reconfigure it (`Generator.reconfigure`), as vLLM keeps
    EngineArgs apart from SamplingParams. So the weight copies, the encoding threads and the decode
    engines already built (CUDA graphs, one per sampling and steering) are reused across calls."""

    def __init__(self, model_dir: str, device=None, guidance: float | None = None):
        self.device = pick_device(device)
        self.model = load_model(model_dir, device=self.device)
        self.guidance = guidance  # the calls' default guidance scale (None: the Generator's default)
        self.generator: Generator | None = None

    def _generator(self, config: GenerationConfig) -> Generator:
        if self.generator is None:
            self.generator = Generator(self.model, config, self.device)
        return self.generator.reconfigure(config)

    def _generate(self, texts, samples, config: GenerationConfig) -> list[list[bytes]]:
        if isinstance(texts, str):
            texts = [texts]
        rows = [(t, s) for t in texts for s in range(samples)]
        batch = {"idx": [t for t, _ in rows], "text": [t for t, _ in rows], "sample": [s for _, s in rows]}
        images = self._generator(config)(batch)[config.image_format]
        return [list(images[i * samples:(i + 1) * samples]) for i in range(len(texts))]

    def __call__(self, texts, *, samples: int = 1, seed: int = 0, temperature: float = 1.0,
                 top_k: int | None = 100, top_p: float | None = None, guidance: float | None = None,
                 candidates: int = 1) -> list[dict]:
        """One dict per text: {"text", "gen_imgbase64"}; top_k=1 is greedy decoding; guidance S and
        candidates N as `painter generate --guidance S --candidates N`."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        config = GenerationConfig(seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
                                  guidance=self.guidance if guidance is None else guidance, candidates=candidates)
        results = []
        for text, pngs in zip(texts, self._generate(texts, samples, config)):
            encoded = [base64.b64encode(p).decode("ascii") for p in pngs]
            results.append({"text": text, "gen_imgbase64": encoded[0] if samples == 1 else encoded})
        return results

    def images(self, texts, *, samples: int = 1, **kwargs) -> list[list[Image.Image]]:
        """The same generation as PIL images: one list of `samples` images per text."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        config = GenerationConfig(**({"guidance": self.guidance} | kwargs))
        return [[open_image(p) for p in pngs] for pngs in self._generate(texts, samples, config)]


def pipeline(task: str, model_dir: str | None = None, device=None, *, guidance: float | None = None
             ) -> TextToImagePipeline:
    """A text-to-image callable on `model_dir` (a path, `s3://` prefix, model-zoo name, or None for the
    bundled model, which draws the synthetic task's captions, e.g. "白色背景中间的一个大的红色圆形");
    `guidance` is its classifier-free guidance scale (default: the model's, see `painter.inference.generator`).

    As in EasyNLP, a zoo name alone names both: `pipeline("pai-painter-commercial-base-zh")` (or
    `"alibaba-pai/pai-painter-commercial-base-zh"`) is text2image_generation with that model."""
    if model_dir is None and zoo_name(task):
        task, model_dir = TASKS[0], task

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return TextToImagePipeline(model_dir or BUNDLED, device=device, guidance=guidance)
