"""Token shards: the Parquet tables the tokenize job writes and the train job reads.

`read_split` gives one training worker its share of a set of shards without Ray Data (the train job's
in-memory path). Columns: `idx` string, `text` string, `text_ids` list<int32> (`text_len` tokenizer ids, padded with
[PAD], not offset), `image_tokens` list<int16|int32> (`img_len` VQGAN codes). Every file's schema
metadata records what made it (`ShardInfo`: VQGAN fingerprint, vocab hash, image size, lengths) so
training refuses shards made with another VQGAN or vocab.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from painter.errors import InputError
from painter.io.rows import rank_share
from painter.io.storage import as_storage

_META_KEY = b"painter.shard_info"


@dataclass(frozen=True)
class ShardInfo:
    vqgan_fingerprint: str
    vocab_hash: str
    image_size: int
    text_len: int
    img_len: int
    img_vocab_size: int

    @classmethod
    def for_model(cls, loaded) -> "ShardInfo":
        """What shards made with (or usable by) a `LoadedModel` must record."""
        c = loaded.config
        return cls(loaded.vqgan_fingerprint, loaded.tokenizer.vocab_hash, c.image_size,
                   c.gpt.text_len, c.gpt.img_len, c.gpt.img_vocab_size)

    @property
    def token_type(self) -> pa.DataType:
        return pa.int16() if self.img_vocab_size <= 2 ** 15 else pa.int32()

    def schema(self) -> pa.Schema:
        fields = [pa.field("idx", pa.string()), pa.field("text", pa.string()),
                  pa.field("text_ids", pa.list_(pa.int32())), pa.field("image_tokens", pa.list_(self.token_type))]
        return pa.schema(fields, metadata={_META_KEY: json.dumps(dataclasses.asdict(self)).encode()})

    @classmethod
    def from_schema(cls, schema: pa.Schema, source: str) -> "ShardInfo":
        raw = (schema.metadata or {}).get(_META_KEY)
        if raw is None:
            raise InputError(f"{source}: not a painter token shard (no {_META_KEY.decode()} metadata)")
        return cls(**json.loads(raw))

    def mismatch(self, other: "ShardInfo") -> str | None:
        """The first field that differs, as a readable reason, or None when compatible."""
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                return f"{f.name} is {a!r} in the shards but {b!r} in the model"
        return None


def shard_table(info: ShardInfo, idx, text, text_ids: np.ndarray, image_tokens: np.ndarray) -> pa.Table:
    """A token-shard table (with its metadata) from arrays of one batch."""
    n = len(idx)
    text_ids = np.asarray(text_ids, dtype=np.int32).reshape(n, info.text_len)
    image_tokens = np.asarray(image_tokens).reshape(n, info.img_len)
    token_np = np.int16 if info.token_type == pa.int16() else np.int32
    columns = [
        pa.array([str(i) for i in idx], pa.string()),
        pa.array([str(t) for t in text], pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(text_ids.ravel()), info.text_len).cast(pa.list_(pa.int32())),
        pa.FixedSizeListArray.from_arrays(pa.array(image_tokens.astype(token_np).ravel()), info.img_len)
        .cast(pa.list_(info.token_type)),
    ]
    return pa.Table.from_arrays(columns, schema=info.schema())


def read_shard_info(files: list[str], filesystem=None) -> ShardInfo:
    """The ShardInfo all `files` agree on; InputError naming the first file that disagrees."""
    if not files:
        raise InputError("no token shards found")
    first = None
    for path in files:
        info = ShardInfo.from_schema(pq.read_schema(path, filesystem=filesystem), path)
        if first is None:
            first = info
        elif (reason := first.mismatch(info)) is not None:
            raise InputError(f"{path}: made differently from {files[0]}: {reason}")
    return first


def check_shards_fit(info: ShardInfo, model_info: ShardInfo, source: str) -> None:
    """Refuse shards made with another VQGAN, vocab or lengths than the model's."""
    reason = info.mismatch(model_info)
    if reason is not None:
        raise InputError(f"{source}: token shards do not fit this model: {reason}")


def read_split(files: list[str], rank: int, world: int, storage=None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Worker `rank` of `world`'s equal share of the rows of the token shards `files`: (text_ids (n, Tt) int32,
    image_tokens (n, Ti) int32, idx), n = rows // world, in (idx, file, row) order.

    Every row is ranked by (idx, file, row) and dealt round-robin (`painter.io.rows.rank_share`), so the same
    shards give each rank the same rows in every run. The idx of
    every file are read first, then, a file at a time, only this rank's rows of the token columns.
    """
    handle, keys = as_storage(storage), []
    for number, path in enumerate(files):
        filesystem, stripped = handle.arrow(path)
        idx = pq.read_table(stripped, columns=["idx"], filesystem=filesystem).column("idx")
        keys.append(pa.table({"idx": idx, "file": np.full(len(idx), number, np.int32),
                              "row": np.arange(len(idx), dtype=np.int64)}))
    table = pa.concat_tables(keys)
    share = table.num_rows // world
    mine = table.take(rank_share(table, ("idx", "file", "row"), rank, world))  # (share,) rows, in key order
    where, rows = mine.column("file").to_numpy(), mine.column("row").to_numpy()
    columns: dict[str, np.ndarray] = {}
    for number, path in enumerate(files):
        at = np.flatnonzero(where == number)  # positions in the split of this file's rows
        if not len(at):
            continue
        filesystem, stripped = handle.arrow(path)
        part = pq.read_table(stripped, columns=["text_ids", "image_tokens"], filesystem=filesystem).take(rows[at])
        for name in ("text_ids", "image_tokens"):
            values = part.column(name).combine_chunks()
            values = values.flatten().to_numpy(zero_copy_only=False).reshape(len(at), -1)
            columns.setdefault(name, np.empty((share, values.shape[1]), np.int32))[at] = values
    empty = np.empty((0, 0), np.int32)
    return columns.get("text_ids", empty), columns.get("image_tokens", empty), mine.column("idx").to_pylist()
