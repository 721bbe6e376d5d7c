"""The fault matrix's runs of `painter` on the session's Ray (tests/test_faults.py holds the fixtures and the
table): the arguments of a small good run of each job (`base_args`), what its summary must account for
(`assert_accounted`), and the runs beyond generate's night: the NaN loss and the training nights
(`nan_run`, `training_night`), tokenize stopped part-way (`stopped_runs`), too many rejected rows (`error_rate_runs`) and every job through a flaky S3
proxy (`flaky_runs`). Each run goes through `fault_matrix.run_painter` / `signal_when`, one at a time.
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from painter.checkpoint.model_dir import load_model

from fault_matrix import (CORPUS_ROWS, PLANTED, SHARD_ROWS, SIGNALS, assert_failed_cleanly, assert_no_credentials,
                          ray_busy, run_painter, signal_when)
from fault_proxy import FaultProxy

DATE = "2024-05-01"
INPUT = {"tokenize": "--input", "train": "--data", "train-vq": "--input", "generate": "--input", "evaluate": "--corpus"}


def base_args(job: str, w, *, model: str | None = None, output: str | None = None, data: str | None = None,
              storage: str | None = None) -> list[str]:
    """A small, quick run of `job` on good inputs (each part replaceable by a faulty one)."""
    model, output = model or w.model, output or w.out(job)
    data = data or {"train": w.shards, "generate": w.prompts}.get(job, w.corpus_cut)
    args = {
        "tokenize": ["--micro-batch", "8"],
        "train": ["--init", model, "--workers", "1", "--micro-batch", "4", "--max-steps", "3", "--warmup-steps", "0",
                  "--log-every", "1", "--checkpoint-every", "1", "--lr", "1e-3"],
        "train-vq": ["--workers", "1", "--micro-batch", "4", "--max-steps", "2", "--eval-images", "0",
                     "--log-every", "1", "--checkpoint-every", "2"],
        "generate": ["--run-date", DATE, "--samples", "2", "--batch-size", "2", "--micro-batch", "2",
                     "--commit-images", "1", "--no-contact-sheet", "--max-error-rate", "0.5"],
        "evaluate": ["--captions", "0", "--micro-batch", "8"],
    }[job]
    if job != "train":
        args += ["--model", model] + (["--max-error-rate", "0.5"] if job != "generate" else [])
    args = [job, INPUT[job], data, "--output", output, *args]
    return args + (["--storage-options", f"@{storage}"] if storage else [])


def good_run(args: list[str], env: dict) -> dict:
    result = run_painter(args, env)
    assert_no_credentials(result)
    assert result.code == 0, result.stderr[-4000:]
    summary = result.last
    assert summary["status"] == "succeeded", summary
    return summary


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


def gist(error: str) -> str:
    """The error line for the table: its start and end (the paths in between are long)."""
    return error if len(error) <= 160 else f"{error[:80]} … {error[-70:]}"


@contextmanager
def disk_filled(folder: Path, left: int):
    """The tmpfs at `folder` filled up to `left` bytes free, for the duration."""
    stats = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - left))
    try:
        yield
    finally:
        filler.unlink()


# --- train: a loss that goes NaN --------------------------------------------------------------------------


def nan_run(job: str, world, env) -> str:
    """A schedule that climbs (--min-lr-ratio 1e25: the cosine 'decay' rises from 0 to 2.5e21 at step 2) makes
    the loss NaN after step 2 (train) or 3 (train-vq): the run stops there and keeps the checkpoint of the step
    before, which is finite."""
    args = base_args(job, world, output=str(world.tmp / f"out-{job}-nan"))
    diverged = run_painter([*args, "--min-lr-ratio", "1e25", "--max-steps", "3", "--checkpoint-every", "1"], env)
    error = assert_failed_cleanly(diverged, "the training loss is nan after step", "Last good checkpoint", code=1)
    step = int(re.search(r"after step (\d+)", error).group(1))
    kept = re.search(r"Last good checkpoint: (\S+?);", error).group(1)
    assert step in (2, 3) and torch.load(os.path.join(kept, "train_state.pt"), weights_only=True)["step"] == step - 1
    model = load_model(kept, parts=("gpt" if job == "train" else "vqgan",))
    assert all(torch.isfinite(p).all() for p in (model.gpt or model.vqgan).parameters())
    return f"failed cleanly (exit 1): {gist(error)}; the step-{step - 1} checkpoint is kept and finite"


def stopped_runs(world, env, logs: Path) -> dict:
    """tokenize (once its Ray work has started) and evaluate (once it has said it is generating its captions'
    images) stopped part-way: by SIGTERM, a clean stop whose line says how to rerun (tokenize: with
    --overwrite, a stopped run's shards are not a whole output), then, rerun so, by SIGKILL; then rerun to the
    end with every row accounted for."""
    outcome = {}
    for job, extra, again, ready in (("tokenize", [], ["--overwrite"], lambda _: ray_busy()),
                                     ("evaluate", ["--captions", "128"], [], lambda err: "generated " in err)):
        args = [*base_args(job, world, output=str(world.tmp / f"out-{job}-stopped")), *extra]
        rerun = f"rerun the same command{' with --overwrite' if again else ''}"
        stopped = signal_when(args, env, logs, ready, SIGNALS["sigterm"])
        assert_failed_cleanly(stopped, "SIGTERM", rerun, code=143)
        killed = signal_when([*args, *again], env, logs, ready, SIGNALS["sigkill"])
        assert killed.code == -9
        assert_no_credentials(killed)
        accounted = assert_accounted(job, good_run([*args, *again], env))
        how = "rerun with --overwrite" if again else "rerun"
        outcome[job] = {"sigterm": f"failed cleanly (exit 143); {how}: {accounted}",
                        "sigkill": f"killed part-way; {how}: {accounted}"}
    return outcome


def error_rate_runs(world, env) -> dict:
    """Each job that rejects rows, run with --max-error-rate 0 on its input with one cut row: exit 3, "failure":
    "data", and its summary still printed, accounting for every row (train-vq checks before it trains)."""
    outcome = {}
    for job in ("generate", "tokenize", "evaluate", "train-vq"):
        args = [*base_args(job, world, output=str(world.tmp / f"out-{job}-error-rate")), "--max-error-rate", "0"]
        result = run_painter(args, env)
        error = assert_failed_cleanly(result, "rows rejected", "above --max-error-rate 0", code=3)
        s = result.last
        if job == "train-vq":
            assert (s["rows_in"], s["rows_rejected"]) == (CORPUS_ROWS, 1), s
            said = "rows in and rejected counted"
        else:
            said = assert_accounted(job, s)
        outcome[job] = f"failed cleanly (exit 3, data): {gist(error)}; the summary printed: {said}"
    return outcome


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
    return signal_when(args, env, logs, lambda _: _logged_step(output, args[0]) >= start + 2, signum)


def training_night(job: str, world, env, logs: Path, disk: tuple) -> dict:
    """One run of `job` (train, train-vq) of NIGHT_STEPS steps on a tmpfs: first on a full disk (it fails
    naming the file), then through SIGTERM (a clean stop whose line says to rerun with --resume), then,
    resumed, SIGKILL, then resumed to the end: every step done, from the checkpoints. train-vq reads the
    corpus cut mid-row: its last run rejects that row."""
    folder, no_disk = disk
    output = str((world.tmp if no_disk else folder) / f"out-{job}-night")
    args = [*base_args(job, world, output=output), "--max-steps", str(NIGHT_STEPS), "--checkpoint-every", "1"]
    outcome, resume = {"disk-full": f"skipped: {no_disk}"}, ["--resume"]
    if not no_disk:
        with disk_filled(folder, 24 * 1024):  # room for the metrics, not for a checkpoint
            full = run_painter([*args, "--max-failures", "0"], env)  # no restarts into the same full disk
        error = assert_failed_cleanly(full, output, "No space left on device", code=4)
        outcome["disk-full"] = f"failed cleanly (exit 4): {gist(error)}; rerun with --resume completed (its night)"
    first = [*args, *resume] if Path(output, "_runs", job).exists() else args  # an existing run needs --resume
    stopped = _stopped_after(first, env, output, SIGNALS["sigterm"], logs)
    assert_failed_cleanly(stopped, "SIGTERM", "rerun the same command with --resume", code=143)
    termed = _logged_step(output, job)
    args += resume
    killed = _stopped_after(args, env, output, SIGNALS["sigkill"], logs)
    killed_at = _logged_step(output, job)
    assert killed.code == -9 and killed_at > termed
    assert_no_credentials(killed)
    summary = good_run(args, env)
    state = torch.load(os.path.join(summary["checkpoint"], "train_state.pt"), weights_only=True)
    assert summary["steps"] == state["step"] == _logged_step(output, job) == NIGHT_STEPS, summary
    kept = sorted(p.name for p in Path(output, "_runs", job).glob("checkpoint_*") if p.is_dir())
    assert len(kept) == 2, kept  # the last two, none of those the stopped runs were writing
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
            summary = good_run(args + (["--commit-images", "100"] if job == "generate" else []), flaky_env)
            faults = {k: proxy.counts[k] - before.get(k, 0) for k in ("500", "drop")}
            assert faults["500"] + faults["drop"] > 0, proxy.counts
            outcome[job] = (f"recovered: {faults['500']} answers 500 and {faults['drop']} dropped connections "
                            f"retried; {assert_accounted(job, summary)}")
        assert proxy.counts["500"] > 0 and proxy.counts["drop"] > 0, proxy.counts
    return outcome
