"""One storage handle per job: every read and write of a job goes through the `Storage` built from its
`--storage-options`.

A job parses `--storage-options` once (`Storage.from_option`: inline JSON without credentials, `env:NAME`
or `@PATH`, see `painter.options.parse_storage_options`) and hands the handle to everything that
touches a path: corpora, model directories, the tokenizer's vocab, token shards, outputs, Ray Data
readers and writers (`arrow`) and Ray Train's run storage (`train_location`). So an S3-compatible
endpoint named only in `--storage-options` is where the model, the data and the outputs are read and
written, on the driver and on every worker (the handle pickles as its options and travels with the
work). With no options, fsspec's defaults apply (for S3: the process's AWS environment).

`filesystem` is the one place a filesystem is built from options. No Ray in this module.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from contextlib import contextmanager
from typing import Iterable


from painter.errors import StorageError
from painter.io.retries import fsspec_module
from painter.io.storage_options import parse_storage_options

COPY_CHUNK = 16 << 20


def filesystem(path: str, options: dict | None = None):
    """(fsspec filesystem, path without protocol) for a local path or URL such as s3://bucket/key."""
    return fsspec_module().core.url_to_fs(path, **(options or {}))  # fsspec with painter's retries, on first use


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem  # imported by now: `fs` is an fsspec filesystem

    return isinstance(fs, LocalFileSystem)


@contextmanager
def writing(path: str, what: str = "it"):
    """Around a write of `path`: an OSError (a full disk, a read-only mount), whose errno text alone names no
    file, becomes a StorageError "PATH: cannot write WHAT (reason)"."""
    try:
        yield
    except OSError as e:
        raise StorageError(f"{path}: cannot write {what} ({e.strerror or e})") from None


def is_remote(path: str) -> bool:
    """True for a URL with a protocol other than file:// (s3://, gs://, memory://...)."""
    return "://" in path and not path.startswith("file://")


def absolute(path: str | None) -> str | None:
    """A local path made absolute, a trailing slash kept (it may travel to Ray workers, whose working
    directory can differ, and Ray Train takes only absolute local storage paths); a URL, file://
    included, and None as they are."""
    if path is None or "://" in path:
        return path
    return os.path.abspath(path) + ("/" if path.endswith("/") else "")


def temp_beside(path: str) -> str:
    """A fresh name beside `path` for writing it atomically ('_': hidden from table readers)."""
    head, tail = posixpath.split(path)
    return posixpath.join(head, f"_{tail}.{uuid.uuid4().hex}.tmp")


class Storage:
    """fsspec/s3fs options and what a job does with them. Its repr names the options, never their values."""

    def __init__(self, options: dict | None = None):
        self.options = dict(options or {})

    @classmethod
    def from_option(cls, text: str | None) -> "Storage":
        """The handle for a job's `--storage-options` text (None or empty: fsspec's defaults)."""
        return cls(parse_storage_options(text))

    def __repr__(self) -> str:
        return f"Storage(options={sorted(self.options)})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Storage) and other.options == self.options

    __hash__ = None  # options are a dict

    # --- filesystems ------------------------------------------------------------------------------

    def fs(self, path: str, fresh: bool = False):
        """(fsspec filesystem, path without protocol) for `path`; `fresh` first drops the filesystem's cached
        listings below it (fsspec keeps them per instance, and other processes, Ray workers, write there)."""
        fs, stripped = filesystem(path, self.options)
        if fresh:
            fs.invalidate_cache(stripped)
        return fs, stripped

    def find(self, root: str, extensions: tuple[str, ...] = (), *, exclude: tuple[str, ...] = (),
             skip_hidden: bool = False) -> list[str]:
        """The files below `root` (paths without protocol, sorted, from a fresh listing; none when `root` does
        not exist) ending with one of `extensions` (any when empty), minus those below a path of `exclude`;
        `skip_hidden` also leaves out every file with a name below `root` starting with `_` or `.` (a
        job's `_rejected/`, `_keys/`, `_SUCCESS`, `.crc` files)."""
        fs, stripped = self.fs(root, fresh=True)
        if not fs.exists(stripped):
            return []
        prefix = stripped.rstrip("/") + "/"
        skips = tuple(self.fs(e)[1].rstrip("/") + "/" for e in exclude)
        found = []
        for file in fs.find(stripped):
            below = file[len(prefix):] if file.startswith(prefix) else posixpath.basename(file)
            if extensions and not file.endswith(extensions) or skips and file.startswith(skips):
                continue
            if skip_hidden and any(part.startswith(("_", ".")) for part in below.split("/")):
                continue
            found.append(file)
        return sorted(found)

    def names(self, folder: str) -> list[str]:
        """The names of the files and folders directly in `folder` (a fresh listing, sorted; none when it
        does not exist)."""
        fs, stripped = self.fs(folder, fresh=True)
        if not fs.exists(stripped):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(stripped, detail=False))

    def arrow(self, path: str):
        """(pyarrow filesystem, path without protocol) for Ray Data and pyarrow: fsspec underneath."""
        import pyarrow.fs as pafs

        fs, stripped = self.fs(path)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), stripped

    def train_location(self, path: str):
        """(storage_path, storage_filesystem) for Ray Train's RunConfig: a local path as it is (None: Ray's
        own local filesystem), a URL stripped of its protocol with this handle's pyarrow filesystem."""
        if not is_remote(path):
            return path, None
        filesystem_, stripped = self.arrow(path)
        return stripped, filesystem_

    # --- files ------------------------------------------------------------------------------------

    def open(self, path: str, mode: str = "rb", **kwargs):
        """An open file (a context manager); text modes take encoding/errors/newline. Writing creates the
        parent folder where folders exist (a local disk), as `fsspec.open` does."""
        fs, stripped = self.fs(path)
        if "r" not in mode and _is_local(fs):
            fs.makedirs(posixpath.dirname(stripped), exist_ok=True)
        return fs.open(stripped, mode, **kwargs)

    def exists(self, path: str) -> bool:
        fs, stripped = self.fs(path)
        return fs.exists(stripped)

    def read_bytes(self, path: str) -> bytes:
        """The file's bytes (FileNotFoundError when there is none)."""
        with self.open(path, "rb") as f:
            return f.read()

    def read_text(self, path: str) -> str:
        with self.open(path, "r", encoding="utf-8") as f:
            return f.read()

    def makedirs(self, path: str) -> None:
        fs, stripped = self.fs(path)
        fs.makedirs(stripped, exist_ok=True)

    def remove(self, path: str, recursive: bool = False) -> None:
        """Delete `path` if it exists (asked of the store, not of cached listings: Ray workers write there)."""
        fs, stripped = self.fs(path, fresh=True)
        if fs.exists(stripped):
            fs.rm(stripped, recursive=recursive)

    def copy(self, src: str, dst: str) -> str:
        """Copy one file, streaming, between any two places this handle reaches (local, S3, ...); `dst`."""
        with self.open(src, "rb") as fin, self.open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, length=COPY_CHUNK)
        return dst

    def write_atomic(self, path: str, data: bytes | Iterable[bytes]) -> str:
        """Replace `path` in one step, so a reader sees the old bytes or the new, never part: a temp file
        beside it, then a rename (local) or a server-side copy (object stores); returns `path`. `data` is
        the bytes, or chunks of them written as they come (a file too large to hold at once)."""
        fs, stripped = self.fs(path)
        head = posixpath.dirname(stripped)
        if head and _is_local(fs):  # an object store has no folders, and s3fs's makedirs creates a missing bucket
            fs.makedirs(head, exist_ok=True)
        tmp = temp_beside(stripped)
        with fs.open(tmp, "wb") as f:
            for chunk in (data,) if isinstance(data, bytes) else data:
                f.write(chunk)
        if _is_local(fs):
            os.replace(tmp, stripped)
        else:
            fs.mv(tmp, stripped)
        return path

    def write_text(self, path: str, text: str) -> str:
        return self.write_atomic(path, text.encode("utf-8"))


def as_storage(value: "Storage | dict | None") -> Storage:
    """A Storage from a Storage (itself), a dict of options or None (fsspec's defaults)."""
    return value if isinstance(value, Storage) else Storage(value)
