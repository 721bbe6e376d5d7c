"""`ImageEncoder`: the plain callable that turns a batch of preprocessed rows into token-shard rows.

It owns one loaded VQGAN and the tokenizer. `prepare_batch` is its CPU-side partner: table rows ->
pixels, each row either prepared or given a reason. `painter.stages.tokenize` runs `prepare_batch` in
Ray tasks and `ImageEncoder` in a Ray actor pool; both run and test without Ray.

Batch contract (a `pyarrow.Table` or a dict of columns; every column has one entry per row):
  in:  `idx`, `text` (strings), `pixels` (binary: the raw bytes of a uint8 (size, size, 3) array from
       `painter.io.images.prepare_pixels`, null for a rejected row), `_reason` (null for a good row)
       and any bookkeeping columns (`_source`, `_row`, ...), which pass through unchanged;
  out: a `pyarrow.Table` with the same rows in the same order: `idx`, `text`, `text_ids`
       list<int32> (text_len), `image_tokens` list<int16|int32> (img_len), `is_truncated` bool, the
       bookkeeping columns and `_reason`. Rejected rows keep their reason and get null token columns.
The input columns `pixels` and any image cell columns are dropped.

pyarrow (and the `painter.io` modules built on it) load on first use, inside the functions that
handle tables: importing this module needs what the rest of `painter.inference` needs (torch, numpy,
pillow, safetensors, tokenizers: what a bare GPU box has).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from painter.checkpoint.model_dir import LoadedModel, load_model
from painter.io.images import DEFAULT_MAX_PIXELS, prepare_pixels
from painter.runtime import pick_device
from painter.inference.vq_encode import default_max_batch, encode_codes, prepare_vqgan

if TYPE_CHECKING:
    import pyarrow as pa

PIXELS = "pixels"
BASE64_COLUMN, BINARY_COLUMN = "imgbase64", "image"  # TSV/Parquet base64 text; Parquet raw file bytes
_DROPPED = (PIXELS, BASE64_COLUMN, BINARY_COLUMN)


def prepared_schema() -> pa.Schema:
    """The schema of `prepare_batch`'s output."""
    import pyarrow as pa
    from painter.io.rows import REASON, ROW, SOURCE

    return pa.schema([
        pa.field("idx", pa.string()), pa.field("text", pa.string()), pa.field(PIXELS, pa.binary()),
        pa.field(SOURCE, pa.string()), pa.field(ROW, pa.int64()), pa.field(REASON, pa.string()),
    ])


def _text_reason(name: str, value) -> str | None:
    if value is None:
        return f"missing {name}"
    if not str(value).strip():
        return f"empty {name}"
    return None


def image_cells(table: pa.Table) -> tuple[list, list[bool]]:
    """(each row's image cell, whether it is base64): the row's `imgbase64` where it has one, else its
    Parquet binary `image` (`painter.io.rows.image_cells`, chosen per row)."""
    from painter.io import rows

    found = rows.image_cells(table, (BASE64_COLUMN,), (BINARY_COLUMN,))
    if found is None:
        raise ValueError(f"rows have neither an {BASE64_COLUMN!r} nor an {BINARY_COLUMN!r} column")
    return found


def prepare_batch(batch: pa.Table, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, resize: str = "pil") -> pa.Table:
    """Rows read by `painter.io.tables` -> `prepared_schema()` rows: uint8 (size, size, 3) pixels as bytes.

    A row keeps the reason it was read with; otherwise it is rejected for a missing or empty idx or
    text, or for its image (bad base64, not an image, truncated, too large, ...). Never raises for
    bad data.
    """
    import pyarrow as pa
    from painter.io.rows import REASON, ROW, SOURCE

    cells, is_base64 = image_cells(batch)
    idx, text = batch["idx"].to_pylist(), batch["text"].to_pylist()
    reasons = batch[REASON].to_pylist()
    pixels: list[bytes | None] = []
    for i in range(batch.num_rows):
        reason = reasons[i] or _text_reason("idx", idx[i]) or _text_reason("text", text[i])
        array = None
        if reason is None:
            array, reason = prepare_pixels(cells[i], size, is_base64=is_base64[i], max_pixels=max_pixels,
                                           resize=resize)
        pixels.append(None if array is None else array.tobytes())
        reasons[i] = reason
    return pa.table({
        "idx": [None if v is None else str(v) for v in idx], "text": [None if v is None else str(v) for v in text],
        PIXELS: pixels, SOURCE: batch[SOURCE].cast(pa.string()), ROW: batch[ROW].cast(pa.int64()), REASON: reasons,
    }, schema=prepared_schema())


class ImageEncoder:
    """`ImageEncoder(model_dir_or_loaded, device=None)(batch) -> batch` (see the module docstring).

    A model directory is loaded (VQGAN only, through `storage`, a `painter.io.storage.Storage`) onto
    `device` (default: CUDA when present); a LoadedModel is used as it is, its VQGAN moved to `device`.
    Images go through `painter.inference.vq_encode.encode_codes` (on CUDA: pinned uint8 copies, channels_last,
    bf16 autocast; on CPU: fp32, the reference's tokens), `max_batch` at a time (default:
    `default_max_batch(device)`, 64 on CUDA, 8 on CPU, every call padded to that many). `threads` sets this process's
    torch threads on CPU (a Ray actor otherwise gets one per whole CPU it asked for).
    """

    def __init__(self, model: str | LoadedModel, device=None, max_batch: int | None = None, storage=None,
                 threads: int | None = None):
        from painter.io.shards import ShardInfo

        self.device = pick_device(device)
        if threads is not None and self.device.type == "cpu":
            torch.set_num_threads(threads)
        if isinstance(model, LoadedModel):
            if model.vqgan is None:
                raise ValueError("ImageEncoder needs a model loaded with its VQGAN")
            self.model = model
        else:
            self.model = load_model(model, parts=("vqgan",), device=self.device, storage=storage)
        self.model.vqgan = prepare_vqgan(self.model.vqgan, self.device)
        self.info = ShardInfo.for_model(self.model)
        self.max_batch = max_batch or default_max_batch(self.device)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (B, size, size, 3) -> VQGAN codes (B, img_len) as int64, batched by `max_batch`."""
        return encode_codes(self.model.vqgan, pixels, self.device, self.max_batch)

    def _pixel_array(self, cells: list) -> np.ndarray:
        size = self.info.image_size
        expected = size * size * 3
        for cell in cells:
            if len(cell) != expected:
                raise ValueError(f"pixels of {len(cell)} bytes; a {size}x{size} RGB image has {expected}")
        return np.frombuffer(b"".join(cells), dtype=np.uint8).reshape(len(cells), size, size, 3)

    def __call__(self, batch) -> pa.Table:
        import pyarrow as pa
        import pyarrow.compute as pc
        from painter.io.rows import REASON

        table = batch if isinstance(batch, pa.Table) else pa.table(batch)
        n = table.num_rows
        good = pc.is_null(table[REASON]).to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
        rows = np.flatnonzero(good)
        cells = table[PIXELS].take(pa.array(rows, pa.int64())).to_pylist()
        if any(cell is None for cell in cells):
            raise ValueError("a row without a reason has no pixels")
        codes = self.encode_pixels(self._pixel_array(cells))
        texts = table["text"].take(pa.array(rows, pa.int64())).to_pylist()
        ids, truncated = self.model.tokenizer.encode_batch(texts)
        return self._output(table, rows, ids, codes, truncated)

    def _output(self, table: pa.Table, rows: np.ndarray, ids, codes, truncated) -> pa.Table:
        import pyarrow as pa
        from painter.io.rows import REASON

        info, n = self.info, table.num_rows
        token_np = np.int16 if info.token_type == pa.int16() else np.int32
        mask = np.ones(n, dtype=bool)
        mask[rows] = False  # mask = null
        text_ids = np.zeros((n, info.text_len), np.int32)
        image_tokens = np.zeros((n, info.img_len), token_np)
        is_truncated = np.zeros(n, bool)
        text_ids[rows], image_tokens[rows], is_truncated[rows] = ids, codes.astype(token_np), truncated
        kept = [c for c in table.column_names if c not in _DROPPED and c not in ("idx", "text", REASON)]
        columns = {
            "idx": table["idx"].cast(pa.string()), "text": table["text"].cast(pa.string()),
            "text_ids": _list_column(text_ids, mask, pa.int32()),
            "image_tokens": _list_column(image_tokens, mask, info.token_type),
            "is_truncated": pa.array(is_truncated, pa.bool_()),
            **{c: table[c] for c in kept}, REASON: table[REASON].cast(pa.string()),
        }
        return pa.table(columns)


class DecodingEncoder:
    """`prepare_batch` then `ImageEncoder` in one process: the tokenize job's whole per-row work on a
    CPU-only cluster, where every worker is a CPU and handing pixels from decode tasks to encode actors
    would only add a hop. `DecodingEncoder(model, threads=1, max_pixels=..., resize=...)(rows) -> batch`."""

    def __init__(self, model: str | LoadedModel, threads: int | None = 1, max_pixels: int = DEFAULT_MAX_PIXELS,
                 resize: str = "pil", storage=None):
        self.encoder = ImageEncoder(model, device="cpu", storage=storage, threads=threads)
        self.max_pixels, self.resize = max_pixels, resize

    def __call__(self, batch) -> pa.Table:
        import pyarrow as pa

        table = batch if isinstance(batch, pa.Table) else pa.table(batch)
        return self.encoder(prepare_batch(table, self.encoder.info.image_size, self.max_pixels, self.resize))


def _list_column(values: np.ndarray, null_mask: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """(n, k) array -> list<value_type> column, null where `null_mask`."""
    import pyarrow as pa

    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    flat = pa.array(values.ravel(), value_type)
    return pa.ListArray.from_arrays(offsets, flat, mask=pa.array(null_mask, pa.bool_()))
