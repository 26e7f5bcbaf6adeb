"""Weighted mixtures of shard sources (``data.train: [{shards, weight}, ...]``).

The canonical order (``order.py``) picks the source of each position by
weight, from (seed, position) only, and takes that source's next item in its
own order. Sources run through their epochs independently; a small source
repeats more often than a large one, as the weights ask.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardSource:
    """One source of a mixture: its shard URLs and sampling weight."""

    urls: tuple[str, ...]
    weight: float = 1.0
