"""painter's `s3://` filesystem: s3fs's, with s3fs's own retry loop reduced to one try, so botocore's
attempts (`painter.io.retries`) are the one retry layer.

`painter.io.retries.configure_storage_retries` registers this class for `s3` and `s3a` by name, so fsspec
imports it, and s3fs with its aiobotocore stack (a third of a second, two thirds of the CLI's start), only
in a process that touches a bucket.
"""
from __future__ import annotations

from s3fs import S3FileSystem

from painter.io.retries import S3FS_TRIES


class RetryingS3FileSystem(S3FileSystem):
    retries = S3FS_TRIES  # s3fs's loop around each call (5 by default): botocore's attempts retry instead
