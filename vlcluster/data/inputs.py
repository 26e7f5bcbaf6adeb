"""The data a stage reads, resolved to files: shard URLs, tokenizer, answers,
shuffling, field names and augmentation (the stage layer fills it in)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # kept out of the import: the control plane names this class without loading the data modules
    from vlcluster.data.augment import Augment
    from vlcluster.data.fields import FieldMap
    from vlcluster.data.mixture import ShardSource


@dataclass(frozen=True)
class DataSources:
    train: list[str]
    val: list[str]
    tokenizer: str | None
    answers: str | None
    shuffle_buffer: int
    shuffle_run: int | str = 1  # items per shuffled run (data.shuffle_run; auto: data/loader.py resolves it)
    train_mixture: tuple[ShardSource, ...] = ()  # one per weighted source of data.train
    fields: FieldMap | None = None  # which files hold image, captions, task fields
    augment: Augment | None = None  # of training images
