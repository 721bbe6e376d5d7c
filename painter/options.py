"""Job options as dataclasses, turned into command-line arguments and back.

Each job declares one `@dataclass(kw_only=True)` whose fields carry their help text (`option(default, "help")`);
`add_arguments` makes `--field-name` flags from it and `from_args` rebuilds the dataclass, so an
option is defined once and the same dataclass is written into the job's artifacts.
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


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one flag per field of dataclass `cls`, with its help and default shown."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        base, is_optional, is_list = _unwrap(hints[f.name])
        meta = f.metadata
        kwargs: dict[str, Any] = {"help": meta.get("help", "")}
        if f.name == STORAGE_FIELD:
            kwargs["help"] += f"; or {ENV_PREFIX}NAME or {FILE_PREFIX}PATH naming where the JSON is (credentials go only there)"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        required = default is dataclasses.MISSING
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if base is bool and not is_list:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
            if is_list:
                kwargs["nargs"] = "+" if required else "*"
            kwargs["metavar"] = f.name.upper()
        if meta.get("positional"):
            parser.add_argument(f.name, **kwargs)
            continue
        if not required:
            kwargs["default"] = default
            if default not in (None, False, []):
                kwargs["help"] += f" (default: {default})"
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        parser.add_argument(flag, dest=f.name, required=required, **kwargs)


def from_args(cls, namespace: argparse.Namespace):
    """Rebuild dataclass `cls` from parsed arguments."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


def to_dict(options) -> dict:
    """JSON-ready dict of an options dataclass, for run manifests, model configs and summaries.

    A `storage_options` field is written as its source (`env:NAME`, `@PATH` or credential-free JSON),
    never as the options it resolves to; a literal that names a credential is withheld.
    """
    values = dataclasses.asdict(options)
    if isinstance(values.get(STORAGE_FIELD), str):
        values[STORAGE_FIELD] = storage_options_source(values[STORAGE_FIELD])
    return values


# --- --storage-options: inline JSON without credentials, or an indirect source ---------------------















