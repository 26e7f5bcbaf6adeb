"""Downstream tasks by name. A new task is one module plus one line here.

The table names each task's class as "module:Class" and imports it only when
the task is used: the job-file schema reads the names (``TASK_NAMES``) on the
submit path, which never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlcluster.tasks.base import Task


@dataclass(frozen=True)
class TaskEntry:
    cls: str  # "module:Class" of the task's ``Task`` subclass
    scores: tuple[str, ...]  # its eval's headline scores, in the order the study shows them


TASKS: dict[str, TaskEntry] = {
    "vqa": TaskEntry("vlcluster.tasks.vqa:VQATask", ("vqa_acc",)),
    "retrieval": TaskEntry("vlcluster.tasks.image_text_retrieval:RetrievalTask", ("tr", "ir")),
    "nlvr2": TaskEntry("vlcluster.tasks.nlvr2:NLVR2Task", ("nlvr2_acc",)),
    "classification": TaskEntry("vlcluster.tasks.classification:ClassificationTask", ("top1",)),
    "segmentation": TaskEntry("vlcluster.tasks.segmentation:SegmentationTask", ("miou",)),
}

TASK_NAMES = tuple(TASKS)
HEADLINE_SCORES = tuple(score for entry in TASKS.values() for score in entry.scores)


@cache
def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    module, cls = TASKS[name].cls.split(":")
    task = getattr(importlib.import_module(module), cls)()
    if task.name != name:
        raise ValueError(f"tasks/registry.py: {TASKS[name].cls} is named {task.name!r}, registered as {name!r}")
    return task
