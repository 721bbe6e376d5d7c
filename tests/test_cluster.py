"""The submitted path: cluster/ manifests are valid, and jobs run through a real Ray head with `ray job submit`."""
from __future__ import annotations

import json
import os
import posixpath
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from painter.cli.main import build_parser
from painter.io.storage_options import credential_keys

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
    assert scripts == {"tokenize_job.py", "train_job.py", "generate_job.py"}


@pytest.mark.parametrize("name,entrypoint", _rayjob_entrypoints(), ids=lambda v: str(v)[:20])
def test_rayjob_entrypoint_names_a_script_and_options_it_accepts(name, entrypoint):
    argv = shlex.split(entrypoint)
    assert argv[0] == "python", f"{name}: entrypoint should run python, got {argv[0]!r}"
    script = argv[1]
    assert script.startswith(IMAGE_ROOT), f"{name}: script {script!r} is not under the image's {IMAGE_ROOT}"
    local = REPO / script[len(IMAGE_ROOT):]
    assert local.is_file(), f"{name}: {script} does not exist in the repository"
    job = local.stem.removesuffix("_job")
    build_parser().parse_args([job, *argv[2:]])  # argparse exits on an unknown or malformed option


def _pod_specs(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]["spec"],
            *(group["template"]["spec"] for group in cluster["workerGroupSpecs"])]


def _secret_reference_in(pod: dict, source: str) -> bool:
    """True when `source` (env:NAME or @PATH) names a Kubernetes secret of this pod: NAME set from a
    secretKeyRef, or PATH in a folder where a secret volume is mounted."""
    container = pod["containers"][0]
    if source.startswith("env:"):
        return any(e["name"] == source[4:] and "secretKeyRef" in e.get("valueFrom", {}) for e in container.get("env", []))
    secrets = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
    return any(m["name"] in secrets and posixpath.dirname(source[1:]) == m["mountPath"].rstrip("/")
               for m in container.get("volumeMounts", []))


def test_rayjobs_take_storage_options_from_kubernetes_secrets():
    """Every --storage-options of a RayJob names a secret of every Ray pod (an env var or a mounted
    file); the manifests show both ways; no runtime env (shown by `ray job list`) holds a credential."""
    sources = []
    for path in sorted((CLUSTER / "kuberay").glob("rayjob-*.yaml")):
        for doc in _yaml_docs(path):
            argv = shlex.split(doc["spec"]["entrypoint"])
            assert not credential_keys(yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}")), path.name
            if "--storage-options" not in argv:
                continue
            source = argv[argv.index("--storage-options") + 1]
            assert source.startswith(("env:", "@")), f"{path.name}: --storage-options {source!r} is not a reference"
            for pod in _pod_specs(doc):
                assert _secret_reference_in(pod, source), f"{path.name}: a pod has no secret behind {source}"
            sources.append(source[0])
    assert sorted(set(sources)) == ["@", "e"]
    assert not credential_keys(yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))


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


@pytest.mark.parametrize("failure", ["", "usage", "data", "storage", "internal", "stopped", "no line"])
def test_nightly_cronjob_exits_with_painters_exit_code(failure, tmp_path):
    """The CronJob's submit script, run with a stand-in `kubectl` (no Kubernetes here) whose RayJob ends with
    painter's last line of each failure class: it exits with the code painter gives that class, and its
    podFailurePolicy retries only storage and stopped; its timeZone is the RayJob's --timezone."""
    from painter.errors import EXIT_CODES

    docs = {d["kind"]: d for d in _yaml_docs(CLUSTER / "kuberay" / "cronjob-generate.yaml")}
    spec = docs["CronJob"]["spec"]
    script = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    line = {"": '{"job": "generate", "status": "succeeded", "images_out": 4}', "no line": "ray: driver died"}.get(
        failure, f'{{"job": "generate", "status": "failed", "failure": "{failure}", "error": "x"}}')
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "rayjob-generate.yaml").write_text("metadata:\n  name: painter-generate\n")
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(f"#!/bin/sh\ncase \"$1\" in create) cat > /dev/null;; get) echo Complete;; "
                       f"logs) printf '%s\\n' 'other output' '{line}';; esac\n")
    kubectl.chmod(0o755)
    done = subprocess.run(["/bin/sh", "-c", script.replace("/manifests/", f"{tmp_path}/manifests/")],
                          env=dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}"), capture_output=True,
                          text=True, timeout=60)
    expected = {"": 0, "no line": 1, "stopped": 143, **EXIT_CODES}[failure]
    assert done.returncode == expected, (done.stdout, done.stderr)
    rule = spec["jobTemplate"]["spec"]["podFailurePolicy"]["rules"][0]
    assert (rule["action"], rule["onExitCodes"]["operator"], rule["onExitCodes"]["values"]) == (
        "FailJob", "NotIn", [EXIT_CODES["storage"], 143])
    entry = shlex.split(_yaml_docs(CLUSTER / "kuberay" / "rayjob-generate.yaml")[0]["spec"]["entrypoint"])
    assert entry[entry.index("--timezone") + 1] == spec["timeZone"] and "{run_date" in " ".join(entry)


# ---- a real head on 127.0.0.1 ---------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a Kubernetes secret exposed as an environment variable of the Ray pods looks like to a job:
# the head starts with it (and without any AWS_* credential), jobs name it with env:NAME.
STORAGE_ENV = "PAINTER_STORAGE_OPTIONS"
# runtime_env.yaml sets AWS_DEFAULT_REGION to a placeholder botocore refuses; the options name one
_REGION = {"client_kwargs": {"region_name": "us-east-1"}}
PLANTED = {"key": f"PLANTEDKEY{uuid.uuid4().hex[:12].upper()}", "secret": f"planted-secret-{uuid.uuid4().hex}"}


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """`ray start --head --block` on loopback, dashboard included; stopped by signalling that process.

    Every port a node's agents bind gets a free one: the suite's in-process Ray already holds the
    defaults (the dashboard agent's 52365 above all), and a head whose job agent cannot bind refuses
    every submission with "No available agent".
    The head's environment holds moto's endpoint and the planted credentials only as the JSON in
    STORAGE_ENV: the AWS_* variables the s3_server fixture sets in this process are removed.
    """
    port = _free_port()
    agent_ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")]
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            STORAGE_ENV: json.dumps({"endpoint_url": s3_server["endpoint_url"], **PLANTED, **_REGION})}
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
        yield {"address": address, "env": env, "ray": ray_bin, "temp_dir": temp_dir}
    finally:  # a graceful stop takes ~30 s here; what it would tidy is the head's own temp dir
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:
                os.killpg(head.pid, signal.SIGKILL)  # the head's raylet, GCS and workers, whatever is left
            except ProcessLookupError:
                pass
            head.wait(timeout=30)
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


def _submit(head: dict, *entrypoint: str, submission_id: str | None = None) -> tuple[str, str]:
    """Submit a job from the repository root, wait for it; (status, logs).

    The head's job agent starts a little after the dashboard answers; until then a submission is
    refused with "No available agent" (nothing runs), so that one answer is polled for, bounded.
    """
    named = ["--submission-id", submission_id] if submission_id else []
    cmd = [head["ray"], "job", "submit", "--address", head["address"], "--working-dir", str(REPO),
           "--runtime-env", str(CLUSTER / "runtime_env.yaml"), *named, "--", *entrypoint]
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
    status, logs = _submit(ray_head, "python", "jobs/generate_job.py", "--input", str(prompts), "--model",
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
    status, logs = _submit(ray_head, "python", "jobs/tokenize_job.py", "--input", str(corpus), "--model",
                           tiny_model_dir, "--output", str(out), "--max-error-rate", "0.5")
    assert status == "SUCCEEDED", logs[-3000:]
    summary = _last_json(logs)
    assert (summary["rows_in"], summary["rows_out"], summary["rows_rejected"]) == (4, 3, 1)


@pytest.mark.slow
def test_failed_submitted_job_exits_non_zero_with_reason_last(ray_head, tmp_path):
    status, logs = _submit(ray_head, "python", "jobs/generate_job.py", "--input", str(tmp_path / "missing.tsv"),
                           "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "o"))
    assert status == "FAILED"
    summary = _last_json(logs)
    assert summary["status"] == "failed"
    assert "missing.tsv" in summary["error"] or "no-model" in summary["error"]


def _ray_job(head: dict, *args: str) -> str:
    done = subprocess.run([head["ray"], "job", *args, "--address", head["address"]], env=head["env"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _tsv_corpus(colours: list[str]) -> bytes:
    import base64
    import io

    from PIL import Image

    rows = []
    for i, colour in enumerate(colours):
        buf = io.BytesIO()
        Image.new("RGB", (40, 48), colour).save(buf, format="PNG")
        rows.append(f"{i}\t{colour}\t{base64.b64encode(buf.getvalue()).decode()}")
    return ("\n".join(rows) + "\n").encode()


@pytest.mark.slow
def test_storage_options_from_the_heads_environment(ray_head, tiny_model_dir, s3_bucket):
    """`--storage-options env:NAME` with NAME set in the head's environment: the job reads and writes
    moto's S3 with it (the head has no other way to reach that endpoint, nor any AWS_* credential),
    while neither `ray job logs`, `ray job list` nor any file under the head's temp dir (Ray's own logs,
    the driver's log) holds the secret: only the source `env:NAME` travels on the command line. With
    the endpoint alone inline (no credentials), the same job fails: the credentials came from NAME."""
    import s3fs

    bucket, server = s3_bucket
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server["endpoint_url"]}, key="testing", secret="testing",
                           skip_instance_cache=True)
    # one broken row: with none, Ray Data's write of the empty errors table fails on S3 (it deletes the
    # folder it "created", which S3 never had: FileNotFoundError), a bug apart from this test
    fs.pipe(f"{bucket}/corpus/part-0.tsv", _tsv_corpus(["red", "green", "blue"]) + b"3\tbroken\tnot-base64!!\n")
    job_id = f"secrets-{uuid.uuid4().hex[:8]}"
    status, logs = _submit(ray_head, "python", "jobs/tokenize_job.py", "--input", f"s3://{bucket}/corpus/", "--model",
                           tiny_model_dir, "--output", f"s3://{bucket}/tokens", "--max-error-rate", "0.5",
                           "--storage-options", f"env:{STORAGE_ENV}", submission_id=job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    summary = _last_json(logs)
    assert (summary["rows_in"], summary["rows_out"], summary["rows_rejected"]) == (4, 3, 1)
    assert any(key.endswith(".parquet") for key in fs.find(f"{bucket}/tokens"))

    job_list, job_logs = _ray_job(ray_head, "list"), _ray_job(ray_head, "logs", job_id)
    assert f"env:{STORAGE_ENV}" in job_list and job_id in job_list  # the entrypoint is there, with the source only
    head_files = [p for p in Path(ray_head["temp_dir"]).rglob("*") if p.is_file()]
    assert any(p.name.startswith(f"job-driver-{job_id}") for p in head_files)
    for name, value in PLANTED.items():
        for where, text in [("ray job submit", logs), ("ray job logs", job_logs), ("ray job list", job_list)]:
            assert value not in text, f"the planted {name} is in {where}"
        leaked = [str(p) for p in head_files if value.encode() in p.read_bytes()]
        assert not leaked, f"the planted {name} is in {leaked}"

    inline = json.dumps({"endpoint_url": server["endpoint_url"], **_REGION})
    status, logs = _submit(ray_head, "python", "jobs/tokenize_job.py", "--input", f"s3://{bucket}/corpus/", "--model",
                           tiny_model_dir, "--output", f"s3://{bucket}/tokens-2", "--storage-options", inline)
    assert status == "FAILED" and "NoCredentialsError" in logs, logs[-3000:]
