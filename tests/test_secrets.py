"""Credentials in `--storage-options`: refused inline, read from `env:NAME` or `@PATH`, and never in
anything a job writes or prints (the cluster side, `ray job logs`/`ray job list`, is in test_cluster.py)."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from painter.cli import main as cli
from painter.evaluation import synthetic
from painter.errors import InputError
from painter.io.storage_options import parse_storage_options, storage_options_source
from painter.options import to_dict
from painter.stages import tokenize

SOURCE_ENV = "PAINTER_TEST_STORAGE_OPTIONS"


# --- refusal ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, named", [
    ({"key": "AKIA1", "secret": "s3cr3t-value"}, "key, secret"),
    ({"Secret": "s3cr3t-value"}, "Secret"),
    ({"endpoint_url": "http://x", "TOKEN": "s3cr3t-value"}, "TOKEN"),
    ({"password": "s3cr3t-value"}, "password"),
    ({"client_kwargs": {"aws_secret_access_key": "s3cr3t-value", "region_name": "eu"}},
     "client_kwargs.aws_secret_access_key"),
    ({"config_kwargs": {"AWS_SESSION_TOKEN": "s3cr3t-value"}}, "config_kwargs.AWS_SESSION_TOKEN"),
    ({"client_kwargs": {"aws_access_key_id": "s3cr3t-value"}}, "client_kwargs.aws_access_key_id"),
    ({"account_key": "s3cr3t-value"}, "account_key"),
    ({"sas_token": "s3cr3t-value"}, "sas_token"),
    ({"connection_string": "AccountKey=s3cr3t-value"}, "connection_string"),
    ({"client_kwargs": {"headers": {"Authorization": "Bearer s3cr3t-value"}}}, "client_kwargs.headers.Authorization"),
    ({"token": {"refresh_token": "s3cr3t-value"}}, "token"),
])
def test_inline_credentials_are_refused_with_how_to_pass_them(options, named):
    with pytest.raises(InputError) as e:
        parse_storage_options(json.dumps(options))
    message = str(e.value)
    assert "\n" not in message and "s3cr3t-value" not in message
    assert message.startswith(f"--storage-options: {named} ")
    assert "@/path/options.json" in message and "env:NAME" in message


def test_non_secret_options_stay_allowed_inline():
    options = {"endpoint_url": "http://127.0.0.1:9000", "anon": False, "use_ssl": False, "requester_pays": True,
               "client_kwargs": {"region_name": "eu-central-1"}, "profile": "batch",
               "config_kwargs": {"signature_version": "s3v4", "s3": {"addressing_style": "path"}},
               "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/painter"}}
    text = json.dumps(options)
    assert parse_storage_options(text) == options
    assert storage_options_source(text) == text  # recorded as given
    assert parse_storage_options(None) == {} == parse_storage_options("  ")


def test_refused_by_the_command_line_before_anything_runs(ray_session, tmp_path, capfd):
    """Through `painter tokenize`: exit 2 (bad usage), the reason as the last line, the value printed nowhere."""
    args = ["tokenize", "--input", str(tmp_path / "in.tsv"), "--model", str(tmp_path / "m"), "--output",
            str(tmp_path / "out"), "--storage-options", '{"client_kwargs": {"aws_secret_access_key": "s3cr3t-value"}}']
    assert cli.main(args) == 2
    captured = capfd.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["status"] == "failed" and "client_kwargs.aws_secret_access_key" in summary["error"]
    assert summary["failure"] == "usage"
    assert "s3cr3t-value" not in captured.out + captured.err
    assert not (tmp_path / "out").exists()


def test_every_job_with_storage_options_documents_the_indirect_sources():
    help_text = {name: sub.format_help() for name, sub in cli.build_parser()._subparsers._group_actions[0].choices.items()}
    with_storage = [name for name, text in help_text.items() if "--storage-options" in text]
    assert {"tokenize", "generate", "evaluate", "train-vq"} <= set(with_storage)
    for name in with_storage:
        assert "env:NAME" in help_text[name] and "@PATH" in help_text[name], name


# --- the indirect sources --------------------------------------------------------------------------

def test_env_source(monkeypatch):
    options = {"endpoint_url": "http://127.0.0.1:1", "key": "AKIA1", "secret": "s3cr3t-value"}
    monkeypatch.setenv(SOURCE_ENV, json.dumps(options))
    assert parse_storage_options(f"env:{SOURCE_ENV}") == options
    for value, reason in [(None, "is not set"), ("", "is not set"), ('{"secret": "s3cr3t-value"', "not valid JSON"),
                          ('["s3cr3t-value"]', "must be a JSON object")]:
        if value is None:
            monkeypatch.delenv(SOURCE_ENV)
        else:
            monkeypatch.setenv(SOURCE_ENV, value)
        with pytest.raises(InputError, match=reason) as e:
            parse_storage_options(f"env:{SOURCE_ENV}")
        assert str(e.value).startswith(f"--storage-options env:{SOURCE_ENV}") and "s3cr3t" not in str(e.value)
    with pytest.raises(InputError, match="not an environment variable name"):
        parse_storage_options("env:NOT-A NAME")


def test_file_source_local(tmp_path):
    options = {"endpoint_url": "http://127.0.0.1:1", "client_kwargs": {"aws_secret_access_key": "s3cr3t-value"}}
    path = tmp_path / "mounted" / "storage.json"
    path.parent.mkdir()
    path.write_text(json.dumps(options))
    assert parse_storage_options(f"@{path}") == options
    assert parse_storage_options(f"@file://{path}") == options
    with pytest.raises(InputError, match="no such file"):
        parse_storage_options(f"@{tmp_path / 'missing.json'}")
    path.write_text('{"secret": "s3cr3t-value",}')
    with pytest.raises(InputError, match=r"not valid JSON \(line 1, column") as e:
        parse_storage_options(f"@{path}")
    assert "s3cr3t" not in str(e.value)


def test_file_source_on_s3(s3_bucket):
    """`@s3://…` is read with the environment's credentials (the s3_server fixture sets AWS_*)."""
    import s3fs

    bucket, server = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server["endpoint_url"]}, key="testing", secret="testing")
    options = {"endpoint_url": server["endpoint_url"], "key": "AKIA1", "secret": "s3cr3t-value"}
    fs.pipe(f"{bucket}/secrets/storage.json", json.dumps(options).encode())
    assert parse_storage_options(f"@s3://{bucket}/secrets/storage.json") == options
    with pytest.raises(InputError, match="no such file"):
        parse_storage_options(f"@s3://{bucket}/secrets/missing.json")


def test_options_are_recorded_as_their_source():
    options = tokenize.Options(input=["i"], model="m", output="o", storage_options="env:X")
    assert to_dict(options)["storage_options"] == "env:X"
    options.storage_options = "@/var/run/secrets/painter/storage.json"
    assert to_dict(options)["storage_options"] == "@/var/run/secrets/painter/storage.json"
    options.storage_options = '{"key": "AKIA1", "secret": "s3cr3t-value"}'  # never parsed: still withheld
    assert to_dict(options)["storage_options"] == "<withheld: holds credentials>"
    options.storage_options = '{"secret": "s3cr3t-value"'
    assert "s3cr3t" not in json.dumps(to_dict(options))


# --- every file the jobs write ---------------------------------------------------------------------

def _texts_of(name: str, data: bytes) -> list[bytes]:
    """The bytes of a file and, for Parquet (compressed pages), its decoded rows and metadata."""
    texts = [data]
    if name.endswith(".parquet"):
        import io

        table = pq.read_table(io.BytesIO(data))
        texts.append(json.dumps(table.drop_columns([c for c in table.column_names if c in ("png", "jpeg", "webp")])
                                .to_pylist(), default=str).encode())
        texts.append(repr(table.schema.metadata).encode())
    return texts


def _written_files(roots: list[Path], fs, bucket: str) -> dict[str, bytes]:
    files = {}
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                files[path] = Path(path).read_bytes()
    for key in fs.find(bucket):
        files[f"s3://{key}"] = fs.cat_file(key)
    return files


@pytest.mark.slow
def test_planted_secret_reaches_no_written_file_nor_output(ray_session, tiny_model_dir, s3_bucket, tmp_path,
                                                           monkeypatch, capfd):
    """tokenize (env:NAME) -> train -> generate (@PATH) -> evaluate (env:NAME) on tiny sizes, inputs and
    outputs on moto's S3; a unique key and secret planted in both sources appear in no file the jobs
    wrote (local or S3, Parquet decoded), nor on stdout/stderr, while the sources themselves are recorded."""
    import s3fs

    bucket, server = s3_bucket
    planted = {"key": f"PLANTEDKEY{uuid.uuid4().hex[:12].upper()}", "secret": f"planted-secret-{uuid.uuid4().hex}"}
    options = {"endpoint_url": server["endpoint_url"], **planted}
    monkeypatch.setenv(SOURCE_ENV, json.dumps(options))
    secret_file = tmp_path / "mounted-secret" / "storage.json"
    secret_file.parent.mkdir()
    secret_file.write_text(json.dumps(options))
    out = tmp_path / "out"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server["endpoint_url"]}, key="testing", secret="testing",
                           skip_instance_cache=True)
    synthetic.write_corpus(f"s3://{bucket}/corpus", 16, size=32, seed=3, storage_options=server)
    fs.pipe(f"{bucket}/prompts.tsv", "".join(f"p{i}\t{c}\n" for i, c in
                                             enumerate(synthetic.captions_for_eval(3, 0))).encode("utf-8"))
    env_source, file_source = f"env:{SOURCE_ENV}", f"@{secret_file}"
    jobs = [
        ["tokenize", "--input", f"s3://{bucket}/corpus/", "--model", tiny_model_dir, "--output", str(out / "tokens"),
         "--storage-options", env_source],
        ["train", "--data", str(out / "tokens"), "--preset", "tiny", "--vqgan", tiny_model_dir, "--output",
         str(out / "model"), "--max-steps", "2", "--micro-batch", "4", "--checkpoint-every", "1", "--warmup-steps", "1"],
        ["generate", "--input", f"s3://{bucket}/prompts.tsv", "--model", str(out / "model"), "--output",
         f"s3://{bucket}/generated", "--run-date", "2026-12-01", "--storage-options", file_source],
        ["evaluate", "--generated", f"s3://{bucket}/generated", "--output", f"s3://{bucket}/scores",
         "--storage-options", env_source],
    ]
    for args in jobs:
        assert cli.main(args) == 0, args[0]
    captured = capfd.readouterr()
    summaries = [json.loads(line) for line in captured.out.splitlines() if line.startswith('{"job"')]
    assert [s["job"] for s in summaries] == ["tokenize", "train", "generate", "evaluate"]
    assert summaries[0]["rows_out"] == 16 and summaries[2]["images_out"] == 3  # S3 was read and written

    files = _written_files([out], fs, bucket)
    assert len(files) > 20 and any(p.startswith(f"s3://{bucket}/scores/") for p in files)
    assert any(p.endswith("config.json") for p in files) and any("/_runs/" in p for p in files)
    for path, data in files.items():
        for text in _texts_of(path, data):
            for name, value in planted.items():
                assert value.encode() not in text, f"the planted {name} is in {path}"
    for name, value in planted.items():
        assert value not in captured.out and value not in captured.err, f"the planted {name} was printed"
    recorded = [p for p, data in files.items() if json.dumps(file_source).encode() in data]
    assert recorded, "generate's run record names its --storage-options source"
