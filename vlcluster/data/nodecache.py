"""The node's copies of remote shards (``storage.cache_dir``), fetched before the readers reach them.

With a cache directory a reader reads a remote shard from a whole local copy
(``storage/cache.py``: one download per node, the node's other readers wait
for it on a lock; least recently used copies removed beyond
``storage.cache_limit_gb``). The canonical order says which shards come next,
so ``prefetch`` downloads them in a background thread, in the order they will
be read, while the current ones are trained on: the first read of a shard then
finds its copy instead of waiting for a whole-shard download. It fetches only
as many coming shards as the limit holds (the ones being read included), so
that it never evicts a copy a reader still needs for one it needs later.
Copies are removed least recently used first (a download, or a reader's
first open of a copy, is a use), which is the order they are read in: a
consumed shard goes before a coming one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from vlcluster.storage.config import active
from vlcluster.storage.paths import is_remote
from vlcluster.storage.shardlist import limit_bytes


class NodeCache:
    """Local copies of remote shards for one reader; ``size_of(url)``: a shard's bytes (its index entry)."""

    def __init__(self, size_of: Callable[[str], int]) -> None:
        spec = active()
        self.directory = Path(spec.cache_dir).expanduser() / "shards" if spec.cache_dir else None
        self.limit = limit_bytes(spec)
        self.size_of = size_of
        self._local: dict[str, str] = {}
        self._coming: dict[str, Future] = {}
        self._downloads: ThreadPoolExecutor | None = None

    def holds(self, url: str) -> bool:
        return self.directory is not None and is_remote(url)

    def source(self, url: str) -> str:
        """What to read ``url``'s bytes from: its node copy where the cache holds remote shards, else the URL."""
        if not self.holds(url):
            return url
        if url not in self._local or not Path(self._local[url]).exists():  # a bounded cache may have removed it
            self._local[url] = str(self._copy(url))  # waits on the lock while a prefetch downloads it
        return self._local[url]

    def forget(self, url: str) -> None:
        """The copy of ``url`` was removed while it was read: the next ``source`` fetches it again."""
        self._local.pop(url, None)

    def prefetch(self, urls: Sequence[str]) -> None:
        """Download the shards the order reads next (``urls``, first needed first) in the background, as many
        as the cache's limit holds."""
        coming = [url for url in dict.fromkeys(urls) if self.holds(url)]
        planned = 0
        for url in coming:
            planned += self.size_of(url)
            if self.limit is not None and planned > self.limit:
                break
            started = self._coming.get(url)
            if started is None or (started.done() and not _copied(started)):
                self._downloads = self._downloads or ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch")
                self._coming[url] = self._downloads.submit(self._copy, url)
        for url in [url for url, future in self._coming.items() if future.done() and url not in coming]:
            del self._coming[url]

    def close(self) -> None:
        if self._downloads is not None:
            self._downloads.shutdown(wait=False, cancel_futures=True)  # a download under way completes (atomic rename)

    def _copy(self, url: str) -> Path:
        from vlcluster.storage.cache import cached_copy

        return cached_copy(url, self.directory, self.limit)


def _copied(download: Future) -> bool:
    """Whether a finished prefetch left a copy that is still there (a failed one is retried, or fails in the reader)."""
    return download.exception() is None and download.result().exists()
