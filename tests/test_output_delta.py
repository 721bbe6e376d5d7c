"""The generate job's Delta table on a real local Ray: exactly once per (run_date, idx, sample) across a
killed run and its rerun, two concurrent runs, a reader polling during a run, and S3 (moto) = local."""
from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter

import duckdb
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from painter.io.output_table import OutputTable, delta_storage_options
from painter.stages import faults
from painter.stages.generate import Options, run

DATE = "2024-05-01"
FILE_NAME = re.compile(r"part-(.+)-(\d+)of(\d+)\.parquet$")
PAIRS = sorted((f"p{i}", s) for i in range(8) for s in range(2))


def _inputs(tmp_path) -> str:
    path = tmp_path / "prompts.tsv"
    path.write_text("".join(f"p{i}\t宽松T恤 第{i}款\t{'shoes' if i % 2 else 'hats'}\n" for i in range(8)), encoding="utf-8")
    return str(path)


def _options(tiny_model_dir, inputs, output, **kwargs) -> Options:
    defaults = dict(input=[inputs], model=tiny_model_dir, output=output, run_date=DATE, contact_sheet=False,
                    input_schema="idx:str:1,text:str:1,category:str:1", samples=2, batch_size=2, commit_images=1,
                    partition_by=["category"])
    return Options(**(defaults | kwargs))


def _check_version(root: str, version: int | None = None, storage_options=None) -> list[tuple[str, int]]:
    """The version's pairs, after checking that none is there twice and that every batch is whole."""
    dt = DeltaTable(root, version=version, storage_options=storage_options)
    batches: dict[str, set] = {}
    for path in pa.table(dt.get_add_actions(flatten=True)).column("path").to_pylist():
        batch, k, n = FILE_NAME.search(path).groups()
        batches.setdefault(f"{batch}/{n}", set()).add(int(k))
    for name, parts in batches.items():  # all n files of every batch: never a batch in part
        assert parts == set(range(int(name.rsplit("/", 1)[1]))), (version, name, parts)
    rows = dt.to_pyarrow_table(columns=["idx", "sample"], filters=[("run_date", "=", DATE)])
    pairs = list(zip(rows.column("idx").to_pylist(), rows.column("sample").to_pylist()))
    assert not [p for p, n in Counter(pairs).items() if n > 1], version
    return sorted(pairs)


def _check_every_version(root: str, storage_options=None) -> list[tuple[str, int]]:
    latest = DeltaTable(root, storage_options=storage_options).version()
    for version in range(latest + 1):
        _check_version(root, version, storage_options)
    return _check_version(root, None, storage_options)


@pytest.mark.slow
def test_a_killed_run_leaves_whole_batches_and_the_rerun_completes_each_pair_once(
        ray_session, tiny_model_dir, tmp_path, monkeypatch):
    output = str(tmp_path / "out")
    options = _options(tiny_model_dir, _inputs(tmp_path), output)
    monkeypatch.setenv(faults.FAIL_AFTER_BATCHES, "5")  # of 8 batches
    with pytest.raises(Exception, match=faults.FAIL_AFTER_BATCHES):
        run(options)
    before = _check_every_version(output)
    assert len(before) < len(PAIRS)  # part of the night (what reached the driver), whole batches, each pair once
    print(f"killed run committed {len(before)} of {len(PAIRS)}")
    monkeypatch.delenv(faults.FAIL_AFTER_BATCHES)

    rerun = run(options)
    assert rerun["skipped_already_done"] == len(before) and rerun["images_out"] == len(PAIRS) - len(before)
    assert _check_every_version(output) == PAIRS
    again = run(options)
    assert (again["images_out"], again["skipped_already_done"], again["commits"]) == (0, len(PAIRS), 0)
    assert _check_version(output) == PAIRS


@pytest.mark.slow
def test_two_concurrent_runs_of_a_night_write_each_pair_once(ray_session, tiny_model_dir, tmp_path):
    output, inputs = str(tmp_path / "out"), _inputs(tmp_path)
    start, summaries, errors = threading.Barrier(2), [], []

    def one_run():
        try:
            start.wait()
            summaries.append(run(_options(tiny_model_dir, inputs, output)))
        except Exception as e:  # reported below: a thread's exception would vanish
            errors.append(e)

    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert _check_every_version(output) == PAIRS
    assert sum(s["images_out"] for s in summaries) == len(PAIRS)  # each committed pair counted by one run
    print(json.dumps([{k: s[k] for k in ("images_out", "commits", "commit_conflicts", "files_left_out")}
                      for s in summaries]))


@pytest.mark.slow
def test_a_reader_polling_during_a_run_sees_whole_batches_once(ray_session, tiny_model_dir, tmp_path):
    output = str(tmp_path / "out")
    done, errors = threading.Event(), []

    def the_run():
        try:
            run(_options(tiny_model_dir, _inputs(tmp_path), output))
        except Exception as e:
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=the_run)
    thread.start()
    seen = {}
    while not done.is_set():
        if OutputTable(output).exists():
            dt = DeltaTable(output)
            if dt.version() not in seen:  # every version a reader can open, checked as it appears
                seen[dt.version()] = _check_version(output, dt.version())
        time.sleep(0.05)  # the poll interval, not a synchronisation
    thread.join()
    assert not errors, errors
    counts = [len(pairs) for _, pairs in sorted(seen.items())]
    assert counts == sorted(counts) and len(seen) >= 1  # the night only grows, in whole batches
    assert _check_every_version(output) == PAIRS
    night = DeltaTable(output).to_pyarrow_table(filters=[("run_date", "=", DATE)])  # noqa: F841
    per_partition = duckdb.sql("select run_date, category, count(*) from night group by all order by all").fetchall()
    assert per_partition == [(DATE, "hats", 8), (DATE, "shoes", 8)]


@pytest.mark.slow
def test_the_s3_run_equals_the_local_run(ray_session, tiny_model_dir, tmp_path, s3_bucket, monkeypatch):
    bucket, storage_options = s3_bucket
    inputs = _inputs(tmp_path)
    local, remote = str(tmp_path / "out"), f"s3://{bucket}/gen"
    run(_options(tiny_model_dir, inputs, local, commit_images=1024))
    monkeypatch.setenv("PAINTER_TEST_S3", json.dumps(storage_options))  # credentials are refused inline
    summary = run(_options(tiny_model_dir, inputs, remote, storage_options="env:PAINTER_TEST_S3"))
    assert summary["images_out"] == len(PAIRS) and summary["commits"] >= 2
    columns = ["idx", "sample", "text", "image", "image_format", "category", "seed", "model"]
    delta_options = delta_storage_options(remote, storage_options)
    assert _check_every_version(remote, delta_options) == PAIRS

    def rows(root, options=None):
        table = DeltaTable(root, storage_options=options).to_pyarrow_table(columns=columns)
        return sorted(table.to_pylist(), key=lambda r: (r["idx"], r["sample"]))

    assert rows(remote, delta_options) == rows(local)
