"""The compatibility smoke (`make test-compat`): painter on the OLDEST supported Ray and torch, in a venv of
their own (tests/compat/make_venv.py). The main suite (`make test`) runs everything on the newest.

Here: the whole flow as a user runs it, each job a `painter` process on its own local Ray
(make-corpus -> tokenize -> train on 2 workers -> generate into a Delta table on moto's S3 -> evaluate),
then tests of the main suite run again on these releases, imported rather than copied: `ray job submit`
of jobs/generate_job.py to a real head (test_cluster), jobs reaching S3 through --storage-options
(test_storage), a failed job's log uploaded under its S3 output (test_remote_logs), and the Ray adapter
itself (test_ray_compat). About 5 minutes on 2 cores.
"""
from __future__ import annotations

import json

from painter.io.output_table import OutputTable
from painter.io.storage import Storage

from test_logs import painter
# the main suite's tests, collected here too, with the fixtures they use
from test_cluster import ray_head, test_generate_submitted_to_a_ray_head  # noqa: F401
from test_ray_compat import (test_a_capped_task_pool_reads_with_at_most_that_many_tasks,  # noqa: F401
                             test_block_refs_name_every_row_once_with_its_slice,
                             test_the_trainer_gets_train_v2_without_being_asked_and_refuses_it_turned_off)
from test_remote_logs import test_a_job_failing_inside_ray_uploads_its_log_under_the_remote_output  # noqa: F401
from test_storage import (endpoint_only_in_options, remote,  # noqa: F401
                          test_generate_reads_model_and_prompts_and_commits_through_the_options,
                          test_tokenize_reads_and_writes_through_the_options)

RUN_DATE = "2026-12-01"


def _ok(args: list[str]) -> dict:
    code, err, summary = painter(*args)
    assert code == 0 and summary["status"] == "succeeded", (err[-20:], summary)
    return summary


def test_the_flow_runs_each_job_on_a_local_ray(tmp_path, s3_bucket, monkeypatch):
    """Each job starts its own local Ray (as `painter` does without RAY_ADDRESS), without the suite's
    RAY_TRAIN_V2_ENABLED: the jobs must ask for Ray Train V2 themselves (2.50 needs it)."""
    monkeypatch.delenv("RAY_TRAIN_V2_ENABLED", raising=False)
    bucket, options = s3_bucket
    corpus, tokens, model, evaluation = (str(tmp_path / n) for n in ("corpus", "tokens", "model", "eval"))
    _ok(["make-corpus", "--output", corpus, "--rows", "64", "--size", "32"])
    s = _ok(["tokenize", "--input", corpus, "--model", "bundled", "--output", tokens])
    assert s["rows_out"] == 64 and s["log"].startswith(f"{tokens}/_logs/")
    s = _ok(["train", "--data", tokens, "--preset", "demo", "--vqgan", "bundled", "--output", model,
             "--workers", "2", "--max-steps", "4", "--micro-batch", "4", "--checkpoint-every", "4", "--log-every", "1",
             "--threads-per-worker", "1"])
    assert s["steps"] == 4 and s["workers"] == 2, s
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("a\t红色圆形\nb\t蓝色方形\n", encoding="utf-8")
    output, option = f"s3://{bucket}/generated", json.dumps({"endpoint_url": options["endpoint_url"]})
    s = _ok(["generate", "--input", str(prompts), "--model", model, "--output", output, "--run-date", RUN_DATE,
             "--samples", "2", "--batch-size", "2", "--storage-options", option])
    assert s["images_out"] == 4 and s["log"].startswith(f"{output}/_logs/"), s
    rows = OutputTable(output, Storage.from_option(option)).read(RUN_DATE, ["idx", "sample", "image"]).to_pylist()
    assert sorted((r["idx"], r["sample"]) for r in rows) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert all(r["image"][:4] == b"\x89PNG" for r in rows)
    s = _ok(["evaluate", "--model", model, "--captions", "4", "--corpus", corpus, "--output", evaluation,
             "--micro-batch", "8"])
    assert s["caption_accuracy"]["n"] == 4 and s["reconstruction"]["images"] == 64, s
