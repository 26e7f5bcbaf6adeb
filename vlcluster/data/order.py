"""The canonical sample order of a training run, and its global position.

The order depends on the data, ``seed`` and ``shuffle_buffer`` only, never
on the number of ranks or data-loader workers, so a run can resume on
another topology and still train on every item of an epoch exactly once.

One source: every epoch ``e`` permutes the shards (seeded by ``seed`` and
``e``) and concatenates their items in file order (an item is a sample, or
the error marker of a damaged shard: ``tarindex.ShardIndex``); that list is
cut into windows of ``shuffle_buffer`` items and each window is permuted by
its own seeded permutation: of its items, or, with ``run`` > 1 (``data.shuffle_run``),
of its runs of ``run`` consecutive items (the window rounded up to whole runs),
so that a reader's slice of a step comes from few shards in few ranged reads.
Item counts per shard come from the shard index (``corpusindex.py``), or one
walk over the tar headers (``shard_counts``), so position ``k`` of the run,
across epochs, maps to (epoch, shard, item) by arithmetic: ``SourceOrder.locate``.

A weighted mixture picks the source of each position by weight, from RNG
blocks seeded by (seed, block): position ``p`` takes the next unread
position of its source, each source with its own order and epochs. The
position of a mixture is therefore ``p`` plus how many positions each source
has served (``Position.drawn``); a resumed reader walks the picks forward
from there.

Steps consume the order in global batches: the step at position ``p`` trains
on positions ``[p, p + B)``, rank ``r`` on its slice (``rank_slices``), so
the checkpointed position is all there is to resume, on any topology.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from vlcluster.data.tarindex import count_items

PICKS_PER_BLOCK = 4096  # mixture picks drawn per seeded block: one RNG seeding per block, not per position
COUNT_THREADS = 8  # shards counted at once (reading headers from an object store is latency-bound)
CACHED_WINDOWS = 8


def shard_counts(urls: Sequence[str]) -> tuple[int, ...]:
    """Items per shard, from the tar headers (nothing decoded)."""
    with ThreadPoolExecutor(min(COUNT_THREADS, max(1, len(urls)))) as pool:
        return tuple(pool.map(count_items, urls))


def _rng(*parts: object) -> random.Random:
    # String seeds go through SHA-512: the same on every process and Python version.
    return random.Random(":".join(map(str, parts)))


class SourceOrder:
    """The canonical order of one source's items, over epochs."""

    def __init__(self, urls: Sequence[str], counts: Sequence[int], seed: int | str, window: int, run: int = 1) -> None:
        self.urls, self.counts, self.seed, self.run = tuple(urls), tuple(counts), seed, max(1, run)
        self.window = -(-max(1, window) // self.run) * self.run  # whole runs per window
        self.epoch_items = sum(self.counts)
        self._epochs: OrderedDict[int, tuple[list[int], list[int]]] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], tuple[list[int], list[int]]] = OrderedDict()

    def shard_order(self, epoch: int) -> list[int]:
        """Shard indices in the order epoch ``epoch`` reads them."""
        order = list(range(len(self.urls)))
        _rng(self.seed, epoch, "shards").shuffle(order)
        return order

    def _epoch(self, epoch: int) -> tuple[list[int], list[int]]:
        if epoch not in self._epochs:
            order = self.shard_order(epoch)
            starts = list(itertools.accumulate((self.counts[shard] for shard in order), initial=0))[:-1]
            self._epochs[epoch] = (order, starts)
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def _permutation(self, epoch: int, window: int, length: int) -> tuple[list[int], list[int]]:
        """The window's runs in shuffled order (their first items, window-relative) and where each starts in it."""
        key = (epoch, window)
        if key not in self._windows:
            runs = list(range(0, length, self.run))
            _rng(self.seed, epoch, window, "window").shuffle(runs)  # with runs of 1: the items themselves
            starts = list(itertools.accumulate((min(self.run, length - first) for first in runs), initial=0))[:-1]
            self._windows[key] = (runs, starts)
            while len(self._windows) > CACHED_WINDOWS:
                self._windows.popitem(last=False)
        return self._windows[key]

    def locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, shard index, item index in the shard) of the source's ``position``-th item."""
        epoch, within = divmod(position, self.epoch_items)
        window, slot = divmod(within, self.window)
        length = min(self.window, self.epoch_items - window * self.window)
        runs, run_starts = self._permutation(epoch, window, length)
        # Runs are whole but for a window's last one (the epoch's end): then where each starts is looked up.
        index = slot // self.run if length % self.run == 0 else bisect.bisect_right(run_starts, slot) - 1
        flat = window * self.window + runs[index] + slot - run_starts[index]
        order, starts = self._epoch(epoch)
        index = bisect.bisect_right(starts, flat) - 1
        return epoch, order[index], flat - starts[index]

    def coming_shards(self, position: int, items: int) -> list[int]:
        """Shard indices, in the order they are read, holding the items of ``position``'s shuffle window
        and of the ``items`` positions after that window (what a node cache fetches before the readers reach them)."""
        shards: dict[int, None] = {}
        start = position - position % self.epoch_items % self.window  # the window's first position
        end = start + self.window + items
        while start < end:
            epoch, within = divmod(start, self.epoch_items)
            last = min(end - epoch * self.epoch_items, self.epoch_items)
            order, starts = self._epoch(epoch)
            for index in range(bisect.bisect_right(starts, within) - 1, bisect.bisect_left(starts, last)):
                shards.setdefault(order[index])
            start = (epoch + 1) * self.epoch_items
        return list(shards)

    def shards_per_window(self) -> int:
        """The most shards one shuffle window can take items from."""
        smallest = min((count for count in self.counts if count), default=1)
        return 2 + self.window // smallest

    def fingerprint(self) -> str:
        """What fixes the order besides seed and window: the shard names in list order and the items in each.
        Names, not URLs: a run directory or data set moved elsewhere (another path, bucket) keeps its order."""
        digest = hashlib.sha256()
        for url, count in zip(self.urls, self.counts):
            digest.update(f"{url.rstrip('/').rsplit('/', 1)[-1]}\0{count}\n".encode())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Position:
    """How much of the canonical order a run has consumed: positions, and per source how many it served."""

    position: int
    drawn: tuple[int, ...]

    def state_dict(self) -> dict:
        return {"position": self.position, "drawn": list(self.drawn)}

    @classmethod
    def from_state(cls, state: dict, sources: int) -> Position:
        position, drawn = state.get("position"), state.get("drawn")
        if (
            not isinstance(position, int) or position < 0 or not isinstance(drawn, list) or len(drawn) != sources
            or not all(isinstance(n, int) and n >= 0 for n in drawn) or sum(drawn) != position
        ):
            raise ValueError(f"the saved data position {state} is not one of {sources} source(s): data.train changed since the checkpoint")
        return cls(position, tuple(drawn))


class CanonicalOrder:
    """Positions of the run -> (source, source position), for one source or a weighted mixture."""

    def __init__(
        self, sources: Sequence[SourceOrder], weights: Sequence[float], seed: int | str, window: int, locations: dict | None = None,
        run: int = 1,
    ) -> None:
        self.sources, self.weights, self.seed, self.window, self.run = tuple(sources), tuple(weights), seed, window, run
        self.locations = dict(locations or {})  # shard URL -> rangedread.ShardLocation: where its member records lie
        total = sum(weights)
        self.cumulative = list(itertools.accumulate(weight / total for weight in weights))
        self._block: tuple[int, list[int]] | None = None

    @property
    def start(self) -> Position:
        return Position(0, (0,) * len(self.sources))

    def pick(self, position: int) -> int:
        """The source that serves ``position``."""
        if len(self.sources) == 1:
            return 0
        block, index = divmod(position, PICKS_PER_BLOCK)
        if self._block is None or self._block[0] != block:
            rng = _rng(self.seed, "mix", block)
            last = len(self.sources) - 1
            self._block = (block, [min(bisect.bisect_right(self.cumulative, rng.random()), last) for _ in range(PICKS_PER_BLOCK)])
        return self._block[1][index]

    def walk(self, start: Position, count: int) -> tuple[list[tuple[int, int]], Position]:
        """(source, source position) of the ``count`` positions from ``start``, and the position after them."""
        drawn = list(start.drawn)
        served = []
        for position in range(start.position, start.position + count):
            source = self.pick(position)
            served.append((source, drawn[source]))
            drawn[source] += 1
        return served, Position(start.position + count, tuple(drawn))

    def skip(self, start: Position, count: int) -> Position:
        if len(self.sources) == 1:
            return Position(start.position + count, (start.drawn[0] + count,))
        return self.walk(start, count)[1]

    def fingerprint(self) -> dict:
        """What a resume must find unchanged (the topology is not part of it)."""
        runs = {"shuffle_run": self.run} if self.run != 1 else {}  # absent: runs of 1 (checkpoints from before runs)
        return {
            "seed": str(self.seed),
            "shuffle_buffer": self.window,
            **runs,
            "sources": [
                {"shards": len(source.urls), "items": source.epoch_items, "digest": source.fingerprint(), "weight": weight}
                for source, weight in zip(self.sources, self.weights)
            ],
        }


def refusal(saved: dict, current: dict) -> str | None:
    """Why a position saved under order ``saved`` cannot continue under ``current``, or None."""
    if saved.get("seed") != current["seed"]:
        return f"train.seed changed ({saved.get('seed')} -> {current['seed']})"
    if saved.get("shuffle_buffer") != current["shuffle_buffer"]:
        return (
            f"data.shuffle_buffer changed ({saved.get('shuffle_buffer')} -> {current['shuffle_buffer']}): it is the window "
            "the canonical order shuffles within"
        )
    if saved.get("shuffle_run", 1) != current.get("shuffle_run", 1):
        return (
            f"data.shuffle_run changed ({saved.get('shuffle_run', 1)} -> {current.get('shuffle_run', 1)}): the window is "
            "shuffled in runs of it (its default, auto, is 16 for shards on an object store and 1 on a file system: "
            "set the checkpoint's value to resume)"
        )
    old, new = saved.get("sources") or [], current["sources"]
    if len(old) != len(new):
        return f"data.train changed: it has {len(new)} source(s), the checkpoint's data had {len(old)}"
    for index, (before, now) in enumerate(zip(old, new)):
        name = f"source {index + 1} of data.train" if len(new) > 1 else "data.train"
        if before.get("weight") != now["weight"]:
            return f"the weight of {name} changed ({before.get('weight')} -> {now['weight']})"
        if before.get("digest") != now["digest"]:
            return (
                f"the shards of {name} changed ({before.get('shards')} shard(s) with {before.get('items')} items -> "
                f"{now['shards']} with {now['items']}): a shard was added, removed, renamed or rewritten"
            )
    return None


def rank_slices(rank_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(offset, size) of every rank's share of a global batch: consecutive canonical positions, in rank order."""
    offsets = itertools.accumulate(rank_sizes, initial=0)
    return [(offset, size) for offset, size in zip(offsets, rank_sizes)]
