"""A quiet terminal: painter's lines and progress on stderr, Ray's own output in the job's log file.

The end-to-end test runs real jobs as a user would (`python -m painter.cli`, each starting its own local
Ray): Ray's known noise must be in the log file and never on stderr, while a planted worker error's
reason reaches stderr in one line.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from painter import logs
from painter.cli import console
from painter.cli.main import one_line_reason

ROOT = Path(__file__).resolve().parents[1]


def painter(*args: str, env: dict | None = None) -> tuple[int, list[str], dict]:
    """`painter ARGS` in a fresh interpreter, stderr not a terminal: (exit code, stderr lines, summary)."""
    environment = dict(os.environ, PYTHONPATH=str(ROOT)) | (env or {})
    done = subprocess.run([sys.executable, "-m", "painter.cli", *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=600)
    return done.returncode, done.stderr.splitlines(), json.loads(done.stdout.strip().splitlines()[-1])


def noise_in(lines: list[str]) -> list[str]:
    return [line for line in lines if console.is_noise(line)]


@pytest.mark.slow
def test_jobs_keep_rays_noise_in_the_log_file_and_say_a_planted_error_in_one_line(tmp_path):
    corpus, tokens, model = (str(tmp_path / name) for name in ("corpus", "tokens", "model"))
    code, _, _ = painter("make-corpus", "--output", corpus, "--rows", "96", "--size", "32")
    assert code == 0

    code, err, summary = painter("tokenize", "--input", corpus, "--model", "bundled", "--output", tokens)
    assert code == 0 and summary["rows_out"] == 96, (err, summary)
    assert summary["log"].startswith(os.path.join(tokens, "_logs")) and os.path.isfile(summary["log"])
    assert err and all(line.startswith("[tokenize] ") for line in err), err  # painter's own lines only
    ray_log = Path(summary["log"]).read_text(encoding="utf-8")
    assert "Started a local Ray instance" in ray_log  # Ray's own output went to the file instead

    code, err, summary = painter(
        "train", "--data", tokens, "--preset", "demo", "--vqgan", "bundled", "--output", model, "--max-steps", "8",
        "--micro-batch", "8", "--log-every", "1", "--checkpoint-every", "2", "--max-failures", "0",
        "--threads-per-worker", "1", env={"PAINTER_TEST_FAIL_AT_STEP": "4"})
    assert code == 1 and summary["status"] == "failed" and summary["failure"] == "internal"
    reason = "RuntimeError: PAINTER_TEST_FAIL_AT_STEP=4: injected worker failure after step 4"
    assert summary["error"] == reason
    assert [line for line in err if reason in line and line.startswith("[train] error: ")], err
    assert all(line.startswith("[train] ") for line in err), err  # no tracebacks, no Ray lines
    assert not noise_in(err), noise_in(err)
    ray_log = Path(summary["log"]).read_text(encoding="utf-8")
    assert noise_in(ray_log.splitlines())  # the noise happened, in the file: "Reporting training result N: ..."
    assert "Traceback" in ray_log and reason.split(": ", 1)[1] in ray_log  # the details are kept there


def test_line_filter_drops_noise_by_name_and_passes_the_rest(tmp_path):
    logs.setup("test", str(tmp_path / "x.log"))
    out = io.StringIO()
    stream = console.LineFilter(out)
    stream.write("(PlacementGroupCleaner pid=1) Failed to query Ray Train Controller actor state. State API may be "
                 "temporarily unavailable. Continuing to monitor.\n")
    stream.write("[train] a real line")
    stream.write("\n")
    stream.write("\r[train] [####....] 3/8 steps")  # a bar redraw passes at once, without a newline
    assert out.getvalue() == "[train] a real line\n\r[train] [####....] 3/8 steps"
    assert "Failed to query" in (tmp_path / "x.log").read_text()
    logs.setup("test", None)


def test_progress_without_a_terminal_is_a_line_every_few_seconds(monkeypatch, capsys):
    logs.setup("test", None)
    monkeypatch.setattr(logs, "PROGRESS_SECONDS", 0.0)
    with logs.Progress("train", 10, "steps") as progress:
        progress.set(5, "loss 1.234")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[train] 5/10 steps · ") and "loss 1.234" in err[0]
    assert len(err) == 2 and "\r" not in "".join(err)  # the update and the closing line


def test_one_line_reason_finds_the_deepest_error():
    try:
        try:
            raise ValueError("the real reason")
        except ValueError as e:
            raise RuntimeError("wrapper\nTraceback (most recent call last):\n  ...") from e
    except RuntimeError as e:
        assert one_line_reason(e) == "ValueError: the real reason"


def test_rays_warnings_reach_the_terminal_in_painters_format_unless_they_are_noise(tmp_path, capsys):
    import logging

    logs.setup("test", str(tmp_path / "x.log"))
    ray_logger = logging.getLogger("ray.painter_test")
    ray_logger.propagate = False
    ray_logger.setLevel(logging.INFO)  # Ray's default; the suite's shared Ray session may have set "ray" to WARNING
    handler = logging.StreamHandler(sys.stderr)  # what Ray's own console handler is
    ray_logger.handlers = [handler]
    console.quiet_ray(initialized=False)
    ray_logger.warning("the object store is full")
    ray_logger.warning("Failed to query Ray Train Controller actor state. Continuing to monitor.")
    ray_logger.info("Starting execution of Dataset")
    err = capsys.readouterr().err.splitlines()
    assert err == ["[ray] warning: the object store is full"]
    kept = (tmp_path / "x.log").read_text()
    assert "Failed to query" in kept and "Starting execution" in kept and "object store is full" in kept
    logs.setup("test", None)


def test_a_workers_log_file_gives_only_the_lines_written_for_this_job(tmp_path):
    """Ray's per-worker files (`worker-<id>-<job>-<pid>.out`): a pooled worker's file is named for no job
    (ffffffff) and marks each job it then works for; only this job's lines count, markers left out."""
    path = tmp_path / "worker-abc-ffffffff-42.out"
    path.write_text(":job_id:01000000\n:actor_name:MapWorker\nmine 1\n\n:job_id:02000000\nanother job's\n"
                    ":job_id:01000000\n:task_name:read\nmine 2\n", encoding="utf-8")
    assert console._job_lines(str(path), "01000000") == ["mine 1", "mine 2"]
    assert console._job_lines(str(path), "02000000") == ["another job's"]
    named = tmp_path / "worker-abc-03000000-7.err"
    named.write_text("from the start\n", encoding="utf-8")
    assert console._job_lines(str(named), "03000000") == ["from the start"]
    assert console._job_lines(str(tmp_path / "gone.out"), "03000000") == []


def test_the_clusters_messages_on_stdout_go_to_the_log_file(tmp_path):
    """Ray prints the cluster's errors ("(raylet) ...") and, with log_to_driver, workers' lines to the
    driver's stdout; none may reach the terminal (the job's last line must stay last), all reach the file."""
    logs.setup("test", str(tmp_path / "x.log"))
    out = io.StringIO()
    stream = console.LineFilter(out)
    stream.write("\x1b[33m(raylet)\x1b[0m Task MapBatches failed: worker died\n")
    stream.write("(MapWorker(MapBatches(DecodingEncoder)) pid=123) a print\n(pid=9) another\n")
    stream.write('{"job": "x"} (a line of our own that starts otherwise)\n')
    assert out.getvalue() == '{"job": "x"} (a line of our own that starts otherwise)\n'
    kept = (tmp_path / "x.log").read_text()
    assert "Task MapBatches failed" in kept and "a print" in kept and "another" in kept
    logs.setup("test", None)
