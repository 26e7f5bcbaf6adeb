"""What the loaders take, from plain values a job file's ``data`` section holds:
weighted shard sources, the field map and the augmentation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from vlcluster.data.augment import Augment
from vlcluster.data.fields import FieldMap
from vlcluster.data.mixture import ShardSource
from vlcluster.storage import shardlist


def train_mixture(sources: Iterable[tuple[str | list[str], float]]) -> tuple[ShardSource, ...]:
    """One ``ShardSource`` per (shard patterns, weight) pair, its patterns expanded
    (none without training shards)."""
    return tuple(ShardSource(tuple(shardlist.expand(shards)), weight) for shards, weight in sources)


def single_source(urls: list[str]) -> tuple[ShardSource, ...]:
    return (ShardSource(tuple(urls)),)


def field_map(image: Sequence[str], caption: Sequence[str]) -> FieldMap:
    """The sample fields an image and a caption are read from, first present wins."""
    return FieldMap(tuple(image), tuple(caption))


def augmentation(kind: str, flip: bool) -> Augment:
    return Augment(kind, flip)
