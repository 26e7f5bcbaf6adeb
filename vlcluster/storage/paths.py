"""Run-directory paths on a local disk or an object store.

A run directory is a ``pathlib.Path`` locally and an ``upath.UPath`` (the
pathlib API over fsspec) for ``s3://`` and other remote URLs, so code that
joins, reads and lists paths is the same for both. What object stores lack
is handled here, in one place:

- no rename: a record is one PUT (atomic per object), a large file is
  written locally and uploaded (:func:`writable`), a directory of files is
  committed by a marker uploaded last (see ``train/checkpoint.py``);
- no local file for libraries that need one (safetensors, tokenizers,
  ``preadv``): :func:`local_copy` keeps a copy per object version
  (:mod:`vlcluster.storage.cache`);
- no flock and no appendable logs: :func:`local_side` is a local directory
  mirroring the run directory for locks, logs in progress and scratch files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vlcluster.storage.config import active


def is_remote(url: str | os.PathLike) -> bool:
    text = str(url)
    return "://" in text and not text.startswith(("file://", "local://"))


def run_path(url: str | os.PathLike) -> Path:
    """A run-directory path: ``Path`` locally, ``UPath`` on an object store."""
    if isinstance(url, Path):
        return url
    if not is_remote(url):
        return Path(url)
    active()  # endpoint, region, profile before the filesystem is created
    from vlcluster.extras import require

    if str(url).startswith("s3://"):
        require("s3fs", f"{url}: an s3:// path")
    return require("upath", f"{url}: an object-store path").UPath(str(url))


def absolute(path: Path) -> str:
    """``path`` as other processes on other hosts should see it: an absolute
    local path, or the URL of a remote one."""
    return str(path) if is_remote(path) else str(Path(path).resolve())


def cache_root() -> Path:
    configured = active().cache_dir
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "vlcluster"


def local_side(path: Path) -> Path:
    """A local directory standing in for ``path``: ``path`` itself when local,
    else a directory under the cache root named after the URL."""
    if not is_remote(path):
        return Path(path)
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return cache_root() / "runs" / f"{Path(str(path).rstrip('/')).name}-{digest}"


def _fs_path(path: Path) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(str(path))


def write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically: rename of a synced temp file locally, one PUT remotely."""
    if is_remote(path):
        fs, key = _fs_path(path)
        fs.pipe_file(key, data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)  # a full disk must not leave temp files behind
        if isinstance(exc, OSError) and exc.errno in NO_SPACE and _rewrite_in_place(path, data):
            return
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # name the record in the error paragraph
        raise


NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def _rewrite_in_place(path: Path, data: bytes) -> bool:
    """On a full disk, a small record may still replace itself within the
    blocks it already holds, so a stage that failed for lack of space is
    recorded as failed rather than left "running" (and later "interrupted").
    Not atomic: a write torn by a crash leaves a record that reads as absent.
    Returns whether the record was replaced."""
    try:
        held = path.stat().st_blocks * 512
    except OSError:
        return False
    if len(data) > held:
        return False
    with open(path, "r+b") as handle:
        handle.write(data)
        handle.truncate(len(data))  # after the write: truncating first would give the blocks away
        handle.flush()
        os.fsync(handle.fileno())
    return True


def write_json(path: Path, payload: Any) -> None:
    """Replace a JSON record in one step (``write_bytes``: rename locally, one PUT on an object store)."""
    write_bytes(path, json.dumps(payload, indent=2, sort_keys=True).encode())


MAX_RECORD_BYTES = 64 << 20  # records are small; a larger "record" is not one


def read_json(path: Path) -> Any | None:
    """The JSON record at ``path``, or None when it is missing or unreadable
    (not JSON, not UTF-8, too deep, too large, a directory)."""
    try:
        data = path.read_bytes()
        if len(data) > MAX_RECORD_BYTES:
            return None
        return json.loads(data)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError, RecursionError):
        return None


def local_copy(path: str | os.PathLike) -> Path:
    """A local file with the content of ``path`` (``path`` itself when local).

    Remote files are fetched once into ``<cache_root>/objects`` and fetched
    again only when they changed (see :mod:`vlcluster.storage.cache`)."""
    if not is_remote(path):
        return Path(path)
    from vlcluster.storage.cache import cached_copy

    active()
    return cached_copy(str(path), cache_root() / "objects")


@contextmanager
def writable(dest: Path) -> Iterator[Path]:
    """A local path to write ``dest`` through; on success it replaces ``dest``
    in one step (rename locally, one upload remotely), so readers never see
    a partial file."""
    staging = local_side(dest.parent) if is_remote(dest) else Path(dest).parent
    staging.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=staging)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        publish(tmp_path, dest)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(dest)  # the error paragraph names the file, not "a file"
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def publish(local: Path, dest: Path) -> None:
    """Move the finished local file ``local`` to ``dest``."""
    if is_remote(dest):
        upload_file(local, dest)
    else:
        os.replace(local, dest)


def upload_tree(local: Path, dest: Path) -> None:
    """Copy every file under ``local`` to the same relative path under ``dest``."""
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        upload_file(file, dest / file.relative_to(local).as_posix())


def remove_tree(path: Path) -> None:
    if is_remote(path):
        fs, key = _fs_path(path)
        for target, recursive in ((key, True), (key.rstrip("/") + "/", False)):
            # The second delete drops the folder entry that stores with real
            # directories (SeaweedFS) keep; on S3 proper it is a no-op.
            try:
                fs.rm(target, recursive=recursive)
            except FileNotFoundError:
                pass
    else:
        shutil.rmtree(path, ignore_errors=True)


def ensure_dir(path: Path) -> None:
    """Create a local directory; object stores have no directories (and
    s3fs's mkdir would create a missing bucket, which must be an error)."""
    if not is_remote(path):
        Path(path).mkdir(parents=True, exist_ok=True)


@contextmanager
def fetched(path: Path) -> Iterator[Path]:
    """A local file with the content of ``path`` for the duration of the block
    (a temporary download when remote, not kept: checkpoints are large and read once)."""
    if not is_remote(path):
        yield Path(path)
        return
    staging = local_side(path.parent)
    staging.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".download", dir=staging)
    os.close(fd)
    try:
        fs, key = _fs_path(path)
        fs.get_file(key, tmp)
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def upload_file(local: Path, dest: Path) -> None:
    """Copy the local file ``local`` to ``dest`` (kept locally, unlike :func:`publish`)."""
    fs, key = _fs_path(dest)
    fs.put_file(str(local), key)


class Mirror:
    """Keeps a remote copy of a local file that grows (a stage log): uploaded
    at most every ``every_s`` seconds while it grows and once at the end.
    A no-op when ``dest`` is the local file itself."""

    def __init__(self, local: Path, dest: Path, every_s: float = 30.0):
        self.local, self.dest, self.every_s = Path(local), dest, every_s
        self.active = is_remote(dest)
        self.synced = time.monotonic()

    def maybe_sync(self) -> None:
        if self.active and time.monotonic() - self.synced > self.every_s:
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - a hiccup of the store must not stop the stage; the final sync retries
                self.synced = time.monotonic()

    def sync(self) -> None:
        if self.active and self.local.is_file():
            upload_file(self.local, self.dest)
            self.synced = time.monotonic()
