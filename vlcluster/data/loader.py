"""The training data loader of one rank: decoded batches, exactly resumable
on any topology, with optional data-loader worker processes and bad-data
accounting.

The samples come in the run's canonical order (``order.py``), which does not
depend on the number of ranks or workers: the step at global position ``p``
trains on canonical positions ``[p, p + B)`` (``B`` = train.batch_size), rank
``r`` on its consecutive slice of them. With ``num_workers`` W > 0 the rank
runs W worker processes (a torch ``DataLoader`` over an ``IterableDataset``);
W = 0 decodes in the training process and behaves as one worker. Worker
``w`` makes the rank's batches of steps ``w, w + W, ...`` (counted from where
the loader started), so the DataLoader's round-robin hands them out in step
order. A worker reads only its items, seeking over the others in the tar
files (``tarindex.py``): nothing it skips is read or decoded. Each worker
decodes and stacks whole batches (one inter-process message per batch).

Every batch carries the global position after its step, so the main process
knows exactly what has been *consumed* (batches prefetched but not yet taken
are not part of it). The loader's state is that position (and, for a
mixture, how many positions each source served) plus the bad-data counts of
the consumed batches; it is the same on every rank, so a run resumes with any
number of ranks and workers and trains on the rest of the epoch exactly once.
What fixes the order (seed, shuffle_buffer, the shards and their item counts,
mixture weights) is saved with it; a resume under another order is refused.

A bad item (undecodable, missing a field, a damaged shard's marker) is counted
and dropped: it is not replaced by another item, since every position belongs
to one step, so a rank's batch of that step is smaller by one.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlcluster.data.augment import NO_AUGMENT, Augment
from vlcluster.data.fields import FieldMap
from vlcluster.data.mixture import ShardSource
from vlcluster.data.order import CanonicalOrder, Position, SourceOrder, rank_slices, refusal
from vlcluster.data.quality import FIELDS_HINT, BadDataError, BadSample, DataQuality, no_usable_samples
from vlcluster.data.rangedread import RangedReader, locate_shards
from vlcluster.data.shards import DEFAULT_FIELDS, decode_fields, normalise_images
from vlcluster.data.stream import RawSample
from vlcluster.data.tarindex import ShardIndex
from vlcluster.storage.paths import is_remote

log = logging.getLogger("vlcluster.data")

Decoder = Callable[[dict[str, Any], "int | None"], dict[str, Any]]

# Each skipped sample is logged with its shard and reason, up to this many per rank.
MAX_LOGGED_BAD = 100
# data.num_workers: auto stops here: decode rarely needs more per GPU.
MAX_AUTO_WORKERS = 8
# Steps whose items are being fetched while the current one decodes (per worker).
FETCH_AHEAD = 2


def resolve_workers(requested: int | str, cpus_per_node: int | None, ranks_per_node: int, shards: int, world_size: int) -> int:
    """Workers per rank for ``data.num_workers``: a number as given; ``auto``: the node's CPUs (the stage's
    ``resources.cpus_per_node``, else the CPUs this process may run on) shared by its ranks,
    one left to each rank's own process, at most ``MAX_AUTO_WORKERS``. Workers share shards
    (each reads its items of the canonical order), so the shard count sets no limit."""
    if requested != "auto":
        return int(requested)
    cpus = cpus_per_node or len(os.sched_getaffinity(0))
    by_cpus = cpus // max(ranks_per_node, 1) - 1
    return max(0, min(by_cpus, MAX_AUTO_WORKERS))


OBJECT_STORE_RUN = 16  # data.shuffle_run auto on an object store: a rank's slice of a step in a few requests


def resolve_shuffle_run(requested: int | str, sources: Sequence[ShardSource]) -> int:
    """``data.shuffle_run``: a number as given; ``auto``: ``OBJECT_STORE_RUN`` when any shard is on an object
    store (one ranged request per item would cost more CPU than decoding it: tools/bench/loader_s3.py), else 1
    (local reads cost nothing per item, and every item is shuffled on its own)."""
    if requested != "auto":
        return int(requested)
    return OBJECT_STORE_RUN if any(is_remote(url) for source in sources for url in source.urls) else 1


@dataclass(frozen=True)
class LoaderConfig:
    sources: tuple[ShardSource, ...]  # one source, or a weighted mixture (plain URLs: one source)
    rank: int
    rank_sizes: tuple[int, ...]  # every rank's share of the global batch
    seed: int
    shuffle_buffer: int
    image_size: int | None
    fields: FieldMap = DEFAULT_FIELDS
    augment: Augment = NO_AUGMENT
    uint8_images: bool = False  # ship pixels as uint8 [B, H, W, 3]; the trainer normalises on its device
    decode: Decoder | None = None  # a task's sample decoder; picklable for worker processes
    shuffle_run: int = 1  # the window is shuffled in runs of this many consecutive items (order.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", as_sources(self.sources))

    @property
    def global_batch(self) -> int:
        return sum(self.rank_sizes)

    def build_order(self) -> CanonicalOrder:
        """The canonical order of these sources (item counts from the index beside the shards: ``rangedread.py``)."""
        orders, locations = [], {}
        for index, source in enumerate(self.sources):
            seed = self.seed if len(self.sources) == 1 else f"{self.seed}:source{index}"
            counts, found = locate_shards(source.urls)
            locations.update(found)
            order = SourceOrder(source.urls, counts, seed, self.shuffle_buffer, self.shuffle_run)
            if order.epoch_items == 0:
                which = f"source {index + 1} of data.train" if len(self.sources) > 1 else "data.train"
                raise BadDataError(
                    f"{which} has no samples at all in its {len(source.urls)} shard(s) ({_shortlist(list(source.urls))}): empty tar files?"
                )
            orders.append(order)
        return CanonicalOrder(orders, [source.weight for source in self.sources], self.seed, self.shuffle_buffer, locations, self.shuffle_run)


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


def decode_items(
    raws: list[RawSample], image_size: int | None, shared: bool = False, fields: FieldMap = DEFAULT_FIELDS,
    augment: Augment = NO_AUGMENT, uint8_images: bool = False, decode: Decoder | None = None, seed: int | str = 0,
) -> dict[str, Any]:
    """The usable samples of ``raws``, stacked; bad ones counted in the batch and dropped.

    ``shared``: build the image tensor in shared memory, so passing it from a
    worker to the training process copies nothing. ``uint8_images``: images
    stay uint8 pixels ``[B, H, W, 3]`` (normalised later, on the device).
    ``decode``: a task's sample decoder (default: the image-caption decoder
    with ``fields``, ``augment`` and one caption drawn per sample).
    Raises ``BadDataError`` (counting the causes) when not one is usable.
    """
    samples: list[dict[str, Any]] = []
    quality, skipped = DataQuality(), []
    for raw in raws:
        quality.read += 1
        try:
            if decode is not None:
                samples.append(decode(raw, image_size))
            else:
                draw = sample_seed(seed, raw)
                sample = decode_fields(raw, image_size, fields, augment, draw)
                sample["caption"] = draw_caption(sample["captions"], draw)
                sample["draw"] = draw
                samples.append(sample)
        except BadSample as bad:
            quality.record(raw["__url__"], bad.reason, bad.cause)
            skipped.append((raw["__url__"], raw["__key__"], bad.reason, bad.detail[:200]))
    if not samples:
        shards = sorted({raw["__url__"] for raw in raws})
        raise no_usable_samples(f"a batch of {len(raws)} item(s) from {len(shards)} shard(s) ({_shortlist(shards)}) came", quality, FIELDS_HINT)
    stacked = stack_samples(samples, shared) if decode is not None else stack_pretraining(samples, len(samples), shared, uint8_images)
    return {
        **stacked,
        "read": quality.read,
        "bad": quality.state_dict()["bad"],
        "causes": dict(quality.causes),
        "skipped": skipped,
    }


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
        "draw": [s["draw"] for s in samples],  # per-sample seeds: VQA question draws (batches.BatchBuilder)
    }


def stack_samples(samples: list[dict[str, Any]], shared: bool = False) -> dict[str, Any]:
    """Decoded samples -> ``image`` (float32 [B, ..., 3, H, W]) plus one list per other field."""
    pixels = torch.from_numpy(np.stack([s["pixels"] for s in samples]))
    images = torch.empty((*pixels.shape[:-3], 3, *pixels.shape[-3:-1]), dtype=torch.float32)
    stacked = {"image": normalise_images(pixels, images.share_memory_() if shared else images)}
    return stacked | {name: [s[name] for s in samples] for name in samples[0] if name != "pixels"}


class _ItemReader:
    """Raw items of the canonical order: indexed shards by ranged reads (``rangedread.py``); the others
    (compressed, or without an index) walked and read by seeking, those of a shuffle window open at a time."""

    def __init__(self, order: CanonicalOrder) -> None:
        self.order = order
        self.ranged = RangedReader({url: at for url, at in order.locations.items() if not at.entry.compressed})
        self.open: dict[str, ShardIndex] = {}
        self.lock = threading.Lock()
        # Fewer open shards than a window of every source spans would index shards again and again.
        self.capacity = sum(source.shards_per_window() for source in order.sources) + 1

    def read_many(self, served: list[tuple[int, int]]) -> list[RawSample]:
        """The items at ``(source, source position)``, in that order (from FETCH_AHEAD threads at once:
        the order's caches, the node cache and walked shards are used under ``lock``, the ranged reads not)."""
        with self.lock:
            located = []
            for source, position in served:
                epoch, shard, item = self.order.sources[source].locate(position)
                located.append((epoch, self.order.sources[source].urls[shard], item))
        self._prefetch(served)
        ranged = [(url, item) for _, url, item in located if url in self.ranged.locations]
        fetched = iter(self.ranged.fetch(ranged, self.lock)) if ranged else iter(())
        raws = []
        for epoch, url, item in located:
            if url in self.ranged.locations:
                raw = next(fetched)
            else:
                with self.lock:
                    raw = self._walked(url).read(item)
            raw["__epoch__"] = epoch  # the caption draw depends on it (draw_caption)
            raws.append(raw)
        return raws

    def _prefetch(self, served: list[tuple[int, int]]) -> None:
        """Have the node cache fetch the shards of the window this step starts in and of one window after it."""
        if self.ranged.cache.directory is None or not served:
            return
        first: dict[int, int] = {}
        for source, position in served:
            first.setdefault(source, position)
        with self.lock:  # FETCH_AHEAD threads at once: one plans the downloads at a time
            coming = [
                self.order.sources[source].urls[shard]
                for source, position in first.items()
                for shard in self.order.sources[source].coming_shards(position, self.order.sources[source].window)
            ]
            self.ranged.cache.prefetch([url for url in coming if url in self.ranged.locations])

    def _walked(self, url: str) -> ShardIndex:
        if url in self.open:
            self.open[url] = self.open.pop(url)  # most recently used last
        else:
            if len(self.open) >= self.capacity:
                self.open.pop(next(iter(self.open))).close()
            self.open[url] = ShardIndex(url)
        return self.open[url]

    def close(self) -> None:
        self.ranged.close()
        for index in self.open.values():
            index.close()
        self.open.clear()


class _WorkerBatches(IterableDataset):
    """What each DataLoader worker (or the main process, without workers) iterates:
    the rank's batches of every ``workers``-th step from ``start``."""

    def __init__(self, config: LoaderConfig, order: CanonicalOrder, start: Position) -> None:
        self.config, self.order, self.start = config, order, start

    def _steps(self, worker: int, workers: int):
        """(step, position, position after it, the rank's (source, source position) items) of this worker's steps."""
        config, order = self.config, self.order
        offset, size = rank_slices(config.rank_sizes)[config.rank]
        position, step = self.start, 0
        while True:
            end = order.skip(position, config.global_batch)
            if step % workers == worker:
                yield step, position, end, order.walk(order.skip(position, offset), size)[0]
            position, step = end, step + 1

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        config = self.config
        reader = _ItemReader(self.order)
        steps = self._steps(worker, workers)
        # The next FETCH_AHEAD steps' bytes are fetched while this one is awaited and decoded: object-store
        # latency (two round trips a step: member records, then items) hides behind the work.
        with ThreadPoolExecutor(FETCH_AHEAD) as fetcher:
            pending: deque = deque()
            try:
                while True:
                    while len(pending) < FETCH_AHEAD + 1:
                        following = next(steps)
                        pending.append((following, fetcher.submit(reader.read_many, following[3])))
                    (step, position, end, _), future = pending.popleft()
                    raws = future.result()
                    try:
                        batch = decode_items(
                            raws, config.image_size, info is not None,
                            config.fields, config.augment, config.uint8_images, config.decode, config.seed,
                        )
                    except BadDataError as exc:
                        # Passed as data: the DataLoader would wrap a raised one in its worker traceback.
                        yield {"error": f"rank {config.rank}, step at data position {position.position}: {exc}", "step": step}
                        return
                    yield {**batch, "step": step, "end": end.state_dict()}
            except BadDataError as exc:  # a shard that does not match its index
                yield {"error": f"rank {config.rank}, step at data position {position.position}: {exc}", "step": step}
            finally:
                for _, future in pending:
                    future.cancel()
                fetcher.shutdown(wait=True)
                reader.close()


def _keep_workers_alive_on_stop_signals(_: int) -> None:
    # A requeue or preemption signals every process of the job; the rank
    # finishes its step and checkpoints, and needs its workers until then.
    # They exit with the rank (the DataLoader shuts them down or they see it die).
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


class TrainLoader:
    """Decoded batches for one rank; ``state_dict`` is the exact consumed global position."""

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
        rank_sizes: Sequence[int] | None = None,
        shuffle_run: int = 1,
    ) -> None:
        """``batch_size``: this rank's share of a step; ``rank_sizes``: every rank's (default: ``batch_size`` each)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        sizes = tuple(rank_sizes) if rank_sizes is not None else (batch_size,) * world_size
        if len(sizes) != world_size or sizes[rank] != batch_size:
            raise ValueError(f"rank_sizes {sizes} do not give rank {rank} of {world_size} its batch of {batch_size}")
        self.config = LoaderConfig(
            as_sources(urls), rank, sizes, seed, shuffle_buffer, image_size, fields, augment, uint8_images, decode, shuffle_run
        )
        self.num_workers = num_workers
        self.pin_memory = pin_memory  # page-locked batches: host-to-device copies run asynchronously
        self._order: CanonicalOrder | None = None
        self.position: Position | None = None  # None: the start of the order
        self.next_step = 0  # steps consumed since the worker processes started
        self.quality = DataQuality()
        self._logged_bad = 0
        self._iterator = None

    @property
    def order(self) -> CanonicalOrder:
        if self._order is None:
            self._order = self.config.build_order()
        return self._order

    def _start(self):
        if self.position is None:
            self.position = self.order.start
        dataset = _WorkerBatches(self.config, self.order, self.position)
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
        self.next_step = 0
        return iter(loader)

    def next_batch(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        if "error" in batch:
            raise BadDataError(batch["error"])
        step = batch.pop("step")
        if step != self.next_step:
            raise RuntimeError(f"rank {self.config.rank}: got the batch of step {step}, expected {self.next_step}")
        self.next_step += 1
        self.position = Position.from_state(batch.pop("end"), len(self.config.sources))
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
        """The consumed global position (the same on every rank), what fixes the order, and this rank's bad-data counts."""
        position = self.position or self.order.start
        return {**position.state_dict(), "order": self.order.fingerprint(), "quality": self.quality.state_dict()}

    def load_state_dict(self, state: dict[str, Any], quality: DataQuality | None = None) -> None:
        """Continue from a saved position; ``quality``: the counts to continue from (default: the state's own)."""
        if "order" not in state:
            raise ValueError(
                "the checkpoint's data position is one per data-loader worker, as written before the canonical data "
                "order: it cannot be continued. Remove the stage's checkpoints to start it over"
            )
        problem = refusal(state["order"], self.order.fingerprint())
        if problem is not None:
            raise ValueError(
                f"the checkpoint's data position belongs to another sample order: {problem}. Set it back to resume, "
                "or remove the stage's checkpoints to start it over"
            )
        self.close()
        self.position = Position.from_state(state, len(self.config.sources))
        self.quality = quality if quality is not None else DataQuality.from_state(state.get("quality", {}))
