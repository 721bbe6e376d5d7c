"""The bookkeeping every job keeps on its rows (no Ray, no torch): where a row came from, why it was
rejected, which cell holds its image, and which rows repeat an idx.

- Every row read by `painter.io.tables` carries `_source` (its file), `_row` (1-based row number) and
  `_reason` (None while the row is good): `SOURCE`, `ROW`, `REASON`. `empty_rows` is such a table with
  no rows.
- `rejected_table` makes the rejected-rows table (`idx`, `source`, `row`, `stage`, `reason`) that every
  job writes under its errors path.
- `image_cells` picks each row's image cell among the image columns a job accepts.
- `find_duplicates` finds the good rows that repeat an idx; the first by (file, row) is kept and the
  others get `duplicate_reason`, the one wording every job uses.
- `pair_keys` gives each (idx, sample) a 64-bit key; `pairs_in` looks keys up in a sorted array of them.
- `rank_share` deals rows to training workers by their keys, so a worker's rows never depend on timing.
"""
from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SOURCE, ROW, REASON = "_source", "_row", "_reason"
REJECTED_SCHEMA = pa.schema([
    pa.field("idx", pa.string()), pa.field("source", pa.string()), pa.field("row", pa.int64()),
    pa.field("stage", pa.string()), pa.field("reason", pa.string()),
])


def rejected_table(idx: list, source: list, row: list, reason: list, stage: str) -> pa.Table:
    """The rejected-rows table for one batch (a reason is required for every row)."""
    n = len(idx)
    return pa.Table.from_pydict({
        "idx": [None if i is None else str(i) for i in idx], "source": [str(s) for s in source],
        "row": [int(r) for r in row], "stage": [stage] * n, "reason": [str(r) for r in reason],
    }, schema=REJECTED_SCHEMA)


def empty_rows(*columns: str) -> pa.Table:
    """No rows: the string `columns` (idx, text, ...) and the bookkeeping columns."""
    return pa.table({**{name: pa.array([], pa.string()) for name in columns}, SOURCE: pa.array([], pa.string()),
                     ROW: pa.array([], pa.int64()), REASON: pa.array([], pa.string())})


def _values(rows: pa.Table | Mapping[str, Sequence], name: str) -> list | None:
    if isinstance(rows, pa.Table):
        return rows[name].to_pylist() if name in rows.column_names else None
    values = rows.get(name)
    return None if values is None else list(values)


def image_cells(rows: pa.Table | Mapping[str, Sequence], base64_columns: Sequence[str],
                binary_columns: Sequence[str] = (), text_file: bool = False) -> tuple[list, list[bool]] | None:
    """(each row's image cell, whether it is base64), or None when `rows` has none of the columns.

    A row's cell is its first non-null one in the order base64 columns, then binary ones; every cell of
    a TSV (`text_file`) is base64. Chosen per row: Ray joins rows of files of different kinds into one
    batch, each column null where its file had none, and one column chosen for the whole batch once
    read every Parquet `image` row of such a batch as a missing `imgbase64` (CI saw 14 good rows
    rejected). A row with no image has cell None."""
    found = [(values, text_file or name in base64_columns) for name in (*base64_columns, *binary_columns)
             if (values := _values(rows, name)) is not None]
    if not found:
        return None
    cells, is_base64 = [], []
    for row in zip(*(values for values, _ in found)):
        at = next((k for k, cell in enumerate(row) if cell is not None), None)
        cells.append(None if at is None else row[at])
        is_base64.append(True if at is None else found[at][1])
    return cells, is_base64


def duplicate_reason(source: str, row: int) -> str:
    """The reason a row repeating the idx of the good row at (source, row) is rejected with."""
    return f"duplicate idx (first at {source}:{row})"


def find_duplicates(keys: pa.Table) -> dict[tuple[str, int], str]:
    """{(source, row): reason} for the good rows (REASON null) of `keys` (idx, SOURCE, ROW, REASON) whose
    idx a good row earlier in (source, row) order has."""
    good = keys.filter(pc.is_null(keys[REASON]))
    if good.num_rows < 2:
        return {}
    ordered = good.sort_by([("idx", "ascending"), (SOURCE, "ascending"), (ROW, "ascending")])
    idx = ordered["idx"].to_numpy(zero_copy_only=False)
    repeat = np.zeros(len(idx), dtype=bool)
    repeat[1:] = idx[1:] == idx[:-1]
    first = np.maximum.accumulate(np.where(repeat, 0, np.arange(len(idx))))
    dups = np.flatnonzero(repeat)
    take = lambda column, at: ordered[column].take(pa.array(at, pa.int64())).to_pylist()  # noqa: E731
    sources, rows = take(SOURCE, dups), take(ROW, dups)
    first_sources, first_rows = take(SOURCE, first[dups]), take(ROW, first[dups])
    return {(s, r): duplicate_reason(fs, fr) for s, r, fs, fr in zip(sources, rows, first_sources, first_rows)}


def rank_share(keys: pa.Table, sort_keys: Sequence[str], rank: int, world: int, equal: bool = True) -> np.ndarray:
    """The row numbers of `keys` that worker `rank` of `world` takes: rows ranked by `sort_keys` and dealt
    round-robin, so a share depends only on the keys, never on read order or timing. `equal` trims every
    share to rows // world (DDP ranks must take the same number of steps)."""
    order = pc.sort_indices(keys, sort_keys=[(k, "ascending") for k in sort_keys]).to_numpy()
    mine = order[rank::world]
    return mine[: keys.num_rows // world] if equal else mine


def pair_keys(idx: list, sample: list) -> np.ndarray:
    """A 64-bit key per (idx, sample): the first 8 bytes of blake2b of both. The exactly-once checks
    compare these, 8 bytes a pair, where a set of Python tuples held ~150 bytes a pair on the driver."""
    digest = lambda i, s: hashlib.blake2b(f"{i}\x1f{s}".encode(), digest_size=8).digest()  # noqa: E731
    return np.fromiter((int.from_bytes(digest(i, s), "little") for i, s in zip(idx, sample)), dtype=np.uint64,
                       count=len(idx))


def pairs_in(keys: np.ndarray, committed: np.ndarray) -> np.ndarray:
    """Which of `keys` are in `committed` (sorted and unique, as `OutputTable.committed_pairs` gives)."""
    if not len(committed):
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(committed, keys), len(committed) - 1)
    return committed[at] == keys
