"""Raw samples of WebDataset shards in file order, streamed (evaluation,
Gram statistics, importers); training reads them by index instead
(``tarindex.py``, in the canonical order of ``order.py``).

A shard that cannot be read to its end (truncated or corrupt tar) does not
stop the stream: it yields the samples read before the damage and then one
marker item carrying ``__error__``, so the decoding side counts it as a bad
sample.
"""

from __future__ import annotations

import gzip
import logging
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from typing import IO, Any

from webdataset.tariterators import group_by_keys, tar_file_expander

from vlcluster.data.fields import FieldMap
from vlcluster.data.quality import BadSample, DataQuality
from vlcluster.data.shards import DEFAULT_FIELDS, decode_sample
from vlcluster.storage.shardlist import open_input as open_url

RawSample = dict[str, Any]

log = logging.getLogger("vlcluster.data")

# What a damaged archive raises while it is parsed. I/O errors of the store
# (network, permissions) are not among them: they are not a property of the
# data, would not repeat on a replay, and so must not be skipped silently.
TAR_ERRORS = (tarfile.TarError, EOFError, ValueError, gzip.BadGzipFile, zlib.error)


class _EndCheckedReader:
    """Passes reads through and remembers the first and last bytes of the file.

    Python's tarfile takes a tar cut off at a header boundary for a complete
    one and just stops; a complete uncompressed tar ends with at least two
    zero blocks, which is how the cut is noticed. (A cut compressed tar
    fails in the decompressor instead.)
    """

    TAIL = 1024
    COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.head, self.tail = raw, b"", b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if len(self.head) < 8:
            self.head += data[: 8 - len(self.head)]
        self.tail = data[-self.TAIL :] if len(data) >= self.TAIL else (self.tail + data)[-self.TAIL :]
        return data

    def check_complete(self) -> None:
        while self.read(1 << 16):
            pass
        if self.head.startswith(self.COMPRESSED):
            return
        if len(self.tail) < self.TAIL or self.tail.count(0) != self.TAIL:
            raise tarfile.ReadError("the archive ends without its end-of-archive blocks: truncated")


def shard_items(url: str) -> Iterator[RawSample]:
    """Samples of one tar shard in file order, then one error marker if the tar is damaged."""
    try:
        with open_url(url) as raw:
            stream = _EndCheckedReader(raw)
            yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
            stream.check_complete()
    except TAR_ERRORS as exc:
        yield {"__key__": f"{url}#read-error", "__url__": url, "__error__": f"{type(exc).__name__}: {exc.args[0] if exc.args else ''}"}


def eval_samples(
    urls: Sequence[str], image_size: int | None = None, quality: DataQuality | None = None, fields: FieldMap = DEFAULT_FIELDS
) -> Iterator[dict[str, Any]]:
    """Every usable sample of ``urls`` in file order, decoded (evaluation, Gram statistics).

    Bad items are skipped like in training: logged, and counted per shard and
    reason in ``quality`` when one is given."""
    quality = quality if quality is not None else DataQuality()
    for url in urls:
        for raw in shard_items(url):
            quality.read += 1
            try:
                yield decode_sample(raw, image_size, fields)
            except BadSample as bad:
                quality.record(url, bad.reason, bad.cause)
                log.warning("skipped a bad sample (%s): %s in %s: %s", bad.reason, raw["__key__"], url, bad.detail[:200])
