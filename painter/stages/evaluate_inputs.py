"""What `painter evaluate` reads: the images to judge (`--generated`: TSV/Parquet files with a text and an
image column, or a `painter generate` output table read through `deltalake`), the held-out captions, and
the rows it could not use (`Rejected`, with where each came from and why).
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from painter.evaluation import synthetic
from painter.errors import InputError
from painter.io import columns as column_map
from painter.io import output as out
from painter.io import rows, tables
from painter.io.easynlp_tsv import parse_images_cell
from painter.io.images import IMAGE_FORMATS, ImageRejected, image_bytes
from painter.io.output_table import OutputTable
from painter.io.storage import Storage, as_storage

STAGE = "evaluate"
BASE64_COLUMNS = ("imgbase64", "gen_imgbase64")
BINARY_COLUMNS = (*IMAGE_FORMATS, "image")
EXAMPLES = 5


@dataclass
class Candidate:
    """One image to judge and compare: generated here or read from --generated."""
    idx: str
    sample: int
    text: str
    image: bytes


class Rejected:
    """Rows that could not be used, with where they came from and why."""

    def __init__(self):
        self.rows: list[tuple] = []  # (idx, source, row, reason)
        self.read = 0

    def add(self, idx, source, row, reason) -> None:
        self.rows.append((None if idx is None else str(idx), str(source), int(row or 0), str(reason)))

    def table(self) -> pa.Table:
        columns = list(zip(*self.rows)) if self.rows else [[], [], [], []]
        return rows.rejected_table(*map(list, columns), STAGE)

    def examples(self) -> list[str]:
        return [f"{source} row {row}: {reason}" for _, source, row, reason in self.rows[:EXAMPLES]]



def table_rows(paths: list[str], schema_spec: str, storage: Storage, need_text: bool, limit: int,
                rejected: Rejected, columns: str | None = None) -> Iterator[tuple]:
    """(idx, text, source, row, image file bytes) of usable rows of TSV/Parquet files, at most `limit`
    (0: all); unusable rows go to `rejected`."""
    schema = tables.parse_schema(schema_spec)
    files = tables.expand_paths(paths, storage)
    kept = 0
    for path in files:
        tsv = tables.is_tsv(path)
        wanted = schema if tsv else [c for c in schema if c.name == "text" and need_text]
        for chunk in tables.iter_rows(path, wanted, storage, columns=column_map.parse(columns)):
            found = rows.image_cells(chunk, BASE64_COLUMNS, BINARY_COLUMNS, text_file=tsv)
            cells, is_base64 = found or (None, None)
            n = len(chunk[rows.ROW])
            idx = chunk.get("idx", [None] * n)
            texts = chunk.get("text", [None] * n)
            for i in range(n):
                if limit and kept >= limit:
                    return
                rejected.read += 1
                reason = chunk[rows.REASON][i]
                if reason is None and cells is None:
                    reason = f"no image column (one of {', '.join(BASE64_COLUMNS + BINARY_COLUMNS)})"
                if reason is None and need_text and not str(texts[i] or "").strip():
                    reason = "empty text"
                images = []
                if reason is None:
                    try:
                        images = cell_images(cells[i], is_base64[i])
                    except ImageRejected as e:
                        reason = str(e)
                if reason is not None:
                    rejected.add(idx[i], chunk[rows.SOURCE][i], chunk[rows.ROW][i], reason)
                    continue
                for data in images:
                    kept += 1
                    yield idx[i], texts[i], chunk[rows.SOURCE][i], chunk[rows.ROW][i], data


def cell_images(cell, is_base64: bool) -> list[bytes]:
    """The images of one cell: EasyNLP's predict output holds a list repr of base64 PNGs, others one image."""
    if is_base64 and isinstance(cell, str) and cell.lstrip().startswith("["):
        try:
            return parse_images_cell(cell)
        except ValueError as e:
            raise ImageRejected(str(e)) from None
    return [image_bytes(cell, is_base64)]


def generate_output(paths: list[str], date: str | None, storage: Storage) -> tuple[str, str] | None:
    """(root, run date) when `paths` names a generate output table (its root, or one run_date=D folder of it)."""
    if len(paths) != 1:
        return None
    path = paths[0].rstrip("/")
    name = posixpath.basename(path)
    if name.startswith("run_date=") and OutputTable(posixpath.dirname(path), storage).exists():
        if date and date != name.split("=", 1)[1]:
            raise InputError(f"--generated {paths[0]} is run_date {name.split('=', 1)[1]}, but --generated-date is {date}")
        return posixpath.dirname(path), out.check_run_date(name.split("=", 1)[1])
    table = OutputTable(path, storage)
    if not table.exists():
        return None
    if date:
        return path, out.check_run_date(date)
    dates = table.run_dates()
    if not dates:
        raise InputError(f"--generated {path}: a generate output table with no committed run_date partition")
    return path, dates[-1]


def read_generated(options, storage: Storage, rejected: Rejected) -> tuple[list[Candidate], dict]:
    """The images of --generated, at most --limit, and where they came from."""
    found = generate_output(options.generated, options.generated_date, storage)
    candidates: list[Candidate] = []
    if found is None:
        for idx, text, _, row, data in table_rows(options.generated, options.generated_schema, storage, True,
                                                   options.limit, rejected, options.columns):
            candidates.append(Candidate(str(idx if idx is not None else row), 0, str(text), data))
        return candidates, {"source": "files", "paths": options.generated}
    root, date = found
    night = OutputTable(root, storage).read(date, ["idx", "text", "sample", "image"]).sort_by(
        [("idx", "ascending"), ("sample", "ascending")])
    for number, r in enumerate(night.to_pylist(), start=1):  # read through deltalake: committed rows only
        if options.limit and len(candidates) >= options.limit:
            break
        rejected.read += 1
        if not r["image"] or not str(r["text"] or "").strip():
            rejected.add(r["idx"], f"{root} run_date={date}", number, "no image" if not r["image"] else "empty text")
            continue
        candidates.append(Candidate(str(r["idx"]), int(r["sample"] or 0), str(r["text"]), bytes(r["image"])))
    if not candidates and not rejected.rows:
        raise InputError(f"--generated {root}: no committed images for run_date {date}")
    return candidates, {"source": "generate output", "root": root, "run_date": date}


def read_captions(options, storage: Storage | dict) -> list[str]:
    """The --captions evaluation captions, drawn from --held-out's captions (each checked) when given."""
    held_out = None
    if options.held_out:
        try:
            with as_storage(storage).open(options.held_out, "r", encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except FileNotFoundError:
            raise InputError(f"--held-out {options.held_out}: no such file") from None
        held_out = [line for line in lines if line]
        for number, line in enumerate(lines, start=1):
            if line:
                try:
                    synthetic.parse_caption(line)
                except ValueError:
                    raise InputError(f"--held-out {options.held_out} line {number}: not a synthetic caption: {line[:40]!r}") from None
        if not held_out:
            raise InputError(f"--held-out {options.held_out}: no captions in the file")
    return synthetic.captions_for_eval(options.captions, options.caption_seed, held_out=held_out)
