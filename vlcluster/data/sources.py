"""From a job file's ``data`` section to what the loaders take: shard sources and field map."""

from __future__ import annotations

from vlcluster.data.augment import Augment
from vlcluster.data.fields import FieldMap
from vlcluster.data.mixture import ShardSource
from vlcluster.jobspec.models import DataSpec
from vlcluster.storage import shardlist


def train_mixture(data: DataSpec) -> tuple[ShardSource, ...]:
    """One ``ShardSource`` per source of ``data.train`` (none without training shards)."""
    return tuple(
        ShardSource(tuple(shardlist.expand(source.shards)), source.weight) for source in data.train_sources()
    )


def single_source(urls: list[str]) -> tuple[ShardSource, ...]:
    return (ShardSource(tuple(urls)),)


def field_map(data: DataSpec) -> FieldMap:
    return FieldMap(tuple(data.fields.image), tuple(data.fields.caption))


def augmentation(data: DataSpec) -> Augment:
    return Augment(data.augment, data.augment_flip)
