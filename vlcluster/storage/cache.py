"""Local copies of remote objects, shared by every process on a machine.

A copy is named after the object's URL and its ETag (or size and
modification time where a store has no ETag), so an object that was
rewritten (a stage re-run) is fetched again and a stale copy is never read.
Each download goes to a temporary file in the cache directory and is renamed
into place, which is atomic: no process ever reads a partial file. (fsspec's
``filecache`` downloads straight into the final file name, which is not safe
with several ranks on one cache; that is why it is not used.) A lock file per
object makes the node's ranks wait for the one that downloads it instead of
each fetching it too: one copy per node, fetched once.

With a limit (``storage.cache_limit_gb``), the copies least recently used
are removed after a download until the directory fits (a copy still open
stays readable by whoever has it open: removing only unlinks the name).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import posixpath
import tempfile
from pathlib import Path

import fsspec


def _version(info: dict) -> str:
    for key in ("ETag", "etag"):
        if info.get(key):
            return str(info[key])
    return f"{info.get('size')}-{info.get('LastModified') or info.get('mtime') or info.get('created')}"


def cached_copy(url: str, directory: Path, limit_bytes: int | None = None) -> Path:
    """A local file holding the current content of ``url`` (one HEAD request when cached)."""
    fs, key = fsspec.core.url_to_fs(url)
    digest = hashlib.sha256(f"{url}\0{_version(fs.info(key))}".encode()).hexdigest()[:20]
    dest = Path(directory) / f"{digest}-{posixpath.basename(key.rstrip('/'))}"
    if _used(dest):
        return dest
    locks = Path(directory) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other ranks wait for this download, then read the copy
        if _used(dest):
            return dest
        fd, tmp = tempfile.mkstemp(prefix=".download-", dir=dest.parent)
        os.close(fd)
        try:
            fs.get_file(key, tmp)
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)
    if limit_bytes is not None:
        evict(Path(directory), limit_bytes, keep=dest)
    return dest


def _used(copy: Path) -> bool:
    """Whether ``copy`` is there; if so, marked as just used (its mtime orders eviction)."""
    try:
        os.utime(copy)
        return True
    except FileNotFoundError:
        return False


def evict(directory: Path, limit_bytes: int, keep: Path) -> list[Path]:
    """Remove the least recently used copies until the directory holds at most ``limit_bytes`` (never ``keep``)."""
    copies = []
    for entry in os.scandir(directory):
        if entry.is_file() and not entry.name.startswith("."):
            stat = entry.stat()
            copies.append((stat.st_mtime_ns, stat.st_size, Path(entry.path)))
    total, removed = sum(size for _, size, _ in copies), []
    for _, size, path in sorted(copies):
        if total <= limit_bytes:
            break
        if path != keep:
            path.unlink(missing_ok=True)
            total -= size
            removed.append(path)
    return removed
