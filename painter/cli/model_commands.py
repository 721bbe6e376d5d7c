"""Small model-directory commands: `new-model`, `import-easynlp`, `export-easynlp`, `import-vqgan`."""
from __future__ import annotations

from dataclasses import dataclass

from painter.checkpoint.config import PRESETS
from painter.checkpoint.model_dir import new_model
from painter.checkpoint.model_dir import load_model
from painter.checkpoint.exporters import export_easynlp, shape_note
from painter.checkpoint.importers import import_easynlp, import_vqgan
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


def run_new_model(o: NewModelOptions) -> dict:
    return {"model": new_model(o.preset, o.output, seed=o.seed, vocab=o.vocab), "preset": o.preset}


def run_import_easynlp(o: ImportEasyNLPOptions) -> dict:
    return {"model": import_easynlp(o.src, o.dst, text_len=o.text_len, resolution=o.resolution, n_head=o.n_head)}


def run_export_easynlp(o: ExportEasyNLPOptions) -> dict:
    summary = {"output": export_easynlp(o.model, o.dst)}
    note = shape_note(load_model(o.model, parts=()).config)
    return summary | ({"note": note} if note else {})


def run_import_vqgan(o: ImportVQGANOptions) -> dict:
    return {"model": import_vqgan(o.ckpt, o.dst, resolution=o.resolution, text_len=o.text_len,
                                  gpt_preset=o.gpt_preset, vocab=o.vocab)}


COMMANDS = {
    "new-model": (NewModelOptions, run_new_model),
    "import-easynlp": (ImportEasyNLPOptions, run_import_easynlp),
    "export-easynlp": (ExportEasyNLPOptions, run_export_easynlp),
    "import-vqgan": (ImportVQGANOptions, run_import_vqgan),
}
