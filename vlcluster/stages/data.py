"""The ``data`` stage: build the synthetic benchmark into the stage directory."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from vlcluster.jobspec.models import StageBase, TaskName
from vlcluster.stages.outputs import finish_stage

if TYPE_CHECKING:
    from vlcluster.stages.context import StageContext

log = logging.getLogger("vlcluster.data")


class DataStage(StageBase):
    kind: Literal["data"]
    n_train: int = Field(20000, gt=0)
    n_val: int = Field(500, gt=0)
    shard_size: int = Field(2000, gt=0)
    image_size: int = Field(32, gt=0)
    seed: int = 0
    tasks: list[TaskName] = Field(default_factory=list, description="also write these downstream tasks' synthetic datasets")
    task_n_train: int | None = Field(None, gt=0, description="training samples per task (default n_train)")
    task_n_val: int | None = Field(None, gt=0, description="validation samples per task (default n_val)")




def write_synthetic_tasks(ctx: StageContext, tokenizer: str) -> dict[str, dict]:
    """The downstream tasks' synthetic datasets under ``tasks/<task>/``, sharing the tokenizer."""
    from vlcluster.data.synthetic_tasks import write_task_dataset

    spec = ctx.spec
    written = {}
    for task in spec.tasks:
        record = write_task_dataset(
            str(ctx.dir.root / "tasks" / task), task, spec.task_n_train or spec.n_train, spec.task_n_val or spec.n_val,
            spec.shard_size, spec.image_size, spec.seed, tokenizer,
        )
        written[task] = {split: entry["count"] for split, entry in record["splits"].items()}
        log.info("task %s: %s", task, written[task])
    return written


def run(ctx: StageContext) -> None:
    from vlcluster.data.synthetic import build_dataset

    spec = ctx.spec
    started = time.perf_counter()

    def progress(split: str, done: int, total: int) -> None:
        log.info("%s: %d/%d shards", split, done, total)

    summary = build_dataset(
        str(ctx.dir.root), spec.n_train, spec.n_val, spec.shard_size, spec.image_size, spec.seed, progress=progress
    )
    summary["tasks"] = write_synthetic_tasks(ctx, str(summary["tokenizer"]))
    elapsed = time.perf_counter() - started
    log.info("wrote %d train and %d val samples in %.1f s", spec.n_train, spec.n_val, elapsed)
    finish_stage(ctx, {**summary, "seconds": elapsed})
