"""Synthetic datasets for the tests (vlcluster.data.synthetic.build_dataset):
each shape is built once per session and handed out to every test that asks
for it, read-only; a damaged one (tests/support/damage.py) is a copy of its
own, damaged once. Through the ``synthetic_data`` fixture (tests/conftest.py)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.damage import damage
from vlcluster.data import synthetic as syn


@dataclass(frozen=True)
class Dataset:
    dir: Path
    summary: dict  # build_dataset's: train_shards, val_shards, tokenizer, answers, ...
    bad_keys: frozenset[str] = field(default_factory=frozenset)  # the samples `damage` broke

    @property
    def train_shards(self) -> list[str]:
        return self.summary["train_shards"]


class SyntheticData:
    """Datasets under ``root``, one folder per shape (and per damaged shape)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[tuple, Dataset] = {}

    def clean(self, n_train: int, n_val: int, shard_size: int, image_size: int, seed: int) -> Dataset:
        shape = (n_train, n_val, shard_size, image_size, seed)
        if ("clean", *shape) not in self._made:
            directory = self.root / ("clean-" + "-".join(map(str, shape)))
            directory.mkdir()
            self._made["clean", *shape] = Dataset(directory, syn.build_dataset(str(directory), *shape))
        return self._made["clean", *shape]

    def damaged(self, n_train: int, n_val: int, shard_size: int, image_size: int, seed: int) -> Dataset:
        shape = (n_train, n_val, shard_size, image_size, seed)
        if ("damaged", *shape) not in self._made:
            clean = self.clean(*shape)
            directory = self.root / ("damaged-" + "-".join(map(str, shape)))
            shutil.copytree(clean.dir, directory)
            summary = json.loads(json.dumps(clean.summary).replace(str(clean.dir), str(directory)))
            self._made["damaged", *shape] = Dataset(directory, summary, frozenset(damage(summary["train_shards"])))
        return self._made["damaged", *shape]
