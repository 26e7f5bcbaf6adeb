"""The member records of a shard index: per item its key and where its files lie.

A reader at scale uses a few items of each shard it opens (a rank of 48 reads
about 22 items a step, in runs of 16, from one to four shards of 1,000), so
it fetches the records of those items only. Version 2 (written) lays out each
shard's records at a fixed width, so the records of items ``a..b`` are one
byte range of the index file; version 1 (still read) has one zlib-compressed
JSON table per shard, fetched and decoded whole.

A version-2 record, little-endian, ``3 + K + 18 F`` bytes (``K``, ``F``: the
shard's ``record`` in the index header, its longest key and most files)::

    u16 key length, K bytes of key (UTF-8, surrogate escapes for other bytes; zero padded)
    u8  file count (0: the marker of a damaged shard, its message in the header's ``errors``)
    F x (u16 suffix number in the header's ``suffixes``, u64 data offset, u64 size)

Every record is checked when it is used (lengths, numbers, bounds: the index
may be hostile or belong to other shards).
"""

from __future__ import annotations

import json
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec

from vlcluster.data.tarindex import IndexedSample

MAX_TABLE_BYTES = 512 << 20  # a version-1 table, decompressed
MAX_KEY_BYTES = 4096
MAX_FILES = 255
HEADER = 512  # a file's data follows its tar header
KEY_LENGTH = struct.Struct("<H")
FILE = struct.Struct("<HQQ")
NEAR_BYTES = 4096  # records of one shard at most this far apart are read in one range (a request costs more)
KEPT_RECORDS = 1 << 16  # records kept per reader (~4 MB): a few windows of shards
WHOLE_TABLES = 64  # version-1 tables kept decoded


class IndexFormatError(ValueError):
    """An index file that cannot be used; the message names the file and the field."""


def index_error(url: str, problem: str) -> IndexFormatError:
    return IndexFormatError(
        f"{url}: not a usable shard index ({problem}). Write it again with `vlcluster index` over its shards, "
        "or remove it to let the loader index the shards itself"
    )


@dataclass(frozen=True)
class ShardEntry:
    """What the index header records of one shard."""

    name: str
    size: int
    items: int
    compressed: bool
    table: tuple[int, int]  # (offset, length) of its records (version 2) or table (version 1) in the index file
    version: int = 2
    record: tuple[int, int] = (0, 0)  # version 2: (key bytes, files) of its records
    suffixes: tuple[str, ...] = ()  # version 2: the index's file suffixes, numbered
    errors: tuple[tuple[int, str], ...] = ()  # version 2: (item, message) of its damage markers

    @property
    def width(self) -> int:
        return 3 + self.record[0] + FILE.size * self.record[1]


# -- writing ----------------------------------------------------------------------------------------------------


def layout(samples: Sequence[IndexedSample], suffixes: dict[str, int]) -> dict:
    """The header fields of a shard's records (``record``, ``errors``); numbers new suffixes into ``suffixes``."""
    for sample in samples:
        for suffix, _, _ in sample.files:
            suffixes.setdefault(suffix, len(suffixes))
    keys = max((len(sample.key.encode("utf-8", "surrogateescape")) for sample in samples), default=0)
    files = max((len(sample.files) for sample in samples), default=0)
    errors = {str(number): sample.error for number, sample in enumerate(samples) if sample.error is not None}
    return {"record": [keys, files], **({"errors": errors} if errors else {})}


def encode(samples: Sequence[IndexedSample], record: Sequence[int], suffixes: dict[str, int]) -> bytes:
    """The fixed-width records of ``samples`` (one shard's items, in order)."""
    keys, files = record
    out = bytearray()
    for sample in samples:
        key = sample.key.encode("utf-8", "surrogateescape")
        out += KEY_LENGTH.pack(len(key)) + key.ljust(keys, b"\0") + bytes([len(sample.files)])
        for suffix, offset, size in sample.files:
            out += FILE.pack(suffixes[suffix], offset, size)
        out += bytes(FILE.size * (files - len(sample.files)))
    return bytes(out)


# -- the header's fields ------------------------------------------------------------------------------------------


def parse_layout(url: str, where: str, shard: dict, items: int, length: int, suffixes: tuple[str, ...]) -> dict:
    """The version-2 fields of a header's shard entry, checked."""
    record = shard.get("record")
    if not (isinstance(record, list) and len(record) == 2 and all(type(x) is int for x in record)
            and 0 <= record[0] <= MAX_KEY_BYTES and 0 <= record[1] <= MAX_FILES):
        raise index_error(url, f"{where}.record is {record!r}, not [key bytes <= {MAX_KEY_BYTES}, files <= {MAX_FILES}]")
    if items * (3 + record[0] + FILE.size * record[1]) != length:
        raise index_error(url, f"{where}.table holds {length} bytes, not {items} records of its record width")
    errors = shard.get("errors", {})
    if not isinstance(errors, dict) or not all(
        isinstance(k, str) and k.isdigit() and int(k) < items and isinstance(v, str) for k, v in errors.items()
    ):
        raise index_error(url, f"{where}.errors is not a map of item numbers to messages")
    return {"record": tuple(record), "suffixes": suffixes, "errors": tuple(sorted((int(k), v) for k, v in errors.items()))}


def parse_suffixes(url: str, header: dict) -> tuple[str, ...]:
    suffixes = header.get("suffixes", [])
    if not isinstance(suffixes, list) or not all(isinstance(s, str) for s in suffixes):
        raise index_error(url, "suffixes is not a list of file suffixes")
    return tuple(suffixes)


# -- reading -------------------------------------------------------------------------------------------------------


@dataclass
class RecordReader:
    """The records of the items a step reads (version 2): ranged reads of the index file, one per run of nearby
    items (the records between them come along and are kept, so a reader that reads most of a shard fetches its
    records about once); version 1: the shard's whole table, kept decoded while used. Safe from several threads."""

    kept: OrderedDict = field(default_factory=OrderedDict)  # shard URL -> {item: record bytes}, least recently used first
    kept_records: int = 0
    whole: OrderedDict = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read(self, wanted: dict[str, tuple[str, ShardEntry, list[int]]]) -> dict[tuple[str, int], IndexedSample]:
        """``wanted``: per shard URL its (index URL, entry, item numbers); returns the items' records."""
        found: dict[tuple[str, int], IndexedSample] = {}
        missing: dict[str, list[tuple[str, ShardEntry, int, int, list[int]]]] = {}
        for shard, (index, entry, items) in wanted.items():
            if entry.version == 1:
                table = self._whole(shard, index, entry)
                found.update(((shard, item), table[item]) for item in items)
                continue
            with self.lock:
                kept = self.kept.setdefault(shard, {})
                self.kept.move_to_end(shard)
                raws = {item: kept[item] for item in items if item in kept}
            found.update(((shard, item), _record(index, entry, item, raw)) for item, raw in raws.items())
            unread = [item for item in items if item not in raws]
            missing.setdefault(index, []).extend((shard, entry, *span) for span in _record_spans(entry, unread))
        for index, spans in missing.items():
            fs, path = fsspec.core.url_to_fs(index)
            blobs = fs.cat_ranges([path] * len(spans), [s[2] for s in spans], [s[3] for s in spans], on_error="raise")
            for (shard, entry, start, end, items), blob in zip(spans, blobs):
                raws = self._keep(shard, entry, start, blob)
                found.update(((shard, item), _record(index, entry, item, raws.get(item, b""))) for item in items)
        return found

    def _keep(self, shard: str, entry: ShardEntry, start: int, blob: bytes) -> dict[int, bytes]:
        first = (start - entry.table[0]) // entry.width
        raws = {first + at: blob[at * entry.width : (at + 1) * entry.width] for at in range(len(blob) // entry.width)}
        with self.lock:
            kept = self.kept.setdefault(shard, {})
            self.kept_records -= len(kept)
            kept.update(raws)
            self.kept_records += len(kept)
            while self.kept_records > KEPT_RECORDS and len(self.kept) > 1:
                self.kept_records -= len(self.kept.popitem(last=False)[1])
        return raws

    def _whole(self, shard: str, index: str, entry: ShardEntry) -> Sequence[IndexedSample]:
        with self.lock:
            if shard in self.whole:
                self.whole.move_to_end(shard)
                return self.whole[shard]
        fs, path = fsspec.core.url_to_fs(index)
        table = decode_whole(index, entry, fs.cat_file(path, start=entry.table[0], end=sum(entry.table)))
        with self.lock:
            self.whole[shard] = table
            while len(self.whole) > WHOLE_TABLES:
                self.whole.popitem(last=False)
        return table


def read_all(index: str, entry: ShardEntry) -> list[IndexedSample]:
    """Every item of one shard (tests, tools)."""
    found = RecordReader().read({entry.name: (index, entry, list(range(entry.items)))})
    return [found[(entry.name, item)] for item in range(entry.items)]


def _record_spans(entry: ShardEntry, items: list[int]) -> list[tuple[int, int, list[int]]]:
    """Byte ranges of the index file holding the records of ``items``: (start, end, items), nearby ones merged."""
    spans: list[tuple[int, int, list[int]]] = []
    for item in sorted(set(items)):
        start = entry.table[0] + item * entry.width
        if spans and start <= spans[-1][1] + NEAR_BYTES:
            spans[-1] = (spans[-1][0], start + entry.width, spans[-1][2] + [item])
        else:
            spans.append((start, start + entry.width, [item]))
    return spans


def _record(index: str, entry: ShardEntry, item: int, raw: bytes) -> IndexedSample:
    where = f"item {item} of {entry.name}"
    if len(raw) != entry.width:
        raise index_error(index, f"{where}: its record lies past the end of the file")
    keys, slots = entry.record
    (length,) = KEY_LENGTH.unpack_from(raw)
    if length > keys:
        raise index_error(index, f"{where}: a key of {length} bytes in a record holding {keys}")
    key = raw[2 : 2 + length].decode("utf-8", "surrogateescape")
    count = raw[2 + keys]
    error = dict(entry.errors).get(item) if entry.errors else None  # markers are rare: most shards have none
    if count == 0 or error is not None:
        if count or error is None:
            raise index_error(index, f"{where} has {count} files and {'an' if error else 'no'} error")
        return IndexedSample(key, error=error)
    if count > slots:
        raise index_error(index, f"{where}: {count} files in a record holding {slots}")
    files = []
    for slot in range(count):
        number, offset, size = FILE.unpack_from(raw, 3 + keys + slot * FILE.size)
        if number >= len(entry.suffixes):
            raise index_error(index, f"{where}: suffix number {number} of the index's {len(entry.suffixes)}")
        files.append(check_file(index, entry, where, entry.suffixes[number], offset, size))
    return IndexedSample(key, tuple(files))


def check_file(index: str, entry: ShardEntry, where: str, suffix: Any, offset: Any, size: Any) -> tuple[str, int, int]:
    if not isinstance(suffix, str):
        raise index_error(index, f"{where}: a file's suffix is not text")
    for name, value in (("offset", offset), ("size", size)):
        if type(value) is not int or value < 0:
            raise index_error(index, f"{where} {name} is {value!r}, not an integer >= 0")
    if offset < HEADER:
        raise index_error(index, f"{where}: {suffix} starts at {offset}, inside the tar header in front of it")
    if not entry.compressed and offset + size > entry.size:
        raise index_error(index, f"{where}: {suffix} lies past the end of the {entry.size}-byte shard")
    return suffix, offset, size


# -- version 1 ----------------------------------------------------------------------------------------------------


def decode_whole(index: str, entry: ShardEntry, data: bytes) -> list[IndexedSample]:
    """A version-1 table: zlib-compressed JSON, per item ``[key, [[suffix, offset, size], ...]]`` or ``[key, null, error]``."""
    where = f"the table of {entry.name}"
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(data, MAX_TABLE_BYTES)
        if inflater.unconsumed_tail:
            raise index_error(index, f"{where} inflates past {MAX_TABLE_BYTES} bytes")
        listed = json.loads(raw)
    except (zlib.error, ValueError) as exc:
        if isinstance(exc, IndexFormatError):
            raise
        raise index_error(index, f"{where} does not decode: {exc}") from None
    if not isinstance(listed, list) or len(listed) != entry.items:
        raise index_error(index, f"{where} does not list the {entry.items} items its header gives")
    return [_json_item(index, entry, f"item {number} of {entry.name}", item) for number, item in enumerate(listed)]


def _json_item(index: str, entry: ShardEntry, where: str, item: Any) -> IndexedSample:
    if not isinstance(item, list) or len(item) not in (2, 3) or not isinstance(item[0], str):
        raise index_error(index, f"{where} is not [key, files] or [key, null, error]")
    if item[1] is None:
        if len(item) != 3 or not isinstance(item[2], str):
            raise index_error(index, f"{where} is a marker without its error")
        return IndexedSample(item[0], error=item[2])
    files = []
    for member in item[1] if isinstance(item[1], list) else [None]:
        if not isinstance(member, list) or len(member) != 3:
            raise index_error(index, f"{where}: a file is not [suffix, offset, size]")
        files.append(check_file(index, entry, where, *member))
    if not files:
        raise index_error(index, f"{where} has no files")
    return IndexedSample(item[0], tuple(files))
