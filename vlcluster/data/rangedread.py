"""Reading items of indexed shards with ranged requests: exactly the bytes an item needs.

At start-up ``locate_shards`` finds each shard's entry in the index beside it
(``corpusindex.INDEX_NAME``: one header read per directory, one listing per
directory to check the shards' sizes). Shards without one are indexed once per
node into ``storage.cache_dir`` (one rank walks them while the node's other
ranks wait on a file lock), or, with no cache directory, walked by every rank
as before (logged: it reads every shard).

``RangedReader.fetch`` then reads a batch of items: their member records
(``membertable.py``: one ranged read of the index per run of nearby items), and
per item one byte range from the tar header of its first file to the end of
its last, coalesced with neighbouring items of the same shard; all ranges of a
batch go out as one concurrent ``cat_ranges``. A shard of the local node
cache (``storage.cache_dir``, ``nodecache.py``: the coming shards downloaded
ahead) is read from its local copy the same way.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import posixpath
import tarfile
import tempfile
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fsspec

from vlcluster.data import membertable
from vlcluster.data.membertable import HEADER
from vlcluster.data.corpusindex import INDEX_NAME, CorpusIndex, ShardEntry, write_index
from vlcluster.data.nodecache import NodeCache
from vlcluster.data.quality import BadDataError
from vlcluster.data.stream import RawSample
from vlcluster.data.tarindex import IndexedSample, count_items
from vlcluster.storage.config import active

log = logging.getLogger("vlcluster.data")

MAX_GAP = 4096  # items of one shard at most this far apart are fetched in one range (padding, headers)


@dataclass(frozen=True)
class ShardLocation:
    """Where an indexed shard's member records lie."""

    index: str
    entry: ShardEntry


def _directory(url: str) -> str:
    return posixpath.dirname(url.rstrip("/"))


def _name(url: str) -> str:
    return posixpath.basename(url.rstrip("/"))


def _listed_sizes(directory: str) -> dict[str, int]:
    fs, path = fsspec.core.url_to_fs(directory)
    fs.invalidate_cache(path)
    try:
        return {_name(entry["name"]): int(entry["size"]) for entry in fs.ls(path, detail=True) if entry.get("type") == "file"}
    except FileNotFoundError:
        return {}


def _index_of(directory: str) -> CorpusIndex | None:
    url = f"{directory}/{INDEX_NAME}"
    fs, path = fsspec.core.url_to_fs(url)
    return CorpusIndex.load(url) if fs.exists(path) else None


def _check(index: CorpusIndex, urls: Sequence[str], sizes: dict[str, int]) -> dict[str, ShardLocation]:
    found = {}
    for url in urls:
        entry = index.entries.get(_name(url))
        if entry is None:
            continue
        if _name(url) not in sizes:
            raise FileNotFoundError(f"{url}: the shard does not exist (it is listed in {index.url})")
        if sizes[_name(url)] != entry.size:
            raise ValueError(
                f"{url} is {sizes[_name(url)]} bytes, but {index.url} indexed it at {entry.size}: the shard was rewritten "
                f"after it was indexed. Index its directory again (`vlcluster index {_directory(url)}/`) or remove the stale index"
            )
        found[url] = ShardLocation(index.url, entry)
    return found


def locate_shards(urls: Sequence[str]) -> tuple[tuple[int, ...], dict[str, ShardLocation]]:
    """Items per shard of ``urls``, and where the indexed ones' member records lie."""
    locations: dict[str, ShardLocation] = {}
    for directory, group in _by_directory(urls).items():
        index = _index_of(directory)
        if index is not None:
            locations.update(_check(index, group, _listed_sizes(directory)))
    unindexed = [url for url in urls if url not in locations]
    if unindexed:
        locations.update(_index_unindexed(unindexed))
    counts = {url: location.entry.items for url, location in locations.items()}
    missing = [url for url in urls if url not in counts]
    if missing:
        log.warning(
            "%d shard(s) have no index (%s): every rank walks their tar headers, which reads them whole from an object "
            "store; run `vlcluster index` over them, or set storage.cache_dir to index them once per node",
            len(missing), missing[0],
        )
        counts.update(zip(missing, _walk_counts(missing)))
    return tuple(counts[url] for url in urls), locations


def _walk_counts(urls: Sequence[str]) -> list[int]:
    with ThreadPoolExecutor(min(8, max(1, len(urls)))) as pool:
        return list(pool.map(count_items, urls))


def _index_unindexed(urls: Sequence[str]) -> dict[str, ShardLocation]:
    """Shards without an index, indexed once per node into the cache directory (none without one)."""
    cache_dir = active().cache_dir
    if not cache_dir:
        return {}
    directory = Path(cache_dir).expanduser() / "indexes"
    directory.mkdir(parents=True, exist_ok=True)
    found: dict[str, ShardLocation] = {}
    for parent, group in _by_directory(urls).items():
        sizes = _listed_sizes(parent)
        identity = "\n".join(f"{url}\0{sizes.get(_name(url))}" for url in group)
        target = directory / f"{hashlib.sha256(identity.encode()).hexdigest()[:20]}.vlindex"
        with open(directory / f"{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other ranks wait here for the one that indexes
            if not target.exists():
                log.info("indexing %d shard(s) of %s once for this node into %s", len(group), parent, target)
                fd, tmp = tempfile.mkstemp(prefix=".index-", dir=directory)
                os.close(fd)
                try:
                    write_index(group, tmp, progress=_log_progress)
                    os.replace(tmp, target)
                finally:
                    Path(tmp).unlink(missing_ok=True)
        found.update(_check(CorpusIndex.load(str(target)), group, sizes))
    return found


def _by_directory(urls: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for url in urls:
        groups.setdefault(_directory(url), []).append(url)
    return groups


def _log_progress(done: int, total: int) -> None:
    if done == total or done % max(1, total // 10) == 0:
        log.info("indexed %d/%d shards", done, total)


class RangedReader:
    """Items of indexed shards, fetched batch by batch with coalesced ranged reads."""

    def __init__(self, locations: dict[str, ShardLocation]) -> None:
        self.locations = locations
        self.records = membertable.RecordReader()
        self.cache = NodeCache(lambda url: self.locations[url].entry.size)

    def close(self) -> None:
        self.cache.close()

    def fetch(self, wanted: Sequence[tuple[str, int]], lock: AbstractContextManager | None = None) -> list[RawSample]:
        """The raw items ``(shard url, item index)``, in the order asked; ``lock``: held while the node cache
        is asked for its copies (callers fetching from several threads), not while bytes are read."""
        items: dict[str, list[int]] = {}
        for url, item in wanted:
            items.setdefault(url, []).append(item)
        records = self.records.read({url: (self.locations[url].index, self.locations[url].entry, numbers) for url, numbers in items.items()})
        samples = [records[(url, item)] for url, item in wanted]
        with lock or nullcontext():
            for url in items:
                self.cache.source(url)  # a node cache's copy, fetched under the lock too
        spans = {}
        for (url, item), sample in zip(wanted, samples):
            if sample.error is None:
                spans[(url, item)] = (sample.files[0][1] - HEADER, max(offset + size for _, offset, size in sample.files))
        blocks = _coalesce(spans)
        data = self._read(blocks)
        raws = []
        for (url, item), sample in zip(wanted, samples):
            raw: RawSample = {"__key__": sample.key, "__url__": url}
            if sample.error is not None:
                raws.append(raw | {"__error__": sample.error})
                continue
            block, (start, _) = data[(url, item)]
            raws.append(_cut(raw, url, self.locations[url].index, sample, block, start))
        return raws

    def _read(self, blocks: list[tuple[str, int, int, list]]) -> dict[tuple[str, int], tuple[bytes, tuple[int, int]]]:
        by_fs: dict[int, list] = {}
        fss = {}
        for block in blocks:
            fs, path = fsspec.core.url_to_fs(self.cache.source(block[0]))
            fss[id(fs)] = fs
            by_fs.setdefault(id(fs), []).append((path, block))
        out = {}
        for key, group in by_fs.items():
            results = fss[key].cat_ranges([p for p, _ in group], [b[1] for _, b in group], [b[2] for _, b in group], on_error="return")
            for (_, (url, start, end, members)), result in zip(group, results):
                if isinstance(result, FileNotFoundError) and self.cache.holds(url):  # its node copy removed meanwhile
                    self.cache.forget(url)
                    fs, path = fsspec.core.url_to_fs(self.cache.source(url))
                    result = fs.cat_file(path, start=start, end=end)
                if isinstance(result, BaseException) and not isinstance(result, (EOFError, ValueError)):
                    raise result
                blob = b"" if isinstance(result, BaseException) else result
                for member, span in members:
                    out[(url, member)] = (blob[span[0] - start : span[1] - start], span)
        return out


def _coalesce(spans: dict[tuple[str, int], tuple[int, int]]) -> list[tuple[str, int, int, list]]:
    """Ranges of the same shard that touch or nearly touch become one: (url, start, end, [(item, span), ...])."""
    blocks: list[tuple[str, int, int, list]] = []
    for (url, item), span in sorted(spans.items(), key=lambda entry: (entry[0][0], entry[1][0])):
        if blocks and blocks[-1][0] == url and span[0] <= blocks[-1][2] + MAX_GAP:
            last = blocks[-1]
            blocks[-1] = (url, last[1], max(last[2], span[1]), last[3] + [(item, span)])
        else:
            blocks.append((url, span[0], span[1], [(item, span)]))
    return blocks


def _cut(raw: RawSample, url: str, index: str, sample: IndexedSample, block: bytes, start: int) -> RawSample:
    """The item's files out of its bytes (which begin with its first file's tar header)."""
    first_size = sample.files[0][2]
    try:
        info = tarfile.TarInfo.frombuf(block[:HEADER], "utf-8", "surrogateescape")
    except tarfile.TarError:
        info = None
    if info is None or info.size != first_size:
        if len(block) < HEADER:
            return raw | {"__error__": f"ReadError: unexpected end of data in {sample.key}.{sample.files[0][0]}"}
        raise BadDataError(
            f"{url} does not match its index {index}: no tar header of a {first_size}-byte file in front of item "
            f"{sample.key} (offset {start + HEADER}): the shard was rewritten after it was indexed. Index it again "
            "(`vlcluster index`) or remove the stale index"
        )
    for suffix, offset, size in sample.files:
        data = block[offset - start : offset - start + size]
        if len(data) != size:
            return {"__key__": sample.key, "__url__": url, "__error__": f"ReadError: unexpected end of data in {sample.key}.{suffix}"}
        raw[suffix] = data
    return raw
