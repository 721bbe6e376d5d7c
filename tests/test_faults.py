"""The fault matrix (issue 17): every job under every fault we can make here ends with its one-line reason
and loses nothing; then, the fault removed, a rerun completes with every row accounted for.

Faults found before any work (inputs, model files, outputs, storage: the jobs' `preflight`) fail in a
second, before Ray; those cells run up front (`preflight_results`): the issue's three as `painter`
processes, the rest through `painter.cli.main` in two `tests/fault_runner.py` processes (one import for
all). The others run the `painter` console script on the session's Ray (`RAY_ADDRESS`), each job's
good run doubling as the rerun of its failed cells: tokenize and evaluate read a corpus whose last row
is cut mid-row (recovered: that row rejected); generate runs one night on a small tmpfs through SIGTERM,
SIGKILL and a full disk to completion; tokenize and evaluate then meet the full disk too, and tokenize
SIGTERM and SIGKILL (`stopped_runs`). train and train-vq each run a NaN loss, then one night on a tmpfs
(`training_night`): a full disk, SIGTERM and SIGKILL, resumed with --resume as their failure line says,
to the last step; train-vq's reads the cut corpus. Every job also runs through a flaky S3 proxy
(`flaky_runs`). The runs go in two threads (`train_lane`, `light_lane`) beside generate's night, but
only one `painter` run at a time holds the session's Ray (`fault_matrix.RUN_LOCK`: two jobs on 2 CPUs
can deadlock). About 9 minutes on 2 cores, most of it the 12 Ray Train runs. The table job x fault ->
outcome (and the wall time of every `painter` process) is printed at the end of the session
(`fault_matrix.pytest_terminal_summary`).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from deltalake import DeltaTable

from painter.checkpoint import load_model

from fault_matrix import (CORPUS_ROWS, FAULTS, JOBS, PLANTED, PROMPTS, SHARD_ROWS, SIGNALS, assert_failed_cleanly,
                          assert_no_credentials, build_world, painter_env, record, run_batch, run_painter, signal_when,
                          write_table)
from fault_proxy import FaultProxy

pytestmark = pytest.mark.slow
DATE = "2024-05-01"
INPUT = {"tokenize": "--input", "train": "--data", "train-vq": "--input", "generate": "--input", "evaluate": "--corpus"}
SHARDS = "only train reads token shards"
SKIPS = {
    **{(job, f): SHARDS for job in JOBS if job != "train" for f in ("shard-truncated", "shard-foreign")},
    ("train", "input-truncated-row"): "token shards are Parquet: a shard cut short is `shard-truncated`",
    **{(job, "nan-loss"): "no training loss" for job in ("tokenize", "generate", "evaluate")},
    **{("evaluate", f): "no part-way here: evaluate scores this corpus in ~0.4 s in its driver, before any Ray "
       "work, and writes its results at the end, so a stop keeps nothing and the rerun does it all (its failure "
       "line says so: painter.registry)" for f in ("sigkill", "sigterm")},
}
ISSUE_CELLS = (("generate", "s3-refused"), ("generate", "output-parent-file"), ("train", "shard-truncated"))
PREFLIGHT = ("input-missing", "input-directory", "input-binary", "shard-truncated", "shard-foreign",
             "model-missing-weight", "model-truncated-weight", "output-parent-file", "s3-refused", "s3-no-bucket")


def base_args(job: str, w, *, model: str | None = None, output: str | None = None, data: str | None = None,
              storage: str | None = None) -> list[str]:
    """A small, quick run of `job` on good inputs (each part replaceable by a faulty one)."""
    model, output = model or w.model, output or w.out(job)
    data = data or {"train": w.shards, "generate": w.prompts}.get(job, w.corpus_cut)
    args = {
        "tokenize": ["--batch-size", "8"],
        "train": ["--init", model, "--workers", "1", "--batch-size", "4", "--max-steps", "3", "--warmup-steps", "0",
                  "--log-every", "1", "--checkpoint-every", "1", "--lr", "1e-3"],
        "train-vq": ["--workers", "1", "--batch-size", "4", "--max-steps", "2", "--eval-images", "0",
                     "--log-every", "1", "--checkpoint-every", "2"],
        "generate": ["--run-date", DATE, "--samples", "2", "--batch-size", "2", "--micro-batch", "2",
                     "--commit-images", "1", "--no-contact-sheet", "--max-error-rate", "0.5"],
        "evaluate": ["--captions", "0", "--batch-size", "8"],
    }[job]
    if job != "train":
        args += ["--model", model] + (["--max-error-rate", "0.5"] if job != "generate" else [])
    args = [job, INPUT[job], data, "--output", output, *args]
    return args + (["--storage-options", f"@{storage}"] if storage else [])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def preflight_case(job: str, fault: str, w, refused: dict) -> tuple[list[str], dict, list[str], bool]:
    """(args, extra environment, what the error must name, --debug) of a cell that fails before any work."""
    cut_dir = lambda path: str(Path(path).parent)  # noqa: E731
    if fault == "input-missing":
        return base_args(job, w, data=str(w.tmp / "missing.tsv")), {}, [str(w.tmp / "missing.tsv")], False
    if fault == "input-directory":
        return base_args(job, w, data=w.empty_dir), {}, [w.empty_dir], False
    if fault == "input-binary":
        bad = w.garbage_shards if job == "train" else w.garbage
        return base_args(job, w, data=cut_dir(bad) if job == "train" else bad), {}, [bad], False
    if fault in ("shard-truncated", "shard-foreign"):
        bad = w.shards_cut if fault == "shard-truncated" else w.shards_foreign
        return base_args(job, w, data=cut_dir(bad)), {}, [bad], False
    if fault.startswith("model-"):
        model = w.model_bare if fault == "model-missing-weight" else w.model_cut
        word = "file not found" if fault == "model-missing-weight" else "truncated"
        return base_args(job, w, model=model), {}, [model, ".safetensors", word], False
    if fault == "output-parent-file":
        return base_args(job, w, output=f"{w.a_file}/out"), {}, [w.a_file], False
    bucket = "faults" if fault == "s3-refused" else "no-such-bucket-f17"
    storage = refused["file"] if fault == "s3-refused" else w.storage_file
    env = {"AWS_ENDPOINT_URL": refused["endpoint"]} if fault == "s3-refused" else {}
    names = [f"s3://{bucket}/", refused["endpoint"].rsplit(":", 1)[1]] if fault == "s3-refused" else [bucket]
    if job in ("tokenize", "generate"):
        args = base_args(job, w, output=f"s3://{bucket}/out-{job}", storage=storage)
    elif job == "train":
        args = base_args(job, w, data=f"s3://{bucket}/shards")
    else:
        args = base_args(job, w, data=f"s3://{bucket}/corpus.tsv", storage=storage)
    return args + (["--debug"] if fault == "s3-refused" else []), env, names, fault == "s3-refused"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, s3_server, small_disk):
    tmp = tmp_path_factory.mktemp("faults")
    w = build_world(tmp, tiny_model_dir, s3_server["endpoint_url"])
    w.outputs["generate"] = str(small_disk[0] / "night")  # the night that SIGTERM, SIGKILL and the full disk meet
    yield w
    write_table(tmp)


@pytest.fixture(scope="module")
def env(ray_session, s3_server) -> dict:
    return painter_env(ray_session.get_runtime_context().gcs_address, s3_server["endpoint_url"])


@pytest.fixture(scope="module")
def preflight_results(world, env, train_lane) -> dict:
    """Every cell that fails before any work. The issue's three run as `painter` processes of their own; the
    others run in two `tests/fault_runner.py` processes (`painter.cli.main` per cell: one import for all)."""
    refused = {"endpoint": f"http://127.0.0.1:{_free_port()}", "file": str(world.tmp / "refused.json")}
    Path(refused["file"]).write_text(f'{{"endpoint_url": "{refused["endpoint"]}", "key": "{PLANTED["key"]}", '
                                     f'"secret": "{PLANTED["secret"]}"}}')
    cells = [(j, f) for j in JOBS for f in PREFLIGHT if (j, f) not in SKIPS]
    cases = {cell: preflight_case(*cell, world, refused) for cell in cells}
    batched = [cell for cell in cells if cell not in ISSUE_CELLS]
    halves = [batched[0::2], batched[1::2]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        batches = [pool.submit(run_batch, [cases[c][:2] for c in half], env, world.tmp) for half in halves]
        alone = {cell: pool.submit(run_painter, cases[cell][0], env | cases[cell][1]) for cell in ISSUE_CELLS}
        found = {cell: future.result() for cell, future in alone.items()}
        for half, future in zip(halves, batches):
            found |= dict(zip(half, future.result()))
    results = {cell: (found[cell], cases[cell][2], cases[cell][3]) for cell in cells}
    for job in JOBS:  # nothing half-written where the reruns will write
        assert not os.path.exists(world.out(job)), world.out(job)
    return results


def _good_run(args: list[str], env: dict) -> dict:
    result = run_painter(args, env)
    assert_no_credentials(result)
    assert result.code == 0, result.stderr[-4000:]
    summary = result.last
    assert summary["status"] == "succeeded", summary
    return summary


@pytest.fixture(scope="module")
def train_lane(world, env, tmp_path_factory, training_disk):
    """The training jobs' runs in a thread from the start, beside everything else: Ray Train mostly waits
    (~20 s of start-up on 2 cores). For train, then train-vq: the NaN run, then one run through SIGTERM and
    SIGKILL to completion (`training_night`), each in a folder of its own, where no failed cell looks."""
    logs = tmp_path_factory.mktemp("train-logs")

    def work() -> dict:
        return {job: {"nan-loss": nan_run(job, world, env)} | training_night(job, world, env, logs, training_disk)
                for job in ("train", "train-vq")}

    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(work)


@pytest.fixture(scope="module")
def light_lane(world, env, s3_server, preflight_results, tmp_path_factory):
    """evaluate's rerun, the flaky-S3 runs, tokenize's rerun and both stopped part-way, in a thread beside
    generate's night."""
    logs = tmp_path_factory.mktemp("light-logs")

    def work() -> tuple:
        return (_good_run(base_args("evaluate", world), env), flaky_runs(world, env, s3_server),
                _good_run(base_args("tokenize", world), env), stopped_runs(world, env, logs))

    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(work)


@pytest.fixture(scope="module")
def reruns(world, env, preflight_results, generate_night, light_lane) -> dict:
    """Each job's run on good inputs, into the output its failed cells left untouched: the rerun once the
    fault is removed. tokenize and evaluate read a corpus cut mid-row: that row is rejected. (train's and
    train-vq's are not run: a Ray Train run costs ~40 s here; tests/test_stage_train*.py run them.)"""
    evaluate, _, tokenize, _ = light_lane.result()
    return {"generate": generate_night["summary"], "tokenize": tokenize, "evaluate": evaluate}


def assert_accounted(job: str, s: dict) -> str:
    """Rows in = rows out + rows rejected, in each job's words; what the table says."""
    if job == "tokenize":
        assert (s["rows_in"], s["rows_rejected"]) == (CORPUS_ROWS, 1) and s["rows_in"] == s["rows_out"] + 1
    elif job == "train-vq":
        assert (s["rows_in"], s["rows_rejected"]) == (CORPUS_ROWS, 1) and s["rows"] > 0
    elif job == "train":  # token shards have no rows to reject: every row is read, every step done
        assert s["rows"] == SHARD_ROWS and s["steps"] == 3, s  # base_args: --max-steps 3
        return f"all {SHARD_ROWS} shard rows read, {s['steps']} of {s['steps']} steps"
    elif job == "evaluate":
        assert s["rows_read"] == CORPUS_ROWS and s["rows_rejected"] == 1
        assert s["reconstruction"]["images"] == CORPUS_ROWS - 1
    else:
        assert s["rows_rejected"] == 1 and s["rows_in"] == s["prompts_accepted"] + 1  # the cut last line
        assert s["skipped_already_done"] + s["images_out"] == s["pairs_total"] == 2 * s["prompts_accepted"]
    return "rows in = out + rejected"


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("job", JOBS)
def test_fault(job, fault, request):
    if (job, fault) in SKIPS:
        record(job, fault, f"skipped: {SKIPS[(job, fault)]}")
        pytest.skip(SKIPS[(job, fault)])
    if fault in PREFLIGHT:
        outcome = _preflight_cell(job, fault, request)
    elif fault == "input-truncated-row":
        s = (request.getfixturevalue("train_lane").result()[job]["summary"] if job == "train-vq"
             else request.getfixturevalue("reruns")[job])
        outcome = f"recovered: the cut row rejected, {assert_accounted(job, s)}"
    elif job == "generate" and fault in ("sigterm", "sigkill", "disk-full"):
        outcome = request.getfixturevalue("generate_night")[fault]
    elif fault == "disk-full" and job in ("tokenize", "evaluate"):
        outcome = request.getfixturevalue("disk_cells")[job]
    elif fault == "s3-flaky":
        outcome = request.getfixturevalue("light_lane").result()[1][job]
    elif job == "tokenize" and fault in ("sigterm", "sigkill"):
        outcome = request.getfixturevalue("light_lane").result()[3][job][fault]
    else:  # train, train-vq: nan-loss, sigterm, sigkill
        outcome = request.getfixturevalue("train_lane").result()[job][fault]
    record(job, fault, outcome)
    if outcome.startswith("skipped: "):
        pytest.skip(outcome.removeprefix("skipped: "))


def _gist(error: str) -> str:
    """The error line for the table: its start and end (the paths in between are long)."""
    return error if len(error) <= 160 else f"{error[:80]} … {error[-70:]}"


def _preflight_cell(job: str, fault: str, request) -> str:
    result, names, debug = request.getfixturevalue("preflight_results")[(job, fault)]
    error = assert_failed_cleanly(result, *names, debug=debug)
    said = f"failed cleanly{' (--debug: traceback)' if debug else ''}: {_gist(error)}; rerun: "
    if job in ("train", "train-vq"):
        return said + request.getfixturevalue("train_lane").result()[job]["rerun"]
    return said + assert_accounted(job, request.getfixturevalue("reruns")[job])


# --- generate: one night through SIGTERM, SIGKILL and a full disk ---------------------------------------


def _tmpfs(folder: Path, size: str):
    """A tmpfs of `size` mounted at `folder` (unmounted after): (folder, None), or (folder, the reason none
    can be mounted here)."""
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        yield folder, f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); no quota either"
        return
    try:
        yield folder, None
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """A 4 MiB tmpfs for generate's night, tokenize and evaluate."""
    yield from _tmpfs(tmp_path_factory.mktemp("tmpfs"), "4m")


@pytest.fixture(scope="module")
def training_disk(tmp_path_factory):
    """A 256 MiB tmpfs for the training nights (two checkpoints of a tiny model directory each)."""
    yield from _tmpfs(tmp_path_factory.mktemp("tmpfs-train"), "256m")


def _versions(output: str) -> int:
    log = Path(output, "_delta_log")
    names = [p.name for p in log.glob("*.json")] if log.is_dir() else []
    return max((int(n.split(".")[0]) for n in names if n.split(".")[0].isdigit()), default=-1)


def _pairs(output: str) -> list[tuple[str, int]]:
    rows = DeltaTable(output).to_pyarrow_table(columns=["idx", "sample"], filters=[("run_date", "=", DATE)])
    pairs = list(zip(rows.column("idx").to_pylist(), rows.column("sample").to_pylist()))
    assert not [p for p, n in Counter(pairs).items() if n > 1], "a pair committed twice"
    return pairs


def _signalled(args, env, output: str, signum, logs: Path):
    """A generate run sent `signum` once it has made a commit of its own; its Result."""
    start = max(_versions(output), 0)
    return signal_when(args, env, logs, lambda: _versions(output) > start, signum)


@pytest.fixture(scope="module")
def generate_night(world, env, preflight_results, small_disk, tmp_path_factory, light_lane) -> dict:
    folder, no_disk = small_disk
    output, logs = world.out("generate"), tmp_path_factory.mktemp("night-logs")
    args, outcome = base_args("generate", world), {}
    stopped = _signalled(args, env, output, SIGNALS["sigterm"], logs)
    assert_failed_cleanly(stopped, "SIGTERM", "rerun the same command", code=143)
    kept = len(_pairs(output))
    killed = _signalled(args, env, output, SIGNALS["sigkill"], logs)
    assert killed.code == -9 and len(_pairs(output)) > kept
    assert_no_credentials(killed)
    outcome["sigterm"] = f"failed cleanly (exit 143), {kept} of {2 * PROMPTS} images kept; rerun recovered them"
    outcome["sigkill"] = f"killed part-way with {len(_pairs(output))} images committed; rerun recovered them"
    outcome["disk-full"] = f"skipped: {no_disk}" if no_disk else _disk_full(args, env, output, folder)
    summary = _good_run(args, env)
    assert sorted(_pairs(output)) == sorted((f"p{i:02d}", s) for i in range(PROMPTS) for s in range(2))
    assert summary["skipped_already_done"] > 0
    return outcome | {"summary": summary}


@contextmanager
def _full(folder: Path, left: int):
    """The tmpfs at `folder` filled up to `left` bytes free, for the duration."""
    stats = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - left))
    try:
        yield
    finally:
        filler.unlink()


def _disk_full(args, env, output: str, folder: Path) -> str:
    before = len(_pairs(output))
    with _full(folder, 24 * 1024):  # room for a few commits' log entries, not for a batch of images
        full = run_painter(args, env)
    error = assert_failed_cleanly(full, output)
    assert len(_pairs(output)) >= before
    return f"failed cleanly: {_gist(error)}; rerun completed"


@pytest.fixture(scope="module")
def disk_cells(world, env, small_disk, generate_night) -> dict:
    """tokenize and evaluate writing to the small tmpfs (after generate's night) once it is full: each fails
    naming the file it could not write; the disk freed, the rerun to the same output completes with every
    row accounted for (tokenize's with --overwrite, as its refusal of a non-empty output says)."""
    folder, no_disk = small_disk
    if no_disk:
        return {job: f"skipped: {no_disk}" for job in ("tokenize", "evaluate")}
    outcome = {}
    for job, again in (("tokenize", ["--overwrite"]), ("evaluate", [])):
        output = str(folder / job)
        args = base_args(job, world, output=output)
        with _full(folder, 0):
            full = run_painter(args, env)
        error = assert_failed_cleanly(full, output, "No space left on device")
        summary = _good_run([*args, *again], env)
        outcome[job] = (f"failed cleanly: {_gist(error)}; rerun{' with --overwrite' if again else ''}: "
                        f"{assert_accounted(job, summary)}")
    return outcome


# --- train: a loss that goes NaN --------------------------------------------------------------------------


def nan_run(job: str, world, env) -> str:
    """A schedule that climbs (--min-lr-ratio 1e25: the cosine 'decay' rises from 0 to 2.5e21 at step 2) makes
    the loss NaN after step 2 (train) or 3 (train-vq): the run stops there and keeps the checkpoint of the step
    before, which is finite."""
    args = base_args(job, world, output=str(world.tmp / f"out-{job}-nan"))
    diverged = run_painter([*args, "--min-lr-ratio", "1e25", "--max-steps", "3", "--checkpoint-every", "1"], env)
    error = assert_failed_cleanly(diverged, "the training loss is nan after step", "Last good checkpoint")
    step = int(re.search(r"after step (\d+)", error).group(1))
    kept = re.search(r"Last good checkpoint: (\S+?);", error).group(1)
    assert step in (2, 3) and torch.load(os.path.join(kept, "train_state.pt"), weights_only=True)["step"] == step - 1
    model = load_model(kept, parts=("gpt" if job == "train" else "vqgan",))
    assert all(torch.isfinite(p).all() for p in (model.gpt or model.vqgan).parameters())
    return f"failed cleanly: {_gist(error)}; the step-{step - 1} checkpoint is kept and finite"


def _ray_busy() -> bool:
    """The session's Ray has CPUs taken: the one painter run now running (RUN_LOCK) has started its work."""
    import ray

    return ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0)


def stopped_runs(world, env, logs: Path) -> dict:
    """tokenize stopped once its Ray work has started: by SIGTERM (a clean stop whose line says to rerun with
    --overwrite: a stopped run's shards are not a whole output), then, rerun so, by SIGKILL; then rerun to the
    end with every row accounted for."""
    args = base_args("tokenize", world, output=str(world.tmp / "out-tokenize-stopped"))
    stopped = signal_when(args, env, logs, _ray_busy, SIGNALS["sigterm"])
    assert_failed_cleanly(stopped, "SIGTERM", "rerun the same command with --overwrite", code=143)
    args.append("--overwrite")
    killed = signal_when(args, env, logs, _ray_busy, SIGNALS["sigkill"])
    assert killed.code == -9
    assert_no_credentials(killed)
    accounted = assert_accounted("tokenize", _good_run(args, env))
    return {"tokenize": {"sigterm": f"failed cleanly (exit 143); rerun with --overwrite: {accounted}",
                         "sigkill": f"killed part-way; rerun with --overwrite: {accounted}"}}


NIGHT_STEPS = 16  # tiny steps; a checkpoint at each, so every stop leaves one


def _logged_step(output: str, job: str) -> int:
    """The last step the run under `output` logged (rank 0 appends a line per step, once the step before it
    has been reported with its checkpoint), or 0."""
    path = Path(output, "_runs", job, "metrics.jsonl")
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)


def _stopped_after(args, env, output: str, signum, logs: Path):
    """A training run sent `signum` once it has logged two steps of its own (a checkpoint of its own is then
    in the run); its Result."""
    start = _logged_step(output, args[0])
    return signal_when(args, env, logs, lambda: _logged_step(output, args[0]) >= start + 2, signum)


def training_night(job: str, world, env, logs: Path, disk: tuple) -> dict:
    """One run of `job` (train, train-vq) of NIGHT_STEPS steps on a tmpfs: first on a full disk (it fails
    naming the file), then through SIGTERM (a clean stop whose line says to rerun with --resume), then,
    resumed, SIGKILL, then resumed to the end: every step done, from the checkpoints. train-vq reads the
    corpus cut mid-row: its last run rejects that row."""
    folder, no_disk = disk
    output = str((world.tmp if no_disk else folder) / f"out-{job}-night")
    args = [*base_args(job, world, output=output), "--max-steps", str(NIGHT_STEPS), "--checkpoint-every", "1"]
    outcome = {"disk-full": f"skipped: {no_disk}"}
    if not no_disk:
        with _full(folder, 24 * 1024):  # room for the metrics, not for a checkpoint
            full = run_painter([*args, "--max-failures", "0"], env)  # no restarts into the same full disk
        error = assert_failed_cleanly(full, output, "No space left on device")
        outcome["disk-full"] = f"failed cleanly: {_gist(error)}; rerun with --resume completed (its night)"
        if Path(output, "_runs", job).exists():  # the run exists: the plain rerun is refused, naming --resume
            args.append("--resume")
    stopped = _stopped_after(args, env, output, SIGNALS["sigterm"], logs)
    assert_failed_cleanly(stopped, "SIGTERM", "rerun the same command with --resume", code=143)
    termed = _logged_step(output, job)
    args += [] if "--resume" in args else ["--resume"]
    killed = _stopped_after(args, env, output, SIGNALS["sigkill"], logs)
    killed_at = _logged_step(output, job)
    assert killed.code == -9 and killed_at > termed
    assert_no_credentials(killed)
    summary = _good_run(args, env)
    state = torch.load(os.path.join(summary["checkpoint"], "train_state.pt"), weights_only=True)
    assert summary["steps"] == state["step"] == _logged_step(output, job) == NIGHT_STEPS, summary
    done = f"{NIGHT_STEPS} of {NIGHT_STEPS} steps"
    return outcome | {
        "sigterm": f"failed cleanly (exit 143) after step {termed}; rerun with --resume continued from its "
                   f"checkpoint: {done}",
        "sigkill": f"killed part-way after step {killed_at}; rerun with --resume: {done}",
        "rerun": f"completed (its good run, through SIGTERM and SIGKILL with --resume: {done})",
        "summary": summary}


# --- S3 that fails some requests --------------------------------------------------------------------------


def flaky_runs(world, env, s3_server) -> dict:
    """Every job through `FaultProxy` (transient 500s, dropped connections) in front of moto: its input, and
    its output where that can be a bucket (evaluate writes local reports)."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint_url"], key="k", secret="s", skip_instance_cache=True)
    fs.mkdir("flaky")
    fs.pipe("flaky/prompts.tsv", "".join(f"p{i:02d}\t宽松T恤 第{i}款\n" for i in range(4)).encode() + b"p99")
    fs.put(str(Path(world.corpus_cut, Path(world.corpus).name)), "flaky/corpus/part-00000.tsv")
    for shard in sorted(Path(world.shards).glob("*.parquet")):
        fs.put(str(shard), f"flaky/shards/{shard.name}")
    outcome = {}
    with FaultProxy(s3_server["endpoint_url"]) as proxy:
        storage = world.tmp / "flaky.json"
        storage.write_text(f'{{"endpoint_url": "{proxy.url}", "key": "{PLANTED["key"]}", '
                           f'"secret": "{PLANTED["secret"]}"}}')
        flaky_env = env | {"AWS_ENDPOINT_URL": proxy.url}
        for job, data, output in (("generate", "s3://flaky/prompts.tsv", "s3://flaky/night"),
                                  ("evaluate", "s3://flaky/corpus", str(world.tmp / "flaky-evaluate")),
                                  ("tokenize", "s3://flaky/corpus", "s3://flaky/tokens"),
                                  ("train", "s3://flaky/shards", "s3://flaky/train"),
                                  ("train-vq", "s3://flaky/corpus", "s3://flaky/train-vq")):
            before = dict(proxy.counts)
            args = base_args(job, world, data=data, output=output, storage=str(storage))
            summary = _good_run(args + (["--commit-images", "100"] if job == "generate" else []), flaky_env)
            faults = {k: proxy.counts[k] - before.get(k, 0) for k in ("500", "drop")}
            assert faults["500"] + faults["drop"] > 0, proxy.counts
            outcome[job] = (f"recovered: {faults['500']} answers 500 and {faults['drop']} dropped connections "
                            f"retried; {assert_accounted(job, summary)}")
        assert proxy.counts["500"] > 0 and proxy.counts["drop"] > 0, proxy.counts
    return outcome
