"""The `Storage` handle, and every job reaching an S3-compatible endpoint named only in --storage-options.

The entry-point tests put a model, a corpus, token shards and prompts on moto's S3 (a server process on
127.0.0.1) and run tokenize, train, generate and evaluate through the CLI with `--storage-options
'{"endpoint_url": ...}'`. No process knows the endpoint otherwise: AWS_ENDPOINT_URL is removed from this
process (and fsspec's cached S3 filesystems with it), and the shared Ray's workers never had it (see
conftest.py), which each test checks in a worker. Credentials are the dummy ones of the environment,
as a cluster's come from its nodes' roles; without the endpoint, a read would go to AWS and fail.
"""
from __future__ import annotations

import json
import os
import pickle
import uuid

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import s3fs

from painter.cli import main as cli
from painter.evaluation import synthetic
from painter.checkpoint.model_dir import load_model
from painter.errors import InputError
from painter.io.output_table import OutputTable
from painter.io.shards import ShardInfo, shard_table
from painter.io.storage import Storage, as_storage

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
CORPUS_ROWS, SHARD_ROWS = 8, 16
RUN_DATE = "2026-11-25"


# --- the handle ----------------------------------------------------------------------------------


def test_repr_names_options_but_never_their_values():
    storage = Storage({"endpoint_url": "http://127.0.0.1:9", "secret": "s3cr3t-value"})
    assert "s3cr3t-value" not in repr(storage) and "127.0.0.1" not in repr(storage)
    assert "endpoint_url" in repr(storage)


def test_pickles_as_its_options_and_coerces_dicts():
    storage = Storage({"endpoint_url": "http://127.0.0.1:9"})
    assert pickle.loads(pickle.dumps(storage)) == storage
    assert as_storage(storage) is storage and as_storage({"a": 1}) == Storage({"a": 1})
    assert as_storage(None) == Storage() != storage


def test_from_option_keeps_the_credential_rules():
    assert Storage.from_option(None) == Storage()
    assert Storage.from_option('{"endpoint_url": "http://x"}').options == {"endpoint_url": "http://x"}
    with pytest.raises(InputError, match="secret is a credential"):
        Storage.from_option('{"secret": "s3cr3t-value"}')


def test_files_open_exist_copy_and_replace_atomically(tmp_path):
    storage = Storage()
    path = str(tmp_path / "a" / "b.json")
    assert not storage.exists(path)
    assert storage.write_atomic(path, b"one") == path
    storage.write_text(path, "two")
    assert storage.read_bytes(path) == b"two" and storage.exists(path)
    assert os.listdir(tmp_path / "a") == ["b.json"]  # no temp file left beside it
    copy = storage.copy(path, str(tmp_path / "c" / "d.json"))
    assert storage.read_text(copy) == "two"
    with storage.open(str(tmp_path / "e" / "f.txt"), "a") as f:
        f.write("x\n")
    storage.remove(str(tmp_path / "c"), recursive=True)
    assert not os.path.exists(tmp_path / "c") and (tmp_path / "e" / "f.txt").read_text() == "x\n"


def test_find_lists_fresh_skips_hidden_names_and_excluded_folders(tmp_path):
    storage = Storage()
    for name in ("a.parquet", "b.tsv", "sub/c.parquet", "_keys/0/k.parquet", "sub/_SUCCESS", ".x/d.parquet",
                 "_rejected/r.parquet"):
        storage.write_atomic(str(tmp_path / name), b"x")
    root = str(tmp_path)
    below = lambda files: sorted(f[len(root) + 1:] for f in files)  # noqa: E731
    assert below(storage.find(root, (".parquet",), skip_hidden=True)) == ["a.parquet", "sub/c.parquet"]
    assert below(storage.find(root, (".parquet",), exclude=(str(tmp_path / "_keys"),))) == [
        ".x/d.parquet", "_rejected/r.parquet", "a.parquet", "sub/c.parquet"]
    assert below(storage.find(root)) == below(storage.find(root, ())) and len(storage.find(root)) == 7
    assert storage.find(str(tmp_path / "missing"), (".parquet",)) == []


def test_s3_paths_retry_in_botocore_only_and_s3fs_loads_only_where_a_bucket_is_used():
    """One retry layer (painter.io.retries): botocore's bounded attempts, s3fs's own loop off; and a process
    that never touches a bucket never imports s3fs (a third of a second of every worker's and CLI's start)."""
    import subprocess
    import sys
    from painter.io.retries import S3FS_TRIES, STORAGE_ATTEMPTS

    fs, _ = Storage({"anon": True}).fs("s3://bucket/key")
    assert fs.retries == S3FS_TRIES == 1
    assert fs.config_kwargs["retries"] == {"total_max_attempts": STORAGE_ATTEMPTS, "mode": "standard"}
    check = "import sys, painter.cli.main, painter.stages.tokenize; print('s3fs' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          check=True).stdout.split() == ["False"]


def test_find_sees_files_another_client_wrote_after_a_listing(s3_bucket):
    """Ray workers write beside the driver: its listings must see their files, whatever it listed before."""
    bucket, options = s3_bucket
    storage = Storage({"endpoint_url": options["endpoint_url"]})
    storage.write_atomic(f"s3://{bucket}/t/a.parquet", b"x")
    assert storage.find(f"s3://{bucket}/t", (".parquet",)) == [f"{bucket}/t/a.parquet"]
    fs, _ = storage.fs(f"s3://{bucket}/t")
    assert fs.ls(f"{bucket}/t") == [f"{bucket}/t/a.parquet"]  # now in this instance's listings cache
    other = s3fs.S3FileSystem(client_kwargs={"endpoint_url": options["endpoint_url"]}, skip_instance_cache=True)
    other.pipe(f"{bucket}/t/b.parquet", b"y")  # another client, as a Ray worker is
    assert storage.find(f"s3://{bucket}/t", (".parquet",)) == [f"{bucket}/t/a.parquet", f"{bucket}/t/b.parquet"]


def test_writing_under_a_missing_bucket_fails_and_creates_no_bucket(s3_bucket):
    """A write is never a bucket's creation: a job whose output bucket is missing (its log uploaded there at
    the end) once created it, and the next job to that output found a bucket it should have refused."""
    _, options = s3_bucket
    storage = Storage({"endpoint_url": options["endpoint_url"]})
    with pytest.raises(Exception):
        storage.write_atomic("s3://never-made-bucket/out/_logs/job.log", b"log")
    fs, _ = storage.fs("s3://never-made-bucket/out", fresh=True)
    assert not fs.exists("never-made-bucket")


def test_ray_train_location_strips_remote_urls_only(tmp_path):
    assert Storage().train_location(str(tmp_path)) == (str(tmp_path), None)
    path, filesystem = Storage().train_location("memory://bucket/runs")
    assert path.endswith("bucket/runs") and "://" not in path and isinstance(filesystem, pafs.PyFileSystem)


# --- every job on an endpoint named only in --storage-options -------------------------------------


@pytest.fixture(scope="module")
def remote(s3_server, tiny_model_dir, tmp_path_factory) -> dict:
    """A bucket holding a model, a synthetic corpus, token shards and prompts, written through a
    Storage that names the endpoint (the credentials come from the environment)."""
    option = json.dumps({"endpoint_url": s3_server["endpoint_url"]})
    storage = Storage.from_option(option)
    bucket = f"s-{uuid.uuid4().hex[:12]}"
    storage.makedirs(f"s3://{bucket}")
    root = f"s3://{bucket}"
    for name in os.listdir(tiny_model_dir):
        storage.copy(os.path.join(tiny_model_dir, name), f"{root}/model/{name}")
    synthetic.write_corpus(f"{root}/corpus", rows=CORPUS_ROWS, size=32, storage_options=storage)
    loaded = load_model(tiny_model_dir, parts=())
    info = ShardInfo.for_model(loaded)
    rng = np.random.default_rng(0)
    table = shard_table(info, [f"r{i}" for i in range(SHARD_ROWS)], ["红色圆形"] * SHARD_ROWS,
                        np.full((SHARD_ROWS, info.text_len), loaded.tokenizer.pad_id),
                        rng.integers(0, info.img_vocab_size, (SHARD_ROWS, info.img_len)))
    with storage.open(f"{root}/shards/part-000.parquet", "wb") as f:
        pq.write_table(table, f)
    storage.write_text(f"{root}/prompts.tsv", "a\t红色圆形\nb\t蓝色方形\n")
    return {"root": root, "option": option, "storage": storage, "model_gpt": loaded.gpt_fingerprint}


@pytest.fixture()
def endpoint_only_in_options(monkeypatch, ray_session) -> None:
    """No AWS endpoint variable here, no S3 filesystem cached with one, none in the Ray workers."""
    for name in ENDPOINT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()

    @ray_session.remote(num_cpus=0)
    def worker_endpoint():
        return [os.environ.get(name) for name in ENDPOINT_VARIABLES]

    assert ray_session.get(worker_endpoint.remote()) == [None, None]


def painter(capsys, *args: str) -> dict:
    """`painter ARGS` in this process; its summary (the last stdout line), after checking it succeeded."""
    code = cli.main(list(args))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["status"] == "succeeded", summary
    return summary


def test_tokenize_reads_and_writes_through_the_options(remote, endpoint_only_in_options, capsys):
    root, storage = remote["root"], remote["storage"]
    summary = painter(capsys, "tokenize", "--input", f"{root}/corpus/", "--model", f"{root}/model",
                      "--output", f"{root}/tokens", "--micro-batch", "8", "--max-error-rate", "0",
                      "--storage-options", remote["option"])
    assert (summary["rows_in"], summary["rows_out"], summary["rows_rejected"]) == (CORPUS_ROWS, CORPUS_ROWS, 0)
    fs, tokens = storage.fs(f"{root}/tokens")
    shards = [p for p in fs.find(tokens) if p.endswith(".parquet") and "/_rejected/" not in p]
    filesystem, _ = storage.arrow(root)
    assert sum(pq.read_metadata(p, filesystem=filesystem).num_rows for p in shards) == CORPUS_ROWS


@pytest.mark.slow  # a Ray Train run: tens of seconds, like the train job's other tests
def test_train_reads_model_and_shards_and_checkpoints_through_the_options(remote, endpoint_only_in_options, capsys):
    root, storage = remote["root"], remote["storage"]
    summary = painter(capsys, "train", "--data", f"{root}/shards", "--init", f"{root}/model",
                      "--output", f"{root}/trained", "--workers", "1", "--micro-batch", "4", "--max-steps", "2",
                      "--checkpoint-every", "2", "--log-every", "1", "--warmup-steps", "0",
                      "--storage-options", remote["option"])
    assert summary["steps"] == 2 and summary["run"] == f"{root}/trained/_runs/train"
    assert summary["checkpoint"].startswith(f"{root}/trained/_runs/train/checkpoint")
    assert storage.exists(f"{summary['checkpoint']}/gpt.safetensors")  # Ray Train's storage: the bucket
    metrics = storage.read_text(f"{summary['run']}/metrics.jsonl").splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2]  # appended by the worker
    trained = load_model(f"{root}/trained", parts=("gpt",), storage=storage)
    assert trained.gpt_fingerprint != remote["model_gpt"]
    assert json.loads(storage.read_text(f"{root}/trained/train.json"))["options"]["storage_options"] == remote["option"]


def test_generate_reads_model_and_prompts_and_commits_through_the_options(remote, endpoint_only_in_options,
                                                                          capsys):
    root, storage = remote["root"], remote["storage"]
    summary = painter(capsys, "generate", "--input", f"{root}/prompts.tsv", "--model", f"{root}/model",
                      "--output", f"{root}/generated", "--run-date", RUN_DATE, "--batch-size", "2",
                      "--storage-options", remote["option"])
    assert summary["images_out"] == 2 and summary["rows_rejected"] == 0
    rows = OutputTable(f"{root}/generated", storage).read(RUN_DATE, ["idx", "image"]).to_pylist()
    assert sorted(r["idx"] for r in rows) == ["a", "b"] and all(r["image"][:4] == b"\x89PNG" for r in rows)
    assert storage.exists(summary["contact_sheet"])


def test_evaluate_reads_model_and_corpus_and_writes_through_the_options(remote, endpoint_only_in_options, capsys):
    root, storage = remote["root"], remote["storage"]
    summary = painter(capsys, "evaluate", "--model", f"{root}/model", "--captions", "2", "--corpus",
                      f"{root}/corpus/", "--output", f"{root}/evaluation", "--micro-batch", "8",
                      "--storage-options", remote["option"])
    assert summary["reconstruction"]["images"] == CORPUS_ROWS and summary["caption_accuracy"]["n"] == 2
    written = json.loads(storage.read_text(f"{root}/evaluation/summary.json"))
    assert written["model"] == summary["model"]
