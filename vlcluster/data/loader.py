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

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlcluster.data.quality import BadDataError, BadSample, DataQuality
from vlcluster.data.shards import decode_fields, normalise_images
from vlcluster.data.stream import SampleStream

log = logging.getLogger("vlcluster.data")

Decoder = Callable[[dict[str, Any], "int | None"], dict[str, Any]]

# Each skipped sample is logged with its shard and reason, up to this many per rank.
MAX_LOGGED_BAD = 100


@dataclass(frozen=True)
class LoaderConfig:
    urls: tuple[str, ...]
    rank: int
    world_size: int
    seed: int
    shuffle_buffer: int
    batch_size: int
    image_size: int | None
    workers: int  # logical workers (readers) per rank, >= 1
    decode: Decoder | None = None  # a task's sample decoder; picklable for worker processes

    def stream(self, worker: int) -> SampleStream:
        return SampleStream(
            self.urls, self.rank * self.workers + worker, self.world_size * self.workers, self.seed, self.shuffle_buffer
        )


def decode_batch(
    stream: SampleStream, batch_size: int, image_size: int | None, shared: bool = False, decode: Decoder | None = None
) -> dict[str, Any]:
    """The next ``batch_size`` good samples of ``stream``, stacked; skipped ones counted in the batch.

    ``shared``: build the image tensor in shared memory, so passing it from a
    worker to the training process copies nothing. ``decode``: a task's sample
    decoder (default: the pre-training image-caption decoder).
    """
    decode = decode or decode_fields
    samples: list[dict[str, Any]] = []
    quality, skipped = DataQuality(), []
    first_epoch = stream.epoch
    while len(samples) < batch_size:
        raw = next(stream)
        quality.read += 1
        try:
            samples.append(decode(raw, image_size))
        except BadSample as bad:
            quality.record(raw["__url__"], bad.reason)
            skipped.append((raw["__url__"], raw["__key__"], bad.reason, bad.detail[:200]))
        if not samples and stream.epoch > first_epoch + 1:
            raise BadDataError(
                f"reader {stream.part} read a whole epoch without one usable sample from its shards "
                f"{stream.shards_for_epoch(first_epoch + 1)}"
            )
    return {
        **stack_samples(samples, shared),
        "read": quality.read,
        "bad": quality.state_dict()["bad"],
        "skipped": skipped,
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
            batch = decode_batch(
                stream, self.config.batch_size, self.config.image_size, shared=info is not None, decode=self.config.decode
            )
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
        urls: list[str],
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int,
        batch_size: int,
        image_size: int | None = None,
        num_workers: int = 0,
        decode: Decoder | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        workers = max(1, num_workers)
        if len(urls) < world_size * workers:
            raise ValueError(
                f"{len(urls)} training shard(s) cannot be split across {world_size} rank(s) x {workers} "
                "data-loader worker(s): every worker reads its own shards; write more, smaller shards "
                "or lower data.num_workers"
            )
        self.config = LoaderConfig(tuple(urls), rank, world_size, seed, shuffle_buffer, batch_size, image_size, workers, decode)
        self.num_workers = num_workers
        self.positions = [{"epoch": 0, "offset": 0} for _ in range(workers)]
        self.next_worker = 0
        self.quality = DataQuality()
        self._logged_bad = 0
        self._iterator = None

    def _start(self):
        dataset = _WorkerBatches(self.config, [dict(p) for p in self.positions], self.next_worker)
        loader = DataLoader(
            dataset,
            batch_size=None,  # workers batch themselves
            num_workers=self.num_workers,
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
        worker = batch.pop("worker")
        if worker != self.next_worker:
            raise RuntimeError(f"rank {self.config.rank}: got a batch of worker {worker}, expected {self.next_worker}")
        self.positions[worker] = batch.pop("position")
        self.next_worker = (worker + 1) % self.config.workers
        self._account(batch.pop("read"), batch.pop("bad"), batch.pop("skipped"))
        return batch

    def _account(self, read: int, bad: dict, skipped: list) -> None:
        self.quality.add(DataQuality.from_state({"read": read, "bad": bad}))
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
            "workers": [dict(p) for p in self.positions],
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
        self.close()
        self.positions = [{"epoch": int(p["epoch"]), "offset": int(p["offset"])} for p in state["workers"]]
        self.next_worker = int(state["next_worker"]) % self.config.workers
        self.quality = DataQuality.from_state(state.get("quality", {}))
