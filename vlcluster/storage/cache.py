"""Local copies of remote objects, shared by every process on a machine.

A copy is named after the object's URL and its ETag (or size and
modification time where a store has no ETag), so an object that was
rewritten (a stage re-run) is fetched again and a stale copy is never read.
Each download goes to a temporary file in the cache directory and is renamed
into place, which is atomic: ranks and stages opening the same object at
the same time may both download it, but none ever reads a partial file.
(fsspec's ``filecache`` downloads straight into the final file name, which
is not safe with several ranks on one cache; that is why it is not used.)
"""

from __future__ import annotations

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


def cached_copy(url: str, directory: Path) -> Path:
    """A local file holding the current content of ``url`` (one HEAD request when cached)."""
    fs, key = fsspec.core.url_to_fs(url)
    digest = hashlib.sha256(f"{url}\0{_version(fs.info(key))}".encode()).hexdigest()[:20]
    dest = Path(directory) / f"{digest}-{posixpath.basename(key.rstrip('/'))}"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".download-", dir=dest.parent)
    os.close(fd)
    try:
        fs.get_file(key, tmp)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest
