"""WebDataset shards (`.tar`, as img2dataset writes them) read sample by sample with reasons.

A sample is the run of tar members sharing a key (the member's path up to the first dot of its name,
WebDataset's rule); each member's extension names its part (`jpg`, `txt`, `json`, ...). A sample gives
one row: `idx` from `__key__`, `text` from the `txt` member, `image` from the first of `IMAGE_MEMBERS`,
unless `--columns` names another member or a field of the `json` member (`painter.io.columns`). A
sample without one of them is a row with its reason (its key and the part it lacks); a shard that
stops being readable (cut short, not a tar) adds one row with that reason after the samples read.

Why not Ray Data's `read_webdataset`: it makes its own Dataset of samples, each file read by Ray's
datasource, and a broken shard fails the job. painter reads every input file in its own Ray task
through `painter.io.tables.iter_rows` (`painter.stages.datasets.read_input`), which is what keeps
each row's file, row number and reason; reading the tar here with Python's `tarfile` (streamed, one
pass, no seeks) keeps WebDataset input in that same mechanism. No Ray in this module.
"""
from __future__ import annotations

import json
import re
import tarfile
from typing import Iterator

from painter.io.columns import IMAGE
from painter.io.rows import REASON, ROW, SOURCE
from painter.io.storage import as_storage

KEY = "__key__"
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
DEFAULTS = {"idx": KEY, "text": "txt"}  # and IMAGE: the first of IMAGE_MEMBERS
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def samples(f) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of an open tar file, in order; tarfile's errors propagate."""
    key, parts = None, {}
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            match = _KEY_EXT.match(member.name)
            if not match:
                continue  # a member with no extension is no part of a sample
            if match.group(1) != key and key is not None:
                yield key, parts
                parts = {}
            key = match.group(1)
            data = tar.extractfile(member).read()
            if len(data) != member.size:  # tarfile's stream mode returns a member cut short as it is
                raise EOFError(f"member {member.name} cut short: {len(data)} of {member.size} bytes")
            parts[match.group(2).lower()] = data
    if key is not None:
        yield key, parts


def names(key: str, parts: dict[str, bytes]) -> list[str]:
    """The names `--columns` may use for this sample: `__key__`, its extensions and its JSON fields."""
    fields = list(_json(parts)[0] or {})
    return [KEY, *parts, *fields]


def _json(parts: dict[str, bytes]) -> tuple[dict | None, str | None]:
    if "json" not in parts:
        return None, None
    try:
        value = json.loads(parts["json"])
    except ValueError as e:
        return None, f"bad JSON member ({e})"
    return (value, None) if isinstance(value, dict) else (None, "JSON member is not an object")


def row(key: str, parts: dict[str, bytes], mapping: dict[str, str]) -> tuple[dict, str | None]:
    """({painter name: value}, reason or None) of one sample under `mapping` (painter name -> input name)."""
    wanted = {**DEFAULTS, **mapping}
    out: dict = {}
    fields, json_reason = None, None
    image = mapping.get(IMAGE) or next((ext for ext in IMAGE_MEMBERS if ext in parts), None)
    for target, source in {**wanted, IMAGE: image}.items():
        if source is None:
            return out, f"sample {key}: no image member ({', '.join(IMAGE_MEMBERS)})"
        if source == KEY:
            out[target] = key
            continue
        if source in parts:
            value = parts[source]
        else:
            if fields is None and json_reason is None:
                fields, json_reason = _json(parts)
            if fields is None or source not in fields:
                why = f"; its {json_reason}" if json_reason else ""
                return out, f"sample {key}: no {source!r} member or JSON field{why}"
            value = fields[source]
        if target != IMAGE:
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    return out, f"sample {key}: {source!r} is not UTF-8 text (byte {e.start})"
            value = None if value is None else str(value)
        elif not isinstance(value, bytes):
            return out, f"sample {key}: image {source!r} is a JSON field, not an image member"
        out[target] = value
    return out, None


def iter_webdataset(path: str, mapping: dict[str, str], storage=None, chunk_rows: int = 256
                    ) -> Iterator[dict[str, list]]:
    """Chunks of rows of one shard: `idx`, `text`, `image` (and other mapped names) + bookkeeping columns."""
    targets = list(dict.fromkeys([*DEFAULTS, IMAGE, *mapping]))
    columns = {name: [] for name in (*targets, SOURCE, ROW, REASON)}
    number = 0

    def add(values: dict, reason: str | None) -> None:
        for name in targets:
            columns[name].append(values.get(name) if not reason or name == "idx" else None)
        columns[SOURCE].append(path)
        columns[ROW].append(number)
        columns[REASON].append(reason)

    with as_storage(storage).open(path, "rb") as f:
        try:
            for key, parts in samples(f):
                number += 1
                add(*row(key, parts, mapping))
                if len(columns[ROW]) >= chunk_rows:
                    yield columns
                    columns = {name: [] for name in columns}
        except (tarfile.TarError, EOFError) as e:  # storage errors (OSError) fail the read task as elsewhere
            number += 1
            add({}, f"tar shard unreadable after sample {number - 1} ({type(e).__name__}: {e})")
    if columns[ROW]:
        yield columns

