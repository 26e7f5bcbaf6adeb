"""``dataset.json``: what an import stage (or the synthetic generator) wrote for one task.

    {"task": "vqa", "format": "vqa2", "labels": [answers or class names],
     "splits": {"train": {"shards": ["train-000000.tar", ...], "count": 1234}, "val": {...}},
     "tokenizer": "tokenizer.json" or null, "bad": {"reason": count, ...}}

Shard and tokenizer names are plain file names inside the dataset directory:
a record cannot point a stage at files elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlcluster.storage.paths import local_copy, read_json, run_path, write_json
from vlcluster.tasks.base import TaskInfo

RECORD = "dataset.json"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class DatasetError(ValueError):
    """A dataset.json that is missing, malformed or for another task."""


@dataclass(frozen=True)
class TaskData:
    root: Path
    task: str
    info: TaskInfo
    splits: dict[str, list[str]]  # split -> shard URLs
    counts: dict[str, int]
    tokenizer: str | None  # local path

    def shards(self, split: str, where: str) -> list[str]:
        urls = self.splits.get(split, [])
        if not urls:
            raise DatasetError(f"{where}: the dataset in {self.root} has no {split!r} split (splits: {sorted(self.splits)})")
        return urls


def write_record(root: str | Path, task: str, fmt: str, labels: list[str], splits: dict[str, dict[str, Any]],
                 tokenizer: str | None, bad: dict[str, int] | None = None) -> dict:
    record = {"task": task, "format": fmt, "labels": list(labels), "splits": splits, "tokenizer": tokenizer, "bad": bad or {}}
    write_json(run_path(root) / RECORD, record)
    return record


def _plain(name: Any, path: Path, field: str) -> str:
    if not isinstance(name, str) or not _PLAIN_NAME.match(name):
        raise DatasetError(f"{path}: field {field}: {name!r} is not a plain file name inside the dataset directory")
    return name


def read_task_data(root: str | Path, task: str, where: str) -> TaskData:
    root = run_path(root)
    path = root / RECORD
    record = read_json(path)
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: no readable {path} (an import stage or a data stage with tasks writes it)")
    if record.get("task") != task:
        raise DatasetError(f"{path}: field task: the dataset is for {record.get('task')!r}, the stage wants {task!r}")
    labels = record.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise DatasetError(f"{path}: field labels: expected a list of strings")
    splits, counts = {}, {}
    for split, entry in (record.get("splits") or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
            raise DatasetError(f"{path}: field splits.{split}: expected {{shards: [...], count: N}}")
        splits[split] = [str(root / _plain(name, path, f"splits.{split}.shards")) for name in entry["shards"]]
        counts[split] = int(entry.get("count", 0))
    tokenizer = record.get("tokenizer")
    if tokenizer is not None:
        tokenizer = str(local_copy(root / _plain(tokenizer, path, "tokenizer")))
    return TaskData(root, task, TaskInfo(tuple(labels)), splits, counts, tokenizer)
