"""The index of a corpus of WebDataset shards: made once, read at start-up.

Training needs, for every shard, how many items it holds (the canonical
order is arithmetic over those counts, ``order.py``) and where each item's
files lie (a reader fetches exactly those bytes, ``rangedread.py``). Walking
every shard's tar headers to learn that costs a read of every shard; the
index records it once, beside the shards, as one object per directory::

    vlcluster index 's3://bucket/laion/{000000..010459}.tar'   # -> s3://bucket/laion/shards.vlindex

Layout of ``shards.vlindex``: the magic line ``MAGIC``, the header's length
(8 bytes, little-endian), the header (JSON: the format version, the file
suffixes of the corpus, and per shard its name, size in bytes, item count,
whether it is compressed, where its member records lie in this file and
their width, and the messages of its damage markers), then the member
records (``membertable.py``: per item its key and its files' suffixes, data
offsets and sizes, or the marker of a damaged shard; the items are exactly
what walking the shard gives, ``tarindex.py``). Start-up reads the header
only; a reader fetches the records of the items it uses (one ranged read per
run of nearby items). Version 2 is written; version 1 (a zlib-compressed JSON
table per shard, fetched whole) is still read.

Everything read from an index is checked (lengths, types, bounds: it may be
hostile or belong to other shards); a shard whose size differs from the
recorded one is refused at start-up, and every ranged read checks the tar
header in front of the item's first file, so an index that does not match
its shard's bytes never yields wrong data.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec

from vlcluster.data import membertable
from vlcluster.data.membertable import IndexFormatError, ShardEntry, index_error as _fail
from vlcluster.data.tarindex import IndexedSample, ShardIndex

__all__ = ["INDEX_NAME", "CorpusIndex", "IndexFormatError", "ShardEntry", "index_beside", "write_index"]

INDEX_NAME = "shards.vlindex"
MAGIC = b"VLCLUSTER-SHARD-INDEX\n"
VERSION = 2  # written
READABLE = (1, 2)
MAX_HEADER_BYTES = 256 << 20
FIRST_READ = 64 << 10  # one read usually holds the whole header
INDEX_THREADS = 8  # shards walked at once when indexing (object-store reads are latency-bound)


def _as_int(url: str, value: Any, field: str, low: int = 0) -> int:
    if type(value) is not int or value < low:
        raise _fail(url, f"{field} is {value!r}, not an integer >= {low}")
    return value


def _parse_header(url: str, header: Any, file_size: int) -> dict[str, ShardEntry]:
    version = header.get("version") if isinstance(header, dict) else None
    if version not in READABLE or type(version) is not int:
        raise _fail(url, f"version {version!r}, this vlcluster reads versions {', '.join(map(str, READABLE))}")
    shards = header.get("shards")
    if not isinstance(shards, list):
        raise _fail(url, "the header has no list of shards")
    suffixes = membertable.parse_suffixes(url, header)
    entries: dict[str, ShardEntry] = {}
    for number, shard in enumerate(shards):
        where = f"shards[{number}]"
        if not isinstance(shard, dict) or not isinstance(shard.get("name"), str) or not shard["name"] or "/" in shard["name"]:
            raise _fail(url, f"{where}.name is not a file name")
        table = shard.get("table")
        if not isinstance(table, list) or len(table) != 2:
            raise _fail(url, f"{where}.table is not [offset, length]")
        offset, length = (_as_int(url, value, f"{where}.table") for value in table)
        if offset + length > file_size:
            raise _fail(url, f"{where}.table lies past the end of the file ({offset + length} > {file_size} bytes)")
        if shard["name"] in entries:
            raise _fail(url, f"{where}.name {shard['name']!r} is listed twice")
        items = _as_int(url, shard.get("items"), f"{where}.items")
        records = membertable.parse_layout(url, where, shard, items, length, suffixes) if version == 2 else {}
        entries[shard["name"]] = ShardEntry(
            shard["name"], _as_int(url, shard.get("size"), f"{where}.size"), items,
            bool(shard.get("compressed", False)), (offset, length), version, **records,
        )
    return entries


class CorpusIndex:
    """The header of one index file: the shards it covers (their member records are read on demand)."""

    def __init__(self, url: str, entries: dict[str, ShardEntry]) -> None:
        self.url, self.entries = url, entries

    @classmethod
    def load(cls, url: str) -> CorpusIndex:
        fs, path = fsspec.core.url_to_fs(url)
        with fs.open(path, "rb", block_size=FIRST_READ, cache_type="readahead") as file:
            file_size = file.size
            head = file.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or not head.startswith(MAGIC):
                raise _fail(url, "it does not start with the shard index magic line")
            (length,) = struct.unpack("<Q", head[len(MAGIC):])
            if length > min(MAX_HEADER_BYTES, file_size - len(head)):
                raise _fail(url, f"the header length {length} exceeds the file")
            raw = file.read(length)
        try:
            header = json.loads(raw)
        except ValueError as exc:
            raise _fail(url, f"the header is not JSON: {exc}") from None
        return cls(url, _parse_header(url, header, file_size))

    def table(self, name: str) -> list[IndexedSample]:
        """The items of shard ``name``, as walking its tar headers gives them (checked against the entry)."""
        return membertable.read_all(self.url, self.entries[name])


def _walk(url: str) -> tuple[int, bool, list[IndexedSample], int | None]:
    fs, path = fsspec.core.url_to_fs(url)
    size = fs.size(path)
    index = ShardIndex(url)
    index.close()
    return size, index.compressed, index.samples, _written_by_img2dataset(fs, path)


MAX_STATS_BYTES = 1 << 20


def _written_by_img2dataset(fs, path: str) -> int | None:
    """How many samples img2dataset says it wrote into the shard at ``path``
    (``successes`` of the ``NNNNN_stats.json`` it writes beside ``NNNNN.tar``),
    or None where there is no such record or it is not one."""
    stem = path[: -len(".tar")] if path.endswith(".tar") else None
    if stem is None:
        return None
    try:
        with fs.open(f"{stem}_stats.json", "rb") as handle:
            record = json.loads(handle.read(MAX_STATS_BYTES + 1)[:MAX_STATS_BYTES])
    except (OSError, ValueError):
        return None
    successes = record.get("successes") if isinstance(record, dict) else None
    return successes if isinstance(successes, int) and not isinstance(successes, bool) and successes >= 0 else None


def write_index(urls: Sequence[str], out: str, progress: Callable[[int, int], None] | None = None) -> dict:
    """Walk every shard of ``urls`` once and write their index to ``out``; returns a summary."""
    names = [posixpath.basename(url.rstrip("/")) for url in urls]
    if len(set(names)) != len(names):
        raise ValueError(f"{out}: one index covers shards of one directory; some of the {len(names)} shards share a name")
    shards, done, disagree, suffixes = [], 0, [], {}
    with ThreadPoolExecutor(min(INDEX_THREADS, max(1, len(urls)))) as pool, tempfile.TemporaryFile() as records:
        for name, (size, compressed, samples, written) in zip(names, pool.map(_walk, urls)):
            shard = {"name": name, "size": size, "items": len(samples), "compressed": compressed, **membertable.layout(samples, suffixes)}
            start = records.tell()
            records.write(membertable.encode(samples, shard["record"], suffixes))
            shards.append((shard, records.tell() - start))
            items = sum(sample.error is None for sample in samples)
            if written is not None and written != items:
                disagree.append({"shard": name, "items": items, "img2dataset": written})
            done += 1
            if progress is not None:
                progress(done, len(urls))
        header = _header_bytes(shards, list(suffixes))
        records.seek(0)
        with fsspec.open(out, "wb") as file:
            file.write(MAGIC + struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(records, file, 1 << 20)
    return {"index": out, "shards": len(shards), "items": sum(s["items"] for s, _ in shards),
            "bytes": len(MAGIC) + 8 + len(header) + sum(length for _, length in shards), "disagree_with_img2dataset": disagree}


def _header_bytes(shards: list[tuple[dict, int]], suffixes: list[str]) -> bytes:
    # The record offsets depend on the header's own length: lay out twice (the second pass only grows digits, rarely).
    length = 0
    while True:
        offset = len(MAGIC) + 8 + length
        for shard, size in shards:
            shard["table"] = [offset, size]
            offset += size
        header = json.dumps({"version": VERSION, "suffixes": suffixes, "shards": [shard for shard, _ in shards]},
                            separators=(",", ":")).encode()
        if len(header) == length:
            return header
        length = len(header)


def index_beside(urls: Sequence[str], progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Index shards written by a stage: one ``INDEX_NAME`` per directory, covering that directory's shards in ``urls``."""
    by_directory: dict[str, list[str]] = {}
    for url in urls:
        by_directory.setdefault(posixpath.dirname(url.rstrip("/")), []).append(url)
    return [write_index(group, f"{directory}/{INDEX_NAME}", progress) for directory, group in by_directory.items()]
