"""The output root and its Delta table, without Ray: safe partition paths, commits that keep every
(run_date, idx, sample) once, vacuum of orphans, S3 on moto with conditional put, DuckDB over Arrow,
the EasyNLP TSV."""
from __future__ import annotations

import ast
import base64
import io
import os

import duckdb
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from PIL import Image

from painter.errors import InputError
from painter.io.easynlp_tsv import write_easynlp_tsv
from painter.io import output as out
from painter.io import output_table as ot
from painter.io.key_buckets import write_part

HOSTILE = ["../../etc", "a/b", "\x00", "..", ".", "", None, "x" * 600, "长" * 300, "a\\b", "C:\\Windows",
           "__HIVE_DEFAULT_PARTITION__", "%2F", "a=b", "*?[", "line\nbreak", "\u202eevil", "女装", "shoes",
           ".hidden", "~tilde", " "]
DATE = "2024-05-01"
SCHEMA = pa.schema([("idx", pa.string()), ("text", pa.string()), ("sample", pa.int64()), ("image", pa.binary()),
                    ("run_date", pa.string()), ("category", pa.string())])


def _rows(idx: list[str], samples: list[int], category: list | None = None, date: str = DATE) -> pa.Table:
    n = len(idx)
    return pa.table({"idx": idx, "text": [f"t{i}" for i in idx], "sample": pa.array(samples, pa.int64()),
                     "image": pa.array([f"img-{i}-{s}".encode() for i, s in zip(idx, samples)], pa.binary()),
                     "run_date": [date] * n, "category": pa.array(category or ["c"] * n, pa.string())},
                    schema=SCHEMA)


def _table(root: str, storage_options=None) -> ot.OutputTable:
    table = ot.OutputTable(root, storage_options)
    table.ensure(SCHEMA, ["run_date", "category"])
    return table


def _write_and_commit(table: ot.OutputTable, rows: pa.Table, batch: str, date: str = DATE) -> ot.CommitResult:
    files = table.write_files(rows, ["run_date", "category"], batch)
    return table.commit(files, date, SCHEMA, ["run_date", "category"], "run-test")


def _pairs(table: pa.Table) -> list[tuple[str, int]]:
    return sorted(zip(table.column("idx").to_pylist(), table.column("sample").to_pylist()))


@pytest.mark.parametrize("value", HOSTILE)
def test_partition_values_are_safe_path_segments(value):
    segment = ot.encode_partition_value(value)
    assert segment and segment not in (".", "..")
    assert not any(ch in segment for ch in "/\\\x00\n\r") and all(ord(ch) >= 32 for ch in segment)
    assert len(segment.encode()) <= ot.MAX_SEGMENT_BYTES
    if "~" not in segment:  # only shortened long values carry '~' (a literal '~' is encoded)
        assert ot.decode_partition_value(segment) == (None if value in (None, "") else value)


def test_partition_encoding_is_injective_and_keeps_readable_names():
    encoded = [ot.encode_partition_value(v) for v in HOSTILE if v is not None]  # '' and None share the null name
    assert len(set(encoded)) == len(encoded)
    assert ot.encode_partition_value("女装") == "女装" and ot.encode_partition_value("a/b") == "a%2Fb"
    assert ot.encode_partition_value("x" * 600) != ot.encode_partition_value("x" * 601)  # hashed, still distinct


def test_run_date_and_partition_columns_are_checked():
    for bad in ("2024-13-01", "2024-5-1", "../x", "", "2024-05-01/x"):
        with pytest.raises(InputError, match="run-date"):
            out.check_run_date(bad)
    for bad in (["../x"], ["a/b"], ["_hidden"], ["run_date"], ["png"], ["c", "c"]):
        with pytest.raises(InputError, match="partition-by"):
            out.check_partition_columns(bad, reserved=["png"])
    assert out.check_partition_columns(["category", "shop_id"]) == ["category", "shop_id"]


def test_hostile_partitions_stay_inside_the_table_and_read_back_exactly(tmp_path):
    root = tmp_path / "deep" / "out"
    table = _table(str(root))
    rows = _rows([str(i) for i in range(len(HOSTILE))], [0] * len(HOSTILE), HOSTILE)
    assert _write_and_commit(table, rows, "b1").rows == len(HOSTILE)
    for folder, _, files in os.walk(tmp_path):
        for name in files:
            assert os.path.realpath(os.path.join(folder, name)).startswith(os.path.realpath(root) + os.sep)
    back = DeltaTable(str(root)).to_pyarrow_table(columns=["idx", "category"]).to_pylist()  # any Delta reader
    assert sorted((r["idx"], r["category"]) for r in back) == sorted(
        (str(i), None if v in (None, "") else v) for i, v in enumerate(HOSTILE))


def test_uncommitted_files_are_invisible_and_a_commit_keeps_each_pair_once(tmp_path):
    table = _table(str(tmp_path / "out"))
    first = table.write_files(_rows(["1", "2"], [0, 0]), ["run_date", "category"], "b1")
    assert table.read(DATE).num_rows == 0  # written, not committed: no reader sees it
    result = table.commit(first, DATE, SCHEMA, ["run_date", "category"], "run1")
    assert (result.version, result.files, result.rows) == (1, 1, 2)
    # another run wrote the same pairs and one new one in one file, and a wholly new file:
    overlap = table.write_files(_rows(["2", "3"], [0, 0]), ["run_date", "category"], "b2")
    fresh = table.write_files(_rows(["4"], [1]), ["run_date", "category"], "b3")
    result = table.commit(pa.concat_tables([overlap, fresh, first]), DATE, SCHEMA, ["run_date", "category"], "run2")
    assert (result.files, result.rows, result.left_out) == (1, 1, [("3", 0)])
    assert _pairs(table.read(DATE)) == [("1", 0), ("2", 0), ("4", 1)]
    dt = DeltaTable(str(tmp_path / "out"))
    assert dt.version() == 2 and dt.transaction_version(f"{ot.APP_ID}/{DATE}") == 2


def test_stale_snapshots_conflict_on_the_nights_transaction_id(tmp_path):
    """Two writers of the same night that read the same version: Delta's checker refuses the second."""
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import CommitProperties, Transaction

    table = _table(str(tmp_path / "out"))
    stale = table.delta()
    _write_and_commit(table, _rows(["1"], [0]), "b1")
    files = table.write_files(_rows(["1"], [0]), ["run_date", "category"], "b2")
    properties = CommitProperties(app_transactions=[Transaction(f"{ot.APP_ID}/{DATE}", 1)])
    with pytest.raises(CommitFailedError, match="Concurrent transaction"):
        stale.create_write_transaction([table._add(r) for r in files.to_pylist()], "append", SCHEMA,
                                       ["run_date", "category"], commit_properties=properties)
    assert _pairs(table.read(DATE)) == [("1", 0)]


def test_schema_grows_and_partitioning_must_match(tmp_path):
    table = _table(str(tmp_path / "out"))
    wider = SCHEMA.append(pa.field("shop", pa.int64()))
    table.ensure(wider, ["run_date", "category"])
    assert pa.schema(DeltaTable(str(tmp_path / "out")).schema().to_arrow()).field("shop").type == pa.int64()
    with pytest.raises(InputError, match="partitioned by"):
        table.ensure(SCHEMA, ["run_date"])
    with pytest.raises(InputError, match="column 'sample'"):
        table.ensure(SCHEMA.set(2, pa.field("sample", pa.string())), ["run_date", "category"])


def test_vacuum_removes_orphans_and_keeps_committed_and_side_folders(tmp_path):
    root = out.OutputRoot(str(tmp_path / "out"), DATE)
    table = _table(root.output)
    _write_and_commit(table, _rows(["1"], [0]), "b1")
    orphan = table.write_files(_rows(["2"], [0]), ["run_date", "category"], "b2")  # a killed run's file
    rejected = write_part(pa.table({"idx": ["x"]}), root.rejected_folder(), "r")
    sheet = root.write_sheet("contact_sheet.png", b"png")
    record = root.write_run_record("run1", {"summary": {}})
    assert table.vacuum() == 0  # younger than the table's 7-day retention: a running run may still commit it
    assert table.vacuum(retention_hours=0, enforce_retention=False) == 1
    assert not os.path.exists(os.path.join(root.output, orphan.column("path")[0].as_py()))
    assert all(os.path.exists(p) for p in (rejected, sheet, record))
    assert _pairs(table.read(DATE)) == [("1", 0)]


def test_duckdb_counts_a_night_per_partition_through_arrow(tmp_path):
    table = _table(str(tmp_path / "out"))
    _write_and_commit(table, _rows(["1", "2", "3"], [0, 0, 1], ["shoes", "hats", "shoes"]), "b1")
    _write_and_commit(table, _rows(["1"], [0], ["shoes"], "2024-05-02"), "b2", "2024-05-02")
    night = DeltaTable(str(tmp_path / "out")).to_pyarrow_table(filters=[("run_date", "=", DATE)])  # noqa: F841
    counts = duckdb.sql("select run_date, category, count(*) n from night group by all order by all").fetchall()
    assert counts == [(DATE, "hats", 1), (DATE, "shoes", 2)]
    everything = DeltaTable(str(tmp_path / "out")).to_pyarrow_table()  # noqa: F841
    assert duckdb.sql("select count(distinct run_date) from everything").fetchall() == [(2,)]
    assert table.run_dates() == [DATE, "2024-05-02"]


def test_output_table_on_s3_with_conditional_put(s3_bucket):
    bucket, storage_options = s3_bucket
    options = ot.delta_storage_options(f"s3://{bucket}/gen", storage_options)
    assert options["aws_conditional_put"] == "etag" and options["AWS_ALLOW_HTTP"] == "true"
    table = _table(f"s3://{bucket}/gen", storage_options)
    _write_and_commit(table, _rows(["1", "2"], [0, 1], ["a/b", None]), "b1")
    again = _write_and_commit(table, _rows(["2", "3"], [1, 0], [None, "a/b"]), "b2")  # a file per partition:
    assert (again.files, again.rows) == (1, 1)  # the one holding ("2", 1) again is left out
    assert _pairs(table.read(DATE)) == [("1", 0), ("2", 1), ("3", 0)]
    keys = table.fs.find(f"{bucket}/gen")
    assert f"{bucket}/gen/_delta_log/00000000000000000001.json" in keys
    assert sorted(r["category"] or "" for r in table.read(DATE, ["category"]).to_pylist()) == ["", "a/b", "a/b"]
    assert table.first_idx(DATE, 2) == ["1", "2"]


def test_first_idx_is_the_nights_smallest_distinct_idx_across_its_files(tmp_path):
    table = ot.OutputTable(str(tmp_path / "gen"))
    assert table.first_idx(DATE, 3) == []  # no table yet
    table.ensure(SCHEMA, ["run_date", "category"])
    _write_and_commit(table, _rows(["9", "4", "4", "7"], [0, 0, 1, 0], ["a", "b", "b", "a"]), "b1")
    _write_and_commit(table, _rows(["5", "2"], [0, 0], ["b", "c"]), "b2")
    _write_and_commit(table, _rows(["1", "3"], [0, 0], date="2024-05-02"), "b3", date="2024-05-02")
    assert table.first_idx(DATE, 3) == ["2", "4", "5"]
    assert table.first_idx(DATE, 10) == ["2", "4", "5", "7", "9"]
    assert table.first_idx("2024-05-02", 10) == ["1", "3"]
    assert table.first_idx("2024-06-01", 10) == [] and table.first_idx(DATE, 0) == []


def test_easynlp_tsv_has_one_line_per_idx_with_a_list_of_images(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format="PNG")
    rows = pa.table({"idx": ["1", "1"], "text": ["宽松\tT恤\n"] * 2, "sample": [1, 0],
                     "image": pa.array([buffer.getvalue()] * 2, pa.binary())})
    path = str(tmp_path / "gen.tsv")
    assert write_easynlp_tsv(rows, path, "image") == 1  # EasyNLP's predict format: a line per input
    lines = open(path, encoding="utf-8").read().splitlines()
    assert len(lines) == 1
    idx, text, images = lines[0].split("\t")
    assert (idx, text) == ("1", "宽松 T恤 ")
    assert images.startswith("['iVBOR") and len(ast.literal_eval(images)) == 2
    assert all(Image.open(io.BytesIO(base64.urlsafe_b64decode(i))).size == (4, 4) for i in ast.literal_eval(images))


def test_write_atomic_replaces_and_leaves_no_temp_files(tmp_path):
    path = str(tmp_path / "a" / "record.json")
    out.write_bytes(path, b"one")
    out.write_bytes(path, b"two")
    assert open(path, "rb").read() == b"two" and os.listdir(tmp_path / "a") == ["record.json"]
