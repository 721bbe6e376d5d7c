"""The worker side of the one Ray Train runner (`painter.stages.train_runner` is the driver side): what every
worker of `train` and `train-vq` runs.

`SessionConfig` is what every worker needs, built once on the driver: each job's `WorkerConfig` (in
`painter.stages.train_worker`, `painter.stages.train_vq_worker`) adds its own fields, and Ray Train hands it
to the worker function as `{"config": config}`.

`TrainerRun` is one worker's session. It owns the loop (epochs of `steps_per_epoch` steps to `total_steps`,
resuming mid-epoch), the cadence (log at step 1, every `log_every` and the last; checkpoint every
`checkpoint_every` and the last; rank 0 prints the metrics, appends them to `<run>/metrics.jsonl` and passes
the checkpoint, every rank calls `ray.train.report`), the divergence stop (a NaN or infinite loss reported
without a checkpoint, `DIVERGED_FILE` for the driver) and the test-only fault switch
(`painter.stages.faults.FAIL_AT_STEP`). A job's worker subclass supplies the hooks: `setup` (model,
optimizer, state), `batches`, `step`, `metrics`, `save`, and optionally `before_training`,
`checkpoint_metrics`, `validates`/`validate` and `end_epoch`.
"""
from __future__ import annotations

import json
import math
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from painter.checkpoint.config import ModelConfig
from painter.checkpoint.model_dir import load_model
from painter.io.storage import Storage, writing
from painter.stages import faults
from painter.stages.metrics import Recorder
from painter.stages.train_runner import DIVERGED, DIVERGED_FILE  # importing it asks for Ray Train V2 first

STATE_FILE = "train_state.pt"  # in each checkpoint, beside the model files: optimizer, schedule, step, epoch


@dataclass(frozen=True, kw_only=True)
class SessionConfig:
    """What every worker of a training run needs (`TrainerRun` reads it), built once on the driver; each job's
    `WorkerConfig` extends it. It travels to every worker, the Storage handle and the progress board too."""
    source: str  # the model directory the run starts from: vocab, tokenizer, and the part not trained
    model: ModelConfig  # the shape of the model trained
    train: Any  # the optimisation settings: painter.training.gpt.TrainConfig or painter.training.vqgan.VQTrainConfig
    run_path: str  # where the run keeps metrics.jsonl (its checkpoints: Ray Train's storage)
    steps_per_epoch: int
    total_steps: int
    seed: int
    micro_batch: int  # rows (images) per model call: each worker's batch of a step, or micro-batch of one
    shuffle_buffer: int  # rows in each worker's local shuffle buffer when streaming (0: no shuffle)
    log_every: int
    checkpoint_every: int
    in_memory: bool  # each worker keeps its share of the training set in memory (else Ray Data streams it)
    storage: Storage
    progress: Any = None  # the driver's progress board (an actor handle), or None


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
    """One Ray Train worker's session (see the module docstring); `TrainerRun(cfg).run()`, `cfg` the job's
    `WorkerConfig` (a `SessionConfig`)."""
    label = "train"  # how the worker's own lines start

    def __init__(self, cfg: SessionConfig):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.cfg, self.rank, self.world = cfg, ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.config: ModelConfig = cfg.model
        self.tc = cfg.train
        self.storage: Storage = cfg.storage
        source = load_model(cfg.source, parts=(), storage=self.storage)
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
        training set in memory (`cfg.in_memory`: each worker reads its own share)."""
        import ray.train

        return None if self.cfg.in_memory else ray.train.get_dataset_shard("train")

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

        spe, total = self.cfg.steps_per_epoch, self.cfg.total_steps
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
        final = step == c.total_steps
        log = step == 1 or step % c.log_every == 0 or final
        checkpoint = step % c.checkpoint_every == 0 or final
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
        faults.after_step(step, self.rank, self.world, self.cfg.run_path, self.storage)

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
            self.storage.write_text(posixpath.join(self.cfg.run_path, DIVERGED_FILE),
                                    json.dumps({"step": metrics["step"], "loss": loss}))
        ray.train.report(metrics | {DIVERGED: metrics["step"]}, checkpoint=None)
        return True

    def _tick(self, note: str = "") -> None:
        """Rank 0 tells the driver's progress display the step (fire and forget)."""
        if self.rank == 0 and self.cfg.progress is not None:
            self.cfg.progress.set.remote(self.state["step"], note)

    def _report(self, metrics: dict, checkpoint: bool) -> None:
        import ray.train

        self.state["metrics"] = metrics
        self._tick(f"loss {metrics['loss']:.3f}")
        if self.rank == 0:
            steps = max(metrics["step"] - self.window_first_step, 1)  # the logged step as Prometheus metrics
            self.recorder.train_step(metrics, (time.perf_counter() - self.window_start) / steps)
            line = json.dumps(metrics)
            print(f"{self.label}: {line}", flush=True)
            path = posixpath.join(self.cfg.run_path, "metrics.jsonl")
            with writing(path, "the run's metrics"), self.storage.open(path, "a") as f:
                f.write(line + "\n")
        if checkpoint and self.rank == 0:
            with tempfile.TemporaryDirectory(prefix="painter-ckpt-") as tmp:
                self.save(tmp)
                with writing(self.cfg.run_path, f"the checkpoint of step {metrics['step']}"):
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
        self.window_rows, self.window_start = 0, time.perf_counter()
        self.window_first_step = self.state["step"]
