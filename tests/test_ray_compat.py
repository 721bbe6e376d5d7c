"""`painter.stages.ray_compat`, the one adapter over Ray APIs that differ across 2.50 .. 2.60.x, on the
installed Ray (the main suite runs it on the newest, `make test-compat` on the oldest)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa

from painter.stages import ray_compat

ROOT = Path(__file__).resolve().parents[1]


def test_a_capped_task_pool_reads_with_at_most_that_many_tasks(ray_session):
    """Whichever way the release spells it (TaskPoolStrategy or concurrency=), the pool runs the function."""
    kwargs = ray_compat.map_batches_pool(1)
    assert set(kwargs) <= {"compute", "concurrency"} and kwargs
    assert ray_compat.map_batches_pool(None) == {}
    ds = ray_session.data.range(10, override_num_blocks=5).map_batches(
        lambda b: {"id": b["id"] * 2}, num_cpus=0.25, **kwargs)
    assert sorted(r["id"] for r in ds.take_all()) == list(range(0, 20, 2))


def test_block_refs_name_every_row_once_with_its_slice(ray_session):
    ds = ray_session.data.range(100, override_num_blocks=4).limit(70)
    rows = []
    for ref, part in ray_compat.block_refs(ds):
        block = ray_session.get(ref)
        assert isinstance(block, pa.Table) and (part is None or 0 <= part[0] <= part[1] <= block.num_rows)
        rows += (block if part is None else block.slice(part[0], part[1] - part[0]))["id"].to_pylist()
    # which 70 rows a limit keeps is Ray's choice (blocks finish in any order; 2.50 cuts a block in a task,
    # 2.52+ hands the whole block and the slice to keep): 70 rows of the 100, each once
    assert len(rows) == len(set(rows)) == 70 and set(rows) <= set(range(100))


def _import_train_runner(env: dict) -> subprocess.CompletedProcess:
    code = ("import painter.stages.train_runner, ray.train, os\n"
            "print(os.environ['RAY_TRAIN_V2_ENABLED'], 'worker_runtime_env' in ray.train.RunConfig.__dataclass_fields__)")
    environment = {k: v for k, v in os.environ.items() if k != ray_compat.TRAIN_V2_ENV} | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=environment | env, capture_output=True, text=True,
                          timeout=120)


def test_the_trainer_gets_train_v2_without_being_asked_and_refuses_it_turned_off():
    done = _import_train_runner({})
    assert done.returncode == 0 and done.stdout.split() == ["1", "True"], done.stderr[-2000:]
    done = _import_train_runner({ray_compat.TRAIN_V2_ENV: "0"})
    assert done.returncode != 0 and "RAY_TRAIN_V2_ENABLED=0: painter needs Ray Train's V2 controller" in done.stderr
