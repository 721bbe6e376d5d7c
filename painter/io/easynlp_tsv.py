"""EasyNLP's text2image predict output, written exactly as its `SimplePredictorManager` writes it.

EasyNLP's predictor returns, per input row, `{"idx", "text", "gen_imgbase64"}` where `gen_imgbase64`
is a Python list of standard-base64 PNG strings (one per generated image, `max_generated_num` of
them, a list even when there is one), and its manager writes one line per input row, no header:
`str(value)` of each `--output_schema` column in that order, then `str(value)` of each `--append_cols`
input column, tab-separated. So a cell reads `['iVBORw0KGgo...', 'iVBORw0KGgo...']`, which the usual
reading code parses with `ast.literal_eval` and decodes with `base64.urlsafe_b64decode` (which also
accepts the standard alphabet's `+` and `/`).

Input here is an Arrow table of generated images, one row per (idx, sample): `idx`, `text`,
`sample`, the image bytes column, and any pass-through input columns. Lines come in the order of
`order` (the input's idx order, as EasyNLP keeps it) or else sorted by idx; images by `sample`. Tabs and line
breaks inside a value become spaces: a TSV cell cannot hold them. No Ray in this module.
"""
from __future__ import annotations

import ast
import base64
import binascii
from typing import Iterable

import pyarrow as pa

from painter.errors import InputError
from painter.io.storage import as_storage

IMAGES_COLUMN = "gen_imgbase64"
OUTPUT_COLUMNS = ("idx", "text", IMAGES_COLUMN)  # what EasyNLP's text2image predictor returns
DEFAULT_OUTPUT_SCHEMA = ",".join(OUTPUT_COLUMNS)


def _names(spec: str | None) -> list[str]:
    return [name.strip() for name in (spec or "").split(",") if name.strip()]


def _cell(value) -> str:
    text = "" if value is None else str(value)
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def images_cell(images: list[bytes]) -> str:
    """The `gen_imgbase64` cell: the Python list repr of standard-base64 strings, as EasyNLP writes it."""
    return str([base64.b64encode(image).decode("ascii") for image in images])


def parse_images_cell(cell: str) -> list[bytes]:
    """The image bytes of a `gen_imgbase64` cell (the list repr, or one bare base64 string)."""
    text = cell.strip()
    try:
        items = ast.literal_eval(text) if text.startswith("[") else [text]
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValueError("not a list of strings")
        return [base64.urlsafe_b64decode(item) for item in items]
    except (ValueError, SyntaxError, binascii.Error) as e:
        raise ValueError(f"not an EasyNLP gen_imgbase64 cell ({e})") from None


def check_columns(table_columns: list[str], output_schema: str, append_cols: str | None) -> None:
    """InputError naming the first output or appended column that cannot be written."""
    for name in _names(output_schema):
        if name not in OUTPUT_COLUMNS:
            raise InputError(f"--output_schema {name!r}: the text2image predictor writes only "
                             f"{', '.join(OUTPUT_COLUMNS)}")
    for name in _names(append_cols):
        if name not in table_columns:
            raise InputError(f"--append_cols {name!r}: no such input column "
                             f"(columns: {', '.join(c for c in table_columns if not c.startswith('_'))})")


def easynlp_lines(table: pa.Table, image_column: str, output_schema: str = DEFAULT_OUTPUT_SCHEMA,
                  append_cols: str | None = None, order: list[str] | None = None,
                  output_text: dict[str, str] | None = None) -> list[str]:
    """One line per idx (see the module docstring), without the trailing newline. `output_text` gives the
    output `text` column per idx where it differs from the input's (appended columns stay the input's)."""
    check_columns(table.column_names, output_schema, append_cols)
    outputs, appended = _names(output_schema), _names(append_cols)
    rows: dict[str, dict] = {}
    images: dict[str, list[tuple[int, bytes]]] = {}
    for row in table.to_pylist():
        idx = row["idx"]
        rows.setdefault(idx, row)
        images.setdefault(idx, []).append((int(row.get("sample") or 0), row[image_column]))
    lines = []
    ranks = {idx: i for i, idx in enumerate(order or [])}
    for idx in sorted(rows, key=lambda i: (ranks.get(i, len(ranks)), i)):
        row = rows[idx]
        values = {"idx": idx, "text": (output_text or {}).get(idx, row["text"]),
                  IMAGES_COLUMN: images_cell([image for _, image in sorted(images[idx], key=lambda p: p[0])])}
        cells = [values[name] for name in outputs] + [row[name] for name in appended]
        lines.append("\t".join(_cell(c) for c in cells))
    return lines


def write_easynlp_tsv(table: pa.Table, path: str, image_column: str, storage_options: dict | None = None, *,
                      output_schema: str = DEFAULT_OUTPUT_SCHEMA, append_cols: str | None = None,
                      order: list[str] | None = None, output_text: dict[str, str] | None = None) -> int:
    """Write `table` (rows idx, text, sample, image bytes, pass-through columns) to `path` in EasyNLP's
    predict format (`write_lines`). Returns the number of lines (inputs)."""
    lines = easynlp_lines(table, image_column, output_schema, append_cols, order, output_text)
    return write_lines(lines, path, storage_options)


def write_lines(lines: Iterable[str], path: str, storage_options: dict | None = None) -> int:
    """Write `lines` (without their newline, consumed as they come) to `path` in one step
    (`Storage.write_atomic`). Returns the number of lines."""
    count = 0

    def encoded():
        nonlocal count
        for line in lines:
            count += 1
            yield (line + "\n").encode("utf-8")

    as_storage(storage_options).write_atomic(path, encoded())
    return count
