"""Random access to the samples of one WebDataset tar shard.

``ShardIndex`` walks a shard's tar headers once (seeking over the member
data, so nothing is read or decoded) and records where each sample's files
lie; ``read(i)`` then seeks to sample ``i`` and reads only its files. The
canonical training order (``order.py``) reads samples in a shuffled order
and skips the samples of other ranks and workers, so skipping must cost a
seek, not a read.

Samples are grouped as webdataset groups them: consecutive regular files
with the same name up to the first dot of the base name; the suffix is
lower-cased, ``__meta__`` files and names without a suffix are left out. A
shard that cannot be walked to its end (corrupt, or truncated: a complete
uncompressed tar ends with zero blocks) keeps the samples indexed before the
damage and gets one more item, an error marker carrying ``__error__``, so the
item count, and with it the canonical order, is a pure function of the bytes.
A sample whose data cannot be read later becomes such a marker in place.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from typing import IO, Any

from vlcluster.data.stream import TAR_ERRORS, RawSample
from vlcluster.storage.shardlist import open_input as open_url

_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # base, suffix (webdataset's base_plus_ext)
_META = re.compile(r"__[^/]*__($|/)")
END_BLOCKS = 1024  # two zero records end a complete tar
COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


@dataclass(frozen=True)
class IndexedSample:
    key: str
    files: tuple[tuple[str, int, int], ...] = ()  # (suffix, data offset, size)
    error: str | None = None  # an error marker: the shard could not be walked past here


class ShardIndex:
    """The samples of ``url``; open until ``close`` (readers keep a few open)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._file: IO[bytes] | None = None
        self._tar: tarfile.TarFile | None = None
        self.samples: list[IndexedSample] = []
        self.compressed = False  # offsets are then in the decompressed stream: no ranged reads
        try:
            self._file = open_url(url)
            self._walk()
        except TAR_ERRORS as exc:
            self._mark_damaged(exc)

    def __len__(self) -> int:
        return len(self.samples)

    def _walk(self) -> None:
        head = self._file.read(8)
        self.compressed = head.startswith(COMPRESSED)
        self._file.seek(0)
        self._tar = tarfile.open(fileobj=self._file, mode="r:*")
        key, files = None, []
        end = 0
        while (member := self._tar.next()) is not None:
            self._tar.members = []  # the index is kept here, not in tarfile's list
            end = member.offset_data + member.size
            match = _NAME.match(member.name)
            if not member.isreg() or match is None or _META.match(member.name):
                continue
            base, suffix = match.group(1), match.group(2).lower()
            if base != key:
                self._add(key, files)
                key, files = base, []
            if any(suffix == name for name, _, _ in files):
                raise ValueError(f"{member.name}: duplicate file name in the tar file")
            files.append((suffix, member.offset_data, member.size))
        self._add(key, files)
        if not self.compressed:
            self._check_end(end)

    def _add(self, key: str | None, files: list) -> None:
        if key is not None and files:
            self.samples.append(IndexedSample(key, tuple(files)))

    def _check_end(self, data_end: int) -> None:
        size = self._file.seek(0, 2)
        if data_end > size:
            raise tarfile.ReadError("the archive ends inside a member's data: truncated")
        if size < END_BLOCKS:
            raise tarfile.ReadError("the archive ends without its end-of-archive blocks: truncated")
        self._file.seek(size - END_BLOCKS)
        if self._file.read(END_BLOCKS).count(0) != END_BLOCKS:
            raise tarfile.ReadError("the archive ends without its end-of-archive blocks: truncated")

    def _mark_damaged(self, exc: BaseException) -> None:
        self.samples.append(IndexedSample(f"{self.url}#read-error", error=_describe(exc)))

    def read(self, index: int) -> RawSample:
        """Sample ``index`` as webdataset yields it (``__key__``, ``__url__``, one bytes value per suffix)."""
        entry = self.samples[index]
        raw: dict[str, Any] = {"__key__": entry.key, "__url__": self.url}
        if entry.error is not None:
            return raw | {"__error__": entry.error}
        data_file = self._tar.fileobj  # the decompressed stream of a compressed tar
        try:
            for suffix, offset, size in entry.files:
                data_file.seek(offset)
                data = data_file.read(size)
                if len(data) != size:
                    raise tarfile.ReadError(f"unexpected end of data in {entry.key}.{suffix}")
                raw[suffix] = data
        except TAR_ERRORS as exc:
            return {"__key__": entry.key, "__url__": self.url, "__error__": _describe(exc)}
        return raw

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc.args[0] if exc.args else ''}"


def count_items(url: str) -> int:
    """Items of one shard in the canonical order: its samples, plus one marker if it is damaged."""
    index = ShardIndex(url)
    index.close()
    return len(index)
