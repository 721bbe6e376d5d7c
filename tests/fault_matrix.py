"""The fault matrix's helpers: the faulty inputs it builds, how it runs `painter`, what it asserts, the table.

- `World`: every input the matrix needs, good and broken, built once (`build_world`): a tiny corpus and
  the same corpus cut mid-row, prompts, token shards (good, one cut in half, one foreign), model
  directories without weights or with weights cut short, a file where a folder must be.
- `run_painter` / `start_painter`: the real console script in a subprocess, with the planted
  credentials in its environment and `RAY_ADDRESS` naming the test session's Ray.
- `assert_failed_cleanly`: the contract of a failure: the exit code of its failure class, last stdout line
  `{"status": "failed", "failure": <that class>, "error": ...}` in one line naming what it must, no traceback on stderr (unless
  `--debug`, which must print one), no credential anywhere.
- `record` / `table`: job x fault -> outcome, printed at the end of the run by `pytest_terminal_summary`
  (tests/conftest.py imports it) and written beside the run's temporary files.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from painter.evaluation import synthetic
from painter.checkpoint.model_dir import load_model
from painter.io.shards import ShardInfo, shard_table

ROOT = Path(__file__).resolve().parents[1]
PLANTED = {"key": f"PLANTEDKEY{uuid.uuid4().hex[:12].upper()}", "secret": f"planted-secret-{uuid.uuid4().hex}"}
JOBS = ("tokenize", "train", "train-vq", "generate", "evaluate")
FAULTS = ("input-missing", "input-directory", "input-binary", "input-truncated-row", "shard-truncated",
          "shard-foreign", "model-missing-weight", "model-truncated-weight", "output-parent-file", "disk-full",
          "s3-refused", "s3-flaky", "s3-no-bucket", "sigkill", "sigterm", "nan-loss", "error-rate")
# the exit codes every job ends with, by the failure class its last line names (README: "Exit codes")
FAILURE_OF_CODE = {1: "internal", 2: "usage", 3: "data", 4: "storage", 130: "stopped", 143: "stopped"}
MATRIX: dict[tuple[str, str], str] = {}
TIMINGS: list[str] = []  # wall time of every painter process the matrix ran
TABLE_FILE: list[Path] = []
CORPUS_ROWS, PROMPTS, SHARD_ROWS = 12, 16, 16


@dataclass
class World:
    tmp: Path
    model: str
    model_bare: str  # no weight files
    model_cut: str  # both weight files cut in half
    corpus: str  # a TSV of CORPUS_ROWS good rows
    corpus_cut: str  # a folder holding the same file cut half way through its last row
    prompts: str  # PROMPTS prompts, the last line cut mid-row
    shards: str
    shards_cut: str  # the shards and one more cut in half
    shards_foreign: str  # the shards and a Parquet file painter did not write
    garbage: str  # binary data named .tsv
    garbage_shards: str  # binary data named .parquet, among good shards
    empty_dir: str  # a folder named like a table, holding none
    a_file: str  # a file, where the matrix puts output folders below it
    storage_file: str  # --storage-options @file: moto's endpoint and the planted credentials
    outputs: dict = field(default_factory=dict)  # a job's --output where not under `tmp`

    def out(self, job: str) -> str:
        return self.outputs.get(job) or str(self.tmp / f"out-{job}")


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _model_copies(tmp: Path, model: str) -> tuple[str, str]:
    bare, cut = tmp / "model-bare", tmp / "model-cut"
    shutil.copytree(model, bare)
    shutil.copytree(model, cut)
    for name in ("gpt.safetensors", "vqgan.safetensors"):
        (bare / name).unlink()
        _cut(cut / name)
    return str(bare), str(cut)


def _write_shards(model: str, folder: Path, files: int = 2) -> None:
    """Token shards of SHARD_ROWS rows in all: text ids and image codes of a simple pattern."""
    loaded = load_model(model, parts=())
    info = ShardInfo.for_model(loaded)
    folder.mkdir(parents=True)
    rows = SHARD_ROWS // files
    for s in range(files):
        text = np.full((rows, info.text_len), loaded.tokenizer.pad_id, dtype=np.int32)
        text[:, 0] = 200 + np.arange(rows)
        image = (np.arange(rows)[:, None] * 7 + np.arange(info.img_len)[None, :]) % info.img_vocab_size
        table = shard_table(info, [f"s{s}-{r}" for r in range(rows)], [f"row {r}" for r in range(rows)], text, image)
        pq.write_table(table, folder / f"part-{s}.parquet")


def _shard_variants(tmp: Path, shards: Path) -> tuple[str, str, str]:
    cut, foreign, garbage = tmp / "shards-cut", tmp / "shards-foreign", tmp / "shards-garbage"
    for folder in (cut, foreign, garbage):
        shutil.copytree(shards, folder)
    shutil.copy(shards / "part-0.parquet", cut / "part-9.parquet")
    _cut(cut / "part-9.parquet")
    pq.write_table(pa.table({"idx": ["x"], "caption": ["not a token shard"]}), foreign / "part-9.parquet")
    (garbage / "part-9.parquet").write_bytes(os.urandom(3000))
    return str(cut / "part-9.parquet"), str(foreign / "part-9.parquet"), str(garbage / "part-9.parquet")


def build_world(tmp: Path, model: str, endpoint: str) -> World:
    corpus = Path(synthetic.write_corpus(str(tmp / "corpus"), CORPUS_ROWS, shards=1, size=32, seed=0)[0])
    corpus_cut = tmp / "corpus-cut"
    corpus_cut.mkdir()
    shutil.copy(corpus, corpus_cut / corpus.name)
    _cut(corpus_cut / corpus.name, keep=1 - 0.5 / CORPUS_ROWS)  # ends half way through its last row
    prompts = tmp / "prompts.tsv"
    prompts.write_text("".join(f"p{i:02d}\t宽松T恤 第{i}款\n" for i in range(PROMPTS)) + "p99", encoding="utf-8")
    _write_shards(model, tmp / "shards")
    shards_cut, shards_foreign, garbage_shards = _shard_variants(tmp, tmp / "shards")
    garbage = tmp / "garbage.tsv"
    garbage.write_bytes(b"\x00\x01binary\x00" + os.urandom(2000))
    (tmp / "empty.tsv").mkdir()
    (tmp / "a-file").write_text("a file, not a folder\n")
    storage = tmp / "storage.json"
    storage.write_text(json.dumps({"endpoint_url": endpoint, **PLANTED}))
    bare, cut = _model_copies(tmp, model)
    return World(tmp, model, bare, cut, str(corpus), str(corpus_cut), str(prompts), str(tmp / "shards"),
                 shards_cut, shards_foreign, str(garbage), garbage_shards, str(tmp / "empty.tsv"),
                 str(tmp / "a-file"), str(storage))


def painter_env(ray_address: str, endpoint: str, **extra: str) -> dict:
    """The environment of a `painter` run: the test's Ray, moto as the AWS endpoint, planted credentials."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               RAY_ADDRESS=ray_address, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=PLANTED["key"],
               AWS_SECRET_ACCESS_KEY=PLANTED["secret"], AWS_DEFAULT_REGION="us-east-1")
    return env | extra


def _command(args: list[str]) -> list[str]:
    script = Path(sys.executable).parent / "painter"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "painter.cli", *args]


@dataclass
class Result:
    args: list[str]
    code: int
    stdout: str
    stderr: str

    @property
    def last(self) -> dict:
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert lines, f"no stdout from painter {' '.join(self.args)}; stderr:\n{self.stderr[-3000:]}"
        return json.loads(lines[-1])


# One `painter` run on the session's Ray at a time: two jobs started together on 2 CPUs can each hold part of
# what the other needs (a Ray Train run's placement group, a tokenize actor pool) and both wait until a
# deadline (CI once saw a 3-step train run get no CPU in 300 s; here a train-vq run and a tokenize run
# stalled 230 s together). The threads of tests/test_faults.py overlap only their waiting and checking.
RUN_LOCK = threading.Lock()


def ray_busy() -> bool:
    """Some of the session's Ray CPUs are taken (by the one painter run now running, under RUN_LOCK, or by
    the actors of one that just ended)."""
    import ray

    return ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0)


def wait_for_idle_ray(limit: float = 60.0) -> None:
    """Until every CPU of the session's Ray is free again (at most `limit` seconds): a job stopped or killed
    part-way leaves its actors for the raylet to reap. Called holding RUN_LOCK. Polls the cluster's own
    resource view; a wait that runs out is noted in the timings and the cell goes on."""
    import ray

    if not ray.is_initialized():
        return
    start = time.time()
    while ray_busy():
        if time.time() - start > limit:
            TIMINGS.append(f"{limit:6.1f} s  waited for the session's CPUs; still held")
            return
        time.sleep(0.5)


def run_painter(args: list[str], env: dict, timeout: float = 300) -> Result:
    with RUN_LOCK:
        wait_for_idle_ray()
        start = time.time()
        done = subprocess.run(_command(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    TIMINGS.append(f"{time.time() - start:6.1f} s  painter {' '.join(args[:1] + args[-2:])}")
    return Result(args, done.returncode, done.stdout, done.stderr)


def run_batch(cases: list[tuple[list[str], dict]], env: dict, folder: Path, timeout: float = 300) -> list[Result]:
    """Many command lines in one `tests/fault_runner.py` process (for cells that fail before any work)."""
    name = uuid.uuid4().hex[:8]
    cases_file, results_file = folder / f"cases-{name}.json", folder / f"results-{name}.json"
    cases_file.write_text(json.dumps([{"argv": argv, "env": extra} for argv, extra in cases]), encoding="utf-8")
    runner = [sys.executable, str(ROOT / "tests" / "fault_runner.py"), str(cases_file), str(results_file)]
    start = time.time()
    done = subprocess.run(runner, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    TIMINGS.append(f"{time.time() - start:6.1f} s  fault_runner: {len(cases)} cells")
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(results_file.read_text(encoding="utf-8"))
    return [Result(argv, r["code"], r["stdout"], r["stderr"]) for (argv, _), r in zip(cases, results)]


def start_painter(args: list[str], env: dict, log_dir: Path) -> tuple[subprocess.Popen, callable]:
    """A `painter` run in the background, holding RUN_LOCK until it ends; returns it and a function that
    waits for it (a `Result`) and releases the lock.

    Its output goes to files, which a run that is signalled part-way cannot block on."""
    RUN_LOCK.acquire()
    try:
        wait_for_idle_ray()
        name = uuid.uuid4().hex[:8]
        out, err = open(log_dir / f"{name}.out", "w+"), open(log_dir / f"{name}.err", "w+")
        start = time.time()
        process = subprocess.Popen(_command(args), cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        process.stderr_path = Path(err.name)  # what it has said so far, for `signal_when`
    except BaseException:
        RUN_LOCK.release()
        raise

    def finish(timeout: float = 300) -> Result:
        try:
            process.wait(timeout=timeout)
        finally:
            RUN_LOCK.release()
        out.seek(0), err.seek(0)
        TIMINGS.append(f"{time.time() - start:6.1f} s  painter {args[0]} (signalled part-way)")
        result = Result(args, process.returncode, out.read(), err.read())
        out.close(), err.close()
        return result

    return process, finish


def signal_when(args: list[str], env: dict, log_dir: Path, ready, signum: int, limit: float = 240) -> Result:
    """Start a `painter` run and send it `signum` once `ready(stderr so far)` says it has got far enough
    (polled, within `limit` seconds); its Result. A run that ended first fails the test."""
    process, finish = start_painter(args, env, log_dir)
    try:
        deadline = time.time() + limit
        while process.poll() is None and time.time() < deadline:
            if ready(process.stderr_path.read_text(errors="replace")):
                break
            time.sleep(0.05)  # a condition polled, with a deadline
        running = process.poll() is None
        send(process, signum)
    except BaseException:
        process.kill()
        finish()
        raise
    result = finish()
    assert running, f"the run ended before it could be stopped part-way: {result.stdout[-500:]}"
    return result


def assert_no_credentials(result: Result) -> None:
    for value in PLANTED.values():
        assert value not in result.stdout and value not in result.stderr, f"a credential was printed: {result.args}"


def assert_failed_cleanly(result: Result, *names: str, code: int, debug: bool = False) -> str:
    """The failure contract (see the module docstring): exit `code`, its class in the last line; the error line."""
    assert_no_credentials(result)
    assert result.code == code, (result.code, result.stdout[-1000:], result.stderr[-3000:])
    last = result.last
    assert last["status"] == "failed" and last["failure"] == FAILURE_OF_CODE[code], last
    error = last["error"]
    assert isinstance(error, str) and error and "\n" not in error, last
    for name in names:
        assert name in error, f"{name!r} not named in: {error}"
    has_traceback = "Traceback (most recent call last)" in result.stderr
    assert has_traceback == debug, result.stderr[-3000:]
    return error


def record(job: str, fault: str, outcome: str) -> None:
    MATRIX[(job, fault)] = outcome


def table() -> str:
    width = max(len(f) for f in FAULTS)
    lines = [f"{'fault'.ljust(width)} | job | outcome", "-" * 100]
    for fault in FAULTS:
        for job in JOBS:
            if (job, fault) in MATRIX:
                lines.append(f"{fault.ljust(width)} | {job} | {MATRIX[(job, fault)]}")
    return "\n".join(lines)


def write_table(folder: Path) -> None:
    path = folder / "fault_matrix.txt"
    path.write_text(table() + "\n\n" + "\n".join(TIMINGS) + "\n", encoding="utf-8")
    TABLE_FILE[:] = [path]


def pytest_terminal_summary(terminalreporter) -> None:
    """The job x fault table, when the matrix ran (tests/conftest.py makes this a hook)."""
    if not MATRIX:
        return
    terminalreporter.section("fault matrix: job x fault -> outcome")
    terminalreporter.write_line(table())
    terminalreporter.write_line("\n".join(["painter processes the matrix ran:", *TIMINGS]))
    if TABLE_FILE:
        terminalreporter.write_line(f"(also in {TABLE_FILE[0]})")


def send(process: subprocess.Popen, signum: int) -> None:
    if process.poll() is None:
        os.kill(process.pid, signum)


SIGNALS = {"sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}
