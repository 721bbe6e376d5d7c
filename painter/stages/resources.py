"""What a model actor asks of the cluster: a GPU each where GPUs exist (a GPU request on a cluster without
one hangs), else slices of a CPU so small machines keep a core for the read tasks."""
from __future__ import annotations
import ray


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


GPU_ACTOR_MAX_CPUS = 16  # a 256x256 PNG costs ~6-16 ms of one core; a GPU actor makes ~1,000 images/s


def actor_resources(actors: int | None = None) -> dict:
    """map_batches kwargs for a model actor pool: one GPU each where GPUs exist, else CPU slices.

    A GPU actor also asks for the cores its PNG encoders use (`Generator`'s pool is one thread
    per core up to 16 on CUDA): its share of the cluster's CPUs less one for the read tasks, at
    most `GPU_ACTOR_MAX_CPUS`. On CPU, actors get half a core each and the pool is sized to the
    cluster's CPUs, leaving room for the read and preprocess tasks (two 1-CPU actors on a 2-core
    machine hang the job).
    """
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if gpus > 0:
        size = min(actors or gpus, gpus)
        encode_cpus = max(1, min(GPU_ACTOR_MAX_CPUS, cpus // gpus - 1))
        return {"num_gpus": 1, "num_cpus": encode_cpus, "compute": ray.data.ActorPoolStrategy(size=size)}
    size = actors or max(1, cpus // 2)
    return {"num_cpus": 0.5, "compute": ray.data.ActorPoolStrategy(size=size)}


