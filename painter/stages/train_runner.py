"""The one Ray Train runner of the training jobs (`train`: the GPT, `train-vq`: the VQGAN), driver side.

The options every run shares (`RunOptions`, defined in `painter.options.training`), sizing (`plan_steps`),
resources (`scaling_config`), where the run lives (`run_location`), the `TorchTrainer` (`fit`: restarts from
the last checkpoint, the last two kept, a diverged run refused with its step) and the export of the final
checkpoint's model files (`export_model`). What each worker runs, the loop, its cadence and its
checkpoints, is `painter.stages.train_session`'s `TrainerRun`, configured by the job's `WorkerConfig`
(a `painter.stages.train_session.SessionConfig`) that `fit` hands to every worker.
"""
from __future__ import annotations

import json
import os
import posixpath

from painter import logs
from painter.errors import InputError, PainterError, TrainingDiverged
from painter.io.storage import Storage, absolute, as_storage, is_remote
from painter.options.training import RunOptions
from painter.stages import faults
from painter.stages.ray_compat import enable_train_v2
from painter.stages.resources import cluster_has_gpus

DIVERGED = "diverged_at_step"  # in the last report of a run whose loss stopped being finite
DIVERGED_FILE = "_diverged.json"  # in the run folder: {"step", "loss"} of that report
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's kept checkpoints
# Ray Train's controller takes each worker's report from a one-slot queue when it polls the workers, every
# 2 s by default: a run that reports more often waits for it at every report (10 of the 35 s of a 24-step
# run here). The runner polls this often unless the user set the variable.
REPORT_POLL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
MODEL_FILES = ("config.json", "vocab.txt", "tokenizer_config.json", "gpt.safetensors", "vqgan.safetensors")
enable_train_v2()  # before any `ray.train` import: Ray 2.50 needs it asked for


def plan_steps(rows: int, o) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps): each worker gets rows // workers rows, full batches only.

    Every rank takes the same number of steps (DDP all-reduces in each); the lr schedule ends at the total.
    """
    per_step = o.micro_batch * o.grad_accum
    steps_per_epoch = rows // o.workers // per_step
    if steps_per_epoch == 0:
        raise InputError(f"{rows} training rows are too few for {o.workers} workers x micro-batch {o.micro_batch} "
                         f"x grad_accum {o.grad_accum} (one optimizer step needs {per_step * o.workers} rows)")
    return steps_per_epoch, o.max_steps or o.epochs * steps_per_epoch


def scaling_config(o: RunOptions):
    """Workers with fractional CPUs (one CPU stays free for reading shards); GPUs only if the cluster has them."""
    import ray
    from ray.train import ScalingConfig

    resources = ray.cluster_resources()
    gpus = o.gpus_per_worker if o.gpus_per_worker is not None else int(cluster_has_gpus())
    if gpus and not cluster_has_gpus():
        raise PainterError("--gpus-per-worker 1, but the Ray cluster has no GPUs (use --gpus-per-worker 0)")
    if o.threads_per_worker is not None and o.threads_per_worker < 1:
        raise InputError(f"--threads-per-worker must be >= 1, got {o.threads_per_worker}")
    cpus = o.cpus_per_worker
    if cpus is None:
        cpus = round(min(1.0, max(resources.get("CPU", 1) - 1, 0.5) / o.workers), 2)
    per_worker = {"CPU": cpus} | ({"GPU": 1} if gpus else {})
    return ScalingConfig(num_workers=o.workers, use_gpu=bool(gpus), resources_per_worker=per_worker)


def run_path_of(o) -> str:
    """Where run `o.name` lives: under `o.run_dir`, default `<o.output>/_runs` (a local path made absolute)."""
    return posixpath.join(absolute(o.run_dir or posixpath.join(o.output, "_runs")), o.name)


def run_location(o, storage: Storage | None = None) -> tuple[str, str]:
    """(runs path, run path) of run `o.name` under `o.run_dir` (default `<o.output>/_runs`).

    A local path is made absolute. An existing run is refused unless `o.resume`, and `o.resume` needs one
    (a reused name would otherwise silently resume, or do nothing).
    """
    run_path = run_path_of(o)
    runs = posixpath.dirname(run_path)
    exists = as_storage(storage).exists(run_path)
    if exists and not o.resume:
        raise InputError(f"{run_path}: run {o.name!r} already exists; pass --resume to continue it "
                         "or --name to start another")
    if o.resume and not exists:
        raise InputError(f"{run_path}: no run {o.name!r} to resume")
    return runs, run_path


def fit(loop, config, datasets: dict, scaling, o, runs: str, storage: Storage | None = None, *, stage: str):
    """Run `loop` on a TorchTrainer as run `o.name` under `runs`, reached through `storage` (`o.max_failures`
    restarts from the last checkpoint, the last two kept, the test fault switch passed on, the checkpoints
    interrupted runs left removed before and after; `stage` logs it); the Result. Every worker gets `config`
    (the job's `WorkerConfig`) as `{"config": config}`: Ray Train takes a dict."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    # Ray Train's patched print logs every line twice on the driver; the workers print plainly.
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    env |= faults.worker_env()
    if o.threads_per_worker is not None:
        env["OMP_NUM_THREADS"] = str(o.threads_per_worker)  # torch sizes its intra-op pool from it
    storage_path, filesystem = as_storage(storage).train_location(runs)
    trainer = TorchTrainer(
        loop, train_loop_config={"config": config}, datasets=datasets, scaling_config=scaling,
        run_config=RunConfig(name=o.name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=o.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env={"env_vars": env}))
    handle, run = as_storage(storage), posixpath.join(runs, o.name)
    marker = posixpath.join(run, DIVERGED_FILE)
    handle.remove(marker)  # a resumed run starts without its old verdict
    drop_stray_checkpoints(run, handle, stage)
    result = _fit_polled(trainer)
    drop_stray_checkpoints(run, handle, stage)
    if handle.exists(marker):
        diverged = json.loads(handle.read_text(marker))
        kept = result.checkpoint.path if result.checkpoint else "none: no checkpoint was due before it"
        raise TrainingDiverged(f"{run}: the training loss is {diverged['loss']} after step {diverged['step']}; "
                               f"stopped there without saving it. Last good checkpoint: {kept}; "
                               "continue from it with --resume (with a lower --lr)")
    if result.checkpoint is None:
        raise PainterError(f"{run}: the run ended without a checkpoint")
    return result


def drop_stray_checkpoints(run_path: str, storage: Storage, stage: str) -> list[str]:
    """Delete the checkpoint folders of the run at `run_path` that Ray Train's snapshot of it does not list
    (all of them when there is no snapshot): the ones a stopped or killed run was still writing, which no
    later run would ever delete, so each stop would leave a checkpoint's worth of disk behind. The names."""
    snapshot = posixpath.join(run_path, SNAPSHOT_FILE)
    state = json.loads(storage.read_text(snapshot)) if storage.exists(snapshot) else {}
    listed = [state.get("latest_checkpoint_result") or {}, *state.get("checkpoint_results", []),
              *state.get("pending_training_results", [])]
    kept = {entry.get("checkpoint_dir_name") for entry in listed} | {SNAPSHOT_FILE}  # named checkpoint_ too
    stray = [n for n in storage.names(run_path) if n.startswith("checkpoint_") and n not in kept]
    for name in stray:
        storage.remove(posixpath.join(run_path, name), recursive=True)
    if stray:
        logs.get(stage).info(f"{run_path}: removed the checkpoints interrupted runs left: {', '.join(stray)}")
    return stray


def _fit_polled(trainer):
    """`trainer.fit()` with the controller polling every REPORT_POLL seconds (Ray Train passes the variable
    from the driver's environment to its controller; set only for the call, unless the user set it)."""
    name, value = REPORT_POLL
    if name in os.environ:
        return trainer.fit()
    os.environ[name] = value
    try:
        return trainer.fit()
    finally:
        os.environ.pop(name, None)


def checkpoint_url(checkpoint, run_path: str) -> str:
    """Where a checkpoint of the run at `run_path` is: Ray's local path, or the URL that Ray names without
    its protocol when the run lives in a bucket."""
    if not is_remote(run_path):
        return checkpoint.path
    return posixpath.join(run_path, posixpath.basename(checkpoint.path.rstrip("/")))


def export_model(checkpoint, output: str, manifest: dict, storage: Storage | None = None) -> None:
    """Copy the final checkpoint's model files to `output` (config.json, which names the weights, last),
    with `train.json` beside them."""
    storage = as_storage(storage)
    storage.makedirs(output)
    with checkpoint.as_directory() as local:
        for name in sorted(MODEL_FILES, key=lambda n: n == "config.json"):
            if os.path.exists(os.path.join(local, name)):
                storage.copy(os.path.join(local, name), posixpath.join(output, name))
    storage.write_text(posixpath.join(output, "train.json"),
                       json.dumps(manifest, indent=2, ensure_ascii=False, default=str))
