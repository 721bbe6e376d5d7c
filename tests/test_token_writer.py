"""Tests of painter.io.token_writer: one batch of encoded rows -> shard, errors and keys files; duplicates
removed afterwards from the shard files that hold them. Real Parquet files, no Ray."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from painter.io.shards import ShardInfo
from painter.io.rows import REASON, ROW, SOURCE
from painter.io.rows import find_duplicates
from painter.io.key_buckets import duplicate_rows
from painter.io.token_writer import KEYS_FOLDER, KEYS_SCHEMA, BatchReport, TokenWriter

INFO = ShardInfo("vq", "vocab", 32, text_len=4, img_len=3, img_vocab_size=512)


def encoded(rows: list[tuple]) -> pa.Table:
    """ImageEncoder-shaped output: rows of (idx, source, row, reason, truncated)."""
    idx, source, row, reason, truncated = (list(c) for c in zip(*rows))
    good = [r is None for r in reason]
    n = len(rows)
    ids = [[k, k, 0, 0] if g else None for k, g in enumerate(good)]
    tokens = [[k, k + 1, k + 2] if g else None for k, g in enumerate(good)]
    return pa.table({"idx": idx, "text": [f"t{k}" for k in range(n)], "text_ids": pa.array(ids, pa.list_(pa.int32())),
                     "image_tokens": pa.array(tokens, pa.list_(pa.int16())), "is_truncated": truncated,
                     SOURCE: source, ROW: pa.array(row, pa.int64()), REASON: pa.array(reason, pa.string())})


def parquet_rows(folder) -> int:
    return sum(pq.read_metadata(f).num_rows for f in sorted(folder.glob("*.parquet")))


def test_a_batch_splits_into_shard_errors_and_keys(tmp_path):
    writer = TokenWriter(str(tmp_path / "out"), str(tmp_path / "out" / "_rejected"), INFO, "tokenize")
    batch = encoded([("a", "f.tsv", 1, None, True), ("b", "f.tsv", 2, "bad base64", False),
                     ("c", "f.tsv", 3, None, False), ("d", "f.tsv", 4, "empty text", False)])
    report = writer.write(batch, "run-00000")
    assert (report.rows, report.truncated) == (4, 1)
    assert report.by_reason == {"bad base64": 1, "empty text": 1}
    assert report.first_rejection == ("f.tsv", 2, "bad base64")
    shard = pq.read_table(tmp_path / "out" / "part-run-00000.parquet")
    assert shard.schema == INFO.schema() and shard["idx"].to_pylist() == ["a", "c"]
    assert ShardInfo.from_schema(shard.schema, "x") == INFO
    rejected = pq.read_table(tmp_path / "out" / "_rejected" / "part-run-00000.parquet").to_pydict()
    assert rejected["idx"] == ["b", "d"] and rejected["row"] == [2, 4] and set(rejected["stage"]) == {"tokenize"}
    keys = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "out" / KEYS_FOLDER).rglob("*.parquet"))])
    assert keys.schema == KEYS_SCHEMA and keys.sort_by("_shard_row")["idx"].to_pylist() == ["a", "c"]
    keys = keys.sort_by("_shard_row")
    assert keys["_shard_row"].to_pylist() == [0, 1] and keys["is_truncated"].to_pylist() == [True, False]


def test_duplicates_leave_their_shard_for_the_errors_table(tmp_path):
    out = tmp_path / "out"
    writer = TokenWriter(str(out), str(out / "_rejected"), INFO, "tokenize")
    writer.write(encoded([("a", "f1.tsv", 5, None, False), ("b", "f1.tsv", 6, None, True)]), "r-1")
    writer.write(encoded([("a", "f1.tsv", 2, "not an image", False), ("a", "f0.tsv", 9, None, True),
                          ("b", "f2.tsv", 1, None, True)]), "r-2")
    dups = pa.concat_tables([writer.keys.duplicates(b) for b in writer.keys.buckets()])
    # a: f0.tsv:9 comes first (the rejected f1.tsv:2 does not count), so f1.tsv:5 goes; b: f1.tsv:6 stays
    assert sorted(zip(dups[SOURCE].to_pylist(), dups[ROW].to_pylist(), dups[REASON].to_pylist())) == [
        ("f1.tsv", 5, "duplicate idx (first at f0.tsv:9)"), ("f2.tsv", 1, "duplicate idx (first at f1.tsv:6)")]
    writer.remove_rows(dups, "r-dups")
    assert pq.read_table(out / "part-r-1.parquet")["idx"].to_pylist() == ["b"]
    assert pq.read_table(out / "part-r-2.parquet")["idx"].to_pylist() == ["a"]
    assert parquet_rows(out / "_rejected") == 3
    writer.keys.remove()
    assert not (out / KEYS_FOLDER).exists()


def test_a_shard_left_empty_is_deleted(tmp_path):
    out = tmp_path / "out"
    writer = TokenWriter(str(out), str(out / "_rejected"), INFO, "tokenize")
    writer.write(encoded([("a", "f.tsv", 1, None, False)]), "r-1")
    writer.write(encoded([("a", "f.tsv", 2, None, False)]), "r-2")
    assert len(writer.keys.buckets()) == 1  # every row of an idx lands in the same bucket
    writer.remove_rows(writer.keys.duplicates(writer.keys.buckets()[0]), "r-dups")
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-r-1.parquet"]


def test_reports_add_up():
    a = BatchReport(3, 1, {"bad base64": 2}, ("f.tsv", 4, "bad base64"))
    b = BatchReport.of_rejections(["duplicate idx (first at f.tsv:1)", "bad base64 (x)"], ["f.tsv", "e.tsv"], [9, 7])
    total = a.merge(b)
    assert (total.rows, total.truncated) == (3, 1)
    assert total.by_reason == {"bad base64": 3, "duplicate idx": 1}
    assert total.first_rejection == ("e.tsv", 7, "bad base64 (x)")


def test_no_duplicates_give_an_empty_table():
    keys = KEYS_SCHEMA.empty_table()
    assert duplicate_rows(keys).num_rows == 0 and find_duplicates(keys) == {}
    one = pa.table({"idx": ["x"], SOURCE: ["f"], ROW: [1], REASON: pa.array([None], pa.string()), "_shard": ["s"],
                    "_shard_row": [0], "is_truncated": [False]}, schema=KEYS_SCHEMA)
    assert duplicate_rows(pa.concat_tables([one, one.set_column(2, ROW, pa.array([2], pa.int64()))]))[ROW].to_pylist() == [2]
    assert np.array_equal(duplicate_rows(one)[ROW].to_numpy(), np.array([], np.int64))
