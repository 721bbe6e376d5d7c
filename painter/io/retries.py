"""Bounded retries of transient storage errors, configured once for every filesystem painter builds.

`configure_storage_retries()` (run when `painter` is imported, so on the driver and in every Ray worker)
sets fsspec's defaults for `s3://`: botocore's own "standard" retry mode (`STORAGE_ATTEMPTS` attempts in
all, exponential back-off with jitter, on throttling, 5xx answers and dropped or refused connections),
and one extra s3fs-level try for a body read cut off part-way; s3fs would otherwise repeat every failed
call five times on top of botocore's attempts, so a dead endpoint would take minutes to report.
`delta_retry_options()` gives the Delta Lake writer (delta-rs's object store) the same bound.
Permanent errors (no such bucket or key, access denied) are not retried by either library.
The `Storage` handle can take this over as it is: it is the only place retries are set.
"""
from __future__ import annotations

STORAGE_ATTEMPTS = 3  # first try + 2 retries; back-off up to 1 s, then 2 s (botocore standard mode)
S3FS_TRIES = 2  # s3fs's own loop around each call (it retries a truncated body, which botocore cannot)
DELTA_RETRY_TIMEOUT = "30s"


def configure_storage_retries() -> None:
    """fsspec's defaults for every S3 filesystem built in this process (explicit options still win)."""
    import fsspec.config

    s3 = fsspec.config.conf.setdefault("s3", {})
    config_kwargs = dict(s3.get("config_kwargs") or {})
    config_kwargs.setdefault("retries", {"max_attempts": STORAGE_ATTEMPTS, "mode": "standard"})
    s3["config_kwargs"] = config_kwargs
    try:
        import s3fs
    except ImportError:  # no S3 support installed: nothing to configure
        return
    s3fs.S3FileSystem.retries = S3FS_TRIES


def delta_retry_options() -> dict[str, str]:
    """delta-rs storage options bounding its object-store retries the same way."""
    return {"max_retries": str(STORAGE_ATTEMPTS - 1), "retry_timeout": DELTA_RETRY_TIMEOUT}
