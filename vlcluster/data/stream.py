"""Deterministic, resumable streams of raw samples over WebDataset shards.

One stream serves one reader: a rank without data-loader workers, or one
worker of a rank. Every epoch all readers apply the same seeded permutation
to the shard list and reader ``part`` of ``parts`` reads ``perm[part::parts]``,
so readers never overlap and together cover the epoch; their samples pass a
shuffle buffer seeded by (seed, epoch, part). The position is (epoch, items
yielded in it): a resumed stream replays the epoch's shard order and buffer
and skips that many raw items without decoding them.

A shard that cannot be read to its end (truncated or corrupt tar) does not
stop the stream: it yields the samples read before the damage and then one
marker item carrying ``__error__``. Markers travel through the shuffle buffer
and the position like samples, so the decoding side counts them exactly once
and a resumed stream sees them at the same places.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import random
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

from webdataset.tariterators import group_by_keys, tar_file_expander

from vlcluster.data.fields import FieldMap
from vlcluster.data.quality import BadDataError, BadSample, DataQuality
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


def _rng(*parts: object) -> random.Random:
    # String seeds go through SHA-512, so this is stable across processes and
    # Python versions (unlike hash() of a str).
    return random.Random(":".join(map(str, parts)))


def _shuffle_buffer(samples: Iterable[RawSample], size: int, rng: random.Random) -> Iterator[RawSample]:
    if size <= 1:
        yield from samples
        return
    buffer: list[RawSample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = sample
    rng.shuffle(buffer)
    yield from buffer


class SampleStream:
    """Infinite, deterministic, resumable stream of raw items for reader ``part`` of ``parts``.

    The stream is its own iterator: iterating again continues where it stopped.
    """

    def __init__(
        self,
        urls: Sequence[str],
        part: int,
        parts: int,
        seed: int | str,
        shuffle_buffer: int = 256,
    ) -> None:
        if parts < 1 or not 0 <= part < parts:
            raise ValueError(f"need 0 <= part < parts, got part={part}, parts={parts}")
        if len(urls) < parts:
            raise ValueError(
                f"{len(urls)} shard(s) cannot be split across {parts} readers: every reader "
                "needs at least one shard; write more, smaller shards"
            )
        self.urls = list(urls)
        self.part = part
        self.parts = parts
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.offset = 0
        self.at_epoch_end = False  # the last item returned ended an epoch
        self._iterator: Iterator[RawSample] | None = None

    def shards_for_epoch(self, epoch: int) -> list[str]:
        """This reader's shards in reading order for ``epoch``."""
        order = list(self.urls)
        _rng(self.seed, epoch, "shards").shuffle(order)
        return order[self.part :: self.parts]

    def _epoch_items(self, epoch: int) -> Iterator[RawSample]:
        raw = (item for url in self.shards_for_epoch(epoch) for item in shard_items(url))
        return _shuffle_buffer(raw, self.shuffle_buffer, _rng(self.seed, epoch, self.part, "buffer"))

    def _run(self) -> Iterator[RawSample]:
        while True:
            items = self._epoch_items(self.epoch)
            skipped = sum(1 for _ in itertools.islice(items, self.offset))
            if skipped < self.offset:
                raise ValueError(
                    f"resume offset {self.offset} exceeds epoch {self.epoch}'s {skipped} items "
                    f"of reader {self.part}; did the shards change?"
                )
            # One item of lookahead, so a reader knows it has just read the last
            # item of an epoch (and a reader of only bad data stops right there).
            item = next(items, None)
            while item is not None:
                following = next(items, None)
                self.offset += 1
                self.at_epoch_end = following is None
                item["__epoch__"] = self.epoch  # the caption draw depends on it (loader.draw_caption)
                yield item
                item = following
            self.at_epoch_end = False
            if self.offset == 0:
                raise BadDataError(
                    f"reader {self.part} found no samples at all in its shards {self.shards_for_epoch(self.epoch)} "
                    "(empty tar files?)"
                )
            self.epoch += 1
            self.offset = 0

    def __iter__(self) -> SampleStream:
        return self

    def __next__(self) -> RawSample:
        if self._iterator is None:
            self._iterator = self._run()
        return next(self._iterator)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "epoch" not in state or "offset" not in state:
            raise ValueError(
                f"the saved data position {state} is not one of a single shard source: data.train changed since the checkpoint"
            )
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or offset < 0:
            raise ValueError(f"invalid stream state {state}")
        if self._iterator is not None:
            self._iterator.close()  # closes the open shard
            self._iterator = None
        self.epoch, self.offset, self.at_epoch_end = epoch, offset, False


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
