"""The command registry: which module runs each `painter` subcommand, which holds its options, and running
one in this process.

Each command names two modules. Its options dataclass lives in `painter.options` (`options`, written
`module:Class`, the class `Options` unless named), which loads neither torch, Ray nor pyarrow: the parser
is built from it alone, so `painter <command> --help` and `--print-config` take a fraction of a second. The
module that runs it (`module`) holds `run(options) -> dict` (or, for several small commands, a `COMMANDS`
dict of run functions) and optionally `preflight(options)`; it is imported only to run the command.
`painter demo` runs the other jobs through their modules, so nothing below the CLI needs to import the CLI.
"""
from __future__ import annotations

import importlib
import importlib.util  # not loaded by `import importlib`; the console script has no runpy to load it
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # runs it: `run(options) -> dict` (or a `COMMANDS` dict of them) and optionally `preflight`
    options: str  # "module:Class" of its options dataclass, under painter.options (Class: `Options` if left out)
    help: str
    uses_ray: bool = False
    # what a run stopped part-way (SIGTERM, SIGINT) leaves, and the rerun that completes it
    after_stop: str = "the work finished so far is kept: rerun the same command to complete it"


RESUME = "its last checkpoint is kept: rerun the same command with --resume to continue from it"
MODELS, MODEL_OPTIONS = "painter.cli.model_commands", "painter.options.model_commands"
COMMANDS = {
    "tokenize": Command("painter.stages.tokenize", "painter.options.tokenize",
                        "encode image corpora (TSV, Parquet, CSV, WebDataset, image folders) into VQGAN token shards",
                        True, "the shards written so far are not a whole output: rerun the same command with "
                        "--overwrite to start again"),
    "train": Command("painter.stages.train", "painter.options.train",
                     "fine-tune the GPT on token shards with Ray Train (DDP)", True, RESUME),
    "train-vq": Command("painter.stages.train_vq", "painter.options.train_vq",
                        "train the VQGAN of a model directory on an image corpus (stage 1)", True, RESUME),
    "generate": Command("painter.stages.generate", "painter.options.generate",
                        "generate images for a table of texts into partitioned output", True),
    "new-model": Command(MODELS, f"{MODEL_OPTIONS}:NewModelOptions",
                         "write a randomly initialised model directory from a preset"),
    "import-easynlp": Command(MODELS, f"{MODEL_OPTIONS}:ImportEasyNLPOptions",
                              "import an EasyNLP pai-painter-*-zh directory"),
    "import-vqgan": Command(MODELS, f"{MODEL_OPTIONS}:ImportVQGANOptions",
                            "import a taming-transformers VQGAN checkpoint"),
    "export-easynlp": Command(MODELS, f"{MODEL_OPTIONS}:ExportEasyNLPOptions",
                              "export a model directory in EasyNLP's pai-painter layout"),
    "easynlp": Command("painter.easynlp.modes", "painter.options.easynlp",
                       "EasyNLP text2image command lines (--mode train|evaluate|predict), unchanged", True),
    "demo": Command("painter.stages.demo", "painter.options.demo",
                    "the whole system on the synthetic task: corpus, tokenize, train, generate, evaluate", True),
    "make-corpus": Command("painter.stages.make_corpus", "painter.options.make_corpus",
                           "write a synthetic Chinese-captioned image corpus (EasyNLP TSV)"),
    "evaluate": Command("painter.stages.evaluate", "painter.options.evaluate",
                        "score a model: caption accuracy on the synthetic task, FID/IS, VQGAN reconstruction", True,
                        "its results are written at the end, so none are kept: rerun the same command"),
    "serve": Command("painter.stages.serve", "painter.options.serve",
                     "serve /v1/images and the review page (Ray Serve) on the current Ray", True,
                     "decisions are kept as they are made: start it again to go on"),
    "export-approved": Command("painter.stages.export_approved", "painter.options.export_approved",
                               "write a night's approved pictures and a manifest CSV"),
}


def options_of(name: str) -> type:
    """The options dataclass of command `name`, its run module left unloaded."""
    module, _, cls = COMMANDS[name].options.partition(":")
    return getattr(importlib.import_module(module), cls or "Options")


def runner_of(name: str):
    """The module that runs command `name` (its `run`, `preflight`), imported now."""
    return importlib.import_module(COMMANDS[name].module)


def run_of(name: str):
    """The run function of command `name`: `run(options) -> dict`."""
    module = runner_of(name)
    return module.COMMANDS[name] if hasattr(module, "COMMANDS") else module.run


def load(name: str):
    """(options dataclass, run function) of command `name`; loads the module that runs it."""
    return options_of(name), run_of(name)


def available_commands() -> list[str]:
    """Commands whose modules are present (jobs land one by one)."""
    names = []
    for name, command in COMMANDS.items():
        modules = (command.module, command.options.partition(":")[0])
        if all(importlib.util.find_spec(m) is not None for m in modules):
            names.append(name)
    return names


def run_command(name: str, options) -> dict:
    """Run command `name` in this process and return its summary; a command that uses Ray expects the
    caller to have started it (the CLI does, and `painter demo` runs inside the CLI's Ray)."""
    return run_of(name)(options)
