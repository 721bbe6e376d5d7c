"""Every test-only failure switch, in one place. A test turns one on through the driver's environment; the
job passes it on to its workers; each acts at one point of the job:

- `FAIL_AFTER_BATCHES=K` (generate): each actor raises after it has written K batches (counted per
  actor), as a crash part-way through a night would;
- `FAIL_AT_STEP=N` (train, train-vq): the last rank raises once right after optimizer step N; a marker file
  in the run directory keeps the restarted worker group from raising again.
Nothing else in painter reads these variables.
"""
from __future__ import annotations

import os
import posixpath

FAIL_AFTER_BATCHES = "PAINTER_TEST_FAIL_AFTER_BATCHES"
FAIL_AT_STEP = "PAINTER_TEST_FAIL_AT_STEP"


def worker_env() -> dict[str, str]:
    """The switches set in this process's environment, for a job to pass on to its workers."""
    return {name: os.environ[name] for name in (FAIL_AFTER_BATCHES, FAIL_AT_STEP) if name in os.environ}


def fail_after_batches() -> int | None:
    """generate's K (read by the driver when the job starts and handed to its actors), or None."""
    value = os.environ.get(FAIL_AFTER_BATCHES)
    return int(value) if value else None


def after_batch(fail_after: int | None, batches: int) -> None:
    """In a generate actor: raise once `batches` reaches `fail_after`."""
    if fail_after is not None and batches >= fail_after:
        raise RuntimeError(f"{FAIL_AFTER_BATCHES}={fail_after}: failing on purpose after {batches} batches")


def after_step(step: int, rank: int, world: int, run_path: str, storage) -> None:
    """In a training worker: on the last rank, raise once right after step N (`storage`: the run's Storage)."""
    fail_at = os.environ.get(FAIL_AT_STEP)
    if not fail_at or int(fail_at) != step or rank != world - 1:
        return
    marker = posixpath.join(run_path, f"_fault_injected_at_step_{step}")
    if storage.exists(marker):
        return
    storage.write_text(marker, "injected\n")
    raise RuntimeError(f"{FAIL_AT_STEP}={fail_at}: injected worker failure after step {step}")
