"""Shard URLs, deterministic resumable sample streams and batch decoding.

Shards are WebDataset tars read through fsspec, so local paths and any
fsspec scheme (s3://, gs://, memory://, ...) work the same way.
"""

from __future__ import annotations

import io
import itertools
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from vlcluster.storage import shardlist

RawSample = dict[str, Any]


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs of brace patterns, globs and prefixes (see vlcluster.storage.shardlist)."""
    return shardlist.expand(spec)


def missing_shards(urls: Sequence[str]) -> list[str]:
    """The URLs that do not exist (one listing per parent directory)."""
    return shardlist.missing(urls)


def open_url(url: str) -> IO[bytes]:
    """Open ``url`` for binary reading (through the shard cache if configured); the caller closes it."""
    return shardlist.open_input(url)


def _shard_samples(url: str) -> Iterator[RawSample]:
    """Raw samples of one tar shard, in file order (webdataset does the tar parsing)."""
    with open_url(url) as stream:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


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
    """Infinite, deterministic, resumable stream of raw samples for one rank.

    Each epoch all ranks apply the same seeded permutation to the shard list and
    rank ``r`` reads ``perm[r::world_size]``; its samples then pass a shuffle buffer
    seeded by (seed, epoch, rank). The position is (epoch, samples yielded in it), so
    a resumed stream replays the epoch and skips that many raw (undecoded) samples.
    The stream is its own iterator: iterating again continues where it stopped.
    """

    def __init__(
        self,
        urls: Sequence[str],
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int = 256,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if len(urls) < world_size:
            raise ValueError(
                f"{len(urls)} shard(s) cannot be split across {world_size} ranks: every rank "
                "needs at least one shard; write more, smaller shards"
            )
        self.urls = list(urls)
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.offset = 0
        self._iterator: Iterator[RawSample] | None = None

    def shards_for_epoch(self, epoch: int) -> list[str]:
        """This rank's shards in reading order for ``epoch``."""
        order = list(self.urls)
        _rng(self.seed, epoch, "shards").shuffle(order)
        return order[self.rank :: self.world_size]

    def _epoch_samples(self, epoch: int) -> Iterator[RawSample]:
        raw = (s for url in self.shards_for_epoch(epoch) for s in _shard_samples(url))
        return _shuffle_buffer(raw, self.shuffle_buffer, _rng(self.seed, epoch, self.rank, "buffer"))

    def _run(self) -> Iterator[RawSample]:
        while True:
            samples = self._epoch_samples(self.epoch)
            skipped = sum(1 for _ in itertools.islice(samples, self.offset))
            if skipped < self.offset:
                raise ValueError(
                    f"resume offset {self.offset} exceeds epoch {self.epoch}'s {skipped} samples "
                    f"on rank {self.rank}; did the shards change?"
                )
            for sample in samples:
                self.offset += 1
                yield sample
            if self.offset == 0:
                raise RuntimeError(f"rank {self.rank} read no samples in epoch {self.epoch}: empty shards?")
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
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or offset < 0:
            raise ValueError(f"invalid stream state {state}")
        if self._iterator is not None:
            self._iterator.close()  # closes the open shard
            self._iterator = None
        self.epoch, self.offset = epoch, offset


def _image_tensor(image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))
    return pixels.permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)  # == (x/255 - 0.5) / 0.5


def decode_sample(raw: RawSample, image_size: int | None = None) -> dict[str, Any]:
    """Decode a raw sample; the image becomes float32 ``[3, H, W]`` in [-1, 1].

    No random augmentation: flips or colour jitter would contradict the text.
    """
    image = Image.open(io.BytesIO(raw["png"])).convert("RGB")
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    meta = json.loads(raw["json"])
    return {
        "key": raw["__key__"],
        "image": _image_tensor(image),
        "caption": raw["txt"].decode("utf-8"),
        "qa": [tuple(pair) for pair in meta["qa"]],
        "objects": [tuple(obj) for obj in meta["objects"]],
    }


class BatchLoader:
    """Decoded, stacked batches from a ``SampleStream``; its state is the stream's (exact)."""

    def __init__(self, stream: SampleStream, batch_size: int, image_size: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.stream = stream
        self.batch_size = batch_size
        self.image_size = image_size

    def next_batch(self) -> dict[str, Any]:
        samples = [
            decode_sample(raw, self.image_size)
            for raw in itertools.islice(self.stream, self.batch_size)
        ]
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "caption": [s["caption"] for s in samples],
            "qa": [s["qa"] for s in samples],
            "key": [s["key"] for s in samples],
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)


def eval_samples(urls: Sequence[str], image_size: int | None = None) -> Iterator[dict[str, Any]]:
    """Every sample of ``urls`` in file order, decoded (single-process evaluation)."""
    for url in urls:
        for raw in _shard_samples(url):
            yield decode_sample(raw, image_size)
