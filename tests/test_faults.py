"""The fault matrix (issue 17): every job under every fault we can make here ends with its one-line reason
and loses nothing; then, the fault removed, a rerun completes with every row accounted for.

Faults found before any work (inputs, model files, outputs, storage: the jobs' `preflight`) fail in a
second, before Ray; those cells run up front (`preflight_results`): the issue's three as `painter`
processes, the rest through `painter.cli.main` in two `tests/fault_runner.py` processes (one import for
all). The others run the `painter` console script on the session's Ray (`RAY_ADDRESS`), each job's
good run doubling as the rerun of its failed cells: tokenize and evaluate read a corpus whose last row
is cut mid-row (recovered: that row rejected); generate runs one night on a small tmpfs through SIGTERM,
SIGKILL and a full disk to completion; tokenize and evaluate then meet the full disk too, and SIGTERM
and SIGKILL part-way (`stopped_runs`). train and train-vq each run a NaN loss, then one night on a tmpfs
(`training_night`): a full disk, SIGTERM and SIGKILL, resumed with --resume as their failure line says,
to the last step; train-vq's reads the cut corpus. Every job also runs through a flaky S3 proxy
(`flaky_runs`). The runs go in two threads (`train_lane`, `light_lane`) beside generate's night, but
only one `painter` run at a time holds the session's Ray (`fault_matrix.RUN_LOCK`: two jobs on 2 CPUs
can deadlock). About 9 minutes on 2 cores, most of it the 12 Ray Train runs. The table job x fault ->
outcome (and the wall time of every `painter` process) is printed at the end of the session
(`fault_matrix.pytest_terminal_summary`). The runs beyond generate's night live in tests/fault_runs.py.
"""
from __future__ import annotations

import os
import socket
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from deltalake import DeltaTable

from fault_matrix import (FAULTS, JOBS, PLANTED, PROMPTS, SIGNALS, assert_failed_cleanly,
                          assert_no_credentials, build_world, painter_env, record, run_batch, run_painter, signal_when,
                          write_table)
from fault_runs import (DATE, assert_accounted, base_args, disk_filled, error_rate_runs, flaky_runs, gist, good_run,
                        nan_run, stopped_runs, training_night)

pytestmark = pytest.mark.slow
SHARDS = "only train reads token shards"
SKIPS = {
    **{(job, f): SHARDS for job in JOBS if job != "train" for f in ("shard-truncated", "shard-foreign")},
    ("train", "input-truncated-row"): "token shards are Parquet: a shard cut short is `shard-truncated`",
    **{(job, "nan-loss"): "no training loss" for job in ("tokenize", "generate", "evaluate")},
    ("train", "error-rate"): "token shards have no rows to reject",
}
ISSUE_CELLS = (("generate", "s3-refused"), ("generate", "output-parent-file"), ("train", "shard-truncated"))
PREFLIGHT = ("input-missing", "input-directory", "input-binary", "shard-truncated", "shard-foreign",
             "model-missing-weight", "model-truncated-weight", "output-parent-file", "s3-refused", "s3-no-bucket")
OUTPUT_IN_BUCKET = ("tokenize", "generate")  # preflight_case: their missing bucket is the output's, the others' the input's


def preflight_code(job: str, fault: str) -> int:
    """4 ("storage") for storage refusing connections, or an output bucket that does not exist; 2 ("usage") for
    the rest: an input path that does not exist (its bucket missing too, as input-missing) or cannot be used."""
    return 4 if fault == "s3-refused" or (fault == "s3-no-bucket" and job in OUTPUT_IN_BUCKET) else 2


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
    if job in OUTPUT_IN_BUCKET:
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
        return (good_run(base_args("evaluate", world), env), flaky_runs(world, env, s3_server),
                good_run(base_args("tokenize", world), env), stopped_runs(world, env, logs),
                error_rate_runs(world, env))

    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(work)


@pytest.fixture(scope="module")
def reruns(world, env, preflight_results, generate_night, light_lane) -> dict:
    """Each job's run on good inputs, into the output its failed cells left untouched: the rerun once the
    fault is removed. tokenize and evaluate read a corpus cut mid-row: that row is rejected. (train's and
    train-vq's are not run: a Ray Train run costs ~40 s here; tests/test_stage_train*.py run them.)"""
    evaluate, _, tokenize, *_ = light_lane.result()
    return {"generate": generate_night["summary"], "tokenize": tokenize, "evaluate": evaluate}


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
    elif job in ("tokenize", "evaluate") and fault in ("sigterm", "sigkill"):
        outcome = request.getfixturevalue("light_lane").result()[3][job][fault]
    elif fault == "error-rate":
        outcome = request.getfixturevalue("light_lane").result()[4][job]
    else:  # train, train-vq: nan-loss, sigterm, sigkill
        outcome = request.getfixturevalue("train_lane").result()[job][fault]
    record(job, fault, outcome)
    if outcome.startswith("skipped: "):
        pytest.skip(outcome.removeprefix("skipped: "))


def _preflight_cell(job: str, fault: str, request) -> str:
    result, names, debug = request.getfixturevalue("preflight_results")[(job, fault)]
    code = preflight_code(job, fault)
    error = assert_failed_cleanly(result, *names, debug=debug, code=code)
    said = f"failed cleanly (exit {code}){' (--debug: traceback)' if debug else ''}: {gist(error)}; rerun: "
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
    return signal_when(args, env, logs, lambda _: _versions(output) > start, signum)


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
    outcome["disk-full"] = f"skipped: {no_disk}" if no_disk else _diskfull(args, env, output, folder)
    summary = good_run(args, env)
    assert sorted(_pairs(output)) == sorted((f"p{i:02d}", s) for i in range(PROMPTS) for s in range(2))
    assert summary["skipped_already_done"] > 0
    return outcome | {"summary": summary}


def _diskfull(args, env, output: str, folder: Path) -> str:
    before = len(_pairs(output))
    with disk_filled(folder, 24 * 1024):  # room for a few commits' log entries, not for a batch of images
        full = run_painter(args, env)
    error = assert_failed_cleanly(full, output, code=4)
    assert len(_pairs(output)) >= before
    return f"failed cleanly (exit 4): {gist(error)}; rerun completed"


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
        with disk_filled(folder, 0):
            full = run_painter(args, env)
        error = assert_failed_cleanly(full, output, "No space left on device", code=4)
        summary = good_run([*args, *again], env)
        outcome[job] = (f"failed cleanly (exit 4): {gist(error)}; rerun{' with --overwrite' if again else ''}: "
                        f"{assert_accounted(job, summary)}")
    return outcome
