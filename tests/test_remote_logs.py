"""A job's log file outlives the job wherever its output is: on an `s3://` output (moto's server on 127.0.0.1)
it is uploaded under `<output>/_logs/` when the job fails inside Ray or is stopped by SIGTERM, and the
job's last line names it there. The bucket and its model, shards and corpus are test_storage's `remote`;
the SIGTERM run is the fault matrix's (`fault_matrix.signal_when`, a `painter` process on the session's Ray).
"""
from __future__ import annotations

import json
import posixpath
import signal

import pytest

from fault_matrix import assert_failed_cleanly, painter_env, signal_when
from painter.cli import main as cli
from painter.stages.faults import FAIL_AT_STEP as FAULT_ENV
from test_storage import endpoint_only_in_options, remote  # noqa: F401  (fixtures, shared)

pytestmark = pytest.mark.slow


def _kept_log(storage, output: str, named: str) -> str:
    """The log the job's line names: under `<output>/_logs/`, one object there, and its text."""
    assert named.startswith(f"{output}/_logs/") and named.endswith(".log"), named
    fs, folder = storage.fs(f"{output}/_logs", fresh=True)
    assert [posixpath.basename(p) for p in fs.ls(folder)] == [posixpath.basename(named)]
    return storage.read_text(named)


def test_a_job_failing_inside_ray_uploads_its_log_under_the_remote_output(remote, endpoint_only_in_options,
                                                                           capsys, monkeypatch):
    root, storage = remote["root"], remote["storage"]
    output = f"{root}/failed-train"
    monkeypatch.setenv(FAULT_ENV, "1")  # the train worker raises after step 1 (the one fault switch)
    code = cli.main(["train", "--data", f"{root}/shards", "--init", f"{root}/model", "--output", output,
                     "--workers", "1", "--micro-batch", "4", "--max-steps", "3", "--warmup-steps", "0",
                     "--max-failures", "0", "--storage-options", remote["option"]])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    reason = "RuntimeError: PAINTER_TEST_FAIL_AT_STEP=1: injected worker failure after step 1"
    assert code == 1 and last["status"] == "failed" and last["error"] == reason, last
    text = _kept_log(storage, output, last["log"])
    assert "Traceback" in text and reason.split(": ", 1)[1] in text  # the details went with it
    assert f"{reason} (details in {last['log']})" in text  # the error line, naming where the log went


def test_a_job_stopped_by_sigterm_uploads_its_log_under_the_remote_output(remote, ray_session, s3_server,
                                                                           tmp_path):
    root, storage = remote["root"], remote["storage"]
    output = f"{root}/stopped-tokenize"
    env = painter_env(ray_session.get_runtime_context().gcs_address, s3_server["endpoint_url"])
    args = ["tokenize", "--input", f"{root}/corpus/", "--model", f"{root}/model", "--output", output,
            "--micro-batch", "2", "--storage-options", remote["option"]]
    stopped = signal_when(args, env, tmp_path, lambda err: "[tokenize] reading" in err,
                          signal.SIGTERM)
    assert_failed_cleanly(stopped, "SIGTERM", code=143)
    text = _kept_log(storage, output, stopped.last["log"])
    assert "painter.tokenize: reading" in text and "stopped by SIGTERM part-way" in text  # to its last line
