"""The submitted path: cluster/ manifests are valid, and jobs run through a real Ray head with `ray job submit`."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from painter.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
IMAGE_ROOT = "/app/"  # where cluster/Dockerfile puts the repository


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: p.name)
def test_yaml_files_parse(path):
    assert _yaml_docs(path), f"{path} holds no YAML document"


def _rayjob_entrypoints() -> list[tuple[str, str]]:
    found = []
    for path in sorted((CLUSTER / "kuberay").glob("rayjob-*.yaml")):
        for doc in _yaml_docs(path):
            if doc.get("kind") == "RayJob":
                found.append((path.name, doc["spec"]["entrypoint"]))
    return found


def test_every_job_has_a_rayjob_manifest():
    scripts = {shlex.split(entry)[1].rsplit("/", 1)[-1] for _, entry in _rayjob_entrypoints()}
    assert scripts == {"tokenize.py", "train.py", "generate.py"}


@pytest.mark.parametrize("name,entrypoint", _rayjob_entrypoints(), ids=lambda v: str(v)[:20])
def test_rayjob_entrypoint_names_a_script_and_options_it_accepts(name, entrypoint):
    argv = shlex.split(entrypoint)
    assert argv[0] == "python", f"{name}: entrypoint should run python, got {argv[0]!r}"
    script = argv[1]
    assert script.startswith(IMAGE_ROOT), f"{name}: script {script!r} is not under the image's {IMAGE_ROOT}"
    local = REPO / script[len(IMAGE_ROOT):]
    assert local.is_file(), f"{name}: {script} does not exist in the repository"
    job = local.stem
    build_parser().parse_args([job, *argv[2:]])  # argparse exits on an unknown or malformed option


def test_cluster_placeholders_are_marked():
    for path in [CLUSTER / "ray-cluster.yaml", *sorted((CLUSTER / "kuberay").glob("rayjob-*.yaml"))]:
        text = path.read_text()
        assert "REPLACE_ME" in text and "# <-- change" in text, f"{path.name} has no marked placeholder"


def test_nightly_cronjob_creates_the_generate_rayjob():
    docs = {d["kind"]: d for d in _yaml_docs(CLUSTER / "kuberay" / "cronjob-generate.yaml")}
    cron = docs["CronJob"]
    assert len(cron["spec"]["schedule"].split()) == 5
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert "rayjob-generate.yaml" in " ".join(pod["containers"][0]["args"])
    assert "rayjobs" in docs["Role"]["rules"][0]["resources"]


# ---- a real head on 127.0.0.1 ---------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on loopback, dashboard included; stopped by signalling that process.

    Every port a node's agents bind gets a free one: the suite's in-process Ray already holds the
    defaults (the dashboard agent's 52365 above all), and a head whose job agent cannot bind refuses
    every submission with "No available agent".
    """
    port = _free_port()
    agent_ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")]
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--port=0", "--num-cpus=2", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats", *agent_ports],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    try:
        _wait_for_head(ray_bin, address, env, head)
        yield {"address": address, "env": env, "ray": ray_bin}
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        finally:
            os.killpg(head.pid, signal.SIGKILL) if head.poll() is None else None
            log.close()


def _wait_for_head(ray_bin: str, address: str, env: dict, head: subprocess.Popen) -> None:
    deadline = time.time() + 90
    while time.time() < deadline:
        assert head.poll() is None, "ray start --head exited early"
        try:
            urllib.request.urlopen(address + "/api/version", timeout=2)
        except urllib.error.HTTPError:
            pass  # the dashboard answers (token auth refuses anonymous calls): it is up
        except OSError:
            time.sleep(0.5)
            continue
        if subprocess.run([ray_bin, "job", "list", "--address", address], env=env,
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    raise TimeoutError(f"Ray head at {address} did not come up in 90 s")


def _submit(head: dict, *entrypoint: str) -> tuple[str, str]:
    """Submit a job from the repository root, wait for it; (status, logs).

    The head's job agent starts a little after the dashboard answers; until then a submission is
    refused with "No available agent" (nothing runs), so that one answer is polled for, bounded.
    """
    cmd = [head["ray"], "job", "submit", "--address", head["address"], "--working-dir", str(REPO),
           "--runtime-env", str(CLUSTER / "runtime_env.yaml"), "--", *entrypoint]
    deadline = time.time() + 90
    while True:
        done = subprocess.run(cmd, env=head["env"], cwd=REPO, capture_output=True, text=True, timeout=600)
        logs = done.stdout + done.stderr
        if "No available agent to submit job" not in logs or time.time() > deadline:
            break
        time.sleep(1)
    status = "SUCCEEDED" if done.returncode == 0 else "FAILED"
    return status, logs


def _last_json(logs: str) -> dict:
    for line in reversed(logs.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"job"' in line:
            return json.loads(line)
    raise AssertionError(f"no JSON summary line in the job logs:\n{logs[-3000:]}")


@pytest.mark.slow
def test_generate_submitted_to_a_ray_head(ray_head, tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("1\t红色圆形\n2\t蓝色方形\n3\t\n", encoding="utf-8")
    out = tmp_path / "generated"
    status, logs = _submit(ray_head, "python", "jobs/generate.py", "--input", str(prompts), "--model",
                           tiny_model_dir, "--output", str(out), "--samples", "2", "--run-date", "2026-11-25",
                           "--max-error-rate", "0.5")
    assert status == "SUCCEEDED", logs[-3000:]
    summary = _last_json(logs)
    assert summary["job"] == "generate" and summary["images_out"] == 4 and summary["rows_rejected"] == 1
    from deltalake import DeltaTable

    table = DeltaTable(str(out)).to_pyarrow_table(filters=[("run_date", "=", "2026-11-25")])
    assert sorted(zip(table["idx"].to_pylist(), table["sample"].to_pylist())) == [("1", 0), ("1", 1), ("2", 0), ("2", 1)]


@pytest.mark.slow
def test_tokenize_submitted_to_a_ray_head(ray_head, tiny_model_dir, tmp_path):
    import base64
    import io

    from PIL import Image

    rows = []
    for i, colour in enumerate(["red", "green", "blue"]):
        buf = io.BytesIO()
        Image.new("RGB", (40, 48), colour).save(buf, format="PNG")
        rows.append(f"{i}\t{colour}\t{base64.b64encode(buf.getvalue()).decode()}")
    rows.append("3\tbroken\tnot-base64!!")
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "tokens"
    status, logs = _submit(ray_head, "python", "jobs/tokenize.py", "--input", str(corpus), "--model",
                           tiny_model_dir, "--output", str(out), "--max-error-rate", "0.5")
    assert status == "SUCCEEDED", logs[-3000:]
    summary = _last_json(logs)
    assert (summary["rows_in"], summary["rows_out"], summary["rows_rejected"]) == (4, 3, 1)


@pytest.mark.slow
def test_failed_submitted_job_exits_non_zero_with_reason_last(ray_head, tmp_path):
    status, logs = _submit(ray_head, "python", "jobs/generate.py", "--input", str(tmp_path / "missing.tsv"),
                           "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "o"))
    assert status == "FAILED"
    summary = _last_json(logs)
    assert summary["status"] == "failed"
    assert "missing.tsv" in summary["error"] or "no-model" in summary["error"]
