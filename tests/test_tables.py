"""Tests of painter.io.tables: schema parsing, row-by-row TSV/Parquet reading with reasons, path expansion."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from painter.errors import InputError
from painter.io import tables
from painter.io import rows
from painter.io.rows import REASON, REJECTED_SCHEMA, ROW, SOURCE
from painter.io.tables import Column, parse_schema

SCHEMA = parse_schema("idx:str:1,text:str:1,imgbase64:str:1")


def read_all(path, schema=SCHEMA, **kwargs) -> dict[str, list]:
    """Every chunk of one file, concatenated column by column."""
    out: dict[str, list] = {}
    for chunk in tables.iter_rows(str(path), schema, **kwargs):
        for name, values in chunk.items():
            out.setdefault(name, []).extend(values)
    return out


# --- schema -------------------------------------------------------------------------------------

def test_parse_schema_easynlp_style():
    assert SCHEMA == [Column("idx", "str", 1), Column("text", "str", 1), Column("imgbase64", "str", 1)]
    assert parse_schema(" idx , text:str ") == [Column("idx"), Column("text")]


@pytest.mark.parametrize("spec, message", [
    ("idx,,text", "bad --input-schema entry ''"),
    ("idx:str:1:x", "bad --input-schema entry 'idx:str:1:x'"),
    ("idx:str:2", "only a count of 1 is supported, got 2"),
    ("idx,text,idx", "names a column twice"),
])
def test_parse_schema_errors(spec, message):
    with pytest.raises(InputError, match=message):
        parse_schema(spec)


# --- TSV ----------------------------------------------------------------------------------------

def test_tsv_rows_keep_file_and_row_numbers_and_reasons(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_bytes(b"1\tone\tAAAA\n"          # 1 good
                     b"2\ttwo\n"                 # 2 too few fields
                     b"\n"                       # 3 blank line inside the file
                     b"3\tthree\tBBBB\textra\n"  # 4 too many fields
                     b"4\t\xff\xfe\tCCCC\n"      # 5 not UTF-8
                     b"5\tfive\tDDDD\r\n"        # 6 CRLF line ending
                     b"6\t\t\n"                  # 7 empty cells are values, judged later
                     b"\n\n")                    # trailing blank lines are not rows
    rows = read_all(path)
    assert rows[ROW] == [1, 2, 3, 4, 5, 6, 7]
    assert set(rows[SOURCE]) == {str(path)}
    assert rows[REASON] == [
        None,
        "expected 3 tab-separated fields (idx,text,imgbase64), got 2",
        "empty line",
        "expected 3 tab-separated fields (idx,text,imgbase64), got 4",
        "not UTF-8 text (byte 2)",
        None,
        None,
    ]
    assert rows["idx"] == ["1", None, None, None, None, "5", "6"]
    assert rows["imgbase64"][5] == "DDDD"  # the \r is not part of the cell
    assert rows["text"][6] == "" and rows["imgbase64"][6] == ""


def test_tsv_chunks_and_a_long_line(tmp_path):
    path = tmp_path / "big.tsv"
    long_cell = "A" * 3_000_000  # longer than any read buffer
    path.write_text("".join(f"{i}\tt{i}\tB\n" for i in range(10)) + f"10\tlong\t{long_cell}\n")
    chunks = list(tables.iter_rows(str(path), SCHEMA, chunk_rows=4))
    assert [len(c["idx"]) for c in chunks] == [4, 4, 3]
    assert chunks[-1]["imgbase64"][-1] == long_cell and chunks[-1][REASON][-1] is None


def test_empty_tsv_has_no_rows(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("\n\n")
    assert list(tables.iter_rows(str(path), SCHEMA)) == []


def test_csv_is_read_as_csv_with_a_header_row_never_split_on_tabs(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text('idx,text,imgbase64\n1,"one, two\tthree",AAAA\n2,two\n')
    rows = read_all(path)
    assert rows["text"] == ["one, two\tthree", None] and rows[ROW] == [2, 3]
    assert rows[REASON] == [None, "expected 3 comma-separated fields (idx,text,imgbase64), got 2"]
    path.write_text("1,one,AAAA\n2,two,BBBB\n")  # no header: its rows lack the columns (preflight refuses it)
    assert read_all(path)[REASON] == ["missing column 'idx'"]


# --- Parquet ------------------------------------------------------------------------------------

def test_parquet_rows_with_alternative_image_column(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"idx": ["a", "b", None], "text": ["x", None, "z"], "image": [b"\x89PNG", None, b"x"],
                             "extra": [1, 2, 3]}), path)
    rows = read_all(path, alternatives={"imgbase64": "image"}, chunk_rows=2)
    assert rows[ROW] == [1, 2, 3] and rows[REASON] == [None, None, None]  # nulls are judged by the stage
    assert rows["image"][0] == b"\x89PNG" and rows["extra"] == [1, 2, 3] and "imgbase64" not in rows


def test_parquet_missing_column_rejects_every_row(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"idx": ["a", "b"], "imgbase64": ["AAAA", "BBBB"]}), path)
    rows = read_all(path)
    assert rows[REASON] == ["missing column 'text'"] * 2 and rows["text"] == [None, None]
    pq.write_table(pa.table({"idx": ["a"], "text": ["t"]}), path)
    assert read_all(path, alternatives={"imgbase64": "image"})[REASON] == ["missing column 'imgbase64'"]


def test_unreadable_parquet_is_an_input_error(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(InputError, match=f"{path}: not a readable Parquet file"):
        read_all(path)


# --- paths --------------------------------------------------------------------------------------

def test_expand_paths_files_globs_and_directories(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a.tsv", "d/b.parquet", "d/sub/c.txt", "d/_rejected.tsv", "d/.hidden.tsv", "d/notes.md"):
        (tmp_path / name).write_text("x")
    found = tables.expand_paths([str(tmp_path / "d")])
    assert [p.removeprefix(str(tmp_path) + "/") for p in found] == ["d/a.tsv", "d/b.parquet", "d/sub/c.txt"]
    globbed = tables.expand_paths([str(tmp_path / "d" / "*.tsv")])  # a glob is not filtered by name
    assert globbed == sorted(globbed) and {str(tmp_path / "d" / n) for n in ("a.tsv", "_rejected.tsv")} <= set(globbed)
    assert str(tmp_path / "d" / "sub" / "c.txt") not in globbed
    assert tables.expand_paths([str(tmp_path / "d" / "a.tsv")]) == [str(tmp_path / "d" / "a.tsv")]


def test_expand_paths_errors(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        tables.expand_paths([str(tmp_path / "missing.tsv")])
    with pytest.raises(InputError, match="matches no input files"):
        tables.expand_paths([str(tmp_path / "*.parquet")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="matches no input files"):
        tables.expand_paths([str(tmp_path / "empty")])


def test_is_parquet_and_rejected_table():
    assert tables.is_parquet("s3://b/x.parquet") and not tables.is_parquet("x.tsv")
    table = rows.rejected_table([None, 7], ["f.tsv", "f.tsv"], [1, 2], ["r1", "r2"], "tokenize")
    assert table.schema == REJECTED_SCHEMA
    assert table.to_pydict() == {"idx": [None, "7"], "source": ["f.tsv", "f.tsv"], "row": [1, 2],
                                 "stage": ["tokenize", "tokenize"], "reason": ["r1", "r2"]}


def test_read_split_deals_every_rank_an_equal_disjoint_share_in_idx_order(tmp_path):
    """The train job's in-memory split: whatever the files' order of rows, rank r of w gets the same rows in
    every run (round-robin over (idx, file, row)), w shares of rows // w rows, each row's own tokens."""
    import numpy as np

    from painter.io.shards import ShardInfo, read_split, shard_table

    info = ShardInfo("vq", "vocab", 32, text_len=3, img_len=4, img_vocab_size=256)
    rng = np.random.default_rng(0)
    names = [f"row-{k:02d}" for k in rng.permutation(23)]  # 23 rows over 3 files, out of idx order
    files = []
    for f, part in enumerate((names[:9], names[9:10], names[10:])):
        numbers = np.array([int(n[4:]) for n in part])
        text_ids = np.repeat(numbers[:, None], 3, axis=1).astype(np.int32)  # every token names its row
        path = str(tmp_path / f"part-{f}.parquet")
        pq.write_table(shard_table(info, part, part, text_ids, text_ids[:, :1].repeat(4, axis=1) + 100), path)
        files.append(path)
    for world in (1, 2, 3):
        shares = [read_split(files, rank, world) for rank in range(world)]
        seen = [idx for _, _, share in shares for idx in share]
        assert all(len(share) == 23 // world for _, _, share in shares)
        assert len(set(seen)) == len(seen) and set(seen) <= set(names)
        for text_ids, image_tokens, idx in shares:
            assert idx == sorted(idx)
            numbers = np.array([int(i[4:]) for i in idx])
            assert (text_ids == numbers[:, None]).all() and (image_tokens == numbers[:, None] + 100).all()
            assert text_ids.dtype == image_tokens.dtype == np.int32
        assert shares[-1][2] == read_split(list(reversed(files)), world - 1, world)[2]  # not the files' order


def test_row_bytes_is_the_arrow_size_of_a_files_first_rows_as_read(tmp_path):
    schema = parse_schema("idx,text")
    tsv = tmp_path / "a.tsv"
    tsv.write_bytes(b"".join(b"%05d\t" % i + b"x" * 994 + b"\n" for i in range(3000)))
    first = pa.table(next(tables.iter_tsv(str(tsv), schema, chunk_rows=tables.SAMPLE_ROWS)))
    assert first.num_rows == tables.SAMPLE_ROWS
    assert tables.row_bytes(str(tsv), schema) == first.nbytes / first.num_rows
    assert 1000 < tables.row_bytes(str(tsv), schema) < 1000 + 2 * len(str(tsv)) + 64  # cells + bookkeeping
    images = [bytes([i % 256, i // 256]) * 2000 for i in range(500)]
    pq.write_table(pa.table({"idx": [str(i) for i in range(500)], "image": images}), tmp_path / "a.parquet",
                   compression="zstd")  # a few KB on disk; the estimate is what a read row takes
    assert 4000 < tables.row_bytes(str(tmp_path / "a.parquet"), parse_schema("idx,imgbase64"),
                                   alternatives={"imgbase64": "image"}) < 4000 + 2 * len(str(tmp_path)) + 128
    (tmp_path / "empty.tsv").write_bytes(b"")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    assert tables.row_bytes(str(tmp_path / "empty.tsv"), schema) is None
    assert tables.row_bytes(str(tmp_path / "bad.parquet"), schema) is None
