"""The `painter` command line: one subcommand per job or tool, options generated from dataclasses.

Each command names a module with an options dataclass and a `run(options) -> dict` function; this
file parses arguments, starts Ray for the jobs that need it (local unless RAY_ADDRESS is set), and
prints the run's summary as one JSON object on the last line. A `PainterError` becomes a one-line
reason (also the last line, as JSON) and a non-zero exit.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util  # not loaded by `import importlib`; the console script has no runpy to load it
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

# Ray 2.60 authenticates with a token by default; the mode must be in the environment before Ray is
# imported (the stage modules import it), or a local start fails with InvalidAuthToken.
os.environ.setdefault("RAY_AUTH_MODE", "token")

from painter.errors import PainterError
from painter.options import add_arguments, from_args


@dataclass(frozen=True)
class Command:
    module: str  # holds `Options` (a dataclass) and `run(options) -> dict`
    help: str
    uses_ray: bool = False


COMMANDS = {
    "tokenize": Command("painter.stages.tokenize", "encode TSV/Parquet image corpora into VQGAN token shards", True),
    "train": Command("painter.stages.train", "fine-tune the GPT on token shards with Ray Train (DDP)", True),
    "train-vq": Command("painter.stages.train_vq", "train the VQGAN of a model directory on an image corpus (stage 1)", True),
    "generate": Command("painter.stages.generate", "generate images for a table of texts into partitioned output", True),
    "new-model": Command("painter.commands", "write a randomly initialised model directory from a preset"),
    "import-easynlp": Command("painter.commands", "import an EasyNLP pai-painter-*-zh directory"),
    "import-vqgan": Command("painter.commands", "import a taming-transformers VQGAN checkpoint"),
    "export-easynlp": Command("painter.commands", "export a model directory in EasyNLP's pai-painter layout"),
    "easynlp": Command("painter.easynlp", "EasyNLP text2image command lines (--mode train|evaluate|predict), unchanged", True),
    "demo": Command("painter.stages.demo", "the whole system on the synthetic task: corpus, tokenize, train, generate, evaluate", True),
    "make-corpus": Command("painter.stages.make_corpus", "write a synthetic Chinese-captioned image corpus (EasyNLP TSV)"),
    "evaluate": Command("painter.stages.evaluate", "score a model: caption accuracy on the synthetic task, FID/IS, VQGAN reconstruction", True),
}


def _load(name: str):
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="painter", description="Chinese text-to-image generation as batch jobs on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in available_commands():
        options_cls, _ = _load(name)
        p = sub.add_parser(name, help=COMMANDS[name].help, description=COMMANDS[name].help)
        add_arguments(p, options_cls)
    return parser


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as inside `ray job submit`), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **quiet)


def run_command(name: str, options) -> dict:
    """Run one command in-process and return its summary (what `main` prints)."""
    _, run = _load(name)
    if COMMANDS[name].uses_ray:
        init_ray()
    return run(options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options_cls, _ = _load(args.command)
    options = from_args(options_cls, args)
    start = time.time()
    try:
        summary = run_command(args.command, options)
    except PainterError as e:
        print(json.dumps({"job": args.command, "status": "failed", "error": str(e)}, ensure_ascii=False))
        return 1
    failed = summary.pop("_failed", None)
    summary.setdefault("seconds", round(time.time() - start, 3))
    summary.setdefault("status", "failed" if failed else "succeeded")
    if failed:
        summary["error"] = failed
    print(json.dumps({"job": args.command, **summary}, ensure_ascii=False, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
