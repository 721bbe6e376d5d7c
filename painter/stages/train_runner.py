"""The one Ray Train runner of the training jobs (`train`: the GPT, `train-vq`: the VQGAN).

Driver side: the options every run shares (`RunOptions`, defined in `painter.options.training`), sizing
(`plan_steps`), resources (`scaling_config`), where the run lives (`run_location`), the `TorchTrainer`
(`fit`: restarts from the last checkpoint, the last two kept, a diverged run refused with its step) and
the export of the final checkpoint's model files (`export_model`).

Worker side: `TrainerRun`, one worker's session. It owns the loop (epochs of `steps_per_epoch` steps to
`total_steps`, resuming mid-epoch), the cadence (log at step 1, every `log_every` and the last;
checkpoint every `checkpoint_every` and the last; rank 0 prints the metrics, appends them to
`<run>/metrics.jsonl` and passes the checkpoint, every rank calls `ray.train.report`), the divergence
stop (a NaN or infinite loss reported without a checkpoint, `DIVERGED_FILE` for the driver) and the
test-only fault switch (`painter.stages.faults.FAIL_AT_STEP`). A job's worker subclass supplies the
hooks: `setup` (model, optimizer, state), `batches`, `step`, `metrics`, `save`, and optionally
`before_training`, `checkpoint_metrics`, `validates`/`validate` and `end_epoch`.
"""
from __future__ import annotations

import json
import math
import os
import posixpath
import tempfile
import time

from painter import logs
from painter.checkpoint.config import ModelConfig
from painter.checkpoint.model_dir import load_model
from painter.errors import InputError, PainterError, TrainingDiverged
from painter.io.storage import Storage, absolute, as_storage, is_remote, writing
from painter.options.training import RunOptions
from painter.stages import faults
from painter.stages.ray_compat import enable_train_v2
from painter.stages.metrics import Recorder
from painter.stages.resources import cluster_has_gpus

DIVERGED = "diverged_at_step"  # in the last report of a run whose loss stopped being finite
DIVERGED_FILE = "_diverged.json"  # in the run folder: {"step", "loss"} of that report
STATE_FILE = "train_state.pt"
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


def fit(loop, loop_config: dict, datasets: dict, scaling, o, runs: str, storage: Storage | None = None, *,
        stage: str):
    """Run `loop` on a TorchTrainer as run `o.name` under `runs`, reached through `storage` (`o.max_failures`
    restarts from the last checkpoint, the last two kept, the test fault switch passed on, the checkpoints
    interrupted runs left removed before and after; `stage` logs it); the Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    # Ray Train's patched print logs every line twice on the driver; the workers print plainly.
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    env |= faults.worker_env()
    if o.threads_per_worker is not None:
        env["OMP_NUM_THREADS"] = str(o.threads_per_worker)  # torch sizes its intra-op pool from it
    storage_path, filesystem = as_storage(storage).train_location(runs)
    trainer = TorchTrainer(
        loop, train_loop_config=loop_config, datasets=datasets, scaling_config=scaling,
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


def copy_source_files(source: str, directory: str, names: tuple[str, ...], storage: Storage) -> None:
    """Copy those of `names` that `source` has into the local checkpoint `directory`, in order (the part
    not being trained travels as bytes, never loaded; config.json goes first since it carries its fingerprint)."""
    for name in names:
        if storage.exists(posixpath.join(source, name)):
            storage.copy(posixpath.join(source, name), os.path.join(directory, name))


def shuffled_batches(count: int, batch_size: int, seed: int):
    """Index tensors of the full batches of `count` in-memory rows, in a seeded full shuffle (an epoch's order
    of a split kept in memory; the rows left over are not used)."""
    import torch

    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    for start in range(0, count - batch_size + 1, batch_size):
        yield order[start:start + batch_size]


class TrainerRun:
    """One Ray Train worker's session (see the module docstring); `TrainerRun(cfg).run()`. `cfg` holds
    source, model, train, run_path, steps_per_epoch, total_steps, seed, micro_batch, log_every,
    checkpoint_every, storage and progress (the driver's progress board, or None)."""
    label = "train"  # how the worker's own lines start

    def __init__(self, cfg: dict):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.cfg, self.rank, self.world = cfg, ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.config = ModelConfig.from_dict(cfg["model"])
        self.tc = cfg["train"]
        self.storage: Storage = as_storage(cfg.get("storage"))
        source = load_model(cfg["source"], parts=(), storage=self.storage)
        self.tokenizer = source.tokenizer
        self.state: dict = self.setup(ray.train.get_checkpoint())
        self.window_rows, self.window_start = 0, time.perf_counter()
        self.window_first_step = self.state["step"]
        self.recorder = Recorder(self.label, time.strftime("%Y-%m-%d", time.gmtime()), source.fingerprint)

    # --- the hooks -------------------------------------------------------------------------------------
    def setup(self, checkpoint) -> dict:
        """Build or restore (from `checkpoint`, or None) the model and optimizer; the run's state dict
        (step, first_loss, metrics, ... as the job keeps it)."""
        raise NotImplementedError

    def train_shard(self):
        """What `batches` reads: Ray Data's shard of the "train" dataset, or None when the job keeps its
        training set in memory (`cfg["in_memory"]`: each worker reads its own share)."""
        import ray.train

        return None if self.cfg.get("in_memory") else ray.train.get_dataset_shard("train")

    def batches(self, shard, epoch: int, steps_done: int):
        """This worker's batches of `epoch`, those of the first `steps_done` steps left out."""
        raise NotImplementedError

    def step(self, batches, epoch: int):
        """One optimizer step on the next batches; a result with `.rows` (and what `metrics` reads)."""
        raise NotImplementedError

    def metrics(self, result, epoch: int) -> dict:
        """The step's metrics, averaged over ranks (every rank calls this at the same steps)."""
        raise NotImplementedError

    def save(self, directory: str) -> None:
        """A full model directory plus `STATE_FILE` in the local `directory`."""
        raise NotImplementedError

    def before_training(self) -> None:
        pass

    def checkpoint_metrics(self) -> dict:
        """Extra metrics at a checkpoint step (every rank, before rank 0 saves), checked for divergence."""
        return {}

    def validates(self, epoch_end: bool, final: bool) -> bool:
        return False

    def validate(self) -> dict:
        return {}

    def end_epoch(self, epoch: int) -> None:
        pass

    # --- the loop --------------------------------------------------------------------------------------
    def run(self) -> None:
        import ray.train

        spe, total = self.cfg["steps_per_epoch"], self.cfg["total_steps"]
        if self.state["step"] >= total:  # a resumed run that is already there: report where it stands
            ray.train.report(self.state["metrics"])
            return
        self.before_training()
        shard = self.train_shard()
        while self.state["step"] < total and not self.stopped:
            epoch, done = divmod(self.state["step"], spe)
            batches = self.batches(shard, epoch, done)
            for done in range(done + 1, spe + 1):
                result = self.step(batches, epoch)
                self.state["step"] += 1
                self._tick()
                self.window_rows += result.rows
                self._after_step(result, epoch, epoch_end=done == spe)
                if self.state["step"] >= total or self.stopped:
                    break
            self.end_epoch(epoch)

    def _after_step(self, result, epoch: int, epoch_end: bool) -> None:
        """Log, validate and checkpoint when due (every rank takes the same branches), then the fault switch."""
        c, step = self.cfg, self.state["step"]
        final = step == c["total_steps"]
        log = step == 1 or step % c["log_every"] == 0 or final
        checkpoint = step % c["checkpoint_every"] == 0 or final
        validate = self.validates(epoch_end, final)
        if log or checkpoint or validate:
            metrics = self.metrics(result, epoch)
            if checkpoint:  # e.g. the loss of the weights about to be saved
                metrics |= self.checkpoint_metrics()
            if self._diverged(metrics):
                return
            if validate:
                metrics |= self.validate()
            self._report(metrics, checkpoint)
        faults.after_step(step, self.rank, self.world, self.cfg["run_path"], self.storage)

    def take(self, batches, epoch: int):
        """The next item of `batches`; running out before the planned step count is an error."""
        try:
            return next(batches)
        except StopIteration:
            raise RuntimeError(f"rank {self.rank} ran out of rows in epoch {epoch} before step "
                               f"{self.state['step'] + 1}; the shards were split unevenly") from None

    @property
    def stopped(self) -> bool:
        return self.state.get(DIVERGED) is not None

    def _diverged(self, metrics: dict) -> bool:
        """When the (rank-averaged, so every rank agrees) loss is NaN or infinite: report the step without a
        checkpoint, so the last good one stays the run's latest, write `DIVERGED_FILE`, and stop (True). At a
        checkpoint step `loss_after_step` counts too. Checked at every logging and checkpoint step (a check
        per step would cost a device sync per step on a GPU)."""
        import ray.train

        if math.isfinite(metrics["loss"]) and math.isfinite(metrics.get("loss_after_step", 0.0)):
            return False
        self.state[DIVERGED] = metrics["step"]
        if self.rank == 0:  # for the driver (Ray Train's result keeps the metrics of the last checkpoint)
            print(f"{self.label}: loss {metrics['loss']} at step {metrics['step']}: stopping", flush=True)
            loss = metrics["loss"] if not math.isfinite(metrics["loss"]) else metrics["loss_after_step"]
            self.storage.write_text(posixpath.join(self.cfg["run_path"], DIVERGED_FILE),
                                    json.dumps({"step": metrics["step"], "loss": loss}))
        ray.train.report(metrics | {DIVERGED: metrics["step"]}, checkpoint=None)
        return True

    def _tick(self, note: str = "") -> None:
        """Rank 0 tells the driver's progress display the step (fire and forget)."""
        if self.rank == 0 and self.cfg.get("progress") is not None:
            self.cfg["progress"].set.remote(self.state["step"], note)

    def _report(self, metrics: dict, checkpoint: bool) -> None:
        import ray.train

        self.state["metrics"] = metrics
        self._tick(f"loss {metrics['loss']:.3f}")
        if self.rank == 0:
            steps = max(metrics["step"] - self.window_first_step, 1)  # the logged step as Prometheus metrics
            self.recorder.train_step(metrics, (time.perf_counter() - self.window_start) / steps)
            line = json.dumps(metrics)
            print(f"{self.label}: {line}", flush=True)
            path = posixpath.join(self.cfg["run_path"], "metrics.jsonl")
            with writing(path, "the run's metrics"), self.storage.open(path, "a") as f:
                f.write(line + "\n")
        if checkpoint and self.rank == 0:
            with tempfile.TemporaryDirectory(prefix="painter-ckpt-") as tmp:
                self.save(tmp)
                with writing(self.cfg["run_path"], f"the checkpoint of step {metrics['step']}"):
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
        self.window_rows, self.window_start = 0, time.perf_counter()
        self.window_first_step = self.state["step"]
