"""The options every training job's Ray Train run shares (`painter train`, `painter train-vq`), read by the
one runner (`painter.stages.train_runner`)."""
from __future__ import annotations

from dataclasses import dataclass

from painter.options import option


@dataclass(kw_only=True)
class RunOptions:
    """Options of a Ray Train run that every training job shares: where runs live, resuming, resources,
    length, schedule end, checkpoints, logging and fault tolerance (`painter.stages.train_runner`'s
    `run_location`, `fit`, `scaling_config` and `plan_steps` read them)."""
    run_dir: str | None = option(None, "where runs keep checkpoints and metrics (default: <output>/_runs)")
    resume: bool = option(False, "continue the run --name from its last checkpoint")
    workers: int = option(1, "Ray Train workers (DDP ranks)")
    gpus_per_worker: int | None = option(None, "0 or 1 (default: 1 when the cluster has GPUs, else 0)",
                                         choices=(0, 1))
    cpus_per_worker: float | None = option(None, "CPUs per worker (default: min(1, (cluster CPUs - 1) / workers))")
    threads_per_worker: int | None = option(None, "torch threads in each worker (default: Ray's, one per whole CPU "
                                            "the worker asks for); one worker with every core's thread beats "
                                            "DDP over single-thread workers for small models on one machine")
    max_steps: int | None = option(None, "optimizer steps in all, however many epochs that takes (overrides --epochs)")
    min_lr_ratio: float = option(0.1, "the cosine decay ends at this fraction of --lr")
    checkpoint_every: int = option(500, "optimizer steps between checkpoints (and one at the end)")
    log_every: int = option(10, "optimizer steps between logged metrics")
    max_failures: int = option(3, "worker-group restarts from the last checkpoint before the run fails")
    in_memory_mb: int = option(1024, "keep the training set in worker memory, fully reshuffled every epoch, when "
                                     "it fits in this many MiB (the GPT: a worker's share of the token shards; "
                                     "the VQGAN: the decoded images): each worker takes its share by key, the same "
                                     "rows every run, without Ray Data in the step loop; larger sets, or 0, stream "
                                     "through Ray Data")
    storage_options: str | None = option(None, "JSON object of fsspec/s3fs options for every path of the run (data, "
                                               "models, run directory, output), on the driver and every worker")
    mlflow_uri: str | None = option(None, "record the run in MLflow: a tracking server URI or a local folder "
                                          "(params, metrics per logged step, loss curve, config.json, status)")

