"""Prometheus metrics through Ray: a real Ray head started with its metrics export port (`ray start --head
--metrics-export-port`, on 127.0.0.1, in a process group of its own, ended by it at teardown), the jobs run as
`painter` processes joining it (RAY_ADDRESS), and the node's /metrics endpoint scraped: what the jobs
recorded in their driver, actors and Train workers is there, summed over the reporting processes. Ray
exports asynchronously, so each check polls the endpoint until the value appears, within a deadline."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from painter.evaluation import synthetic
from painter.stages.metrics import METRICS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"


def _free_ports(n: int) -> list[int]:
    probes = [socket.socket() for _ in range(n)]
    for probe in probes:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in probes]
    for probe in probes:
        probe.close()
    return ports


def _scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.read().decode()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head with a metrics export port: (RAY_ADDRESS, the metrics URL)."""
    metrics, gcs, agent, client = _free_ports(4)
    folder = tmp_path_factory.mktemp("ray-head")
    command = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
               f"--metrics-export-port={metrics}", "--include-dashboard=false", "--num-cpus=2",
               f"--temp-dir={folder}", "--disable-usage-stats", f"--dashboard-agent-listen-port={agent}",
               f"--ray-client-server-port={client}", "--min-worker-port=0", "--max-worker-port=0"]
    log = open(folder / "head.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env=dict(os.environ, RAY_AUTH_MODE="token"))
    url = f"http://127.0.0.1:{metrics}/metrics"
    deadline = time.time() + 240
    while not _scrape(url) and process.poll() is None and time.time() < deadline:
        time.sleep(1)  # polling for the endpoint to answer, with a deadline
    try:
        assert _scrape(url), (folder / "head.log").read_text()[-3000:]
        yield f"127.0.0.1:{gcs}", url
    finally:
        _end_group(process)
        log.close()


def _end_group(process: subprocess.Popen) -> None:
    """SIGTERM to the head's process group (`ray start --block` stops what it started), SIGKILL after 60 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def painter(head, *args: str) -> dict:
    env = dict(os.environ, RAY_ADDRESS=head[0], RAY_AUTH_MODE="token",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "painter.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines, done.stderr[-3000:]
    return {"code": done.returncode, **json.loads(lines[-1])}


def total(url: str, name: str, **labels: str) -> float:
    """The sum over every reporting process of `name`'s samples whose labels include `labels`."""
    found = 0.0
    for family in text_string_to_metric_families(_scrape(url)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found += sample.value
    return found


def wait_for(url: str, name: str, expected: float, limit: float = 90, **labels: str) -> float:
    """Poll the endpoint until `name` (with `labels`) sums to `expected`, at most `limit` seconds; the last sum."""
    deadline, value = time.time() + limit, None
    while time.time() < deadline:
        value = total(url, name, **labels)
        if value == expected:
            return value
        time.sleep(1)  # the exporter reports every few seconds: a condition polled, with a deadline
    return value


def test_generate_and_tokenize_counts_reach_prometheus(head, tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("".join(f"p{i}\t宽松T恤 {i}\n" for i in range(5)) + "\t没有编号\np9\t \n", encoding="utf-8")
    night = "2026-12-01"
    s = painter(head, "generate", "--input", str(prompts), "--model", tiny_model_dir, "--output",
                str(tmp_path / "out"), "--samples", "2", "--run-date", night, "--no-contact-sheet",
                "--max-error-rate", "0.5")
    assert s["code"] == 0 and (s["images_out"], s["rows_rejected"]) == (10, 2), s
    tags = {"job": "generate", "run_date": night, "model": s["model"]}
    assert wait_for(head[1], "ray_painter_images_written_total", 10, **tags) == 10
    assert wait_for(head[1], "ray_painter_rows_rejected_total", 2, **tags) == 2
    assert wait_for(head[1], "ray_painter_rows_rejected_total", 1, reason="missing idx", **tags) == 1
    assert wait_for(head[1], "ray_painter_commits_total", s["commits"], **tags) == s["commits"]
    assert wait_for(head[1], "ray_painter_image_seconds_count", 1, **tags) >= 1  # one per batch, from the actors
    assert total(head[1], "ray_painter_table_version", **tags) == s["table_version"]

    corpus = synthetic.write_corpus(str(tmp_path / "corpus"), 6, shards=1, size=32, seed=0)[0]
    with open(corpus, "a", encoding="utf-8") as f:
        f.write("broken-row-without-fields\n")
    t = painter(head, "tokenize", "--input", corpus, "--model", tiny_model_dir, "--output", str(tmp_path / "tok"),
                "--max-error-rate", "0.5", "--micro-batch", "4")
    assert t["code"] == 0 and (t["rows_in"], t["rows_out"], t["rows_rejected"]) == (7, 6, 1), t
    assert wait_for(head[1], "ray_painter_rows_in_total", 7, job="tokenize") == 7
    assert wait_for(head[1], "ray_painter_rows_out_total", 6, job="tokenize") == 6
    assert wait_for(head[1], "ray_painter_rows_rejected_total", 1, job="tokenize") == 1

    r = painter(head, "train", "--data", str(tmp_path / "tok"), "--init", tiny_model_dir, "--output",
                str(tmp_path / "model"), "--workers", "1", "--micro-batch", "2", "--max-steps", "3",
                "--warmup-steps", "0", "--log-every", "1", "--checkpoint-every", "3")
    assert r["code"] == 0 and r["steps"] == 3, r
    assert wait_for(head[1], "ray_painter_train_step", 3, job="train") == 3  # rank 0's last logged step
    assert wait_for(head[1], "ray_painter_train_step_seconds_count", 3, job="train") == 3  # a step per log
    assert total(head[1], "ray_painter_train_loss", job="train") > 0

    assert_dashboard_metrics_exist(head[1])  # the jobs' tasks and actors have run: all of Ray's panels have data


def assert_dashboard_metrics_exist(url: str) -> None:
    """cluster/grafana/painter-dashboard.json: each painter metric it reads is declared in METRICS, and each
    of Ray's own is exported by the node (the GPU panel's only where there are GPUs)."""
    text = (ROOT / "cluster" / "grafana" / "painter-dashboard.json").read_text(encoding="utf-8")
    exprs = [t["expr"] for p in json.loads(text)["panels"] for t in p.get("targets", [])]
    names = {n for e in exprs for n in re.findall(r"\b(ray_\w+)\s*[{)]", e)}
    ours = {n for n in names if n.startswith("ray_painter_")}
    declared = {f"ray_{n}{suffix}" for n, (kind, _, _) in METRICS.items()
                for suffix in {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_count", "_sum"]}[kind]}
    assert ours and ours <= declared, ours - declared
    exported = {s.name for f in text_string_to_metric_families(_scrape(url)) for s in f.samples}
    assert names - ours - {"ray_node_gpus_utilization"} <= exported, (names - ours) - exported
