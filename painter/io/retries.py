"""Bounded retries of transient storage errors, configured once for every filesystem painter builds.

`fsspec_module()` is how painter reaches fsspec: it sets, once per process and before the first filesystem
is built (so on the driver and in every Ray worker that touches storage), fsspec's defaults for `s3://`: botocore's own "standard" retry mode (`STORAGE_ATTEMPTS` attempts in
all, exponential back-off with jitter, on throttling, 5xx answers and dropped or refused connections)
as the only retry layer: s3fs would otherwise repeat every failed call five times on top of botocore's
attempts, so a dead endpoint would take a minute to report (`painter.io.s3`, registered with fsspec by
name, so that s3fs is imported only where a bucket is used). `delta_retry_options()` bounds the Delta
Lake log's reads and commits (delta-rs's object store; its back-off starts at 100 ms, so it can afford
more retries, and a dead endpoint is found by the jobs' preflight before it is reached).
Permanent errors (no such bucket or key, access denied) are not retried by either library.
The `Storage` handle can take this over as it is: it is the only place retries are set.
"""
from __future__ import annotations

STORAGE_ATTEMPTS = 3  # in all: the first try and 2 retries, after up to 1 and 2 s (botocore standard mode's jitter)
S3FS_TRIES = 1  # s3fs's own loop around each call: botocore's attempts are the one retry layer
DELTA_RETRIES, DELTA_RETRY_TIMEOUT = 5, "30s"  # delta-rs's object store: back-off from 100 ms, doubling


def fsspec_module():
    """fsspec, with painter's retry defaults set (once per process). Every painter module that uses fsspec
    takes it from here, so no process reaches storage without them and none imports fsspec before then."""
    import fsspec

    global _configured
    if not _configured:
        configure_storage_retries()
        _configured = True
    return fsspec


_configured = False


def configure_storage_retries() -> None:
    """fsspec's defaults for every S3 filesystem built in this process (explicit options still win)."""
    import fsspec
    import fsspec.config

    s3 = fsspec.config.conf.setdefault("s3", {})
    config_kwargs = dict(s3.get("config_kwargs") or {})
    config_kwargs.setdefault("retries", {"total_max_attempts": STORAGE_ATTEMPTS, "mode": "standard"})
    s3["config_kwargs"] = config_kwargs
    for protocol in ("s3", "s3a"):  # imported when first used (painter.io.s3)
        fsspec.register_implementation(protocol, "painter.io.s3.RetryingS3FileSystem", clobber=True,
                                       errtxt="install s3fs to read or write s3:// paths")


def delta_retry_options() -> dict[str, str]:
    """delta-rs storage options bounding its object-store retries the same way."""
    return {"max_retries": str(DELTA_RETRIES), "retry_timeout": DELTA_RETRY_TIMEOUT}
