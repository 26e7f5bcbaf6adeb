"""Weighted mixtures of shard sources (``data.train: [{shards, weight}, ...]``).

A reader of a mixture holds one ``SampleStream`` per source (its own share
of that source's shards, as for a single source) and picks the source of
each item by weight. The n-th pick of reader ``part`` is a pure function of
(seed, part, n), so the reader's position is just n plus each source's
(epoch, offset): a resumed reader replays the same picks from the same
places. Sources run through their epochs independently; a small source
repeats more often than a large one, as the weights ask.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlcluster.data.stream import RawSample, SampleStream

PICKS_PER_BLOCK = 4096  # picks drawn per seeded block: one RNG seeding per block, not per item


@dataclass(frozen=True)
class ShardSource:
    """One source of a mixture: its shard URLs and sampling weight."""

    urls: tuple[str, ...]
    weight: float = 1.0


class MixedStream:
    """Infinite, deterministic, resumable stream over weighted sources for reader ``part`` of ``parts``."""

    def __init__(self, sources: Sequence[ShardSource], part: int, parts: int, seed: int, shuffle_buffer: int = 256) -> None:
        if len(sources) < 2:
            raise ValueError("a mixture needs at least two sources")
        if any(source.weight <= 0 for source in sources):
            raise ValueError(f"mixture weights must be > 0, got {[source.weight for source in sources]}")
        self.part, self.parts, self.seed = part, parts, seed
        self.streams = [
            SampleStream(source.urls, part, parts, f"{seed}:source{index}", shuffle_buffer)
            for index, source in enumerate(sources)
        ]
        total = sum(source.weight for source in sources)
        self.cumulative = list(itertools.accumulate(source.weight / total for source in sources))
        self.drawn = 0
        self._block: tuple[int, list[int]] | None = None

    def pick(self, n: int) -> int:
        """The source of this reader's ``n``-th item."""
        block, index = divmod(n, PICKS_PER_BLOCK)
        if self._block is None or self._block[0] != block:
            rng = random.Random(f"{self.seed}:{self.part}:mix:{block}")
            picks = [min(bisect.bisect_right(self.cumulative, rng.random()), len(self.streams) - 1) for _ in range(PICKS_PER_BLOCK)]
            self._block = (block, picks)
        return self._block[1][index]

    @property
    def epoch(self) -> int:
        """The most passes any source has completed (a reader of only bad data stops after one)."""
        return max(stream.epoch for stream in self.streams)

    @property
    def offset(self) -> int:
        return max(stream.offset for stream in self.streams if stream.epoch == self.epoch)

    @property
    def at_epoch_end(self) -> bool:
        return any(stream.at_epoch_end and stream.epoch == self.epoch for stream in self.streams)

    def shards_for_epoch(self, epoch: int) -> list[str]:
        return [url for stream in self.streams for url in stream.shards_for_epoch(epoch)]

    def __iter__(self) -> MixedStream:
        return self

    def __next__(self) -> RawSample:
        source = self.pick(self.drawn)
        item = next(self.streams[source])
        self.drawn += 1
        return item

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn, "sources": [stream.state_dict() for stream in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sources" not in state or len(state["sources"]) != len(self.streams):
            raise ValueError(
                f"the saved data position {state} is not one of a mixture of {len(self.streams)} sources: "
                "data.train changed since the checkpoint"
            )
        drawn = int(state["drawn"])
        if drawn < 0:
            raise ValueError(f"invalid mixture state {state}")
        for stream, position in zip(self.streams, state["sources"]):
            stream.load_state_dict(position)
        self.drawn = drawn
