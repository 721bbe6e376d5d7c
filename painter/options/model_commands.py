"""The options of the small model-directory commands, `new-model`, `import-easynlp`, `export-easynlp` and
`import-vqgan` (which `painter.cli.model_commands` runs)."""
from __future__ import annotations

from dataclasses import dataclass

from painter.checkpoint.config import PRESETS
from painter.options import option


@dataclass(kw_only=True)
class NewModelOptions:
    preset: str = option("tiny", "model shape to initialise", choices=tuple(PRESETS))
    output: str = option(help="model directory to write (local path or s3://)")
    seed: int = option(0, "seed of the random initialisation")
    vocab: str | None = option(None, "vocab.txt to use instead of the generated default vocab")


@dataclass(kw_only=True)
class ImportEasyNLPOptions:
    src: str = option(help="EasyNLP model directory (config.json, pytorch_model.bin, vocab.txt)", positional=True)
    dst: str = option(help="painter model directory to write", positional=True)
    text_len: int = option(32, "text tokens per prompt")
    resolution: int = option(256, "image size the VQGAN was trained at")
    n_head: int | None = option(None, "attention heads, when neither config.json nor the width tells")


@dataclass(kw_only=True)
class ExportEasyNLPOptions:
    model: str = option(help="painter model directory (or zoo name) to export", positional=True)
    dst: str = option(help="EasyNLP model directory to write (config.json, pytorch_model.bin, vocab.txt)",
                      positional=True)


@dataclass(kw_only=True)
class ImportVQGANOptions:
    ckpt: str = option(help="taming-transformers checkpoint (last.ckpt)", positional=True)
    dst: str = option(help="painter model directory to write", positional=True)
    resolution: int = option(256, "image size the VQGAN was trained at")
    text_len: int = option(32, "text tokens per prompt")
    gpt_preset: str = option("base", "shape of the GPT to train on this VQGAN", choices=tuple(PRESETS))
    vocab: str | None = option(None, "vocab.txt (default: the generated vocab)")

