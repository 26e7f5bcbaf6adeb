"""Downstream tasks by name. A new task is one module plus one line here."""

from __future__ import annotations

from vlcluster.tasks.base import Task
from vlcluster.tasks.classification import ClassificationTask
from vlcluster.tasks.image_text_retrieval import RetrievalTask
from vlcluster.tasks.nlvr2 import NLVR2Task
from vlcluster.tasks.segmentation import SegmentationTask
from vlcluster.tasks.vqa import VQATask

TASKS: dict[str, Task] = {
    "vqa": VQATask(),
    "retrieval": RetrievalTask(),
    "nlvr2": NLVR2Task(),
    "classification": ClassificationTask(),
    "segmentation": SegmentationTask(),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]
