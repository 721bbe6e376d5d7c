"""Small model-directory commands: `new-model`, `import-easynlp`, `export-easynlp`, `import-vqgan` (their
options: `painter.options.model_commands`)."""
from __future__ import annotations

from painter.checkpoint.model_dir import load_model, new_model
from painter.checkpoint.exporters import export_easynlp, shape_note
from painter.checkpoint.importers import import_easynlp, import_vqgan
from painter.options.model_commands import (ExportEasyNLPOptions, ImportEasyNLPOptions, ImportVQGANOptions,
                                            NewModelOptions)


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


COMMANDS = {  # each command's run function (the registry names its options class)
    "new-model": run_new_model,
    "import-easynlp": run_import_easynlp,
    "export-easynlp": run_export_easynlp,
    "import-vqgan": run_import_vqgan,
}
