"""The output table: safe partition paths, staging, the `_SUCCESS` commit, crash recovery, EasyNLP TSV."""
from __future__ import annotations

import ast
import base64
import io
import json
import os
import posixpath

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from painter.errors import InputError
from painter.io import output as out

HOSTILE = ["../../etc", "a/b", "\x00", "..", ".", "", None, "x" * 600, "长" * 300, "a\\b", "C:\\Windows",
           "__HIVE_DEFAULT_PARTITION__", "%2F", "a=b", "*?[", "line\nbreak", "\u202eevil", "女装", "shoes",
           ".hidden", "~tilde", " "]
SIG = "sig-a"


def _rows(idx: list[str], samples: list[int], category: list | None = None) -> pa.Table:
    data = {"idx": idx, "text": [f"t{i}" for i in idx], "sample": pa.array(samples, pa.int64()),
            "png": [f"img-{i}-{s}".encode() for i, s in zip(idx, samples)]}
    if category is not None:
        data["category"] = pa.array(category, pa.string())
    return pa.table(data)


def _files_under(root) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]


@pytest.mark.parametrize("value", HOSTILE)
def test_partition_values_are_safe_path_segments(value):
    segment = out.encode_partition_value(value)
    assert segment and segment not in (".", "..")
    assert not any(ch in segment for ch in "/\\\x00\n\r") and all(ord(ch) >= 32 for ch in segment)
    assert len(segment.encode()) <= out.MAX_SEGMENT_BYTES
    if "~" not in segment:  # only shortened long values carry '~' (a literal '~' is encoded)
        assert out.decode_partition_value(segment) == (None if value in (None, "") else value)


def test_partition_encoding_is_injective_and_keeps_readable_names():
    encoded = [out.encode_partition_value(v) for v in HOSTILE if v is not None]  # '' and None share the null name
    assert len(set(encoded)) == len(encoded)
    assert out.encode_partition_value("女装") == "女装" and out.encode_partition_value("shoes") == "shoes"
    assert out.encode_partition_value("a/b") == "a%2Fb"
    assert out.encode_partition_value("x" * 600) != out.encode_partition_value("x" * 601)  # hashed, still distinct
    with pytest.raises(ValueError, match="hash"):
        out.decode_partition_value(out.encode_partition_value("x" * 600))


def test_hostile_partitions_stay_inside_the_output_and_round_trip(tmp_path):
    root = tmp_path / "deep" / "out"
    table = out.OutputTable(str(root), "2024-05-01")
    values = [v for v in HOSTILE]
    rows = _rows([str(i) for i in range(len(values))], [0] * len(values), values)
    staged = table.stage(rows, "run1", ["category"], SIG)
    table.commit(staged, "run1")
    for path in _files_under(tmp_path):
        assert os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)
    back = table.read(["idx", "category"]).to_pylist()
    assert sorted((r["idx"], r["category"]) for r in back) == sorted(
        (str(i), None if v in (None, "") else v) for i, v in enumerate(values))
    # a Hive reader decodes the percent-encoded names by itself (None and '' read back as null)
    hive = pads.dataset(str(root), partitioning="hive").to_table(columns=["idx", "category"]).to_pylist()
    decoded = {r["idx"]: r["category"] for r in hive}
    assert decoded["0"] == "../../etc" and decoded["1"] == "a/b" and decoded[str(HOSTILE.index("女装"))] == "女装"
    assert decoded[str(HOSTILE.index(""))] is None


def test_run_date_and_partition_columns_are_checked():
    for bad in ("2024-13-01", "2024-5-1", "../x", "", "2024-05-01/x"):
        with pytest.raises(InputError, match="run-date"):
            out.check_run_date(bad)
    assert out.check_run_date("2024-02-29") == "2024-02-29"
    for bad in (["../x"], ["a/b"], ["_hidden"], ["run_date"], ["png"], ["c", "c"]):
        with pytest.raises(InputError, match="partition-by"):
            out.check_partition_columns(bad, reserved=["png"])
    assert out.check_partition_columns(["category", "shop_id"]) == ["category", "shop_id"]


def test_commit_lists_files_and_readers_trust_only_listed_files(tmp_path):
    table = out.OutputTable(str(tmp_path / "out"), "2024-05-01")
    staged = table.stage(_rows(["1", "2"], [0, 0]), "run1", [], SIG)
    assert table.committed_pairs().num_rows == 0  # staged is not committed
    assert table.commit(staged, "run1") == {"run_date=2024-05-01": 2}
    stray = tmp_path / "out" / "run_date=2024-05-01" / "part-stray.parquet"  # e.g. copied by a crashed commit
    pq.write_table(_rows(["9"], [0]), stray)
    assert sorted(out.pairs(table.committed_pairs())) == [("1", 0), ("2", 0)]
    manifest = json.loads((tmp_path / "out" / "run_date=2024-05-01" / "_SUCCESS").read_text())
    assert manifest["partition"] == {"run_date": "2024-05-01"} and [f["rows"] for f in manifest["files"]] == [2]
    assert not [p for p in _files_under(tmp_path / "out" / "_staging") if p.endswith(".parquet")]
    second = table.stage(_rows(["3"], [1]), "run2", [], SIG)
    table.commit(second, "run2")
    assert sorted(out.pairs(table.committed_pairs())) == [("1", 0), ("2", 0), ("3", 1)]


def _crashed_run(table: out.OutputTable, run_id: str, rows: pa.Table, signature: str = SIG):
    table.start_run(run_id, signature, {})
    return table.stage(rows, run_id, [], signature)


def test_recovery_after_a_crash_before_the_commit(tmp_path):
    table = out.OutputTable(str(tmp_path / "out"), "2024-05-01")
    staged = _crashed_run(table, "run1", _rows(["1", "2"], [0, 0]))
    # the crash hit while copying: the file is in the partition folder, but unlisted
    folder = tmp_path / "out" / "run_date=2024-05-01"
    folder.mkdir(parents=True)
    (folder / posixpath.basename(staged[0].path)).write_bytes(open(staged[0].path, "rb").read())
    recovery = table.recover(SIG, committed=set())
    assert recovery.pairs == {("1", 0), ("2", 0)} and len(recovery.files) == 1
    table.commit(recovery.files, "run2")
    table.remove_runs(recovery.runs)
    assert sorted(out.pairs(table.committed_pairs())) == [("1", 0), ("2", 0)]
    assert not os.path.exists(table.staging_dir("run1"))


def test_recovery_after_a_crash_between_success_and_cleanup(tmp_path):
    table = out.OutputTable(str(tmp_path / "out"), "2024-05-01")
    staged = _crashed_run(table, "run1", _rows(["1"], [0]))
    copies = {s.path: open(s.path, "rb").read() for s in staged}
    table.commit(staged, "run1")
    for path, data in copies.items():  # as if the staged copies had not been deleted yet
        with open(path, "wb") as f:
            f.write(data)
    committed = set(out.pairs(table.committed_pairs()))
    recovery = table.recover(SIG, committed)
    assert recovery.files == [] and recovery.discarded_files == 1 and recovery.pairs == set()
    assert table.committed_pairs().num_rows == 1


def test_recovery_discards_cut_off_files_and_deduplicates_overlaps(tmp_path):
    table = out.OutputTable(str(tmp_path / "out"), "2024-05-01")
    _crashed_run(table, "run1", _rows(["1", "2"], [0, 0]))
    _crashed_run(table, "run2", _rows(["2", "3"], [0, 0]))  # overlaps run1 on ("2", 0)
    broken = posixpath.join(table.staging_dir("run2"), "run_date=2024-05-01", "part-broken.parquet")
    with open(broken, "wb") as f:
        f.write(b"PAR1 cut off")
    table.commit(table.stage(_rows(["0"], [0]), "run0", [], SIG), "run0")  # ("0", 0) committed
    table.remove_runs([table.staging_dir("run0")])
    _crashed_run(table, "run3", _rows(["0", "4"], [0, 0]))  # half of it committed already
    _crashed_run(table, "other", _rows(["5"], [0]), signature="sig-b")
    committed = set(out.pairs(table.committed_pairs()))
    recovery = table.recover(SIG, committed)
    assert recovery.pairs == {("1", 0), ("2", 0), ("3", 0), ("4", 0)}
    assert recovery.discarded_files == 1 and len(recovery.ignored_runs) == 1
    table.commit(recovery.files, "run4")
    table.remove_runs(recovery.runs)
    pairs = out.pairs(table.committed_pairs())
    assert sorted(pairs) == [("0", 0), ("1", 0), ("2", 0), ("3", 0), ("4", 0)]  # each exactly once
    assert os.path.exists(table.staging_dir("other")) and not os.path.exists(table.staging_dir("run1"))


def test_write_atomic_replaces_and_leaves_no_temp_files(tmp_path):
    path = str(tmp_path / "a" / "_SUCCESS")
    out.write_bytes(path, b"one")
    out.write_bytes(path, b"two")
    assert open(path, "rb").read() == b"two" and os.listdir(tmp_path / "a") == ["_SUCCESS"]


def test_easynlp_tsv_has_one_line_per_idx_with_a_list_of_images(tmp_path):
    table = out.OutputTable(str(tmp_path / "out"), "2024-05-01")
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format="PNG")
    rows = _rows(["1", "1"], [0, 1]).set_column(3, "png", pa.array([buffer.getvalue()] * 2, pa.binary()))
    rows = rows.set_column(1, "text", pa.array(["宽松\tT恤\n", "宽松\tT恤\n"]))
    table.commit(table.stage(rows, "run1", [], SIG), "run1")
    path = str(tmp_path / "gen.tsv")
    assert out.write_easynlp_tsv(table, path, "png") == 1  # EasyNLP's predict format: a line per input
    lines = open(path, encoding="utf-8").read().splitlines()
    assert len(lines) == 1
    idx, text, images = lines[0].split("\t")
    assert (idx, text) == ("1", "宽松 T恤 ")
    assert images.startswith("['iVBOR") and len(ast.literal_eval(images)) == 2
    assert all(Image.open(io.BytesIO(base64.urlsafe_b64decode(i))).size == (4, 4) for i in ast.literal_eval(images))


def test_output_table_on_s3(s3_bucket):
    bucket, storage_options = s3_bucket
    table = out.OutputTable(f"s3://{bucket}/gen", "2024-05-01", storage_options)
    staged = _crashed_run(table, "run1", _rows(["1", "2"], [0, 1], ["a/b", None]))
    assert table.recover(SIG, set()).pairs == {("1", 0), ("2", 1)}
    table.commit(staged, "run1")
    table.remove_runs([table.staging_dir("run1")])
    assert sorted(out.pairs(table.committed_pairs())) == [("1", 0), ("2", 1)]
    keys = table.fs.find(bucket)
    assert f"{bucket}/gen/run_date=2024-05-01/_SUCCESS" in keys or any(k.endswith("/_SUCCESS") for k in keys)
    assert not [k for k in keys if "/_staging/" in k]
    assert sorted(r["category"] or "" for r in table.read(["category"]).to_pylist()) == ["", "a/b"]
