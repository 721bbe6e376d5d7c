"""`--columns`: input column names mapped onto painter's, the same in every job that reads a corpus.

`--columns idx=key,text=caption,image=jpg` says which input column (a table's column, a CSV header
name, a WebDataset member's extension or a field of its JSON member) holds each of painter's:
- `idx`, `text` and any other name a job reads (generate's extra columns) take the input's values;
- `image` takes an image cell of any kind, sorted here by what the cells hold (`rename`): text is
  base64 and becomes `imgbase64`, bytes stay `image`, and a Hugging Face image struct (`bytes`,
  `path`) becomes its bytes (a struct with only a path is read from that path, relative to the file).
The mapping is applied once, as each file's rows are read (`painter.io.tables.iter_rows`), so stages
see painter's names only. `painter.io.checks` refuses a mapping that names a column a file lacks
before Ray starts. No Ray in this module.
"""
from __future__ import annotations

import posixpath
import re

from painter.errors import InputError
from painter.io.formats import COLUMNS_HELP as HELP  # noqa: F401 (the option's help, shown by the command line)
from painter.io.rows import REASON
from painter.io.storage import as_storage

IMAGE, BASE64 = "image", "imgbase64"
_NAME = re.compile(r"^[^\s=,]+$")


def parse(spec: str | None) -> dict[str, str]:
    """`idx=key,text=caption` -> {"idx": "key", "text": "caption"} (painter's name -> the input's)."""
    if not spec:
        return {}
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        target, sep, source = (s.strip() for s in part.partition("="))
        if not sep or not _NAME.match(target) or not _NAME.match(source):
            raise InputError(f"--columns {spec!r}: bad entry {part!r}, expected PAINTER_NAME=INPUT_NAME")
        if target in mapping:
            raise InputError(f"--columns {spec!r} maps {target!r} twice")
        mapping[target] = source
    if len(set(mapping.values())) != len(mapping):
        raise InputError(f"--columns {spec!r} maps one input column onto two names")
    return mapping


def renamed(names: list[str], mapping: dict[str, str]) -> list[str]:
    """The names `names` (an input's columns) have once `mapping` is applied (an image as `imgbase64` if it
    is text: the caller knows only names, so a mapped image counts as both)."""
    sources = {source: target for target, source in mapping.items()}
    out = [sources.get(n, n) for n in names]
    return out + [BASE64] if IMAGE in out and BASE64 not in out else out


def missing(names: list[str], mapping: dict[str, str]) -> list[str]:
    """The input names of `mapping` that are not among `names`."""
    return [source for source in mapping.values() if source not in names]


def rename(chunk: dict[str, list], mapping: dict[str, str], source_file: str, storage=None) -> dict[str, list]:
    """A chunk of rows (with its `_reason` column) with `mapping` applied and its `image` cells sorted by
    kind, in place: text cells to `imgbase64`, structs to their bytes. A struct without bytes is read from
    its path (relative to `source_file`'s folder); one that cannot be read gets its reason where the row
    has none yet."""
    if mapping:
        sources = {source: target for target, source in mapping.items()}
        for name in [n for n in chunk if n in sources]:
            chunk[sources[name]] = chunk.pop(name)
    _sort_images(chunk, chunk[REASON], source_file, storage)
    return chunk


def _sort_images(chunk: dict[str, list], reasons: list, source_file: str, storage=None) -> None:
    cells = chunk.get(IMAGE)
    if not cells:
        return
    kinds = {type(c) for c in cells if c is not None}
    if str in kinds:
        texts = chunk.setdefault(BASE64, [None] * len(cells))
        for i, cell in enumerate(cells):
            if isinstance(cell, str):
                texts[i], cells[i] = texts[i] if texts[i] is not None else cell, None
    if dict in kinds:
        for i, cell in enumerate(cells):
            if isinstance(cell, dict):
                cells[i], reason = struct_bytes(cell, source_file, storage)
                if reason and reasons[i] is None:
                    reasons[i] = reason


def struct_bytes(cell: dict, source_file: str, storage=None) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, reason) for a Hugging Face image struct `{bytes, path}`."""
    data = cell.get("bytes")
    if data:
        return bytes(data), None
    path = cell.get("path")
    if not path:
        return None, "image struct has neither bytes nor a path"
    return read_beside(source_file, path, storage)


def read_beside(source_file: str, path: str, storage=None) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, reason) for the file `path` names, relative to `source_file`'s folder."""
    full = path if "://" in path or path.startswith("/") else posixpath.join(posixpath.dirname(source_file), path)
    try:
        return as_storage(storage).read_bytes(full), None
    except FileNotFoundError:
        return None, f"image file {path!r} not found"
    except Exception as e:  # denied access, a folder, ...
        return None, f"image file {path!r} cannot be read ({type(e).__name__}: {e})"
