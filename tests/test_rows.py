"""painter.io.rows: the row bookkeeping every job shares (no Ray): image cells, duplicates, empty tables."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from painter.io import rows
from painter.io.rows import REASON, ROW, SOURCE
from painter.io.key_buckets import KeyBuckets, duplicate_rows
from painter.io.token_writer import KEYS_SCHEMA
from painter.stages import generate_prompts


def test_image_cells_are_chosen_per_row_in_column_order():
    table = pa.table({"imgbase64": ["aGk=", None, None], "image": [b"x", b"\x89PNG", None]})
    cells, is_base64 = rows.image_cells(table, ("imgbase64",), ("image",))
    assert cells == ["aGk=", b"\x89PNG", None] and is_base64 == [True, False, True]
    chunk = {"gen_imgbase64": [None, "b64"], "png": [b"p", b"q"], SOURCE: ["f", "f"]}
    cells, is_base64 = rows.image_cells(chunk, ("imgbase64", "gen_imgbase64"), ("png", "image"))
    assert cells == [b"p", "b64"] and is_base64 == [False, True]
    # every cell of a TSV is text, whatever its column is called
    assert rows.image_cells(chunk, ("imgbase64",), ("png",), text_file=True)[1] == [True, True]
    assert rows.image_cells({"text": ["a"]}, ("imgbase64",), ("image",)) is None


def test_tokenize_and_generate_reject_a_repeated_idx_with_the_same_reason(tmp_path):
    table = pa.table({"idx": ["a", "b", "a", "a"], "text": ["t"] * 4, SOURCE: ["f2", "f1", "f1", "f1"],
                      ROW: [1, 9, 4, 2], REASON: [None, None, None, "not an image"]})
    # the first good row by (file, row) is f1:4; the rejected f1:2 does not count
    generate_keys = KeyBuckets(str(tmp_path / "keys"), generate_prompts.KEYS_SCHEMA)
    generate_keys.write(generate_prompts.check_prompts(table), "b1")
    found = pa.concat_tables([generate_keys.duplicates(b) for b in generate_keys.buckets()])
    by_row = {(r[SOURCE], r[ROW]): r[REASON] for r in found.to_pylist()}
    assert by_row == {("f2", 1): "duplicate idx (first at f1:4)"}
    keys = table.select(["idx", SOURCE, ROW, REASON]).append_column("_shard", pa.array(["s"] * 4)) \
        .append_column("_shard_row", pa.array(range(4), pa.int64())).append_column("is_truncated", pa.array([False] * 4))
    dups = duplicate_rows(keys.cast(KEYS_SCHEMA))
    assert list(zip(dups[SOURCE].to_pylist(), dups[REASON].to_pylist())) == [("f2", by_row[("f2", 1)])]
    assert by_row[("f2", 1)] == rows.duplicate_reason("f1", 4)


def test_empty_rows_carry_the_bookkeeping_columns():
    empty = rows.empty_rows("idx", "text")
    assert empty.num_rows == 0 and empty.column_names == ["idx", "text", SOURCE, ROW, REASON]
    assert empty.schema.field(ROW).type == pa.int64()


def test_rank_share_deals_rows_by_key_whatever_their_order():
    keys = pa.table({SOURCE: ["b", "a", "a", "b", "a"], ROW: [1, 2, 1, 2, 3]})  # (a,1) (a,2) (a,3) (b,1) (b,2)
    assert [rows.rank_share(keys, (SOURCE, ROW), r, 2).tolist() for r in (0, 1)] == [[2, 4], [1, 0]]
    assert rows.rank_share(keys, (SOURCE, ROW), 0, 2, equal=False).tolist() == [2, 4, 3]  # evaluation: all
    shuffled = keys.take([4, 3, 2, 1, 0])
    picked = shuffled.take(rows.rank_share(shuffled, (SOURCE, ROW), 1, 2))
    assert list(zip(picked[SOURCE].to_pylist(), picked[ROW].to_pylist())) == [("a", 2), ("b", 1)]


def test_pair_keys_tell_pairs_apart_and_pairs_in_finds_them():
    idx, sample = ["a", "a", "b", "a\x1f1", "1"], [0, 1, 0, 0, 0]
    keys = rows.pair_keys(idx, sample)
    assert keys.dtype == np.uint64 and len(set(keys.tolist())) == 5  # ("a\x1f1", 0) is not ("a", 10)
    assert np.array_equal(keys, rows.pair_keys(list(idx), list(sample)))  # the same in every process
    committed = np.unique(keys[[0, 2]])
    assert rows.pairs_in(keys, committed).tolist() == [True, False, True, False, False]
    assert rows.pairs_in(keys, np.empty(0, np.uint64)).tolist() == [False] * 5
