"""The command registry: which module holds each `painter` subcommand, and running one in this process.

Each command names a module with an options dataclass `Options` and `run(options) -> dict` (or a module
holding several small commands in its own `COMMANDS`). The CLI builds its parser from this registry and
`painter demo` runs the other jobs through it, so nothing below the CLI needs to import the CLI.
Modules are imported only when a command is loaded.
"""
from __future__ import annotations

import importlib
import importlib.util  # not loaded by `import importlib`; the console script has no runpy to load it
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # holds `Options` (a dataclass) and `run(options) -> dict`
    help: str
    uses_ray: bool = False
    # what a run stopped part-way (SIGTERM, SIGINT) leaves, and the rerun that completes it
    after_stop: str = "the work finished so far is kept: rerun the same command to complete it"


RESUME = "its last checkpoint is kept: rerun the same command with --resume to continue from it"
COMMANDS = {
    "tokenize": Command("painter.stages.tokenize", "encode image corpora (TSV, Parquet, CSV, WebDataset, image "
                        "folders) into VQGAN token shards", True,
                        "the shards written so far are not a whole output: rerun the same command with --overwrite "
                        "to start again"),
    "train": Command("painter.stages.train", "fine-tune the GPT on token shards with Ray Train (DDP)", True, RESUME),
    "train-vq": Command("painter.stages.train_vq", "train the VQGAN of a model directory on an image corpus (stage 1)", True,
                        RESUME),
    "generate": Command("painter.stages.generate", "generate images for a table of texts into partitioned output", True),
    "new-model": Command("painter.cli.model_commands", "write a randomly initialised model directory from a preset"),
    "import-easynlp": Command("painter.cli.model_commands", "import an EasyNLP pai-painter-*-zh directory"),
    "import-vqgan": Command("painter.cli.model_commands", "import a taming-transformers VQGAN checkpoint"),
    "export-easynlp": Command("painter.cli.model_commands", "export a model directory in EasyNLP's pai-painter layout"),
    "easynlp": Command("painter.easynlp.modes", "EasyNLP text2image command lines (--mode train|evaluate|predict), unchanged", True),
    "demo": Command("painter.stages.demo", "the whole system on the synthetic task: corpus, tokenize, train, generate, evaluate", True),
    "make-corpus": Command("painter.stages.make_corpus", "write a synthetic Chinese-captioned image corpus (EasyNLP TSV)"),
    "evaluate": Command("painter.stages.evaluate", "score a model: caption accuracy on the synthetic task, FID/IS, VQGAN reconstruction", True,
                        "its results are written at the end, so none are kept: rerun the same command"),
    "serve": Command("painter.stages.serve", "serve /v1/images and the review page (Ray Serve) on the current Ray", True,
                     "decisions are kept as they are made: start it again to go on"),
    "export-approved": Command("painter.stages.export_approved", "write a night's approved pictures and a manifest CSV"),
}


def load(name: str):
    """(options dataclass, run function) of command `name`."""
    module = importlib.import_module(COMMANDS[name].module)
    if hasattr(module, "COMMANDS"):  # a module holding several small commands
        return module.COMMANDS[name]
    return module.Options, module.run


def available_commands() -> list[str]:
    """Commands whose module is present (jobs land one by one)."""
    names = []
    for name, command in COMMANDS.items():
        if importlib.util.find_spec(command.module) is not None:
            names.append(name)
    return names


def run_command(name: str, options) -> dict:
    """Run command `name` in this process and return its summary; a command that uses Ray expects the
    caller to have started it (the CLI does, and `painter demo` runs inside the CLI's Ray)."""
    _, run = load(name)
    return run(options)
