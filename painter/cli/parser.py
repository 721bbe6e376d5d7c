"""The command line's parser: `painter [--version] COMMAND [options]`, `--config FILE.yaml`, `--print-config`.

Only the options of the command being run are loaded (`painter.cli.registry`), never a job module, so
`painter --help`, `painter --version` and `painter COMMAND --help` import neither torch nor Ray. A command's
options come from its options dataclass (`painter.options.<job>`); a YAML file given with `--config`
supplies any of them by name (`micro_batch` or `micro-batch`), the command line winning over the file and
the file over the defaults. `--print-config` prints the resolved options as YAML (a file `--config` takes
back) and runs nothing.
"""
from __future__ import annotations

import argparse
import dataclasses

from painter import __version__
from painter.cli import registry
from painter.cli.outcomes import UsageParser
from painter.cli.registry import COMMANDS, available_commands
from painter.errors import InputError
from painter.options import add_arguments, to_dict, upgrade

DESCRIPTION = "Chinese text-to-image generation as batch jobs on Ray."


def _top(loaded: dict[str, type]) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = UsageParser(prog="painter", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"painter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in available_commands():
        p = sub.add_parser(name, help=COMMANDS[name].help, description=COMMANDS[name].help)
        if name in loaded:
            _command_arguments(p, loaded[name])
    return parser, sub


def _command_arguments(p: argparse.ArgumentParser, options_cls, config: dict | None = None) -> None:
    add_arguments(p, options_cls, config or {})
    p.add_argument("--config", metavar="FILE.yaml",
                   help="read options from a YAML file of option names and values; the command line wins")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved options as YAML (a file --config takes) and run nothing")
    p.add_argument("--debug", action="store_true", help="on failure, also print the traceback to stderr")


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser with every command's options (or only `commands`')."""
    names = available_commands() if commands is None else commands
    return _top({name: registry.options_of(name) for name in names})[0]


def _command_of(argv: list[str]) -> str | None:
    """The command named in `argv` (its first word that is not an option), if it is one."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def read_config(path: str, options_cls) -> dict:
    """The options a YAML file gives, by field name (one written under an option's former name, e.g. train's
    `batch_size`, read as today's: `painter.options.upgrade`); a key that is no option of the command is an error."""
    import yaml  # only where a config file is used

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"--config {path}: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise InputError(f"--config {path}: expected a mapping of option names to values")
    fields = {f.name for f in dataclasses.fields(options_cls)}
    given = upgrade(options_cls, {str(k).replace("-", "_"): v for k, v in values.items()})
    unknown = sorted(k for k in given if k not in fields)
    if unknown:
        raise InputError(f"--config {path}: {', '.join(unknown)} {'is not an option' if len(unknown) == 1 else 'are not options'}"
                         f" of this command")
    return given


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse a command line, loading only the command it names; exits 2 with argparse's message on bad usage."""
    name = _command_of(argv)
    if name is None:  # --help, --version, or an unknown command: argparse says which
        return _top({})[0].parse_args(argv)
    options_cls = registry.options_of(name)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config_path = pre.parse_known_args(argv[argv.index(name) + 1:])[0].config
    parser, sub = _top({})
    try:
        config = read_config(config_path, options_cls) if config_path else {}
    except InputError as e:
        parser.error(str(e))
    _command_arguments(sub.choices[name], options_cls, config)
    return parser.parse_args(argv)


def config_text(options) -> str:
    """The resolved options as YAML, as `--print-config` shows them (credentials withheld, as in every record)."""
    import yaml

    return yaml.safe_dump(to_dict(options), sort_keys=False, allow_unicode=True)
