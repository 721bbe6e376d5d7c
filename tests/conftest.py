"""Shared fixtures: one local Ray session for the whole run (Ray costs seconds to start), tiny models."""
from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

# What the s3_server fixture puts in this process's environment besides the endpoint: dummy credentials
# (moto takes any). Ray's processes inherit the environment as it is when Ray starts, so ray_session
# starts Ray with these and without AWS_ENDPOINT_URL, whichever fixture came first: a job's workers
# reach moto only through --storage-options, as a cluster's reach an S3-compatible endpoint.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray with 2 CPUs, shared by every test that asks for it; stopped at the end. Its
    workers have S3_CREDENTIALS and no AWS endpoint variable in their environment (see above)."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        saved = {k: os.environ.get(k) for k in (*S3_CREDENTIALS, *ENDPOINT_VARIABLES)}
        for name in ENDPOINT_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(S3_CREDENTIALS)
        try:
            ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        finally:
            _restore(saved)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _restore(saved: dict) -> None:
    """Put environment variables back as `saved` ({name: value or None for unset})."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A randomly initialised `tiny` model directory (32x32 images, 8x8 tokens), made once."""
    from painter.checkpoint.model_dir import new_model

    return new_model("tiny", str(tmp_path_factory.mktemp("models") / "tiny"), seed=0)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint: moto's server on 127.0.0.1 (random port), stopped after the run.

    Yields `storage_options` for fsspec/s3fs; the same endpoint and dummy credentials are also put
    in the usual AWS environment variables so code that reads only the environment works too.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    # A process of its own, not moto's in-process thread: delta-rs holds the GIL while it waits for
    # S3, so a server thread in this process would never answer the Delta commits of the driver.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:  # wait until it answers
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except urllib.error.HTTPError:  # an HTTP answer of any kind: it is up
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    env = S3_CREDENTIALS | {"AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    finally:
        _restore(saved)
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server; yields (bucket name, storage_options)."""
    import uuid

    import s3fs

    name = f"t-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint_url"]},
                           key="testing", secret="testing", skip_instance_cache=True)
    fs.mkdir(name)
    yield name, s3_server


def pytest_terminal_summary(terminalreporter):
    """The fault matrix's table of job x fault -> outcome (tests/test_faults.py), when it ran."""
    import sys

    matrix = sys.modules.get("fault_matrix")
    if matrix is not None:
        matrix.pytest_terminal_summary(terminalreporter)
