"""The training data loader of one rank: decoded batches, exactly resumable,
with optional data-loader worker processes and bad-data accounting.

With ``num_workers`` W > 0 the rank runs W worker processes (a torch
``DataLoader`` over an ``IterableDataset``); W = 0 decodes in the training
process and behaves as one worker. Worker ``w`` of rank ``r`` is reader
``r * W + w`` of ``world_size * W`` (see ``stream.SampleStream``): its own
disjoint shards and its own seeded shuffle buffer. Each worker decodes and
stacks whole batches (one inter-process message per batch, not per sample)
and skips bad samples until its batch is full. Worker streams are infinite,
so the DataLoader hands out their batches in a fixed round-robin order:
batch ``k`` of the rank comes from worker ``(first + k) mod W``.

Every batch carries the worker that made it and that worker's stream
position after it, so the main process knows exactly what has been
*consumed* (batches prefetched but not yet taken are not part of it). The
loader's state is one (epoch, offset) per worker, the worker whose batch
comes next, and the bad-data counts of the consumed batches. On resume each
worker replays its epoch and skips to its offset, and the round-robin starts
at the saved worker, so the rank sees exactly the batches of an
uninterrupted run.

Changing the number of workers changes which reader reads which shard, so a
state saved with W workers is refused (a clear error) by a loader with
another W; 0 and 1 are the same layout. Changing the number of ranks is
refused by the trainer for the same reason.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlcluster.data.augment import NO_AUGMENT, Augment
from vlcluster.data.fields import FieldMap
from vlcluster.data.mixture import MixedStream, ShardSource
from vlcluster.data.quality import FIELDS_HINT, BadDataError, BadSample, DataQuality, no_usable_samples
from vlcluster.data.shards import DEFAULT_FIELDS, decode_fields, normalise_images
from vlcluster.data.stream import SampleStream

log = logging.getLogger("vlcluster.data")

Decoder = Callable[[dict[str, Any], "int | None"], dict[str, Any]]

# Each skipped sample is logged with its shard and reason, up to this many per rank.
MAX_LOGGED_BAD = 100
# data.num_workers: auto stops here: decode rarely needs more per GPU, and each worker holds a shuffle buffer.
MAX_AUTO_WORKERS = 8


def resolve_workers(requested: int | str, cpus_per_node: int | None, ranks_per_node: int, shards: int, world_size: int) -> int:
    """Workers per rank for ``data.num_workers``: a number as given; ``auto``: the node's CPUs (the stage's
    ``resources.cpus_per_node``, else the CPUs this process may run on) shared by its ranks,
    one left to each rank's own process, at most ``MAX_AUTO_WORKERS`` and at most as many
    as the shards allow (every worker of every rank reads its own)."""
    if requested != "auto":
        return int(requested)
    cpus = cpus_per_node or len(os.sched_getaffinity(0))
    by_cpus = cpus // max(ranks_per_node, 1) - 1
    return max(0, min(by_cpus, MAX_AUTO_WORKERS, shards // max(world_size, 1)))


@dataclass(frozen=True)
class LoaderConfig:
    sources: tuple[ShardSource, ...]  # one source, or a weighted mixture (plain URLs: one source)
    rank: int
    world_size: int
    seed: int
    shuffle_buffer: int
    batch_size: int
    image_size: int | None
    workers: int  # logical workers (readers) per rank, >= 1
    fields: FieldMap = DEFAULT_FIELDS
    augment: Augment = NO_AUGMENT
    uint8_images: bool = False  # ship pixels as uint8 [B, H, W, 3]; the trainer normalises on its device
    decode: Decoder | None = None  # a task's sample decoder; picklable for worker processes

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", as_sources(self.sources))

    def stream(self, worker: int) -> SampleStream | MixedStream:
        part, parts = self.rank * self.workers + worker, self.world_size * self.workers
        if len(self.sources) == 1:
            return SampleStream(self.sources[0].urls, part, parts, self.seed, self.shuffle_buffer)
        return MixedStream(self.sources, part, parts, self.seed, self.shuffle_buffer)


def as_sources(sources: Sequence[str] | Sequence[ShardSource]) -> tuple[ShardSource, ...]:
    """Plain shard URLs are one source of weight 1."""
    if all(isinstance(source, ShardSource) for source in sources):
        return tuple(sources)
    return (ShardSource(tuple(sources)),)


def sample_seed(seed: int | str, raw: dict[str, Any]) -> str:
    """The seed of a sample's random choices (caption, augmentation) in this epoch: a pure
    function of (seed, epoch, shard, key), so a resumed run makes the same ones."""
    return f"{seed}:{raw.get('__epoch__', 0)}:{raw['__url__']}:{raw['__key__']}"


def draw_caption(captions: list[str], seed: str) -> str:
    """One of a sample's captions; each epoch may draw another."""
    if len(captions) == 1:
        return captions[0]
    return captions[random.Random(f"{seed}:caption").randrange(len(captions))]


def _read_a_pass(stream: SampleStream | MixedStream, start: tuple[int, int]) -> bool:
    """Whether ``stream`` has read a whole epoch's worth since ``start`` (epoch, offset)."""
    epoch, offset = start
    if offset == 0 and stream.epoch == epoch:
        return stream.at_epoch_end
    return stream.epoch > epoch + 1 or (stream.epoch > epoch and stream.offset >= offset)


def decode_batch(
    stream: SampleStream | MixedStream, batch_size: int, image_size: int | None, shared: bool = False,
    fields: FieldMap = DEFAULT_FIELDS, augment: Augment = NO_AUGMENT, uint8_images: bool = False,
    decode: Decoder | None = None,
) -> dict[str, Any]:
    """The next ``batch_size`` good samples of ``stream``, stacked; skipped ones counted in the batch.

    ``shared``: build the image tensor in shared memory, so passing it from a
    worker to the training process copies nothing. ``uint8_images``: images
    stay uint8 pixels ``[B, H, W, 3]`` (normalised later, on the device). A
    reader that reads a whole pass over its shards without one usable sample
    stops with a ``BadDataError`` that counts the causes.
    ``decode``: a task's sample decoder (default: the image-caption decoder
    with ``fields``, ``augment`` and one caption drawn per sample).
    """
    samples: list[dict[str, Any]] = []
    quality, skipped = DataQuality(), []
    start = (stream.epoch, stream.offset)
    while len(samples) < batch_size:
        raw = next(stream)
        quality.read += 1
        try:
            if decode is not None:
                samples.append(decode(raw, image_size))
            else:
                seed = sample_seed(stream.seed, raw)
                sample = decode_fields(raw, image_size, fields, augment, seed)
                sample["caption"] = draw_caption(sample["captions"], seed)
                samples.append(sample)
        except BadSample as bad:
            quality.record(raw["__url__"], bad.reason, bad.cause)
            skipped.append((raw["__url__"], raw["__key__"], bad.reason, bad.detail[:200]))
            if not samples and _read_a_pass(stream, start):
                shards = stream.shards_for_epoch(start[0])
                raise no_usable_samples(
                    f"reader {stream.part} read one pass over its {len(shards)} shard(s) ({_shortlist(shards)})",
                    quality, FIELDS_HINT,
                )
    stacked = stack_samples(samples, shared) if decode is not None else stack_pretraining(samples, batch_size, shared, uint8_images)
    return {
        **stacked,
        "read": quality.read,
        "bad": quality.state_dict()["bad"],
        "causes": dict(quality.causes),
        "skipped": skipped,
    }


def _copied(positions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return json.loads(json.dumps(positions))


def _shortlist(urls: list[str], shown: int = 3) -> str:
    return ", ".join(urls[:shown]) + (f" and {len(urls) - shown} more" if len(urls) > shown else "")


def stack_pretraining(samples: list[dict[str, Any]], batch_size: int, shared: bool, uint8_images: bool) -> dict[str, Any]:
    """Image-caption samples -> ``image`` (uint8 pixels, or normalised float32) plus captions, VQA pairs and keys."""
    if uint8_images:  # stacked straight into the (shared) tensor: one copy
        image = torch.empty((batch_size, *samples[0]["pixels"].shape), dtype=torch.uint8)
        np.stack([s["pixels"] for s in samples], out=(image.share_memory_() if shared else image).numpy())
    else:
        pixels = torch.from_numpy(np.stack([s["pixels"] for s in samples]))
        images = torch.empty((batch_size, 3, *pixels.shape[1:3]), dtype=torch.float32)
        image = normalise_images(pixels, images.share_memory_() if shared else images)
    return {
        "image": image,
        "caption": [s["caption"] for s in samples],
        "qa": [s.get("qa") for s in samples],
        "key": [s["key"] for s in samples],
    }


def stack_samples(samples: list[dict[str, Any]], shared: bool = False) -> dict[str, Any]:
    """Decoded samples -> ``image`` (float32 [B, ..., 3, H, W]) plus one list per other field."""
    pixels = torch.from_numpy(np.stack([s["pixels"] for s in samples]))
    images = torch.empty((*pixels.shape[:-3], 3, *pixels.shape[-3:-1]), dtype=torch.float32)
    stacked = {"image": normalise_images(pixels, images.share_memory_() if shared else images)}
    return stacked | {name: [s[name] for s in samples] for name in samples[0] if name != "pixels"}


class _WorkerBatches(IterableDataset):
    """What each DataLoader worker (or the main process, without workers) iterates."""

    def __init__(self, config: LoaderConfig, positions: list[dict[str, int]], first_worker: int) -> None:
        self.config, self.positions, self.first_worker = config, positions, first_worker

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.first_worker) % self.config.workers
        stream = self.config.stream(worker)
        stream.load_state_dict(self.positions[worker])
        while True:
            try:
                config = self.config
                batch = decode_batch(
                    stream, config.batch_size, config.image_size, info is not None, config.fields, config.augment,
                    config.uint8_images, config.decode,
                )
            except BadDataError as exc:
                # Passed as data: the DataLoader would wrap a raised one in its worker traceback.
                yield {"error": str(exc), "worker": worker}
                return
            yield {**batch, "worker": worker, "position": stream.state_dict()}


def _keep_workers_alive_on_stop_signals(_: int) -> None:
    # A requeue or preemption signals every process of the job; the rank
    # finishes its step and checkpoints, and needs its workers until then.
    # They exit with the rank (the DataLoader shuts them down or they see it die).
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


class TrainLoader:
    """Decoded batches for one rank; ``state_dict`` is the exact consumed position."""

    def __init__(
        self,
        urls: Sequence[str] | Sequence[ShardSource],
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int,
        batch_size: int,
        image_size: int | None = None,
        num_workers: int = 0,
        fields: FieldMap = DEFAULT_FIELDS,
        augment: Augment = NO_AUGMENT,
        pin_memory: bool = False,
        uint8_images: bool = False,
        decode: Decoder | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        workers = max(1, num_workers)
        sources = as_sources(urls)
        for index, source in enumerate(sources):
            if len(source.urls) < world_size * workers:
                which = f"source {index + 1} of data.train has" if len(sources) > 1 else "there are"
                raise ValueError(
                    f"{which} {len(source.urls)} training shard(s), which cannot be split across {world_size} rank(s) x "
                    f"{workers} data-loader worker(s): every worker reads its own shards; write more, smaller shards "
                    "or lower data.num_workers"
                )
        self.config = LoaderConfig(
            sources, rank, world_size, seed, shuffle_buffer, batch_size, image_size, workers, fields, augment, uint8_images, decode
        )
        self.num_workers = num_workers
        self.positions = [self.config.stream(worker).state_dict() for worker in range(workers)]
        self.pin_memory = pin_memory  # page-locked batches: host-to-device copies run asynchronously
        self.next_worker = 0
        self.quality = DataQuality()
        self._logged_bad = 0
        self._iterator = None

    def _start(self):
        dataset = _WorkerBatches(self.config, _copied(self.positions), self.next_worker)
        loader = DataLoader(
            dataset,
            batch_size=None,  # workers batch themselves
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=_keep_workers_alive_on_stop_signals if self.num_workers else None,
            # Its own generator: creating the iterator must not draw from the
            # global torch RNG, which is part of the training state.
            generator=torch.Generator(),
        )
        return iter(loader)

    def next_batch(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        if "error" in batch:
            raise BadDataError(batch["error"])
        worker = batch.pop("worker")
        if worker != self.next_worker:
            raise RuntimeError(f"rank {self.config.rank}: got a batch of worker {worker}, expected {self.next_worker}")
        self.positions[worker] = batch.pop("position")
        self.next_worker = (worker + 1) % self.config.workers
        self._account(batch.pop("read"), batch.pop("bad"), batch.pop("causes"), batch.pop("skipped"))
        return batch

    def _account(self, read: int, bad: dict, causes: dict, skipped: list) -> None:
        self.quality.add(DataQuality.from_state({"read": read, "bad": bad, "causes": causes}))
        for url, key, reason, detail in skipped:
            self._logged_bad += 1
            if self._logged_bad <= MAX_LOGGED_BAD:
                log.warning("rank %d skipped a bad sample (%s): %s in %s: %s", self.config.rank, reason, key, url, detail)
            if self._logged_bad == MAX_LOGGED_BAD:
                log.warning("rank %d: further bad samples are counted but not logged", self.config.rank)

    def close(self) -> None:
        """Stop the worker processes (dropping the iterator shuts them down)."""
        self._iterator = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "workers": _copied(self.positions),
            "next_worker": self.next_worker,
            "quality": self.quality.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "workers" not in state:  # a single-stream position {epoch, offset} of earlier versions
            state = {"workers": [state], "next_worker": 0}
        saved = len(state["workers"])
        if saved != self.config.workers:
            raise ValueError(
                f"the checkpoint's data position is for {saved} data-loader worker(s) per rank, this run has "
                f"{self.config.workers} (data.num_workers; 0 and 1 are the same): each worker reads its own "
                f"shards, so the sample order would change. Set data.num_workers back to {saved} to resume, "
                "or remove the stage's checkpoints to start it over"
            )
        for worker, position in enumerate(state["workers"]):
            self.config.stream(worker).load_state_dict(position)  # refuses a position of another data.train
        self.close()
        self.positions = _copied(state["workers"])
        self.next_worker = int(state["next_worker"]) % self.config.workers
        self.quality = DataQuality.from_state(state.get("quality", {}))
