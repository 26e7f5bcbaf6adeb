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
    # The class's ``route`` and images per sample, for ``plan``'s FLOPs estimate (which imports no torch).
    route: str
    images: int = 1


TASKS: dict[str, TaskEntry] = {
    "vqa": TaskEntry("vlcluster.tasks.vqa:VQATask", ("vqa_acc",), "fusion"),
    "retrieval": TaskEntry("vlcluster.tasks.image_text_retrieval:RetrievalTask", ("tr", "ir"), "dual"),
    "nlvr2": TaskEntry("vlcluster.tasks.nlvr2:NLVR2Task", ("nlvr2_acc",), "fusion", images=2),
    "classification": TaskEntry("vlcluster.tasks.classification:ClassificationTask", ("top1",), "vision"),
    "segmentation": TaskEntry("vlcluster.tasks.segmentation:SegmentationTask", ("miou",), "vision"),
}

TASK_NAMES = tuple(TASKS)
HEADLINE_SCORES = tuple(score for entry in TASKS.values() for score in entry.scores)


@cache
def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    entry = TASKS[name]
    module, cls = entry.cls.split(":")
    task = getattr(importlib.import_module(module), cls)()
    if task.name != name:
        raise ValueError(f"tasks/registry.py: {entry.cls} is named {task.name!r}, registered as {name!r}")
    if task.route != entry.route:
        raise ValueError(f"tasks/registry.py: {entry.cls} takes the {task.route!r} route, registered with {entry.route!r}")
    return task
