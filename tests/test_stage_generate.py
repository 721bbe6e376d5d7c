"""The generate job on a real local Ray: counts, rejected prompts, safe partitions, reruns, S3.

The Delta table's exactly-once guarantees under kills, concurrent runs and polling readers are in
tests/test_output_delta.py."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray

from painter.cli import main as cli
from painter.errors import ErrorRateExceeded, InputError
from painter.io.easynlp_tsv import write_easynlp_tsv
from painter.io.key_buckets import KeyBuckets
from painter.io.output_table import OutputTable
from painter.io.rows import pair_keys
from painter.io.images import open_image
from painter.stages import generate_prompts
from painter.stages.generate import Options, preflight, run

DATE = "2024-05-01"
SUMMARY_KEYS = {"rows_in", "images_out", "rows_rejected", "skipped_already_done", "truncated_texts",
                "images_per_second", "output", "contact_sheet"}


def _tsv(path, rows) -> str:
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _prompts(n: int) -> list[tuple[str, str, str]]:
    return [(f"p{i}", f"宽松T恤 第{i}款", "shoes" if i % 2 else "hats") for i in range(n)]


def _options(tiny_model_dir, inputs, output, **kwargs) -> Options:
    defaults = dict(input=inputs, model=tiny_model_dir, output=output, run_date=DATE, contact_sheet=False,
                    input_schema="idx:str:1,text:str:1,category:str:1")
    return Options(**(defaults | kwargs))


def _committed(output, storage_options=None) -> list[dict]:
    return OutputTable(output, storage_options).read(DATE).to_pylist()


def _pairs(rows) -> list[tuple[str, int]]:
    return sorted((r["idx"], r["sample"]) for r in rows)


@pytest.mark.slow
def test_generate_end_to_end_through_the_cli(ray_session, tiny_model_dir, tmp_path, capsys):
    hostile = ["../../etc", "a/b", "..", "", "\x01x", "\x00z", "y" * 400, "女装"]
    good = [(f"g{i}", f"红色连衣裙 {i}", v) for i, v in enumerate(hostile)]
    bad = [("", "没有编号", "c"), ("g9", "   ", "c"), ("g0", "重复的编号", "c"), ("only-one-field",)]
    long_text = [("long", "长" * 80, "c")]
    inputs = _tsv(tmp_path / "prompts.tsv", good + bad + long_text)
    output = str(tmp_path / "out")
    code = cli.main(["generate", "--input", inputs, "--input-schema", "idx:str:1,text:str:1,category:str:1",
                     "--model", tiny_model_dir, "--output", output, "--samples", "2", "--run-date", DATE,
                     "--partition-by", "category", "--max-error-rate", "0.5", "--gallery",
                     "--tsv-output", str(tmp_path / "gen.tsv"), "--batch-size", "4"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["status"] == "succeeded" and SUMMARY_KEYS <= summary.keys()
    assert summary["rows_in"] == 13 == summary["prompts_accepted"] + summary["rows_rejected"]
    assert (summary["rows_rejected"], summary["images_out"], summary["truncated_texts"]) == (4, 18, 1)
    assert summary["skipped_already_done"] == 0 and summary["images_per_second"] > 0

    rejected = pq.read_table(summary["errors"]).to_pylist()
    reasons = sorted(r["reason"].split(" (")[0] for r in rejected)
    assert reasons == ["duplicate idx", "empty text", "expected 3 tab-separated fields", "missing idx"]
    assert summary["errors"].startswith(os.path.join(output, "_rejected", f"run_date={DATE}"))

    rows = _committed(output)
    assert _pairs(rows) == sorted((i, s) for i in [g[0] for g in good] + ["long"] for s in range(2))
    assert {r["category"] for r in rows} == {None if v == "" else v for v in hostile} | {"c"}
    assert all(open_image(r["image"]).size == (32, 32) and r["image_format"] == "png" for r in rows)
    assert {r["seed"] for r in rows} == {0} and all(r["created_at"] is not None for r in rows)
    date_dir = os.path.join(output, f"run_date={DATE}")  # nothing escaped its folder:
    for folder, _, files in os.walk(date_dir):
        assert files == [] or (os.path.dirname(folder) == date_dir and "category=" in folder), folder
    assert sorted(os.listdir(output)) == ["_delta_log", "_logs", "_rejected", "_runs", "_sheets", f"run_date={DATE}"]
    assert sorted(os.listdir(tmp_path)) == ["gen.tsv", "out", "prompts.tsv"]
    assert os.path.exists(summary["contact_sheet"]) and os.path.exists(summary["gallery"])
    assert summary["tsv_lines"] == 9
    # streamed through Ray, line for line what the whole night read on one machine makes (hostile idx sorted)
    expected = tmp_path / "night.tsv"
    assert write_easynlp_tsv(OutputTable(output).read(DATE), str(expected), "image") == 9
    assert (tmp_path / "gen.tsv").read_bytes() == expected.read_bytes()

    rerun = run(_options(tiny_model_dir, [inputs], output, samples=2, partition_by=["category"],
                         max_error_rate=0.5))
    assert (rerun["images_out"], rerun["skipped_already_done"]) == (0, 18)
    assert _pairs(_committed(output)) == _pairs(rows)


@pytest.mark.slow
def test_images_do_not_depend_on_batch_size_or_run(ray_session, tiny_model_dir, tmp_path):
    inputs = _tsv(tmp_path / "p.tsv", _prompts(5))
    images = []
    for batch_size in (1, 8):
        output = str(tmp_path / f"out{batch_size}")
        summary = run(_options(tiny_model_dir, [inputs], output, samples=2, batch_size=batch_size, seed=3))
        assert summary["images_out"] == 10
        images.append({(r["idx"], r["sample"]): r["image"] for r in _committed(output)})
    assert images[0] == images[1] and len(set(images[0].values())) == 10



def test_columns_maps_a_parquet_tables_names_onto_idx_and_text(ray_session, tiny_model_dir, tmp_path):
    """`--columns idx=sku,text=title` on a Parquet table of other names gives the rows and pixels that the
    same prompts give as EasyNLP TSV; the unmapped column passes through."""
    prompts = _prompts(3)
    table = tmp_path / "catalogue.parquet"
    pq.write_table(pa.table({"sku": [p[0] for p in prompts], "title": [p[1] for p in prompts],
                             "category": [p[2] for p in prompts]}), table)
    mapped = run(_options(tiny_model_dir, [str(table)], str(tmp_path / "mapped"), columns="idx=sku,text=title",
                          seed=5))
    plain = run(_options(tiny_model_dir, [_tsv(tmp_path / "p.tsv", prompts)], str(tmp_path / "plain"), seed=5))
    assert mapped["rows_in"] == mapped["images_out"] == 3 == plain["images_out"] and mapped["rows_rejected"] == 0
    rows = {r["idx"]: r for r in _committed(str(tmp_path / "mapped"))}
    assert {i: (r["text"], r["category"]) for i, r in rows.items()} == {p[0]: (p[1], p[2]) for p in prompts}
    assert {i: r["image"] for i, r in rows.items()} == {r["idx"]: r["image"] for r in _committed(str(tmp_path / "plain"))}
    with pytest.raises(InputError, match="--columns names 'name', not among the file's columns"):  # before Ray
        preflight(_options(tiny_model_dir, [str(table)], str(tmp_path / "bad"), columns="idx=sku,text=name"))

@pytest.mark.slow
def test_s3_input_and_output_on_moto(ray_session, tiny_model_dir, tmp_path, s3_bucket, monkeypatch):
    bucket, storage_options = s3_bucket
    local = _tsv(tmp_path / "p.tsv", _prompts(3))
    table = pa.table({"idx": [100, 101], "text": ["蓝色牛仔裤", "白色衬衫"], "category": ["a/b", "hats"],
                      "shop": [7, 8]})  # an integer idx, read as text
    remote = OutputTable(f"s3://{bucket}/unused", storage_options)
    with remote.fs.open(f"{bucket}/in/prompts.parquet", "wb") as f:
        pq.write_table(table, f)
    output = f"s3://{bucket}/gen"
    monkeypatch.setenv("PAINTER_TEST_S3", json.dumps(storage_options))  # credentials are refused inline
    summary = run(_options(tiny_model_dir, [local, f"s3://{bucket}/in/"], output, partition_by=["category"],
                           storage_options="env:PAINTER_TEST_S3", contact_sheet=True,
                           tsv_output=f"s3://{bucket}/gen.tsv"))
    assert summary["images_out"] == 5 and summary["rows_rejected"] == 0
    lines = remote.fs.cat(f"{bucket}/gen.tsv").decode().splitlines()  # read back from the bucket by Ray tasks
    assert summary["tsv_lines"] == 5 and [line.split("\t")[0] for line in lines] == ["100", "101", "p0", "p1", "p2"]
    assert "testing" not in json.dumps(summary)  # credentials never reach the summary
    rows = _committed(output, storage_options)
    assert _pairs(rows) == [("100", 0), ("101", 0), ("p0", 0), ("p1", 0), ("p2", 0)]
    assert {r["shop"] for r in rows if r["idx"].startswith("10")} == {7, 8}  # Parquet columns pass through
    keys = remote.fs.find(f"{bucket}/gen")
    assert f"{bucket}/gen/_delta_log/00000000000000000001.json" in keys
    assert any(k.startswith(f"{bucket}/gen/run_date={DATE}/category=a%2Fb/part-") for k in keys)
    assert f"{bucket}/gen/_sheets/run_date={DATE}/contact_sheet.png" in keys
    # a rerun reads its input again in Ray tasks, which write its keys beside the table: they too need the
    # endpoint (the shared Ray workers started before the moto fixture set AWS_ENDPOINT_URL)
    rerun = run(_options(tiny_model_dir, [local], output, partition_by=["category"],
                         storage_options="env:PAINTER_TEST_S3"))
    assert (rerun["images_out"], rerun["skipped_already_done"]) == (0, 3)


@pytest.mark.slow
def test_too_many_rejected_rows_fail_the_run_after_writing(ray_session, tiny_model_dir, tmp_path):
    inputs = _tsv(tmp_path / "p.tsv", [("a", "好", "c"), ("b", "", "c")])
    errors = str(tmp_path / "errors")
    with pytest.raises(ErrorRateExceeded, match=r"1 of 2 rows rejected \(50.00%\), above --max-error-rate 0;") as e:
        run(_options(tiny_model_dir, [inputs], str(tmp_path / "out"), errors=errors, max_error_rate=0.0))
    assert e.value.summary["images_out"] == 1
    assert pq.read_table(os.path.join(errors, f"run_date={DATE}")).num_rows == 1


def test_bad_options_and_inputs_are_input_errors(ray_session, tiny_model_dir, tmp_path):
    inputs = _tsv(tmp_path / "p.tsv", _prompts(2))
    output = str(tmp_path / "out")
    for kwargs, match in [({"run_date": "2024-02-30"}, "run-date"), ({"partition_by": ["nope"]}, "nope"),
                          ({"partition_by": ["png"]}, "written by the job"), ({"top_p": 2.0}, "top_p"),
                          ({"storage_options": "{not json"}, "not valid JSON"), ({"samples": 0}, "at least 1")]:
        with pytest.raises(InputError, match=match):
            run(_options(tiny_model_dir, [inputs], output, **kwargs))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="not a readable Parquet"):
        run(_options(tiny_model_dir, [str(tmp_path / "broken.parquet")], output))


def test_checks_and_pairs_without_the_job(ray_session, tmp_path):
    rows = pa.table({"idx": [1, 2, 2, None, 3], "text": ["a", "b", "c", "d", " "], "seed": [9] * 5,
                     "_source": ["f"] * 5, "_row": [1, 2, 3, 4, 5], "_reason": [None] * 5})
    checked = generate_prompts.check_prompts(rows)
    assert checked.column("_reason").to_pylist() == [None, None, None, "missing idx", "empty text"]
    keys = KeyBuckets(str(tmp_path / "keys"), generate_prompts.KEYS_SCHEMA)
    keys.write(checked.filter(pc.is_null(checked["_reason"])), "b1")
    duplicates = pa.concat_tables([keys.duplicates(b) for b in keys.buckets()])
    assert duplicates.select(["_source", "_row", "_reason"]).to_pylist() == [
        {"_source": "f", "_row": 3, "_reason": "duplicate idx (first at f:2)"}]
    committed = ray.put(np.unique(pair_keys(["1", "2"], [0, 2])))
    schema = pa.schema([("idx", pa.string()), ("text", pa.string())])  # "seed": a column the job writes itself
    pairs = generate_prompts.pairs_batch(rows, samples=3, duplicates=duplicates, schema=schema, committed=committed)
    assert list(zip(pairs.column("idx").to_pylist(), pairs.column("sample").to_pylist())) == [
        ("1", 1), ("1", 2), ("2", 0), ("2", 1)]
    assert "seed" not in pairs.column_names


def test_a_scan_task_run_twice_leaves_one_copy_of_its_rows(ray_session, tmp_path):
    """Ray runs a task again when its worker dies: the second try must replace the first one's files."""
    rows = pa.table({"idx": ["a", "b", None], "text": ["x", "y", "z"],
                     "_source": ["f"] * 3, "_row": [1, 2, 3], "_reason": [None] * 3})
    keys = KeyBuckets(str(tmp_path / "keys"), generate_prompts.KEYS_SCHEMA)
    errors, committed = str(tmp_path / "rejected"), ray.put(np.empty(0, np.uint64))
    for _ in range(2):
        counts = generate_prompts.scan_batch(rows, errors=errors, keys=keys, samples=2, committed=committed,
                                             storage=None)
    assert counts.select(["rows", "rejected", "todo"]).to_pylist() == [{"rows": 3, "rejected": 1, "todo": 4}]
    assert pq.read_table(errors).column("reason").to_pylist() == ["missing idx"]
    written = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "keys").rglob("*.parquet"))])
    assert sorted(written.column("idx").to_pylist()) == ["a", "b"]


def test_iter_blocks_hands_the_driver_every_row_once_in_order(ray_session):
    """`common.iter_blocks` (the driver's way to take a Dataset's blocks): every row once, as Arrow
    tables, in the Dataset's order where it has one (a sort)."""
    from painter.stages.datasets import iter_blocks

    whole = ray.data.range(1000, override_num_blocks=7).map_batches(lambda b: b, batch_format="pyarrow")
    blocks = list(iter_blocks(whole))
    assert all(isinstance(b, pa.Table) for b in blocks) and len(blocks) >= 7
    assert sorted(pa.concat_tables(blocks)["id"].to_pylist()) == list(range(1000))
    cut = ray.data.range(1000, override_num_blocks=4).limit(333)
    ordered = ray.data.range(1000, override_num_blocks=5).sort("id", descending=True)
    assert sorted(pa.concat_tables(list(iter_blocks(cut)))["id"].to_pylist()) == list(range(333))
    assert pa.concat_tables(list(iter_blocks(ordered)))["id"].to_pylist() == list(range(999, -1, -1))
