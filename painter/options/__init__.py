"""Job options as dataclasses, turned into command-line arguments and back.

Each job declares one `@dataclass(kw_only=True)` whose fields carry their help text (`option(default, "help")`),
in this package's module for it (`painter.options.tokenize`, ...: no torch, Ray or pyarrow, so a command's
`--help` loads nothing else); `add_arguments` makes `--field-name` flags from it and `from_args` rebuilds
the dataclass, so an option is defined once and the same dataclass is written into the job's artifacts
(`to_dict`). A field renamed since artifacts were written is listed in its class's `RENAMED` (old name ->
new), and `upgrade` is the one place a stored record (`train.json`, a `--print-config` file) is read
under today's names.

The same name means the same thing in every job: `--micro-batch` is rows per model call on the device
(a training step's micro-batch, a VQGAN or feature-network pass, a generator's fixed shape), and
`--batch-size` rows per actor call (generate only).
"""
from __future__ import annotations


import argparse
import dataclasses
import types
import typing
from typing import Any

from painter.io.storage_options import ENV_PREFIX, FILE_PREFIX, STORAGE_FIELD, storage_options_source


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           choices: tuple | None = None, positional: bool = False):
    """A dataclass field with its command-line help. List defaults are copied per instance."""
    metadata = {"help": help, "flag": flag, "choices": choices, "positional": positional}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)



DEFAULT_MAX_ERROR_RATE = 0.05


def max_error_rate_option():
    """`--max-error-rate`, the same default and meaning in every job that reads rows."""
    return option(DEFAULT_MAX_ERROR_RATE,
                  "fail the run, after writing everything else and the rejected rows, when a larger fraction of the "
                  "rows read is rejected; the same in every job: more than 1 row in 20 unusable is more often a wrong "
                  "input or schema than bad rows")


def _unwrap(annotation) -> tuple[type, bool, bool]:
    """(base type, is_optional, is_list) of a field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        base, _, is_list = _unwrap(inner[0])
        return base, True, is_list
    if origin in (list, tuple):
        return (args[0] if args else str), False, True
    return annotation, False, False


def add_arguments(parser: argparse.ArgumentParser, cls, config: dict | None = None) -> None:
    """Add one flag per field of dataclass `cls`, with its help, its choices and its default shown (a value
    from `config`, a `--config` file's, replaces the default and satisfies a required option)."""
    hints = typing.get_type_hints(cls)
    config = config or {}
    for f in dataclasses.fields(cls):
        base, is_optional, is_list = _unwrap(hints[f.name])
        meta = f.metadata
        kwargs: dict[str, Any] = {"help": meta.get("help", "")}
        if f.name == STORAGE_FIELD:
            kwargs["help"] += f"; or {ENV_PREFIX}NAME or {FILE_PREFIX}PATH naming where the JSON is (credentials go only there)"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name in config:
            default = _config_value(config[f.name], base, is_list)
        required = default is dataclasses.MISSING
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
            kwargs["help"] += f" (one of: {', '.join(map(str, meta['choices']))})"
        if base is bool and not is_list:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
            if is_list:
                kwargs["nargs"] = "+" if required else "*"
            kwargs["metavar"] = f.name.upper()
        if not required:
            kwargs["default"] = default
            if default is not None and default != []:
                kwargs["help"] += f" (default: {_shown(default)})"
        if meta.get("positional"):
            parser.add_argument(f.name, **kwargs | ({"nargs": "?"} if not required else {}))
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        parser.add_argument(flag, dest=f.name, required=required, **kwargs)


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _config_value(value, base: type, is_list: bool):
    """A `--config` value as the flag would have parsed it: a list for a list option, the field's type."""
    if is_list:
        return [base(v) for v in (value if isinstance(value, list) else [value])]
    return value if value is None or base is bool else base(value)


def from_args(cls, namespace: argparse.Namespace):
    """Rebuild dataclass `cls` from parsed arguments."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


def upgrade(cls, values: dict) -> dict:
    """`values` (a stored record of `cls`'s options, by field name) under today's names: a field renamed since it
    was written (`cls.RENAMED`: old name -> new) is read under its new name, unless the record has both."""
    renamed = getattr(cls, "RENAMED", {})
    return {(renamed[k] if k in renamed and renamed[k] not in values else k): v for k, v in values.items()}


def from_record(cls, values: dict):
    """Options dataclass `cls` from a stored record of it (`to_dict`'s output, as `train.json` keeps it):
    renamed fields read under today's names (`upgrade`), fields no longer options left out, today's default
    for a field the record lacks."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in upgrade(cls, values).items() if k in names})


def to_dict(options) -> dict:
    """JSON-ready dict of an options dataclass, for run manifests, model configs and summaries.

    A `storage_options` field is written as its source (`env:NAME`, `@PATH` or credential-free JSON),
    never as the options it resolves to; a literal that names a credential is withheld.
    """
    values = dataclasses.asdict(options)
    if isinstance(values.get(STORAGE_FIELD), str):
        values[STORAGE_FIELD] = storage_options_source(values[STORAGE_FIELD])
    return values
