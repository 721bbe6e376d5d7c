"""Job options as dataclasses, turned into command-line arguments and back.

Each job declares one `@dataclass(kw_only=True)` whose fields carry their help text (`option(default, "help")`);
`add_arguments` makes `--field-name` flags from it and `from_args` rebuilds the dataclass, so an
option is defined once and the same dataclass is written into the job's artifacts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import types
import typing
from typing import Any

from painter.errors import InputError


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

STORAGE_FIELD = "storage_options"
ENV_PREFIX, FILE_PREFIX = "env:", "@"
# Option names (lower case, letters and digits only) that are or hold credentials in fsspec's
# backends: s3fs key/secret/token and botocore's aws_*_key*/session_token, adlfs account_key,
# sas_token, client_secret and connection_string, gcsfs token, sftp password/pkey, http auth headers.
CREDENTIAL_NAMES = frozenset({"key", "pkey", "sas"})
CREDENTIAL_PARTS = ("secret", "token", "password", "passwd", "credential", "accesskey", "accountkey",
                    "privatekey", "apikey", "connectionstring", "auth")
HOW_TO_PASS = ("a command line is not private (ray job list, the job's log and ps show it): put the JSON in a "
               "file and pass --storage-options @/path/options.json, or in an environment variable of the Ray "
               "nodes (a Kubernetes secret) and pass --storage-options env:NAME")


def is_credential(name: str) -> bool:
    """True when option name `name` is, or may hold, a credential (any case, `-`/`_` ignored)."""
    plain = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return plain in CREDENTIAL_NAMES or any(part in plain for part in CREDENTIAL_PARTS)


def credential_keys(value: Any, prefix: str = "") -> list[str]:
    """Dotted names of the keys in JSON `value` that name credentials, nested ones included
    (`client_kwargs.aws_secret_access_key`)."""
    found = []
    if isinstance(value, dict):
        for name, inner in value.items():
            path = f"{prefix}{name}"
            found += [path] if is_credential(name) else credential_keys(inner, path + ".")
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            found += credential_keys(inner, f"{prefix}{i}.")
    return found


def _json_object(text: str, where: str) -> dict:
    """The JSON object in `text`; errors say where it is malformed, never what it says."""
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where} is not valid JSON (line {e.lineno}, column {e.colno})") from None
    if not isinstance(parsed, dict):
        raise InputError(f"{where} must be a JSON object")
    return parsed


def _from_env(name: str) -> dict:
    where = f"--storage-options {ENV_PREFIX}{name}"
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise InputError(f"{where}: {name!r} is not an environment variable name")
    text = os.environ.get(name)
    if not text:
        raise InputError(f"{where}: the variable is not set (or empty) in this process's environment; "
                         "it must be set on every Ray node that reads or writes storage")
    return _json_object(text, where)


def _from_file(path: str) -> dict:
    """The JSON object in file `path` (local or any fsspec URL, read with the environment's credentials)."""
    import fsspec

    where = f"--storage-options {FILE_PREFIX}{path}"
    if not path:
        raise InputError(f"{where}: no file named after '@'")
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{where}: cannot read it ({type(e).__name__})") from None
    return _json_object(text, where)


def parse_storage_options(text: str | None) -> dict:
    """`--storage-options`: fsspec/s3fs options, or {} when not given. The text is one of
    - `env:NAME`: environment variable NAME holds the JSON object (a Kubernetes secret as an env var);
    - `@PATH`: file PATH holds it (a mounted secret; local or an fsspec URL);
    - a JSON object without credentials (endpoint_url, region, ...): one with any is refused, since
      the command line shows in `ray job list`, the job's log and `ps`.
    Errors report where the JSON is malformed or which key is refused, never a value.
    """
    if not text or not text.strip():
        return {}
    text = text.strip()
    if text.startswith(ENV_PREFIX):
        return _from_env(text[len(ENV_PREFIX):])
    if text.startswith(FILE_PREFIX):
        return _from_file(text[len(FILE_PREFIX):])
    parsed = _json_object(text, "--storage-options")
    refused = credential_keys(parsed)
    if refused:
        raise InputError(f"--storage-options: {', '.join(refused)} {'is a credential' if len(refused) == 1 else 'are credentials'} "
                         f"and {HOW_TO_PASS}")
    return parsed


def storage_options_source(text: str | None) -> str | None:
    """What may be recorded of `--storage-options` text: an indirect source as given, a credential-free
    JSON object as given, anything else withheld."""
    if text is None:
        return None
    stripped = text.strip()
    if not stripped or stripped.startswith((ENV_PREFIX, FILE_PREFIX)):
        return text
    try:
        parsed = json.loads(stripped)
    except json.JSONDecodeError:
        return "<withheld: not valid JSON>"
    return "<withheld: holds credentials>" if credential_keys(parsed) else text
