"""Shared fixtures: one local Ray session for the whole run (Ray costs seconds to start), tiny models."""
from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray with 2 CPUs, shared by every test that asks for it; stopped at the end."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A randomly initialised `tiny` model directory (32x32 images, 8x8 tokens), made once."""
    from painter.checkpoint import new_model

    return new_model("tiny", str(tmp_path_factory.mktemp("models") / "tiny"), seed=0)
