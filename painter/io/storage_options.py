"""`--storage-options`: where credentials come from (`env:NAME`, `@PATH`, inline JSON), which keys are
credentials, and keeping their values out of every printed line."""
from __future__ import annotations
import json
import os
import re
from typing import Any
from painter.errors import InputError


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


def read_source(text: str, flag: str, *, what: str = "the JSON") -> str:
    """The text behind an indirect source: `env:NAME` (an environment variable) or `@PATH` (a file, local or
    any fsspec URL, read with the environment's credentials). Errors name the source, never the value."""
    from painter.io.retries import fsspec_module

    fsspec = fsspec_module()

    where = f"{flag} {text}"
    if text.startswith(ENV_PREFIX):
        name = text[len(ENV_PREFIX):]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise InputError(f"{where}: {name!r} is not an environment variable name")
        value = os.environ.get(name)
        if not value:
            raise InputError(f"{where}: the variable is not set (or empty) in this process's environment; "
                             "it must be set on every Ray node that reads it")
        return value
    if not text.startswith(FILE_PREFIX):
        raise InputError(f"{flag} must be {ENV_PREFIX}NAME or {FILE_PREFIX}PATH naming where {what} is")
    path = text[len(FILE_PREFIX):]
    if not path:
        raise InputError(f"{where}: no file named after '@'")
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{where}: cannot read it ({type(e).__name__})") from None


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
    if text.startswith((ENV_PREFIX, FILE_PREFIX)):
        return _json_object(read_source(text, "--storage-options"), f"--storage-options {text}")
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


def secrets_of(options) -> list[str]:
    """Credential values this run knows (its --storage-options and the AWS environment), to keep out of
    every line it prints."""
    values = [os.environ.get(k) for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")]
    try:
        given = parse_storage_options(getattr(options, STORAGE_FIELD, None))
    except Exception:  # a malformed source is reported by the job itself
        given = {}
    stack = [given]
    while stack:
        item = stack.pop()
        for key, value in item.items():
            if isinstance(value, dict):
                stack.append(value)
            elif is_credential(key) and value:
                values.append(str(value))
    token = getattr(options, "token", None)  # `painter serve --token SOURCE`: the token itself
    if isinstance(token, str) and token.startswith((ENV_PREFIX, FILE_PREFIX)):
        try:
            values.append(read_source(token, "--token").strip())
        except Exception:  # reported by the command itself
            pass
    return sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


