"""One shard's member table in a shard index: the items, and where each item's files lie.

A reader at scale uses a few items of each shard it opens (rank r of 64 reads
16-32 items of a 1,000-item shard per step), so a table costs what is read of
it: version 2 (written) is fixed-width binary records, checked in full only
for their counts and lengths when opened, and item by item when an item is
used. Version 1 (JSON, still read) is decoded and checked whole.

Version 2, zlib-compressed, little-endian::

    COUNTS  items, files, text bytes
    ITEM    per item: text start, key length, error length, first file, file count
    FILE    per file: suffix start, suffix length, data offset, size
    text    keys, error messages and suffixes (UTF-8, surrogate escapes for other bytes)

An item with no files is the marker of a damaged shard (``tarindex.py``):
its error message follows its key in the text. Everything is checked before
use: the table may be hostile or belong to another shard.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from typing import Any, Protocol, overload

from vlcluster.data.tarindex import IndexedSample

MAX_TABLE_BYTES = 512 << 20  # decompressed, per shard
HEADER = 512  # a file's data follows its tar header
COUNTS = struct.Struct("<3I")
ITEM = struct.Struct("<5I")
FILE = struct.Struct("<2I2Q")
TEXT = ("utf-8", "surrogateescape")


class IndexFormatError(ValueError):
    """An index file that cannot be used; the message names the file and the field."""


def index_error(url: str, problem: str) -> IndexFormatError:
    return IndexFormatError(
        f"{url}: not a usable shard index ({problem}). Write it again with `vlcluster index` over its shards, "
        "or remove it to let the loader index the shards itself"
    )


def encode(samples: Sequence[IndexedSample]) -> bytes:
    """The version-2 table of ``samples`` (the items of one shard, in order)."""
    items, files, text = [], [], bytearray()
    suffix_at: dict[bytes, int] = {}
    for sample in samples:
        key, error = sample.key.encode(*TEXT), (sample.error or "").encode(*TEXT)
        items.append(ITEM.pack(len(text), len(key), len(error), len(files), len(sample.files)))
        text += key + error
        for suffix, offset, size in sample.files:
            name = suffix.encode(*TEXT)
            if name not in suffix_at:
                suffix_at[name] = len(text)
                text += name
            files.append(FILE.pack(suffix_at[name], len(name), offset, size))
    body = COUNTS.pack(len(items), len(files), len(text)) + b"".join(items) + b"".join(files) + bytes(text)
    return zlib.compress(body, 6)


class ShardFacts(Protocol):
    """What the index header says of the shard a table belongs to (``corpusindex.ShardEntry``)."""

    name: str
    size: int
    items: int
    compressed: bool
    version: int


def decode(url: str, facts: ShardFacts, data: bytes) -> Sequence[IndexedSample]:
    """The member table of the shard ``facts`` describes, from its bytes in the index file ``url``."""
    shard = _Shard(url, facts)
    raw = _inflate(shard, data)
    return BinaryTable(shard, facts.items, raw) if facts.version == 2 else _json_table(shard, facts.items, raw)


class _Shard:
    """What a table is checked against, and how its problems are named."""

    def __init__(self, url: str, facts: ShardFacts) -> None:
        self.url, self.name, self.size, self.compressed = url, facts.name, facts.size, facts.compressed

    def fail(self, problem: str) -> IndexFormatError:
        return index_error(self.url, problem)

    def file(self, where: str, suffix: Any, offset: Any, size: Any) -> tuple[str, int, int]:
        if not isinstance(suffix, str):
            raise self.fail(f"{where}: a file's suffix is not text")
        for field, value in (("offset", offset), ("size", size)):
            if type(value) is not int or value < 0:
                raise self.fail(f"{where} {field} is {value!r}, not an integer >= 0")
        if offset < HEADER:
            raise self.fail(f"{where}: {suffix} starts at {offset}, inside the tar header in front of it")
        if not self.compressed and offset + size > self.size:
            raise self.fail(f"{where}: {suffix} lies past the end of the {self.size}-byte shard")
        return suffix, offset, size


def _inflate(shard: _Shard, data: bytes) -> bytes:
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(data, MAX_TABLE_BYTES)
    except zlib.error as exc:
        raise shard.fail(f"the table of {shard.name} does not decode: {exc}") from None
    if inflater.unconsumed_tail:
        raise shard.fail(f"the table of {shard.name} inflates past {MAX_TABLE_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise shard.fail(f"the table of {shard.name} does not decode: its compressed stream is cut short or followed by other bytes")
    return raw


class BinaryTable(Sequence[IndexedSample]):
    """A version-2 table: its lengths checked now, each item when it is used."""

    def __init__(self, shard: _Shard, items: int, raw: bytes) -> None:
        self.shard, self.raw = shard, raw
        if len(raw) < COUNTS.size:
            raise shard.fail(f"the table of {shard.name} is {len(raw)} bytes, shorter than its counts")
        self.count, self.files, self.text_bytes = COUNTS.unpack_from(raw)
        if self.count != items:
            raise shard.fail(f"the table of {shard.name} does not list the {items} items its header gives")
        self.files_at = COUNTS.size + self.count * ITEM.size
        self.text_at = self.files_at + self.files * FILE.size
        if self.text_at + self.text_bytes != len(raw):
            raise shard.fail(f"the table of {shard.name} is {len(raw)} bytes, not the {self.text_at + self.text_bytes} its counts give")

    def __len__(self) -> int:
        return self.count

    @overload
    def __getitem__(self, number: int) -> IndexedSample: ...
    @overload
    def __getitem__(self, number: slice) -> list[IndexedSample]: ...
    def __getitem__(self, number):
        if isinstance(number, slice):
            return [self[at] for at in range(*number.indices(self.count))]
        number += self.count if number < 0 else 0
        if not 0 <= number < self.count:
            raise IndexError(f"item {number} of a {self.count}-item shard")
        where = f"item {number} of {self.shard.name}"
        start, key_length, error_length, first, files = ITEM.unpack_from(self.raw, COUNTS.size + number * ITEM.size)
        key = self._text(where, start, key_length)
        if files == 0:
            if error_length == 0:
                raise self.shard.fail(f"{where} has no files and no error")
            return IndexedSample(key, error=self._text(where, start + key_length, error_length))
        if error_length or first + files > self.files:
            raise self.shard.fail(f"{where}: its files {first}..{first + files} are not among the table's {self.files}")
        return IndexedSample(key, tuple(self._file(where, first + at) for at in range(files)))

    def _file(self, where: str, number: int) -> tuple[str, int, int]:
        start, length, offset, size = FILE.unpack_from(self.raw, self.files_at + number * FILE.size)
        return self.shard.file(where, self._text(where, start, length), offset, size)

    def _text(self, where: str, start: int, length: int) -> str:
        if start + length > self.text_bytes:
            raise self.shard.fail(f"{where}: text at {start}..{start + length} lies past the table's {self.text_bytes} bytes")
        at = self.text_at + start
        return self.raw[at : at + length].decode(*TEXT)


def _json_table(shard: _Shard, items: int, raw: bytes) -> list[IndexedSample]:
    """A version-1 table: per item ``[key, [[suffix, offset, size], ...]]`` or ``[key, null, error]``."""
    try:
        listed = json.loads(raw)
    except ValueError as exc:
        raise shard.fail(f"the table of {shard.name} does not decode: {exc}") from None
    if not isinstance(listed, list) or len(listed) != items:
        raise shard.fail(f"the table of {shard.name} does not list the {items} items its header gives")
    return [_json_item(shard, f"item {number} of {shard.name}", item) for number, item in enumerate(listed)]


def _json_item(shard: _Shard, where: str, item: Any) -> IndexedSample:
    if not isinstance(item, list) or len(item) not in (2, 3) or not isinstance(item[0], str):
        raise shard.fail(f"{where} is not [key, files] or [key, null, error]")
    if item[1] is None:
        if len(item) != 3 or not isinstance(item[2], str):
            raise shard.fail(f"{where} is a marker without its error")
        return IndexedSample(item[0], error=item[2])
    files = []
    for member in item[1] if isinstance(item[1], list) else [None]:
        if not isinstance(member, list) or len(member) != 3:
            raise shard.fail(f"{where}: a file is not [suffix, offset, size]")
        files.append(shard.file(where, *member))
    if not files:
        raise shard.fail(f"{where} has no files")
    return IndexedSample(item[0], tuple(files))
