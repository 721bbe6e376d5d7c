"""The one place painter touches Ray APIs that differ across the supported releases (2.50 .. 2.60.x) or are
not public (DeveloperAPI, alpha); every other module calls these instead. Each has a public fallback or
a one-line refusal, and none reaches into Ray's private package.

- `map_batches_pool(size)`: a capped task pool for `map_batches`: Ray Data's `TaskPoolStrategy` (exported
  from `ray.data` from 2.51; on 2.50 the same pool through the public `concurrency=` argument).
- `block_refs(ds)`: the object references of a Dataset's blocks as they are made, with the slice of
  each the Dataset keeps, from `iter_internal_ref_bundles` (DeveloperAPI): a bundle's entries are
  `(ObjectRef, BlockMetadata)` tuples before 2.56 and `BlockEntry`s (`.ref`) after; `slices` exists
  from 2.52 (none before: whole blocks).
- `enable_train_v2()`: Ray Train's V2 controller (`RunConfig(worker_runtime_env=...)`, the one painter
  uses) is the default from 2.51; 2.50 needs `RAY_TRAIN_V2_ENABLED=1` before `ray.train` is imported,
  which Ray passes on to the controller and the workers.
"""
from __future__ import annotations

import os
import sys
from typing import Iterator

TRAIN_V2_ENV = "RAY_TRAIN_V2_ENABLED"


def map_batches_pool(size: int | None) -> dict:
    """The `map_batches` keyword arguments for a pool of at most `size` tasks at once ({} for Ray's default)."""
    import ray.data

    if not size:
        return {}
    strategy = getattr(ray.data, "TaskPoolStrategy", None)
    if strategy is None:  # Ray 2.50: the same task pool, through the public (later deprecated) argument
        return {"concurrency": size}
    return {"compute": strategy(size=size)}


def block_refs(ds) -> Iterator[tuple[object, tuple[int, int] | None]]:
    """(ObjectRef of a block, its (start, end) row slice or None for all of it) for each block of `ds`, as
    its execution makes them."""
    for bundle in ds.iter_internal_ref_bundles():
        slices = getattr(bundle, "slices", None) or (None,) * len(bundle.blocks)
        for entry, part in zip(bundle.blocks, slices):
            ref = entry.ref if hasattr(entry, "ref") else entry[0]
            yield ref, None if part is None else (part.start_offset, part.end_offset)


def enable_train_v2() -> None:
    """Ray Train's V2 controller on every supported release: set before `ray.train` is first imported (the
    driver's environment reaches the controller and workers). If Ray Train was imported already without it,
    a clear error instead of a RunConfig that refuses painter's arguments."""
    if os.environ.get(TRAIN_V2_ENV) == "0":
        raise RuntimeError(f"{TRAIN_V2_ENV}=0: painter needs Ray Train's V2 controller (unset it)")
    os.environ.setdefault(TRAIN_V2_ENV, "1")
    train = sys.modules.get("ray.train")
    if train is not None and "worker_runtime_env" not in getattr(train.RunConfig, "__dataclass_fields__", {}):
        raise RuntimeError(f"ray.train was imported before painter set {TRAIN_V2_ENV}=1; set it in the "
                           "environment (Ray 2.50 does not use Train V2 by default)")
